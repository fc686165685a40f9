//! Hostile peers: each case ends with a clear error and costs the relay
//! only what a named limit allows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::BytesMut;
use codec::ErrorCode;
use codec::token::Right;
use codec::varint;
use codec::wire::{AudioFormat, ClipHeader, ClipId, Message, Target};
use common::*;
use ptt_client::Pacing;

/// Before `Auth` a connection gets credit for its control stream and one
/// early upload (`early_upload_bytes`), and for no more bytes than the
/// largest message plus that: it cannot make the relay buffer megabytes on
/// streams it never reads.
#[tokio::test]
async fn a_native_client_cannot_park_data_on_unidirectional_streams() {
    // The transport parameters allow three (a browser's HTTP/3 needs
    // them), but ptt/1 has none from the client: each is stopped at once.
    let t = start(|_| {}).await;
    let (alice, _) = t.connect("alice").await;
    for _ in 0..5 {
        let mut send = alice.connection().open_uni().await.unwrap();
        let _ = send.write_all(&[0u8; 1000]).await;
        let stopped = tokio::time::timeout(Duration::from_secs(5), send.stopped())
            .await
            .expect("stopped in time")
            .unwrap();
        assert_eq!(stopped, Some(quic::varint(ErrorCode::ProtocolViolation)));
    }
    // The session goes on.
    let (_bob, mut bob_ev) = t.connect("bob").await;
    alice
        .send_clip(&clip("bob", 3), Pacing::Upload)
        .await
        .unwrap();
    next_complete(&mut bob_ev).await;
}

#[tokio::test]
async fn an_unauthenticated_peer_gets_credit_for_its_auth_only() {
    let t = start(|c| c.auth_timeout = Duration::from_secs(3)).await;
    let conn = t.raw_connection().await;
    let (mut ctl, _recv) = conn.open_bi().await.unwrap();
    // One early upload, no third stream before Auth.
    let (_up, _up_recv) = conn.open_bi().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), conn.open_bi())
            .await
            .is_err(),
        "a third stream opened before Auth"
    );
    // At most one message's worth of bytes: 1 MB on the control stream is
    // not taken (the relay reads the Auth it declares, refuses it and
    // closes; the rest never had credit).
    let mut b = BytesMut::new();
    varint::put(&mut b, 0x01);
    varint::put(&mut b, 60_000);
    b.resize(1_000_000, b'x');
    let wrote = tokio::time::timeout(Duration::from_secs(2), ctl.write_all(&b)).await;
    assert!(!matches!(wrote, Ok(Ok(()))), "1 MB was taken before Auth");
    assert_eq!(close_code(&conn).await, Some(ErrorCode::TokenInvalid));
    // An authenticated client still gets its uploads.
    let (alice, _) = t.connect("alice").await;
    alice
        .send_clip(&clip("bob", 3), Pacing::Upload)
        .await
        .unwrap();
}

/// The early upload gets no more than the connection's credit before
/// `Auth`: the largest message plus `early_upload_bytes`, however much
/// the peer writes.
#[tokio::test]
async fn an_early_upload_takes_no_more_than_its_credit() {
    let t = start(|c| c.auth_timeout = Duration::from_secs(5)).await;
    let cfg = relay::Config::for_tests("/unused");
    let credit = cfg.max_message_bytes as u64 + 16 + cfg.early_upload_bytes;
    let conn = t.raw_connection().await;
    let (_ctl, _recv) = conn.open_bi().await.unwrap();
    let (mut up, _up_recv) = conn.open_bi().await.unwrap();
    let chunk = vec![0u8; 4096];
    let mut taken = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, up.write(&chunk)).await {
        taken += n as u64;
    }
    assert!(taken > 0, "the early upload got no credit");
    assert!(
        taken <= credit,
        "{taken} bytes taken before Auth, credit {credit}"
    );
}

/// With `early_upload_bytes = 0` the control stream is all a peer gets
/// before `Auth`.
#[tokio::test]
async fn without_early_uploads_only_the_control_stream_opens_before_auth() {
    let t = start(|c| c.early_upload_bytes = 0).await;
    let conn = t.raw_connection().await;
    let (_ctl, _recv) = conn.open_bi().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), conn.open_bi())
            .await
            .is_err(),
        "a second stream opened before Auth"
    );
}

/// Connections that have not authenticated are capped
/// (`max_unauthenticated_connections`): past it a handshake is refused at
/// once; once they are gone (auth timeout) new ones come in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_are_capped() {
    let t = start(|c| {
        c.max_unauthenticated_connections = 4;
        c.auth_timeout = Duration::from_secs(1);
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(t.raw_connection().await);
    }
    let started = std::time::Instant::now();
    let refused = t
        .endpoint
        .connect(t.relay.quic_addr(), "localhost")
        .unwrap()
        .await;
    assert!(refused.is_err(), "a fifth unauthenticated connection");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );
    for c in &idle {
        assert_eq!(close_code(c).await, Some(ErrorCode::Unauthenticated));
    }
    // Room again, and an authenticated session no longer counts.
    let (_alice, _) = t.connect("alice").await;
    for _ in 0..4 {
        idle.push(t.raw_connection().await);
    }
}

/// A talker that trickles a byte a second holds the floor no longer than
/// `max_upload_lag` past its audio: then its upload is refused, its
/// listeners' delivery is cut, and another member can talk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickle_cannot_hold_a_channels_floor() {
    let t = start(|c| {
        c.max_clip_duration = Duration::from_secs(2);
        c.max_upload_lag = Duration::from_secs(1);
    })
    .await;
    let ops = [("ops", Right::Talk)];
    let (alice, _) = t.member("alice", &ops).await;
    let (bob, _) = t.member("bob", &ops).await;
    let (_carol, mut carol_ev) = t.member("carol", &ops).await;
    let (mut send, recv) = alice.connection().open_bi().await.unwrap();
    let mut b = BytesMut::new();
    Message::ClipHeader(ClipHeader {
        clip_id: ClipId([1; 16]),
        target: Target::Channel("ops".into()),
        format: AudioFormat::default(),
    })
    .encode(&mut b);
    codec::framing::put_packet(&mut b, &packet(0, 40));
    send.write_all(&b).await.unwrap();
    let trickle = tokio::spawn(async move {
        // The next record's length, then its bytes, one every 200 ms.
        let _ = send.write_all(&[40]).await;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if send.write_all(&[0]).await.is_err() {
                break;
            }
        }
    });
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = clip("", 2);
    c.target = Target::Channel("ops".into());
    match bob.send_clip(&c, Pacing::Upload).await {
        Err(ptt_client::ClientError::Rejected { code, .. }) => {
            assert_eq!(code, ErrorCode::FloorBusy)
        }
        other => panic!("expected floor_busy, got {other:?}"),
    }
    match answer(recv).await {
        Message::Rejected(r) => assert_eq!(r.code, ErrorCode::UploadIdleTimeout),
        other => panic!("expected the trickle refused, got {other:?}"),
    }
    let held = started.elapsed();
    assert!(
        held < Duration::from_secs(3),
        "refused within its audio plus max_upload_lag ({held:?})"
    );
    trickle.abort();
    let cut = next_matching(&mut carol_ev, |e| match e {
        ptt_client::Event::Cut { code, .. } => Some(code),
        _ => None,
    })
    .await;
    assert_eq!(cut, ErrorCode::CutOff);
    // The floor is free again.
    let mut c = clip("", 2);
    c.target = Target::Channel("ops".into());
    bob.send_clip(&c, Pacing::Upload).await.unwrap();
}
