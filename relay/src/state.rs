//! What every connection task shares: the sessions (`Session`), uploads
//! in progress, channel history, and the step that follows storing a new
//! clip. The connection logic (`conn/`) and the cluster link
//! (`cluster/`) both build on this module; it depends on neither: what the
//! relay asks of its cluster link is the trait [`ClusterLink`], which
//! `cluster/` carries out.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use codec::ErrorCode;
use codec::token::{Claims, PublicKeys, Right, TokenError, TokenKey, Verifier};
use codec::wire::{ClipId, Message, Target};
use quinn::{Connection, SendStream};
use relay_core::hash::DashMap;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::config::{Config, StoreKind};
use crate::error::ClusterError;
use crate::live::LiveClip;
use crate::store::{ClipStore, ClusterCache, StoredClip};
use relay_core::refusal::Refusal;
use relay_core::upload::Begin;

/// State every connection task shares.
pub struct Shared {
    pub config: Config,
    pub(crate) key: TokenKey,
    /// Public keys for EdDSA and ES256 tokens (`token_keys`), reloaded.
    public_keys: std::sync::RwLock<Arc<PublicKeys>>,
    pub store: Arc<dyn ClipStore>,
    /// The same store, as the cluster uses it.
    pub(crate) cache: Arc<dyn ClusterCache>,
    /// Sessions by user, channel members and floors (`router.rs`).
    pub router: Router,
    uploads: relay_core::upload::Uploads<Stop>,
    next_id: AtomicU64,
    pub(crate) connections: AtomicUsize,
    /// Connections handshaking or waiting for `Auth`.
    pub(crate) unauthenticated: AtomicUsize,
    pub(crate) ready: AtomicBool,
    /// Shutting down: new handshakes are refused.
    pub(crate) draining: AtomicBool,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tracker: TaskTracker,
    /// Test-only delivery faults (feature `fault-injection`).
    pub faults: crate::faults::Faults,
    /// Per-user clip budgets (`max_clips_per_minute`, bytes per minute).
    pub(crate) budgets: DashMap<Arc<str>, relay_core::limits::UserBudget>,
    /// New handshakes per second.
    handshakes: std::sync::Mutex<relay_core::limits::Bucket>,
    /// Bytes of clips being uploaded now.
    pub inflight: AtomicU64,
    /// Recent clips of each channel, for members who were offline.
    pub(crate) history: DashMap<String, History>,
    /// Clips being spoken now (joined live by sessions that start).
    pub(crate) speaking: Speaking,
    /// The history entries each (user, channel) has been given (recent
    /// ones; bounded by the history depth).
    pub(crate) history_seen: relay_core::history::Seen,
    /// Where members' history cursors are kept (disk store only).
    pub(crate) cursors: Option<std::path::PathBuf>,
    /// Each user's data use per day.
    pub usage: crate::usage::UsageBook,
    /// Where the usage book is kept (disk store only).
    pub(crate) usage_file: Option<std::path::PathBuf>,
    /// Copies dropped at `clip_ttl` unacked, until each user's client acks
    /// its `Expired` notices.
    pub expired: crate::expired::ExpiredBook,
    /// Where the notices are kept (disk store only).
    pub(crate) expired_file: Option<std::path::PathBuf>,
    /// The link to the other relays (`--cluster`); `None` for a relay on
    /// its own.
    pub(crate) cluster: Option<Box<dyn ClusterLink>>,
    /// Push registrations, and the pushes that wake sleeping devices.
    pub(crate) push: Arc<crate::push::Pusher>,
}

