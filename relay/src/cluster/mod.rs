//! Several relays as one service, over NATS (`--cluster nats://...`).
//!
//! Subjects (tokens are hex of the name, [`codec::cluster::subject_token`]):
//!
//! - `ptt.u.<user>`: live clips for a user; a relay subscribes while the
//!   user is connected to it.
//! - `ptt.c.<channel>`: live clips of a talk channel, and announcements of
//!   clips entering its history; a relay subscribes while at least one
//!   member is connected to it.
//! - `ptt.r.<relay id>`: acks for direct clips this relay accepted, and
//!   pre-emptions of its talkers.
//!
//! JetStream streams: `PTT_CLIPS` (`ptt.store.<user>`: direct clips until
//! their recipient acks), `PTT_HISTORY` (`ptt.hist.<channel>`: channels'
//! recent clips), `PTT_FLOORS` (`ptt.floor.<channel>`: who holds a floor,
//! taken by compare-and-set).
//!
//! A live clip is forwarded by its origin once per subject (not per
//! recipient): a reader of the shared [`LiveClip`] publishes `Start`, each
//! run of packet records as it arrives (with its offset in the clip), then
//! `End` or `Cut` ([`codec::cluster::Relayed`]). A receiving relay rebuilds
//! the live clip (validating the records again), offers it to its own
//! connected recipients, and when it ends stores it for them (so a slow or
//! disconnected recipient still gets it from that relay's store) and keeps
//! it in the channel's history. When a recipient acks a direct clip, its
//! relay tells the origin, which drops its stored copy. Accepted clips are
//! also kept in JetStream before the sender hears `Accepted`, and
//! announced (`Kept`, `HistoryKept`), so the relay a recipient is on
//! delivers them even when their live run broke, and the relay a recipient
//! connects to delivers them even after their origin died.
//!
//! Cut off from NATS, a relay keeps accepting (its own disk has every
//! clip) and serving its own users. When the link is back
//! ([`Cluster::link_up`]) it writes what the cluster lacks (direct clips,
//! channel history) to JetStream and announces it, and reads what it may
//! have missed for its own users; live runs that were open resume.
//! `docs/cluster.md` has the design and what each failure delays or loses.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use codec::cluster::{Relayed, Run, Take, subject_token};
use codec::wire::{ClipId, Target};
use codec::{ErrorCode, Framer, Message};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use relay_core::hash::{DashMap, HashMap, HashSet};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

mod floors;
mod kept;
mod link;
mod push;
mod regions;
mod remote;

use regions::{Copies, Kind};

use crate::live::{LiveClip, Next};
use crate::metrics;
use crate::state::{ClusterFloor, ClusterLink, Session, Shared, To, record_history};
use crate::store::{Appended, ClipMeta, StoredClip};

/// A clip arriving from another relay.
struct Remote {
    live: Arc<LiveClip>,
    framer: Framer,
    /// Packets received so far (`Data` says where each run starts).
    run: Run,
    /// This relay's users it was offered to (stored for them at the end).
    recipients: Vec<Arc<str>>,
    channel: Option<String>,
    /// The cluster announced it stored this clip while its live run was
    /// still coming: if the run breaks, the clip is taken from there.
    kept: Option<Announced>,
    last: Instant,
}

/// Where the cluster said it keeps a clip.
#[derive(Debug, Clone)]
enum Announced {
    /// In `PTT_CLIPS` for `recipient`; `origin` takes the ack.
    Direct {
        seq: u64,
        origin: Option<u64>,
        recipient: String,
    },
    /// In `PTT_HISTORY`, `channel`'s.
    History { seq: u64, channel: String },
}

struct Sub {
    users: usize,
    task: tokio::task::AbortHandle,
    ready: Arc<AtomicBool>,
}

