//! The relay process: QUIC endpoint, admin listener, background sweeps and
//! shutdown. Tests start the same [`Relay`] the binary starts.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::error::StartError;
use codec::ErrorCode;
use codec::token::{Claims, PublicKeys, TokenError, TokenKey, Verifier};
use codec::wire::ClipId;
use dashmap::DashMap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, StoreKind};
use crate::session::{self, Session};
use crate::store::{ClipStore, ClusterCache, MemoryStore};
use crate::tls::{self, DataFiles};

/// An upload in progress, so a retry of the same clip id can take over.
pub struct Upload {
    pub sender: Arc<str>,
    pub number: u64,
    pub stop: session::Stop,
}

/// State every connection task shares.
pub struct Shared {
    pub config: Config,
    pub key: TokenKey,
    /// Public keys for EdDSA and ES256 tokens (`token_keys`), reloaded.
    public_keys: std::sync::RwLock<Arc<PublicKeys>>,
    pub store: Arc<dyn ClipStore>,
    /// The same store, as the cluster uses it.
    pub cache: Arc<dyn ClusterCache>,
    /// Sessions by user, channel members and floors (`router.rs`).
    pub router: Router,
    uploads: DashMap<ClipId, Upload>,
    next_id: AtomicU64,
    pub connections: AtomicUsize,
    /// Connections handshaking or waiting for `Auth`.
    pub unauthenticated: AtomicUsize,
    pub ready: AtomicBool,
    /// Shutting down: new handshakes are refused.
    pub draining: AtomicBool,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    /// Test-only delivery faults (feature `fault-injection`).
    pub faults: crate::faults::Faults,
    /// Per-user clip budgets (`max_clips_per_minute`, bytes per minute).
    pub budgets: DashMap<Arc<str>, crate::limits::UserBudget>,
    /// New handshakes per second.
    handshakes: std::sync::Mutex<crate::limits::Bucket>,
    /// Bytes of clips being uploaded now.
    pub inflight: AtomicU64,
    /// Recent clips of each channel, for members who were offline.
    pub history: DashMap<String, History>,
    /// The history entries each (user, channel) has been given (recent
    /// ones; bounded by the history depth).
    pub history_seen: DashMap<(Arc<str>, String), std::collections::BTreeSet<u64>>,
    /// Where members' history cursors are kept (disk store only).
    pub cursors: Option<std::path::PathBuf>,
    /// `history_seen` changed since the cursors were last written.
    pub cursors_dirty: AtomicBool,
    /// The cluster link (`--cluster`); `None` for a relay on its own.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// A channel's recent clips: (sequence number, clip), oldest first. The
/// store numbers the entries (and keeps them, with the disk store).
#[derive(Default)]
pub struct History {
    pub clips: std::collections::VecDeque<(u64, Arc<crate::store::StoredClip>)>,
}

/// The relay's router: sessions are `Arc<Session>`, a floor holder is
/// stopped through its upload's `Stop`.
pub type Router = crate::router::Router<Arc<Session>, session::Stop>;

impl crate::router::Member for Arc<Session> {
    fn session_id(&self) -> u64 {
        self.id
    }

    fn user(&self) -> &Arc<str> {
        &self.user
    }
}

impl crate::admin::AdminState for Shared {
    fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    fn cluster_linked(&self) -> Option<bool> {
        self.cluster.as_ref().map(|c| c.connected())
    }

    fn metrics_text(&self) -> Option<String> {
        let (mut max, mut total) = (0usize, 0usize);
        self.router.for_each_session(|s| {
            let d = s.queue_depth();
            max = max.max(d);
            total += d;
        });
        crate::metrics::render(&crate::metrics::Gauges {
            ready: self.ready.load(Ordering::SeqCst),
            connections: self.connections.load(Ordering::SeqCst),
            sessions: self.router.online(),
            cluster_connected: self.cluster.as_ref().is_some_and(|c| c.connected()),
            inflight_bytes: self.inflight.load(Ordering::Relaxed),
            inflight_limit: self.config.max_inflight_bytes,
            token_keys: self.public_keys().len(),
            store: self.store.stats(),
            store_limit: self.config.max_store_bytes,
            queue_depth_max: max,
            queue_depth_total: total,
        })
    }
}

impl Shared {
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

