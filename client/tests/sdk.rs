//! The SDK's connection limits, on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use codec::wire::ClipId;
use ptt_client::sdk::{Config, IncomingClip, Listener, Sdk, Sent, Status};
use tokio::sync::mpsc;

struct Statuses(mpsc::UnboundedSender<Status>);

impl Listener for Statuses {
    fn clip(&self, _: IncomingClip) -> bool {
        true
    }

    fn sent(&self, _: ClipId, _: Sent) {}

    fn status(&self, s: Status) {
        let _ = self.0.send(s);
    }
}

/// A relay address that swallows every packet: the handshake never
/// completes. Without `connect_timeout` the attempt would only fail at
/// QUIC's 30 s idle timeout; with it, the app hears `Offline` and the SDK
/// tries again.
#[tokio::test]
async fn an_unanswered_connection_attempt_ends_at_connect_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (files, _) = relay::testing::ensure_data_dir(&dir.path().join("relay"), None).unwrap();
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut cfg = Config::new(
        &silent.local_addr().unwrap().to_string(),
        files.cert.clone(),
        dir.path().join("app"),
        "token",
    );
    cfg.connect_timeout = Duration::from_millis(300);
    cfg.reconnect_min = Duration::from_millis(50);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sdk = Sdk::start(cfg, Arc::new(Statuses(tx))).unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        let mut seen = Vec::new();
        while let Some(s) = rx.recv().await {
            let again = matches!(s, Status::Connecting) && seen.len() > 1;
            seen.push(s);
            if again {
                return seen;
            }
        }
        seen
    })
    .await
    .expect("no Offline long before the idle timeout");
    match &seen[1] {
        Status::Offline { why, .. } => assert!(why.contains("no answer within"), "{why}"),
        other => panic!("expected Offline, got {other:?}"),
    }
    assert_eq!(seen[2], Status::Connecting, "and it tries again");
    sdk.stop().await;
}

/// Another device of the same user signs in: the relay closes the SDK's
/// session with `session_replaced`. The SDK says `SignedOut` and does not
/// come back (which would push the other device out, and so on).
async fn next(rx: &mut mpsc::UnboundedReceiver<Status>) -> Status {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a status")
        .expect("the SDK runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_replaced_by_another_device_stays_signed_out() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay::Relay::start(relay::Config::for_tests(dir.path().join("relay")))
        .await
        .unwrap();
    let token = relay
        .token_key()
        .mint("bob", Duration::from_secs(3600))
        .unwrap();
    let cfg = Config::new(
        &relay.quic_addr().to_string(),
        relay.files().cert.clone(),
        dir.path().join("app"),
        &token,
    );
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sdk = Sdk::start(cfg, Arc::new(Statuses(tx))).unwrap();
    assert_eq!(next(&mut rx).await, Status::Connecting);
    assert!(matches!(next(&mut rx).await, Status::Connected { .. }));
    let ep = ptt_client::net::endpoint(relay.quic_addr(), &relay.files().cert).unwrap();
    let (phone, _events) = ptt_client::Client::connect(
        &ep,
        relay.quic_addr(),
        "localhost",
        &token,
        ptt_client::ClientOptions::default(),
    )
    .await
    .unwrap();
    match next(&mut rx).await {
        Status::SignedOut { why } => assert!(why.contains("replaced"), "{why}"),
        other => panic!("expected SignedOut, got {other:?}"),
    }
    // The other device keeps its session.
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), phone.closed())
            .await
            .is_err(),
        "the SDK came back and pushed the other device out"
    );
    assert!(rx.try_recv().is_err(), "no reconnect attempt");
    sdk.stop().await;
    relay.shutdown().await;
}
