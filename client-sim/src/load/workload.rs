//! The workload `client-sim load` runs: from a scenario file (TOML,
//! `--scenario`), overridden by flags. Every field has a default; the
//! report echoes the workload it ran.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How clips go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Packets in real time, as a phone records them.
    Live,
    /// As fast as the network allows.
    Upload,
}

/// Where a press starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PressFrom {
    /// The talker's phone is connected: the press opens a stream at once.
    Connected,
    /// The talker's phone was asleep, its connection gone: the press
    /// connects first (with 0-RTT when `zero_rtt` and a ticket allow),
    /// sends the clip, and the talker disconnects again after it.
    Asleep,
}

fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

macro_rules! workload {
    ($($(#[$doc:meta])* $name:ident: $ty:ty = $default:expr $(, $parser:ident)?;)*) => {
        /// A workload, every value filled in.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct Workload {
            $($(#[$doc])* $(#[serde(with = "humantime_serde")] #[cfg_attr(any(), doc = stringify!($parser))])? pub $name: $ty,)*
        }

        impl Default for Workload {
            fn default() -> Self {
                Self { $($name: $default,)* }
            }
        }

        /// Workload flags: each overrides the scenario file.
        #[derive(Debug, Clone, Default, clap::Args)]
        pub struct WorkloadArgs {
            $($(#[$doc])* #[arg(long $(, value_parser = $parser)?)] pub $name: Option<$ty>,)*
        }

        impl WorkloadArgs {
            /// Applies the flags given over `w`.
            pub fn apply(self, w: &mut Workload) {
                $(if let Some(v) = self.$name { w.$name = v; })*
            }
        }
    };
}

workload! {
    /// Virtual users (each one QUIC connection).
    users: usize = 200;
    /// Client UDP sockets (quinn endpoints) the users are spread over.
    endpoints: usize = 4;
    /// Number of this run's first user (`load-NNNNNN`) and channel: several
    /// `client-sim load` processes against one relay each take their own
    /// range (`--first-user 0`, `--first-user 25000`, ...), so that one
    /// generator process is not the limit. Users talk within their run.
    first_user: usize = 0;
    /// Connection attempts (handshake to `Welcome`) in flight at once in
    /// this process; the rest wait their turn. Bounds the generator's own
    /// handshake work, so a burst of thousands of users connecting does not
    /// starve its core into timeouts and retries.
    connecting: usize = 256;
    /// How long users start new clips.
    duration: Duration = Duration::from_secs(20), parse_duration;
    /// Stop after this many clips in all (0: no limit).
    max_clips: u64 = 0;
    /// Mean time between one user's clips (Poisson arrivals).
    talk_interval: Duration = Duration::from_secs(15), parse_duration;
    /// Shortest clip.
    clip_min: Duration = Duration::from_secs(1), parse_duration;
    /// Longest clip (lengths are uniform in between).
    clip_max: Duration = Duration::from_secs(8), parse_duration;
    /// Talk channels of this many users each (0: one-to-one clips to
    /// random users). Each user talks in its channel (the floor allowing)
    /// and every other member must receive the clip.
    channel_size: usize = 0;
    /// With channels: how many members of each channel talk (the first
    /// ones; 0: all). 1 gives one talker to many listeners.
    talkers_per_channel: usize = 0;
    /// Live (real-time pacing) or upload (as fast as possible).
    mode: Mode = Mode::Live;
    /// Share of users (0..1) offline at the start; each comes online at a
    /// random moment in the first half of the run and then receives what
    /// was stored for it.
    offline_share: f64 = 0.0;
    /// At this moment every user drops its connection and reconnects at
    /// once (a reconnect storm).
    storm_at: Option<Duration> = None, parse_duration;
    /// Packet loss on every user's link, percent, each direction.
    loss_pct: f64 = 0.0;
    /// One-way delay added on every user's link, each direction.
    delay: Duration = Duration::ZERO, parse_duration;
    /// Extra random delay, uniform in 0..jitter, per datagram (datagrams
    /// overtake each other when it exceeds their spacing).
    jitter: Duration = Duration::ZERO, parse_duration;
    /// Share of datagrams (percent) held back an extra 10 ms: reordering.
    reorder_pct: f64 = 0.0;
    /// At this moment every endpoint moves to a new UDP socket (a new
    /// address: a phone changing networks) while clips are in flight.
    rebind_at: Option<Duration> = None, parse_duration;
    /// Where each press starts from: `asleep` measures access time with a
    /// reconnect (needs channels with one talker each, so a sleeping
    /// talker is owed nothing).
    press_from: PressFrom = PressFrom::Connected;
    /// Reconnects resume TLS and send `Auth` in QUIC 0-RTT (false: every
    /// connection does a full handshake).
    zero_rtt: bool = true;
    /// Packets the relay may receive from a user before it must ACK them
    /// (the users' QUIC ACK frequency request; 1: plain QUIC). The relay's
    /// `ack_threshold` and `ack_delay` set the other way.
    client_ack_threshold: u32 = 4;
    /// Longest the relay may delay an ACK of what a user sends.
    client_ack_delay: Duration = Duration::from_millis(25), parse_duration;
    /// How often a silent user's connection sends a QUIC PING (1s..=25s).
    client_keep_alive: Duration = Duration::from_secs(15), parse_duration;
    /// After the run, how long owed clips may take to arrive before they
    /// count as lost.
    grace: Duration = Duration::from_secs(15), parse_duration;
    /// With several relays (`--relay A,B,...`): one-to-one clips go only
    /// to users connected to another relay than the sender's, so every
    /// clip crosses the cluster.
    cross_relay: bool = false;
    /// One-to-one clips in fixed pairs: user 2k talks to user 2k+1 only,
    /// and 2k+1 only listens, so each connection carries one leg (sender
    /// ↔ relay or relay ↔ recipient): the report then counts datagrams
    /// per clip on each leg (`datagrams_per_clip_sender_to_relay`, ...).
    pairs: bool = false;
    /// Random seed (0: a random one).
    seed: u64 = 0;
}

impl Workload {
    /// Reads a scenario file.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("in {}: {e}", path.display()))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.users >= 2,
            "users: at least 2 (they talk to each other)"
        );
        anyhow::ensure!(self.endpoints >= 1, "endpoints: at least 1");
        anyhow::ensure!(self.connecting >= 1, "connecting: at least 1");
        anyhow::ensure!(
            (1..=1000).contains(&self.client_ack_threshold),
            "client_ack_threshold: 1..=1000"
        );
        anyhow::ensure!(
            self.client_ack_delay >= Duration::from_millis(1)
                && self.client_ack_delay <= Duration::from_millis(200),
            "client_ack_delay: 1ms..=200ms"
        );
        anyhow::ensure!(
            self.client_keep_alive >= Duration::from_secs(1)
                && self.client_keep_alive <= ptt_client::net::MAX_KEEP_ALIVE,
            "client_keep_alive: 1s..=25s"
        );
        anyhow::ensure!(
            self.clip_min >= Duration::from_millis(20) && self.clip_min <= self.clip_max,
            "clip_min must be at least 20ms and at most clip_max"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.offline_share),
            "offline_share is a share: 0..1"
        );
        anyhow::ensure!(
            (0.0..100.0).contains(&self.loss_pct) && (0.0..=100.0).contains(&self.reorder_pct),
            "loss_pct and reorder_pct are percentages"
        );
        anyhow::ensure!(!self.talk_interval.is_zero(), "talk_interval must be > 0");
        anyhow::ensure!(
            self.channel_size != 1,
            "channel_size: 0 (one-to-one) or at least 2"
        );
        anyhow::ensure!(
            !self.pairs
                || (self.channel_size == 0 && self.users.is_multiple_of(2) && !self.cross_relay),
            "pairs: one-to-one (channel_size 0), an even number of users, no cross_relay"
        );
        anyhow::ensure!(
            self.press_from == PressFrom::Connected
                || (self.channel_size >= 2 && self.talkers_per_channel == 1),
            "press_from = asleep needs channel_size >= 2 and talkers_per_channel = 1 \
             (a sleeping talker must be owed no clip)"
        );
        Ok(())
    }

    pub fn impaired(&self) -> bool {
        self.loss_pct > 0.0
            || !self.delay.is_zero()
            || !self.jitter.is_zero()
            || self.reorder_pct > 0.0
            || self.rebind_at.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_flags() {
        let mut w: Workload = toml::from_str(
            r#"
            users = 50
            duration = "5s"
            mode = "upload"
            storm_at = "2s"
            "#,
        )
        .unwrap();
        let flags = WorkloadArgs {
            users: Some(10),
            ..WorkloadArgs::default()
        };
        flags.apply(&mut w);
        assert_eq!(w.users, 10);
        assert_eq!(w.duration, Duration::from_secs(5));
        assert_eq!(w.mode, Mode::Upload);
        assert_eq!(w.storm_at, Some(Duration::from_secs(2)));
        assert_eq!(w.endpoints, 4);
        assert!(toml::from_str::<Workload>("userz = 3").is_err());
        w.validate().unwrap();
    }

    /// Pairs are one-to-one, whole, on one relay's users.
    #[test]
    fn pairs_are_checked() {
        let pairs = Workload {
            users: 10,
            pairs: true,
            ..Workload::default()
        };
        pairs.validate().unwrap();
        for bad in [
            Workload {
                users: 9,
                ..pairs.clone()
            },
            Workload {
                channel_size: 5,
                ..pairs.clone()
            },
            Workload {
                cross_relay: true,
                ..pairs.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    /// The ACK frequency a user asks for stays in the relay's own range.
    #[test]
    fn client_ack_request_is_checked() {
        let ok = Workload::default();
        ok.validate().unwrap();
        for bad in [
            Workload {
                client_ack_threshold: 0,
                ..ok.clone()
            },
            Workload {
                client_ack_delay: Duration::ZERO,
                ..ok.clone()
            },
            Workload {
                client_ack_delay: Duration::from_millis(201),
                ..ok.clone()
            },
            Workload {
                client_keep_alive: Duration::from_millis(500),
                ..ok.clone()
            },
            Workload {
                client_keep_alive: Duration::from_secs(26),
                ..ok.clone()
            },
            Workload {
                connecting: 0,
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