    /// Registers an upload of `id` by `sender`. A running upload of the same
    /// id by the same sender is a stale attempt (its connection is dying):
    /// it is stopped and this one takes over. `None` if another sender
    /// holds the id.
    pub fn begin_upload(&self, id: ClipId, sender: &Arc<str>) -> Option<(u64, session::Stop)> {
        let entry = Upload {
            sender: sender.clone(),
            number: self.next_session_id(),
            stop: session::Stop::default(),
        };
        let mine = (entry.number, entry.stop.clone());
        match self.uploads.entry(id) {
            dashmap::Entry::Occupied(mut e) => {
                if e.get().sender != *sender {
                    return None;
                }
                e.get()
                    .stop
                    .stop(ErrorCode::CutOff, "superseded by a retry of the same clip");
                e.insert(entry);
            }
            dashmap::Entry::Vacant(v) => {
                v.insert(entry);
            }
        }
        Some(mine)
    }

    /// Stops the running upload of `id`, if any (a priority talker on
    /// another relay took its floor).
    pub fn stop_upload(&self, id: &ClipId, code: ErrorCode, reason: &str) {
        if let Some(u) = self.uploads.get(id) {
            u.stop.stop(code, reason);
        }
    }

    pub fn end_upload(&self, id: ClipId, number: u64) {
        self.uploads.remove_if(&id, |_, u| u.number == number);
    }
}

/// A running relay.
pub struct Relay {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    admin_addr: SocketAddr,
    files: DataFiles,
}

/// The QUIC transport settings the relay serves with.
pub fn transport(cfg: &Config) -> Result<quinn::TransportConfig, StartError> {
    let mut t = quinn::TransportConfig::default();
    // Until `Auth` succeeds a peer gets credit for its control stream only,
    // and for no more bytes than the largest `Auth` message: an
    // unauthenticated connection cannot make the relay buffer more.
    // `session::authenticate` then raises both (`open_credit`).
    t.max_concurrent_bidi_streams(1u32.into());
    t.receive_window(auth_window(cfg));
    t.max_concurrent_uni_streams(0u32.into());
    t.max_idle_timeout(Some(
        cfg.idle_timeout
            .try_into()
            .map_err(|_| StartError::Config("idle_timeout too large".into()))?,
    ));
    // Voice packets stay far below QUIC's 1200-byte minimum MTU; path MTU
    // probes (padded datagrams of ~1450 bytes) would only cost phones data.
    t.mtu_discovery_config(None);
    if cfg.ack_threshold > 1 {
        let mut af = quinn::AckFrequencyConfig::default();
        af.ack_eliciting_threshold(cfg.ack_threshold.into())
            .max_ack_delay(Some(cfg.ack_delay));
        t.ack_frequency_config(Some(af));
    }
    Ok(t)
}

/// Connection-level receive window before `Auth`: the largest message and
/// its type and length varints.
pub fn auth_window(cfg: &Config) -> quinn::VarInt {
    quinn::VarInt::from_u64(cfg.max_message_bytes as u64 + 16).unwrap_or(quinn::VarInt::MAX)
}

/// Gives an authenticated connection its full credit: the control stream
/// plus `max_clip_streams` uploads, and quinn's usual connection window.
pub fn open_credit(cfg: &Config, conn: &quinn::Connection) {
    conn.set_max_concurrent_bi_streams((cfg.max_clip_streams + 1).into());
    conn.set_receive_window(quinn::VarInt::MAX);
}

/// Counts a connection as not yet authenticated while it lives.
pub struct Unauthenticated(Arc<Shared>);

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        self.0.unauthenticated.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Relay {
    /// Prepares the data dir, binds the QUIC endpoint and the admin
    /// listener, and starts serving.
    pub async fn start(config: Config) -> Result<Relay, StartError> {
        config.validate()?;
        let (files, created) = tls::ensure_data_dir(&config.data_dir)?;
        if created.cert {
            info!(path = %files.cert.display(), "created a self-signed certificate for localhost, 127.0.0.1, ::1");
        }
        if created.secret {
            info!(path = %files.secret.display(), "created a random token secret");
        }
        let key = TokenKey::from_file(&files.secret, config.token_leeway)
            .map_err(StartError::file("reading the token secret", &files.secret))?;
        let public_keys = match token_keys_path(&config) {
            Some(p) => {
                PublicKeys::from_path(&p).map_err(StartError::file("reading token_keys", &p))?
            }
            None => PublicKeys::default(),
        };
        if !public_keys.is_empty() {
            info!(kids = ?public_keys.kids(), "token keys loaded");
        }
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(tls::server_crypto(&files)?));
        server.transport_config(Arc::new(transport(&config)?));
        if config.metrics {
            crate::metrics::install();
        }
        crate::metrics::hot();
        let socket = udp_socket(&config)?;
        let endpoint = quinn::Endpoint::new(
            tls::endpoint_config(&files)?,
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| StartError::Bind {
            what: "QUIC on UDP",
            addr: config.listen,
            source,
        })?;
        let (store, cache): (Arc<dyn ClipStore>, Arc<dyn ClusterCache>) = match config.store {
            StoreKind::Memory => {
                let s = Arc::new(MemoryStore::new(config.max_store_bytes));
                (s.clone(), s)
            }
            StoreKind::Disk => {
                let (s, rec) = crate::disk_store::DiskStore::open(
                    &config.data_dir,
                    config.max_store_bytes,
                    crate::disk_store::LogOptions {
                        commit_interval: config.store_commit_interval,
                        ..Default::default()
                    },
                )?;
                if rec.damaged > 0 {
                    warn!(
                        damaged = rec.damaged,
                        "the store held damaged records; they were skipped"
                    );
                }
                let s = Arc::new(s);
                (s.clone(), s)
            }
        };
        let cluster = if config.cluster.is_empty() {
            None
        } else {
            Some(crate::cluster::Cluster::connect(&config).await?)
        };
        let shared = Arc::new(Shared {
            cluster,
            key,
            public_keys: std::sync::RwLock::new(Arc::new(public_keys)),
            store,
            cache,
            router: Router::default(),
            uploads: DashMap::new(),
            next_id: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
            unauthenticated: AtomicUsize::new(0),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            faults: crate::faults::Faults::default(),
            budgets: DashMap::new(),
            handshakes: std::sync::Mutex::new(crate::limits::Bucket::new(
                f64::from(config.max_handshakes_per_second.max(1)),
                Duration::from_secs(1),
                std::time::Instant::now(),
            )),
            inflight: AtomicU64::new(0),
            history: DashMap::new(),
            history_seen: DashMap::new(),
            cursors: (config.store == StoreKind::Disk)
                .then(|| crate::cursors::path(&config.data_dir)),
            cursors_dirty: AtomicBool::new(false),
            config,
        });
        shared.restore_history();
        if let Some(c) = &shared.cluster {
            c.start(&shared);
        }
        let admin = tokio::net::TcpListener::bind(shared.config.admin)
            .await
            .map_err(|source| StartError::Bind {
                what: "admin TCP",
                addr: shared.config.admin,
                source,
            })?;
        let admin_addr = admin.local_addr().map_err(|source| StartError::Bind {
            what: "admin TCP",
            addr: shared.config.admin,
            source,
        })?;
        tokio::spawn(crate::admin::serve(
            admin,
            shared.clone(),
            shared.shutdown.clone(),
        ));
        tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
        tokio::spawn(sweep_loop(shared.clone()));
        tokio::spawn(crate::metrics::upkeep(shared.shutdown.clone()));
        tokio::spawn(cursor_loop(shared.clone()));
        tokio::spawn(token_keys_loop(shared.clone()));
        shared.ready.store(true, Ordering::SeqCst);
        Ok(Relay {
            shared,
            endpoint,
            admin_addr,
            files,
        })
    }

