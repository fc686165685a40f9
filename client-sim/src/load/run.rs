//! The load driver: virtual users over a few quinn endpoints, each with a
//! connection task, an event task and a talker task that sleeps until its
//! next clip (no busy waiting). Every clip goes through the ledger, every
//! timing into a histogram.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use codec::token::TokenKey;
use codec::wire::{ClipId, Target};
use rand::Rng;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until};

use super::impair::{self, Impairment};
use super::report::{Report, TimePoint};
use super::source::Source;
use super::stats::Latency;
use super::verify::{self, Ledger, Verdict};
use super::workload::{Mode, PressFrom, Workload};
use ptt_client::client::{
    Client, ClientError, ClientOptions, Event, OutgoingClip, Pacing, SeenIds,
};
use ptt_client::net;

/// Waits between a user's failed connection attempts (the shared rule,
/// `codec::retry`): 50 ms doubling to 3.2 s.
const RECONNECT: codec::retry::Backoff = codec::retry::Backoff {
    min: Duration::from_millis(50),
    max: Duration::from_millis(3200),
};

/// Waits before sending a refused clip again: 20 ms doubling to 2 s,
/// never sooner than the relay's `retry_after_ms`.
const RESEND: codec::retry::Backoff = codec::retry::Backoff {
    min: Duration::from_millis(20),
    max: Duration::from_secs(2),
};

/// Where and as whom to load.
pub struct LoadTarget {
    /// The relays; users are spread over them round-robin (user `i` on
    /// relay `i % n`): several relays of one cluster.
    pub relays: Vec<SocketAddr>,
    pub server_name: String,
    pub ca: PathBuf,
    pub key: TokenKey,
    /// The relay's process, when local: its CPU and RSS are sampled.
    pub relay_pid: Option<u32>,
}

/// Times of one clip, joined from the sender's and the recipient's side.
#[derive(Default)]
struct ClipTimes {
    /// The talker pressed (before connecting, when asleep).
    pressed: Option<Instant>,
    /// The same moment, Unix time in µs, against the relay's `created_ms`.
    pressed_unix_us: u64,
    /// The relay had the clip's header (its `Delivery.created_ms`).
    at_relay_ms: Option<u64>,
    opened: Option<Instant>,
    first_sent: Option<Instant>,
    finished: Option<Instant>,
    started: Option<Instant>,
    first_recv: Option<Instant>,
    complete: Option<Instant>,
    live: bool,
}

#[derive(Default)]
struct Hists {
    first_frame: Latency,
    access: Latency,
    press_relay: Latency,
    press_listener: Latency,
    delivery: Latency,
    ack: Latency,
}

#[derive(Default)]
struct Counters {
    clips_started: AtomicU64,
    clips_accepted: AtomicU64,
    send_failed: AtomicU64,
    send_retries: AtomicU64,
    cut: AtomicU64,
    packets: AtomicU64,
    opus_bytes: AtomicU64,
    voice_ms: AtomicU64,
    delivered_voice_ms: AtomicU64,
    wire_bytes: AtomicU64,
    connect_bytes: AtomicU64,
    datagrams: AtomicU64,
    datagrams_from_relay: AtomicU64,
    /// Datagrams of connections with one role, by leg and direction
    /// ([`LEGS`]).
    leg_datagrams: [AtomicU64; LEGS.len()],
    /// QUIC frames on the same legs and directions, by [`FRAME_KINDS`].
    leg_frames: [[AtomicU64; FRAME_KINDS.len()]; LEGS.len()],
    /// Connections that both sent and received clips (no per-leg count).
    mixed_connections: AtomicU64,
    ack_frames: AtomicU64,
    connects: AtomicU64,
    zero_rtt_connects: AtomicU64,
    connect_failures: AtomicU64,
}

struct Shared {
    w: Workload,
    /// Connection attempts in flight at once (`w.connecting`): a burst of
    /// thousands of handshakes would starve the generator's own core.
    connecting: tokio::sync::Semaphore,
    /// How many relays the users are spread over.
    relays: usize,
    source: Source,
    ledger: Mutex<Ledger>,
    times: Mutex<HashMap<(ClipId, u32), ClipTimes>>,
    /// Channel clips: the slowest member's first-packet latency so far.
    last_member: Mutex<HashMap<ClipId, Duration>>,
    hists: Mutex<Hists>,
    c: Counters,
    start: Instant,
    /// `start` on the wall clock (Unix ms).
    started_unix_ms: u64,
    /// Users stop starting clips.
    stop_talking: watch::Sender<bool>,
    /// Users disconnect for good.
    quit: watch::Sender<bool>,
    /// Bumped at a reconnect storm.
    storm: watch::Sender<u64>,
    seconds: Mutex<Vec<TimePoint>>,
    /// Clip rejections by error code.
    rejections: Mutex<BTreeMap<String, u64>>,
    /// Failed connection attempts by reason.
    connect_errors: Mutex<BTreeMap<String, u64>>,
}

