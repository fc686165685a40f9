//! Several relays as one service, over NATS (`--cluster nats://...`).
//!
//! Subjects (tokens are hex of the name, [`codec::cluster::subject_token`]):
//!
//! - `ptt.u.<user>`: live clips for a user; a relay subscribes while the
//!   user is connected to it.
//! - `ptt.c.<channel>`: live clips of a talk channel; a relay subscribes
//!   while at least one member is connected to it.
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
//! run of packet records as it arrives, then `End` or `Cut`
//! ([`codec::cluster::Relayed`]). A receiving relay rebuilds the live clip
//! (validating the records again), offers it to its own connected
//! recipients, and when it ends stores it for them (so a slow or
//! disconnected recipient still gets it from that relay's store) and keeps
//! it in the channel's history. When a recipient acks a direct clip, its
//! relay tells the origin, which drops its stored copy. Accepted clips are
//! also kept in JetStream before the sender hears `Accepted`, so the relay
//! a recipient connects to delivers them even after their origin died. A
//! relay cut off from NATS keeps serving its own users and writes what it
//! accepted meanwhile to JetStream when the link is back.
//! `docs/cluster.md` has the design and what each failure loses.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use codec::cluster::{Relayed, subject_token};
use codec::wire::{ClipId, Target};
use codec::{ErrorCode, Framer, Message};
use dashmap::DashMap;
use futures_util::StreamExt;
use tracing::{debug, info, warn};

use crate::live::{LiveClip, Next};
use crate::metrics;
use crate::state::{Session, Shared};
use crate::store::{Appended, ClipMeta, StoredClip};

/// A clip arriving from another relay.
struct Remote {
    live: Arc<LiveClip>,
    framer: Framer,
    /// This relay's users it was offered to (stored for them at the end).
    recipients: Vec<Arc<str>>,
    channel: Option<String>,
    last: Instant,
}

struct Sub {
    users: usize,
    task: tokio::task::AbortHandle,
    ready: Arc<AtomicBool>,
}

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
    stream: async_nats::jetstream::stream::Stream,
    js: async_nats::jetstream::Context,
    floors: async_nats::jetstream::stream::Stream,
    history: async_nats::jetstream::stream::Stream,
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
    connected: Arc<AtomicBool>,
    /// Channel clips not yet in the cluster history (accepted while cut
    /// off), oldest first, at most `backlog_max` (`cluster_backlog_clips`).
    unkept_history: Mutex<std::collections::VecDeque<(String, Arc<StoredClip>)>>,
    backlog_max: usize,
    /// Connections made to NATS so far (each one after an outage).
    links: Arc<std::sync::atomic::AtomicU64>,
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

pub use crate::error::{BoxError, ClusterError};

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

