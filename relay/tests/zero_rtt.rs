//! QUIC 0-RTT on reconnect (docs/protocol.md "Reconnecting with 0-RTT"):
//! a client that was connected before sends `Auth` with the handshake;
//! a ticket resumes one connection only, so a replayed 0-RTT flight gets
//! nothing read; a restarted relay (which forgot its tickets) falls back
//! to a full handshake.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use tokio::net::UdpSocket;

/// Connects `user` once and leaves, after the relay's resumption ticket
/// (sent after the handshake) has reached the endpoint.
async fn connect_once(t: &TestRelay, user: &str) {
    let (c, _ev) = t.connect(user).await;
    assert!(!c.zero_rtt(), "the endpoint had no ticket yet");
    // The ticket follows the handshake by a moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.shutdown().await;
}

#[tokio::test]
async fn a_reconnect_sends_auth_in_zero_rtt_and_works() {
    let t = start(|_| {}).await;
    connect_once(&t, "alice").await;
    assert_eq!(metric(&t, "ptt_zero_rtt_auths_total").await, 0.0);

    let (alice, mut events) = t.connect("alice").await;
    assert!(alice.zero_rtt(), "the reconnect did not use 0-RTT");
    assert_eq!(metric(&t, "ptt_zero_rtt_auths_total").await, 1.0);
    // The session is a full one: a clip reaches it.
    let (bob, _bev) = t.connect("bob").await;
    bob.send_clip(&clip("alice", 5), ptt_client::Pacing::Upload)
        .await
        .unwrap();
    let got = next_complete(&mut events).await;
    assert_eq!(got.packets.len(), 5);
}

#[tokio::test]
async fn zero_rtt_tickets_0_turns_it_off() {
    let t = start(|c| c.zero_rtt_tickets = 0).await;
    connect_once(&t, "alice").await;
    let (alice, _events) = t.connect("alice").await;
    assert!(!alice.zero_rtt());
    assert_eq!(metric(&t, "ptt_zero_rtt_auths_total").await, 0.0);
}

#[tokio::test]
async fn after_a_restart_a_reconnect_falls_back_to_a_full_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let t = start_in(dir.path(), |_| {}).await;
    connect_once(&t, "alice").await;
    let endpoint = t.endpoint.clone();
    t.relay.shutdown().await;

    // Same data dir and certificate (tickets are kept per server name, so
    // the endpoint offers the old one): the new process does not know it,
    // refuses the 0-RTT data, and the client authenticates again on the
    // completed handshake.
    let relay = relay::Relay::start(relay::Config::for_tests(dir.path()))
        .await
        .unwrap();
    let addr = relay.quic_addr();
    let token = relay
        .token_key()
        .mint("alice", Duration::from_secs(3600))
        .unwrap();
    let (alice, _events) = ptt_client::Client::connect(
        &endpoint,
        addr,
        "localhost",
        &token,
        ptt_client::ClientOptions::default(),
    )
    .await
    .expect("connects with a full handshake");
    assert!(!alice.zero_rtt());
    assert_eq!(alice.user(), "alice");
    relay.shutdown().await;
}

#[tokio::test]
async fn a_replayed_zero_rtt_flight_is_not_read() {
    let t = start(|_| {}).await;
    let tap = Tap::start(t.relay.quic_addr()).await;
    let token = t.token("alice");
    let connect = || {
        ptt_client::Client::connect(
            &t.endpoint,
            tap.addr,
            "localhost",
            &token,
            ptt_client::ClientOptions::default(),
        )
    };
    let (first, _e1) = connect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    first.shutdown().await;

    // The resumed connection's packets, as an eavesdropper saw them.
    tap.record();
    let (second, _e3) = connect().await.unwrap();
    assert!(second.zero_rtt());
    second.shutdown().await;
    let flight = tap.take();
    assert!(!flight.is_empty());
    assert_eq!(metric(&t, "ptt_zero_rtt_auths_total").await, 1.0);
    let (_bob, _e2) = t.connect("bob").await;
    assert_eq!(metric(&t, "ptt_zero_rtt_auths_total").await, 2.0);
    // Once that connection is gone from the relay, the eavesdropper sends
    // the same datagrams again from another address.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let attacker = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for d in &flight {
        attacker.send_to(d, t.relay.quic_addr()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The ticket was used up: the replayed `Auth` was never read.
    assert_eq!(metric(&t, "ptt_zero_rtt_auths_total").await, 2.0);
    assert_eq!(metric(&t, "ptt_sessions_open").await, 1.0, "only bob");
}

#[tokio::test]
async fn a_token_refused_in_zero_rtt_closes_with_its_code() {
    let t = start(|_| {}).await;
    connect_once(&t, "alice").await;
    // The endpoint holds a ticket: this `Auth` rides in 0-RTT, and the
    // relay's close must still carry the code (sent once the handshake is
    // complete; a close during the handshake carries none).
    let err = match t
        .try_connect_with("not-a-token", ptt_client::ClientOptions::default())
        .await
    {
        Err(e) => e,
        Ok(_) => panic!("a bad token was accepted"),
    };
    match err {
        ptt_client::ClientError::Closed { code, .. } => {
            assert_eq!(code, codec::ErrorCode::TokenInvalid)
        }
        other => panic!("expected a close with token_invalid, got {other}"),
    }
}

/// A press from sleep: the reconnect carries `Auth` and the start of an
/// upload in 0-RTT; the relay reads the upload once the token is good and
/// the listener has the clip live, whole, once.
#[tokio::test]
async fn an_upload_started_in_zero_rtt_is_delivered_live() {
    let t = start(|_| {}).await;
    connect_once(&t, "alice").await;
    let (_bob, mut bob_events) = t.connect("bob").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let connecting = ptt_client::Client::begin(
        &t.endpoint,
        t.relay.quic_addr(),
        "localhost",
        &t.token("alice"),
    )
    .await
    .unwrap();
    assert!(connecting.is_early(), "the endpoint holds a ticket");
    let c = clip("bob", 5);
    let mut upload = connecting
        .upload(c.id, c.target.clone(), c.format)
        .await
        .unwrap();
    // The first packets go before Welcome, with the handshake.
    assert!(upload.is_early(), "the upload was opened in 0-RTT");
    upload.send(&c.packets[..2]).await.unwrap();
    let (alice, _events) = connecting
        .finish(ptt_client::ClientOptions::default())
        .await
        .unwrap();
    assert!(alice.zero_rtt());
    upload.send(&c.packets[2..]).await.unwrap();
    upload.finish(c.final_granule).await.unwrap();
    assert!(!upload.answer().await.unwrap(), "accepted, not a duplicate");
    let got = next_complete(&mut bob_events).await;
    assert_eq!(got.id(), c.id);
    assert!(got.delivery.live);
    assert_eq!(got.packets, c.packets);
}