fn count(m: &Mutex<BTreeMap<String, u64>>, key: &str) {
    if let Ok(mut m) = m.lock() {
        *m.entry(key.to_owned()).or_default() += 1;
    }
}

struct User {
    index: u32,
    name: String,
    token: String,
    endpoint: quinn::Endpoint,
    client: watch::Sender<Option<Arc<Client>>>,
    generation: AtomicU64,
    seen: SeenIds,
    online_at: Duration,
}

fn user_name(i: usize) -> String {
    format!("load-{i:06}")
}

fn channel_name(i: usize) -> String {
    format!("load-ch-{i:05}")
}

/// Runs a workload; returns the report.
pub async fn run(target: LoadTarget, w: Workload, source: Source) -> anyhow::Result<Report> {
    w.validate()?;
    anyhow::ensure!(!target.relays.is_empty(), "no relay to load");
    let first = target.relays[0];
    let mut rng = rand::rng();
    let imp = Impairment {
        loss: w.loss_pct / 100.0,
        delay: w.delay,
        jitter: w.jitter,
        reorder: w.reorder_pct / 100.0,
    };
    let transport = net::Transport {
        zero_rtt: w.zero_rtt,
        ack_threshold: w.client_ack_threshold,
        ack_delay: w.client_ack_delay,
        keep_alive: w.client_keep_alive,
    };
    let client_cfg = net::client_config_with(&target.ca, &transport)?;
    let bind: SocketAddr = if first.is_ipv6() {
        "[::1]:0".parse()?
    } else {
        "127.0.0.1:0".parse()?
    };
    let bind = if first.ip().is_loopback() {
        bind
    } else if first.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let mut endpoints = Vec::new();
    for _ in 0..w.endpoints {
        let sock = impair::socket(bind, imp).context("binding a client socket")?;
        let mut ep = quinn::Endpoint::new_with_abstract_socket(
            net::endpoint_config(),
            None,
            sock,
            Arc::new(quinn::TokioRuntime),
        )?;
        ep.set_default_client_config(client_cfg.clone());
        endpoints.push(ep);
    }
    let ttl = w.duration + w.grace + Duration::from_secs(3600);
    let users: Vec<Arc<User>> = (0..w.users)
        .map(|i| {
            let name = user_name(w.first_user + i);
            let offline = rng.random_bool(w.offline_share.clamp(0.0, 1.0));
            let online_at = if offline {
                w.duration.mul_f64(rng.random::<f64>() * 0.5)
            } else {
                Duration::ZERO
            };
            Ok(Arc::new(User {
                index: i as u32,
                token: if let Some(ch) = i.checked_div(w.channel_size) {
                    let ch = channel_name(w.first_user + ch);
                    target.key.mint_with_channels(
                        &name,
                        ttl,
                        [(ch, codec::token::Right::Talk)].into_iter().collect(),
                    )?
                } else {
                    target.key.mint(&name, ttl)?
                },
                name,
                endpoint: endpoints[i % endpoints.len()].clone(),
                client: watch::Sender::new(None),
                generation: AtomicU64::new(0),
                seen: SeenIds::new(100_000),
                online_at,
            }))
        })
        .collect::<anyhow::Result<_>>()?;
    let shared = Arc::new(Shared {
        connecting: tokio::sync::Semaphore::new(w.connecting),
        relays: target.relays.len(),
        w: w.clone(),
        source,
        ledger: Mutex::new(Ledger::new()),
        times: Mutex::new(HashMap::new()),
        last_member: Mutex::new(HashMap::new()),
        hists: Mutex::new(Hists::default()),
        c: Counters::default(),
        start: Instant::now(),
        started_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        stop_talking: watch::Sender::new(false),
        quit: watch::Sender::new(false),
        storm: watch::Sender::new(0),
        seconds: Mutex::new(Vec::new()),
        rejections: Mutex::new(BTreeMap::new()),
        connect_errors: Mutex::new(BTreeMap::new()),
    });
    let target = Arc::new(target);
    let mut tasks = tokio::task::JoinSet::new();
    for u in &users {
        // A talker whose phone sleeps between presses connects per clip.
        if !(w.press_from == PressFrom::Asleep && is_talker(&w, u.index)) {
            tasks.spawn(connection(shared.clone(), target.clone(), u.clone()));
        }
    }
    let mut talkers = tokio::task::JoinSet::new();
    for u in &users {
        talkers.spawn(talker(
            shared.clone(),
            target.clone(),
            u.clone(),
            users.len(),
        ));
    }
    let sampler = tokio::spawn(sample(shared.clone(), target.relay_pid));
    let progress = super::report::progress(w.duration);

    // The run: storm and rebind events, progress.
    let end = shared.start + w.duration;
    let mut storm_done = w.storm_at.is_none();
    let mut rebind_done = w.rebind_at.is_none();
    while Instant::now() < end {
        sleep(Duration::from_millis(250)).await;
        let t = shared.start.elapsed();
        if !storm_done && w.storm_at.is_some_and(|s| t >= s) {
            storm_done = true;
            shared.storm.send_modify(|g| *g += 1);
        }
        if !rebind_done && w.rebind_at.is_some_and(|s| t >= s) {
            rebind_done = true;
            for ep in &endpoints {
                let sock = impair::socket(bind, imp).context("binding a new socket")?;
                ep.rebind_abstract(sock)?;
            }
        }
        let l = shared.ledger.lock().map(|l| l.counts()).unwrap_or_default();
        progress.update(
            t,
            shared.c.clips_started.load(Ordering::Relaxed),
            l.deliveries_ok,
        );
        if w.max_clips > 0 && shared.c.clips_started.load(Ordering::Relaxed) >= w.max_clips {
            break;
        }
    }
    shared.stop_talking.send_replace(true);
    let talking_secs = shared.start.elapsed().as_secs_f64();
    // Clips in flight finish (live ones take as long as they last).
    let drain_until = Instant::now() + w.clip_max + w.grace;
    while !talkers.is_empty() {
        tokio::select! {
            _ = talkers.join_next() => {}
            () = sleep_until(drain_until) => { talkers.abort_all(); break; }
        }
    }
    // Everything owed arrives, or the grace period ends.
    let grace_end = Instant::now() + w.grace;
    loop {
        let owed = shared.ledger.lock().map(|l| l.owed()).unwrap_or(0);
        if owed == 0 || Instant::now() >= grace_end {
            break;
        }
        progress.draining(owed);
        sleep(Duration::from_millis(100)).await;
    }
    let elapsed = shared.start.elapsed();
    progress.finish();
    let _ = shared.quit.send(true);
    while tasks.join_next().await.is_some() {}
    let relay_usage = sampler.await.ok().flatten();
    for ep in &endpoints {
        ep.close(0u32.into(), b"load done");
    }
    for ep in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
    }
    let counts = shared.ledger.lock().map(|l| l.finish()).unwrap_or_default();
    let hists = std::mem::take(
        &mut *shared
            .hists
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?,
    );
    let seconds = std::mem::take(
        &mut *shared
            .seconds
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?,
    );
    let c = &shared.c;
    // Per-leg counts only when no connection both sent and received.
    let one_leg_each = c.mixed_connections.load(Ordering::Relaxed) == 0;
    Ok(Report::build(super::report::Inputs {
        workload: w,
        counts,
        talking_secs,
        elapsed,
        started_unix_ms: shared.started_unix_ms,
        clips_started: c.clips_started.load(Ordering::Relaxed),
        clips_accepted: c.clips_accepted.load(Ordering::Relaxed),
        send_failed: c.send_failed.load(Ordering::Relaxed),
        send_retries: c.send_retries.load(Ordering::Relaxed),
        cut: c.cut.load(Ordering::Relaxed),
        packets: c.packets.load(Ordering::Relaxed),
        opus_bytes: c.opus_bytes.load(Ordering::Relaxed),
        voice_ms: c.voice_ms.load(Ordering::Relaxed),
        delivered_voice_ms: c.delivered_voice_ms.load(Ordering::Relaxed),
        wire_bytes: c.wire_bytes.load(Ordering::Relaxed),
        connect_bytes: c.connect_bytes.load(Ordering::Relaxed),
        datagrams: c.datagrams.load(Ordering::Relaxed),
        datagrams_from_relay: c.datagrams_from_relay.load(Ordering::Relaxed),
        leg_datagrams: one_leg_each.then(|| {
            c.leg_datagrams
                .each_ref()
                .map(|d| d.load(Ordering::Relaxed))
        }),
        leg_frames: one_leg_each.then(|| {
            c.leg_frames
                .each_ref()
                .map(|l| l.each_ref().map(|f| f.load(Ordering::Relaxed)))
        }),
        ack_frames: c.ack_frames.load(Ordering::Relaxed),
        connects: c.connects.load(Ordering::Relaxed),
        zero_rtt_connects: c.zero_rtt_connects.load(Ordering::Relaxed),
        connect_failures: c.connect_failures.load(Ordering::Relaxed),
        first_frame: hists.first_frame,
        last_member: {
            let mut l = Latency::new();
            if let Ok(m) = shared.last_member.lock() {
                for d in m.values() {
                    l.record(*d);
                }
            }
            l
        },
        access: hists.access,
        press_relay: hists.press_relay,
        press_listener: hists.press_listener,
        delivery: hists.delivery,
        ack: hists.ack,
        timeline: seconds,
        rejections: shared
            .rejections
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default(),
        connect_errors: shared
            .connect_errors
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default(),
        relay: relay_usage,
    }))
}

