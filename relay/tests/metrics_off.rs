//! `metrics = false`: no recorder, `/metrics` answers 404, the relay works.
//! (Its own test binary: the recorder is process-wide.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use ptt_client::Pacing;

#[tokio::test]
async fn metrics_off_means_404_and_nothing_else_changes() {
    let t = start(|c| c.metrics = false).await;
    let (_bob, mut ev) = t.connect("bob").await;
    let (alice, _) = t.connect("alice").await;
    alice
        .send_clip(&clip("bob", 3), Pacing::Upload)
        .await
        .unwrap();
    next_complete(&mut ev).await;
    let admin = t.relay.admin_addr();
    assert_eq!(http_get(admin, "/metrics").await.0, 404);
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    assert!(relay::testing::metrics_handle().is_none());
}