    pub fn quic_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .unwrap_or(self.shared.config.listen)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn files(&self) -> &DataFiles {
        &self.files
    }

    pub fn token_key(&self) -> &TokenKey {
        &self.shared.key
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves until `signal` resolves, then shuts down.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
        self.shutdown().await;
    }

    /// Stops accepting, gives uploads in flight `drain_timeout` to finish,
    /// then closes every connection with `going_away`.
    pub async fn shutdown(self) {
        let s = &self.shared;
        s.ready.store(false, Ordering::SeqCst);
        // New handshakes get CONNECTION_REFUSED at once (`accept_loop`)
        // rather than no answer: their clients try elsewhere without
        // waiting for a timeout.
        s.draining.store(true, Ordering::SeqCst);
        info!("shutting down: no new connections");
        // Tell every client to move, spreading their reconnects over a few
        // seconds so the next relay is not hit by all of them at once.
        let sessions = s.router.sessions();
        let goodbyes = sessions.into_iter().map(|sess| async move {
            crate::metrics::count1(crate::metrics::GOAWAYS);
            let jitter = rand::random::<u64>() % 5_000;
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                sess.go_away(ErrorCode::GoingAway, jitter, "relay shutting down"),
            )
            .await;
        });
        futures_join_all(goodbyes).await;
        s.tracker.close();
        let drained = tokio::time::timeout(s.config.drain_timeout, s.tracker.wait()).await;
        if drained.is_err() {
            warn!(timeout = ?s.config.drain_timeout, "drain timeout: closing with work in flight");
        }
        // Every connection closes with `going_away` before the sessions
        // stop: a session stopped first drops its connection, which quinn
        // then closes with code 0 and no reason. `Endpoint::close` only
        // queues a close for each connection's driver, so the sessions'
        // connections are closed here directly, at once; the endpoint
        // closes the rest (still authenticating).
        for sess in s.router.sessions() {
            quic::close(&sess.conn, ErrorCode::GoingAway, "relay shutting down");
        }
        self.endpoint
            .close(quic::varint(ErrorCode::GoingAway), b"relay shutting down");
        s.shutdown.cancel();
        s.save_cursors().await;
        s.store.close().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        info!("stopped");
    }
}