/// Keeps a user connected: connects when it comes online, reconnects after
/// a loss or a storm, and leaves at the end.
async fn connection(s: Arc<Shared>, t: Arc<LoadTarget>, u: Arc<User>) {
    let mut quit = s.quit.subscribe();
    let mut storm = s.storm.subscribe();
    if !u.online_at.is_zero() {
        tokio::select! {
            () = sleep_until(s.start + u.online_at) => {}
            _ = quit.wait_for(|q| *q) => return,
        }
    }
    let mut attempt = 0u32;
    loop {
        if *quit.borrow() {
            return;
        }
        let attempt_result = {
            let _permit = s.connecting.acquire().await;
            connect(&s, &t, &u).await
        };
        let (client, events) = match attempt_result {
            Ok(x) => x,
            Err(e) => {
                attempt += 1;
                if !e.is_retryable() && attempt > 20 {
                    tracing::warn!(user = %u.name, error = %e, "giving up connecting");
                    return;
                }
                let wait = RECONNECT.delay(attempt - 1, rand::random());
                tokio::select! {
                    () = sleep(wait) => continue,
                    _ = quit.wait_for(|q| *q) => return,
                }
            }
        };
        attempt = 0;
        let generation = u.generation.fetch_add(1, Ordering::SeqCst) + 1;
        u.client.send_replace(Some(client.clone()));
        let mut ev = tokio::spawn(consume(
            s.clone(),
            u.clone(),
            client.clone(),
            events,
            generation,
        ));
        storm.borrow_and_update();
        // 0: connection lost, 1: storm, 2: the run is over.
        let why = tokio::select! {
            _ = client.closed() => 0,
            _ = storm.changed() => 1,
            r = quit.wait_for(|q| *q) => { drop(r); 2 }
        };
        let storm_hit = why == 1;
        if why == 2 {
            u.client.send_replace(None);
            add_wire(&s, &u, &client);
            client.shutdown().await;
            if tokio::time::timeout(Duration::from_secs(2), &mut ev)
                .await
                .is_err()
            {
                ev.abort();
            }
            return;
        }
        u.client.send_replace(None);
        add_wire(&s, &u, &client);
        if storm_hit {
            // Everyone drops at once, without a goodbye.
            client.close();
        }
        ev.abort();
    }
}

