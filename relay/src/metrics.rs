//! Metrics: every name the relay exports, described once in [`CATALOGUE`]
//! (which `docs/metrics.md` mirrors; a test keeps the two equal), the
//! Prometheus recorder, and the handles the hot path uses.
//!
//! Hot-path counters and histograms are registered once ([`hot`]) and then
//! cost an atomic add (or a lock-free push for a histogram sample) per
//! event: no name lookup, no allocation. Gauges that describe state (open
//! connections, store size, queue depth) are read when Prometheus scrapes,
//! not kept up to date on every change.
//!
//! `metrics = false` installs no recorder: every handle is then a no-op and
//! `/metrics` answers 404.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One exported metric.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Unit,
    /// Label names (values are a small fixed set; never a user id).
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

macro_rules! catalogue {
    ($($konst:ident = $name:literal, $kind:ident, $unit:ident, [$($label:literal),*], $help:literal;)*) => {
        $(pub const $konst: &str = $name;)*
        /// Every metric the relay exports (besides the `process_*` ones).
        pub const CATALOGUE: &[Metric] = &[$(Metric {
            name: $name,
            kind: Kind::$kind,
            unit: Unit::$unit,
            labels: &[$($label),*],
            help: $help,
        },)*];
    };
}

catalogue! {
    BUILD_INFO = "ptt_build_info", Gauge, Count, ["version"],
        "Always 1; the label carries the relay's version.";
    READY = "ptt_ready", Gauge, Count, [],
        "1 while the relay accepts connections, 0 while starting or draining.";
    HANDSHAKES = "ptt_handshakes_total", Counter, Count, ["outcome"],
        "QUIC handshakes by outcome: completed, failed, retry (address validation asked for under a handshake flood), refused (over the handshake rate after validation, past max_unauthenticated_connections, or while draining).";
    CONNECTIONS_OPEN = "ptt_connections_open", Gauge, Count, [],
        "QUIC connections open now (authenticated or not).";
    SESSIONS_OPEN = "ptt_sessions_open", Gauge, Count, [],
        "Authenticated sessions open now (one per user).";
    ZERO_RTT_AUTHS = "ptt_zero_rtt_auths_total", Counter, Count, [],
        "Auth messages with a valid token that came in QUIC 0-RTT (a resumed connection; counted when read, before the handshake completes): the Welcome leaves one round trip sooner.";
    CONNECTIONS_ACCEPTED = "ptt_connections_accepted_total", Counter, Count, ["transport"],
        "Connections that authenticated and became a session, by transport: quic (native ptt/1) or webtransport (a browser).";
    CONNECTIONS_REJECTED = "ptt_connections_rejected_total", Counter, Count, ["reason"],
        "Connections closed or refused before becoming a session: max_connections, handshake_rate, auth, unauthenticated_limit (past max_unauthenticated_connections), draining (a handshake while the relay shuts down) or webtransport (a browser's HTTP/3 handshake failed, or asked for a path other than /ptt).";
    AUTH_FAILURES = "ptt_auth_failures_total", Counter, Count, ["reason"],
        "Failed authentications by error code: unauthenticated, token_invalid, token_expired, protocol_violation.";
    GOAWAYS = "ptt_goaways_total", Counter, Count, [],
        "GoAway messages sent (clients told to reconnect elsewhere).";
    CLIPS_ACCEPTED = "ptt_clips_accepted_total", Counter, Count, ["target"],
        "New clips stored and acknowledged to their sender, by target kind (user, channel).";
    CLIPS_DUPLICATE = "ptt_clips_duplicate_total", Counter, Count, [],
        "Retries of an accepted clip answered `duplicate` (not delivered again).";
    CLIPS_REJECTED = "ptt_clips_rejected_total", Counter, Count, ["reason"],
        "Clips refused, by error code (rate_limited, server_busy, storage_full, floor_busy, not_allowed, clip_too_long, ...).";
    CLIPS_CUT = "ptt_clips_cut_total", Counter, Count, ["reason"],
        "Live clips cut for their listeners: cut_off (sender aborted, refused or superseded) or preempted (a priority talker took the floor).";
    CLIPS_EXPIRED = "ptt_clips_expired_total", Counter, Count, [],
        "Recipient copies dropped undelivered after clip_ttl.";
    EXPIRED_NOTICES = "ptt_expired_notices", Gauge, Count, [],
        "Expired notices waiting for their users' acks (set at each expiry sweep).";
    WIRE_BYTES = "ptt_wire_bytes_total", Counter, Bytes, ["direction"],
        "UDP payload bytes of authenticated sessions as the usage book counts them (sampled every usage_interval, at each scrape, at session end and before a usage answer), by direction: up (from clients) or down (to clients).";
    USAGE_USERS = "ptt_usage_users", Gauge, Count, [],
        "Users in the usage book (with traffic within usage_days).";
    USAGE_UNCOUNTED = "ptt_usage_uncounted_bytes_total", Counter, Bytes, [],
        "Bytes of users not counted in the usage book because it held usage_max_users users.";
    CLIPS_DELIVERED = "ptt_clips_delivered_total", Counter, Count, [],
        "Deliveries acknowledged by their recipient (the stored copy is released).";
    DELIVERIES = "ptt_deliveries_total", Counter, Count, ["path"],
        "Delivery streams opened, by path: live (cut-through while the sender talks) or stored (from the store).";
    LIVE_FALLBACKS = "ptt_live_fallbacks_total", Counter, Count, [],
        "Live offers refused because the recipient's live queue was full; the recipient gets the clip from the store.";
    PACKETS_IN = "ptt_packets_in_total", Counter, Count, [],
        "Opus packets received from senders (validated).";
    BYTES_IN = "ptt_bytes_in_total", Counter, Bytes, [],
        "Bytes of packet records received from senders.";
    PACKETS_OUT = "ptt_packets_out_total", Counter, Count, [],
        "Opus packets written to recipients' delivery streams.";
    BYTES_OUT = "ptt_bytes_out_total", Counter, Bytes, [],
        "Bytes of packet records written to recipients' delivery streams.";
    TOKEN_KEYS = "ptt_token_keys", Gauge, Count, [],
        "Public keys (token_keys, a JWKS) EdDSA and ES256 tokens are checked against; 0 when none are configured.";
    TOKEN_KEYS_RELOAD_FAILURES = "ptt_token_keys_reload_failures_total", Counter, Count, [],
        "Reloads of token_keys that failed (unreadable or invalid); the relay keeps the keys it had.";
    INFLIGHT_BYTES = "ptt_inflight_bytes", Gauge, Bytes, [],
        "Bytes of clips being uploaded now (bounded by max_inflight_bytes).";
    INFLIGHT_LIMIT = "ptt_inflight_limit_bytes", Gauge, Bytes, [],
        "max_inflight_bytes.";
    STORE_PENDING = "ptt_store_pending_copies", Gauge, Count, [],
        "Recipient copies in the store waiting for an ack.";
    STORE_BYTES = "ptt_store_bytes", Gauge, Bytes, [],
        "Bytes the store holds.";
    STORE_LIMIT = "ptt_store_limit_bytes", Gauge, Bytes, [],
        "max_store_bytes: past it new clips get storage_full.";
    STORE_IDS = "ptt_store_remembered_ids", Gauge, Count, [],
        "Clip ids remembered for the dedupe window.";
    STORE_SYNC = "ptt_store_sync_seconds", Histogram, Seconds, [],
        "Time of one disk store commit (write and fsync of a batch).";
    STORE_BATCH = "ptt_store_batch_ops", Histogram, Count, [],
        "Operations (appends, acks, ...) in one disk store commit.";
    QUEUE_DEPTH_MAX = "ptt_delivery_queue_depth_max", Gauge, Count, [],
        "The longest recipient queue now: live clips waiting to start plus stored deliveries not yet acknowledged.";
    QUEUE_DEPTH_TOTAL = "ptt_delivery_queue_depth", Gauge, Count, [],
        "All recipients' queues together (see ptt_delivery_queue_depth_max).";
    HOP_LATENCY = "ptt_relay_hop_seconds", Histogram, Seconds, [],
        "Live packets: from read off the sender's stream to written into a recipient's stream (one sample per write, per recipient).";
    SENDER_ACK_LATENCY = "ptt_sender_ack_seconds", Histogram, Seconds, [],
        "From a clip's last byte arriving to its Accepted (or Rejected) answer being ready to write: store append and sync.";
    FLOOR_GRANTS = "ptt_floor_grants_total", Counter, Count, [],
        "Channel floors taken (a talker's clip goes out).";
    FLOOR_BUSY = "ptt_floor_busy_total", Counter, Count, [],
        "Talkers answered floor_busy (someone else holds the floor).";
    FLOOR_PREEMPTIONS = "ptt_floor_preemptions_total", Counter, Count, [],
        "Floors taken from a talker by a priority talker.";
    CLUSTER_CONNECTED = "ptt_cluster_connected", Gauge, Count, [],
        "1 while the relay is connected to its cluster's NATS; 0 when cut off (cross-relay delivery stops, local service goes on) or not clustered.";
    CLUSTER_CLIPS = "ptt_cluster_clips_total", Counter, Count, ["direction"],
        "Live clips crossing between relays: out (published once per subject for users on other relays), in (received for users here).";
    PUSH_SENT = "ptt_push_sent_total", Counter, Count, ["provider", "outcome"],
        "Pushes to wake devices, by provider (apns, fcm) and outcome: sent; unregistered (the provider said the token is gone: its registration was dropped); retried (refused for now: sent again after Retry-After or a backoff); expired (still refused after push_ttl); failed (refused for good); dropped (push_queue full); unconfigured (the relay has no credentials for the provider).";
    PUSH_DELAY = "ptt_push_delay_seconds", Histogram, Seconds, [],
        "From a clip's first packet to its push request leaving for the provider (one sample per push).";
    PUSH_USERS = "ptt_push_users", Gauge, Count, [],
        "Users with at least one registered push device.";
    CLUSTER_HELD = "ptt_cluster_held_clips", Gauge, Count, [],
        "Clips this relay accepted while its cluster's JetStream could not take them (NATS unreachable), kept on its own disk and not yet written to the cluster; they are written and announced when the link is back (since this process started).";
    CLUSTER_BACKFILLED = "ptt_cluster_backfilled_total", Counter, Count, ["kind"],
        "Clips written to the cluster's JetStream after the link came back (or at start) that it did not have, by kind: direct (stored clips) or channel (channel history); each is announced to the relays of its recipients.";
    CLUSTER_KEPT = "ptt_cluster_kept_total", Counter, Count, ["outcome"],
        "Accepted direct clips and what the cluster kept of them: written (to JetStream, before Accepted), delivered (the recipient, hearing it live on this relay, acked it within cluster_keep_wait: no copy needed).";
    CLUSTER_CAUGHT_UP = "ptt_cluster_caught_up_total", Counter, Count, ["kind"],
        "Clips for users connected here that the relay took from the cluster's JetStream after its link came back, not having them (their announcements were missed while cut off), by kind: direct or channel.";
    CLUSTER_LINK_LOST = "ptt_cluster_link_lost_total", Counter, Count, [],
        "Times the NATS link was lost (a closed connection, or three unanswered pings).";
    CLUSTER_CHORES_DROPPED = "ptt_cluster_chores_dropped_total", Counter, Count, [],
        "Acks for other relays, JetStream deletions and floor releases dropped because cluster_backlog_clips were already waiting for the link (a clip may then be offered once more and is dropped by id).";
}