impl Shared {
    /// Channel history and members' cursors as the store and the cursors
    /// file left them (disk store; nothing with the memory store).
    fn restore_history(&self) {
        for (c, seq, clip) in self.store.recovered_history() {
            self.history
                .entry(c)
                .or_default()
                .clips
                .push_back((seq, clip));
        }
        for mut h in self.history.iter_mut() {
            h.clips.make_contiguous().sort_by_key(|(seq, _)| *seq);
        }
        let Some(path) = &self.cursors else { return };
        for cur in crate::cursors::load(path) {
            let mut seen: std::collections::BTreeSet<u64> = self
                .history
                .get(&cur.channel)
                .map(|h| {
                    h.clips
                        .iter()
                        .map(|(s, _)| *s)
                        .filter(|s| *s <= cur.seq)
                        .collect()
                })
                .unwrap_or_default();
            seen.insert(cur.seq);
            self.history_seen
                .insert((Arc::from(cur.user.as_str()), cur.channel), seen);
        }
    }

    /// Writes members' history cursors if they changed.
    pub async fn save_cursors(&self) {
        let Some(path) = self.cursors.clone() else {
            return;
        };
        if !self.cursors_dirty.swap(false, Ordering::SeqCst) {
            return;
        }
        let snapshot: std::collections::BTreeMap<(String, String), u64> = self
            .history_seen
            .iter()
            .filter_map(|e| {
                let (user, c) = e.key();
                e.value()
                    .last()
                    .map(|m| ((user.to_string(), c.clone()), *m))
            })
            .collect();
        let r = tokio::task::spawn_blocking(move || crate::cursors::save(&path, &snapshot)).await;
        if !matches!(r, Ok(Ok(()))) {
            self.cursors_dirty.store(true, Ordering::SeqCst);
            warn!("writing history cursors failed; will retry");
        }
    }