/// One connection of user `u`, counted (and its failure by reason).
async fn connect(s: &Shared, t: &LoadTarget, u: &User) -> Result<Connected, ClientError> {
    let r = Client::connect(
        &u.endpoint,
        relay_of(t, u),
        &t.server_name,
        &u.token,
        options(u),
    )
    .await;
    counted(s, r)
}

/// User `i` is on relay `i % n`.
fn relay_of(t: &LoadTarget, u: &User) -> SocketAddr {
    t.relays[u.index as usize % t.relays.len()]
}

fn options(u: &User) -> ClientOptions {
    ClientOptions {
        seen: Some(u.seen.clone()),
        event_queue: 64,
        packet_events: false,
        // Each clip's own latency is measured: none waits for another.
        in_order: false,
    }
}

type Connected = (Arc<Client>, tokio::sync::mpsc::Receiver<Event>);

/// Counts a connection attempt (and its failure by reason).
fn counted(s: &Shared, r: Result<Connected, ClientError>) -> Result<Connected, ClientError> {
    match r {
        Ok((client, events)) => {
            s.c.connects.fetch_add(1, Ordering::Relaxed);
            let st = client.connection().stats();
            s.c.connect_bytes
                .fetch_add(st.udp_tx.bytes + st.udp_rx.bytes, Ordering::Relaxed);
            if client.zero_rtt() {
                s.c.zero_rtt_connects.fetch_add(1, Ordering::Relaxed);
            }
            Ok((client, events))
        }
        Err(e) => {
            count_failure(s, &e);
            Err(e)
        }
    }
}

