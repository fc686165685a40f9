//! Conformance: one test per rule of docs/protocol.md that an independent
//! client found the relay breaking or the spec leaving open. Each speaks
//! ptt/1 bytes by hand where the reference client would hide the rule.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use codec::ErrorCode;
use codec::varint;
use codec::wire::{Accepted, AudioFormat, ClipHeader, ClipId, Message, Rejected, Target};
use common::*;
use ptt_client::{ClientError, ClientOptions, Event, Pacing};

const ZERO: ClipId = ClipId([0; 16]);

/// Opens an upload stream, writes `bytes` (and FIN when `fin`), and reads
/// the relay's one answer.
async fn upload_bytes(client: &ptt_client::Client, bytes: &[u8], fin: bool) -> Message {
    let (mut send, recv) = client.connection().open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    if fin {
        send.finish().unwrap();
    }
    answer(recv).await
}

fn rejected(m: Message) -> Rejected {
    match m {
        Message::Rejected(r) => r,
        other => panic!("expected Rejected, got {other:?}"),
    }
}

fn header(id: ClipId, to: &str) -> BytesMut {
    let mut b = BytesMut::new();
    Message::ClipHeader(ClipHeader {
        clip_id: id,
        target: Target::User(to.into()),
        format: AudioFormat::default(),
    })
    .encode(&mut b);
    b
}

/// A whole clip's bytes after its header: `n` packets and the end record.
fn body(b: &mut BytesMut, n: u32) {
    for i in 0..n {
        codec::framing::put_packet(b, &packet(i, 40));
    }
    codec::ClipEnd {
        packet_count: u64::from(n),
        final_granule: u64::from(n) * 960,
    }
    .encode(b);
}

/// §5: every upload gets exactly one `Accepted` or `Rejected`, also when
/// its first message is not a valid `ClipHeader`; then the clip id is all
/// zeros.
#[tokio::test]
async fn every_upload_is_answered_even_with_a_bad_header() {
    let t = start(|c| {
        c.max_message_bytes = 1_024;
        c.upload_idle_timeout = Duration::from_millis(300);
    })
    .await;
    let (alice, _) = t.connect("alice").await;

    // A header body over max_message_bytes, refused before it is read.
    let mut b = BytesMut::new();
    varint::put(&mut b, 0x10);
    varint::put(&mut b, 5_000);
    let r = rejected(upload_bytes(&alice, &b, false).await);
    assert_eq!((r.clip_id, r.code), (ZERO, ErrorCode::ProtocolViolation));

    // An unknown target kind.
    let mut inner = BytesMut::new();
    inner.put_slice(&[7; 16]);
    inner.put_u8(9);
    varint::put(&mut inner, 3);
    inner.put_slice(b"bob");
    inner.put_slice(&[0, 1, 0, 0, 0, 0, 0xbb, 0x80, 0, 0]);
    let mut b = BytesMut::new();
    varint::put(&mut b, 0x10);
    varint::put(&mut b, inner.len() as u64);
    b.put_slice(&inner);
    let r = rejected(upload_bytes(&alice, &b, true).await);
    assert_eq!((r.clip_id, r.code), (ZERO, ErrorCode::ProtocolViolation));

    // Another known message where the header belongs.
    let mut b = BytesMut::new();
    Message::Ack(ClipId([3; 16])).encode(&mut b);
    let r = rejected(upload_bytes(&alice, &b, true).await);
    assert_eq!((r.clip_id, r.code), (ZERO, ErrorCode::ProtocolViolation));

    // FIN before any header.
    let r = rejected(upload_bytes(&alice, &[], true).await);
    assert_eq!((r.clip_id, r.code), (ZERO, ErrorCode::ProtocolViolation));

    // Nothing at all for upload_idle_ms.
    let (mut send, recv) = alice.connection().open_bi().await.unwrap();
    // (A stream exists for the relay only once a frame of it arrives.)
    send.write_all(&[]).await.unwrap();
    let mut b = BytesMut::new();
    varint::put(&mut b, 0x3f00); // an unknown type, empty: skipped
    varint::put(&mut b, 0);
    send.write_all(&b).await.unwrap();
    let r = rejected(answer(recv).await);
    assert_eq!((r.clip_id, r.code), (ZERO, ErrorCode::UploadIdleTimeout));
}

