//! End-to-end: a real relay on loopback, real clients over QUIC.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use codec::ErrorCode;
use codec::token::{Claims, TokenKey, now_secs};
use codec::wire::{ClipId, Message};
use common::*;
use ptt_client::{ClientError, ClientOptions, Event, OutgoingClip, Pacing, SeenIds};
use tokio::time::Instant;

#[tokio::test]
async fn live_delivery_starts_before_the_sender_finishes() {
    let t = start(|_| {}).await;
    let (_bob, mut bob_events) = t.connect("bob").await;
    let (alice, _) = t.connect("alice").await;
    // 1 s of audio, paced in real time.
    let clip = clip("bob", 50);
    let sent = clip.clone();
    let sender = tokio::spawn(async move {
        let r = alice.send_clip(&sent, Pacing::Live).await;
        (r, Instant::now())
    });
    let (delivery, started) = next_matching(&mut bob_events, |e| match e {
        Event::Started { delivery, at, .. } => Some((delivery, at)),
        _ => None,
    })
    .await;
    assert!(delivery.live);
    assert_eq!(delivery.sender, "alice");
    let first = next_matching(&mut bob_events, |e| match e {
        Event::FirstPacket { at, .. } => Some(at),
        _ => None,
    })
    .await;
    let got = next_complete(&mut bob_events).await;
    let (result, finished) = sender.await.unwrap();
    assert!(!result.unwrap().duplicate);
    assert!(started <= first);
    // The sender needs ~1 s to "talk" the clip; the first packet must have
    // reached bob long before the upload ended.
    assert!(
        finished.duration_since(first) > Duration::from_millis(500),
        "first packet arrived only {:?} before the end of the upload",
        finished.duration_since(first)
    );
    assert_eq!(got.packets, clip.packets, "byte-identical packets");
    assert_eq!(got.end.final_granule, clip.final_granule);
    assert_eq!(got.delivery.format, clip.format);
}

/// The relay sends a live delivery's header with the first packet (one
/// QUIC packet per recipient at a clip's start, not two): a recipient sees
/// nothing while the sender has sent only its header, then both at once.
#[tokio::test]
async fn a_live_delivery_header_travels_with_the_first_packet() {
    let t = start(|_| {}).await;
    let (_bob, mut bob_events) = t.connect("bob").await;
    let (alice, _) = t.connect("alice").await;
    let clip = clip("bob", 3);
    let (mut send, _recv) = alice.connection().open_bi().await.unwrap();
    send.write_all(&clip.header().to_bytes()).await.unwrap();
    // The header alone reaches the relay, which offers the clip to bob
    // but has nothing to send him yet.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), bob_events.recv())
            .await
            .is_err(),
        "bob heard of the clip before any of its audio"
    );
    let mut body = bytes::BytesMut::new();
    codec::framing::put_packet(&mut body, &clip.packets[0]);
    let sent = Instant::now();
    send.write_all(&body).await.unwrap();
    let (delivery, started) = next_matching(&mut bob_events, |e| match e {
        Event::Started { delivery, at, .. } => Some((delivery, at)),
        _ => None,
    })
    .await;
    let first = next_matching(&mut bob_events, |e| match e {
        Event::FirstPacket { at, .. } => Some(at),
        _ => None,
    })
    .await;
    assert!(delivery.live);
    assert!(
        started >= sent,
        "the header came before the first packet was sent"
    );
    assert!(first >= started);
    // The rest of the clip still completes.
    let mut rest = bytes::BytesMut::new();
    for p in &clip.packets[1..] {
        codec::framing::put_packet(&mut rest, p);
    }
    clip.end().encode(&mut rest);
    send.write_all(&rest).await.unwrap();
    send.finish().unwrap();
    let got = next_complete(&mut bob_events).await;
    assert_eq!(got.packets, clip.packets);
}

