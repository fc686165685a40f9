//! Relays joined over a real NATS server (`nats-server`, started here on a
//! free loopback port): users on different relays talk live to each other.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use codec::token::Right::{Listen, Talk};
use codec::wire::Target;
use common::nats::*;
use common::*;
use ptt_client::Pacing;
use relay::testing::{channel_subject, user_subject};

fn cluster(t: &TestRelay) -> &relay::testing::Cluster {
    t.relay.cluster().unwrap()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_loses_nothing_and_routing_comes_back() {
    let mut nats = Nats::start();
    let (one, two, _dir) = pair(&nats).await;
    let (bob, mut bob_ev) = two.connect("bob").await;
    let (alice, _) = one.connect("alice").await;
    until("bob's subject", || {
        cluster(&two).is_subscribed(&user_subject("bob"))
    })
    .await;
    nats.restart();
    // While the relays reconnect, a clip for Bob is accepted and kept by
    // relay one (it cannot know where Bob is).
    let kept = clip("bob", 3);
    alice.send_clip(&kept, Pacing::Upload).await.unwrap();
    assert_eq!(one.pending(), 1);
    until("both relays back on NATS", || {
        cluster(&one).connected() && cluster(&two).connected()
    })
    .await;
    // Subscriptions come back with the connection: live again. Give the
    // server a moment to have Bob's subscription replayed.
    let mut heard = None;
    for _ in 0..50 {
        let c = clip("bob", 5);
        alice.send_clip(&c, Pacing::Upload).await.unwrap();
        if let Ok(Some(got)) = tokio::time::timeout(Duration::from_millis(200), async {
            loop {
                match bob_ev.recv().await {
                    Some(ptt_client::Event::Complete(got)) if got.id() == c.id => {
                        return Some(got);
                    }
                    Some(_) => {}
                    None => return None,
                }
            }
        })
        .await
        {
            heard = Some(got);
            break;
        }
    }
    let got = heard.expect("live routing came back after the NATS restart");
    assert!(got.delivery.live);
    bob.ack(got.id()).await.unwrap();
    // The clip sent during the restart is still owed to Bob at relay one:
    // he gets it there.
    drop(bob);
    let (_bob, mut bob_ev) = one.connect("bob").await;
    let again = next_matching(&mut bob_ev, |e| match e {
        ptt_client::Event::Complete(c) if c.id() == kept.id => Some(c),
        _ => None,
    })
    .await;
    assert_eq!(again.packets, kept.packets);
}

/// Relay one (the `ptt-relay` binary, to be killed), relay two (sharing
/// its keys) in the cluster of `nats`, and Alice connected to relay one
/// with `token(&two)`.
struct Doomed {
    one: tokio::process::Child,
    two: TestRelay,
    alice: std::sync::Arc<ptt_client::Client>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn doomed(nats: &Nats, token: impl Fn(&TestRelay) -> String) -> Doomed {
    let dir_one = tempfile::tempdir().unwrap();
    let (one, addr) = start_binary(dir_one.path(), &["--cluster", &nats.url]).await;
    let dir_two = sharing_keys(dir_one.path());
    let url = nats.url.clone();
    let two = start_in(dir_two.path(), |c| c.cluster = url).await;
    let ep = ptt_client::net::endpoint(addr, &dir_one.path().join("cert.pem")).unwrap();
    let (alice, _) = ptt_client::Client::connect(
        &ep,
        addr,
        "localhost",
        &token(&two),
        ptt_client::ClientOptions::default(),
    )
    .await
    .unwrap();
    Doomed {
        one,
        two,
        alice,
        _dirs: (dir_one, dir_two),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clip_accepted_by_a_relay_that_dies_is_delivered_by_another_once() {
    let nats = Nats::start();
    // Alice, on relay one, leaves Bob (offline everywhere) three clips.
    let Doomed {
        mut one,
        two,
        alice,
        _dirs,
    } = doomed(&nats, |t| t.token("alice")).await;
    let sent: Vec<_> = (0..3).map(|i| clip("bob", 3 + i)).collect();
    for c in &sent {
        let out = alice.send_clip(c, Pacing::Upload).await.unwrap();
        assert!(!out.duplicate);
    }
    // Relay one dies with them undelivered.
    one.kill().await.unwrap();
    drop(alice);
    // Bob connects to relay two and gets all three, in order, intact.
    let (bob, mut bob_ev) = two.connect("bob").await;
    let (mut order, mut got) = (Vec::new(), std::collections::HashMap::new());
    while got.len() < sent.len() {
        let ev = next_matching(&mut bob_ev, |e| match e {
            ptt_client::Event::Started { delivery, seq, .. } => Some(Err((seq, delivery.clip_id))),
            ptt_client::Event::Complete(c) => Some(Ok(c)),
            _ => None,
        })
        .await;
        match ev {
            Err(x) => order.push(x),
            Ok(c) => {
                bob.ack(c.id()).await.unwrap();
                assert!(got.insert(c.id(), c).is_none(), "a clip came twice");
            }
        }
    }
    order.sort();
    let order: Vec<_> = order.into_iter().map(|(_, id)| id).collect();
    assert_eq!(
        order,
        sent.iter().map(|c| c.id).collect::<Vec<_>>(),
        "in order"
    );
    for c in &sent {
        assert_eq!(got[&c.id].delivery.sender, "alice");
        assert_eq!(got[&c.id].packets, c.packets, "identical packets");
    }
    until("the acks", || two.pending() == 0).await;
    // Once: after his acks, nothing comes again on reconnect.
    drop(bob);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_bob, mut bob_ev) = two.connect("bob").await;
    assert_no_clip(&mut bob_ev, Duration::from_millis(700)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floor_control_holds_across_relays() {
    use codec::ErrorCode;
    use codec::token::Right::Priority;
    use ptt_client::Event;
    let nats = Nats::start();
    let (one, two, _dir) = pair(&nats).await;
    let (alice, _) = one.member("alice", &[("ops", Talk)]).await;
    let (bob, _) = two.member("bob", &[("ops", Talk)]).await;
    let (chief, _) = two.member("chief", &[("ops", Priority)]).await;
    let (_carol, mut carol_ev) = two.member("carol", &[("ops", Listen)]).await;
    until("the channel's subject", || {
        cluster(&two).is_subscribed(&channel_subject("ops"))
    })
    .await;
    // Alice (relay one) talks; Bob (relay two) presses and is told who
    // holds the floor.
    let long = channel_clip("ops", 50);
    let talking = {
        let (alice, c) = (alice.clone(), long.clone());
        tokio::spawn(async move { alice.send_clip(&c, Pacing::Live).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, reason) = rejected(bob.send_clip(&channel_clip("ops", 3), Pacing::Upload).await);
    assert_eq!(code, ErrorCode::FloorBusy);
    assert!(reason.contains("alice"), "{reason}");
    talking.await.unwrap().unwrap();
    // Released at the end of her clip: Bob talks now.
    bob.send_clip(&channel_clip("ops", 3), Pacing::Upload)
        .await
        .unwrap();
    // The chief (priority, relay two) pre-empts Alice (relay one).
    let long = channel_clip("ops", 100);
    let talking = {
        let (alice, c) = (alice.clone(), long.clone());
        tokio::spawn(async move { alice.send_clip(&c, Pacing::Live).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let urgent = channel_clip("ops", 5);
    chief.send_clip(&urgent, Pacing::Upload).await.unwrap();
    assert_eq!(rejected(talking.await.unwrap()).0, ErrorCode::Preempted);
    let cut = next_matching(&mut carol_ev, |e| match e {
        Event::Cut { id, code } if id == long.id => Some(code),
        _ => None,
    })
    .await;
    assert_eq!(cut, ErrorCode::Preempted);
    let got = next_matching(&mut carol_ev, |e| match e {
        Event::Complete(c) if c.id() == urgent.id => Some(c),
        _ => None,
    })
    .await;
    assert_eq!(got.delivery.sender, "chief");
}

/// `client-sim load` over three relays of one cluster, every one-to-one
/// clip crossing relays, some users offline at first (their clips wait in
/// JetStream): every accepted clip arrives once, intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_across_three_relays_loses_and_repeats_nothing() {
    use client_sim::load::{self, LoadTarget, Mode, Source, Workload};
    let nats = Nats::start();
    let (one, two, _d2) = pair(&nats).await;
    let d3 = sharing_keys(data_dir(&one));
    let url = nats.url.clone();
    let three = start_in(d3.path(), |c| c.cluster = url).await;
    let target = LoadTarget {
        relays: vec![
            one.relay.quic_addr(),
            two.relay.quic_addr(),
            three.relay.quic_addr(),
        ],
        server_name: "localhost".into(),
        ca: one.relay.files().cert.clone(),
        key: codec::token::TokenKey::from_file(&one.relay.files().secret, Duration::ZERO).unwrap(),
        relay_pid: None,
    };
    let w = Workload {
        users: 60,
        duration: Duration::from_secs(6),
        talk_interval: Duration::from_millis(800),
        clip_min: Duration::from_millis(200),
        clip_max: Duration::from_millis(600),
        mode: Mode::Live,
        cross_relay: true,
        offline_share: 0.2,
        grace: Duration::from_secs(10),
        ..Workload::default()
    };
    let r = load::run(target, w, Source::builtin().unwrap())
        .await
        .unwrap();
    eprintln!("{}", r.table());
    assert!(!r.failed(), "lost/duplicated/corrupted:\n{}", r.table());
    assert!(r.clips_accepted > 50, "{}", r.table());
    assert_eq!(
        r.counts.deliveries_ok, r.clips_accepted,
        "every accepted clip arrived once"
    );
}

/// The deployment's 3-node NATS configuration with stored clips on all
/// three (`cluster_replicas = 3`): a clip accepted while every node is up
/// is delivered by another relay after one NATS node died.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nats_nodes_keep_clips_through_the_loss_of_one() {
    let mut nats = NatsCluster::start();
    let urls = nats.urls.join(",");
    // The cluster may still be electing its JetStream leader: retry.
    let start_clustered = |dir: &std::path::Path| {
        let urls = urls.clone();
        let dir = dir.to_owned();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let mut cfg = relay::Config::for_tests(&dir);
                cfg.cluster = urls.clone();
                cfg.cluster_replicas = 3;
                match relay::Relay::start(cfg).await {
                    Ok(r) => return r,
                    Err(e) => {
                        assert!(Instant::now() < deadline, "relay did not start: {e:#}");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
        }
    };
    let dir_one = tempfile::tempdir().unwrap();
    let one = start_clustered(dir_one.path()).await;
    let dir_two = sharing_keys(dir_one.path());
    let two = start_clustered(dir_two.path()).await;
    let (one, two) = (wrap(one), wrap(two));
    let (alice, _) = one.connect("alice").await;
    let c = clip("bob", 4);
    alice.send_clip(&c, Pacing::Upload).await.unwrap();
    // One NATS node goes; the stream has the clip on the other two.
    nats.kill(0);
    let (bob, mut bob_ev) = two.connect("bob").await;
    // (A bound, not a measure: electing new JetStream leaders after a
    // node's death takes seconds, more on a loaded machine.)
    let got = complete_within(&mut bob_ev, c.id, 60, "the clip after a NATS node died").await;
    assert_eq!(got.packets, c.packets);
    bob.ack(got.id()).await.unwrap();
}

/// Cut off from NATS, a relay goes on serving its own users, says it is
/// not ready for cross-relay work (`/readyz/cluster`, and
/// `ptt_cluster_connected`), and links up again when NATS is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_from_nats_a_relay_serves_its_own_users_and_says_so() {
    let mut nats = Nats::start();
    let url = nats.url.clone();
    let t = start(|c| c.cluster = url).await;
    let admin = t.relay.admin_addr();
    assert_eq!(http_get(admin, "/readyz/cluster").await.0, 200);
    nats.stop();
    until_answer(admin, "/readyz/cluster", 503, 10, "still says linked").await;
    assert_eq!(
        http_get(admin, "/readyz").await.0,
        200,
        "local service goes on"
    );
    let m = http_get(admin, "/metrics").await.1;
    assert!(m.contains("ptt_cluster_connected 0"), "{m}");
    // Alice and Bob, both here, talk live as ever.
    let (_bob, mut bob_ev) = t.connect("bob").await;
    let (alice, _) = t.connect("alice").await;
    let c = clip("bob", 5);
    let sent = {
        let (alice, c) = (alice.clone(), c.clone());
        tokio::spawn(async move { alice.send_clip(&c, Pacing::Live).await })
    };
    let got = next_complete(&mut bob_ev).await;
    assert_eq!(got.packets, c.packets);
    assert!(got.delivery.live);
    // Accepted once the store has it, though JetStream cannot (logged).
    sent.await.unwrap().unwrap();
    // A clip for Carol, offline everywhere, accepted meanwhile; and one
    // to a channel whose other members are all offline.
    let for_carol = clip("carol", 3);
    alice.send_clip(&for_carol, Pacing::Upload).await.unwrap();
    let (dan, _) = t.member("dan", &[("ops", Talk)]).await;
    let mut for_ops = clip("x", 2);
    for_ops.target = Target::Channel("ops".into());
    dan.send_clip(&for_ops, Pacing::Upload).await.unwrap();
    nats.resume();
    until_answer(admin, "/readyz/cluster", 200, 20, "did not link up again").await;
    // Linked again, the relay kept it in JetStream: Carol gets it from
    // another relay.
    let dir = sharing_keys(data_dir(&t));
    let url = nats.url.clone();
    let other = start_in(dir.path(), |c| c.cluster = url).await;
    let (_carol, mut carol_ev) = other.connect("carol").await;
    let got = complete_within(
        &mut carol_ev,
        for_carol.id,
        20,
        "the clip accepted while cut off, through JetStream",
    )
    .await;
    assert_eq!(got.packets, for_carol.packets);
    let (_erin, mut erin_ev) = other.member("erin", &[("ops", Listen)]).await;
    let got = complete_within(
        &mut erin_ev,
        for_ops.id,
        20,
        "the channel clip said while cut off, through the cluster history",
    )
    .await;
    assert_eq!(got.packets, for_ops.packets);
    // And a relay that is not clustered has no such endpoint.
    let solo = start(|_| {}).await;
    assert_eq!(
        http_get(solo.relay.admin_addr(), "/readyz/cluster").await.0,
        404
    );
}

/// A channel clip said on a relay that then dies reaches the members who
/// were offline everywhere, from another relay, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_history_outlives_the_relay_it_was_said_on() {
    let nats = Nats::start();
    let mut d = doomed(&nats, |t| t.token_with("alice", &[("ops", Talk)])).await;
    let mut c = clip("x", 4);
    c.target = Target::Channel("ops".into());
    d.alice.send_clip(&c, Pacing::Upload).await.unwrap();
    d.one.kill().await.unwrap();
    // Carol was offline everywhere; she connects to relay two.
    let (carol, mut carol_ev) = d.two.member("carol", &[("ops", Listen)]).await;
    let got = complete_within(&mut carol_ev, c.id, 20, "the channel clip from history").await;
    assert_eq!(got.packets, c.packets);
    assert_eq!(got.delivery.target, Target::Channel("ops".into()));
    carol.ack(got.id()).await.unwrap();
    until("the ack", || d.two.pending() == 0).await;
    // Once: not again on reconnect; and never to its sender.
    drop(carol);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_carol, mut carol_ev) = d.two.member("carol", &[("ops", Listen)]).await;
    assert_no_clip(&mut carol_ev, Duration::from_millis(700)).await;
    let (_alice, mut alice_ev) = d.two.member("alice", &[("ops", Talk)]).await;
    assert_no_clip(&mut alice_ev, Duration::from_millis(500)).await;
}

/// Sequences JetStream's stream of stored clips has handed out: how many
/// clips were ever written to it.
async fn clips_written(nats: &Nats) -> u64 {
    let c = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(c);
    let mut s = js.get_stream("PTT_CLIPS").await.unwrap();
    s.info().await.unwrap().state.last_sequence
}

/// A one-to-one clip whose recipient hears it live on the same relay and
/// acks it is never written to JetStream (`cluster_keep_wait`); with a
/// wait of 0 it is, as is one for a recipient on no relay, and the sender
/// hears `Accepted` either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clip_its_live_recipient_acks_first_costs_jetstream_nothing() {
    let nats = Nats::start();
    let (one, _two, _dir) = pair(&nats).await;
    let (bob, mut bob_ev) = one.connect("bob").await;
    let (alice, _) = one.connect("alice").await;
    for n in [5, 7] {
        let c = clip("bob", n);
        // Bob acks as his app has the clip, while Alice waits for her
        // `Accepted`.
        let sending = {
            let (alice, c) = (alice.clone(), c.clone());
            tokio::spawn(async move { alice.send_clip(&c, Pacing::Live).await })
        };
        let got = next_complete(&mut bob_ev).await;
        assert_eq!(got.id(), c.id);
        bob.ack(got.id()).await.unwrap();
        assert!(!sending.await.unwrap().unwrap().duplicate);
    }
    assert_eq!(clips_written(&nats).await, 0, "heard and acked: no copy");
    // Carol is on no relay: her clip is written before `Accepted`.
    alice
        .send_clip(&clip("carol", 3), Pacing::Upload)
        .await
        .unwrap();
    assert_eq!(clips_written(&nats).await, 1);

    // With no wait, every clip is written (and deleted at the ack).
    let url = nats.url.clone();
    let eager = start(|c| {
        c.cluster = url;
        c.cluster_keep_wait = Duration::ZERO;
    })
    .await;
    let (dave, mut dave_ev) = eager.connect("dave").await;
    let (erin, _) = eager.connect("erin").await;
    let c = clip("dave", 5);
    let sending = tokio::spawn(async move { erin.send_clip(&c, Pacing::Live).await });
    let got = next_complete(&mut dave_ev).await;
    dave.ack(got.id()).await.unwrap();
    sending.await.unwrap().unwrap();
    assert_eq!(clips_written(&nats).await, 2);
}
