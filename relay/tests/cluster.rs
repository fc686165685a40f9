//! Relays joined over a real NATS server (`nats-server`, started here on a
//! free loopback port): users on different relays talk live to each other.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use client_sim::Pacing;
use codec::token::Right::{Listen, Talk};
use codec::wire::Target;
use common::*;
use relay::cluster::{channel_subject, user_subject};

/// A `nats-server` on loopback, killed on drop.
struct Nats {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Nats {
    fn start() -> Nats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed (apt-get install nats-server)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            _dir: dir,
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two relays in one cluster, sharing certificate and token secret.
async fn pair(nats: &Nats) -> (TestRelay, TestRelay, tempfile::TempDir) {
    let url = nats.url.clone();
    let one = start(|c| c.cluster = url.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    for f in ["cert.pem", "key.pem", "token.secret"] {
        std::fs::copy(
            one.relay.files().cert.parent().unwrap().join(f),
            dir.path().join(f),
        )
        .unwrap();
    }
    let two = start_in(dir.path(), |c| c.cluster = url).await;
    (one, two, dir)
}

async fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn cluster(t: &TestRelay) -> &relay::cluster::Cluster {
    t.relay.shared().cluster.as_deref().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alice_on_one_relay_talks_live_to_bob_on_another() {
    let nats = Nats::start();
    let (one, two, _dir) = pair(&nats).await;
    let (bob, mut bob_ev) = two.connect("bob").await;
    until("bob's subject", || {
        cluster(&two).is_subscribed(&user_subject("bob"))
    })
    .await;
    let (alice, _) = one.connect("alice").await;
    let c = clip("bob", 25);
    alice.send_clip(&c, Pacing::Live).await.unwrap();
    let got = next_complete(&mut bob_ev).await;
    assert_eq!(got.id(), c.id);
    assert_eq!(got.delivery.sender, "alice");
    assert!(got.delivery.live, "relayed live, not from a store");
    assert_eq!(got.packets, c.packets, "identical packets");
    // Relay two kept a copy for Bob until he acks; so did relay one.
    assert_eq!((one.pending(), two.pending()), (1, 1));
    bob.ack(got.id()).await.unwrap();
    // Bob's ack reached both relays: neither still owes him the clip.
    until("the acks", || one.pending() == 0 && two.pending() == 0).await;
    // And a clip for someone on no relay stays stored where it was sent.
    alice
        .send_clip(&clip("carol", 3), Pacing::Upload)
        .await
        .unwrap();
    assert_eq!(one.pending(), 1);
    let (_carol, mut carol_ev) = one.connect("carol").await;
    assert_eq!(next_complete(&mut carol_ev).await.packets.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_spans_relays() {
    let nats = Nats::start();
    let (one, two, _dir) = pair(&nats).await;
    let (carol, mut carol_ev) = two.member("carol", &[("ops", Listen)]).await;
    let (erin, mut erin_ev) = two.member("erin", &[("ops", Listen)]).await;
    let (dave, mut dave_ev) = one.member("dave", &[("ops", Listen)]).await;
    until("the channel's subject", || {
        cluster(&two).is_subscribed(&channel_subject("ops"))
    })
    .await;
    let (alice, _) = one.member("alice", &[("ops", Talk)]).await;
    let mut c = clip("x", 20);
    c.target = Target::Channel("ops".into());
    alice.send_clip(&c, Pacing::Live).await.unwrap();
    for (who, ev) in [
        (&carol, &mut carol_ev),
        (&erin, &mut erin_ev),
        (&dave, &mut dave_ev),
    ] {
        let got = next_complete(ev).await;
        assert_eq!(got.id(), c.id);
        assert_eq!(got.delivery.target, Target::Channel("ops".into()));
        assert!(got.delivery.live);
        assert_eq!(got.packets, c.packets);
        who.ack(got.id()).await.unwrap();
    }
    until("the acks", || one.pending() == 0 && two.pending() == 0).await;
}