    /// Whether a new handshake fits the rate.
    fn handshake_allowed(&self) -> bool {
        if self.config.max_handshakes_per_second == 0 {
            return true;
        }
        self.handshakes
            .lock()
            .map(|mut b| b.take(1.0, std::time::Instant::now()).is_ok())
            .unwrap_or(true)
    }
}

/// The endpoint's UDP socket, with the buffers `udp_recv_buffer` and
/// `udp_send_buffer` asked for; a warning when the kernel gives less.
fn udp_socket(cfg: &Config) -> Result<std::net::UdpSocket, StartError> {
    let (sock, recv, send) = quic::udp_socket(cfg.listen, cfg.udp_recv_buffer, cfg.udp_send_buffer)
        .map_err(|source| StartError::Bind {
            what: "UDP",
            addr: cfg.listen,
            source,
        })?;
    for (what, want, got, sysctl) in [
        ("receive", cfg.udp_recv_buffer, recv, "net.core.rmem_max"),
        ("send", cfg.udp_send_buffer, send, "net.core.wmem_max"),
    ] {
        // Linux reports twice what it grants (bookkeeping included).
        if want > 0 && got < want {
            warn!(
                buffer = what,
                asked = want,
                got,
                "UDP {what} buffer capped by the kernel: raise {sysctl} (deploy/sysctl/60-ptt-relay.conf)"
            );
        }
    }
    Ok(sock)
}