/// The NATS link as the relay sees it (changes come from the NATS client's
/// events).
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkState {
    /// Connected now.
    pub up: bool,
    /// Connections made so far (the first, then one after each outage).
    pub links: u64,
    /// When the last outage began (`None` before the first).
    pub lost_at: Option<SystemTime>,
}

/// Cluster work that waits for the link instead of holding the caller: an
/// ack for another relay, a JetStream copy to delete, a floor to release.
#[derive(Debug)]
enum Chore {
    Ack {
        origin: u64,
        clip: ClipId,
        recipient: Arc<str>,
    },
    /// A delivered direct clip's copy in `region`'s stream (`None`: this
    /// region's).
    Delete { region: Option<usize>, seq: u64 },
    /// A floor taken at `seq` in `channel`'s home region.
    ReleaseFloor { channel: String, seq: u64 },
}

/// The link-up work one (re)connection asks for ([`Relink`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LinkWork {
    /// The connection it is for ([`LinkState::links`]).
    links: u64,
    /// Compare every channel history here with the cluster's (until this
    /// is done once after start: a restart may follow a crash during an
    /// outage), or only the channels marked while cut off.
    all_channels: bool,
    /// Read what the cluster kept from this moment: the start of the
    /// earliest outage not yet caught up on.
    since: Option<SystemTime>,
}

/// What the relay owes the cluster as its NATS link comes and goes. Sans-IO:
/// fed the link's state, it says whether a new loss happened (relayed
/// clips arriving are cut) and which link-up work is due; told when that
/// work is done.
#[derive(Debug, Default)]
struct Relink {
    /// The connection whose link-up work is done.
    done: Option<u64>,
    reconciled_all: bool,
    since: Option<SystemTime>,
    seen_loss: Option<SystemTime>,
}

impl Relink {
    fn handle_state(&mut self, s: LinkState) -> (bool, Option<LinkWork>) {
        let lost = s.lost_at.is_some() && s.lost_at != self.seen_loss;
        if lost {
            self.seen_loss = s.lost_at;
            self.since = self.since.or(s.lost_at);
        }
        let work = (s.up && self.done != Some(s.links)).then_some(LinkWork {
            links: s.links,
            all_channels: !self.reconciled_all,
            since: self.since,
        });
        (lost, work)
    }

    fn handle_done(&mut self, w: LinkWork) {
        self.done = Some(w.links);
        self.reconciled_all = true;
        // Work is abandoned when its link goes, so no outage began while
        // finished work ran: everything from `since` is caught up on.
        self.since = None;
    }
}

/// What became of one message of a live run.
enum Sent {
    Done,
    /// The link is down: the run waits for it and starts again.
    LinkDown,
    /// NATS refused it while linked: the run ends.
    Failed,
}

/// Chores started together once the link is up.
const CHORE_BATCH: usize = 64;

/// Stored clips' origin relay, as a JetStream message header (hex id): the
/// relay that delivers it tells that one of the ack.
const ORIGIN_HEADER: &str = "Ptt-Origin";

/// JetStream stream holding stored direct clips, one message per clip on
/// `ptt.store.<hex recipient>`.
pub const STREAM: &str = "PTT_CLIPS";

/// JetStream stream of channel history: the last `channel_history_depth`
/// clips of each channel on `ptt.hist.<hex channel>`, for members who were
/// offline (on any relay).
pub const HISTORY: &str = "PTT_HISTORY";