/// With the disk store, a live recipient gets a clip's end as soon as the
/// relay holds the clip whole, not after the disk commit that the sender's
/// `Accepted` waits for. Its ack during that commit releases its stored
/// copy: the clip is not delivered again, nor after a restart.
#[tokio::test]
async fn a_live_clip_ends_before_its_commit_and_an_early_ack_releases_it() {
    let dir = tempfile::tempdir().unwrap();
    let slow = |c: &mut relay::Config| c.store_commit_interval = Duration::from_secs(2);
    {
        let t = start_in(dir.path(), slow).await;
        let (bob, mut bob_events) = t.connect("bob").await;
        let (alice, _) = t.connect("alice").await;
        // A first commit (a clip for carol, offline); the next one waits
        // two seconds after it.
        alice
            .send_clip(&clip("carol", 2), Pacing::Upload)
            .await
            .unwrap();
        let c = clip("bob", 5);
        let mut sending = tokio::spawn({
            let (alice, c) = (alice.clone(), c.clone());
            async move { alice.send_clip(&c, Pacing::Upload).await }
        });
        let got = next_complete(&mut bob_events).await;
        assert_eq!(got.packets, c.packets);
        bob.ack(got.id()).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(500), &mut sending)
                .await
                .is_err(),
            "bob had the clip whole only once it was on disk"
        );
        assert!(!sending.await.unwrap().unwrap().duplicate);
        assert_eq!(t.settle_pending(1).await, 1, "only carol's copy waits");
        assert_no_clip(&mut bob_events, Duration::from_millis(300)).await;
        bob.close();
        t.relay.shutdown().await;
    }
    let t = start_in(dir.path(), slow).await;
    assert_eq!(t.pending(), 1);
    let (_bob, mut bob_events) = t.connect("bob").await;
    assert_no_clip(&mut bob_events, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn stored_clips_are_delivered_in_order_on_connect_and_released_on_ack() {
    let t = start(|_| {}).await;
    let (alice, _) = t.connect("alice").await;
    let clips: Vec<_> = (0..5).map(|i| clip("bob", 5 + i)).collect();
    for c in &clips {
        alice.send_clip(c, Pacing::Upload).await.unwrap();
    }
    assert_eq!(t.pending(), 5);
    let (bob, mut ev) = t.connect("bob").await;
    for c in &clips {
        let got = next_complete(&mut ev).await;
        assert_eq!(got.id(), c.id, "oldest first");
        assert!(!got.delivery.live);
        assert_eq!(got.packets, c.packets);
        bob.ack(got.id()).await.unwrap();
    }
    // Acks release the stored copies.
    assert_eq!(t.settle_pending(0).await, 0);
    // Nothing comes again on a new connection.
    bob.close();
    let (_bob2, mut ev2) = t.connect("bob").await;
    assert_no_clip(&mut ev2, Duration::from_millis(300)).await;
}

/// A sender takes the FIN after each answer (the relay sends it with the
/// answer) instead of dropping the stream unfinished: no STOP_SENDING, a
/// frame and its ACK per clip that would cost a datagram each way.
#[tokio::test]
async fn a_sender_ends_its_upload_streams_without_stop_sending() {
    let t = start(|_| {}).await;
    let (alice, _) = t.connect("alice").await;
    let (bob, mut ev) = t.connect("bob").await;
    for i in 0..5 {
        let c = clip("bob", 5 + i);
        let sent = alice.send_clip(&c, Pacing::Upload).await.unwrap();
        assert!(!sent.duplicate);
        bob.ack(next_complete(&mut ev).await.id()).await.unwrap();
        // A retry gets `Accepted` (duplicate) and the relay's own
        // STOP_SENDING: the sender still sends none.
        assert!(alice.send_clip(&c, Pacing::Upload).await.unwrap().duplicate);
    }
    let stats = alice.connection().stats();
    assert_eq!(stats.frame_tx.stop_sending, 0, "{:?}", stats.frame_tx);
    assert!(stats.frame_rx.stop_sending >= 1, "{:?}", stats.frame_rx);
}

/// Stored clips reach a recipient in acceptance order, every run: 20 clips
/// of random sizes, all in flight at once (the delivery window is larger),
/// open in order (stream ids rise with acceptance), their headers arrive in
/// order and they complete in order.
#[tokio::test]
async fn twenty_stored_clips_of_random_sizes_arrive_in_order() {
    let t = start(|_| {}).await;
    let (alice, _) = t.connect("alice").await;
    let clips: Vec<OutgoingClip> = (0..20)
        .map(|_| {
            let n = rand::random_range(1..=400u32);
            let mut c = clip("bob", n);
            c.packets = (0..n)
                .map(|i| packet(i, rand::random_range(5..=300)))
                .collect();
            c
        })
        .collect();
    for c in &clips {
        alice.send_clip(c, Pacing::Upload).await.unwrap();
    }
    let want: Vec<ClipId> = clips.iter().map(|c| c.id).collect();
    let (bob, mut ev) = t.connect("bob").await;
    let (mut started, mut streams, mut complete) = (Vec::new(), Vec::new(), Vec::new());
    while complete.len() < clips.len() {
        let e = tokio::time::timeout(Duration::from_secs(10), ev.recv())
            .await
            .expect("all 20 clips within 10 s")
            .expect("events");
        match e {
            Event::Started { delivery, seq, .. } => {
                started.push(delivery.clip_id);
                streams.push((seq, delivery.clip_id));
            }
            Event::Complete(got) => {
                let sent = &clips[complete.len()];
                assert_eq!(
                    got.id(),
                    sent.id,
                    "clip {} completes in order",
                    complete.len()
                );
                assert_eq!(got.packets, sent.packets);
                complete.push(got.id());
            }
            _ => {}
        }
    }
    streams.sort();
    let by_stream: Vec<ClipId> = streams.into_iter().map(|(_, id)| id).collect();
    assert_eq!(by_stream, want, "stream ids rise with acceptance order");
    assert_eq!(started, want, "headers arrive in order");
    for id in &want {
        bob.ack(*id).await.unwrap();
    }
    assert_eq!(t.settle_pending(0).await, 0);
}

#[tokio::test]
async fn backlog_larger_than_the_delivery_window_all_arrives() {
    let t = start(|c| c.max_unacked_deliveries = 3).await;
    let (alice, _) = t.connect("alice").await;
    let mut ids = Vec::new();
    for _ in 0..12 {
        let c = clip("bob", 3);
        alice.send_clip(&c, Pacing::Upload).await.unwrap();
        ids.push(c.id);
    }
    let (bob, mut ev) = t.connect("bob").await;
    for id in ids {
        let got = next_complete(&mut ev).await;
        assert_eq!(got.id(), id);
        bob.ack(got.id()).await.unwrap();
    }
}

#[tokio::test]
async fn retry_with_the_same_clip_id_delivers_once() {
    let t = start(|_| {}).await;
    let (_bob, mut bob_ev) = t.connect("bob").await;
    let (alice, _) = t.connect("alice").await;
    let c = clip("bob", 20);
    // First attempt: half the clip, then the connection dies before any
    // "accepted".
    let (_send, _recv) = raw_upload(&alice, c.id, "bob", &c.packets[..10]).await;
    next_matching(&mut bob_ev, |e| {
        matches!(e, Event::FirstPacket { .. }).then_some(())
    })
    .await;
    alice.close();
    let cut = next_matching(&mut bob_ev, |e| match e {
        Event::Cut { id, code } => Some((id, code)),
        _ => None,
    })
    .await;
    assert_eq!(
        cut,
        (c.id, ErrorCode::CutOff),
        "live recipient told it was cut off"
    );
    assert_eq!(t.pending(), 0, "nothing incomplete stored");
    // The retry, same id, new connection.
    let (alice2, _) = t.connect("alice").await;
    let first = alice2.send_clip(&c, Pacing::Upload).await.unwrap();
    assert!(!first.duplicate);
    // The "accepted" was lost: the app retries again.
    let again = alice2.send_clip(&c, Pacing::Upload).await.unwrap();
    assert!(again.duplicate);
    let got = next_complete(&mut bob_ev).await;
    assert_eq!(got.id(), c.id);
    assert_eq!(got.packets, c.packets);
    assert_no_clip(&mut bob_ev, Duration::from_millis(300)).await;
    assert_eq!(t.pending(), 1);
}

#[tokio::test]
async fn lost_recipient_ack_means_redelivery_and_one_copy_at_the_app() {
    let t = start(|_| {}).await;
    let (alice, _) = t.connect("alice").await;
    let c = clip("bob", 5);
    alice.send_clip(&c, Pacing::Upload).await.unwrap();
    let seen = SeenIds::new(100);
    let opts = || ClientOptions {
        seen: Some(seen.clone()),
        ..ClientOptions::default()
    };
    let (bob, mut ev) = t.try_connect_with(&t.token("bob"), opts()).await.unwrap();
    let got = next_complete(&mut ev).await;
    assert_eq!(got.id(), c.id);
    // The app has it, but the ack never reaches the relay.
    bob.close();
    let (_bob2, mut ev2) = t.try_connect_with(&t.token("bob"), opts()).await.unwrap();
    // The relay delivers it again...
    let redelivered = next_matching(&mut ev2, |e| match e {
        Event::Started { delivery, .. } => Some(delivery.clip_id),
        _ => None,
    })
    .await;
    assert_eq!(redelivered, c.id);
    // ...the library drops the duplicate and acks it for the app.
    assert_no_clip(&mut ev2, Duration::from_millis(300)).await;
    assert_eq!(t.settle_pending(0).await, 0);
}

#[tokio::test]
async fn bad_expired_and_missing_tokens_are_refused() {
    let t = start(|c| {
        c.token_leeway = Duration::ZERO;
        c.auth_timeout = Duration::from_millis(300);
    })
    .await;
    let refused = |r: Result<_, ClientError>| match r {
        Err(ClientError::Closed { code, reason }) => (code, reason),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("connection accepted"),
    };
    let (code, _) = refused(
        t.try_connect_with("not a jwt", ClientOptions::default())
            .await,
    );
    assert_eq!(code, ErrorCode::TokenInvalid);
    let (code, _) = refused(t.try_connect_with("", ClientOptions::default()).await);
    assert_eq!(code, ErrorCode::TokenInvalid);
    let forger = TokenKey::new(&[7u8; 32], Duration::ZERO).unwrap();
    let forged = forger.mint("bob", Duration::from_secs(60)).unwrap();
    let (code, _) = refused(t.try_connect_with(&forged, ClientOptions::default()).await);
    assert_eq!(code, ErrorCode::TokenInvalid);
    let expired = t
        .relay
        .token_key()
        .mint_claims(&Claims {
            sub: "bob".into(),
            exp: now_secs() - 10,
            ..Claims::default()
        })
        .unwrap();
    let (code, reason) = refused(t.try_connect_with(&expired, ClientOptions::default()).await);
    assert_eq!(code, ErrorCode::TokenExpired);
    assert!(reason.contains("expired"), "{reason}");
    // No Auth at all: closed after auth_timeout.
    let conn = t.raw_connection().await;
    let why = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .unwrap();
    assert_eq!(
        quic::close_reason(&why).unwrap().0,
        ErrorCode::Unauthenticated
    );
}

#[tokio::test]
async fn a_user_cannot_receive_or_release_anothers_clips() {
    let t = start(|_| {}).await;
    let (mallory, mut mal_ev) = t.connect("mallory").await;
    let (alice, _) = t.connect("alice").await;
    let c = clip("bob", 5);
    alice.send_clip(&c, Pacing::Upload).await.unwrap();
    // Mallory knows the id and acks it: bob's copy stays.
    mallory.ack(c.id).await.unwrap();
    assert_no_clip(&mut mal_ev, Duration::from_millis(300)).await;
    assert_eq!(t.pending(), 1);
    // Mallory cannot reuse alice's clip id either.
    let mut stolen = clip("mallory", 2);
    stolen.id = c.id;
    match mallory.send_clip(&stolen, Pacing::Upload).await {
        Err(ClientError::Rejected { code, .. }) => assert_eq!(code, ErrorCode::ClipIdConflict),
        other => panic!("{other:?}"),
    }
    let (_bob, mut bob_ev) = t.connect("bob").await;
    let got = next_complete(&mut bob_ev).await;
    assert_eq!(got.id(), c.id);
    assert_eq!(got.delivery.sender, "alice");
}

fn rejected(r: Result<ptt_client::SendOutcome, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Rejected { code, .. }) => code,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn limits_are_enforced_with_their_errors() {
    let t = start(|c| {
        c.max_clip_bytes = 1000;
        c.max_clip_duration = Duration::from_millis(500);
        c.max_packet_bytes = 200;
    })
    .await;
    let (_bob, mut bob_ev) = t.connect("bob").await;
    let (alice, _) = t.connect("alice").await;
    // 20 packets of ~55 bytes = over 1000 bytes but within 500 ms? No:
    // 20 x 20 ms = 400 ms, bytes > 1000.
    let mut big = clip("bob", 20);
    big.packets = (0..20).map(|i| packet(i, 60)).collect();
    assert_eq!(
        rejected(alice.send_clip(&big, Pacing::Upload).await),
        ErrorCode::ClipTooLarge
    );
    // 30 packets of 20 ms = 600 ms > 500 ms.
    let mut long = clip("bob", 30);
    long.packets = (0..30).map(|i| packet(i, 6)).collect();
    assert_eq!(
        rejected(alice.send_clip(&long, Pacing::Upload).await),
        ErrorCode::ClipTooLong
    );
    let mut fat = clip("bob", 1);
    fat.packets = vec![packet(0, 300)];
    assert_eq!(
        rejected(alice.send_clip(&fat, Pacing::Upload).await),
        ErrorCode::PacketTooLarge
    );
    // Code 1 (two equal frames) with an odd payload breaks RFC 6716 R3.
    let mut bad = clip("bob", 1);
    bad.packets = vec![bytes::Bytes::from_static(&[31 << 3 | 1, 1, 2, 3])];
    assert_eq!(
        rejected(alice.send_clip(&bad, Pacing::Upload).await),
        ErrorCode::BadPacket
    );
    // None of them stored or delivered whole; the connection still works.
    assert_eq!(t.pending(), 0);
    assert_no_clip(&mut bob_ev, Duration::from_millis(200)).await;
    alice
        .send_clip(&clip("bob", 3), Pacing::Upload)
        .await
        .unwrap();
    next_complete(&mut bob_ev).await;
}

#[tokio::test]
async fn a_stalled_upload_times_out_and_live_recipients_are_told() {
    let t = start(|c| c.upload_idle_timeout = Duration::from_millis(300)).await;
    let (_bob, mut bob_ev) = t.connect("bob").await;
    let (alice, _) = t.connect("alice").await;
    let id = ClipId(rand::random());
    let (_send, recv) = raw_upload(&alice, id, "bob", &[packet(0, 40), packet(1, 40)]).await;
    // The stream stays open but silent.
    match answer(recv).await {
        Message::Rejected(r) => {
            assert_eq!(r.code, ErrorCode::UploadIdleTimeout);
            assert_eq!(r.clip_id, id);
        }
        other => panic!("{other:?}"),
    }
    let cut = next_matching(&mut bob_ev, |e| match e {
        Event::Cut { id, code } => Some((id, code)),
        _ => None,
    })
    .await;
    assert_eq!(cut, (id, ErrorCode::CutOff));
    assert_eq!(t.pending(), 0);
}

#[tokio::test]
async fn connections_over_the_limit_are_told_the_relay_is_busy() {
    let t = start(|c| c.max_connections = 1).await;
    let (_a, _) = t.connect("alice").await;
    match t
        .try_connect_with(&t.token("bob"), ClientOptions::default())
        .await
    {
        Err(ClientError::Closed { code, .. }) => assert_eq!(code, ErrorCode::ServerBusy),
        Err(e) => panic!("unexpected {e}"),
        Ok(_) => panic!("second connection accepted"),
    }
}

#[tokio::test]
async fn a_newer_connection_replaces_the_older_one() {
    let t = start(|_| {}).await;
    let (old, _) = t.connect("bob").await;
    let (_new, mut ev) = t.connect("bob").await;
    match old.closed().await {
        ClientError::Closed { code, .. } => assert_eq!(code, ErrorCode::SessionReplaced),
        e => panic!("{e}"),
    }
    let (alice, _) = t.connect("alice").await;
    alice
        .send_clip(&clip("bob", 2), Pacing::Upload)
        .await
        .unwrap();
    next_complete(&mut ev).await;
}

#[tokio::test]
async fn admin_endpoints_answer() {
    let t = start(|_| {}).await;
    let addr = t.relay.admin_addr();
    for (path, want) in [("/healthz", "200"), ("/readyz", "200"), ("/nope", "404")] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(
            out.starts_with(&format!("HTTP/1.1 {want}")),
            "{path}: {out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_rates_and_the_inflight_budget_are_enforced() {
    let t = start(|c| {
        c.max_clips_per_minute = 3;
        c.max_inflight_bytes = 2_000;
    })
    .await;
    let (_bob, _bob_ev) = t.connect("bob").await;
    let (alice, _) = t.connect("alice").await;
    let first = clip("bob", 2);
    alice.send_clip(&first, Pacing::Upload).await.unwrap();
    for i in 1..3 {
        alice
            .send_clip(&clip("bob", 2 + i), Pacing::Upload)
            .await
            .unwrap();
    }
    match alice.send_clip(&clip("bob", 2), Pacing::Upload).await {
        Err(ClientError::Rejected {
            code: ErrorCode::RateLimited,
            retry_after_ms,
            ..
        }) => assert!(
            (1..=21_000).contains(&retry_after_ms),
            "one clip per 20 s: {retry_after_ms} ms"
        ),
        other => panic!("expected rate_limited, got {other:?}"),
    }
    // A retry of an accepted clip is still answered (duplicate), not
    // charged against the budget.
    let again = alice.send_clip(&first, Pacing::Upload).await.unwrap();
    assert!(again.duplicate);
    // Another user is not affected by alice's rate. The in-flight budget
    // (2,000 bytes) counts bytes as they arrive: an upload holding 1,830
    // leaves room for a small clip but not for one of 305 bytes, and the
    // held upload is itself refused once its next bytes would pass it.
    let (carol, _) = t.connect("carol").await;
    let big: Vec<bytes::Bytes> = (0..30).map(|i| packet(i, 60)).collect();
    let (mut held, held_answer) = raw_upload(&carol, ClipId([9; 16]), "bob", &big).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(t.relay.shared().inflight.load(Ordering::Relaxed), 30 * 61);
    carol
        .send_clip(&clip("bob", 2), Pacing::Upload)
        .await
        .expect("82 bytes fit beside 1,830");
    let mut larger = clip("bob", 5);
    larger.packets = (0..5).map(|i| packet(i, 60)).collect();
    match carol.send_clip(&larger, Pacing::Upload).await {
        Err(ClientError::Rejected {
            code: ErrorCode::ServerBusy,
            retry_after_ms,
            ..
        }) => assert!(retry_after_ms > 0),
        other => panic!("expected server_busy, got {other:?}"),
    }
    let mut more = bytes::BytesMut::new();
    for i in 30..40 {
        codec::framing::put_packet(&mut more, &packet(i, 60));
    }
    held.write_all(&more).await.unwrap();
    match answer(held_answer).await {
        Message::Rejected(r) => assert_eq!(r.code, ErrorCode::ServerBusy),
        other => panic!("expected the held upload refused, got {other:?}"),
    }
    assert_eq!(t.settle_inflight().await, 0, "refused uploads hold nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_is_met_with_retry_and_refusal() {
    let t = start(|c| c.max_handshakes_per_second = 2).await;
    let mut ok = 0;
    let mut refused = 0;
    for i in 0..12 {
        match t
            .try_connect_with(&t.token(&format!("u{i}")), ClientOptions::default())
            .await
        {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(e.is_retryable(), "{e}");
                refused += 1;
            }
        }
    }
    assert!(ok >= 2, "{ok} connected");
    assert!(refused > 0, "none refused");
    // The relay still answers once the burst has passed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    t.try_connect_with(&t.token("late"), ClientOptions::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_go_away_and_lets_uploads_finish() {
    let t = start(|c| c.drain_timeout = Duration::from_secs(5)).await;
    let (_bob, _bob_ev) = t.connect("bob").await;
    let (alice, mut alice_ev) = t.connect("alice").await;
    // A live clip of 1 s is under way when the relay is told to stop.
    let c = clip("bob", 50);
    let sending = {
        let alice = alice.clone();
        let c = c.clone();
        tokio::spawn(async move { alice.send_clip(&c, Pacing::Live).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let TestRelay { relay, .. } = t;
    let stop = tokio::spawn(relay.shutdown());
    let (code, retry) = next_matching(&mut alice_ev, |e| match e {
        Event::GoAway {
            code,
            retry_after_ms,
            ..
        } => Some((code, retry_after_ms)),
        _ => None,
    })
    .await;
    assert_eq!(code, ErrorCode::GoingAway);
    assert!(retry <= 5_000);
    // The clip in flight finishes and is accepted before the relay stops.
    let out = sending.await.unwrap().unwrap();
    assert_eq!(out.id, c.id);
    stop.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_per_connection_are_capped_by_stream_credit() {
    let t = start(|c| c.max_clip_streams = 2).await;
    let (_bob, _bob_ev) = t.connect("bob").await;
    let (alice, _) = t.connect("alice").await;
    let pk: Vec<bytes::Bytes> = (0..3).map(|i| packet(i, 40)).collect();
    let (mut first, _r1) = raw_upload(&alice, ClipId([1; 16]), "bob", &pk).await;
    let (mut second, _r2) = raw_upload(&alice, ClipId([2; 16]), "bob", &pk).await;
    // A connection that uploads may open `STREAM_CREDIT_FACTOR` times the
    // streams (the relay reads two at once; the others wait), no more...
    tokio::time::sleep(Duration::from_millis(200)).await;
    let credit = 3 * relay::testing::STREAM_CREDIT_FACTOR;
    let mut waiting = Vec::new();
    for _ in 0..credit - 3 {
        let s = tokio::time::timeout(Duration::from_secs(2), alice.connection().open_bi());
        waiting.push(s.await.expect("a stream within the credit").unwrap());
    }
    let third = alice.connection().open_bi();
    tokio::pin!(third);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut third)
            .await
            .is_err(),
        "a clip stream opened beyond the credit"
    );
    // ...and one opens once uploads end (quinn gives new credit once an
    // eighth of it, here two streams, is free again).
    first.reset(0u32.into()).unwrap();
    second.reset(0u32.into()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("no stream credit after an upload ended")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_waiting_in_upload_streams_are_capped_by_the_connection_window() {
    // Two uploads being read (and stalled, well within the idle and lag
    // limits), the rest of the stream credit open and written to as fast
    // as QUIC lets: the relay does not read them, so what it holds of
    // them is what the connection's window lets in, `(max_clip_streams +
    // 1) × STREAM_WINDOW` in all, however many streams carry it.
    let t = start(|c| {
        c.max_clip_streams = 2;
        c.upload_idle_timeout = Duration::from_secs(60);
        c.max_upload_lag = Duration::from_secs(60);
    })
    .await;
    let (_bob, _bob_ev) = t.connect("bob").await;
    let (alice, _) = t.connect("alice").await;
    let pk: Vec<bytes::Bytes> = (0..3).map(|i| packet(i, 40)).collect();
    let _first = raw_upload(&alice, ClipId([1; 16]), "bob", &pk).await;
    let _second = raw_upload(&alice, ClipId([2; 16]), "bob", &pk).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stream_window = relay::testing::STREAM_WINDOW as usize;
    let window = 3 * stream_window;
    let chunk = vec![0u8; 64 * 1024];
    let (mut written, mut blocked) = (0, 0);
    let mut streams = Vec::new();
    for _ in 0..3 * relay::testing::STREAM_CREDIT_FACTOR - 3 {
        let open = tokio::time::timeout(Duration::from_secs(2), alice.connection().open_bi());
        let (mut s, r) = open.await.expect("a stream within the credit").unwrap();
        let mut mine = 0;
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(300), s.write(&chunk)).await
        {
            mine += n;
        }
        assert!(mine <= stream_window, "{mine} bytes on one stream");
        written += mine;
        blocked += usize::from(mine == 0);
        streams.push((s, r));
    }
    assert!(
        written > stream_window && written <= window,
        "{written} bytes waiting in all, the window is {window}"
    );
    assert!(blocked > 0, "every stream took data: {written} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clip_bytes_per_minute_are_limited() {
    let t = start(|c| {
        c.max_clips_per_minute = 0;
        c.max_clip_bytes_per_minute = 1_000;
    })
    .await;
    let (_bob, _bob_ev) = t.connect("bob").await;
    let (alice, _) = t.connect("alice").await;
    // About 2,000 Opus bytes: accepted (bytes are charged at the end)...
    alice
        .send_clip(&clip("bob", 40), Pacing::Upload)
        .await
        .unwrap();
    // ...and the next clip waits until the minute's budget refills.
    match alice.send_clip(&clip("bob", 2), Pacing::Upload).await {
        Err(ClientError::Rejected {
            code: ErrorCode::RateLimited,
            retry_after_ms,
            ..
        }) => assert!(retry_after_ms > 1_000, "{retry_after_ms} ms"),
        other => panic!("expected rate_limited, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_max_message_bytes_are_refused() {
    let t = start(|c| c.max_message_bytes = 1_024).await;
    // An Auth message over the limit is refused before it is read.
    let huge = "x".repeat(2_000);
    match t.try_connect_with(&huge, ClientOptions::default()).await {
        Err(ClientError::Closed { code, .. }) => assert_eq!(code, ErrorCode::ProtocolViolation),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("connection accepted"),
    }
    // A normal token still fits.
    t.connect("alice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clip_ids_are_forgotten_after_the_dedupe_window() {
    let t = start(|c| c.dedupe_window = Duration::from_millis(300)).await;
    let (bob, mut bob_ev) = t.connect("bob").await;
    let (alice, _) = t.connect("alice").await;
    let c = clip("bob", 3);
    alice.send_clip(&c, Pacing::Upload).await.unwrap();
    let got = next_complete(&mut bob_ev).await;
    bob.ack(got.id()).await.unwrap();
    // Within the window a resend is a duplicate...
    assert!(alice.send_clip(&c, Pacing::Upload).await.unwrap().duplicate);
    // ...after it (the sweep runs every 300 ms here), a new clip.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(!alice.send_clip(&c, Pacing::Upload).await.unwrap().duplicate);
}