impl Cluster {
    /// Connects to the NATS servers in `urls` (comma-separated), retrying
    /// in the background if none answers yet, and opens (or creates) the
    /// JetStream stream of stored clips.
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
        let connected = Arc::new(AtomicBool::new(false));
        let links = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let flag = connected.clone();
        let count = links.clone();
        let client = async_nats::ConnectOptions::new()
            .name("ptt-relay")
            // Our own channel publications do not come back to us.
            .no_echo()
            .retry_on_initial_connect()
            .event_callback(move |e| {
                let (flag, count) = (flag.clone(), count.clone());
                async move {
                    match e {
                        async_nats::Event::Connected => {
                            info!("cluster: connected to NATS");
                            count.fetch_add(1, Ordering::SeqCst);
                            flag.store(true, Ordering::SeqCst);
                        }
                        async_nats::Event::Disconnected => {
                            warn!(
                                "cluster: lost NATS; cross-relay delivery stops until it is back"
                            );
                            flag.store(false, Ordering::SeqCst);
                        }
                        other => debug!(event = %other, "cluster event"),
                    }
                }
            })
            .connect(addrs)
            .await
            .map_err(nats("connecting to the cluster's NATS"))?;
        if client.connection_state() == async_nats::connection::State::Connected {
            connected.store(true, Ordering::SeqCst);
        }
        let js = async_nats::jetstream::new(client.clone());
        use async_nats::jetstream::stream;
        let stream = js
            .get_or_create_stream(stream::Config {
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
            })
            .await
            .map_err(nats(format!(
                "opening JetStream stream {STREAM} (is nats-server running with -js?)"
            )))?;
        let floors = js
            .get_or_create_stream(stream::Config {
                name: FLOORS.into(),
                subjects: vec!["ptt.floor.>".into()],
                max_messages_per_subject: 1,
                // A floor whose relay died goes after the longest clip.
                max_age: cfg.max_clip_duration + cfg.max_upload_lag + Duration::from_secs(10),
                storage: stream::StorageType::Memory,
                num_replicas: cfg.cluster_replicas,
                ..Default::default()
            })
            .await
            .map_err(nats(format!("opening JetStream stream {FLOORS}")))?;
        let history = js
            .get_or_create_stream(stream::Config {
                name: HISTORY.into(),
                subjects: vec!["ptt.hist.>".into()],
                max_messages_per_subject: i64::try_from(cfg.channel_history_depth.max(1))
                    .unwrap_or(i64::MAX),
                max_age: cfg.channel_history_age,
                duplicate_window: cfg.dedupe_window.min(cfg.channel_history_age),
                storage: stream::StorageType::File,
                num_replicas: cfg.cluster_replicas,
                ..Default::default()
            })
            .await
            .map_err(nats(format!("opening JetStream stream {HISTORY}")))?;
        Ok(Arc::new(Cluster {
            history,
            js,
            client,
            stream,
            floors,
            kept: DashMap::new(),
            id: rand::random(),
            subs: Mutex::new(HashMap::new()),
            remote: DashMap::new(),
            acks_to: DashMap::new(),
            connected,
            links,
            unkept_history: Mutex::new(std::collections::VecDeque::new()),
            backlog_max: cfg.cluster_backlog_clips,
        }))
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Starts listening for acks of the clips this relay accepted, and
    /// sweeping relayed clips that went silent.
    pub fn start(self: &Arc<Self>, shared: &Arc<Shared>) {
        self.want(shared, relay_subject(self.id));
        let me = self.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            // The link (connection count) whose backfill is done.
            let mut done = None;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = shared.shutdown.cancelled() => return,
                }
                me.sweep(shared.config.upload_idle_timeout, shared.config.clip_ttl);
                // At the first link and after every outage: what this
                // relay holds undelivered goes (again) to JetStream.
                let link = me.links.load(Ordering::SeqCst);
                if me.connected() && done != Some(link) && me.backfill(&shared).await {
                    done = Some(link);
                }
            }
        });
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
                me.handle(&shared, &msg.payload).await;
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
    /// clip and subject).
    pub fn forward(self: &Arc<Self>, shared: &Arc<Shared>, live: Arc<LiveClip>, subject: String) {
        metrics::count(metrics::CLUSTER_CLIPS, "direction", "out");
        let me = self.clone();
        shared.tracker.spawn(async move {
            let clip = live.meta.id;
            let start = Relayed::Start {
                clip,
                origin: me.id,
                header: live.header.clone(),
            };
            if me.publish(&subject, start).await.is_err() {
                return;
            }
            let mut reader = live.reader();
            loop {
                let (payload, last) = match reader.next().await {
                    // Encoded straight from the segments: one copy.
                    Next::Data(b) => (Relayed::encode_data(clip, b.packets as u32, &b.segs), false),
                    Next::Complete(c) => (Relayed::End { clip, end: c.end }.encode(), true),
                    Next::Cut(code) => (Relayed::Cut { clip, code }.encode(), true),
                };
                if me.publish_bytes(&subject, payload).await.is_err() || last {
                    return;
                }
            }
        });
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
        // Cut off: fail at once (the relay then decides alone) instead of
        // holding the talker for JetStream's timeout.
        if !self.connected() {
            return Err(ClusterError::NotConnected);
        }
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
        let msg = async_nats::jetstream::message::PublishMessage::build()
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
    pub async fn release_floor(&self, seq: u64) {
        // Cut off, the floor expires with the stream's max_age.
        if self.connected() {
            let _ = self.floors.delete_message(seq).await;
        }
    }

    /// Keeps an accepted direct clip in JetStream for `recipient`, so any
    /// relay can deliver it (and it outlives this one). Returns once
    /// JetStream has it (its publish ack). With `elsewhere` (the recipient
    /// is not connected here) the relay it is connected to is told, so it
    /// queues the clip even if it missed the live run.
    pub async fn keep(
        &self,
        clip: &StoredClip,
        recipient: &Arc<str>,
        elsewhere: bool,
    ) -> Result<(), ClusterError> {
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
                recipient: recipient.to_string(),
            };
            let _ = self.publish(&user_subject(recipient), kept).await;
        }
        Ok(())
    }

    /// Keeps in JetStream every undelivered direct clip of this relay's
    /// store that it has not kept there yet (clips accepted while NATS
    /// was unreachable, and after a restart everything: JetStream's
    /// message-id window answers a clip it has with its sequence), and
    /// the channel clips accepted while cut off (in memory: after a
    /// restart those are in this relay's own history only).
    async fn backfill(&self, shared: &Shared) -> bool {
        let mut n = 0u64;
        // Channel clips first (oldest first): a member who connects
        // elsewhere during the backfill finds them at its next connect.
        loop {
            let next = self
                .unkept_history
                .lock()
                .ok()
                .and_then(|mut q| q.pop_front());
            let Some((channel, clip)) = next else { break };
            if let Err(e) = self.put_history(&channel, &clip).await {
                if let Ok(mut q) = self.unkept_history.lock() {
                    q.push_front((channel, clip));
                }
                warn!(error = %e, "cluster: backfill stopped; tried again shortly");
                return false;
            }
            n += 1;
        }
        for (recipient, clip) in shared.cache.pending_direct() {
            if self.kept.contains_key(&(recipient.clone(), clip.meta.id)) {
                continue;
            }
            let elsewhere = !shared.router.is_online(&recipient);
            if let Err(e) = self.keep(&clip, &recipient, elsewhere).await {
                warn!(error = %e, "cluster: backfill stopped; tried again shortly");
                return false;
            }
            n += 1;
        }
        if n > 0 {
            info!(
                clips = n,
                "cluster: clips kept in JetStream after the link came back"
            );
        }
        true
    }

    /// A clip was kept for `user`, connected here: queue it from the
    /// stream, unless it came here live (then this relay has it, and may
    /// have delivered it already).
    async fn kept_for(&self, shared: &Shared, user: &str, clip: ClipId, seq: u64) {
        let Some(session) = shared.router.session(user) else {
            return;
        };
        if known(shared, &clip).await {
            return;
        }
        let m = match self.stream.get_raw_message(seq).await {
            Ok(m) => m,
            // Delivered and deleted already.
            Err(_) => return,
        };
        let Some(clip) = StoredClip::from_record(&m.payload) else {
            warn!(seq, "cluster: unreadable stored clip skipped");
            return;
        };
        self.kept
            .insert((session.user.clone(), clip.meta.id), (seq, Instant::now()));
        // Unknown here (checked above, before the fetch).
        if shared
            .cache
            .queue_cached(session.user.clone(), Arc::new(clip))
        {
            session.store_changed();
        }
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

    async fn load_for(&self, shared: &Shared, session: &Session) {
        // Subscribed first: a clip kept after the read below is announced
        // on the user's subject (`Kept`).
        if !self
            .subscribed(&user_subject(&session.user), Duration::from_secs(5))
            .await
        {
            warn!(user = %session.user, "cluster: subscription not confirmed");
        }
        // JetStream may be electing a leader (a NATS node just died): try
        // a few times over ~15 s.
        for attempt in 1..=10u32 {
            let loaded = match self.load_kept(shared, &session.user).await {
                Ok(n) => self
                    .load_history(shared, &session.user, session.channels.keys())
                    .await
                    .map(|h| n + h),
                Err(e) => Err(e),
            };
            match loaded {
                Ok(n) => {
                    if n > 0 {
                        session.store_changed();
                    }
                    return;
                }
                Err(e) => {
                    warn!(error = %e, attempt, "cluster: stored clips not loaded yet");
                    if session.conn.close_reason().is_some() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(300 * u64::from(attempt))).await;
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

    /// Keeps an accepted channel clip in the cluster's channel history, so
    /// members who were offline get it from any relay; cut off, it waits
    /// for the next link (see [`Cluster::backfill`]).
    pub async fn keep_history(
        &self,
        channel: &str,
        clip: &Arc<StoredClip>,
    ) -> Result<(), ClusterError> {
        let r = self.put_history(channel, clip).await;
        if r.is_err()
            && let Ok(mut q) = self.unkept_history.lock()
        {
            push_bounded(&mut q, (channel.to_owned(), clip.clone()), self.backlog_max);
        }
        r
    }

    async fn put_history(&self, channel: &str, clip: &StoredClip) -> Result<(), ClusterError> {
        self.publish_clip(history_subject(channel), clip).await?;
        Ok(())
    }

    /// Publishes a stored clip to a JetStream subject, its id as the
    /// message id (a clip JetStream has is not stored twice), and waits for
    /// JetStream's ack. Cut off, fails at once instead of holding the
    /// caller for JetStream's timeout.
    async fn publish_clip(
        &self,
        subject: String,
        clip: &StoredClip,
    ) -> Result<async_nats::jetstream::publish::PublishAck, ClusterError> {
        if !self.connected() {
            return Err(ClusterError::NotConnected);
        }
        let msg = async_nats::jetstream::message::PublishMessage::build()
            .payload(Bytes::from(clip.to_record()))
            .message_id(clip.meta.id.to_hex());
        self.js
            .send_publish(subject, msg)
            .await
            .map_err(nats("publishing a clip to JetStream"))?
            .await
            .map_err(nats("JetStream's ack of a clip"))
    }

    /// Queues for `user` the clips of `channels`' cluster history this
    /// relay does not know (said on other relays while the user was away),
    /// oldest first; returns how many.
    async fn load_history(
        &self,
        shared: &Shared,
        user: &Arc<str>,
        channels: impl Iterator<Item = &String>,
    ) -> Result<usize, ClusterError> {
        let mut new = 0;
        for ch in channels {
            for (_, clip) in self.read_all(&self.history, history_subject(ch)).await? {
                if clip.meta.sender != *user && queue_if_new(shared, user, clip).await {
                    new += 1;
                }
            }
        }
        Ok(new)
    }

    /// Every clip on `subject` of `stream`, in order, with its sequence.
    async fn read_all(
        &self,
        stream: &async_nats::jetstream::stream::Stream,
        subject: String,
    ) -> Result<Vec<(u64, StoredClip)>, ClusterError> {
        use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
        let consumer = stream
            .create_consumer(pull::Config {
                filter_subject: subject,
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .map_err(nats("reading a JetStream stream"))?;
        let mut left = consumer.cached_info().num_pending;
        let mut out = Vec::new();
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
                match StoredClip::from_record(&m.payload) {
                    Some(c) => out.push((seq, c)),
                    None => warn!(seq, "cluster: unreadable stored clip skipped"),
                }
            }
            if got == 0 {
                break;
            }
            left = left.saturating_sub(got);
        }
        Ok(out)
    }

    /// Loads what JetStream holds for `user` into this relay's store (in
    /// memory: JetStream keeps it durably); returns how many were new here.
    async fn load_kept(&self, shared: &Shared, user: &Arc<str>) -> Result<usize, ClusterError> {
        let mut new = 0;
        for (seq, clip) in self.read_all(&self.stream, store_subject(user)).await? {
            let id = clip.meta.id;
            self.kept.insert((user.clone(), id), (seq, Instant::now()));
            if queue_if_new(shared, user, clip).await {
                new += 1;
            }
        }
        Ok(new)
    }

    /// A local recipient acked `clip`: JetStream's copy for it goes; if it
    /// came live from another relay as a direct clip, that relay drops its
    /// stored copy too.
    pub async fn acked(&self, clip: &ClipId, recipient: &Arc<str>) {
        if let Some((_, (seq, _))) = self.kept.remove(&(recipient.clone(), *clip)) {
            self.delete_kept(seq).await;
        }
        if let Some((_, (origin, _))) = self.acks_to.remove(clip) {
            let ack = Relayed::Ack {
                clip: *clip,
                recipient: recipient.to_string(),
            };
            let _ = self.publish(&relay_subject(origin), ack).await;
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

    /// Handles one message from another relay.
    /// Start, Data and Cut are handled inline (in order, no waiting);
    /// what waits on the store or JetStream (End, Ack, Kept) runs beside,
    /// so the next clip on this subject is not held behind a disk sync.
    async fn handle(self: &Arc<Self>, shared: &Arc<Shared>, payload: &Bytes) {
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
                packets,
                records,
            } => {
                let Some(mut r) = self.remote.get_mut(&clip) else {
                    return;
                };
                r.last = Instant::now();
                let ok = r
                    .framer
                    .scan(&records)
                    .is_ok_and(|s| s.records == records.len() && s.end.is_none());
                if ok {
                    if let Err(e) = r.live.push(records, u64::from(packets)) {
                        warn!(clip = %clip, error = %e, "cluster: relayed clip lost");
                        r.live.cut(ErrorCode::Internal);
                    }
                } else {
                    drop(r);
                    warn!(clip = %clip, "cluster: bad packet records; clip cut");
                    let _ = self.cut(&clip, ErrorCode::CutOff);
                }
            }
            Relayed::End { clip, end } => {
                // Taken now, so a late Data for it finds nothing.
                let Some((_, r)) = self.remote.remove(&clip) else {
                    return;
                };
                let (me, shared2) = (self.clone(), shared.clone());
                shared
                    .tracker
                    .spawn(async move { me.ended(&shared2, r, end).await });
            }
            Relayed::Cut { clip, code } => {
                if !self.cut(&clip, code) && code == ErrorCode::Preempted {
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
                    me.acked(&clip, &Arc::from(recipient)).await;
                });
            }
            Relayed::Kept {
                clip,
                seq,
                recipient,
            } => {
                // Its live run is arriving here: that path delivers and
                // stores it (and may be done before a task could look).
                if self.remote.contains_key(&clip) {
                    return;
                }
                let (me, shared2) = (self.clone(), shared.clone());
                shared.tracker.spawn(async move {
                    me.kept_for(&shared2, &recipient, clip, seq).await;
                });
            }
        }
    }

    fn started(&self, shared: &Arc<Shared>, clip: ClipId, origin: u64, header: &[u8]) {
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
                recipients,
                channel,
                last: Instant::now(),
            },
        );
    }

    async fn ended(&self, shared: &Arc<Shared>, r: Remote, end: codec::ClipEnd) {
        let clip = r.live.meta.id;
        let body = match r.live.body() {
            Ok(b) => b,
            Err(e) => {
                warn!(clip = %clip, error = %e, "cluster: relayed clip lost");
                return r.live.cut(ErrorCode::Internal);
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
    fn cut(&self, clip: &ClipId, code: ErrorCode) -> bool {
        match self.remote.remove(clip) {
            Some((_, r)) => {
                r.live.cut(code);
                self.acks_to.remove(clip);
                true
            }
            None => false,
        }
    }

    /// Cuts relayed clips that went silent (their origin died or NATS was
    /// lost mid-clip) and forgets ack routes older than `ttl`.
    pub fn sweep(&self, idle: Duration, ttl: Duration) {
        let quiet: Vec<ClipId> = self
            .remote
            .iter()
            .filter(|r| r.last.elapsed() > idle)
            .map(|r| *r.key())
            .collect();
        for c in quiet {
            let _ = self.cut(&c, ErrorCode::CutOff);
        }
        self.acks_to.retain(|_, (_, at)| at.elapsed() < ttl);
        self.kept.retain(|_, (_, at)| at.elapsed() < ttl);
    }
}

/// Appends `item`, first dropping the oldest entries past `max` (at least
/// the newest is kept).
fn push_bounded<T>(q: &mut std::collections::VecDeque<T>, item: T, max: usize) {
    while q.len() >= max.max(1) {
        q.pop_front();
    }
    q.push_back(item);
}

/// Whether this relay knows clip `id` (accepted here, relayed here, or
/// cached before).
async fn known(shared: &Shared, id: &ClipId) -> bool {
    matches!(shared.store.sender_of(id).await, Ok(Some(_)))
}

/// Queues a clip read from JetStream for `user`, unless this relay knows
/// it: then its own copy, if still owed, delivers it, and queueing it again
/// could repeat a delivered clip. True if queued.
async fn queue_if_new(shared: &Shared, user: &Arc<str>, clip: StoredClip) -> bool {
    !known(shared, &clip.meta.id).await && shared.cache.queue_cached(user.clone(), Arc::new(clip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_keeps_the_newest_up_to_its_bound() {
        let mut q = std::collections::VecDeque::new();
        for i in 0..10 {
            push_bounded(&mut q, i, 3);
        }
        assert_eq!(q, [7, 8, 9]);
        push_bounded(&mut q, 10, 0);
        assert_eq!(q, [10]);
    }

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
}
