//! A cluster's NATS goes away and comes back (real `nats-server`, relays on
//! loopback): nothing a relay acknowledged is lost, and nothing is held
//! back past NATS's return (docs/cluster.md, "When NATS goes away").
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use client_sim::load::{self, LoadTarget, Mode, Report, Source, Workload};
use codec::token::Right::{Listen, Talk};
use codec::wire::Target;
use common::nats::*;
use common::*;
use ptt_client::Pacing;

/// When NATS dies in the load runs, and for how long.
const OUTAGE_AT: Duration = Duration::from_secs(5);
const OUTAGE: Duration = Duration::from_secs(15);

/// `w` over two relays of one cluster while NATS is killed (SIGKILL) at
/// `OUTAGE_AT` and started again on the same store `OUTAGE` later. Returns
/// the report and when NATS was back, from the run's start.
async fn through_an_outage(w: Workload) -> (Report, Duration) {
    let mut nats = Nats::start();
    let (one, two, _dir) = pair(&nats).await;
    let target = LoadTarget {
        relays: vec![one.relay.quic_addr(), two.relay.quic_addr()],
        server_name: "localhost".into(),
        ca: one.relay.files().cert.clone(),
        key: codec::token::TokenKey::from_file(&one.relay.files().secret, Duration::ZERO).unwrap(),
        relay_pid: None,
    };
    let t0 = Instant::now();
    let outage = async {
        tokio::time::sleep(OUTAGE_AT).await;
        nats.stop();
        tokio::time::sleep(OUTAGE).await;
        let nats = tokio::task::spawn_blocking(move || {
            nats.resume();
            nats
        })
        .await
        .unwrap();
        (nats, t0.elapsed())
    };
    let (r, (_nats, back)) = tokio::join!(load::run(target, w, Source::builtin().unwrap()), outage);
    let r = r.unwrap();
    eprintln!("{}", r.table());
    let held = r.held_back_until(Duration::from_secs(2));
    eprintln!(
        "NATS back at {:.1} s; clips held back by the outage delivered by {held:?} s",
        back.as_secs_f64()
    );
    assert!(!r.failed(), "lost/duplicated/corrupted:\n{}", r.table());
    assert_eq!(
        r.counts.deliveries_ok,
        r.counts.accepted,
        "every accepted clip arrived once, before the grace ended\n{}",
        r.table()
    );
    assert_eq!(r.send_failed, 0, "{}", r.table());
    // The outage did hold clips back (a run that never crossed relays
    // while NATS was away would test nothing).
    assert!(held.is_some(), "nothing was held back\n{}", r.table());
    (r, back)
}