fn count_failure(s: &Shared, e: &ClientError) {
    s.c.connect_failures.fetch_add(1, Ordering::Relaxed);
    let kind = match e {
        ClientError::Closed { code, .. } => code.name().to_owned(),
        ClientError::Connect(m) if m.contains("refused") => "refused".into(),
        _ => "other".into(),
    };
    count(&s.connect_errors, &kind);
}

/// A press from sleep: connects and starts the clip's upload at once,
/// before `Welcome` (in 0-RTT when resuming: its first audio rides with
/// the handshake), paced live while the connection completes. When the
/// relay refused the early data, the clip goes again on the connection.
async fn press_from_sleep(
    s: &Shared,
    t: &LoadTarget,
    u: &User,
    clip: &OutgoingClip,
) -> (
    Option<Connected>,
    Result<ptt_client::SendOutcome, ClientError>,
) {
    let connecting =
        match Client::begin(&u.endpoint, relay_of(t, u), &t.server_name, &u.token).await {
            Ok(c) => c,
            Err(e) => {
                count_failure(s, &e);
                return (None, Err(e));
            }
        };
    let mut upload = match connecting
        .upload(clip.id, clip.target.clone(), clip.format)
        .await
    {
        Ok(up) => up,
        Err(e) => {
            count_failure(s, &e);
            return (None, Err(e));
        }
    };
    let opened_at = Instant::now();
    // Paced live while the connection completes.
    let (sent_at, finished) = tokio::join!(upload.send_paced(clip), connecting.finish(options(u)));
    let connected = match counted(s, finished) {
        Ok(c) => c,
        Err(e) => return (None, Err(e)),
    };
    let outcome = match upload.answer().await {
        Ok(duplicate) => Ok(ptt_client::SendOutcome::new(
            clip.id, duplicate, opened_at, sent_at,
        )),
        // The early data was refused (or the stream lost): send it again.
        Err(e) if e.is_retryable() && connected.0.connection().close_reason().is_none() => {
            connected.0.send_clip(clip, Pacing::Upload).await
        }
        Err(e) => Err(e),
    };
    (Some(connected), outcome)
}

fn is_talker(w: &Workload, index: u32) -> bool {
    if w.pairs {
        return index.is_multiple_of(2);
    }
    w.channel_size == 0
        || w.talkers_per_channel == 0
        || (index as usize % w.channel_size) < w.talkers_per_channel
}

/// The one leg a user's connection carries: it only sends clips (sender
/// ↔ relay) or only receives them (relay ↔ recipient); `None` when it
/// does both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leg {
    Sender,
    Recipient,
}

fn leg(w: &Workload, index: u32) -> Option<Leg> {
    let one_talker = w.channel_size >= 2 && w.talkers_per_channel == 1;
    if !(w.pairs || one_talker) {
        return None;
    }
    Some(if is_talker(w, index) {
        Leg::Sender
    } else {
        Leg::Recipient
    })
}

/// The legs and directions of the per-leg counts (the report's
/// `datagrams_per_clip_*` and `frames_per_clip`), in the order of
/// [`Counters::leg_datagrams`].
pub const LEGS: [&str; 4] = [
    "sender_to_relay",
    "relay_to_sender",
    "relay_to_recipient",
    "recipient_to_relay",
];

/// The kinds of QUIC frames counted per leg (the report's
/// `frames_per_clip`): what the datagrams carry.
pub const FRAME_KINDS: [&str; 5] = ["ack", "stream", "max_streams", "max_data", "other"];

/// `f`'s frames by [`FRAME_KINDS`] (PADDING not counted).
fn frame_kinds(f: &quinn::FrameStats) -> [u64; FRAME_KINDS.len()] {
    let other = f.ack_frequency
        + f.crypto
        + f.connection_close
        + f.data_blocked
        + f.datagram
        + u64::from(f.handshake_done)
        + f.immediate_ack
        + f.new_connection_id
        + f.new_token
        + f.path_challenge
        + f.path_response
        + f.ping
        + f.reset_stream
        + f.retire_connection_id
        + f.stream_data_blocked
        + f.streams_blocked_bidi
        + f.streams_blocked_uni
        + f.stop_sending;
    [
        f.acks,
        f.stream,
        f.max_streams_bidi + f.max_streams_uni,
        f.max_data + f.max_stream_data,
        other,
    ]
}