/// §2: a message of unknown type is skipped everywhere: before an upload's
/// header, and on the control stream.
#[tokio::test]
async fn unknown_messages_are_skipped_on_every_stream() {
    let t = start(|_| {}).await;
    let (alice, _) = t.connect("alice").await;
    let (_bob, mut bob_ev) = t.connect("bob").await;
    let id = ClipId([5; 16]);
    let mut b = BytesMut::new();
    varint::put(&mut b, 0x3f00);
    varint::put(&mut b, 3);
    b.put_slice(b"new");
    b.put_slice(&header(id, "bob"));
    body(&mut b, 3);
    match upload_bytes(&alice, &b, true).await {
        Message::Accepted(a) => assert_eq!(a.clip_id, id),
        other => panic!("expected Accepted, got {other:?}"),
    }
    let got = next_complete(&mut bob_ev).await;
    assert_eq!(got.id(), id);

    // On the control stream too; a known message out of place is not.
    let (conn, (mut ctl, _rd)) = ctl_conn(&t, "carol").await;
    let mut b = BytesMut::new();
    varint::put(&mut b, 0x3f01);
    varint::put(&mut b, 2);
    b.put_slice(b"hi");
    ctl.write_all(&b).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        conn.close_reason().is_none(),
        "an unknown message is skipped"
    );
    let mut b = BytesMut::new();
    Message::Accepted(Accepted {
        clip_id: id,
        duplicate: false,
    })
    .encode(&mut b);
    ctl.write_all(&b).await.unwrap();
    assert_eq!(close_code(&conn).await, Some(ErrorCode::ProtocolViolation));
}

/// Connects, sends `Auth` and reads `Welcome`.
async fn ctl_conn(
    t: &TestRelay,
    user: &str,
) -> (quinn::Connection, (quinn::SendStream, quic::MessageReader)) {
    let conn = t.raw_connection().await;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    quic::write_message(
        &mut send,
        &Message::Auth(codec::wire::Auth {
            token: t.token(user),
        }),
    )
    .await
    .unwrap();
    let mut rd = quic::MessageReader::new(recv, 65_536);
    match rd.next().await.unwrap() {
        Some(Message::Welcome(_)) => {}
        other => panic!("expected Welcome, got {other:?}"),
    }
    // §2: `AckPolicy` right behind it, unless the relay takes one id per
    // `Ack`.
    if let Some(policy) = t.relay.shared().config.ack_policy() {
        match rd.next().await.unwrap() {
            Some(Message::AckPolicy(p)) => assert_eq!(p, policy),
            other => panic!("expected AckPolicy, got {other:?}"),
        }
    }
    (conn, (send, rd))
}