/// The subjects of one region's JetStream streams. One region:
/// `ptt.store.<user>`, `ptt.hist.<channel>`, ...; in a service of several
/// regions, `ptt.region.<region>.store.<user>`, ...: the regions' NATS
/// clusters are joined by leaf nodes, over which every subject crosses,
/// so a stream of one region must not take what is published for
/// another's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// The subjects of `region`'s streams (`None`: the one region).
    pub fn of(region: Option<&str>) -> Names {
        let prefix = match region {
            Some(r) => format!("ptt.region.{r}."),
            None => "ptt.".to_owned(),
        };
        Names { prefix }
    }

    fn token(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}.{}", self.prefix, subject_token(name))
    }

    /// Every subject of a stream (`store`, `hist`, ...).
    fn all(&self, kind: &str) -> String {
        format!("{}{kind}.>", self.prefix)
    }

    pub fn store(&self, user: &str) -> String {
        self.token("store", user)
    }

    pub fn history(&self, channel: &str) -> String {
        self.token("hist", channel)
    }

    fn floor(&self, channel: &str) -> String {
        self.token("floor", channel)
    }

    fn push(&self, user: &str) -> String {
        self.token("push", user)
    }

    fn pushed(&self, clip: &ClipId) -> String {
        format!("{}pushed.{}", self.prefix, clip.to_hex())
    }

    /// Whose a stored clip is, by its subject in this region's
    /// `PTT_CLIPS` or `PTT_HISTORY`.
    fn target(&self, subject: &str) -> Option<CaughtUp> {
        let rest = subject.strip_prefix(self.prefix.as_str())?;
        if let Some(t) = rest.strip_prefix("store.") {
            return codec::cluster::subject_name(t).map(CaughtUp::User);
        }
        let t = rest.strip_prefix("hist.")?;
        codec::cluster::subject_name(t).map(CaughtUp::Channel)
    }
}

/// Another region's JetStream, reached through its domain.
pub(crate) struct Region {
    name: Arc<str>,
    names: Names,
    /// Its streams, created by whichever relay reaches it first.
    configs: Vec<stream::Config>,
    js: jetstream::Context,
}

/// JetStream stream of push registrations: each user's whole entry (its
/// devices and channels, a JSON push-book record) on `ptt.push.<hex
/// user>`, the last one kept; every relay mirrors it into its book.
pub const PUSH: &str = "PTT_PUSH";

/// JetStream stream that makes a push to one device for one clip happen
/// once in the cluster (its message id is the clip and device).
pub const PUSHED: &str = "PTT_PUSHED";

/// JetStream stream of channel floors: subject `ptt.floor.<hex channel>`,
/// at most one message per subject (the holder, [`FloorRecord`]); taken by
/// publishing with an expected last subject sequence (0: free; else the
/// holder's), so two relays cannot both grant one floor. (The
/// compare-and-set a key-value bucket does; this async-nats cannot create
/// buckets on Debian's nats-server 2.9.)
pub const FLOORS: &str = "PTT_FLOORS";

/// Who holds a channel's floor, as stored in [`FLOORS`]:
/// `priority(0|1) relay-id(hex) clip-id(hex) user`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FloorRecord {
    pub priority: bool,
    pub relay: u64,
    pub clip: ClipId,
    pub user: String,
}

impl FloorRecord {
    pub fn encode(&self) -> Bytes {
        Bytes::from(format!(
            "{} {:016x} {} {}",
            u8::from(self.priority),
            self.relay,
            self.clip.to_hex(),
            self.user
        ))
    }

