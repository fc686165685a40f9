//! The two-region NATS layout of `deploy/regions/` (docs/cluster.md,
//! "Regions: which NATS topology"), started from the deployment's own
//! files on loopback: three real nats-server nodes per region, each region
//! its own JetStream domain, joined by leaf nodes. What the relays will
//! stand on: live messages cross, a publish from one region lands durably
//! in the other's domain, and a region whose every node is killed -9
//! leaves the other's JetStream whole (new consumers and streams too,
//! which a single JetStream across both regions cannot give).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use common::nats::{NatsCluster, free_ports, sharing_keys};
use common::*;
use futures_util::StreamExt;
use relay::testing::user_subject;

fn region(name: &'static str, i: usize) -> Vec<(String, String)> {
    vec![
        ("NATS_NAME".into(), format!("{name}-{}", i + 1)),
        ("NATS_REGION".into(), name.into()),
    ]
}

/// Retries `f` (JetStream elects its leaders for a few seconds after a
/// start or a death; a bound, not a measure).
async fn eventually<T, E: std::fmt::Debug, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    f: impl Fn() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "{what}: {e:?}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Regions `a` and `b` from `deploy/regions/`: three nodes each, `b`'s
/// joined to `a`'s as leaf nodes.
fn two_regions() -> (NatsCluster, NatsCluster) {
    let leaf = free_ports(3);
    let a = NatsCluster::start_from("deploy/regions/nats-first.conf", |i| {
        let mut v = region("a", i);
        v.push(("NATS_LEAF_PORT".into(), leaf[i].to_string()));
        v
    });
    let b = NatsCluster::start_from("deploy/regions/nats-other.conf", |i| {
        let mut v = region("b", i);
        for (j, p) in leaf.iter().enumerate() {
            v.push((
                format!("NATS_LEAF_{}", j + 1),
                format!("nats-leaf://127.0.0.1:{p}"),
            ));
        }
        v
    });
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_outlives_the_other_regions_death() {
    let (mut a, b) = two_regions();
    let on_a = async_nats::connect(&a.urls[0]).await.unwrap();
    let on_b = async_nats::connect(&b.urls[0]).await.unwrap();
    // b's own stream, three copies in b.
    let js_b = jetstream::new(on_b.clone());
    eventually("b's stream", || {
        js_b.get_or_create_stream(stream::Config {
            name: "CLIPS_B".into(),
            subjects: vec!["clips.b.>".into()],
            num_replicas: 3,
            ..Default::default()
        })
    })
    .await;
    // Live messages cross the leaf connection (once it carries b's
    // interest).
    let mut live = on_b.subscribe("live.bob").await.unwrap();
    on_b.flush().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        on_a.publish("live.bob", "hi".into()).await.unwrap();
        on_a.flush().await.unwrap();
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), live.next()).await {
            assert_eq!(m.payload.as_ref(), b"hi");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "live messages do not cross"
        );
    }
    // From a, a durable copy into b's domain: acked by b's stream.
    let js_a_to_b = jetstream::with_domain(on_a.clone(), "b");
    let ack = eventually("a's publish into b's domain", || async {
        js_a_to_b
            .publish("clips.b.bob", "from a".into())
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    assert_eq!(ack.stream, "CLIPS_B");

    // Region a dies: every node killed -9.
    for i in 0..3 {
        a.kill(i);
    }
    // b's JetStream is whole: it takes a publish, a new consumer reads
    // what a wrote and what came after, and a new stream can be made.
    js_b.publish("clips.b.bob", "after".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let s = js_b.get_stream("CLIPS_B").await.unwrap();
    let c = eventually("a new consumer in b", || {
        s.create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
    })
    .await;
    let mut msgs = c.fetch().max_messages(2).messages().await.unwrap();
    let mut got = Vec::new();
    while let Some(m) = msgs.next().await {
        got.push(m.unwrap().payload.clone());
    }
    assert_eq!(got, vec!["from a", "after"]);
    eventually("a new stream in b", || {
        js_b.create_stream(stream::Config {
            name: "AFTER".into(),
            subjects: vec!["after.>".into()],
            num_replicas: 3,
            ..Default::default()
        })
    })
    .await;
}

/// Waits until a relay of the other region answers for `user` (a
/// `Present` request crossing the leaf connection): its subscription for
/// the user's session has reached this region.
async fn until_heard_across(nats: &async_nats::Client, user: &str) {
    let ask = codec::cluster::Relayed::Present.encode();
    eventually("the user's subject across regions", || async {
        tokio::time::timeout(
            Duration::from_millis(500),
            nats.request(user_subject(user), ask.clone()),
        )
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
    })
    .await;
}

/// A relay (in this process) of `region`, on `nats`, regions `a,b`, with
/// `tweak`'s settings.
async fn relay_in(
    dir: &std::path::Path,
    nats: &NatsCluster,
    region: &str,
    tweak: impl FnOnce(&mut relay::Config),
) -> TestRelay {
    let urls = nats.urls.join(",");
    start_in(dir, |c| {
        c.cluster = urls;
        c.region = region.into();
        c.regions = "a,b".into();
        tweak(c);
    })
    .await
}

/// A relay in each region, sharing keys: `a` the binary (to be killed
/// -9, and started again on its address), `b` in this process.
struct Relays {
    a: tokio::process::Child,
    addr_a: std::net::SocketAddr,
    listen_a: String,
    urls_a: String,
    dir_a: tempfile::TempDir,
    b: TestRelay,
    _dir_b: tempfile::TempDir,
}

/// Region `a`'s relay (the binary) on `listen`, data dir `dir`.
async fn spawn_a(
    dir: &std::path::Path,
    listen: &str,
    urls: &str,
) -> (tokio::process::Child, std::net::SocketAddr) {
    let flags = ["--cluster", urls, "--region", "a", "--regions", "a,b"];
    start_binary_at(dir, listen, &flags).await
}

impl Relays {
    async fn start(a: &NatsCluster, b: &NatsCluster) -> Relays {
        let dir_a = tempfile::tempdir().unwrap();
        let listen_a = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().to_string()
        };
        let urls_a = a.urls.join(",");
        let (child, addr_a) = spawn_a(dir_a.path(), &listen_a, &urls_a).await;
        let dir_b = sharing_keys(dir_a.path());
        let relay_b = relay_in(dir_b.path(), b, "b", |_| {}).await;
        Relays {
            a: child,
            addr_a,
            listen_a,
            urls_a,
            dir_a,
            b: relay_b,
            _dir_b: dir_b,
        }
    }

    /// Region `a`'s relay again, on its address and data dir.
    async fn start_a_again(&self) -> tokio::process::Child {
        spawn_a(self.dir_a.path(), &self.listen_a, &self.urls_a)
            .await
            .0
    }
}

/// Relays in two regions serve as one service: live talk and stored
/// clips cross regions, a channel with members in both has one floor, and
/// when every relay and NATS node of region `a` is killed -9, region `b`
/// delivers every clip `a` acknowledged, once, and live talk goes on there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_in_two_regions_serve_as_one_and_outlive_a_regions_death() {
    use codec::ErrorCode;
    use codec::token::Right::{Listen, Talk};
    use ptt_client::Pacing;

    let (mut a, b) = two_regions();
    let Relays {
        a: mut relay_a,
        addr_a,
        dir_a,
        b: relay_b,
        ..
    } = Relays::start(&a, &b).await;
    let ep = ptt_client::net::endpoint(addr_a, &dir_a.path().join("cert.pem")).unwrap();
    let on_a = |token: String| {
        let ep = ep.clone();
        async move {
            ptt_client::Client::connect(
                &ep,
                addr_a,
                "localhost",
                &token,
                ptt_client::ClientOptions::default(),
            )
            .await
            .unwrap()
        }
    };
    let nats_a = async_nats::connect(&a.urls[0]).await.unwrap();

    // Live across regions: Alice on a, Bob on b.
    let (bob, mut bob_ev) = relay_b.connect("bob").await;
    until_heard_across(&nats_a, "bob").await;
    let (alice, _) = on_a(relay_b.token_with("alice", &[("ops", Talk)])).await;
    let c = clip("bob", 25);
    alice.send_clip(&c, Pacing::Live).await.unwrap();
    let got = next_complete(&mut bob_ev).await;
    assert_eq!((got.id(), got.delivery.live), (c.id, true));
    assert_eq!(got.packets, c.packets);
    bob.ack(got.id()).await.unwrap();

    // A channel with members in both regions, one floor: Alice (a) talks,
    // Bob (b) is told she holds it; Dave (a) and Erin (b) hear her live.
    let (_dave, mut dave_ev) = on_a(relay_b.token_with("dave", &[("ops", Listen)])).await;
    let (_erin, mut erin_ev) = relay_b.member("erin", &[("ops", Listen)]).await;
    let (bob_ops, _) = relay_b.member("bob", &[("ops", Talk)]).await;
    drop(bob);
    until_heard_across(&nats_a, "erin").await;
    let long = channel_clip("ops", 50);
    let talking = {
        let (alice, c) = (alice.clone(), long.clone());
        tokio::spawn(async move { alice.send_clip(&c, Pacing::Live).await })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (code, reason) = rejected(
        bob_ops
            .send_clip(&channel_clip("ops", 3), Pacing::Upload)
            .await,
    );
    assert_eq!(code, ErrorCode::FloorBusy);
    assert!(reason.contains("alice"), "{reason}");
    talking.await.unwrap().unwrap();
    for ev in [&mut dave_ev, &mut erin_ev] {
        let got = next_complete(ev).await;
        assert_eq!((got.id(), got.delivery.live), (long.id, true));
    }
    // Released at the end of her clip, in the channel's home region:
    // Bob talks now.
    bob_ops
        .send_clip(&channel_clip("ops", 3), Pacing::Upload)
        .await
        .unwrap();

    // Carol is offline everywhere: Alice leaves her three clips on a.
    let (alice_c, _) = on_a(relay_b.token("alice")).await;
    let left: Vec<_> = (0..3).map(|i| clip("carol", 3 + i)).collect();
    for c in &left {
        assert!(
            !alice_c
                .send_clip(c, Pacing::Upload)
                .await
                .unwrap()
                .duplicate
        );
    }

    // Region a dies: its relay and every NATS node, killed -9.
    relay_a.kill().await.unwrap();
    for i in 0..3 {
        a.kill(i);
    }
    drop((alice, alice_c));
    // Carol connects in b: every clip a acknowledged, in order, once.
    let (carol, mut carol_ev) = relay_b.connect("carol").await;
    let (mut order, mut got) = (Vec::new(), Vec::new());
    while got.len() < left.len() {
        let ev = next_matching(&mut carol_ev, |e| match e {
            ptt_client::Event::Started { delivery, seq, .. } => Some(Err((seq, delivery.clip_id))),
            ptt_client::Event::Complete(c) => Some(Ok(c)),
            _ => None,
        })
        .await;
        match ev {
            Err(started) => order.push(started),
            Ok(c) => {
                carol.ack(c.id()).await.unwrap();
                assert!(!got.contains(&c.id()), "a clip came twice");
                got.push(c.id());
            }
        }
    }
    order.sort();
    let order: Vec<_> = order.into_iter().map(|(_, id)| id).collect();
    assert_eq!(
        order,
        left.iter().map(|c| c.id).collect::<Vec<_>>(),
        "in order"
    );
    assert_no_clip(&mut carol_ev, Duration::from_millis(700)).await;
    // Live talk goes on in b: Alice, moved to b, talks to Carol.
    let (alice, _) = relay_b.connect("alice").await;
    let c = clip("carol", 10);
    alice.send_clip(&c, Pacing::Live).await.unwrap();
    let got = next_complete(&mut carol_ev).await;
    assert_eq!((got.id(), got.delivery.live), (c.id, true));
}

/// What Bob's app heard through the SDK.
#[derive(Default)]
struct Heard {
    clips: std::sync::Mutex<Vec<codec::wire::ClipId>>,
    connected: std::sync::atomic::AtomicUsize,
}

struct App(std::sync::Arc<Heard>);

impl ptt_client::sdk::Listener for App {
    fn clip(&self, c: ptt_client::sdk::IncomingClip) -> bool {
        self.0.clips.lock().unwrap().push(c.id);
        true
    }

    fn sent(&self, _: codec::wire::ClipId, _: ptt_client::sdk::Sent) {}

    fn status(&self, s: ptt_client::sdk::Status) {
        if matches!(s, ptt_client::sdk::Status::Connected { .. }) {
            self.0
                .connected
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Waits (a bound, not a measure) until `f` holds.
async fn within(what: &str, secs: u64, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Region `a` dies (its relay and every NATS node killed -9) under a
/// connected app: the SDK moves to region `b`'s relay, hears every clip
/// once, and live talk goes on there; when `a` is back the SDK goes home.
/// When `a` dies again, the app holds a ticket of `b`'s relay from its
/// stay there and moves to it in 0-RTT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_regions_apps_move_to_the_other_and_come_back_home() {
    use ptt_client::Pacing;
    use ptt_client::sdk::{Config, Sdk};
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    let (mut a, b) = two_regions();
    let mut relays = Relays::start(&a, &b).await;
    let (relay_b, addr_a, dir_a) = (&relays.b, relays.addr_a, relays.dir_a.path().to_owned());
    let on_b = |user: &str| relay_b.relay.shared().router.session(user).is_some();

    // Bob's app: home is a's relay, then b's.
    let app_dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(
        "",
        dir_a.join("cert.pem"),
        app_dir.path().to_owned(),
        &relay_b.token("bob"),
    );
    cfg.relays = vec![addr_a.to_string(), relay_b.relay.quic_addr().to_string()];
    let failover_after = Duration::from_secs(2);
    cfg.failover_after = failover_after;
    // An idle app notices a silent relay at its next keep-alive.
    cfg.transport.keep_alive = Duration::from_secs(1);
    cfg.reconnect_min = Duration::from_millis(200);
    cfg.reconnect_max = Duration::from_secs(1);
    let heard = Arc::new(Heard::default());
    let sdk = Sdk::start(cfg, Arc::new(App(heard.clone()))).unwrap();
    within("bob connected at home", 20, || {
        heard.connected.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(!on_b("bob"), "home first");

    // Alice (a) talks to Bob (a): heard.
    let ep = ptt_client::net::endpoint(addr_a, &dir_a.join("cert.pem")).unwrap();
    let (alice, _) = ptt_client::Client::connect(
        &ep,
        addr_a,
        "localhost",
        &relay_b.token("alice"),
        ptt_client::ClientOptions::default(),
    )
    .await
    .unwrap();
    let before: Vec<_> = (0..3).map(|i| clip("bob", 3 + i)).collect();
    for c in &before {
        alice.send_clip(c, Pacing::Upload).await.unwrap();
    }
    within("bob heard a's clips", 20, || {
        heard.clips.lock().unwrap().len() == before.len()
    })
    .await;

    // Region a dies.
    relays.a.kill().await.unwrap();
    for i in 0..3 {
        a.kill(i);
    }
    let died = tokio::time::Instant::now();
    drop(alice);
    within("bob moved to b", 30, || on_b("bob")).await;
    let moved = died.elapsed();
    eprintln!(
        "moved to the other region {moved:?} after its death (failover_after {failover_after:?}, keep-alive 1 s)"
    );
    // The failover rule's promise (issue "Regions"): an app that had just
    // heard clips gives a dead relay up from its loss probes, an idle one
    // at its next keep-alive, both within failover_after plus a second.
    assert!(
        moved <= failover_after + Duration::from_secs(1),
        "moved after {moved:?}"
    );

    // Live talk goes on in b: Alice, moved there too, talks to Bob.
    let (alice, _) = relay_b.connect("alice").await;
    let after = clip("bob", 8);
    alice.send_clip(&after, Pacing::Live).await.unwrap();
    within("bob heard b's clip", 20, || {
        heard.clips.lock().unwrap().contains(&after.id)
    })
    .await;

    // Region a comes back: Bob's app goes home.
    a.restart_killed();
    let mut relay_a = relays.start_a_again().await;
    within("bob back home", 30, || !on_b("bob")).await;
    within("bob connected at home again", 30, || {
        heard.connected.load(Ordering::SeqCst) >= 3
    })
    .await;

    // Every clip once to the app, in the order said.
    let mut want: Vec<_> = before.iter().map(|c| c.id).collect();
    want.push(after.id);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(*heard.clips.lock().unwrap(), want);

    // Region a dies again: back to b, in 0-RTT.
    let early = metric(relay_b, "ptt_zero_rtt_auths_total").await;
    relay_a.kill().await.unwrap();
    for i in 0..3 {
        a.kill(i);
    }
    within("bob moved to b again", 30, || on_b("bob")).await;
    assert_eq!(
        metric(relay_b, "ptt_zero_rtt_auths_total").await,
        early + 1.0,
        "the second move was a full handshake"
    );
    sdk.stop().await;
}

/// Region `b` is down while region `a` accepts a direct clip and a channel
/// clip, and while Dave registers his phone for pushes there: `a` holds
/// the clips (counted) and copies them and Dave's registration into `b`
/// once `b` is back, so when `a` then dies, `b` delivers both clips (the
/// direct one from its store, the channel one from its history), once, and
/// wakes Dave's sleeping phone for a clip sent to him there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clips_accepted_while_the_other_region_is_down_reach_it_when_it_is_back() {
    use codec::token::Right::{Listen, Talk};
    use codec::wire::{PushProvider, PushRegister};
    use common::push::{Standin, TOPIC, apns_key, apns_settings};
    use ptt_client::Pacing;

    let (mut a, mut b) = two_regions();
    // Both regions' relays push through one APNs stand-in.
    let keys = tempfile::tempdir().unwrap();
    let (rules, p8) = apns_key(keys.path());
    let apns = Standin::start(rules).await;
    let dir_a = tempfile::tempdir().unwrap();
    let relay_a = relay_in(dir_a.path(), &a, "a", |c| apns_settings(c, &apns, &p8)).await;
    let cluster_a = relay_a.relay.cluster().unwrap().clone();
    // b's streams exist (made by a's relay at its link), then b goes down.
    let on_b = async_nats::connect(&b.urls[0]).await.unwrap();
    let js_b = jetstream::new(on_b);
    eventually("b's streams", || js_b.get_stream("PTT_HISTORY")).await;
    for i in 0..3 {
        b.kill(i);
    }
    let (alice, _) = relay_a.member("alice", &[("ops", Talk)]).await;
    let direct = clip("carol", 4);
    let spoken = channel_clip("ops", 6);
    for c in [&direct, &spoken] {
        assert!(!alice.send_clip(c, Pacing::Upload).await.unwrap().duplicate);
    }
    assert_eq!(cluster_a.held(), 2, "accepted, held: b cannot take a copy");
    let (dave, _) = relay_a.connect("dave").await;
    let r = dave
        .register_push(PushRegister {
            provider: PushProvider::Apns,
            device_id: "phone".into(),
            token: "tok-dave".into(),
            topic: TOPIC.into(),
        })
        .await
        .unwrap();
    assert_eq!(r.code, codec::ErrorCode::NoError, "{}", r.reason);
    dave.close();

    // b is back: a copies what it holds.
    b.restart_killed();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while cluster_a.held() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "still held");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Region a dies; Carol connects in b.
    drop(alice);
    for i in 0..3 {
        a.kill(i);
    }
    let dir_b = sharing_keys(dir_a.path());
    let relay_b = relay_in(dir_b.path(), &b, "b", |c| apns_settings(c, &apns, &p8)).await;
    let (carol, mut carol_ev) = relay_b.member("carol", &[("ops", Listen)]).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let c = next_complete(&mut carol_ev).await;
        carol.ack(c.id()).await.unwrap();
        assert!(!got.contains(&c.id()), "a clip came twice");
        got.push(c.id());
    }
    got.sort();
    let mut want = vec![direct.id, spoken.id];
    want.sort();
    assert_eq!(got, want);
    assert_no_clip(&mut carol_ev, Duration::from_millis(700)).await;

    // Dave's phone sleeps; his registration reached b: a clip for him
    // there wakes it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !http_get(relay_b.relay.admin_addr(), "/metrics")
        .await
        .1
        .contains("ptt_push_users 1")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b never had dave's registration"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (erin, _) = relay_b.connect("erin").await;
    let wake = clip("dave", 4);
    erin.send_clip(&wake, Pacing::Upload).await.unwrap();
    let seen = apns.until(1, 10).await;
    assert!(seen[0].broken.is_empty(), "{:?}", seen[0].broken);
    assert_eq!(seen[0].token, "tok-dave");
    assert_eq!(seen[0].body["ptt"]["clip_id"], wake.id.to_hex());
    drop(relay_a);
}