/// §2 `AckPolicy`, §5 "Ack": right after `Welcome` the relay says how it
/// takes acks; one `Ack` of several ids, written as bytes from the spec,
/// releases every one of those clips; an `Ack` of more ids than
/// `max_ids` is a protocol violation; a relay set to one id per `Ack`
/// announces nothing (and a client of the previous version, which knows
/// no `AckPolicy`, skips it as an unknown type: the reference client's
/// own tests run against both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_clips_are_acked_in_one_ack_as_the_relay_announced() {
    let t = start(|c| c.ack_batch = 3).await;
    let (alice, _a) = t.connect("alice").await;
    let clips: Vec<_> = (0..3).map(|i| clip("bob", 3 + i)).collect();
    for c in &clips {
        alice.send_clip(c, Pacing::Upload).await.unwrap();
    }
    assert_eq!(t.pending(), 3);
    let (conn, (mut ctl, _rd)) = ctl_conn(&t, "bob").await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let recv = conn.accept_uni().await.unwrap();
        let mut rd = quic::MessageReader::new(recv, 65_536);
        match rd.next().await.unwrap() {
            Some(Message::Delivery(d)) => ids.push(d.clip_id),
            other => panic!("expected Delivery, got {other:?}"),
        }
    }
    let mut ack = vec![0x03, 0x30];
    for id in &ids {
        ack.extend(id.0);
    }
    ctl.write_all(&ack).await.unwrap();
    ctl.finish().unwrap();
    assert_eq!(close_code(&conn).await, Some(ErrorCode::NoError));
    assert_eq!(t.settle_pending(0).await, 0, "one Ack released all three");

    // Four ids where three are allowed.
    let (conn, (mut ctl, _rd)) = ctl_conn(&t, "bob").await;
    let mut ack = vec![0x03, 0x40];
    ack.extend([7u8; 64]);
    ctl.write_all(&ack).await.unwrap();
    assert_eq!(close_code(&conn).await, Some(ErrorCode::ProtocolViolation));

    // One id per `Ack`: no `AckPolicy` after `Welcome`.
    let t = start(|c| c.ack_batch = 1).await;
    let (_conn, (_ctl, mut rd)) = ctl_conn(&t, "bob").await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rd.next())
            .await
            .is_err(),
        "nothing after Welcome"
    );
}

/// §1, §5: more upload streams may be open than `max_clip_streams` (the
/// QUIC credit of a connection that uploads is larger, so MAX_STREAMS
/// goes out less often), but the relay reads no more than
/// `max_clip_streams` at once: the others wait for a place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_than_max_clip_streams_uploads_are_read_at_once() {
    let t = start(|c| c.max_clip_streams = 1).await;
    let (alice, _a) = t.connect("alice").await;
    let (_bob, _b) = t.connect("bob").await;
    alice
        .send_clip(&clip("bob", 2), Pacing::Upload)
        .await
        .unwrap();
    // One upload held open, then a whole second one.
    let (a, b) = (ClipId([0xa1; 16]), ClipId([0xb2; 16]));
    let (mut send_a, recv_a) = alice.connection().open_bi().await.unwrap();
    let mut bytes = header(a, "bob");
    codec::framing::put_packet(&mut bytes, &packet(0, 40));
    send_a.write_all(&bytes).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut send_b, recv_b) = alice.connection().open_bi().await.unwrap();
    let mut bytes = header(b, "bob");
    body(&mut bytes, 2);
    send_b.write_all(&bytes).await.unwrap();
    send_b.finish().unwrap();
    let answer_b = tokio::spawn(answer(recv_b));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !answer_b.is_finished(),
        "the second upload waits for a place"
    );
    let mut end = BytesMut::new();
    codec::ClipEnd {
        packet_count: 1,
        final_granule: 960,
    }
    .encode(&mut end);
    send_a.write_all(&end).await.unwrap();
    send_a.finish().unwrap();
    for (id, m) in [(a, answer(recv_a).await), (b, answer_b.await.unwrap())] {
        match m {
            Message::Accepted(x) => assert_eq!(x.clip_id, id),
            other => panic!("expected Accepted, got {other:?}"),
        }
    }
}

/// §2: the end record's marker is the varint 0 in any encoding.
#[tokio::test]
async fn an_end_marker_in_a_longer_varint_encoding_is_accepted() {
    let t = start(|_| {}).await;
    let (alice, _) = t.connect("alice").await;
    let id = ClipId([6; 16]);
    let mut b = header(id, "bob");
    codec::framing::put_packet(&mut b, &packet(0, 40));
    b.put_slice(&[0x40, 0x00]); // 0 as a two-byte varint
    varint::put(&mut b, 1);
    varint::put(&mut b, 960);
    match upload_bytes(&alice, &b, true).await {
        Message::Accepted(a) => assert_eq!(a.clip_id, id),
        other => panic!("expected Accepted, got {other:?}"),
    }
}