    pub fn decode(b: &[u8]) -> Option<FloorRecord> {
        let s = std::str::from_utf8(b).ok()?;
        let mut it = s.splitn(4, ' ');
        let priority = match it.next()? {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        let relay = u64::from_str_radix(it.next()?, 16).ok()?;
        let clip = ClipId::from_hex(it.next()?)?;
        Some(FloorRecord {
            priority,
            relay,
            clip,
            user: it.next()?.to_owned(),
        })
    }
}

/// The cluster link of one relay.
pub struct Cluster {
    client: async_nats::Client,
    js: jetstream::Context,
    /// The streams' settings, to create them again when the link comes
    /// back to a NATS that lost them (a memory stream after a restart).
    configs: Vec<stream::Config>,
    stream: stream::Stream,
    floors: stream::Stream,
    /// Push entries of every user ([`PUSH`]).
    push: stream::Stream,
    /// Push entries that could not be shared (cut off): shared at the
    /// next link.
    push_unshared: Mutex<HashMap<String, crate::push::book::Record>>,
    /// Users whose push entry this region has and another region may
    /// lack (it did not answer): copied when it does.
    push_elsewhere: Mutex<HashSet<String>>,
    history: stream::Stream,
    /// This region's stream subjects.
    names: Names,
    /// The other regions (none with one region).
    others: Vec<Region>,
    /// Every region, in the configured order: a channel's floor is in
    /// the one its name picks ([`regions::home_of`]).
    regions: Vec<String>,
    /// Other regions an accepted clip must reach before `Accepted`.
    copies: usize,
    /// Stored direct clips in JetStream, by (recipient, clip): where (all
    /// deleted when the recipient acks) and when noted.
    kept: DashMap<(Arc<str>, ClipId), Kept>,
    /// This relay's id (random per process).
    pub id: u64,
    /// Subscriptions by subject: (local users needing it, the task
    /// reading it, whether the server has it).
    subs: Mutex<HashMap<String, Sub>>,
    remote: DashMap<ClipId, Remote>,
    /// Direct clips from other relays: whom to tell of the ack.
    acks_to: DashMap<ClipId, (u64, Instant)>,
    link: Arc<watch::Sender<LinkState>>,
    /// Chores waiting for the link, at most `cluster_backlog_clips`.
    chores: mpsc::Sender<Chore>,
    chores_rx: Mutex<Option<mpsc::Receiver<Chore>>>,
    /// Copies in other regions still being written after `Accepted`, at
    /// most `cluster_backlog_clips` ([`Cluster::run_late`]).
    late: mpsc::Sender<regions::Late>,
    late_rx: Mutex<Option<mpsc::Receiver<regions::Late>>>,
    /// Clips accepted here that the cluster does not have yet (its
    /// JetStream could not take them), and whether each is direct: written
    /// when the link is back (a direct one also goes once acked here).
    held: Mutex<HashMap<ClipId, bool>>,
    /// Channels whose history here has clips the cluster's may lack.
    dirty: Mutex<BTreeSet<String>>,
    /// Channel clips being taken into this relay's history from the
    /// cluster's (two announcements of one clip take it once).
    adopting: DashMap<ClipId, ()>,
    /// A lost link is noticed within three of these (NATS pings).
    ping_interval: Duration,
    /// Uploads waiting for their live recipient's ack before writing the
    /// clip to JetStream ([`Cluster::keep`]), woken by [`Cluster::acked`].
    awaiting: DashMap<ClipId, Arc<tokio::sync::Notify>>,
    /// `cluster_keep_wait`.
    keep_wait: Duration,
}

pub fn user_subject(user: &str) -> String {
    format!("ptt.u.{}", subject_token(user))
}

pub fn channel_subject(channel: &str) -> String {
    format!("ptt.c.{}", subject_token(channel))
}

/// The channel a channel subject (`ptt.c.<hex>`) is of.
fn channel_of(subject: &str) -> Option<String> {
    subject
        .strip_prefix("ptt.c.")
        .and_then(codec::cluster::subject_name)
}

pub fn relay_subject(id: u64) -> String {
    format!("ptt.r.{id:016x}")
}

pub use crate::error::ClusterError;

/// Maps a NATS error to [`ClusterError::Nats`] saying what was being done.
fn nats<E: std::error::Error + Send + Sync + 'static>(
    what: impl Into<String>,
) -> impl FnOnce(E) -> ClusterError {
    let what = what.into();
    move |e| ClusterError::Nats {
        what,
        source: Box::new(e),
    }
}

/// Where JetStream keeps a direct clip: its sequence in this region's
/// stream and in the other regions' (by index in `others`).
#[derive(Debug, Clone)]
struct Kept {
    seq: u64,
    elsewhere: Vec<(usize, u64)>,
    /// Written by this relay (it owes the copies elsewhere), not read.
    ours: bool,
    at: Instant,
}