/// Labelled counters whose values are known in advance.
const KNOWN_LABELS: &[(&str, &str, &[&str])] = &[
    (
        HANDSHAKES,
        "outcome",
        &["completed", "failed", "retry", "refused"],
    ),
    (
        CONNECTIONS_REJECTED,
        "reason",
        &["max_connections", "handshake_rate", "auth"],
    ),
    (CLIPS_CUT, "reason", &["cut_off", "preempted"]),
    (CLIPS_ACCEPTED, "target", &["user", "channel"]),
    (DELIVERIES, "path", &["live", "stored"]),
    (CLUSTER_CLIPS, "direction", &["out", "in"]),
    (CLUSTER_BACKFILLED, "kind", &["direct", "channel"]),
    (CLUSTER_KEPT, "outcome", &["written", "delivered"]),
    (CLUSTER_CAUGHT_UP, "kind", &["direct", "channel"]),
];

/// The outcomes `ptt_push_sent_total` counts.
pub const PUSH_OUTCOMES: &[&str] = &[
    "sent",
    "unregistered",
    "retried",
    "expired",
    "failed",
    "dropped",
    "unconfigured",
];

/// Latency buckets, seconds: 50 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];
/// Batch-size buckets.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();

/// Installs the Prometheus recorder (once per process) and describes every
/// metric. `None` when another recorder was installed first.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(STORE_BATCH.into()), BATCH_BUCKETS)
                })
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            for m in CATALOGUE {
                let (name, unit, help) = (m.name, m.unit, m.help);
                match m.kind {
                    Kind::Counter => metrics::describe_counter!(name, unit, help),
                    Kind::Gauge => metrics::describe_gauge!(name, unit, help),
                    Kind::Histogram => metrics::describe_histogram!(name, unit, help),
                }
            }
            // Series exist from the start (at 0), so rates and alerts work
            // before the first event.
            for m in CATALOGUE.iter().filter(|m| m.labels.is_empty()) {
                match m.kind {
                    Kind::Counter => drop(metrics::counter!(m.name)),
                    Kind::Gauge => drop(metrics::gauge!(m.name)),
                    Kind::Histogram => drop(metrics::histogram!(m.name)),
                }
            }
            for (name, label, values) in KNOWN_LABELS {
                for v in *values {
                    drop(metrics::counter!(*name, *label => *v));
                }
            }
            for provider in ["apns", "fcm"] {
                for outcome in PUSH_OUTCOMES {
                    drop(
                        metrics::counter!(PUSH_SENT, "provider" => provider, "outcome" => *outcome),
                    );
                }
            }
            let process = PROCESS.get_or_init(metrics_process::Collector::default);
            process.describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            Some(handle)
        })
        .as_ref()
}