fn workload(channel_size: usize) -> Workload {
    Workload {
        users: 100,
        duration: Duration::from_secs(30),
        talk_interval: Duration::from_secs(3),
        clip_min: Duration::from_secs(1),
        clip_max: Duration::from_secs(3),
        channel_size,
        cross_relay: channel_size == 0,
        mode: Mode::Live,
        grace: Duration::from_secs(30),
        ..Workload::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_loses_no_channel_clip() {
    let (r, _) = through_an_outage(workload(10)).await;
    assert!(r.clips_accepted > 100, "{}", r.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_loses_no_direct_clip() {
    let (r, _) = through_an_outage(workload(0)).await;
    assert!(r.clips_accepted > 300, "{}", r.table());
}

/// Relay one accepts a direct clip and a channel clip while NATS is away,
/// for Bob and Carol on relay two, and is killed (SIGKILL) before NATS
/// comes back. Started again on its data dir once NATS is back, it writes
/// them to the cluster and Bob and Carol, connected to relay two the whole
/// time, get each once without reconnecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_during_an_outage_delivers_its_clips_after_it() {
    let mut nats = Nats::start();
    let dir_one = tempfile::tempdir().unwrap();
    let url = nats.url.clone();
    let cluster = ["--cluster", url.as_str()];
    let (mut one, addr) = start_binary(dir_one.path(), &cluster).await;
    let dir_two = sharing_keys(dir_one.path());
    let two = start_in(dir_two.path(), |c| c.cluster = url.clone()).await;
    let (_bob, mut bob_ev) = two.connect("bob").await;
    let (_carol, mut carol_ev) = two.member("carol", &[("ops", Listen)]).await;
    nats.stop();
    until_answer(
        two.relay.admin_addr(),
        "/readyz/cluster",
        503,
        10,
        "relay two noticed",
    )
    .await;
    let ep = ptt_client::net::endpoint(addr, &dir_one.path().join("cert.pem")).unwrap();
    let token = two.token_with("alice", &[("ops", Talk)]);
    let (alice, _) =
        ptt_client::Client::connect(&ep, addr, "localhost", &token, Default::default())
            .await
            .unwrap();
    let to_bob = clip("bob", 4);
    let mut to_ops = clip("x", 3);
    to_ops.target = Target::Channel("ops".into());
    alice.send_clip(&to_bob, Pacing::Upload).await.unwrap();
    alice.send_clip(&to_ops, Pacing::Upload).await.unwrap();
    drop(alice);
    one.kill().await.unwrap();
    nats.resume();
    let (_one, _) = start_binary_at(dir_one.path(), &addr.to_string(), &cluster).await;
    let got = complete_within(&mut bob_ev, to_bob.id, 20, "the direct clip").await;
    assert_eq!(got.packets, to_bob.packets);
    let got = complete_within(&mut carol_ev, to_ops.id, 20, "the channel clip").await;
    assert_eq!(got.packets, to_ops.packets);
    // Once each.
    assert_no_clip(&mut bob_ev, Duration::from_millis(700)).await;
    assert_no_clip(&mut carol_ev, Duration::from_millis(300)).await;
}

/// Relay two alone loses NATS while relay one keeps it: what relay one
/// accepts meanwhile for Bob and for Carol's channel (on relay two) is
/// announced to no one there. Linked again, relay two reads what it missed
/// and delivers it, once, without a reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cut_off_alone_catches_up_on_what_it_missed() {
    let nats = Nats::start();
    let one = start(|c| c.cluster = nats.url.clone()).await;
    let link = Cuttable::to(&nats).await;
    let dir = sharing_keys(data_dir(&one));
    let url = link.url.clone();
    let two = start_in(dir.path(), |c| c.cluster = url).await;
    let (_bob, mut bob_ev) = two.connect("bob").await;
    let (_carol, mut carol_ev) = two.member("carol", &[("ops", Listen)]).await;
    let (alice, _) = one.member("alice", &[("ops", Talk)]).await;
    // Linked and settled: a clip each crosses first (and the sessions'
    // first reads of the cluster are long done when the link goes).
    let (hello_bob, mut hello_ops) = (clip("bob", 2), clip("x", 2));
    hello_ops.target = Target::Channel("ops".into());
    alice.send_clip(&hello_bob, Pacing::Upload).await.unwrap();
    alice.send_clip(&hello_ops, Pacing::Upload).await.unwrap();
    complete_within(&mut bob_ev, hello_bob.id, 10, "before").await;
    complete_within(&mut carol_ev, hello_ops.id, 10, "before").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    link.cut();
    until_answer(
        two.relay.admin_addr(),
        "/readyz/cluster",
        503,
        10,
        "cut off",
    )
    .await;
    let to_bob = clip("bob", 4);
    let mut to_ops = clip("x", 3);
    to_ops.target = Target::Channel("ops".into());
    alice.send_clip(&to_bob, Pacing::Upload).await.unwrap();
    alice.send_clip(&to_ops, Pacing::Upload).await.unwrap();
    link.restore();
    let got = complete_within(&mut bob_ev, to_bob.id, 20, "the direct clip").await;
    assert_eq!(got.packets, to_bob.packets);
    let got = complete_within(&mut carol_ev, to_ops.id, 20, "the channel clip").await;
    assert_eq!(got.packets, to_ops.packets);
    let m = http_get(two.relay.admin_addr(), "/metrics").await.1;
    for kind in ["direct", "channel"] {
        assert!(
            m.contains(&format!("ptt_cluster_caught_up_total{{kind=\"{kind}\"}} 1")),
            "{m}"
        );
    }
    assert_no_clip(&mut bob_ev, Duration::from_millis(500)).await;
    assert_no_clip(&mut carol_ev, Duration::from_millis(300)).await;
}

/// Cut off, each relay grants a channel's floor among its own members:
/// two talkers on two relays both talk, both clips are accepted, and each
/// reaches the other relay's members once NATS is back (docs/cluster.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_each_relay_grants_floors_alone_and_no_clip_is_lost() {
    let mut nats = Nats::start();
    let (one, two, _dir) = pair(&nats).await;
    let (_erin, mut erin_ev) = one.member("erin", &[("ops", Listen)]).await;
    let (_finn, mut finn_ev) = two.member("finn", &[("ops", Listen)]).await;
    let (alice, _) = one.member("alice", &[("ops", Talk)]).await;
    let (bob, _) = two.member("bob", &[("ops", Talk)]).await;
    nats.stop();
    for t in [&one, &two] {
        until_answer(t.relay.admin_addr(), "/readyz/cluster", 503, 10, "noticed").await;
    }
    let mut from_alice = clip("x", 50);
    from_alice.target = Target::Channel("ops".into());
    let mut from_bob = clip("x", 50);
    from_bob.target = Target::Channel("ops".into());
    // At once: each holds its relay's floor while the other talks.
    let (a, b) = tokio::join!(
        alice.send_clip(&from_alice, Pacing::Live),
        bob.send_clip(&from_bob, Pacing::Live)
    );
    a.expect("alice's clip accepted");
    b.expect("bob's clip accepted");
    // Each relay's own listener heard its own talker.
    complete_within(&mut erin_ev, from_alice.id, 5, "erin hears alice").await;
    complete_within(&mut finn_ev, from_bob.id, 5, "finn hears bob").await;
    nats.resume();
    complete_within(&mut erin_ev, from_bob.id, 20, "erin gets bob's after").await;
    complete_within(&mut finn_ev, from_alice.id, 20, "finn gets alice's after").await;
}

/// A NATS that stops answering without closing the connection (stopped
/// with SIGSTOP) is noticed within three pings; the relay says so on
/// `/readyz` (still ready: it serves its own users) and `/readyz/cluster`,
/// and links up again by itself when NATS answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_nats_is_noticed_within_three_pings_and_the_link_comes_back() {
    let nats = Nats::start();
    let url = nats.url.clone();
    let t = start(|c| {
        c.cluster = url;
        c.cluster_ping_interval = Duration::from_millis(300);
    })
    .await;
    let admin = t.relay.admin_addr();
    let (status, body) = http_get(admin, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready; cluster linked\n"));
    nats.signal("STOP");
    // Three pings of 300 ms, and slack for a loaded machine.
    until_answer(admin, "/readyz/cluster", 503, 10, "a silent NATS noticed").await;
    let (status, body) = http_get(admin, "/readyz").await;
    assert_eq!(status, 200, "a relay cut off still serves its own users");
    assert!(body.contains("cluster unreachable"), "{body}");
    let m = http_get(admin, "/metrics").await.1;
    assert!(m.contains("ptt_cluster_link_lost_total 1"), "{m}");
    nats.signal("CONT");
    until_answer(admin, "/readyz/cluster", 200, 20, "linked again").await;
}