/// What the relay asks of its cluster link (`cluster/` answers; a trait so
/// that the link can build on this module without this module naming it).
/// None of these waits on NATS longer than the link is up: cut off, the
/// link holds what it must write and answers at once.
pub(crate) trait ClusterLink: Send + Sync {
    /// Whether the link to NATS is up now.
    fn connected(&self) -> bool;
    /// Clips accepted here that the cluster does not have yet.
    fn held(&self) -> usize;
    /// A session starts: the subjects of its user and channels are wanted
    /// here (returned, to give back at its end).
    fn join(&self, shared: &Arc<Shared>, session: &Arc<Session>) -> Vec<String>;
    /// A session ends: it no longer wants `subject`.
    fn unwant(&self, subject: &str);
    /// A live clip for a user not online here, or for a channel's members
    /// on other relays: published once for them.
    fn forward(&self, shared: &Arc<Shared>, live: Arc<LiveClip>, to: To<'_>);
    /// Takes `channel`'s floor cluster-wide for `user`'s clip `clip`.
    fn take_floor<'a>(
        &'a self,
        channel: &'a str,
        user: &'a str,
        clip: ClipId,
        priority: bool,
    ) -> BoxFuture<'a, Result<ClusterFloor, ClusterError>>;
    /// Gives back `channel`'s floor taken at this sequence.
    fn release_floor(&self, channel: &str, seq: u64);
    /// Keeps an accepted direct clip for `recipient` in the cluster
    /// (`elsewhere`: not online here, so its relay is told), unless the
    /// recipient, hearing it live here, acks it first.
    fn keep<'a>(
        &'a self,
        shared: &'a Shared,
        clip: &'a StoredClip,
        recipient: &'a Arc<str>,
        elsewhere: bool,
    ) -> BoxFuture<'a, Result<(), ClusterError>>;
    /// Keeps an accepted channel clip in the cluster's channel history.
    fn keep_history<'a>(
        &'a self,
        channel: &'a str,
        clip: &'a Arc<StoredClip>,
    ) -> BoxFuture<'a, Result<(), ClusterError>>;
    /// A recipient here acked `clip` (never waits).
    fn acked(&self, clip: &ClipId, recipient: &Arc<str>);
}

/// Whom a live clip is forwarded to through the cluster.
#[derive(Debug, Clone, Copy)]
pub(crate) enum To<'a> {
    /// A user who may be online on another relay.
    User(&'a str),
    /// A channel's members on other relays.
    Channel(&'a str),
}

/// What the cluster said to a talker asking for a channel's floor.
#[derive(Debug)]
pub(crate) enum ClusterFloor {
    /// Taken, at this stream sequence (released with it).
    Granted { seq: u64 },
    /// Held by someone else (this user).
    Busy { holder: String },
}

/// Clips being spoken now, by whom they are for: a session that starts
/// while one is spoken (a phone woken by its push) joins it live, from its
/// first packet, instead of waiting for it to be stored.
#[derive(Default)]
pub struct Speaking {
    by_target: DashMap<Target, Vec<Arc<LiveClip>>>,
}

impl Speaking {
    /// `clip` started.
    pub fn begin(&self, clip: &Arc<LiveClip>) {
        self.by_target
            .entry(clip.meta.target.clone())
            .or_default()
            .push(clip.clone());
    }

    /// `clip` ended (stored or cut).
    pub fn end(&self, clip: &LiveClip) {
        self.by_target.remove_if_mut(&clip.meta.target, |_, v| {
            v.retain(|c| c.meta.id != clip.meta.id);
            v.is_empty()
        });
    }

    /// The clips being spoken to `user` or in `channels`, not by `user`.
    pub fn for_session<'a>(
        &self,
        user: &str,
        channels: impl Iterator<Item = &'a String>,
    ) -> Vec<Arc<LiveClip>> {
        let keys = std::iter::once(Target::User(user.to_owned()))
            .chain(channels.map(|c| Target::Channel(c.clone())));
        let mut out = Vec::new();
        for k in keys {
            if let Some(v) = self.by_target.get(&k) {
                out.extend(v.iter().filter(|c| &*c.meta.sender != user).cloned());
            }
        }
        out
    }
}

/// A channel's recent clips (the rule: `relay_core::history`).
pub type History = relay_core::history::History<Arc<StoredClip>>;

impl relay_core::history::Aged for StoredClip {
    fn id(&self) -> ClipId {
        self.meta.id
    }

    fn created_ms(&self) -> u64 {
        self.meta.created_ms
    }
}

/// The relay's router: sessions are `Arc<Session>`, a floor holder is
/// stopped through its upload's `Stop`.
pub type Router = relay_core::router::Router<Arc<Session>, Stop>;