fn add_wire(s: &Shared, u: &User, c: &Client) {
    let st = c.connection().stats();
    // By leg and direction, at its index in [`LEGS`].
    let add = |at: usize, datagrams: u64, frames: &quinn::FrameStats| {
        s.c.leg_datagrams[at].fetch_add(datagrams, Ordering::Relaxed);
        for (n, k) in s.c.leg_frames[at].iter().zip(frame_kinds(frames)) {
            n.fetch_add(k, Ordering::Relaxed);
        }
    };
    match leg(&s.w, u.index) {
        Some(Leg::Sender) => {
            add(0, st.udp_tx.datagrams, &st.frame_tx);
            add(1, st.udp_rx.datagrams, &st.frame_rx);
        }
        Some(Leg::Recipient) => {
            add(2, st.udp_rx.datagrams, &st.frame_rx);
            add(3, st.udp_tx.datagrams, &st.frame_tx);
        }
        None => {
            s.c.mixed_connections.fetch_add(1, Ordering::Relaxed);
        }
    }
    s.c.wire_bytes
        .fetch_add(st.udp_tx.bytes + st.udp_rx.bytes, Ordering::Relaxed);
    s.c.datagrams
        .fetch_add(st.udp_tx.datagrams + st.udp_rx.datagrams, Ordering::Relaxed);
    s.c.datagrams_from_relay
        .fetch_add(st.udp_rx.datagrams, Ordering::Relaxed);
    s.c.ack_frames
        .fetch_add(st.frame_tx.acks + st.frame_rx.acks, Ordering::Relaxed);
}

/// Reads one connection's events into the ledger and the histograms.
async fn consume(
    s: Arc<Shared>,
    u: Arc<User>,
    client: Arc<Client>,
    mut events: tokio::sync::mpsc::Receiver<Event>,
    generation: u64,
) {
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Started { delivery, at, .. } => {
                if let Ok(mut t) = s.times.lock() {
                    let e = t.entry((delivery.clip_id, u.index)).or_default();
                    e.started = Some(at);
                    e.at_relay_ms = Some(delivery.created_ms);
                    e.live = delivery.live;
                }
            }
            Event::FirstPacket { id, at } => {
                if let Ok(mut t) = s.times.lock() {
                    t.entry((id, u.index)).or_default().first_recv = Some(at);
                }
            }
            // The connection closes next; the connection task reconnects.
            Event::Packets { .. } | Event::GoAway { .. } => {}
            Event::Complete(clip) => {
                let id = clip.id();
                let sum = verify::checksum(&clip.packets, clip.end.final_granule);
                let verdict = s
                    .ledger
                    .lock()
                    .map(|mut l| l.arrived(u.index, id, sum, generation))
                    .unwrap_or(Verdict::Ok);
                if verdict != Verdict::Corrupted {
                    let _ = client.ack(id).await;
                }
                if verdict == Verdict::Ok {
                    let ms = clip.end.final_granule / 48;
                    s.c.delivered_voice_ms.fetch_add(ms, Ordering::Relaxed);
                    if let Ok(mut t) = s.times.lock() {
                        t.entry((id, u.index)).or_default().complete = Some(clip.received_at);
                        join_times(&s, &mut t, (id, u.index));
                    }
                } else {
                    tracing::warn!(user = %u.name, clip = %id, ?verdict, "bad delivery");
                }
            }
            Event::Cut { .. } => {
                s.c.cut.fetch_add(1, Ordering::Relaxed);
            }
            Event::Expired(x) => {
                // The ledger counts the clip lost; told, so acked.
                tracing::warn!(user = %u.name, clip = %x.clip_id, also = x.also, "clip expired undelivered");
                let _ = client.ack(x.clip_id).await;
            }
            Event::Redelivered { id } => {
                let v = s
                    .ledger
                    .lock()
                    .map(|mut l| l.redelivered(u.index, id, generation))
                    .unwrap_or(Verdict::Ok);
                if v != Verdict::Ok {
                    tracing::warn!(user = %u.name, clip = %id, "duplicate delivery");
                }
            }
        }
    }
}