/// The streams a cluster uses, as `cfg` sets them, on `names`' subjects.
fn stream_configs(cfg: &crate::Config, names: &Names) -> Vec<stream::Config> {
    vec![
        stream::Config {
            name: STREAM.into(),
            subjects: vec![names.all("store")],
            storage: stream::StorageType::File,
            num_replicas: cfg.cluster_replicas,
            // Undelivered clips expire like the local store's.
            max_age: cfg.clip_ttl,
            // A sender's retry through another relay is not kept twice.
            duplicate_window: cfg.dedupe_window,
            max_bytes: i64::try_from(cfg.max_store_bytes).unwrap_or(i64::MAX),
            // Full: new clips are refused, never old ones dropped.
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        },
        stream::Config {
            name: FLOORS.into(),
            subjects: vec![names.all("floor")],
            max_messages_per_subject: 1,
            // A floor whose relay died goes after the longest clip.
            max_age: cfg.max_clip_duration + cfg.max_upload_lag + Duration::from_secs(10),
            storage: stream::StorageType::Memory,
            num_replicas: cfg.cluster_replicas,
            ..Default::default()
        },
        stream::Config {
            name: PUSH.into(),
            subjects: vec![names.all("push")],
            max_messages_per_subject: 1,
            storage: stream::StorageType::File,
            num_replicas: cfg.cluster_replicas,
            ..Default::default()
        },
        stream::Config {
            name: PUSHED.into(),
            subjects: vec![names.all("pushed")],
            max_age: cfg.dedupe_window,
            duplicate_window: cfg.dedupe_window,
            storage: stream::StorageType::Memory,
            num_replicas: cfg.cluster_replicas,
            ..Default::default()
        },
        stream::Config {
            name: HISTORY.into(),
            subjects: vec![names.all("hist")],
            max_messages_per_subject: i64::try_from(cfg.channel_history_depth.max(1))
                .unwrap_or(i64::MAX),
            max_age: cfg.channel_history_age,
            duplicate_window: cfg.dedupe_window.min(cfg.channel_history_age),
            storage: stream::StorageType::File,
            num_replicas: cfg.cluster_replicas,
            ..Default::default()
        },
    ]
}

/// A message read from a stream: its sequence, the relay that accepted
/// the clip (if it said), and the clip.
type Read = (u64, Option<u64>, StoredClip);

/// Whose a stored clip is, by its subject in `PTT_CLIPS` or `PTT_HISTORY`.
#[derive(Debug, PartialEq, Eq)]
enum CaughtUp {
    User(String),
    Channel(String),
}

/// Waits for the link while `live` is still open; false once the clip has
/// ended (or the link's sender is gone).
async fn wait_link_while_open(link: &mut watch::Receiver<LinkState>, live: &Arc<LiveClip>) -> bool {
    let mut watch = live.reader();
    loop {
        tokio::select! {
            r = link.wait_for(|s| s.up) => return r.is_ok(),
            n = watch.next() => if !matches!(n, Next::Data(_)) { return false },
        }
    }
}

/// The origin relay a stored clip's JetStream message names.
fn origin_of(headers: Option<&async_nats::HeaderMap>) -> Option<u64> {
    let v = headers?.get(ORIGIN_HEADER)?;
    u64::from_str_radix(v.as_str(), 16).ok()
}

/// The relay asks its link through [`ClusterLink`] (the state names the
/// trait, not this module).
impl ClusterLink for Arc<Cluster> {
    fn connected(&self) -> bool {
        Cluster::connected(self)
    }

    fn held(&self) -> usize {
        Cluster::held(self)
    }

    fn join(&self, shared: &Arc<Shared>, session: &Arc<Session>) -> Vec<String> {
        Cluster::join(self, shared, session)
    }

    fn unwant(&self, subject: &str) {
        Cluster::unwant(self, subject);
    }