/// The installed handle, if any.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE.get().and_then(Option::as_ref)
}

/// Handles the hot path keeps, registered once.
pub struct Hot {
    pub packets_in: Counter,
    pub bytes_in: Counter,
    pub packets_out: Counter,
    pub bytes_out: Counter,
    pub hop: Histogram,
    pub sender_ack: Histogram,
    pub deliveries_live: Counter,
    pub deliveries_stored: Counter,
    pub delivered: Counter,
    pub accepted_user: Counter,
    pub accepted_channel: Counter,
    pub duplicate: Counter,
    pub live_fallbacks: Counter,
    pub store_sync: Histogram,
    pub store_batch: Histogram,
    /// Sampled per session (every `usage_interval`, at each scrape).
    pub wire_up: Counter,
    pub wire_down: Counter,
    pub usage_uncounted: Counter,
}

static HOT: OnceLock<Hot> = OnceLock::new();

/// The hot-path handles. Register after [`install`] (the relay does so on
/// start); handles taken before a recorder exists are no-ops.
pub fn hot() -> &'static Hot {
    HOT.get_or_init(|| Hot {
        packets_in: metrics::counter!(PACKETS_IN),
        bytes_in: metrics::counter!(BYTES_IN),
        packets_out: metrics::counter!(PACKETS_OUT),
        bytes_out: metrics::counter!(BYTES_OUT),
        hop: metrics::histogram!(HOP_LATENCY),
        sender_ack: metrics::histogram!(SENDER_ACK_LATENCY),
        deliveries_live: metrics::counter!(DELIVERIES, "path" => "live"),
        deliveries_stored: metrics::counter!(DELIVERIES, "path" => "stored"),
        delivered: metrics::counter!(CLIPS_DELIVERED),
        accepted_user: metrics::counter!(CLIPS_ACCEPTED, "target" => "user"),
        accepted_channel: metrics::counter!(CLIPS_ACCEPTED, "target" => "channel"),
        duplicate: metrics::counter!(CLIPS_DUPLICATE),
        live_fallbacks: metrics::counter!(LIVE_FALLBACKS),
        store_sync: metrics::histogram!(STORE_SYNC),
        store_batch: metrics::histogram!(STORE_BATCH),
        wire_up: metrics::counter!(WIRE_BYTES, "direction" => "up"),
        wire_down: metrics::counter!(WIRE_BYTES, "direction" => "down"),
        usage_uncounted: metrics::counter!(USAGE_UNCOUNTED),
    })
}