impl relay_core::router::Member for Session {
    fn session_id(&self) -> u64 {
        self.id
    }

    fn user(&self) -> &Arc<str> {
        &self.user
    }
}

impl Shared {
    /// The state of a relay starting with `config`, its token secret and
    /// public keys, and its store (as the sessions and the cluster use it).
    pub(crate) fn new(
        config: Config,
        key: TokenKey,
        public_keys: PublicKeys,
        store: Arc<dyn ClipStore>,
        cache: Arc<dyn ClusterCache>,
        cluster: Option<Box<dyn ClusterLink>>,
        push: Arc<crate::push::Pusher>,
    ) -> Shared {
        Shared {
            cluster,
            push,
            key,
            public_keys: std::sync::RwLock::new(Arc::new(public_keys)),
            store,
            cache,
            router: Router::default(),
            uploads: Default::default(),
            next_id: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
            unauthenticated: AtomicUsize::new(0),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            faults: crate::faults::Faults::default(),
            budgets: DashMap::default(),
            handshakes: std::sync::Mutex::new(relay_core::limits::Bucket::new(
                f64::from(config.max_handshakes_per_second.max(1)),
                Duration::from_secs(1),
                std::time::Instant::now(),
            )),
            inflight: AtomicU64::new(0),
            history: DashMap::default(),
            speaking: Speaking::default(),
            history_seen: relay_core::history::Seen::new(config.channel_history_depth),
            cursors: (config.store == StoreKind::Disk)
                .then(|| crate::cursors::path(&config.data_dir)),
            usage: crate::usage::UsageBook::new(config.usage_days, config.usage_max_users),
            usage_file: (config.store == StoreKind::Disk)
                .then(|| crate::usage::path(&config.data_dir)),
            expired: crate::expired::ExpiredBook::new(config.expired_notices_per_user),
            expired_file: (config.store == StoreKind::Disk)
                .then(|| crate::expired::path(&config.data_dir)),
            config,
        }
    }

    /// Replaces the public keys tokens are checked against.
    pub fn set_public_keys(&self, keys: PublicKeys) {
        *self
            .public_keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
    }

    /// Whether a new handshake fits the rate.
    pub fn handshake_allowed(&self) -> bool {
        if self.config.max_handshakes_per_second == 0 {
            return true;
        }
        self.handshakes
            .lock()
            .map(|mut b| b.take(1.0, std::time::Instant::now()).is_ok())
            .unwrap_or(true)
    }

