//! The admin HTTP listener: `/healthz` (the process is alive), `/readyz`
//! (the QUIC endpoint accepts connections; false while draining),
//! `/readyz/cluster` (ready, and linked to the cluster's NATS: ready for
//! cross-relay work; 404 on a relay that is not clustered) and
//! `/metrics` (Prometheus text format, `docs/metrics.md`). It is
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
}

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
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        warn!(error = %e, "admin listener failed");
    }
}

async fn readyz(State(shared): State<Arc<Shared>>) -> (StatusCode, &'static str) {
    if shared.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
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

async fn metrics(State(shared): State<Arc<Shared>>) -> axum::response::Response {
    use axum::response::IntoResponse;
    match shared.metrics_text() {
        Some(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are off (metrics = false)\n").into_response(),
    }
}