/// Records a clip's latencies once both sides are known.
fn join_times(s: &Shared, t: &mut HashMap<(ClipId, u32), ClipTimes>, id: (ClipId, u32)) {
    let Some(e) = t.get(&id) else { return };
    let (Some(finished), Some(complete)) = (e.finished, e.complete) else {
        return;
    };
    if let Ok(mut h) = s.hists.lock() {
        h.delivery
            .record(complete.saturating_duration_since(finished));
        // First-frame and access latencies mean something only for clips
        // relayed while they were sent.
        if e.live {
            if let (Some(a), Some(b)) = (e.first_sent, e.first_recv) {
                let d = b.saturating_duration_since(a);
                h.first_frame.record(d);
                if s.w.channel_size > 0
                    && let Ok(mut m) = s.last_member.lock()
                {
                    let v = m.entry(id.0).or_default();
                    *v = (*v).max(d);
                }
            }
            if let (Some(a), Some(b)) = (e.opened, e.started) {
                h.access.record(b.saturating_duration_since(a));
            }
            if let (Some(a), Some(b)) = (e.pressed, e.started) {
                h.press_listener.record(b.saturating_duration_since(a));
            }
            if let Some(ms) = e.at_relay_ms
                && e.pressed.is_some()
            {
                let us = (ms * 1000).saturating_sub(e.pressed_unix_us);
                h.press_relay.record(Duration::from_micros(us));
            }
        }
    }
    let now = s.start.elapsed().as_secs() as usize;
    if let Ok(mut sec) = s.seconds.lock() {
        while sec.len() <= now {
            let t = sec.len() as u64;
            sec.push(TimePoint {
                t_s: t,
                ..TimePoint::default()
            });
        }
        let p = &mut sec[now];
        p.clips_delivered += 1;
        if let (Some(finished), Some(complete)) = (e.finished, e.complete) {
            let ms = complete.saturating_duration_since(finished).as_secs_f64() * 1000.0;
            p.delivery_max_ms = p.delivery_max_ms.max(ms);
        }
        if let (Some(a), Some(b)) = (e.first_sent, e.first_recv)
            && e.live
        {
            let ms = b.saturating_duration_since(a).as_secs_f64() * 1000.0;
            p.first_frame_max_ms = p.first_frame_max_ms.max(ms);
        }
    }
    t.remove(&id);
}

