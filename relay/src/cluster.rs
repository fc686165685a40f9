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

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use codec::cluster::{Relayed, Run, Take, subject_token};
use codec::wire::{ClipId, Target};
use codec::{ErrorCode, Framer, Message};
use dashmap::DashMap;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::live::{LiveClip, Next};
use crate::metrics;
use crate::state::{Session, Shared, record_history};
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
    /// In `PTT_HISTORY`.
    History { seq: u64 },
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
    Delete(u64),
    ReleaseFloor(u64),
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

pub fn history_subject(channel: &str) -> String {
    format!("ptt.hist.{}", subject_token(channel))
}

pub fn store_subject(user: &str) -> String {
    format!("ptt.store.{}", subject_token(user))
}

/// JetStream stream of push registrations: each user's whole entry (its
/// devices and channels, a JSON push-book record) on `ptt.push.<hex
/// user>`, the last one kept; every relay mirrors it into its book.
pub const PUSH: &str = "PTT_PUSH";

/// JetStream stream that makes a push to one device for one clip happen
/// once in the cluster (its message id is the clip and device).
pub const PUSHED: &str = "PTT_PUSHED";

/// JetStream stream of channel floors: subject `ptt.floor.<hex channel>`,
/// at most one message per subject (the holder, [`FloorHolder`]); taken by
/// publishing with an expected last subject sequence (0: free; else the
/// holder's), so two relays cannot both grant one floor. (The
/// compare-and-set a key-value bucket does; this async-nats cannot create
/// buckets on Debian's nats-server 2.9.)
pub const FLOORS: &str = "PTT_FLOORS";

fn floor_subject(channel: &str) -> String {
    format!("ptt.floor.{}", subject_token(channel))
}

/// Who holds a channel's floor, as stored in [`FLOORS`]:
/// `priority(0|1) relay-id(hex) clip-id(hex) user`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FloorHolder {
    pub priority: bool,
    pub relay: u64,
    pub clip: ClipId,
    pub user: String,
}

impl FloorHolder {
    pub fn encode(&self) -> Bytes {
        Bytes::from(format!(
            "{} {:016x} {} {}",
            u8::from(self.priority),
            self.relay,
            self.clip.to_hex(),
            self.user
        ))
    }

    pub fn decode(b: &[u8]) -> Option<FloorHolder> {
        let s = std::str::from_utf8(b).ok()?;
        let mut it = s.splitn(4, ' ');
        let priority = match it.next()? {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        let relay = u64::from_str_radix(it.next()?, 16).ok()?;
        let clip = ClipId::from_hex(it.next()?)?;
        Some(FloorHolder {
            priority,
            relay,
            clip,
            user: it.next()?.to_owned(),
        })
    }
}

/// What the cluster said to a talker asking for a channel's floor.
#[derive(Debug)]
pub enum FloorAnswer {
    /// Taken, at this stream sequence (released with it).
    Granted(u64),
    /// Held by someone else (this user).
    Busy(String),
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
    history: stream::Stream,
    /// Stored direct clips in the stream, by (recipient, clip): their
    /// stream sequence (deleted when the recipient acks) and when noted.
    kept: DashMap<(Arc<str>, ClipId), (u64, Instant)>,
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
}

pub fn user_subject(user: &str) -> String {
    format!("ptt.u.{}", subject_token(user))
}

pub fn channel_subject(channel: &str) -> String {
    format!("ptt.c.{}", subject_token(channel))
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

/// The streams a cluster uses, as `cfg` sets them.
fn stream_configs(cfg: &crate::Config) -> Vec<stream::Config> {
    vec![
        stream::Config {
            name: STREAM.into(),
            subjects: vec!["ptt.store.>".into()],
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
            subjects: vec!["ptt.floor.>".into()],
            max_messages_per_subject: 1,
            // A floor whose relay died goes after the longest clip.
            max_age: cfg.max_clip_duration + cfg.max_upload_lag + Duration::from_secs(10),
            storage: stream::StorageType::Memory,
            num_replicas: cfg.cluster_replicas,
            ..Default::default()
        },
        stream::Config {
            name: PUSH.into(),
            subjects: vec!["ptt.push.>".into()],
            max_messages_per_subject: 1,
            storage: stream::StorageType::File,
            num_replicas: cfg.cluster_replicas,
            ..Default::default()
        },
        stream::Config {
            name: PUSHED.into(),
            subjects: vec!["ptt.pushed.>".into()],
            max_age: cfg.dedupe_window,
            duplicate_window: cfg.dedupe_window,
            storage: stream::StorageType::Memory,
            num_replicas: cfg.cluster_replicas,
            ..Default::default()
        },
        stream::Config {
            name: HISTORY.into(),
            subjects: vec!["ptt.hist.>".into()],
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

impl Cluster {
    /// Connects to the NATS servers in `urls` (comma-separated), retrying
    /// in the background if none answers yet, and opens (or creates) the
    /// JetStream streams.
    pub async fn connect(cfg: &crate::Config) -> Result<Arc<Cluster>, ClusterError> {
        let urls = cfg.cluster.as_str();
        let addrs: Vec<async_nats::ServerAddr> = urls
            .split(',')
            .map(|u| {
                u.trim()
                    .parse()
                    .map_err(|e: std::io::Error| ClusterError::Url {
                        url: u.to_owned(),
                        source: Box::new(e),
                    })
            })
            .collect::<Result<_, _>>()?;
        let link = Arc::new(watch::Sender::new(LinkState::default()));
        let events = link.clone();
        // Reconnects: at once, then the shared backoff up to
        // `cluster_reconnect_max`, so cross-relay talk resumes within about
        // that much of NATS coming back.
        let backoff = codec::retry::Backoff {
            min: Duration::from_millis(100),
            max: cfg.cluster_reconnect_max,
        };
        let client = async_nats::ConnectOptions::new()
            .name("ptt-relay")
            // Our own channel publications do not come back to us.
            .no_echo()
            .retry_on_initial_connect()
            // A silent NATS (no FIN: a dead host, a partition) is given up
            // after three unanswered pings.
            .ping_interval(cfg.cluster_ping_interval)
            .reconnect_delay_callback(move |attempts| match attempts {
                0 | 1 => Duration::ZERO,
                n => backoff.delay(n.saturating_sub(2) as u32, rand::random()),
            })
            .event_callback(move |e| {
                let link = events.clone();
                async move {
                    match e {
                        async_nats::Event::Connected => {
                            info!("cluster: connected to NATS");
                            link.send_modify(|s| {
                                s.up = true;
                                s.links += 1;
                            });
                        }
                        async_nats::Event::Disconnected => {
                            warn!(
                                "cluster: lost NATS; clips for other relays are held until it is back"
                            );
                            metrics::count1(metrics::CLUSTER_LINK_LOST);
                            link.send_modify(|s| {
                                s.up = false;
                                s.lost_at = Some(SystemTime::now());
                            });
                        }
                        other => debug!(event = %other, "cluster event"),
                    }
                }
            })
            .connect(addrs)
            .await
            .map_err(nats("connecting to the cluster's NATS"))?;
        if client.connection_state() == async_nats::connection::State::Connected {
            link.send_if_modified(|s| {
                let first = !s.up && s.links == 0;
                if first {
                    s.up = true;
                    s.links = 1;
                }
                first
            });
        }
        let js = jetstream::new(client.clone());
        let configs = stream_configs(cfg);
        let mut opened = Vec::with_capacity(configs.len());
        for c in &configs {
            let s = js
                .get_or_create_stream(c.clone())
                .await
                .map_err(nats(format!(
                    "opening JetStream stream {} (is nats-server running with -js?)",
                    c.name
                )))?;
            opened.push(s);
        }
        let [stream, floors, push, _pushed, history]: [stream::Stream; 5] =
            opened.try_into().map_err(|_| ClusterError::NotConnected)?;
        let (chores, chores_rx) = mpsc::channel(cfg.cluster_backlog_clips.max(1));
        Ok(Arc::new(Cluster {
            client,
            js,
            configs,
            stream,
            floors,
            push,
            push_unshared: Mutex::new(HashMap::new()),
            history,
            kept: DashMap::new(),
            id: rand::random(),
            subs: Mutex::new(HashMap::new()),
            remote: DashMap::new(),
            acks_to: DashMap::new(),
            link,
            chores,
            chores_rx: Mutex::new(Some(chores_rx)),
            held: Mutex::new(HashMap::new()),
            dirty: Mutex::new(BTreeSet::new()),
            adopting: DashMap::new(),
            ping_interval: cfg.cluster_ping_interval,
        }))
    }

    pub fn connected(&self) -> bool {
        self.link.borrow().up
    }

    /// The link's state now.
    pub fn link_state(&self) -> LinkState {
        *self.link.borrow()
    }

    /// Clips accepted here that the cluster does not have yet.
    pub fn held(&self) -> usize {
        self.held.lock().map_or(0, |h| h.len())
    }

    /// Starts listening for acks of the clips this relay accepted, the
    /// chores' runner, and the loop that sweeps relayed clips that went
    /// silent and does the link-up work after every (re)connection.
    pub fn start(self: &Arc<Self>, shared: &Arc<Shared>) {
        self.want(shared, relay_subject(self.id));
        if let Some(rx) = self.chores_rx.lock().ok().and_then(|mut r| r.take()) {
            let me = self.clone();
            shared
                .tracker
                .spawn(me.run_chores(rx, shared.shutdown.clone()));
        }
        let me = self.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut link = me.link.subscribe();
            let mut relink = Relink::default();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    r = link.changed() => if r.is_err() { return },
                    () = shared.shutdown.cancelled() => return,
                }
                let (lost, work) = relink.handle_state(me.link_state());
                if lost {
                    // What was arriving from other relays cannot complete
                    // now: its listeners see a cut at once, and get the
                    // clip when the link is back.
                    me.cut_all_remote(&shared);
                }
                me.sweep(&shared);
                if let Some(w) = work
                    && me.while_linked(me.link_up(&shared, w)).await == Some(true)
                {
                    relink.handle_done(w);
                }
            }
        });
    }

    /// Runs `f` while the link stays up (the same connection): `None` if
    /// the link went first. JetStream requests lost with a connection
    /// would otherwise wait out their timeouts (5 s; 30 s for a publish
    /// ack), holding a sender's `Accepted` or the link-up work.
    async fn while_linked<T>(&self, f: impl std::future::Future<Output = T>) -> Option<T> {
        let mut link = self.link.subscribe();
        let at = *link.borrow_and_update();
        if !at.up {
            return None;
        }
        tokio::select! {
            r = f => Some(r),
            _ = link.wait_for(|s| !s.up || s.links != at.links) => None,
        }
    }

    /// One more local user needs `subject`.
    pub fn want(self: &Arc<Self>, shared: &Arc<Shared>, subject: String) {
        let Ok(mut subs) = self.subs.lock() else {
            return;
        };
        if let Some(s) = subs.get_mut(&subject) {
            s.users += 1;
            return;
        }
        let me = self.clone();
        let shared = shared.clone();
        let subj = subject.clone();
        let ready = Arc::new(AtomicBool::new(false));
        let flag = ready.clone();
        let task = tokio::spawn(async move {
            let mut sub = match me.client.subscribe(subj.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(subject = subj, error = %e, "cluster: cannot subscribe");
                    return;
                }
            };
            // Once flushed, the server routes the subject here.
            if me.client.flush().await.is_ok() {
                flag.store(true, Ordering::SeqCst);
            }
            while let Some(msg) = sub.next().await {
                me.handle(&shared, &msg.payload, msg.reply.as_ref());
            }
        });
        subs.insert(
            subject,
            Sub {
                users: 1,
                task: task.abort_handle(),
                ready,
            },
        );
    }

