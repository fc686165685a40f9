//! The `ptt-relay` binary with its default durable store, killed with
//! SIGKILL and restarted on the same data dir: every acknowledged,
//! undelivered clip arrives exactly once, in order, byte for byte; clips
//! the recipient acked before the crash do not come again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use codec::token::TokenKey;
use codec::wire::ClipId;
use common::{assert_no_clip, clip, next_matching, start_binary, start_binary_at};
use ptt_client::{Client, ClientOptions, Event, Pacing, net};
use tokio::process::Command;

async fn connect(
    dir: &Path,
    addr: SocketAddr,
    user: &str,
) -> (
    Arc<Client>,
    tokio::sync::mpsc::Receiver<Event>,
    quinn::Endpoint,
) {
    let key = TokenKey::from_file(&dir.join("token.secret"), Duration::ZERO).unwrap();
    let ep = net::endpoint(addr, &dir.join("cert.pem")).unwrap();
    let (c, ev) = Client::connect(
        &ep,
        addr,
        "localhost",
        &key.mint(user, Duration::from_secs(600)).unwrap(),
        ClientOptions::default(),
    )
    .await
    .unwrap();
    (c, ev, ep)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_accepted_clip_and_repeats_no_acked_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut relay, addr) = start_binary(d, &[]).await;

    // Alice sends 20 clips to bob, who is offline; each is accepted.
    let (alice, _aev, _aep) = connect(d, addr, "alice").await;
    let mut sent = Vec::new();
    for i in 0..20 {
        let c = clip("bob", 10 + i);
        let out = alice.send_clip(&c, Pacing::Upload).await.unwrap();
        assert!(!out.duplicate);
        sent.push(c);
    }
    // Bob takes five clips and acks them.
    let (bob, mut bev, _bep) = connect(d, addr, "bob").await;
    let mut acked = Vec::new();
    let mut started = Vec::new();
    while acked.len() < 5 {
        let ev = next_matching(&mut bev, |e| match e {
            Event::Started { delivery, seq, .. } => Some(Err((seq, delivery.clip_id))),
            Event::Complete(c) => Some(Ok(c.id())),
            _ => None,
        })
        .await;
        match ev {
            Err(x) => started.push(x),
            Ok(id) => {
                bob.ack(id).await.unwrap();
                acked.push(id);
            }
        }
    }
    // The n-th delivery stream carries the n-th clip sent.
    for (seq, id) in &started {
        assert_eq!(
            sent[*seq as usize].id, *id,
            "stored clips start oldest first"
        );
    }
    bob.shutdown().await;
    // Acks are written with the store's next commit: give it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;

    relay.kill().await.unwrap(); // SIGKILL: no drain, no flush.
    let (_relay2, addr2) = start_binary(d, &[]).await;

    let (bob, mut bev, _bep) = connect(d, addr2, "bob").await;
    let mut order = Vec::new();
    let mut got = std::collections::HashMap::new();
    while got.len() < 15 {
        let ev = next_matching(&mut bev, |e| match e {
            Event::Started { delivery, seq, .. } => Some(Err((seq, delivery.clip_id))),
            Event::Complete(c) => Some(Ok(c)),
            _ => None,
        })
        .await;
        match ev {
            Err(x) => order.push(x),
            Ok(c) => {
                assert!(!acked.contains(&c.id()), "an acked clip came again");
                assert!(got.insert(c.id(), c.clone()).is_none(), "a clip came twice");
                bob.ack(c.id()).await.unwrap();
            }
        }
    }
    order.sort();
    let order: Vec<ClipId> = order.into_iter().map(|(_, id)| id).collect();
    let want: Vec<ClipId> = sent
        .iter()
        .map(|c| c.id)
        .filter(|id| !acked.contains(id))
        .collect();
    assert_eq!(order, want, "delivered in the order accepted");
    for c in sent.iter().filter(|c| !acked.contains(&c.id)) {
        let r = &got[&c.id];
        assert_eq!(r.packets, c.packets, "identical bytes");
        assert_eq!(r.end.final_granule, c.final_granule);
        assert!(!r.delivery.live);
        assert_eq!(r.delivery.sender, "alice");
    }
    assert_no_clip(&mut bev, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_flushes_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut relay, addr) = start_binary(d, &[]).await;
    let (alice, _aev, _aep) = connect(d, addr, "alice").await;
    let c = clip("bob", 10);
    alice.send_clip(&c, Pacing::Upload).await.unwrap();
    let pid = relay.id().unwrap().to_string();
    let kill = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(20), relay.wait())
        .await
        .expect("the relay did not stop")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
    // What was accepted is there after the restart.
    let (_relay2, addr2) = start_binary(d, &[]).await;
    let (_bob, mut bev, _bep) = connect(d, addr2, "bob").await;
    let got = common::next_complete(&mut bev).await;
    assert_eq!(got.id(), c.id);
}

/// After a kill -9 and a restart on the same data dir and address, a
/// client's old connection is reset at its first packet (the relay keeps
/// its stateless-reset key in the data dir), not left to the 30 s idle
/// timeout: the client knows at once and reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relay_resets_old_connections_at_their_first_packet() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut relay, addr) = start_binary(d, &[]).await;
    let (alice, _aev, _aep) = connect(d, addr, "alice").await;
    relay.kill().await.unwrap();
    let (_relay2, addr2) = start_binary_at(d, &addr.to_string(), &[]).await;
    assert_eq!(addr2, addr);
    // The client's next packets: an upload on the old connection.
    let sent = std::time::Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        alice.send_clip(&clip("bob", 3), Pacing::Upload),
    )
    .await
    .expect("the old connection ends within 5 s, not at its idle timeout");
    assert!(r.is_err(), "the old connection cannot carry a clip");
    let why = alice.connection().close_reason().expect("closed");
    assert!(
        matches!(why, quinn::ConnectionError::Reset),
        "a stateless reset, got {why:?}"
    );
    eprintln!(
        "old connection reset {:?} after its first packet",
        sent.elapsed()
    );
    // And a new connection works at once.
    let (alice, _aev, _aep) = connect(d, addr, "alice").await;
    alice
        .send_clip(&clip("bob", 3), Pacing::Upload)
        .await
        .unwrap();
}