/// §6: a packet over max_packet_bytes is `packet_too_large`; a frame over
/// 1275 bytes inside a packet within the limit breaks RFC 6716 §3 (R2):
/// `bad_packet`.
#[tokio::test]
async fn oversized_packets_and_frames_get_their_codes() {
    let t = start(|_| {}).await;
    let (alice, _) = t.connect("alice").await;
    // A code 0 packet: one frame of 1,300 bytes, within 7,657.
    let mut frame = vec![0u8; 1_301];
    frame[0] = 31 << 3;
    let mut b = header(ClipId([7; 16]), "bob");
    codec::framing::put_packet(&mut b, &frame);
    let r = rejected(upload_bytes(&alice, &b, false).await);
    assert_eq!(r.code, ErrorCode::BadPacket);
    // A packet over max_packet_bytes.
    let mut b = header(ClipId([8; 16]), "bob");
    varint::put(&mut b, 8_000);
    let r = rejected(upload_bytes(&alice, &b, false).await);
    assert_eq!(r.code, ErrorCode::PacketTooLarge);
}

/// §5: after `Accepted` with `duplicate = 1` the relay stops the upload
/// with STOP_SENDING `no_error`.
#[tokio::test]
async fn a_duplicate_is_stopped_with_no_error() {
    let t = start(|_| {}).await;
    let (alice, _) = t.connect("alice").await;
    let c = clip("bob", 3);
    alice.send_clip(&c, Pacing::Upload).await.unwrap();
    let (send, recv) = raw_upload(&alice, c.id, "bob", &c.packets[..1]).await;
    match answer(recv).await {
        Message::Accepted(a) => assert!(a.duplicate),
        other => panic!("expected Accepted(duplicate), got {other:?}"),
    }
    let stopped = tokio::time::timeout(Duration::from_secs(5), send.stopped())
        .await
        .expect("stopped in time")
        .unwrap();
    assert_eq!(stopped, Some(quic::varint(ErrorCode::NoError)));
}

