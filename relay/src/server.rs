//! The relay process: QUIC endpoint, admin listener, background sweeps and
//! shutdown. Tests start the same [`Relay`] the binary starts.

use relay_core::hash::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::error::StartError;
use codec::ErrorCode;
use codec::token::{PublicKeys, TokenKey};
use tracing::{info, warn};

use crate::config::{Config, StoreKind};
use crate::conn;
use crate::credit::auth_window;
use crate::state::{Shared, Unauthenticated};
use crate::store::{ClipStore, ClusterCache, MemoryStore};
use crate::tls::{self, DataFiles};

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
            // Wire bytes current to the scrape.
            s.count_usage(&self.usage);
            let d = s.queue_depth();
            max = max.max(d);
            total += d;
        });
        crate::metrics::render(&crate::metrics::Gauges {
            ready: self.ready.load(Ordering::SeqCst),
            connections: self.connections.load(Ordering::SeqCst),
            sessions: self.router.online(),
            cluster_connected: self.cluster.as_ref().is_some_and(|c| c.connected()),
            cluster_held: self.cluster.as_ref().map_or(0, |c| c.held()),
            push_users: self.push.users(),
            inflight_bytes: self.inflight.load(Ordering::Relaxed),
            inflight_limit: self.config.max_inflight_bytes,
            token_keys: self.public_keys().len(),
            store: self.store.stats(),
            store_limit: self.config.max_store_bytes,
            queue_depth_max: max,
            queue_depth_total: total,
            usage_users: self.usage.users(),
        })
    }

    fn usage(&self, user: &str, days: u64) -> crate::admin::UserUsage {
        if let Some(s) = self.router.session(user) {
            s.count_usage(&self.usage);
        }
        let today = crate::usage::today();
        let u = codec::wire::Usage {
            today,
            days: self.usage.days(user, days, today),
        };
        let (bytes_up, bytes_down) = u.totals();
        crate::admin::UserUsage {
            user: user.to_owned(),
            today: crate::usage::date(today),
            bytes_up,
            bytes_down,
            days: u
                .days
                .iter()
                .map(|d| crate::admin::Day {
                    date: crate::usage::date(d.day),
                    bytes_up: d.bytes_up,
                    bytes_down: d.bytes_down,
                })
                .collect(),
        }
    }

    fn top_usage(&self, days: u64, n: usize) -> crate::admin::TopUsage {
        self.count_usage();
        let today = crate::usage::today();
        crate::admin::TopUsage {
            today: crate::usage::date(today),
            days,
            users: self.usage.top(days, today, n),
        }
    }
}

/// A running relay.
pub struct Relay {
    shared: Arc<Shared>,
    /// The cluster link, as tests look at it.
    cluster: Option<Arc<crate::cluster::Cluster>>,
    endpoint: quinn::Endpoint,
    admin_addr: SocketAddr,
    web_addr: Option<SocketAddr>,
    files: DataFiles,
}