/// Counts one event of a labelled counter (for rare events: a name lookup).
pub fn count(name: &'static str, label: &'static str, value: &'static str) {
    metrics::counter!(name, label => value).increment(1);
}

/// Counts one event of an unlabelled counter.
pub fn count1(name: &'static str) {
    metrics::counter!(name).increment(1);
}

/// The relay's state as the gauges show it, taken at each scrape.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub ready: bool,
    pub connections: usize,
    pub sessions: usize,
    pub cluster_connected: bool,
    pub cluster_held: usize,
    pub push_users: usize,
    pub inflight_bytes: u64,
    pub inflight_limit: u64,
    pub token_keys: usize,
    pub store: crate::store::StoreStats,
    pub store_limit: u64,
    pub queue_depth_max: usize,
    pub queue_depth_total: usize,
    pub usage_users: usize,
}

/// Sets the state gauges from `s` and renders the text exposition format.
/// `None` when metrics are off.
pub fn render(s: &Gauges) -> Option<String> {
    let handle = handle()?;
    let g = |name: &'static str, v: f64| metrics::gauge!(name).set(v);
    g(READY, f64::from(u8::from(s.ready)));
    g(CONNECTIONS_OPEN, s.connections as f64);
    g(SESSIONS_OPEN, s.sessions as f64);
    g(CLUSTER_CONNECTED, f64::from(u8::from(s.cluster_connected)));
    g(CLUSTER_HELD, s.cluster_held as f64);
    g(PUSH_USERS, s.push_users as f64);
    g(INFLIGHT_BYTES, s.inflight_bytes as f64);
    g(INFLIGHT_LIMIT, s.inflight_limit as f64);
    g(TOKEN_KEYS, s.token_keys as f64);
    g(STORE_PENDING, s.store.pending as f64);
    g(STORE_BYTES, s.store.bytes as f64);
    g(STORE_LIMIT, s.store_limit as f64);
    g(STORE_IDS, s.store.remembered_ids as f64);
    g(QUEUE_DEPTH_MAX, s.queue_depth_max as f64);
    g(QUEUE_DEPTH_TOTAL, s.queue_depth_total as f64);
    g(USAGE_USERS, s.usage_users as f64);
    if let Some(p) = PROCESS.get() {
        p.collect();
    }
    Some(handle.render())
}

