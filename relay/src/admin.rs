//! The admin HTTP listener: `/healthz` (the process is alive), `/readyz`
//! (the QUIC endpoint accepts connections; false while draining),
//! `/readyz/cluster` (ready, and linked to the cluster's NATS: ready for
//! cross-relay work; 404 on a relay that is not clustered) and
//! `/metrics` (Prometheus text format, `docs/metrics.md`), and users' data
//! use: `/usage?user=NAME[&days=N]` (one user's days, JSON) and
//! `/usage/top[?days=N&n=M]` (the users with the most bytes). It is
//! unauthenticated: bind it to loopback or a private network only (the
//! trusted plane).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tracing::warn;

/// What the admin listener asks of the relay.
pub trait AdminState: Send + Sync + 'static {
    /// The QUIC endpoint accepts connections (false while starting or
    /// draining).
    fn ready(&self) -> bool;
    /// `None` for a relay that is not clustered; else whether it is linked
    /// to the cluster's NATS.
    fn cluster_linked(&self) -> Option<bool>;
    /// The Prometheus text, `None` when metrics are off.
    fn metrics_text(&self) -> Option<String>;
    /// `user`'s data use over the last `days` days (0: all kept).
    fn usage(&self, user: &str, days: u64) -> UserUsage;
    /// The `n` users with the most bytes over the last `days` days.
    fn top_usage(&self, days: u64, n: usize) -> TopUsage;
}

/// One day of a user's data use, as `/usage` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Day {
    /// UTC date, `YYYY-MM-DD`.
    pub date: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// `/usage?user=...`: the user's days with traffic, oldest first, and
/// their sums.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UserUsage {
    pub user: String,
    pub today: String,
    pub days: Vec<Day>,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// `/usage/top`: users by bytes (both ways) over `days` days, most first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TopUsage {
    pub today: String,
    pub days: u64,
    pub users: Vec<crate::usage::Total>,
}

/// Most users `/usage/top` lists.
pub const TOP_MAX: usize = 1000;

type Shared = dyn AdminState;

/// Serves until `stop` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    stop: tokio_util::sync::CancellationToken,
) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/readyz/cluster", get(readyz_cluster))
        .route("/metrics", get(metrics))
        .route("/usage", get(usage))
        .route("/usage/top", get(top_usage))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        warn!(error = %e, "admin listener failed");
    }
}

/// Ready to serve (200) or not (503). In a cluster the body also says
/// whether the link to NATS is up; a relay cut off stays ready (it serves
/// its own users and keeps every clip for the others), since every relay
/// of a cluster loses NATS together and a load balancer taking them all
/// out would stop the whole service. `/readyz/cluster` answers 503 then.
async fn readyz(State(shared): State<Arc<Shared>>) -> (StatusCode, &'static str) {
    match (shared.ready(), shared.cluster_linked()) {
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        (true, None) => (StatusCode::OK, "ready\n"),
        (true, Some(true)) => (StatusCode::OK, "ready; cluster linked\n"),
        (true, Some(false)) => (
            StatusCode::OK,
            "ready; cluster unreachable: serving local users, clips for other relays held until it is back\n",
        ),
    }
}

/// A relay cut off from NATS still serves its own users (`/readyz` stays
/// true) but cannot reach users on other relays: a load balancer that
/// can should send new clients elsewhere.
async fn readyz_cluster(State(shared): State<Arc<Shared>>) -> (StatusCode, &'static str) {
    match shared.cluster_linked() {
        None => (StatusCode::NOT_FOUND, "not clustered\n"),
        Some(_) if !shared.ready() => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        Some(true) => (StatusCode::OK, "ready, cluster linked\n"),
        Some(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "cluster unreachable: serving local users only\n",
        ),
    }
}

/// Runs `f` on a blocking thread: a scrape, a top list or the usage book's
/// sampling passes over every session (~140 ms at 100,000 sessions), which
/// on a runtime worker held up the connections queued behind it (first
/// packets waited up to ~360 ms with a scrape a second).
pub(crate) async fn off_runtime<S: ?Sized + Send + Sync + 'static, T: Send + 'static>(
    shared: Arc<S>,
    f: impl FnOnce(&S) -> T + Send + 'static,
) -> Option<T> {
    tokio::task::spawn_blocking(move || f(&*shared)).await.ok()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> axum::response::Response {
    use axum::response::IntoResponse;
    match off_runtime(shared, |s| s.metrics_text()).await {
        Some(Some(text)) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Some(None) => {
            (StatusCode::NOT_FOUND, "metrics are off (metrics = false)\n").into_response()
        }
        None => (StatusCode::INTERNAL_SERVER_ERROR, "metrics failed\n").into_response(),
    }
}

#[derive(serde::Deserialize)]
struct UsageParams {
    user: Option<String>,
    #[serde(default)]
    days: u64,
}

async fn usage(
    State(shared): State<Arc<Shared>>,
    axum::extract::Query(p): axum::extract::Query<UsageParams>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match p.user {
        Some(user) if !user.is_empty() => axum::Json(shared.usage(&user, p.days)).into_response(),
        _ => (StatusCode::BAD_REQUEST, "usage needs ?user=NAME\n").into_response(),
    }
}

#[derive(serde::Deserialize)]
struct TopParams {
    days: Option<u64>,
    n: Option<usize>,
}

async fn top_usage(
    State(shared): State<Arc<Shared>>,
    axum::extract::Query(p): axum::extract::Query<TopParams>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let n = p.n.unwrap_or(10).clamp(1, TOP_MAX);
    let days = p.days.unwrap_or(1);
    match off_runtime(shared, move |s| s.top_usage(days, n)).await {
        Some(top) => axum::Json(top).into_response(),
        None => (StatusCode::INTERNAL_SERVER_ERROR, "top usage failed\n").into_response(),
    }
}