/// The QUIC transport settings the relay serves with.
pub fn transport(cfg: &Config) -> Result<quinn::TransportConfig, StartError> {
    let mut t = quinn::TransportConfig::default();
    // Until `Auth` succeeds a peer gets credit for its control stream, for
    // no more bytes than the largest `Auth` message, and (unless
    // `early_upload_bytes` is 0) for one upload stream of that many bytes,
    // so a 0-RTT reconnect can carry a press's first audio: an
    // unauthenticated connection cannot make the relay buffer more.
    // `conn::handshake::authenticate` then raises both
    // (`credit::open_credit`).
    let early = u32::from(cfg.early_upload_bytes > 0);
    t.max_concurrent_bidi_streams((1 + early).into());
    t.receive_window(auth_window(cfg));
    t.stream_receive_window(crate::credit::STREAM_WINDOW.into());
    // None for ptt/1 (a native client's are stopped at once), but a
    // browser's HTTP/3 needs three (control, QPACK encoder and decoder)
    // from the first flight on: Chromium closes a connection whose
    // transport parameters allow fewer.
    t.max_concurrent_uni_streams(crate::webtransport::H3_UNI_STREAMS.into());
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

/// The token secret (HS256) and the public keys (`token_keys`).
fn token_keys(config: &Config, files: &DataFiles) -> Result<(TokenKey, PublicKeys), StartError> {
    let key = TokenKey::from_file(&files.secret, config.token_leeway)
        .map_err(StartError::file("reading the token secret", &files.secret))?;
    let public_keys = match token_keys_path(config) {
        Some(p) => PublicKeys::from_path(&p).map_err(StartError::file("reading token_keys", &p))?,
        None => PublicKeys::default(),
    };
    if !public_keys.is_empty() {
        info!(kids = ?public_keys.kids(), "token keys loaded");
    }
    Ok((key, public_keys))
}

/// The store, as the relay and as the cluster's cache.
type Stores = (Arc<dyn ClipStore>, Arc<dyn ClusterCache>);

/// The store `config` names, opened (a disk store recovered).
fn open_store(config: &Config) -> Result<Stores, StartError> {
    Ok(match config.store {
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
    })
}

/// What the relay keeps beside the store, read back: channel history,
/// the usage book, expiry notices.
fn restore(shared: &Shared) {
    shared.restore_history();
    if let Some(path) = &shared.usage_file {
        shared
            .usage
            .restore(crate::json_file::load(path, "usage book"));
    }
    if let Some(path) = &shared.expired_file {
        shared
            .expired
            .restore(crate::json_file::load(path, "expired notices"));
    }
}

/// A TCP listener on `addr` and the address it got.
async fn bind_tcp(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let bind = |source| StartError::Bind { what, addr, source };
    let l = tokio::net::TcpListener::bind(addr).await.map_err(bind)?;
    let bound = l.local_addr().map_err(bind)?;
    Ok((l, bound))
}

/// The web listener (`web`): the browser app and its `/config.json`.
async fn serve_web(
    shared: &Shared,
    addr: SocketAddr,
    quic_port: u16,
    certs: &tls::WebCerts,
) -> Result<SocketAddr, StartError> {
    let (web, bound) = bind_tcp("web TCP", addr).await?;
    let info = crate::web::WebInfo {
        quic_port,
        certs: certs.clone(),
        relays: shared.config.web_relay_list(),
    };
    let shutdown = shared.shutdown.clone();
    tokio::spawn(crate::web::serve(web, Arc::new(info), shutdown));
    Ok(bound)
}

impl Relay {
    /// Prepares the data dir, binds the QUIC endpoint and the admin
    /// listener, and starts serving.
    pub async fn start(config: Config) -> Result<Relay, StartError> {
        config.validate()?;
        let operator = (!config.cert.as_os_str().is_empty())
            .then_some((config.cert.as_path(), config.key.as_path()));
        let (files, created) = tls::ensure_data_dir(&config.data_dir, operator)?;
        if created.cert {
            info!(path = %files.cert.display(), "created a self-signed certificate for localhost, 127.0.0.1, ::1");
        }
        if created.secret {
            info!(path = %files.secret.display(), "created a random token secret");
        }
        let (key, public_keys) = token_keys(&config, &files)?;
        // Browsers (WebTransport, ALPN h3) get the operator's certificate,
        // or a short-lived one the page pins by hash.
        let web_certs = match operator {
            Some(_) => tls::WebCerts::Operator,
            None => tls::WebCerts::Ephemeral(Arc::new(tls::EphemeralCert::new()?)),
        };
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(tls::server_crypto(
            &files,
            Some(web_certs.clone()),
            config.zero_rtt_tickets,
        )?));
        server.transport_config(Arc::new(transport(&config)?));
        if config.metrics {
            crate::metrics::install();
        }
        crate::metrics::hot();
        let socket = udp_socket(&config)?;
        let endpoint = quinn::Endpoint::new(
            tls::endpoint_config(&files, config.connection_id_bytes)?,
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| StartError::Bind {
            what: "QUIC on UDP",
            addr: config.listen,
            source,
        })?;
        let (shared, cluster) = assemble(config, key, public_keys).await?;
        let (admin, admin_addr) = bind_tcp("admin TCP", shared.config.admin).await?;
        tokio::spawn(crate::admin::serve(
            admin,
            shared.clone(),
            shared.shutdown.clone(),
        ));
        let web_addr = match shared.config.web.0 {
            Some(addr) => {
                let quic_port = endpoint.local_addr().map_or(0, |a| a.port());
                Some(serve_web(&shared, addr, quic_port, &web_certs).await?)
            }
            None => None,
        };
        if let tls::WebCerts::Ephemeral(certs) = &web_certs {
            tokio::spawn(renew_web_certs(certs.clone(), shared.shutdown.clone()));
        }
        tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
        tokio::spawn(sweep_loop(shared.clone()));
        tokio::spawn(crate::metrics::upkeep(shared.shutdown.clone()));
        tokio::spawn(cursor_loop(shared.clone()));
        tokio::spawn(usage_loop(shared.clone()));
        tokio::spawn(token_keys_loop(shared.clone()));
        shared.ready.store(true, Ordering::SeqCst);
        Ok(Relay {
            shared,
            cluster,
            endpoint,
            admin_addr,
            web_addr,
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

    /// The web listener's address (`web`), unless it is off.
    pub fn web_addr(&self) -> Option<SocketAddr> {
        self.web_addr
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

    /// The cluster link, in a cluster.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.as_ref()
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
            sess.link
                .close(&sess.conn, ErrorCode::GoingAway, "relay shutting down");
        }
        self.endpoint
            .close(quic::varint(ErrorCode::GoingAway), b"relay shutting down");
        s.shutdown.cancel();
        s.save_cursors().await;
        s.count_usage();
        s.save_usage().await;
        s.save_expired().await;
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
                .restore(Arc::from(cur.user.as_str()), cur.channel, seen);
        }
    }

    /// Writes members' history cursors if they changed.
    pub async fn save_cursors(&self) {
        let Some(path) = self.cursors.clone() else {
            return;
        };
        let Some(snapshot) = self.history_seen.changed_cursors() else {
            return;
        };
        let list = crate::cursors::to_list(&snapshot);
        if !crate::json_file::save_off_thread(path, list, "history cursors").await {
            self.history_seen.unsaved();
        }
    }

    /// Adds every session's bytes since its last sample to the usage book.
    pub fn count_usage(&self) {
        self.router.for_each_session(|s| s.count_usage(&self.usage));
    }

    /// Writes the `Expired` notices if they changed (disk store); false if
    /// that failed (it is tried again next time).
    pub async fn save_expired(&self) -> bool {
        let Some(changes) = self.expired.take_changes() else {
            return true;
        };
        let Some(path) = self.expired_file.clone() else {
            return true;
        };
        let ok = crate::json_file::save_off_thread(path, changes, "expired notices").await;
        if !ok {
            self.expired.mark_dirty();
        }
        ok
    }

    /// Writes the usage book if it changed (disk store).
    pub async fn save_usage(&self) {
        let Some(path) = self.usage_file.clone() else {
            return;
        };
        let Some(snapshot) = self.usage.snapshot_if_changed() else {
            return;
        };
        if !crate::json_file::save_off_thread(path, snapshot, "usage book").await {
            self.usage.mark_dirty();
        }
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

/// The state every connection shares: the store, the cluster link (whose
/// concrete type only tests see), the pusher, what was kept on disk; the
/// background work of each started.
async fn assemble(
    config: Config,
    key: TokenKey,
    public_keys: PublicKeys,
) -> Result<(Arc<Shared>, Option<Arc<crate::cluster::Cluster>>), StartError> {
    let (store, cache) = open_store(&config)?;
    let cluster = if config.cluster.is_empty() {
        None
    } else {
        Some(crate::cluster::Cluster::connect(&config).await?)
    };
    let push = Arc::new(
        crate::push::Pusher::open(&config).map_err(|e| StartError::Config(e.to_string()))?,
    );
    let link = cluster
        .clone()
        .map(|c| Box::new(c) as Box<dyn crate::state::ClusterLink>);
    let shared = Arc::new(Shared::new(
        config,
        key,
        public_keys,
        store,
        cache,
        link,
        push.clone(),
    ));
    push.start(&shared.tracker, shared.shutdown.clone());
    if let Some(c) = &cluster {
        push.set_cluster(c.clone());
        c.mirror_push(push.clone(), shared.shutdown.clone());
    }
    restore(&shared);
    if let Some(c) = &cluster {
        c.start(&shared);
    }
    Ok((shared, cluster))
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    use relay_core::admission::{Admission, Arrival, Caps, admit};
    let caps = Caps {
        max_unauthenticated_connections: shared.config.max_unauthenticated_connections,
        max_connections: shared.config.max_connections,
    };
    let refused = |reason: &'static str| {
        crate::metrics::count(crate::metrics::HANDSHAKES, "outcome", "refused");
        crate::metrics::count(crate::metrics::CONNECTIONS_REJECTED, "reason", reason);
    };
    while let Some(incoming) = endpoint.accept().await {
        let arrival = Arrival {
            draining: shared.draining.load(Ordering::SeqCst),
            unauthenticated: shared.unauthenticated.load(Ordering::SeqCst),
            connections: shared.connections.load(Ordering::SeqCst),
            validated: incoming.remote_address_validated(),
        };
        let busy = match admit(arrival, caps, || shared.handshake_allowed()) {
            Admission::Refuse(reason) => {
                incoming.refuse();
                refused(reason);
                continue;
            }
            Admission::Retry => {
                match incoming.retry() {
                    Ok(()) => crate::metrics::count(crate::metrics::HANDSHAKES, "outcome", "retry"),
                    Err(e) => {
                        e.into_incoming().refuse();
                        refused("handshake_rate");
                    }
                }
                continue;
            }
            Admission::Busy(r) => Some(r),
            Admission::Serve => None,
        };
        shared.unauthenticated.fetch_add(1, Ordering::SeqCst);
        let unauthenticated = Unauthenticated(shared.clone());
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let shared2 = shared.clone();
        tokio::spawn(async move {
            match busy {
                Some(r) => {
                    crate::metrics::count(
                        crate::metrics::CONNECTIONS_REJECTED,
                        "reason",
                        "max_connections",
                    );
                    if let Ok(conn) = incoming.await {
                        quic::close(&conn, r.code, &r.reason);
                    }
                    drop(unauthenticated);
                }
                None => conn::run(shared2.clone(), incoming, unauthenticated).await,
            }
            shared2.connections.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Replaces the browsers' short-lived certificate before it expires
/// (checked hourly); new connections get the new one at once, open ones
/// keep theirs.
async fn renew_web_certs(
    certs: Arc<tls::EphemeralCert>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
            () = stop.cancelled() => return,
        }
        match certs.renew_if_due(std::time::SystemTime::now()) {
            Ok(true) => {
                info!(sha256 = %tls::hex(&certs.current().sha256), "renewed the web certificate")
            }
            Ok(false) => {}
            Err(e) => warn!(error = %e, "could not renew the web certificate"),
        }
    }
}

/// Drops history entries older than `channel_history_age` (quiet channels
/// are not trimmed by new clips).
async fn trim_history(shared: &Shared, now: u64) {
    let (depth, cutoff) = (
        shared.config.channel_history_depth,
        shared.config.history_cutoff_ms(now),
    );
    let mut gone = Vec::new();
    for mut h in shared.history.iter_mut() {
        let channel = h.key().clone();
        gone.extend(
            h.trim(depth, cutoff)
                .into_iter()
                .map(|id| (channel.clone(), id)),
        );
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
                shared.set_public_keys(keys);
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

/// Counts every session's bytes into the usage book, forgets old days and
/// writes the book, every `usage_interval`.
async fn usage_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.usage_interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.shutdown.cancelled() => return,
        }
        crate::admin::off_runtime(shared.clone(), |s| s.count_usage()).await;
        shared.usage.prune(crate::usage::today());
        shared.save_usage().await;
    }
}

/// Keeps an `Expired` notice for every copy about to be dropped at the
/// TTL (`ttl`: created before it), durably before the copies go, and tells
/// their users who are online; prunes notices that waited their time.
/// False if the notices could not be written (the copies stay for now).
async fn note_expiring(shared: &Shared, ttl: u64, now: u64) -> bool {
    let cfg = &shared.config;
    let keep = cfg
        .clip_ttl
        .saturating_add(cfg.expired_notice_ttl)
        .as_millis() as u64;
    shared.expired.prune(now.saturating_sub(keep));
    let doomed = shared.store.expiring(ttl);
    let mut told: HashMap<Arc<str>, Vec<codec::wire::Expired>> = HashMap::default();
    for (user, clip) in &doomed {
        if let Some(n) = shared.expired.add(user, &clip.meta) {
            told.entry(user.clone()).or_default().push(n);
        }
    }
    metrics::gauge!(crate::metrics::EXPIRED_NOTICES).set(shared.expired.len() as f64);
    if !shared.save_expired().await {
        return false;
    }
    for (user, notices) in told {
        if let Some(s) = shared.router.session(&user) {
            // Not awaited here: a client that does not read its control
            // stream must not hold up the sweep for everyone.
            tokio::spawn(async move { s.send_expired(notices).await });
        }
    }
    true
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
        if !note_expiring(&shared, ttl, now).await {
            // Not dropped before its users can be told: next sweep.
            continue;
        }
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