/// One user's talking: Poisson arrivals of clips to random other users.
async fn talker(s: Arc<Shared>, t: Arc<LoadTarget>, u: Arc<User>, users: usize) {
    let w = &s.w;
    if !is_talker(w, u.index) {
        return; // a listener only
    }
    let asleep = w.press_from == PressFrom::Asleep;
    let mut clients = u.client.subscribe();
    let mut stop = s.stop_talking.subscribe();
    loop {
        let gap = {
            let mut rng = rand::rng();
            let x: f64 = rng.random::<f64>().max(1e-12);
            w.talk_interval.mul_f64(-x.ln())
        };
        tokio::select! {
            () = sleep(gap) => {}
            r = stop.wait_for(|s| *s) => { drop(r); return; }
        }
        if *s.stop_talking.borrow() {
            return;
        }
        if !asleep && clients.borrow().is_none() {
            // Offline: the clip would be recorded and sent later; here the
            // user simply talks once online.
            continue;
        }
        let n = s.c.clips_started.fetch_add(1, Ordering::Relaxed) + 1;
        if w.max_clips > 0 && n > w.max_clips {
            return;
        }
        let (recipients, clip) = {
            let mut rng = rand::rng();
            let (target, recipients) =
                if let Some(ch) = (u.index as usize).checked_div(w.channel_size) {
                    let members = (ch * w.channel_size..((ch + 1) * w.channel_size).min(users))
                        .filter(|m| *m != u.index as usize)
                        .map(|m| m as u32)
                        .collect::<Vec<u32>>();
                    (Target::Channel(channel_name(w.first_user + ch)), members)
                } else {
                    let n = s.relays;
                    let r = if w.pairs {
                        u.index as usize + 1
                    } else if w.cross_relay && n > 1 && users > n {
                        // Someone on another relay: pick among the users
                        // whose relay differs (user i is on relay i % n).
                        let me = u.index as usize % n;
                        loop {
                            let r = rng.random_range(0..users);
                            if r % n != me {
                                break r;
                            }
                        }
                    } else {
                        let mut r = rng.random_range(0..users - 1);
                        if r >= u.index as usize {
                            r += 1;
                        }
                        r
                    };
                    (Target::User(user_name(w.first_user + r)), vec![r as u32])
                };
            let (packets, samples) = s.source.random_clip(w.clip_min, w.clip_max, &mut rng);
            let sum = verify::checksum(&packets, samples);
            let id = verify::clip_id(rng.random(), sum);
            let clip = OutgoingClip {
                id,
                target,
                format: s.source.format,
                packets,
                final_granule: samples,
            };
            (recipients, clip)
        };
        if let Ok(mut l) = s.ledger.lock() {
            for r in &recipients {
                l.sending(*r, clip.id);
            }
        }
        let voice_ms = clip.final_granule / 48;
        let bytes: u64 = clip.packets.iter().map(|p| p.len() as u64).sum();
        let pacing = match w.mode {
            Mode::Live => Pacing::Live,
            Mode::Upload => Pacing::Upload,
        };
        let pressed = Instant::now();
        let pressed_unix_us = unix_us();
        let mut attempt = 0u32;
        loop {
            // Asleep: this press wakes the phone, which connects and sends
            // the clip in one go (the events channel is kept until it
            // leaves; a lone talker is owed nothing).
            let (client, _events, sent) = if asleep {
                let (connected, sent) = press_from_sleep(&s, &t, &u, &clip).await;
                match connected {
                    Some((c, ev)) => (Some(c), Some(ev), sent),
                    None => (None, None, sent),
                }
            } else {
                let client = match clients.wait_for(|c| c.is_some()).await {
                    Ok(c) => c.clone(),
                    Err(_) => return,
                };
                let Some(client) = client else { continue };
                let sent = client.send_clip(&clip, pacing).await;
                (Some(client), None, sent)
            };
            if asleep && let Some(c) = &client {
                // Back to sleep.
                add_wire(&s, &u, c);
                c.shutdown().await;
            }
            match sent {
                Ok(out) => {
                    s.c.clips_accepted.fetch_add(1, Ordering::Relaxed);
                    s.c.packets
                        .fetch_add(clip.packets.len() as u64, Ordering::Relaxed);
                    s.c.opus_bytes.fetch_add(bytes, Ordering::Relaxed);
                    s.c.voice_ms.fetch_add(voice_ms, Ordering::Relaxed);
                    if let Ok(mut l) = s.ledger.lock() {
                        for r in &recipients {
                            l.accepted(*r, clip.id);
                        }
                    }
                    if let Ok(mut h) = s.hists.lock() {
                        h.ack
                            .record(Instant::now().saturating_duration_since(out.finished_at));
                    }
                    if !out.duplicate
                        && let Ok(mut t) = s.times.lock()
                    {
                        for r in &recipients {
                            let e = t.entry((clip.id, *r)).or_default();
                            e.pressed = Some(pressed);
                            e.pressed_unix_us = pressed_unix_us;
                            e.opened = Some(out.opened_at);
                            e.first_sent = out.sent_at.first().copied();
                            e.finished = Some(out.finished_at);
                            join_times(&s, &mut t, (clip.id, *r));
                        }
                    }
                    break;
                }
                Err(ClientError::Rejected {
                    code: codec::ErrorCode::FloorBusy,
                    ..
                }) => {
                    // Someone else is talking: this user lets go.
                    count(&s.rejections, "floor_busy");
                    break;
                }
                Err(e) if e.is_retryable() && attempt < 10 => {
                    let hint = match &e {
                        ClientError::Rejected {
                            code,
                            retry_after_ms,
                            ..
                        } => {
                            count(&s.rejections, code.name());
                            Duration::from_millis((*retry_after_ms).min(60_000))
                        }
                        // The connection went: wait for the connection
                        // task to reconnect.
                        _ => {
                            if !asleep && let Some(c) = &client {
                                let _ =
                                    tokio::time::timeout(Duration::from_secs(2), c.closed()).await;
                            }
                            Duration::ZERO
                        }
                    };
                    s.c.send_retries.fetch_add(1, Ordering::Relaxed);
                    // Shed by the relay: back off as told (the shared rule).
                    sleep(RESEND.after_hint(attempt, hint, rand::random())).await;
                    attempt += 1;
                }
                Err(e) => {
                    if let ClientError::Rejected { code, .. } = &e {
                        count(&s.rejections, code.name());
                    }
                    tracing::debug!(user = %u.name, error = %e, "clip not sent");
                    s.c.send_failed.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
}

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// CPU and memory of the relay process, sampled every second.
#[derive(Debug, Clone, Copy, Default)]
pub struct RelayUsage {
    pub cpu_secs: f64,
    pub wall_secs: f64,
    pub rss_max_bytes: u64,
    pub rss_end_bytes: u64,
}

fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn proc_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

async fn sample(s: Arc<Shared>, pid: Option<u32>) -> Option<RelayUsage> {
    let pid = pid?;
    let cpu0 = proc_cpu_secs(pid)?;
    let t0 = Instant::now();
    let mut u = RelayUsage::default();
    let mut quit = s.quit.subscribe();
    loop {
        let last = tokio::select! {
            () = sleep(Duration::from_secs(1)) => false,
            _ = quit.wait_for(|q| *q) => true,
        };
        let (Some(cpu), Some(rss)) = (proc_cpu_secs(pid), proc_rss(pid)) else {
            break;
        };
        u.cpu_secs = cpu - cpu0;
        u.wall_secs = t0.elapsed().as_secs_f64();
        u.rss_max_bytes = u.rss_max_bytes.max(rss);
        u.rss_end_bytes = rss;
        if last {
            break;
        }
    }
    Some(u)
}
