//! Relay settings: one struct read from a TOML file (`--config`), the
//! environment (`PTT_*`) and command-line flags, in rising order of
//! precedence. Every field is optional in all three; [`Config::resolve`]
//! fills in the documented defaults. `relay.toml.example` and
//! `docs/operations.md` list them all.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where clips wait for their recipients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// On local disk (an append-only log in DATA_DIR/log/), with every
    /// undelivered clip
    /// also in memory: accepted clips survive crashes.
    Disk,
    /// In memory only: lost when the process stops.
    Memory,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the web listener listens, or `off` (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WebListen(pub Option<SocketAddr>);

impl std::str::FromStr for WebListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "off" | "" => Ok(WebListen(None)),
            a => a
                .parse()
                .map(|a| WebListen(Some(a)))
                .map_err(|e| format!("`{a}`: {e} (an address such as 127.0.0.1:8080, or off)")),
        }
    }
}

impl TryFrom<String> for WebListen {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<WebListen> for String {
    fn from(w: WebListen) -> String {
        w.0.map_or_else(|| "off".into(), |a| a.to_string())
    }
}

fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

macro_rules! settings {
    ($($(#[$doc:meta])* $name:ident: $ty:ty = $default:expr, $env:literal $(, $parser:ident)?;)*) => {
        /// Settings as given (file, environment, flags): all optional.
        #[derive(Debug, Clone, Default, PartialEq, clap::Args, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct Settings {
            /// TOML file with settings; flags and environment override it.
            #[arg(long, env = "PTT_CONFIG")]
            #[serde(skip)]
            pub config: Option<PathBuf>,
            $(
                $(#[$doc])*
                #[arg(long, env = $env $(, value_parser = $parser)?)]
                #[serde(skip_serializing_if = "Option::is_none")]
                $(#[serde(with = "humantime_serde")] #[cfg_attr(any(), doc = stringify!($parser))])?
                pub $name: Option<$ty>,
            )*
        }

        /// Settings with every default filled in.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Config {
            $($(#[$doc])* pub $name: $ty,)*
        }

        impl Default for Config {
            fn default() -> Self {
                Self { $($name: $default,)* }
            }
        }

        impl Settings {
            /// Every setting's name, as in the TOML file.
            pub const NAMES: &'static [&'static str] = &[$(stringify!($name),)*];

            /// `self` wins where both are set.
            pub fn or(self, base: Settings) -> Settings {
                Settings {
                    config: self.config.or(base.config),
                    $($name: self.$name.or(base.$name),)*
                }
            }

            fn fill(self) -> Config {
                let d = Config::default();
                Config { $($name: self.$name.unwrap_or(d.$name),)* }
            }
        }
    };
}

settings! {
    /// UDP address of the QUIC endpoint.
    listen: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 4433)), "PTT_LISTEN";
    /// TCP address of the admin HTTP listener (/healthz, /readyz, /metrics).
    /// Trusted
    /// plane: keep it on loopback or a private network.
    admin: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 9464)), "PTT_ADMIN";
    /// Directory for the certificate, key, token secret and store.
    data_dir: PathBuf = PathBuf::from("ptt-data"), "PTT_DATA_DIR";
    /// The operator's certificate chain (PEM), e.g. one a public CA
    /// signed, with `key`. Empty: DATA_DIR/cert.pem, self-signed for
    /// localhost, made on the first start (and, for browsers, a
    /// short-lived one renewed in memory: `web`).
    cert: PathBuf = PathBuf::new(), "PTT_CERT";
    /// The private key (PEM) of `cert`. Empty: DATA_DIR/key.pem.
    key: PathBuf = PathBuf::new(), "PTT_KEY";
    /// TCP address of the web listener serving the browser app (HTTP, no
    /// TLS: keep it on loopback, or behind a reverse proxy that adds
    /// HTTPS; docs/operations.md). `off`: no web listener. Browsers reach
    /// the relay itself over WebTransport on `listen` (HTTP/3, ALPN `h3`)
    /// either way.
    web: WebListen = WebListen(Some(SocketAddr::from(([127, 0, 0, 1], 8080)))), "PTT_WEB";
    /// The service's other relays for the browser app: their web
    /// listeners' addresses (`http://HOST:PORT` or `https://...`),
    /// comma-separated, in order of preference after this one. A page
    /// loaded from this relay moves to the next when this one does not
    /// answer and comes back once it does (docs/protocol.md, "Several
    /// relays"). Empty: this relay alone.
    web_relays: String = String::new(), "PTT_WEB_RELAYS";
    /// Which clip store to use.
    store: StoreKind = StoreKind::Disk, "PTT_STORE";
    /// Log format on stderr.
    log_format: LogFormat = LogFormat::Text, "PTT_LOG_FORMAT";
    /// Most connections the relay holds at once; more are closed with
    /// `server_busy`.
    max_connections: usize = 50_000, "PTT_MAX_CONNECTIONS";
    /// Time a new connection has to send `Auth`.
    auth_timeout: Duration = Duration::from_secs(10), "PTT_AUTH_TIMEOUT", parse_duration;
    /// Connections that have not authenticated yet (handshaking or waiting
    /// for `Auth`), at most; more handshakes are refused at once. Until it
    /// authenticates a connection may open only its control stream and one
    /// early upload, and have at most `max_message_bytes` (plus framing)
    /// plus `early_upload_bytes` unread at the relay, so these hold at
    /// most this many times that.
    max_unauthenticated_connections: usize = 1024, "PTT_MAX_UNAUTHENTICATED_CONNECTIONS";
    /// Bytes a client may send on one upload stream before its `Auth` is
    /// read (with a 0-RTT reconnect: a press's first audio rides with the
    /// handshake). The relay reads them only once the token is good; they
    /// count in what an unauthenticated connection may make it hold. 0:
    /// nothing but the control stream before `Auth`.
    early_upload_bytes: u64 = 8192, "PTT_EARLY_UPLOAD_BYTES";
    /// TLS resumption tickets kept for QUIC 0-RTT reconnects: one per
    /// connection, single use, oldest forgotten first (~300 bytes each, so
    /// ~19 MiB at the default). A client whose ticket was forgotten, or
    /// that reconnects after a relay restart, gets a full handshake. 0
    /// turns 0-RTT (and resumption) off.
    zero_rtt_tickets: usize = 65_536, "PTT_ZERO_RTT_TICKETS";
    /// Length of the connection ids the relay gives out (4..=20): every
    /// datagram a client sends carries one. Shorter spends fewer bytes per
    /// voice packet; 3 bytes of each are random (16 million ids), the rest
    /// a signature from `reset.key`, so a restarted relay knows its
    /// previous run's ids and resets their connections at once.
    connection_id_bytes: usize = 4, "PTT_CONNECTION_ID_BYTES";
    /// A connection silent this long is closed (clients send keep-alives).
    idle_timeout: Duration = Duration::from_secs(30), "PTT_IDLE_TIMEOUT", parse_duration;
    /// Public keys for EdDSA (Ed25519) and ES256 tokens: a JWKS file, or a
    /// directory of `*.json` JWKS files, each key with a `kid`. Re-read
    /// every `token_keys_reload`, so keys rotate without a restart. Empty:
    /// none (HS256 tokens only).
    token_keys: String = String::new(), "PTT_TOKEN_KEYS";
    /// How often `token_keys` is re-read.
    token_keys_reload: Duration = Duration::from_secs(10), "PTT_TOKEN_KEYS_RELOAD", parse_duration;
    /// Accept HS256 tokens signed with DATA_DIR/token.secret (development;
    /// turn off once the app backend mints EdDSA or ES256 tokens, so no
    /// relay holds a key that mints tokens).
    token_hs256: bool = true, "PTT_TOKEN_HS256";
    /// Clock skew tolerated on a token's `exp`.
    token_leeway: Duration = Duration::from_secs(30), "PTT_TOKEN_LEEWAY", parse_duration;
    /// Longest clip (sum of its packets' durations).
    max_clip_duration: Duration = Duration::from_secs(60), "PTT_MAX_CLIP_DURATION", parse_duration;
    /// Most Opus bytes in one clip.
    max_clip_bytes: u64 = 2 * 1024 * 1024, "PTT_MAX_CLIP_BYTES";
    /// Largest Opus packet (each frame in it is at most 1275 bytes anyway).
    /// Default: six 20 ms frames of the largest size, 1275 * 6 + 7.
    max_packet_bytes: u64 = 7657, "PTT_MAX_PACKET_BYTES";
    /// Clip uploads at once per connection (QUIC stream limit).
    max_clip_streams: u32 = 8, "PTT_MAX_CLIP_STREAMS";
    /// An upload with no byte for this long is refused with
    /// `upload_idle_timeout` and cut off for live recipients.
    upload_idle_timeout: Duration = Duration::from_secs(10), "PTT_UPLOAD_IDLE_TIMEOUT", parse_duration;
    /// Most an upload may fall behind real time: its audio so far against
    /// the time since its header. A slower upload (a trickle holding a
    /// channel's floor) is refused with `upload_idle_timeout`. So no upload,
    /// and no floor, lasts longer than `max_clip_duration` plus this.
    max_upload_lag: Duration = Duration::from_secs(10), "PTT_MAX_UPLOAD_LAG", parse_duration;
    /// Largest message (header, auth) on any stream.
    max_message_bytes: usize = codec::wire::DEFAULT_MAX_MESSAGE_BYTES, "PTT_MAX_MESSAGE_BYTES";
    /// Stored clips delivered to a recipient and not yet acknowledged, at
    /// most (stored backlog flows in this window).
    max_unacked_deliveries: usize = 64, "PTT_MAX_UNACKED_DELIVERIES";
    /// Live clips waiting to start per recipient; a recipient that falls
    /// further behind gets them from the store instead.
    live_queue: usize = 64, "PTT_LIVE_QUEUE";
    /// How long a clip id is remembered after acceptance, so a sender's
    /// retry is answered `duplicate` instead of being delivered twice.
    dedupe_window: Duration = Duration::from_secs(600), "PTT_DEDUPE_WINDOW", parse_duration;
    /// Disk store: least time between two commits. Under load, clips and
    /// acks gather this long and share one write and one fsync (group
    /// commit); a sender's `Accepted` waits at most this much longer.
    store_commit_interval: Duration = Duration::from_millis(3), "PTT_STORE_COMMIT_INTERVAL", parse_duration;
    /// Most bytes held by the store; past it new clips get `storage_full`.
    max_store_bytes: u64 = 1024 * 1024 * 1024, "PTT_MAX_STORE_BYTES";
    /// Undelivered clips older than this are dropped.
    clip_ttl: Duration = Duration::from_secs(7 * 24 * 3600), "PTT_CLIP_TTL", parse_duration;
    /// `Expired` notices kept per user (one per copy dropped at `clip_ttl`
    /// without an ack, until the user's client acks it); past it the
    /// oldest are folded into the next one's `also` count.
    expired_notices_per_user: usize = 64, "PTT_EXPIRED_NOTICES_PER_USER";
    /// How long an `Expired` notice waits for its user after the clip
    /// expired; a user away longer than `clip_ttl` plus this is not told.
    expired_notice_ttl: Duration = Duration::from_secs(90 * 24 * 3600), "PTT_EXPIRED_NOTICE_TTL", parse_duration;
    /// NATS servers of the cluster this relay joins (`nats://HOST:PORT`,
    /// comma-separated); empty: a single relay, no external service.
    cluster: String = String::new(), "PTT_CLUSTER";
    /// Cluster: JetStream replicas of stored clips (3 on a 3-node NATS
    /// cluster: a clip survives the loss of one NATS node).
    cluster_replicas: usize = 1, "PTT_CLUSTER_REPLICAS";
    /// Cluster: how long an accepted direct clip waits, before it is
    /// written to JetStream, for the ack of its recipient when that
    /// recipient is hearing it live on this relay: a clip its recipient
    /// has needs no copy in the cluster (nor its deletion). `Accepted`
    /// then comes with the recipient's ack (about one round trip to it),
    /// or at most this much later with the cluster's copy. 0: written at
    /// once.
    cluster_keep_wait: Duration = Duration::from_millis(250), "PTT_CLUSTER_KEEP_WAIT", parse_duration;
    /// Cluster: this relay's region, the JetStream domain of the NATS
    /// cluster it connects to (each region is its own NATS cluster and
    /// JetStream domain, joined to the others by leaf nodes:
    /// docs/cluster.md "Regions"). Empty: one region, no domain.
    region: String = String::new(), "PTT_REGION";
    /// Cluster: every region of the service, comma-separated, this one
    /// included: the same list in the same order on every relay (a
    /// channel's floor is held in its home region, picked from this list
    /// by the channel's name). Empty with `region` set: this region alone.
    regions: String = String::new(), "PTT_REGIONS";
    /// Cluster: other regions that must have an accepted clip (a direct
    /// clip, or a channel clip in the channel's history) before its
    /// sender hears `Accepted`, so it outlives this region's death. Every
    /// other region reachable gets a copy; with fewer than this reachable
    /// the clip is held (this relay's disk has it) and copied when they
    /// answer again. Only with `region` set; at most the other regions.
    replicas_in_other_regions: usize = 1, "PTT_REPLICAS_IN_OTHER_REGIONS";
    /// Cluster: acks for other relays (and JetStream deletions, floor
    /// releases) held while cut off from NATS, sent when the link is back;
    /// past this the newest are dropped (counted): a clip whose ack is
    /// dropped may be offered once more and is dropped by id. (The clips
    /// accepted while cut off are on disk here, not in this queue.)
    cluster_backlog_clips: usize = 10_000, "PTT_CLUSTER_BACKLOG_CLIPS";
    /// Cluster: how often the relay pings NATS. A NATS that stops
    /// answering without closing the connection (a dead host, a partition)
    /// is given up after three unanswered pings; a closed connection is
    /// noticed at once.
    cluster_ping_interval: Duration = Duration::from_secs(2), "PTT_CLUSTER_PING_INTERVAL", parse_duration;
    /// Cluster: the longest wait between attempts to reconnect to NATS
    /// (the first is at once, then 100 ms doubling up to this, jittered),
    /// so cross-relay talk resumes within about this much of NATS coming
    /// back.
    cluster_reconnect_max: Duration = Duration::from_secs(1), "PTT_CLUSTER_RECONNECT_MAX", parse_duration;
    /// Push: the APNs signing key (`AuthKey_<key id>.p8`, an ES256 key
    /// from the Apple developer account). With `apns_key_id` and
    /// `apns_team_id`, the relay wakes iOS devices (PushToTalk,
    /// `apns-push-type: pushtotalk`). Empty: no APNs pushes.
    apns_key: PathBuf = PathBuf::new(), "PTT_APNS_KEY";
    /// Push: the APNs key's id (the provider JWT's `kid`).
    apns_key_id: String = String::new(), "PTT_APNS_KEY_ID";
    /// Push: the Apple developer team id (the provider JWT's `iss`).
    apns_team_id: String = String::new(), "PTT_APNS_TEAM_ID";
    /// Push: the APNs host (the sandbox is
    /// `https://api.sandbox.push.apple.com`).
    apns_url: String = "https://api.push.apple.com".to_owned(), "PTT_APNS_URL";
    /// Push: a Firebase service-account JSON file (its `project_id`,
    /// `client_email`, `private_key` and `token_uri`): the relay wakes
    /// Android devices with FCM high-priority data messages. Empty: no FCM
    /// pushes.
    fcm_credentials: PathBuf = PathBuf::new(), "PTT_FCM_CREDENTIALS";
    /// Push: the FCM HTTP v1 host.
    fcm_url: String = "https://fcm.googleapis.com".to_owned(), "PTT_FCM_URL";
    /// Push: extra root certificates (PEM) trusted for the provider hosts
    /// besides the system's (tests, private push gateways).
    push_ca: PathBuf = PathBuf::new(), "PTT_PUSH_CA";
    /// Push: devices one user may register; past it the oldest
    /// registration is dropped.
    max_push_devices_per_user: usize = 5, "PTT_MAX_PUSH_DEVICES_PER_USER";
    /// Push: the shortest time between two pushes to one device for one
    /// channel (a busy channel wakes a phone once; a pending push is
    /// replaced, never stacked: `apns-collapse-id`, FCM `collapse_key`).
    push_min_interval: Duration = Duration::from_secs(10), "PTT_PUSH_MIN_INTERVAL", parse_duration;
    /// Push: how long a push is worth sending (FCM `ttl`; retries of a
    /// push the provider refused for now stop after it).
    push_ttl: Duration = Duration::from_secs(30), "PTT_PUSH_TTL", parse_duration;
    /// Push: pushes waiting to be sent at most; past it new ones are
    /// dropped (counted): a push never holds a clip.
    push_queue: usize = 10_000, "PTT_PUSH_QUEUE";
    /// Push: requests in flight to the providers at once (over one HTTP/2
    /// connection per provider).
    push_concurrency: usize = 64, "PTT_PUSH_CONCURRENCY";
    /// How long shutdown waits for uploads in flight.
    drain_timeout: Duration = Duration::from_secs(10), "PTT_DRAIN_TIMEOUT", parse_duration;
    /// Channel clips kept per channel for members who were offline (they
    /// get what they missed on reconnect, in order, once).
    channel_history_depth: usize = 50, "PTT_CHANNEL_HISTORY_DEPTH";
    /// Channel clips older than this are not replayed.
    channel_history_age: Duration = Duration::from_secs(24 * 3600), "PTT_CHANNEL_HISTORY_AGE", parse_duration;
    /// Days of each user's data use kept (UTC days, today included), for
    /// `UsageQuery` and the admin listener's `/usage`.
    usage_days: u64 = 35, "PTT_USAGE_DAYS";
    /// Users whose data use is kept at most; a new user past it is not
    /// counted (`ptt_usage_uncounted_bytes_total`) until old days are pruned.
    usage_max_users: usize = 1_000_000, "PTT_USAGE_MAX_USERS";
    /// How often sessions' byte counters are added to the usage book (and
    /// the book written to DATA_DIR/usage.json with the disk store). A
    /// session is also counted when it ends and before any usage answer.
    usage_interval: Duration = Duration::from_secs(10), "PTT_USAGE_INTERVAL", parse_duration;
    /// Clips one user may start per minute (token bucket; 0: no limit);
    /// more get `rate_limited` with a retry-after hint.
    max_clips_per_minute: u32 = 60, "PTT_MAX_CLIPS_PER_MINUTE";
    /// Opus bytes one user may send per minute (0: no limit).
    max_clip_bytes_per_minute: u64 = 4 * 1024 * 1024, "PTT_MAX_CLIP_BYTES_PER_MINUTE";
    /// New connections accepted per second (0: no limit). Past it, clients
    /// whose address is not yet validated get a QUIC Retry; validated ones
    /// are refused (they retry after a backoff).
    max_handshakes_per_second: u32 = 2000, "PTT_MAX_HANDSHAKES_PER_SECOND";
    /// Bytes of clips being uploaded, all connections together, counted as
    /// they arrive; an upload whose bytes would pass it gets `server_busy`
    /// with a retry-after hint.
    max_inflight_bytes: u64 = 256 * 1024 * 1024, "PTT_MAX_INFLIGHT_BYTES";
    /// Ack-eliciting packets a client may receive before it must send an
    /// ACK (QUIC ACK frequency extension; 1 is plain QUIC). Fewer ACKs
    /// spend fewer bytes per second of voice on the wire.
    ack_threshold: u32 = 10, "PTT_ACK_THRESHOLD";
    /// Longest a client may delay an ACK (with `ack_threshold`).
    ack_delay: Duration = Duration::from_millis(25), "PTT_ACK_DELAY", parse_duration;
    /// Most clip ids a client may put in one `Ack` (announced in
    /// `AckPolicy` after `Welcome`); 1: one per `Ack`, no `AckPolicy`.
    ack_batch: u32 = 32, "PTT_ACK_BATCH";
    /// Longest a client may hold an `Ack` to gather others with it
    /// (announced in `AckPolicy`). Below `ack_delay`, so the `Ack` leaves
    /// before the client's delayed QUIC ACK would and carries it: one
    /// datagram for both.
    ack_hold: Duration = Duration::from_millis(20), "PTT_ACK_HOLD", parse_duration;
    /// Export Prometheus metrics at the admin listener's `/metrics`
    /// (`docs/metrics.md`). Off: no recorder, `/metrics` answers 404.
    metrics: bool = true, "PTT_METRICS";
    /// UDP receive buffer the relay asks the kernel for (SO_RCVBUF). The
    /// kernel caps it at net.core.rmem_max; the relay warns when capped
    /// (deploy/sysctl raises the cap).
    udp_recv_buffer: usize = 8 * 1024 * 1024, "PTT_UDP_RECV_BUFFER";
    /// UDP send buffer the relay asks for (SO_SNDBUF, capped by
    /// net.core.wmem_max).
    udp_send_buffer: usize = 8 * 1024 * 1024, "PTT_UDP_SEND_BUFFER";
}