    /// A local user no longer needs `subject`.
    pub fn unwant(&self, subject: &str) {
        let Ok(mut subs) = self.subs.lock() else {
            return;
        };
        if let Some(s) = subs.get_mut(subject) {
            s.users -= 1;
            if s.users == 0 {
                // Dropping the subscriber unsubscribes.
                s.task.abort();
                subs.remove(subject);
            }
        }
    }

    /// Whether the NATS server routes `subject` to this relay yet.
    pub fn is_subscribed(&self, subject: &str) -> bool {
        self.subs.lock().is_ok_and(|s| {
            s.get(subject)
                .is_some_and(|s| s.ready.load(Ordering::SeqCst))
        })
    }

    /// Publishes a live clip on `subject` as it arrives (one task per
    /// clip and subject). Cut off from NATS, it publishes nothing (queued
    /// publications would reach other relays late, as if live); if the
    /// link comes back while the clip is still open, the run starts again
    /// from its first packet (receivers skip what they have) and goes on
    /// live. A clip that ends while the link is down is left to the
    /// link-up work ([`Cluster::link_up`]).
    pub fn forward(self: &Arc<Self>, shared: &Arc<Shared>, live: Arc<LiveClip>, subject: String) {
        metrics::count(metrics::CLUSTER_CLIPS, "direction", "out");
        let me = self.clone();
        shared.tracker.spawn(async move {
            let clip = live.meta.id;
            let mut link = me.link.subscribe();
            'run: loop {
                if !link.borrow_and_update().up && !wait_link_while_open(&mut link, &live).await {
                    return;
                }
                // The connection this run goes out on: a run whose link
                // went and came back (even between two of its messages)
                // starts again.
                let on = link.borrow().links;
                let start = Relayed::Start {
                    clip,
                    origin: me.id,
                    header: live.header.clone(),
                };
                match me.publish_live(&subject, start.encode(), on).await {
                    Sent::Done => {}
                    Sent::LinkDown => continue 'run,
                    Sent::Failed => return,
                }
                let mut reader = live.reader();
                let mut offset = 0u64;
                loop {
                    let (payload, last) = match reader.next().await {
                        // Encoded straight from the segments: one copy.
                        Next::Data(b) => {
                            let at = offset;
                            offset += b.packets;
                            let n = b.packets as u32;
                            (Relayed::encode_data(clip, at, n, &b.segs), false)
                        }
                        Next::Complete(c) => (Relayed::End { clip, end: c.end }.encode(), true),
                        Next::Cut(code) => (Relayed::Cut { clip, code }.encode(), true),
                    };
                    match me.publish_live(&subject, payload, on).await {
                        Sent::Done if last => return,
                        Sent::Done => {}
                        Sent::LinkDown => continue 'run,
                        Sent::Failed => return,
                    }
                }
            }
        });
    }

    /// Publishes one message of a live run going out on connection `on`.
    /// With that connection gone nothing is published (the run waits for
    /// the link and starts again).
    async fn publish_live(&self, subject: &str, payload: Bytes, on: u64) -> Sent {
        let same = |s: &LinkState| s.up && s.links == on;
        if !same(&self.link_state()) {
            return Sent::LinkDown;
        }
        match self.publish_bytes(subject, payload).await {
            Ok(()) => Sent::Done,
            Err(_) if !same(&self.link_state()) => Sent::LinkDown,
            // Refused while linked (too large: not within the clip limits).
            Err(_) => Sent::Failed,
        }
    }

    async fn publish(&self, subject: &str, msg: Relayed) -> Result<(), ClusterError> {
        self.publish_bytes(subject, msg.encode()).await
    }

    async fn publish_bytes(&self, subject: &str, payload: Bytes) -> Result<(), ClusterError> {
        let r = self
            .client
            .publish(subject.to_owned(), payload)
            .await
            .map_err(nats("publishing"));
        if let Err(e) = &r {
            debug!(error = %e, "cluster publish failed");
        }
        r
    }

    /// Takes channel `channel`'s floor cluster-wide for `me`: free, held by
    /// the same user (a retry or a newer clip), or pre-empted by a
    /// priority talker (the holder's relay is told to cut its clip).
    pub async fn take_floor(
        &self,
        channel: &str,
        me: FloorHolder,
    ) -> Result<FloorAnswer, ClusterError> {
        // Cut off (or cut off meanwhile): fail at once (the relay then
        // decides alone) instead of holding the talker for JetStream's
        // timeout.
        self.while_linked(self.floor_cas(channel, me))
            .await
            .unwrap_or(Err(ClusterError::NotConnected))
    }

    async fn floor_cas(&self, channel: &str, me: FloorHolder) -> Result<FloorAnswer, ClusterError> {
        let subject = floor_subject(channel);
        for _ in 0..8 {
            if let Some(seq) = self.put_floor(&subject, &me, 0).await? {
                return Ok(FloorAnswer::Granted(seq));
            }
            let cur = match self.floors.get_last_raw_message_by_subject(&subject).await {
                Ok(m) => m,
                // Released (or expired) meanwhile: try again.
                Err(_) => continue,
            };
            let held = FloorHolder::decode(&cur.payload);
            if let Some(h) = &held
                && h.user != me.user
                && (!me.priority || h.priority)
            {
                return Ok(FloorAnswer::Busy(h.user.clone()));
            }
            if let Some(seq) = self.put_floor(&subject, &me, cur.sequence).await? {
                if let Some(h) = held
                    && h.user != me.user
                    && h.relay != self.id
                {
                    // Pre-empted on another relay: it cuts the clip there.
                    let cut = Relayed::Cut {
                        clip: h.clip,
                        code: ErrorCode::Preempted,
                    };
                    let _ = self.publish(&relay_subject(h.relay), cut).await;
                }
                return Ok(FloorAnswer::Granted(seq));
            }
        }
        Err(ClusterError::Contended(channel.to_owned()))
    }

    /// Publishes `me` as the floor's holder if the subject's last message
    /// is still `expect` (0: none). `None` when someone else got there
    /// first.
    async fn put_floor(
        &self,
        subject: &str,
        me: &FloorHolder,
        expect: u64,
    ) -> Result<Option<u64>, ClusterError> {
        use async_nats::jetstream::context::PublishErrorKind;
        let msg = jetstream::message::PublishMessage::build()
            .payload(me.encode())
            .expected_last_subject_sequence(expect);
        let ack = match self.js.send_publish(subject.to_owned(), msg).await {
            Ok(f) => f.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(a) => Ok(Some(a.sequence)),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
            Err(e) => Err(nats("taking a floor")(e)),
        }
    }

    /// Releases a floor taken at stream sequence `seq` (if it was taken
    /// over since, that message is gone already and this does nothing).
    /// Never waits: done by the chores' runner, when the link is up.
    pub fn release_floor(&self, seq: u64) {
        self.chore(Chore::ReleaseFloor(seq));
    }

    /// Queues a chore; when `cluster_backlog_clips` are waiting already it
    /// is dropped (counted): an ack or a deletion not made costs a clip
    /// offered once more (and dropped by id), a floor not released expires.
    fn chore(&self, c: Chore) {
        if self.chores.try_send(c).is_err() {
            metrics::count1(metrics::CLUSTER_CHORES_DROPPED);
        }
    }

    /// Runs chores, a batch at a time, whenever the link is up.
    async fn run_chores(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Chore>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut link = self.link.subscribe();
        let mut batch = Vec::with_capacity(CHORE_BATCH);
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, CHORE_BATCH) => if n == 0 { return },
                () = stop.cancelled() => return,
            }
            tokio::select! {
                r = link.wait_for(|s| s.up) => if r.is_err() { return },
                () = stop.cancelled() => return,
            }
            futures_util::future::join_all(batch.drain(..).map(|c| self.do_chore(c))).await;
        }
    }

    async fn do_chore(&self, c: Chore) {
        match c {
            Chore::Ack {
                origin,
                clip,
                recipient,
            } => {
                let ack = Relayed::Ack {
                    clip,
                    recipient: recipient.to_string(),
                };
                let _ = self.publish(&relay_subject(origin), ack).await;
            }
            Chore::Delete(seq) => self.delete_kept(seq).await,
            Chore::ReleaseFloor(seq) => {
                let _ = self.floors.delete_message(seq).await;
            }
        }
    }

    /// Keeps an accepted direct clip in JetStream for `recipient`, so any
    /// relay can deliver it (and it outlives this one). Returns once
    /// JetStream has it (its publish ack). With `elsewhere` (the recipient
    /// is not connected here) the relay it is connected to is told, so it
    /// queues the clip even if it missed the live run. Cut off, the clip
    /// is held: written when the link is back.
    pub async fn keep(
        &self,
        clip: &StoredClip,
        recipient: &Arc<str>,
        elsewhere: bool,
    ) -> Result<(), ClusterError> {
        let r = self.keep_direct(clip, recipient, elsewhere).await;
        self.note_held(clip.meta.id, r.is_err().then_some(true));
        r.map(|_| ())
    }

    /// [`Cluster::keep`] without the bookkeeping of held clips; returns
    /// whether JetStream had it already.
    async fn keep_direct(
        &self,
        clip: &StoredClip,
        recipient: &Arc<str>,
        elsewhere: bool,
    ) -> Result<bool, ClusterError> {
        // Cut off, this fails at once: this relay's own store has the clip.
        let ack = self.publish_clip(store_subject(recipient), clip).await?;
        self.kept.insert(
            (recipient.clone(), clip.meta.id),
            (ack.sequence, Instant::now()),
        );
        if elsewhere {
            let kept = Relayed::Kept {
                clip: clip.meta.id,
                seq: ack.sequence,
                origin: self.id,
                recipient: recipient.to_string(),
            };
            let _ = self.publish(&user_subject(recipient), kept).await;
        }
        Ok(ack.duplicate)
    }

    /// Keeps an accepted channel clip in the cluster's channel history, so
    /// members who were offline get it from any relay, and announces it to
    /// the relays of the channel's members (any whose live run broke take
    /// it from there). Cut off, the channel is marked: its history here is
    /// compared with the cluster's when the link is back.
    pub async fn keep_history(
        &self,
        channel: &str,
        clip: &Arc<StoredClip>,
    ) -> Result<(), ClusterError> {
        let r = self.put_history(channel, clip).await;
        self.note_held(clip.meta.id, r.is_err().then_some(false));
        if r.is_err()
            && let Ok(mut d) = self.dirty.lock()
        {
            d.insert(channel.to_owned());
        }
        r.map(|_| ())
    }

    /// Publishes a channel clip to the cluster history and announces it;
    /// returns whether the history had it already.
    async fn put_history(&self, channel: &str, clip: &StoredClip) -> Result<bool, ClusterError> {
        let ack = self.publish_clip(history_subject(channel), clip).await?;
        let kept = Relayed::HistoryKept {
            clip: clip.meta.id,
            seq: ack.sequence,
        };
        let _ = self.publish(&channel_subject(channel), kept).await;
        Ok(ack.duplicate)
    }

    /// Counts `id` as held here only (`Some(direct)`: JetStream could not
    /// take it) or no longer (`None`).
    fn note_held(&self, id: ClipId, held: Option<bool>) {
        let Ok(mut h) = self.held.lock() else {
            return;
        };
        match held {
            Some(direct) => {
                h.insert(id, direct);
            }
            None => {
                h.remove(&id);
            }
        }
    }

    /// Publishes a stored clip to a JetStream subject, its id as the
    /// message id (a clip JetStream has is not stored twice) and this
    /// relay as its origin, and waits for JetStream's ack. Cut off, fails
    /// at once instead of holding the caller for JetStream's timeout.
    async fn publish_clip(
        &self,
        subject: String,
        clip: &StoredClip,
    ) -> Result<jetstream::publish::PublishAck, ClusterError> {
        if !self.connected() {
            return Err(ClusterError::NotConnected);
        }
        let msg = jetstream::message::PublishMessage::build()
            .payload(Bytes::from(clip.to_record()))
            .message_id(clip.meta.id.to_hex())
            .header(ORIGIN_HEADER, format!("{:016x}", self.id).as_str());
        let publish = async {
            self.js
                .send_publish(subject, msg)
                .await
                .map_err(nats("publishing a clip to JetStream"))?
                .await
                .map_err(nats("JetStream's ack of a clip"))
        };
        self.while_linked(publish)
            .await
            .unwrap_or(Err(ClusterError::NotConnected))
    }

    /// After every (re)connection to NATS: makes sure the streams exist
    /// (a NATS that restarted alone lost the memory stream of floors),
    /// writes to JetStream what this relay holds that the cluster lacks,
    /// and, after an outage, reads what was kept for its users and
    /// channels since it began (announcements it may have missed). True
    /// once all of it is done; on a failure it is tried again at the next
    /// tick, and a link lost meanwhile abandons it (see [`Relink`]).
    async fn link_up(self: &Arc<Self>, shared: &Arc<Shared>, w: LinkWork) -> bool {
        let started = Instant::now();
        let r = async {
            for c in &self.configs {
                self.js
                    .get_or_create_stream(c.clone())
                    .await
                    .map_err(nats(format!("opening JetStream stream {}", c.name)))?;
            }
            self.share_unshared().await?;
            let direct = self.backfill_direct(shared).await?;
            let channel = self.backfill_channels(shared, w.all_channels).await?;
            let caught = match w.since {
                Some(t) => self.catch_up(shared, t).await?,
                None => 0,
            };
            Ok::<_, ClusterError>((direct, channel, caught))
        }
        .await;
        match r {
            Ok((direct, channel, caught)) => {
                if direct + channel + caught > 0 {
                    info!(
                        direct,
                        channel,
                        scanned = caught,
                        ms = started.elapsed().as_millis() as u64,
                        "cluster: linked again; backlog written and missed clips read"
                    );
                }
                true
            }
            Err(e) => {
                warn!(error = %e, "cluster: link-up work stopped; tried again shortly");
                false
            }
        }
    }

    /// Keeps in JetStream every undelivered direct clip of this relay's
    /// store that it has not kept there yet (clips accepted while NATS
    /// was unreachable, and after a restart everything: JetStream's
    /// message-id window answers a clip it has as a duplicate). Returns
    /// how many JetStream did not have.
    async fn backfill_direct(&self, shared: &Shared) -> Result<u64, ClusterError> {
        let mut n = 0;
        for (recipient, clip) in shared.cache.pending_direct() {
            if self.kept.contains_key(&(recipient.clone(), clip.meta.id)) {
                continue;
            }
            let elsewhere = !shared.router.is_online(&recipient);
            if !self.keep_direct(&clip, &recipient, elsewhere).await? {
                n += 1;
                metrics::count(metrics::CLUSTER_BACKFILLED, "kind", "direct");
            }
            self.note_held(clip.meta.id, None);
        }
        Ok(n)
    }

    /// Compares this relay's channel histories with the cluster's and
    /// writes (and announces) the clips the cluster lacks: every channel's
    /// at the first link (a restart may follow a crash during an outage),
    /// the channels marked while cut off after that. Returns how many.
    async fn backfill_channels(&self, shared: &Shared, all: bool) -> Result<u64, ClusterError> {
        let channels: Vec<String> = if all {
            shared.history.iter().map(|h| h.key().clone()).collect()
        } else {
            self.dirty
                .lock()
                .map(|mut d| std::mem::take(&mut *d).into_iter().collect())
                .unwrap_or_default()
        };
        let mut n = 0;
        for (i, c) in channels.iter().enumerate() {
            match self.reconcile(shared, c).await {
                Ok(k) => n += k,
                Err(e) => {
                    // Marked again, with the ones not done yet.
                    if let Ok(mut d) = self.dirty.lock() {
                        d.extend(channels[i..].iter().cloned());
                    }
                    return Err(e);
                }
            }
        }
        Ok(n)
    }

    /// Writes the clips of `channel`'s history here that the cluster's
    /// lacks, oldest first, and announces each. A clip older than the
    /// cluster's oldest when the cluster's is full fell out of it (it is
    /// not brought back), as does one past `channel_history_age`.
    async fn reconcile(&self, shared: &Shared, channel: &str) -> Result<u64, ClusterError> {
        let local: Vec<Arc<StoredClip>> = shared
            .history
            .get(channel)
            .map(|h| h.clips.iter().map(|(_, c)| c.clone()).collect())
            .unwrap_or_default();
        if local.is_empty() {
            return Ok(0);
        }
        let theirs = self
            .read(&self.history, Some(history_subject(channel)))
            .await?;
        let cfg = &shared.config;
        let ids: HashSet<ClipId> = theirs.iter().map(|(_, _, c)| c.meta.id).collect();
        let full = theirs.len() >= cfg.channel_history_depth.max(1);
        let oldest = theirs.iter().map(|(_, _, c)| c.meta.created_ms).min();
        let too_old = cfg.history_cutoff_ms(crate::now_ms());
        let mut n = 0;
        for clip in local {
            let at = clip.meta.created_ms;
            if ids.contains(&clip.meta.id)
                || at < too_old
                || (full && oldest.is_some_and(|o| at < o))
            {
                self.note_held(clip.meta.id, None);
                continue;
            }
            if !self.put_history(channel, &clip).await? {
                n += 1;
                metrics::count(metrics::CLUSTER_BACKFILLED, "kind", "channel");
            }
            self.note_held(clip.meta.id, None);
        }
        Ok(n)
    }

    /// Scans what was kept in the cluster from `since` (less the time a
    /// lost link takes to notice), headers only, and takes the clips for
    /// this relay's users and channels as announced ones: the
    /// announcements sent while this relay was cut off never reached it.
    /// Returns how many were for its users (those it did not have yet are
    /// counted in `ptt_cluster_caught_up_total` as they are queued).
    async fn catch_up(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        since: SystemTime,
    ) -> Result<u64, ClusterError> {
        let from = since
            .checked_sub(self.ping_interval * 3 + Duration::from_secs(2))
            .unwrap_or(since);
        let mut n = 0;
        for stream in [&self.stream, &self.history] {
            for (seq, subject, headers) in self.scan(stream, from).await? {
                let Some(clip) = headers
                    .get(async_nats::header::NATS_MESSAGE_ID)
                    .and_then(|v| ClipId::from_hex(v.as_str()))
                else {
                    continue;
                };
                let (at, kind): (_, &'static str) = match catch_up_target(&subject) {
                    Some(CaughtUp::User(user)) if shared.router.is_online(&user) => (
                        Announced::Direct {
                            seq,
                            origin: origin_of(Some(&headers)),
                            recipient: user,
                        },
                        "direct",
                    ),
                    Some(CaughtUp::Channel(c)) if !shared.router.channel_members(&c).is_empty() => {
                        (Announced::History { seq }, "channel")
                    }
                    _ => continue,
                };
                self.announced(shared, clip, at, Some(kind));
                n += 1;
            }
        }
        Ok(n)
    }

    /// Every message of `stream` from `since`: sequence, subject and
    /// headers (not the clips: a relay takes only its users').
    async fn scan(
        &self,
        stream: &stream::Stream,
        since: SystemTime,
    ) -> Result<Vec<(u64, String, async_nats::HeaderMap)>, ClusterError> {
        let mut out = Vec::new();
        self.consume(stream, None, Some(since), true, |seq, m| {
            out.push((
                seq,
                m.subject.to_string(),
                m.headers.clone().unwrap_or_default(),
            ));
        })
        .await?;
        Ok(out)
    }

    /// A direct clip kept in JetStream (at `seq`) for `session`'s user,
    /// connected here: queued for it unless this relay knows the clip
    /// (then its own copy, if still owed, delivers it). Noted either way,
    /// so the user's ack deletes JetStream's copy and reaches the origin.
    /// True if queued.
    async fn take_kept(
        &self,
        shared: &Shared,
        session: &Session,
        seq: u64,
        origin: Option<u64>,
        clip: Arc<StoredClip>,
    ) -> bool {
        let id = clip.meta.id;
        let user = session.user.clone();
        self.kept.insert((user.clone(), id), (seq, Instant::now()));
        if let Some(o) = origin.filter(|o| *o != self.id) {
            self.acks_to.insert(id, (o, Instant::now()));
        }
        if self.remote.contains_key(&id) || known(shared, &id).await {
            return false;
        }
        let queued = shared.cache.queue_cached(user, clip);
        if queued {
            session.store_changed();
        }
        queued
    }

    /// Takes a channel clip of the cluster's history into this relay's
    /// (unless it has it, or its live run is arriving): every member
    /// online here gets it now, and those who connect later from this
    /// history, as for a clip said here. True if taken.
    async fn adopt(&self, shared: &Shared, channel: &str, clip: Arc<StoredClip>) -> bool {
        let id = clip.meta.id;
        let in_history = |s: &Shared| {
            s.history
                .get(channel)
                .is_some_and(|h| h.clips.iter().any(|(_, c)| c.meta.id == id))
        };
        if self.remote.contains_key(&id) || in_history(shared) || known(shared, &id).await {
            return false;
        }
        if self.adopting.insert(id, ()).is_some() {
            return false;
        }
        // Looked at again under the claim: another adoption may have
        // finished between the first look and the claim.
        let taken = !in_history(shared);
        if taken {
            let sender = clip.meta.sender.clone();
            record_history(shared, channel, &clip, &[], &sender).await;
        }
        self.adopting.remove(&id);
        taken
    }

    /// Every clip of `stream` on `subject` (all subjects: `None`), in
    /// order.
    async fn read(
        &self,
        stream: &stream::Stream,
        subject: Option<String>,
    ) -> Result<Vec<Read>, ClusterError> {
        let mut out = Vec::new();
        self.consume(
            stream,
            subject,
            None,
            false,
            |seq, m| match StoredClip::from_record(&m.payload) {
                Some(c) => out.push((seq, origin_of(m.headers.as_ref()), c)),
                None => warn!(seq, "cluster: unreadable stored clip skipped"),
            },
        )
        .await?;
        Ok(out)
    }

    /// Feeds `each` every message of `stream` on `subject` (all: `None`),
    /// from its start or from `since`, in order, with its sequence; with
    /// `headers_only` the messages carry no payload.
    async fn consume(
        &self,
        stream: &stream::Stream,
        subject: Option<String>,
        since: Option<SystemTime>,
        headers_only: bool,
        mut each: impl FnMut(u64, &async_nats::Message),
    ) -> Result<(), ClusterError> {
        use consumer::{AckPolicy, DeliverPolicy, pull};
        let deliver_policy = match since {
            Some(t) => DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::from(t),
            },
            None => DeliverPolicy::All,
        };
        let consumer = stream
            .create_consumer(pull::Config {
                filter_subject: subject.unwrap_or_default(),
                deliver_policy,
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                headers_only,
                ..Default::default()
            })
            .await
            .map_err(nats("reading a JetStream stream"))?;
        let mut left = consumer.cached_info().num_pending;
        while left > 0 {
            let mut batch = consumer
                .fetch()
                .max_messages(left.min(256) as usize)
                .messages()
                .await
                .map_err(nats("fetching from JetStream"))?;
            let mut got = 0;
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| ClusterError::Nats {
                    what: "fetching from JetStream".into(),
                    source: e,
                })?;
                got += 1;
                let seq = m
                    .info()
                    .map_err(|e| ClusterError::Nats {
                        what: "a JetStream message's info".into(),
                        source: e,
                    })?
                    .stream_sequence;
                each(seq, &m.message);
            }
            if got == 0 {
                break;
            }
            left = left.saturating_sub(got);
        }
        Ok(())
    }

    /// Loads what JetStream holds for `session`'s user into this relay's
    /// store (in memory: JetStream keeps it durably); returns how many
    /// were new here.
    async fn load_kept(&self, shared: &Shared, session: &Session) -> Result<usize, ClusterError> {
        let mut new = 0;
        for (seq, origin, clip) in self
            .read(&self.stream, Some(store_subject(&session.user)))
            .await?
        {
            if self
                .take_kept(shared, session, seq, origin, Arc::new(clip))
                .await
            {
                new += 1;
            }
        }
        Ok(new)
    }

    /// Takes into this relay's history the clips of `session`'s channels'
    /// cluster history it does not have (said on other relays while the
    /// user was away); returns how many.
    async fn load_history(
        &self,
        shared: &Shared,
        session: &Session,
    ) -> Result<usize, ClusterError> {
        let mut new = 0;
        for ch in session.channels.keys() {
            for (_, _, clip) in self.read(&self.history, Some(history_subject(ch))).await? {
                if self.adopt(shared, ch, Arc::new(clip)).await {
                    new += 1;
                }
            }
        }
        Ok(new)
    }

    /// A local recipient acked `clip`: JetStream's copy for it goes; if it
    /// came from another relay as a direct clip, that relay drops its
    /// stored copy too. Never waits (see [`Cluster::chore`]).
    pub fn acked(&self, clip: &ClipId, recipient: &Arc<str>) {
        // A direct clip held here only, delivered here: the cluster needs
        // it no more.
        if let Ok(mut h) = self.held.lock()
            && h.get(clip) == Some(&true)
        {
            h.remove(clip);
        }
        if let Some((_, (seq, _))) = self.kept.remove(&(recipient.clone(), *clip)) {
            self.chore(Chore::Delete(seq));
        }
        if let Some((_, (origin, _))) = self.acks_to.remove(clip) {
            self.chore(Chore::Ack {
                origin,
                clip: *clip,
                recipient: recipient.clone(),
            });
        }
    }

    /// Deletes a delivered clip from the stream. Without `no_erase` (the
    /// client library's `delete_message`) the server overwrites the
    /// message on disk with random bytes: measured, that held a clustered
    /// relay to a quarter of its clip rate.
    async fn delete_kept(&self, seq: u64) {
        let req = serde_json::json!({ "seq": seq, "no_erase": true });
        let r: Result<serde_json::Value, _> = self
            .js
            .request(format!("STREAM.MSG.DELETE.{STREAM}"), &req)
            .await;
        match r {
            Ok(v) if v.get("error").is_none() => {}
            Ok(v) => debug!(seq, error = %v["error"], "cluster: stored clip already gone"),
            Err(e) => debug!(seq, error = %e, "cluster: stored clip not deleted (it expires)"),
        }
    }

    /// Handles one message from another relay, in order and without
    /// waiting: what waits on the store or JetStream (End, Ack, Kept,
    /// HistoryKept) runs beside, so the next clip on this subject is not
    /// held behind a disk sync.
    fn handle(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        payload: &Bytes,
        reply: Option<&async_nats::Subject>,
    ) {
        let msg = match Relayed::decode(payload) {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "cluster: bad message dropped");
                return;
            }
        };
        match msg {
            Relayed::Start {
                clip,
                origin,
                header,
            } => self.started(shared, clip, origin, &header),
            Relayed::Data {
                clip,
                offset,
                packets,
                records,
            } => self.data(shared, clip, offset, packets, &records),
            Relayed::End { clip, end } => {
                if !self.remote.contains_key(&clip) {
                    return;
                }
                // Claimed before it leaves `remote`, so no adoption of its
                // announcement stores it a second time meanwhile.
                let mine = self.adopting.insert(clip, ()).is_none();
                // Taken now, so a late Data for it finds nothing.
                let Some((_, r)) = self.remote.remove(&clip) else {
                    if mine {
                        self.adopting.remove(&clip);
                    }
                    return;
                };
                let (me, shared2) = (self.clone(), shared.clone());
                shared.tracker.spawn(async move {
                    me.ended(&shared2, r, end).await;
                    if mine {
                        me.adopting.remove(&clip);
                    }
                });
            }
            Relayed::Cut { clip, code } => {
                if !self.cut(shared, &clip, code) && code == ErrorCode::Preempted {
                    // A talker here lost the floor to a priority talker on
                    // another relay.
                    shared.stop_upload(
                        &clip,
                        ErrorCode::Preempted,
                        "a priority talker took the floor",
                    );
                }
            }
            Relayed::Ack { clip, recipient } => {
                let (me, shared2) = (self.clone(), shared.clone());
                shared.tracker.spawn(async move {
                    if let Err(e) = shared2.store.ack(&recipient, &clip).await {
                        warn!(error = %e, "cluster: store ack failed");
                    }
                    me.acked(&clip, &Arc::from(recipient));
                });
            }
            Relayed::Kept {
                clip,
                seq,
                origin,
                recipient,
            } => self.announced(
                shared,
                clip,
                Announced::Direct {
                    seq,
                    origin: Some(origin),
                    recipient,
                },
                None,
            ),
            Relayed::HistoryKept { clip, seq } => {
                self.announced(shared, clip, Announced::History { seq }, None);
            }
            // Asked on a user's subject: this relay has the user (it is
            // subscribed for a session of it), so it answers.
            Relayed::Present => {
                if let Some(to) = reply {
                    let (client, to) = (self.client.clone(), to.clone());
                    tokio::spawn(async move { client.publish(to, Bytes::new()).await });
                }
            }
        }
    }

    /// The cluster keeps `clip` (`at`): while its live run is arriving
    /// here that run delivers and stores it (noted, in case it breaks);
    /// otherwise it is fetched and queued beside.
    /// `caught_up` names the kind counted in `ptt_cluster_caught_up_total`
    /// when the link-up work found the clip (and this relay takes it).
    fn announced(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        clip: ClipId,
        at: Announced,
        caught_up: Option<&'static str>,
    ) {
        if let Some(mut r) = self.remote.get_mut(&clip) {
            r.kept = Some(at);
            return;
        }
        self.fetch_announced(shared, clip, at, caught_up);
    }

    /// Fetches an announced clip from its stream and queues it here (the
    /// direct recipient, or the channel's members), beside.
    fn fetch_announced(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        clip: ClipId,
        at: Announced,
        caught_up: Option<&'static str>,
    ) {
        let (me, shared) = (self.clone(), shared.clone());
        shared.clone().tracker.spawn(async move {
            let (stream, seq) = match &at {
                Announced::Direct { seq, recipient, .. } => {
                    // Not connected here (any more): its next relay reads
                    // the stream when it connects.
                    if shared.router.session(recipient).is_none() || known(&shared, &clip).await {
                        return;
                    }
                    (&me.stream, *seq)
                }
                Announced::History { seq } => (&me.history, *seq),
            };
            let m = match stream.get_raw_message(seq).await {
                Ok(m) => m,
                // Delivered and deleted already, or gone with its age.
                Err(e) => return debug!(seq, error = %e, "cluster: announced clip not read"),
            };
            let Some(stored) = StoredClip::from_record(&m.payload) else {
                return warn!(seq, "cluster: unreadable stored clip skipped");
            };
            if stored.meta.id != clip {
                return warn!(seq, "cluster: announced clip is another clip; skipped");
            }
            let stored = Arc::new(stored);
            let taken = match (&at, &stored.meta.target) {
                (
                    Announced::Direct {
                        origin, recipient, ..
                    },
                    Target::User(to),
                ) if to == recipient => match shared.router.session(recipient) {
                    Some(s) => me.take_kept(&shared, &s, seq, *origin, stored).await,
                    None => false,
                },
                (Announced::History { .. }, Target::Channel(c)) => {
                    let c = c.clone();
                    me.adopt(&shared, &c, stored).await
                }
                _ => {
                    warn!(seq, "cluster: announced clip has another target; skipped");
                    false
                }
            };
            if let (true, Some(kind)) = (taken, caught_up) {
                metrics::count(metrics::CLUSTER_CAUGHT_UP, "kind", kind);
            }
        });
    }

    fn started(&self, shared: &Arc<Shared>, clip: ClipId, origin: u64, header: &[u8]) {
        // A run sent again after the origin's link came back: the one
        // arriving goes on (its `Data` skips what it has).
        if origin == self.id || self.remote.contains_key(&clip) {
            return;
        }
        let d = match Message::decode(header, header.len()) {
            Ok(Some((Message::Delivery(d), n))) if n == header.len() && d.clip_id == clip => d,
            _ => {
                warn!(clip = %clip, "cluster: bad clip header dropped");
                return;
            }
        };
        let sender: Arc<str> = Arc::from(d.sender.as_str());
        let recipients = shared.router.local_recipients(&d.target, &sender);
        let channel = match &d.target {
            Target::Channel(c) => Some(c.clone()),
            Target::User(_) => None,
        };
        if recipients.is_empty() {
            return;
        }
        metrics::count(metrics::CLUSTER_CLIPS, "direction", "in");
        let meta = Arc::new(ClipMeta {
            id: clip,
            sender,
            target: d.target,
            format: d.format,
            created_ms: d.created_ms,
        });
        let pre_skip = meta.format.pre_skip;
        let live = LiveClip::new(meta);
        for r in &recipients {
            if let Some(s) = shared.router.session(r)
                && !s.offer_live(live.clone())
            {
                metrics::hot().live_fallbacks.increment(1);
            }
        }
        if channel.is_none() {
            self.acks_to.insert(clip, (origin, Instant::now()));
        }
        self.remote.insert(
            clip,
            Remote {
                live,
                framer: Framer::for_clip(shared.config.frame_limits(), pre_skip),
                run: Run::default(),
                recipients,
                channel,
                kept: None,
                last: Instant::now(),
            },
        );
    }

    /// A run of a relayed clip's packet records: what is new is validated
    /// again and goes to its listeners; a repeat is skipped; a gap or bad
    /// records cut the live run (the clip then comes from the cluster's
    /// store, announced).
    fn data(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        clip: ClipId,
        offset: u64,
        packets: u32,
        records: &Bytes,
    ) {
        let Some(mut r) = self.remote.get_mut(&clip) else {
            return;
        };
        r.last = Instant::now();
        let (new, n) = match r.run.take(offset, packets, records) {
            Take::New { records, packets } => (records, packets),
            Take::Repeat => return,
            Take::Gap { have, offset } => {
                drop(r);
                debug!(clip = %clip, have, offset, "cluster: relayed run has a gap; clip cut");
                self.cut(shared, &clip, ErrorCode::CutOff);
                return;
            }
            Take::Malformed => {
                drop(r);
                warn!(clip = %clip, "cluster: bad packet records; clip cut");
                self.cut(shared, &clip, ErrorCode::CutOff);
                return;
            }
        };
        let ok = r
            .framer
            .scan(&new)
            .is_ok_and(|s| s.records == new.len() && s.end.is_none());
        if !ok {
            drop(r);
            warn!(clip = %clip, "cluster: bad packet records; clip cut");
            self.cut(shared, &clip, ErrorCode::CutOff);
            return;
        }
        if let Err(e) = r.live.push(new, n) {
            warn!(clip = %clip, error = %e, "cluster: relayed clip lost");
            r.live.cut(ErrorCode::Internal);
        }
    }

    async fn ended(self: &Arc<Self>, shared: &Arc<Shared>, r: Remote, end: codec::ClipEnd) {
        let clip = r.live.meta.id;
        // The end must match what arrived (a run that lost packets on the
        // way without a gap showing could end short).
        let mut framer = r.framer.clone();
        let whole = framer.scan(&end.to_bytes()).is_ok_and(|s| s.end.is_some());
        let body = match r.live.body() {
            Ok(b) if whole => b,
            Ok(_) => {
                debug!(clip = %clip, "cluster: relayed clip ended short; taken from the store");
                return self.broken(shared, r, ErrorCode::CutOff);
            }
            Err(e) => {
                warn!(clip = %clip, error = %e, "cluster: relayed clip lost");
                return self.broken(shared, r, ErrorCode::Internal);
            }
        };
        let stored = Arc::new(StoredClip::new(r.live.meta.clone(), body, end));
        match shared.store.append(stored.clone(), &r.recipients).await {
            Ok(Appended::New) => {
                let channel = r.channel.as_deref();
                crate::state::stored_new(shared, &r.live, stored, &r.recipients, channel).await;
            }
            Ok(Appended::Duplicate) => r.live.complete(stored),
            Ok(Appended::Conflict) | Err(_) => {
                // Not kept here: the origin still holds it.
                warn!(clip = %clip, "cluster: a relayed clip could not be stored here");
                r.live.cut(ErrorCode::CutOff);
            }
        }
    }

    /// Cuts a relayed clip; false if there is none of that id.
    fn cut(self: &Arc<Self>, shared: &Arc<Shared>, clip: &ClipId, code: ErrorCode) -> bool {
        match self.remote.remove(clip) {
            Some((_, r)) => {
                self.broken(shared, r, code);
                true
            }
            None => false,
        }
    }

    /// A relayed clip's live run ended without the clip: its listeners
    /// see `code`; if the cluster announced it keeps the clip, it is taken
    /// from there (otherwise its announcement, or the link-up work, brings
    /// it).
    fn broken(self: &Arc<Self>, shared: &Arc<Shared>, r: Remote, code: ErrorCode) {
        let clip = r.live.meta.id;
        r.live.cut(code);
        if let Some(at) = r.kept {
            self.fetch_announced(shared, clip, at, None);
        } else if r.channel.is_none() {
            // Its `Kept` may follow; a later one is fetched as usual, and
            // the ack route is noted again from it.
            self.acks_to.remove(&clip);
        }
    }

    /// The link went down: every relayed clip is cut for its listeners.
    fn cut_all_remote(self: &Arc<Self>, shared: &Arc<Shared>) {
        let all: Vec<ClipId> = self.remote.iter().map(|r| *r.key()).collect();
        for c in all {
            self.cut(shared, &c, ErrorCode::CutOff);
        }
    }

    /// Cuts relayed clips that went silent (their origin died mid-clip)
    /// and forgets ack routes and stored-clip notes older than `clip_ttl`.
    fn sweep(self: &Arc<Self>, shared: &Arc<Shared>) {
        let idle = shared.config.upload_idle_timeout;
        let ttl = shared.config.clip_ttl;
        let quiet: Vec<ClipId> = self
            .remote
            .iter()
            .filter(|r| r.last.elapsed() > idle)
            .map(|r| *r.key())
            .collect();
        for c in quiet {
            self.cut(shared, &c, ErrorCode::CutOff);
        }
        self.acks_to.retain(|_, (_, at)| at.elapsed() < ttl);
        self.kept.retain(|_, (_, at)| at.elapsed() < ttl);
    }

    /// A session starts here: subscribes to its user's and channels'
    /// subjects (returned, to be let go when it ends) and, beside it,
    /// queues for it the clips the cluster keeps for it (accepted by any
    /// relay) and its channels' history said elsewhere.
    pub fn join(self: &Arc<Self>, shared: &Arc<Shared>, session: &Arc<Session>) -> Vec<String> {
        let subjects: Vec<String> = std::iter::once(user_subject(&session.user))
            .chain(session.channels.keys().map(|ch| channel_subject(ch)))
            .collect();
        for subj in &subjects {
            self.want(shared, subj.clone());
        }
        let (me, shared, session) = (self.clone(), shared.clone(), session.clone());
        shared
            .tracker
            .clone()
            .spawn(async move { me.load_for(&shared, &session).await });
        subjects
    }

    /// Loads what the cluster keeps for a session that just started: as
    /// soon as the link is up (at once, or when an outage ends), tried
    /// again with the shared backoff while JetStream cannot answer (a NATS
    /// node just died, a leader is being elected), for as long as the
    /// session lasts.
    async fn load_for(&self, shared: &Shared, session: &Session) {
        let mut attempts = codec::retry::Backoff {
            min: Duration::from_millis(300),
            max: Duration::from_secs(5),
        }
        .attempts();
        let mut link = self.link.subscribe();
        loop {
            tokio::select! {
                r = link.wait_for(|s| s.up) => if r.is_err() { return },
                _ = session.conn.closed() => return,
            }
            // Subscribed first: a clip kept after the reads below is
            // announced on the user's subject (`Kept`).
            let subject = user_subject(&session.user);
            tokio::select! {
                ok = self.subscribed(&subject, Duration::from_secs(5)) => if !ok {
                    warn!(user = %session.user, "cluster: subscription not confirmed");
                },
                _ = session.conn.closed() => return,
            }
            let load = async {
                let n = self.load_kept(shared, session).await?;
                Ok::<_, ClusterError>(n + self.load_history(shared, session).await?)
            };
            let Some(loaded) = self.while_linked(load).await else {
                // The link went meanwhile: again once it is back.
                continue;
            };
            match loaded {
                Ok(n) => {
                    if n > 0 {
                        session.store_changed();
                    }
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "cluster: stored clips not loaded yet");
                    tokio::select! {
                        () = tokio::time::sleep(attempts.next(rand::random())) => {}
                        _ = session.conn.closed() => return,
                    }
                }
            }
        }
    }

    /// Waits (a bounded time) until the server routes `subject` here.
    async fn subscribed(&self, subject: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while !self.is_subscribed(subject) {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

/// Whose a stored clip is, by its subject in `PTT_CLIPS` or `PTT_HISTORY`.
#[derive(Debug, PartialEq, Eq)]
enum CaughtUp {
    User(String),
    Channel(String),
}

fn catch_up_target(subject: &str) -> Option<CaughtUp> {
    if let Some(t) = subject.strip_prefix("ptt.store.") {
        return codec::cluster::subject_name(t).map(CaughtUp::User);
    }
    let t = subject.strip_prefix("ptt.hist.")?;
    codec::cluster::subject_name(t).map(CaughtUp::Channel)
}

fn push_subject(user: &str) -> String {
    format!("ptt.push.{}", subject_token(user))
}

impl Cluster {
    /// Shares the push entries held while cut off.
    async fn share_unshared(&self) -> Result<(), ClusterError> {
        let held: Vec<(String, crate::push::book::Record)> = self
            .push_unshared
            .lock()
            .map(|mut h| h.drain().collect())
            .unwrap_or_default();
        for (i, (user, entry)) in held.iter().enumerate() {
            if let Err(e) = self.put_push(user, entry).await {
                if let Ok(mut h) = self.push_unshared.lock() {
                    for (u, e) in &held[i..] {
                        h.entry(u.clone()).or_insert_with(|| e.clone());
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    async fn put_push(
        &self,
        user: &str,
        entry: &crate::push::book::Record,
    ) -> Result<(), ClusterError> {
        let payload = serde_json::to_vec(entry).map_err(|e| ClusterError::Nats {
            what: "encoding a push entry".into(),
            source: Box::new(e),
        })?;
        let publish = async {
            self.js
                .publish(push_subject(user), Bytes::from(payload))
                .await
                .map_err(nats("sharing a push entry"))?
                .await
                .map_err(nats("JetStream's ack of a push entry"))
        };
        self.while_linked(publish)
            .await
            .unwrap_or(Err(ClusterError::NotConnected))
            .map(|_| ())
    }

    /// Keeps `pusher`'s book in step with every relay's registrations: the
    /// last entry of each user from [`PUSH`], then each change as it comes;
    /// again from the start after every lost link.
    pub fn mirror_push(
        self: &Arc<Self>,
        pusher: Arc<crate::push::Pusher>,
        stop: CancellationToken,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut link = me.link.subscribe();
            let mut waits = codec::retry::Backoff {
                min: Duration::from_millis(200),
                max: Duration::from_secs(5),
            }
            .attempts();
            loop {
                tokio::select! {
                    r = link.wait_for(|s| s.up) => if r.is_err() { return },
                    () = stop.cancelled() => return,
                }
                let read = me.while_linked(me.follow_push(&pusher, &mut waits));
                tokio::select! {
                    r = read => {
                        if let Some(Err(e)) = r {
                            debug!(error = %e, "cluster: push entries not followed; again shortly");
                        }
                    }
                    () = stop.cancelled() => return,
                }
                tokio::time::sleep(waits.next(rand::random())).await;
            }
        });
    }

    async fn follow_push(
        &self,
        pusher: &crate::push::Pusher,
        waits: &mut codec::retry::Attempts,
    ) -> Result<(), ClusterError> {
        use consumer::{DeliverPolicy, push};
        let consumer = self
            .push
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: "ptt.push.>".into(),
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(nats("following push entries"))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(nats("following push entries"))?;
        waits.reset();
        while let Some(m) = messages.next().await {
            let m = m.map_err(nats("following push entries"))?;
            match serde_json::from_slice::<crate::push::book::Record>(&m.payload) {
                Ok(r @ crate::push::book::Record::User { .. }) => pusher.apply_shared(r).await,
                _ => warn!(subject = %m.subject, "cluster: unreadable push entry skipped"),
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl crate::push::PushCluster for Cluster {
    /// Asks on the user's subject: a relay with a session of the user
    /// answers; "no responders" (or no answer) means nowhere. Cut off, the
    /// relay cannot tell and pushes (a woken phone finds itself connected).
    async fn present(&self, user: &str) -> bool {
        if !self.connected() {
            return false;
        }
        let ask = self
            .client
            .request(user_subject(user), Relayed::Present.encode());
        matches!(
            tokio::time::timeout(Duration::from_millis(500), ask).await,
            Ok(Ok(_))
        )
    }

    /// Takes the push of `device` for `clip` for this relay: the first
    /// relay to write it to [`PUSHED`] (message id = clip and device)
    /// pushes; a duplicate means another did. Cut off: this relay pushes.
    async fn first_push(&self, clip: ClipId, device: &str) -> bool {
        let h = ring::digest::digest(&ring::digest::SHA256, device.as_bytes());
        let key: String = h.as_ref()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let msg = jetstream::message::PublishMessage::build()
            .payload(Bytes::new())
            .message_id(format!("{}-{key}", clip.to_hex()));
        let publish = async {
            self.js
                .send_publish(format!("ptt.pushed.{}", clip.to_hex()), msg)
                .await
                .map_err(nats("claiming a push"))?
                .await
                .map_err(nats("claiming a push"))
        };
        match self.while_linked(publish).await {
            Some(Ok(ack)) => !ack.duplicate,
            _ => true,
        }
    }

    /// Writes the user's whole entry for every relay (held while cut off).
    async fn share(&self, user: &str, entry: crate::push::book::Record) {
        if self.put_push(user, &entry).await.is_err()
            && let Ok(mut h) = self.push_unshared.lock()
        {
            h.insert(user.to_owned(), entry);
        }
    }
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
        let h = FloorHolder {
            priority: true,
            relay: 0x0123_4567_89ab_cdef,
            clip: ClipId([0xa5; 16]),
            user: "dispatch desk 1".into(),
        };
        assert_eq!(FloorHolder::decode(&h.encode()), Some(h));
        for junk in [
            &b""[..],
            b"2 00 00 u",
            b"1 zz a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5 u",
            b"0 01 a5a5 u",
            b"0 01 a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5",
            b"\xff\xfe",
        ] {
            assert_eq!(FloorHolder::decode(junk), None, "{junk:?}");
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
        assert_eq!(
            catch_up_target(&store_subject("bob.smith")),
            Some(CaughtUp::User("bob.smith".into()))
        );
        assert_eq!(
            catch_up_target(&history_subject("ops")),
            Some(CaughtUp::Channel("ops".into()))
        );
        assert_eq!(catch_up_target(&floor_subject("ops")), None);
        assert_eq!(catch_up_target("ptt.store.zz"), None);
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