/// Runs futures concurrently and waits for all.
async fn futures_join_all<F: Future<Output = ()> + Send + 'static>(fs: impl Iterator<Item = F>) {
    let mut set = tokio::task::JoinSet::new();
    for f in fs {
        set.spawn(f);
    }
    while set.join_next().await.is_some() {}
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        if shared.draining.load(Ordering::SeqCst) {
            incoming.refuse();
            crate::metrics::count(crate::metrics::HANDSHAKES, "outcome", "refused");
            crate::metrics::count(crate::metrics::CONNECTIONS_REJECTED, "reason", "draining");
            continue;
        }
        let pending = shared.unauthenticated.fetch_add(1, Ordering::SeqCst);
        let unauthenticated = Unauthenticated(shared.clone());
        if pending >= shared.config.max_unauthenticated_connections {
            incoming.refuse();
            crate::metrics::count(crate::metrics::HANDSHAKES, "outcome", "refused");
            crate::metrics::count(
                crate::metrics::CONNECTIONS_REJECTED,
                "reason",
                "unauthenticated_limit",
            );
            continue;
        }
        if !shared.handshake_allowed() {
            // A flood: make unvalidated clients prove their address (a
            // Retry costs us no state), refuse the validated ones.
            let outcome = if incoming.remote_address_validated() {
                incoming.refuse();
                "refused"
            } else if let Err(e) = incoming.retry() {
                e.into_incoming().refuse();
                "refused"
            } else {
                "retry"
            };
            crate::metrics::count(crate::metrics::HANDSHAKES, "outcome", outcome);
            if outcome == "refused" {
                crate::metrics::count(
                    crate::metrics::CONNECTIONS_REJECTED,
                    "reason",
                    "handshake_rate",
                );
            }
            continue;
        }
        let n = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
        let shared2 = shared.clone();
        tokio::spawn(async move {
            if n > shared2.config.max_connections {
                crate::metrics::count(
                    crate::metrics::CONNECTIONS_REJECTED,
                    "reason",
                    "max_connections",
                );
                if let Ok(conn) = incoming.await {
                    quic::close(
                        &conn,
                        ErrorCode::ServerBusy,
                        &format!(
                            "relay at max_connections ({}); retry later",
                            shared2.config.max_connections
                        ),
                    );
                }
            } else {
                session::run(shared2.clone(), incoming, unauthenticated).await;
            }
            shared2.connections.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Drops history entries older than `channel_history_age` (quiet channels
/// are not trimmed by new clips).
async fn trim_history(shared: &Shared, now: u64) {
    let oldest = now.saturating_sub(shared.config.channel_history_age.as_millis() as u64);
    let mut gone = Vec::new();
    for mut h in shared.history.iter_mut() {
        while h
            .clips
            .front()
            .is_some_and(|(_, c)| c.meta.created_ms < oldest)
        {
            if let Some((_, c)) = h.clips.pop_front() {
                gone.push((h.key().clone(), c.meta.id));
            }
        }
    }
    for (c, id) in gone {
        let _ = shared.store.drop_history(&c, &id).await;
    }
}

/// `token_keys` as a path, when set.
fn token_keys_path(cfg: &Config) -> Option<std::path::PathBuf> {
    (!cfg.token_keys.is_empty()).then(|| std::path::PathBuf::from(&cfg.token_keys))
}

/// Re-reads `token_keys` every `token_keys_reload`: keys added, rotated or
/// retired take effect without a restart. A file that cannot be read or
/// parsed keeps the keys the relay had (and is counted and logged).
async fn token_keys_loop(shared: Arc<Shared>) {
    let Some(path) = token_keys_path(&shared.config) else {
        return;
    };
    let mut tick = tokio::time::interval(shared.config.token_keys_reload);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.shutdown.cancelled() => return,
        }
        let p = path.clone();
        match tokio::task::spawn_blocking(move || PublicKeys::from_path(&p)).await {
            Ok(Ok(keys)) => {
                let now = keys.kids();
                if now != shared.public_keys().kids() {
                    info!(kids = ?now, "token keys reloaded");
                }
                *shared
                    .public_keys
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
            }
            Ok(Err(e)) => {
                crate::metrics::count1(crate::metrics::TOKEN_KEYS_RELOAD_FAILURES);
                warn!(error = %e, "token_keys not reloaded: keeping the keys loaded before");
            }
            Err(e) => warn!(error = %e, "token_keys reload task failed"),
        }
    }
}

/// Writes members' history cursors every few seconds when they changed.
async fn cursor_loop(shared: Arc<Shared>) {
    if shared.cursors.is_none() {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tick.tick() => shared.save_cursors().await,
            () = shared.shutdown.cancelled() => return,
        }
    }
}

/// Drops expired clips and forgets old clip ids, once a minute (or sooner
/// when the windows are short).
async fn sweep_loop(shared: Arc<Shared>) {
    let cfg = &shared.config;
    let every = cfg
        .dedupe_window
        .min(cfg.clip_ttl)
        .clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.shutdown.cancelled() => return,
        }
        let now = crate::now_ms();
        let ttl = now.saturating_sub(cfg.clip_ttl.as_millis() as u64);
        let window = now.saturating_sub(cfg.dedupe_window.as_millis() as u64);
        let t = std::time::Instant::now();
        shared.budgets.retain(|_, b| !b.is_idle(t));
        trim_history(&shared, now).await;
        match shared.store.expire(ttl, window).await {
            Ok(0) => {}
            Ok(n) => {
                metrics::counter!(crate::metrics::CLIPS_EXPIRED).increment(n);
                info!(dropped = n, "expired undelivered clips");
            }
            Err(e) => warn!(error = %e, "store expiry failed"),
        }
    }
}