impl Settings {
    /// Reads the `--config` file when one is named and merges: flags and
    /// environment (already in `self`) over the file over defaults.
    pub fn resolve(self) -> Result<Config, crate::error::StartError> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(crate::error::StartError::file("reading", path))?;
                toml::from_str::<Settings>(&text).map_err(|e| {
                    crate::error::StartError::BadFile {
                        path: path.clone(),
                        why: e.to_string(),
                    }
                })?
            }
            None => Settings::default(),
        };
        let c = self.or(file).fill();
        c.validate()?;
        Ok(c)
    }
}

/// The items of a comma-separated setting, trimmed, empty ones left out.
fn comma_list(s: &str) -> impl Iterator<Item = &str> + Clone {
    s.split(',').map(str::trim).filter(|r| !r.is_empty())
}

/// `Ok` when `ok`, else the setting error `why`.
fn ensure(ok: bool, why: &str) -> Result<(), crate::error::StartError> {
    if ok {
        Ok(())
    } else {
        Err(crate::error::StartError::Config(why.to_owned()))
    }
}

impl Config {
    /// A config for tests: loopback, ephemeral ports, the given data dir.
    pub fn for_tests(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            web: WebListen(Some(SocketAddr::from(([127, 0, 0, 1], 0)))),
            data_dir: data_dir.into(),
            ..Self::default()
        }
    }

    /// Channel history holds no clip created before this (Unix ms), at
    /// `now_ms`: the one age rule of `channel_history_age`.
    pub fn history_cutoff_ms(&self, now_ms: u64) -> u64 {
        relay_core::history::cutoff_ms(now_ms, self.channel_history_age)
    }

    /// `web_relays` as a list (each without a trailing `/`).
    pub fn web_relay_list(&self) -> Vec<String> {
        comma_list(&self.web_relays)
            .map(|r| r.trim_end_matches('/').to_owned())
            .filter(|r| !r.is_empty())
            .collect()
    }

    /// The region settings agree with each other and with `cluster`.
    fn validate_regions(&self) -> Result<(), crate::error::StartError> {
        let regions = self.region_list();
        let is_name = |r: &String| {
            r.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        let why = if !regions.iter().all(is_name) {
            "region and regions: names of letters, digits, '-' and '_' (JetStream domains)"
        } else if !self.region.is_empty() && self.cluster.is_empty() {
            "region needs cluster (a region is a NATS cluster of its own)"
        } else if !self.region.is_empty()
            && comma_list(&self.regions).next().is_some()
            && !comma_list(&self.regions).any(|r| r == self.region)
        {
            "regions must include region"
        } else if self.copies_in_other_regions() >= regions.len().max(1) {
            "replicas_in_other_regions must be less than the number of regions \
             (set regions to every region, or replicas_in_other_regions = 0)"
        } else {
            return Ok(());
        };
        Err(crate::error::StartError::Config(why.to_owned()))
    }

    /// `regions` as a list, with `region` in it (empty without `region`).
    pub fn region_list(&self) -> Vec<String> {
        if self.region.is_empty() {
            return Vec::new();
        }
        let mut list: Vec<String> = comma_list(&self.regions).map(str::to_owned).collect();
        if !list.contains(&self.region) {
            list.push(self.region.clone());
        }
        list
    }

    /// Other regions an accepted clip must reach before `Accepted`: none
    /// without `region`.
    pub fn copies_in_other_regions(&self) -> usize {
        if self.region.is_empty() {
            0
        } else {
            self.replicas_in_other_regions
        }
    }

    /// Checks every setting's range; the first one out of it is the error.
    pub fn validate(&self) -> Result<(), crate::error::StartError> {
        ensure(
            self.web_relay_list()
                .iter()
                .all(|r| r.starts_with("http://") || r.starts_with("https://")),
            "web_relays: each is http://HOST:PORT or https://HOST:PORT",
        )?;
        ensure(
            self.max_clip_streams >= 1,
            "max_clip_streams must be at least 1",
        )?;
        self.validate_regions()?;
        ensure(
            self.max_connections >= 1,
            "max_connections must be at least 1",
        )?;
        ensure(self.live_queue >= 1, "live_queue must be at least 1")?;
        ensure(
            (4..=20).contains(&self.connection_id_bytes),
            "connection_id_bytes must be 4..=20",
        )?;
        ensure(
            self.token_keys_reload >= Duration::from_millis(100),
            "token_keys_reload must be at least 100ms",
        )?;
        ensure(
            self.token_hs256 || !self.token_keys.is_empty(),
            "token_hs256 = false needs token_keys (no token could be accepted)",
        )?;
        ensure(
            self.cert.as_os_str().is_empty() == self.key.as_os_str().is_empty(),
            "cert and key go together: set both or neither",
        )?;
        ensure(
            self.max_unauthenticated_connections >= 1,
            "max_unauthenticated_connections must be at least 1",
        )?;
        self.validate_acks()?;
        ensure(
            self.expired_notices_per_user >= 1,
            "expired_notices_per_user must be at least 1",
        )?;
        let apns = [
            self.apns_key.as_os_str().is_empty(),
            self.apns_key_id.is_empty(),
            self.apns_team_id.is_empty(),
        ];
        ensure(
            apns.iter().all(|e| *e) || apns.iter().all(|e| !*e),
            "apns_key, apns_key_id and apns_team_id go together: set all three or none",
        )?;
        ensure(
            self.max_push_devices_per_user >= 1
                && self.push_queue >= 1
                && self.push_concurrency >= 1,
            "max_push_devices_per_user, push_queue and push_concurrency must be at least 1",
        )?;
        // A `Usage` answer holds one entry per day.
        ensure(
            (1..=codec::wire::MAX_USAGE_DAYS).contains(&self.usage_days),
            "usage_days must be 1..=2000",
        )?;
        ensure(
            self.usage_interval >= Duration::from_millis(100),
            "usage_interval must be at least 100ms",
        )?;
        ensure(
            self.max_unacked_deliveries >= 1,
            "max_unacked_deliveries must be at least 1",
        )?;
        ensure(
            self.max_packet_bytes >= 1 && self.max_clip_bytes >= 1,
            "size limits must be at least 1",
        )?;
        ensure(
            self.max_message_bytes >= 1024,
            "max_message_bytes must be at least 1024",
        )?;
        Ok(())
    }

    /// The transport's ACK frequency and ptt/1's `AckPolicy`, together:
    /// the hold must end before the delayed ACK it rides with.
    fn validate_acks(&self) -> Result<(), crate::error::StartError> {
        ensure(
            (1..=1000).contains(&self.ack_threshold),
            "ack_threshold must be 1..=1000",
        )?;
        ensure(
            self.ack_delay >= Duration::from_millis(1)
                && self.ack_delay <= Duration::from_millis(200),
            "ack_delay must be 1ms..=200ms",
        )?;
        ensure(
            (1..=4096).contains(&self.ack_batch),
            "ack_batch must be 1..=4096 (4,096 ids fill a 64 KiB message)",
        )?;
        // A client that fills an `Ack` as announced must not be refused
        // for its size.
        let ids_bytes = self.ack_batch as usize * std::mem::size_of::<codec::wire::ClipId>();
        ensure(
            ids_bytes <= self.max_message_bytes,
            "ack_batch clip ids (16 bytes each) must fit in max_message_bytes",
        )?;
        ensure(
            self.ack_hold < self.ack_delay,
            "ack_hold must be shorter than ack_delay",
        )
    }

    pub fn limits(&self) -> codec::wire::Limits {
        codec::wire::Limits {
            max_clip_ms: self.max_clip_duration.as_millis() as u64,
            max_clip_bytes: self.max_clip_bytes,
            max_packet_bytes: self.max_packet_bytes,
            max_clip_streams: u64::from(self.max_clip_streams),
            upload_idle_ms: self.upload_idle_timeout.as_millis() as u64,
        }
    }

    /// How this relay takes acks, announced after `Welcome`; `None` when
    /// `ack_batch` is 1 (one id per `Ack`, as a relay without it).
    pub fn ack_policy(&self) -> Option<codec::wire::AckPolicy> {
        (self.ack_batch > 1).then(|| codec::wire::AckPolicy {
            max_ids: u64::from(self.ack_batch),
            hold_ms: self.ack_hold.as_millis() as u64,
        })
    }

    pub fn frame_limits(&self) -> codec::FrameLimits {
        codec::FrameLimits::new(
            self.max_packet_bytes,
            self.max_clip_bytes,
            self.max_clip_duration.as_millis() as u64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_parses_and_flags_win() {
        let file: Settings = toml::from_str(
            r#"
            listen = "127.0.0.1:5000"
            max_clip_duration = "30s"
            max_clip_bytes = 1000
            "#,
        )
        .unwrap();
        let flags = Settings {
            max_clip_bytes: Some(5),
            ..Settings::default()
        };
        let c = flags.or(file).fill();
        assert_eq!(c.listen, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(c.max_clip_duration, Duration::from_secs(30));
        assert_eq!(c.max_clip_bytes, 5, "flag overrides the file");
        assert_eq!(c.max_clip_streams, 8, "default where nobody set it");
    }

    /// Limits added with their checks: each refused out of range.
    #[test]
    fn new_limits_are_checked() {
        let ok = Config::for_tests("/tmp/x");
        ok.validate().unwrap();
        let bad = [
            Config {
                token_keys_reload: Duration::from_millis(50),
                ..ok.clone()
            },
            Config {
                token_hs256: false,
                ..ok.clone()
            },
            Config {
                max_unauthenticated_connections: 0,
                ..ok.clone()
            },
            Config {
                connection_id_bytes: 3,
                ..ok.clone()
            },
            Config {
                connection_id_bytes: 21,
                ..ok.clone()
            },
            Config {
                usage_days: 0,
                ..ok.clone()
            },
            Config {
                usage_days: codec::wire::MAX_USAGE_DAYS + 1,
                ..ok.clone()
            },
            Config {
                usage_interval: Duration::from_millis(50),
                ..ok.clone()
            },
            Config {
                expired_notices_per_user: 0,
                ..ok.clone()
            },
            Config {
                ack_batch: 0,
                ..ok.clone()
            },
            Config {
                ack_batch: 4097,
                ..ok.clone()
            },
            Config {
                ack_batch: 65,
                max_message_bytes: 1024,
                ..ok.clone()
            },
            Config {
                ack_hold: ok.ack_delay,
                ..ok.clone()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
        // HS256 off is fine once public keys are configured.
        Config {
            token_hs256: false,
            token_keys: "/etc/ptt/jwks.json".into(),
            ..ok
        }
        .validate()
        .unwrap();
    }

    /// `relay.toml.example` names every setting, with its true default.
    #[test]
    fn the_example_file_is_complete_and_true() {
        let text = include_str!("../../relay.toml.example");
        let file: Settings = toml::from_str(text).unwrap();
        let table: toml::Table = toml::from_str(text).unwrap();
        for name in Settings::NAMES {
            assert!(table.contains_key(*name), "{name} missing from the example");
        }
        assert_eq!(file.fill(), Config::default());
    }

    /// docs/operations.md documents every setting by name.
    #[test]
    fn the_operations_guide_names_every_setting() {
        let text = include_str!("../../docs/operations.md");
        for name in Settings::NAMES {
            assert!(
                text.contains(&format!("`{name}`")),
                "{name} missing from docs/operations.md"
            );
        }
    }

    /// The deployment's cluster config reads and asks for a replicated
    /// 3-node cluster.
    #[test]
    fn the_cluster_deploy_file_is_valid() {
        let text = include_str!("../../deploy/cluster/relay.toml");
        let c = toml::from_str::<Settings>(text).unwrap().fill();
        c.validate().unwrap();
        assert_eq!(c.cluster.split(',').count(), 3);
        assert_eq!(c.cluster_replicas, 3);
    }

    /// `deploy/regions/relay-{a,b}.toml` are valid: a region each, both
    /// regions listed, one copy in the other.
    #[test]
    fn the_region_deploy_files_are_valid() {
        for (text, region) in [
            (include_str!("../../deploy/regions/relay-a.toml"), "a"),
            (include_str!("../../deploy/regions/relay-b.toml"), "b"),
        ] {
            let c = toml::from_str::<Settings>(text).unwrap().fill();
            c.validate().unwrap();
            assert_eq!(c.region, region);
            assert_eq!(c.region_list(), ["a", "b"]);
            assert_eq!(c.copies_in_other_regions(), 1);
            assert!(c.cluster.contains(&format!("nats://{region}-1:4222")));
        }
    }

    /// `web_relays` are web listeners' addresses, each with its scheme.
    #[test]
    fn web_relays_are_http_addresses() {
        let mut c = Config::for_tests("/tmp/unused");
        c.web_relays = " http://b.example:8080/ , https://c.example ".into();
        c.validate().unwrap();
        assert_eq!(
            c.web_relay_list(),
            ["http://b.example:8080", "https://c.example"]
        );
        c.web_relays = "http://b.example:8080,c.example:8080".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("web_relays"), "{e}");
    }

    /// A region needs the cluster, is one of `regions`, and cannot ask
    /// for more copies elsewhere than there are other regions.
    #[test]
    fn regions_are_checked_against_each_other() {
        let mut c = Config {
            cluster: "nats://127.0.0.1:4222".into(),
            region: "eu".into(),
            regions: " eu , us ".into(),
            ..Config::default()
        };
        c.validate().unwrap();
        assert_eq!(c.region_list(), ["eu", "us"]);
        assert_eq!(c.copies_in_other_regions(), 1);
        let refused = |c: &Config, what: &str| {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        };
        c.replicas_in_other_regions = 2;
        refused(&c, "replicas_in_other_regions");
        c.replicas_in_other_regions = 0;
        c.regions = "us,asia".into();
        refused(&c, "regions must include region");
        c.regions = String::new();
        c.validate().unwrap();
        c.region = "eu.west".into();
        refused(&c, "JetStream domains");
        c.region = "eu".into();
        c.cluster = String::new();
        refused(&c, "region needs cluster");
        // Without a region, regions and copies elsewhere mean nothing.
        let c = Config::default();
        assert_eq!((c.region_list().len(), c.copies_in_other_regions()), (0, 0));
        c.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Settings>("listne = \"1.2.3.4:5\"").is_err());
    }

    #[test]
    fn unset_flags_do_not_clobber_the_file() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            s: Settings,
        }
        let flags = Cli::parse_from(["x", "--max-clip-streams", "3"]).s;
        let file: Settings = toml::from_str("max_clip_bytes = 77").unwrap();
        let c = flags.or(file).fill();
        assert_eq!(c.max_clip_bytes, 77);
        assert_eq!(c.max_clip_streams, 3);
    }
}