/// Drains histogram samples into their buckets now and then, so memory
/// between scrapes stays small. Ends when `stop` is cancelled.
pub async fn upkeep(stop: tokio_util::sync::CancellationToken) {
    let Some(handle) = handle() else { return };
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => handle.run_upkeep(),
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_prefixed_and_suffixed() {
        let mut seen = std::collections::HashSet::new();
        for m in CATALOGUE {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(m.name.starts_with("ptt_"), "{}", m.name);
            match m.kind {
                Kind::Counter => assert!(m.name.ends_with("_total"), "{}", m.name),
                _ => assert!(!m.name.ends_with("_total"), "{}", m.name),
            }
            if m.unit == Unit::Seconds {
                assert!(m.name.ends_with("_seconds"), "{}", m.name);
            }
            assert!(!m.labels.iter().any(|l| l.contains("user")), "{}", m.name);
        }
    }

    /// docs/metrics.md lists every metric with its type and labels.
    #[test]
    fn the_catalogue_in_docs_is_complete_and_true() {
        let doc = include_str!("../../docs/metrics.md");
        let rows: Vec<Vec<String>> = doc
            .lines()
            .filter(|l| l.starts_with("| `ptt_"))
            .map(|l| {
                l.split('|')
                    .map(|c| c.trim().trim_matches('`').to_owned())
                    .collect()
            })
            .collect();
        for m in CATALOGUE {
            let row = rows
                .iter()
                .find(|r| r.get(1).map(String::as_str) == Some(m.name))
                .unwrap_or_else(|| panic!("{} missing from docs/metrics.md", m.name));
            assert_eq!(row[2], m.kind.as_str(), "type of {}", m.name);
            let labels = if m.labels.is_empty() {
                "–".to_owned()
            } else {
                m.labels.join(", ")
            };
            assert_eq!(row[4], labels, "labels of {}", m.name);
        }
        assert_eq!(
            rows.len(),
            CATALOGUE.len(),
            "docs list a metric the code lacks"
        );
    }
}