    fn forward(&self, shared: &Arc<Shared>, live: Arc<LiveClip>, to: To<'_>) {
        let subject = match to {
            To::User(u) => user_subject(u),
            To::Channel(c) => channel_subject(c),
        };
        Cluster::forward(self, shared, live, subject);
    }

    fn take_floor<'a>(
        &'a self,
        channel: &'a str,
        user: &'a str,
        clip: ClipId,
        priority: bool,
    ) -> BoxFuture<'a, Result<ClusterFloor, ClusterError>> {
        let me = FloorRecord {
            priority,
            relay: self.id,
            clip,
            user: user.to_owned(),
        };
        Box::pin(Cluster::take_floor(self, channel, me))
    }

    fn release_floor(&self, channel: &str, seq: u64) {
        Cluster::release_floor(self, channel, seq);
    }

    fn keep<'a>(
        &'a self,
        shared: &'a Shared,
        clip: &'a StoredClip,
        recipient: &'a Arc<str>,
        elsewhere: bool,
    ) -> BoxFuture<'a, Result<(), ClusterError>> {
        Box::pin(Cluster::keep(self, shared, clip, recipient, elsewhere))
    }

    fn keep_history<'a>(
        &'a self,
        channel: &'a str,
        clip: &'a Arc<StoredClip>,
    ) -> BoxFuture<'a, Result<(), ClusterError>> {
        Box::pin(Cluster::keep_history(self, channel, clip))
    }

    fn acked(&self, clip: &ClipId, recipient: &Arc<str>) {
        Cluster::acked(self, clip, recipient);
    }
}