    /// The public keys tokens are checked against now.
    pub fn public_keys(&self) -> Arc<PublicKeys> {
        // The lock only guards swapping one `Arc` for another, which cannot
        // be left half done: a poisoned lock still holds a whole key set.
        self.public_keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Checks a token: HS256 with the secret (unless `token_hs256` is
    /// off), EdDSA or ES256 with the public key its `kid` names.
    pub fn verify_token(&self, token: &str) -> Result<Claims, TokenError> {
        let public = self.public_keys();
        Verifier {
            secret: self.config.token_hs256.then_some(&self.key),
            public: &public,
            leeway: self.config.token_leeway,
        }
        .verify(token)
    }

    pub fn next_session_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Offers a starting clip live to each of `recipients` with a session
    /// here (one whose queue is full gets it from the store instead);
    /// `elsewhere` is told of each without one. The one live fan-out, for
    /// this relay's uploads and for other relays' clips.
    pub fn offer_live(
        &self,
        live: &Arc<LiveClip>,
        recipients: &[Arc<str>],
        mut elsewhere: impl FnMut(&Arc<str>),
    ) {
        for r in recipients {
            match self.router.session(r) {
                Some(s) if !s.offer_live(live.clone()) => {
                    crate::metrics::hot().live_fallbacks.increment(1);
                    tracing::debug!(recipient = %r, "live queue full; recipient gets the clip from the store");
                }
                Some(_) => {}
                None => elsewhere(r),
            }
        }
    }

    /// Registers an upload of `id` by `sender`. A running upload of the same
    /// id by the same sender is a stale attempt (its connection is dying):
    /// it is stopped and this one takes over. `None` if another sender
    /// holds the id.
    pub fn begin_upload(&self, id: ClipId, sender: &Arc<str>) -> Option<(u64, Stop)> {
        let (upload_no, stop) = (self.next_session_id(), Stop::default());
        match self.uploads.begin(id, sender, upload_no, stop.clone()) {
            Begin::Started => {}
            Begin::TookOver(old) => old.refuse(Refusal::superseded()),
            Begin::Conflict => return None,
        }
        Some((upload_no, stop))
    }

    /// Stops the running upload of `id`, if any (a priority talker on
    /// another relay took its floor).
    pub fn stop_upload(&self, id: &ClipId, code: ErrorCode, reason: &str) {
        if let Some(stop) = self.uploads.stop_of(id) {
            stop.stop(code, reason);
        }
    }

    pub fn end_upload(&self, id: ClipId, upload_no: u64) {
        self.uploads.end(id, upload_no);
    }
}

/// Why a message did not go out on a session's control stream: the
/// session is ending either way (log it at debug and go on).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the control stream was given up (GoAway)")]
    GivenUp,
    #[error("writing on the control stream: {0}")]
    Write(#[from] quinn::WriteError),
}

/// Counts a connection as not yet authenticated while it lives.
pub struct Unauthenticated(pub Arc<Shared>);

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        self.0.unauthenticated.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connected user, as the router sees it.
pub struct Session {
    pub id: u64,
    pub user: Arc<str>,
    pub conn: Connection,
    /// Native ptt/1 or inside WebTransport.
    pub link: crate::webtransport::Link,
    live_tx: mpsc::Sender<Arc<LiveClip>>,
    /// The store has new clips for this user.
    pub(crate) dirty: Notify,
    /// An ack freed room in the delivery window.
    pub(crate) window: Notify,
    deliveries: Mutex<relay_core::deliver::Deliveries>,
    /// The relay's side of the control stream, for `GoAway`.
    control: tokio::sync::Mutex<Option<SendStream>>,
    /// Talk channels from the token, with the right in each.
    pub channels: std::collections::BTreeMap<String, Right>,
    /// The connection's byte counters as last added to the usage book.
    usage: Mutex<crate::usage::Sampler>,
}

impl Session {
    /// A session for `user` on `conn`, with its queue of live clips to
    /// start and the control stream's send side (kept for `GoAway`).
    pub fn new(
        id: u64,
        user: Arc<str>,
        conn: Connection,
        live_tx: mpsc::Sender<Arc<LiveClip>>,
        control: SendStream,
        channels: std::collections::BTreeMap<String, Right>,
        link: crate::webtransport::Link,
    ) -> Session {
        Session {
            id,
            user,
            conn,
            link,
            live_tx,
            dirty: Notify::new(),
            window: Notify::new(),
            deliveries: Mutex::new(Default::default()),
            control: tokio::sync::Mutex::new(Some(control)),
            channels,
            usage: Mutex::new(crate::usage::Sampler::default()),
        }
    }

    /// Adds the connection's bytes since the last call (UDP payload, both
    /// ways, from the start of its handshake) to the user's usage today.
    pub fn count_usage(&self, book: &crate::usage::UsageBook) {
        let stats = self.conn.stats();
        let Ok(mut sampler) = self.usage.lock() else {
            return;
        };
        let (up, down) = sampler.delta(stats.udp_rx.bytes, stats.udp_tx.bytes);
        drop(sampler);
        let hot = crate::metrics::hot();
        hot.wire_up.increment(up);
        hot.wire_down.increment(down);
        if !book.add(&self.user, crate::usage::today(), up, down) {
            hot.usage_uncounted.increment(up + down);
        }
    }

    /// Offers a clip that is starting now. False when the recipient is too
    /// far behind: it will get the clip from the store instead.
    pub fn offer_live(&self, clip: Arc<LiveClip>) -> bool {
        self.live_tx.try_send(clip).is_ok()
    }

    /// Tells the delivery pump that the store has something new.
    pub fn store_changed(&self) {
        self.dirty.notify_one();
    }

    /// Marks live clip `id` as being delivered; false if it already is (or
    /// was, and is not yet acknowledged) on this connection.
    pub(crate) fn begin_live(&self, id: ClipId) -> bool {
        self.deliveries
            .lock()
            .is_ok_and(|mut d| d.begin(id, false, || true))
    }

    /// Marks stored clip `id` as being delivered: false if it already is,
    /// or if the store no longer holds this user's copy (`held`).
    pub(crate) fn begin_stored(&self, id: ClipId, held: impl FnOnce() -> bool) -> bool {
        self.deliveries
            .lock()
            .is_ok_and(|mut d| d.begin(id, true, held))
    }

    /// `id` is acknowledged on this connection (remembered: a copy of it
    /// queued later is released, not sent again).
    pub(crate) fn acked(&self, id: &ClipId) {
        self.settle(|d| d.acked(id));
    }

    /// Whether `id` was acked on this connection lately.
    pub(crate) fn acked_here(&self, id: &ClipId) -> bool {
        self.deliveries.lock().is_ok_and(|d| d.acked_here(id))
    }

    /// `id`'s delivery was abandoned (or its `Expired` notice read).
    pub(crate) fn finish(&self, id: &ClipId) {
        self.settle(|d| d.finish(id));
    }

    /// Ends a delivery with `end`; wakes the pump when that freed room in
    /// the stored-delivery window.
    fn settle(&self, end: impl FnOnce(&mut relay_core::deliver::Deliveries) -> bool) {
        if let Ok(mut d) = self.deliveries.lock()
            && end(&mut d)
        {
            self.window.notify_one();
        }
    }

    /// Sends a message on the control stream (`Usage`, `PushResult`).
    pub async fn send_control(&self, msg: &Message) -> Result<(), ControlError> {
        self.send_controls(std::slice::from_ref(msg)).await
    }

    /// Sends messages on the control stream in one write (`Welcome` and
    /// `AckPolicy`: one packet).
    pub async fn send_controls(&self, msgs: &[Message]) -> Result<(), ControlError> {
        let mut buf = bytes::BytesMut::new();
        for m in msgs {
            m.encode(&mut buf);
        }
        let mut control = self.control.lock().await;
        match control.as_mut() {
            Some(send) => Ok(send.write_all(&buf).await?),
            None => Err(ControlError::GivenUp),
        }
    }

    /// Sends `Expired` notices on the control stream (the client acks each
    /// with `Ack`, which ends it).
    pub async fn send_expired(&self, notices: Vec<codec::wire::Expired>) {
        for n in notices {
            if let Err(e) = self.send_control(&Message::Expired(n)).await {
                tracing::debug!(error = %e, "Expired not sent");
                return;
            }
        }
    }

    /// Tells the client to reconnect (elsewhere) after `retry_after_ms`:
    /// `GoAway` on the control stream, which then ends.
    pub async fn go_away(&self, code: ErrorCode, retry_after_ms: u64, reason: &str) {
        let taken = self.control.lock().await.take();
        if let Some(mut send) = taken {
            let msg = Message::GoAway(codec::wire::GoAway {
                code,
                retry_after_ms,
                reason: reason.to_owned(),
            });
            if quic::write_message(&mut send, &msg).await.is_ok() {
                let _ = send.finish();
            }
        }
    }

    /// Live clips waiting to start plus deliveries not yet acknowledged.
    pub fn queue_depth(&self) -> usize {
        let waiting = self.live_tx.max_capacity() - self.live_tx.capacity();
        waiting + self.deliveries.lock().map_or(0, |d| d.open())
    }

    pub(crate) fn stored_open(&self) -> usize {
        self.deliveries
            .lock()
            .map_or(usize::MAX, |d| d.stored_open())
    }
}

/// What follows the store append of a new clip, whoever received it (an
/// upload here, or a clip relayed from another relay): a channel clip
/// enters the channel's history, live recipients get its end, and the
/// recipients' delivery pumps look at the store again.
pub(crate) async fn stored_new(
    shared: &Shared,
    live: &LiveClip,
    clip: Arc<StoredClip>,
    recipients: &[Arc<str>],
    channel: Option<&str>,
) {
    if let Some(c) = channel {
        record_history(shared, c, &clip, recipients, &clip.meta.sender).await;
    }
    live.complete(clip);
    for r in recipients {
        if let Some(s) = shared.router.session(r) {
            s.store_changed();
        }
    }
}

/// Keeps a channel clip for members who were offline. Recipients (and the
/// sender) are marked as having it; members who came online while it was
/// being sent get a copy now.
pub(crate) async fn record_history(
    shared: &Shared,
    c: &str,
    clip: &Arc<StoredClip>,
    recipients: &[Arc<str>],
    sender: &Arc<str>,
) {
    let cfg = &shared.config;
    // One copy per channel, kept by the store (on disk with the disk store).
    let seq = match shared.store.add_history(c, clip.clone()).await {
        Ok(seq) => seq,
        Err(e) => {
            warn!(error = %e, channel = c, "channel history not kept");
            return;
        }
    };
    let cutoff = cfg.history_cutoff_ms(crate::now_ms());
    let gone = shared.history.entry(c.to_owned()).or_default().insert(
        seq,
        clip.clone(),
        cfg.channel_history_depth,
        cutoff,
    );
    for id in gone {
        let _ = shared.store.drop_history(c, &id).await;
    }
    for u in recipients.iter().chain(std::iter::once(sender)) {
        shared.history_seen.claim(u, c, seq);
    }
    // Members online now that were not recipients (they connected while the
    // clip was being sent): the only ones whose claim is still open.
    for s in shared.router.channel_members(c) {
        // Claim the entry first: a replay at connect may race with this.
        if !shared.history_seen.claim(&s.user, c, seq) {
            continue;
        }
        if shared
            .store
            .queue_copy(clip.clone(), s.user.clone())
            .await
            .is_ok()
        {
            s.store_changed();
        }
    }
}

/// Stops an upload from outside (a retry took over, a priority talker took
/// the floor), saying why.
#[derive(Clone, Default)]
pub struct Stop {
    token: CancellationToken,
    why: Arc<std::sync::OnceLock<Refusal>>,
}

impl Stop {
    pub fn stop(&self, code: ErrorCode, reason: impl Into<String>) {
        self.refuse(Refusal::new(code, reason));
    }

    /// Stops the upload with `r`'s code and reason (the first one holds).
    pub fn refuse(&self, r: Refusal) {
        let _ = self.why.set(r);
        self.token.cancel();
    }

    /// Resolves once stopped, with the refusal to answer with.
    pub async fn stopped(&self) -> Refusal {
        self.token.cancelled().await;
        self.why
            .get()
            .cloned()
            .unwrap_or_else(|| Refusal::new(ErrorCode::CutOff, "stopped"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8, created_ms: u64) -> (u64, Arc<StoredClip>) {
        let meta = Arc::new(crate::store::ClipMeta {
            id: ClipId([n; 16]),
            sender: "a".into(),
            target: codec::wire::Target::Channel("ops".into()),
            format: codec::wire::AudioFormat::default(),
            created_ms,
        });
        let end = codec::ClipEnd {
            packet_count: 1,
            final_granule: 960,
        };
        let clip = StoredClip::new(meta, bytes::Bytes::from_static(&[2, 0xf8, 1]), end);
        (u64::from(n), Arc::new(clip))
    }

    /// The relay's history ages clips by their creation time and names
    /// them by their id (the rule itself: `relay_core::history`).
    #[test]
    fn the_history_reads_a_clips_id_and_age() {
        let mut h = History::default();
        h.clips.push_back(entry(1, 1_000));
        h.clips.push_back(entry(2, 90_000));
        let cfg = Config {
            channel_history_age: std::time::Duration::from_secs(60),
            ..Config::default()
        };
        let cutoff = cfg.history_cutoff_ms(100_000);
        assert_eq!(h.trim(10, cutoff), [ClipId([1; 16])]);
        assert_eq!(h.clips.len(), 1);
    }
}