/// §7 "Going away": on shutdown every connection closes with
/// `going_away` (never code 0 with no reason), and a handshake during the
/// drain is refused at once instead of left unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_every_connection_with_going_away_and_refuses_new_ones() {
    let t = start(|c| c.drain_timeout = Duration::from_secs(5)).await;
    let mut clients = Vec::new();
    for i in 0..12 {
        clients.push(t.connect(&format!("user{i}")).await);
    }
    let (_bob, _) = t.connect("bob").await;
    let (alice, mut alice_ev) = t.connect("alice").await;
    // A live clip keeps the drain going for ~1 s.
    let c = clip("bob", 50);
    let sending = {
        let alice = alice.clone();
        tokio::spawn(async move { alice.send_clip(&c, Pacing::Live).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let endpoint = t.endpoint.clone();
    let addr = t.relay.quic_addr();
    let token = t.token("late");
    let TestRelay { relay, .. } = t;
    let stop = tokio::spawn(relay.shutdown());
    next_matching(&mut alice_ev, |e| match e {
        Event::GoAway { .. } => Some(()),
        _ => None,
    })
    .await;
    // A new connection now: refused at once (not a 10 s handshake timeout).
    let started = std::time::Instant::now();
    let r = ptt_client::Client::connect(
        &endpoint,
        addr,
        "localhost",
        &token,
        ClientOptions::default(),
    )
    .await;
    assert!(r.is_err(), "a connection during the drain is refused");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "refused, not left unanswered ({:?})",
        started.elapsed()
    );
    sending.await.unwrap().unwrap();
    stop.await.unwrap();
    for (c, _) in &clients {
        match tokio::time::timeout(Duration::from_secs(5), c.closed()).await {
            Ok(ClientError::Closed { code, reason }) => {
                assert_eq!(code, ErrorCode::GoingAway, "closed with {code}: {reason}")
            }
            other => panic!("expected a going_away close, got {other:?}"),
        }
    }
}

/// §5 "Gaps": a copy dropped at `clip_ttl` comes as `Expired` on the
/// control stream right after `Welcome`, on every connection, until the
/// client acks its clip id with `Ack`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_copy_is_announced_after_welcome_until_acked() {
    let t = start(|c| c.clip_ttl = Duration::from_secs(1)).await;
    let (alice, _a) = t.connect("alice").await;
    let c = clip("bob", 5);
    alice.send_clip(&c, Pacing::Upload).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while t.pending() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(t.pending(), 0);
    for _ in 0..2 {
        let (conn, (mut send, mut rd)) = ctl_conn(&t, "bob").await;
        let m = tokio::time::timeout(Duration::from_secs(5), rd.next())
            .await
            .expect("a notice")
            .unwrap();
        match m {
            Some(Message::Expired(x)) => {
                assert_eq!(x.clip_id, c.id);
                assert_eq!(x.sender, "alice");
                assert_eq!(x.target, Target::User("bob".into()));
                assert_eq!(x.also, 0);
            }
            other => panic!("expected Expired, got {other:?}"),
        }
        // No delivery stream for it.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), conn.accept_uni())
                .await
                .is_err()
        );
        conn.close(0u32.into(), b"bye");
        drop(send.finish());
    }
    let (conn, (mut send, mut rd)) = ctl_conn(&t, "bob").await;
    assert!(matches!(rd.next().await, Ok(Some(Message::Expired(_)))));
    quic::write_message(&mut send, &Message::Ack(c.id))
        .await
        .unwrap();
    send.finish().unwrap();
    assert_eq!(close_code(&conn).await, Some(ErrorCode::NoError));
    let (_conn, (_send, mut rd)) = ctl_conn(&t, "bob").await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rd.next())
            .await
            .is_err(),
        "acked: no notice any more"
    );
}

/// §2, §3: `PushRegister` and `PushUnregister` on the control stream, as
/// bytes written from the spec's tables, are answered with one
/// `PushResult` each, in order; a provider number the spec does not know
/// is malformed and closes the connection with `protocol_violation`.
#[tokio::test]
async fn push_registrations_are_answered_in_order_and_checked() {
    let t = start(|_| {}).await;
    let (_conn, (mut send, mut rd)) = ctl_conn(&t, "bob").await;
    // PushRegister: provider 2 (fcm), device_id "d1", token "t", topic "".
    send.write_all(&[0x08, 0x07, 0x02, 0x02, b'd', b'1', 0x01, b't', 0x00])
        .await
        .unwrap();
    // PushUnregister "d1", then "zz" (never registered).
    send.write_all(&[0x09, 0x03, 0x02, b'd', b'1'])
        .await
        .unwrap();
    send.write_all(&[0x09, 0x03, 0x02, b'z', b'z'])
        .await
        .unwrap();
    let mut answers = Vec::new();
    for _ in 0..3 {
        match rd.next().await.unwrap() {
            Some(Message::PushResult(r)) => answers.push((r.device_id, r.code, r.devices)),
            other => panic!("expected PushResult, got {other:?}"),
        }
    }
    assert_eq!(
        answers,
        [
            ("d1".to_owned(), ErrorCode::NoError, 1),
            ("d1".to_owned(), ErrorCode::NoError, 0),
            ("zz".to_owned(), ErrorCode::NoError, 0),
        ]
    );
    // Provider 3 is no provider: a malformed message.
    let (conn, (mut send, _rd)) = ctl_conn(&t, "carol").await;
    send.write_all(&[0x08, 0x07, 0x03, 0x02, b'd', b'1', 0x01, b't', 0x00])
        .await
        .unwrap();
    assert_eq!(close_code(&conn).await, Some(ErrorCode::ProtocolViolation));
}