/// Whether this relay knows clip `id` (accepted here, relayed here, or
/// cached before).
async fn known(shared: &Shared, id: &ClipId) -> bool {
    matches!(shared.store.sender_of(id).await, Ok(Some(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_holders_round_trip_and_junk_is_refused() {
        let h = FloorRecord {
            priority: true,
            relay: 0x0123_4567_89ab_cdef,
            clip: ClipId([0xa5; 16]),
            user: "dispatch desk 1".into(),
        };
        assert_eq!(FloorRecord::decode(&h.encode()), Some(h));
        for junk in [
            &b""[..],
            b"2 00 00 u",
            b"1 zz a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5 u",
            b"0 01 a5a5 u",
            b"0 01 a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5",
            b"\xff\xfe",
        ] {
            assert_eq!(FloorRecord::decode(junk), None, "{junk:?}");
        }
    }

    fn state(up: bool, links: u64, lost_at: Option<u64>) -> LinkState {
        LinkState {
            up,
            links,
            lost_at: lost_at.map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
        }
    }

    fn at(s: u64) -> Option<SystemTime> {
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(s))
    }

    #[test]
    fn the_first_link_compares_every_channel_and_reads_nothing_back() {
        let mut r = Relink::default();
        assert_eq!(r.handle_state(state(false, 0, None)), (false, None));
        let (lost, w) = r.handle_state(state(true, 1, None));
        let w = w.unwrap();
        assert!(!lost);
        assert!(w.all_channels);
        assert_eq!(w.since, None);
        // Not done yet: due again at the next look.
        assert_eq!(r.handle_state(state(true, 1, None)).1, Some(w));
        r.handle_done(w);
        assert_eq!(r.handle_state(state(true, 1, None)), (false, None));
    }

    #[test]
    fn after_an_outage_the_work_reads_back_from_its_start() {
        let mut r = Relink::default();
        let (_, w) = r.handle_state(state(true, 1, None));
        r.handle_done(w.unwrap());
        assert_eq!(r.handle_state(state(false, 1, Some(10))), (true, None));
        assert_eq!(r.handle_state(state(false, 1, Some(10))), (false, None));
        let w = r.handle_state(state(true, 2, Some(10))).1.unwrap();
        assert!(!w.all_channels, "only the channels marked while cut off");
        assert_eq!(w.since, at(10));
        r.handle_done(w);
        assert_eq!(r.handle_state(state(true, 2, Some(10))), (false, None));
    }

    /// The link-up work after the first outage did not finish (the link
    /// went again, or the relay had just started): the next work reads
    /// back from the first outage, and still compares every channel.
    #[test]
    fn work_not_done_keeps_the_earliest_outage() {
        let mut r = Relink::default();
        let _ = r.handle_state(state(true, 1, None));
        assert!(r.handle_state(state(false, 1, Some(10))).0);
        let _ = r.handle_state(state(true, 2, Some(10)));
        // Lost again before the work finished; and a flap seen only as a
        // new loss time with the link already up again.
        assert!(r.handle_state(state(false, 2, Some(20))).0);
        let (lost, w) = r.handle_state(state(true, 3, Some(30)));
        assert!(lost, "a loss between two looks is still a loss");
        let w = w.unwrap();
        assert!(w.all_channels);
        assert_eq!(w.since, at(10));
        r.handle_done(w);
        assert_eq!(r.handle_state(state(true, 3, Some(30))), (false, None));
    }

    #[test]
    fn stored_subjects_name_their_user_or_channel() {
        let one = Names::of(None);
        assert_eq!(
            one.target(&one.store("bob.smith")),
            Some(CaughtUp::User("bob.smith".into()))
        );
        assert_eq!(
            one.target(&one.history("ops")),
            Some(CaughtUp::Channel("ops".into()))
        );
        assert_eq!(one.target(&one.floor("ops")), None);
        assert_eq!(one.target("ptt.store.zz"), None);
        assert_eq!(
            one.store("bob"),
            format!("ptt.store.{}", subject_token("bob"))
        );
    }

    /// With regions, each region's streams take only their own subjects:
    /// what is published for one region is not kept by another's.
    #[test]
    fn each_region_has_subjects_of_its_own() {
        let (eu, us) = (Names::of(Some("eu")), Names::of(Some("us")));
        assert_eq!(
            eu.target(&eu.store("bob")),
            Some(CaughtUp::User("bob".into()))
        );
        assert_eq!(us.target(&eu.store("bob")), None);
        assert_eq!(Names::of(None).target(&eu.history("ops")), None);
        // NATS's `>`: the filter's tokens before it, then at least one.
        let matches = |filter: &str, s: &str| {
            let f: Vec<&str> = filter.split('.').collect();
            let s: Vec<&str> = s.split('.').collect();
            f.last() == Some(&">") && s.len() >= f.len() && f[..f.len() - 1] == s[..f.len() - 1]
        };
        let one = Names::of(None);
        let built = |n: &Names| {
            [
                ("store", n.store("x")),
                ("hist", n.history("x")),
                ("floor", n.floor("x")),
                ("push", n.push("x")),
                ("pushed", n.pushed(&ClipId([7; 16]))),
            ]
        };
        for (kind, subject) in built(&eu) {
            assert!(matches(&eu.all(kind), &subject), "{subject}");
            assert!(!matches(&us.all(kind), &subject), "{subject}");
            assert!(!matches(&one.all(kind), &subject), "{subject}");
        }
        for (kind, subject) in built(&one) {
            assert!(matches(&one.all(kind), &subject), "{subject}");
            assert!(!matches(&eu.all(kind), &subject), "{subject}");
        }
    }

    #[test]
    fn a_stored_clip_names_its_origin_in_a_header() {
        let mut h = async_nats::HeaderMap::new();
        h.insert(ORIGIN_HEADER, "0123456789abcdef");
        assert_eq!(origin_of(Some(&h)), Some(0x0123_4567_89ab_cdef));
        h.insert(ORIGIN_HEADER, "not hex");
        assert_eq!(origin_of(Some(&h)), None);
        assert_eq!(origin_of(None), None);
    }
}
