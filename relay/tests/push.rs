//! Pushes that wake sleeping phones, against local stand-ins for APNs and
//! FCM (`common/push.rs`, written from the providers' rules): a clip for
//! a user with no connected session pushes each of the user's devices as
//! it starts; every provider answer is handled as the provider asks; and
//! the clip is delivered once whatever the answer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use codec::ErrorCode;
use codec::token::Right::{Listen, Talk};
use codec::wire::{PushProvider, PushRegister, Target};
use common::push::{KEY_ID, Reply, Rules, Seen, Standin, TEAM, TOPIC, apns_key, apns_settings};
use common::*;
use ptt_client::Pacing;

const PROJECT: &str = "ptt-test";
const EMAIL: &str = "relay@ptt-test.iam.gserviceaccount.com";

/// A relay that pushes through a stand-in for `provider`.
struct Pushing {
    t: TestRelay,
    standin: Standin,
    provider: PushProvider,
    _keys: tempfile::TempDir,
}

async fn pushing(provider: PushProvider) -> Pushing {
    pushing_with(provider, |_| {}).await
}

async fn pushing_with(provider: PushProvider, tweak: impl FnOnce(&mut relay::Config)) -> Pushing {
    let keys = tempfile::tempdir().unwrap();
    let (rules, files) = match provider {
        PushProvider::Apns => apns_key(keys.path()),
        PushProvider::Fcm => {
            let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
            let rules = Rules::Fcm {
                public_key_pem: std::fs::read_to_string(data.join("fcm-test-key.pub.pem")).unwrap(),
                client_email: EMAIL.into(),
                project: PROJECT.into(),
            };
            (rules, data.join("fcm-test-key.pem"))
        }
    };
    let standin = Standin::start(rules).await;
    let url = standin.url.clone();
    let sa = keys.path().join("service-account.json");
    if provider == PushProvider::Fcm {
        let json = serde_json::json!({
            "type": "service_account",
            "project_id": PROJECT,
            "private_key_id": "k1",
            "private_key": std::fs::read_to_string(&files).unwrap(),
            "client_email": EMAIL,
            "token_uri": format!("{url}/token"),
        });
        std::fs::write(&sa, json.to_string()).unwrap();
    }
    let t = start(|c| {
        match provider {
            PushProvider::Apns => apns_settings(c, &standin, &files),
            PushProvider::Fcm => {
                c.push_ca = standin.ca.clone();
                c.fcm_credentials = sa;
                c.fcm_url = url;
            }
        }
        tweak(c);
    })
    .await;
    Pushing {
        t,
        standin,
        provider,
        _keys: keys,
    }
}

impl Pushing {
    /// `user`'s device `device` registers (its token: "tok-DEVICE"), with
    /// `channels`, then the user goes offline.
    async fn registered(&self, user: &str, device: &str, channels: &[(&str, codec::token::Right)]) {
        let (c, _) = self
            .t
            .try_connect_with(&self.t.token_with(user, channels), Default::default())
            .await
            .unwrap();
        let r = c
            .register_push(PushRegister {
                provider: self.provider,
                device_id: device.into(),
                token: format!("tok-{device}"),
                topic: if self.provider == PushProvider::Apns {
                    TOPIC.into()
                } else {
                    String::new()
                },
            })
            .await
            .unwrap();
        assert_eq!(r.code, ErrorCode::NoError, "{}", r.reason);
        c.close();
        let router = &self.t.relay.shared().router;
        let deadline = Instant::now() + Duration::from_secs(5);
        while router.is_online(user) {
            assert!(Instant::now() < deadline, "{user} still online");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn label(&self) -> &'static str {
        self.provider.name()
    }

    async fn metric(&self, outcome: &str) -> u64 {
        let m = http_get(self.t.relay.admin_addr(), "/metrics").await.1;
        let line = format!(
            "ptt_push_sent_total{{provider=\"{}\",outcome=\"{outcome}\"}} ",
            self.label()
        );
        m.lines()
            .find_map(|l| l.strip_prefix(&line))
            .map_or(0, |v| v.trim().parse().unwrap())
    }
}

fn good(seen: &[Seen]) {
    for s in seen {
        assert!(s.broken.is_empty(), "a request broke the rules: {s:?}");
    }
}

/// Bob (offline, one device) gets a push when Alice's clip starts, and
/// the clip when he connects: once, whatever the provider answered.
async fn one_answer(provider: PushProvider, answer: Reply) {
    let p = pushing(provider).await;
    p.registered("bob", "phone", &[]).await;
    p.standin.script(&[answer]);
    let (alice, _) = p.t.connect("alice").await;
    let sent = clip("bob", 30);
    alice.send_clip(&sent, Pacing::Upload).await.unwrap();
    let first = p.standin.until(1, 10).await;
    good(&first);
    assert_eq!(first[0].token, "tok-phone");
    match provider {
        PushProvider::Apns => {
            assert_eq!(first[0].header("apns-topic"), Some(TOPIC));
            assert_eq!(
                first[0].header("apns-collapse-id"),
                None,
                "direct clips do not collapse"
            );
            let body = &first[0].body;
            assert_eq!(body["activeRemoteParticipant"]["name"], "alice");
            assert_eq!(body["ptt"]["target"]["user"], "bob");
            assert_eq!(body["ptt"]["clip_id"], sent.id.to_hex());
        }
        PushProvider::Fcm => {
            let data = &first[0].body["message"]["data"];
            assert_eq!(data["sender"], "alice");
            assert_eq!(data["clip_id"], sent.id.to_hex());
        }
    }
    let started = Instant::now();
    let mut owed = 1;
    match answer {
        Reply::Ok => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(p.standin.seen().len(), 1, "once per device per clip");
            assert_eq!(p.metric("sent").await, 1);
        }
        Reply::Gone => {
            // The registration is dropped: the next clip pushes nobody.
            let until = Instant::now() + Duration::from_secs(5);
            while p.metric("unregistered").await == 0 {
                assert!(Instant::now() < until, "the gone token was not counted");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let m = http_get(p.t.relay.admin_addr(), "/metrics").await.1;
            assert!(m.contains("ptt_push_users 0"), "{m}");
            alice
                .send_clip(&clip("bob", 3), Pacing::Upload)
                .await
                .unwrap();
            owed += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(p.standin.seen().len(), 1, "pushed to a gone token");
        }
        Reply::TooMany(secs) => {
            let again = p.standin.until(2, 10).await;
            good(&again);
            assert!(
                started.elapsed() >= Duration::from_secs(secs) - Duration::from_millis(200),
                "retried before Retry-After"
            );
            assert_eq!(again[1].token, "tok-phone");
            assert_eq!(p.metric("retried").await, 1);
            assert_eq!(p.metric("sent").await, 1);
        }
        Reply::Internal => {
            let again = p.standin.until(2, 10).await;
            good(&again);
            assert_eq!(p.metric("retried").await, 1);
            assert_eq!(p.metric("sent").await, 1);
        }
    }
    // Whatever the provider said, Bob gets the clips (once each) when he
    // comes.
    let (bob, mut ev) = p.t.connect("bob").await;
    let mut got = std::collections::HashMap::new();
    for _ in 0..owed {
        let c = next_complete(&mut ev).await;
        bob.ack(c.id()).await.unwrap();
        assert!(got.insert(c.id(), c).is_none(), "a clip came twice");
    }
    assert_eq!(got[&sent.id].packets, sent.packets);
    assert_no_clip(&mut ev, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_accepted() {
    one_answer(PushProvider::Apns, Reply::Ok).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_unregistered_drops_the_registration() {
    one_answer(PushProvider::Apns, Reply::Gone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_too_many_requests_is_retried_after_retry_after() {
    one_answer(PushProvider::Apns, Reply::TooMany(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_internal_error_is_retried() {
    one_answer(PushProvider::Apns, Reply::Internal).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_accepted() {
    one_answer(PushProvider::Fcm, Reply::Ok).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_unregistered_drops_the_registration() {
    one_answer(PushProvider::Fcm, Reply::Gone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_too_many_requests_is_retried_after_retry_after() {
    one_answer(PushProvider::Fcm, Reply::TooMany(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_internal_error_is_retried() {
    one_answer(PushProvider::Fcm, Reply::Internal).await;
}

/// A channel clip pushes the members with no connected session (not the
/// online ones, not the talker), with the channel's collapse id; a second
/// clip within `push_min_interval` pushes nobody again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_clip_wakes_its_offline_members_once_per_interval() {
    let p = pushing(PushProvider::Apns).await;
    for u in ["carol", "dan", "erin"] {
        p.registered(u, &format!("{u}-phone"), &[("ops", Listen)])
            .await;
    }
    p.registered("alice", "alice-phone", &[("ops", Talk)]).await;
    // Erin is back online: no push for her.
    let (_erin, _) = p.t.member("erin", &[("ops", Listen)]).await;
    let (alice, _) = p.t.member("alice", &[("ops", Talk)]).await;
    let mut c = clip("x", 5);
    c.target = Target::Channel("ops".into());
    alice.send_clip(&c, Pacing::Upload).await.unwrap();
    let seen = p.standin.until(2, 10).await;
    good(&seen);
    let mut tokens: Vec<&str> = seen.iter().map(|s| s.token.as_str()).collect();
    tokens.sort_unstable();
    assert_eq!(tokens, ["tok-carol-phone", "tok-dan-phone"]);
    let collapse: Vec<_> = seen.iter().map(|s| s.header("apns-collapse-id")).collect();
    assert!(
        collapse[0].is_some() && collapse[0] == collapse[1],
        "{collapse:?}"
    );
    assert_eq!(seen[0].body["ptt"]["target"]["channel"], "ops");
    let mut again = clip("x", 5);
    again.target = Target::Channel("ops".into());
    alice.send_clip(&again, Pacing::Upload).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(p.standin.seen().len(), 2, "within push_min_interval");
}

/// A registration the relay keeps survives a restart (the disk store's
/// data dir), and a bad one is refused with a clear reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_are_durable_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let t = start_in(dir.path(), |_| {}).await;
    let (c, _) = t.connect("bob").await;
    let bad = c
        .register_push(PushRegister {
            provider: PushProvider::Apns,
            device_id: "phone".into(),
            token: "abc".into(),
            topic: "com.example.ptt".into(),
        })
        .await
        .unwrap();
    assert_eq!(bad.code, ErrorCode::ProtocolViolation);
    assert!(bad.reason.contains(".voip-ptt"), "{}", bad.reason);
    let ok = c
        .register_push(PushRegister {
            provider: PushProvider::Fcm,
            device_id: "phone".into(),
            token: "abc".into(),
            topic: String::new(),
        })
        .await
        .unwrap();
    assert_eq!((ok.code, ok.devices), (ErrorCode::NoError, 1));
    assert!(ok.reason.contains("no fcm credentials"), "{}", ok.reason);
    c.close();
    drop(t);
    let t = start_in(dir.path(), |_| {}).await;
    let m = http_get(t.relay.admin_addr(), "/metrics").await.1;
    assert!(m.contains("ptt_push_users 1"), "{m}");
    let (c, _) = t.connect("bob").await;
    let gone = c.unregister_push("phone").await.unwrap();
    assert_eq!((gone.code, gone.devices), (ErrorCode::NoError, 0));
}

/// What an app's listener hears from the SDK.
enum Heard {
    Clip(ptt_client::sdk::IncomingClip),
    Status(ptt_client::sdk::Status),
}

struct App(tokio::sync::mpsc::UnboundedSender<Heard>);

impl ptt_client::sdk::Listener for App {
    fn clip(&self, c: ptt_client::sdk::IncomingClip) -> bool {
        let _ = self.0.send(Heard::Clip(c));
        true
    }
    fn sent(&self, _: codec::wire::ClipId, _: ptt_client::sdk::Sent) {}
    fn status(&self, s: ptt_client::sdk::Status) {
        let _ = self.0.send(Heard::Status(s));
    }
}

async fn heard<T>(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Heard>,
    what: &str,
    mut f: impl FnMut(Heard) -> Option<T>,
) -> T {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(t) = f(rx.recv().await.expect("the SDK runs")) {
                return t;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// An app's SDK goes to sleep: its connection closes and not one datagram
/// leaves the phone while it sleeps (counted at a UDP forwarder in front
/// of the relay, where keep-alives of a connected SDK do show). A clip for
/// the user pushes the device; the app wakes the SDK on the push and gets
/// the stored clip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asleep_nothing_leaves_the_phone_and_a_push_wakes_it_for_the_clip() {
    use ptt_client::sdk::{Config, Sdk, Status};
    let p = pushing(PushProvider::Fcm).await;
    let tap = Tap::start(p.t.relay.quic_addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(
        &tap.addr.to_string(),
        p.t.relay.files().cert.clone(),
        dir.path().to_path_buf(),
        &p.t.token("bob"),
    );
    cfg.transport.keep_alive = Duration::from_secs(1);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let bob = Sdk::start(cfg, std::sync::Arc::new(App(tx))).unwrap();
    heard(&mut rx, "connected", |h| {
        matches!(h, Heard::Status(Status::Connected { .. })).then_some(())
    })
    .await;
    let r = bob
        .register_push(PushProvider::Fcm, "tok-bob-phone", "")
        .await
        .unwrap();
    assert_eq!(r.code, ErrorCode::NoError, "{}", r.reason);
    // Connected and idle, the SDK keeps its connection alive.
    tap.record();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let idle = tap.take().len();
    assert!(idle >= 2, "{idle} datagrams while connected and idle");
    bob.sleep().await;
    heard(&mut rx, "asleep", |h| {
        matches!(h, Heard::Status(Status::Asleep)).then_some(())
    })
    .await;
    tap.record();
    let (alice, _) = p.t.connect("alice").await;
    let sent = clip("bob", 20);
    alice.send_clip(&sent, Pacing::Upload).await.unwrap();
    let push = p.standin.until(1, 10).await;
    good(&push);
    assert_eq!(push[0].token, "tok-bob-phone");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let asleep = tap.take();
    assert!(
        asleep.is_empty(),
        "{} datagrams left while asleep",
        asleep.len()
    );
    // The push reaches the app, which wakes the SDK.
    bob.wake();
    let got = heard(&mut rx, "the clip", |h| match h {
        Heard::Clip(c) if c.id == sent.id => Some(c),
        _ => None,
    })
    .await;
    assert_eq!(got.sender, "alice");
    bob.stop().await;
}

/// In a cluster: a device registered on relay one is pushed for a clip
/// accepted by relay two (registrations are shared); not while its user is
/// connected to relay one (relays answer for their users); and a clip sent
/// again through the other relay pushes it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_a_device_is_pushed_once_by_whichever_relay_accepts() {
    use common::nats::{Nats, data_dir, sharing_keys};
    let nats = Nats::start();
    let url = nats.url.clone();
    let one = pushing_with(PushProvider::Apns, |c| c.cluster = url.clone()).await;
    // Relay two: the same keys and the same stand-in.
    let dir = sharing_keys(data_dir(&one.t));
    let (key, ca, apns_url) = {
        let c = one.t.relay.shared().config.clone();
        (c.apns_key, c.push_ca, c.apns_url)
    };
    let two = start_in(dir.path(), |c| {
        c.cluster = url.clone();
        c.apns_key = key;
        c.apns_key_id = KEY_ID.into();
        c.apns_team_id = TEAM.into();
        c.apns_url = apns_url;
        c.push_ca = ca;
    })
    .await;
    one.registered("bob", "phone", &[]).await;
    // Relay two has Bob's device from the cluster.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !http_get(two.relay.admin_addr(), "/metrics")
        .await
        .1
        .contains("ptt_push_users 1")
    {
        assert!(
            Instant::now() < deadline,
            "relay two never saw bob's device"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (alice, _) = two.connect("alice").await;
    let first = clip("bob", 5);
    alice.send_clip(&first, Pacing::Upload).await.unwrap();
    let seen = one.standin.until(1, 10).await;
    good(&seen);
    assert_eq!(seen[0].body["ptt"]["clip_id"], first.id.to_hex());
    // Bob is on relay one now: relay two's clip for him pushes nobody.
    let (bob, mut bob_ev) = one.t.connect("bob").await;
    let got = next_complete(&mut bob_ev).await;
    bob.ack(got.id()).await.unwrap();
    let second = clip("bob", 5);
    alice.send_clip(&second, Pacing::Upload).await.unwrap();
    let got = next_complete(&mut bob_ev).await;
    assert_eq!(got.id(), second.id);
    bob.ack(got.id()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(one.standin.seen().len(), 1, "pushed a connected user");
    // Bob gone again: a clip through relay one, then the same clip
    // through relay two (a sender's retry elsewhere): one push.
    bob.close();
    let router = &one.t.relay.shared().router;
    while router.is_online("bob") {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (alice_one, _) = one.t.connect("alice").await;
    let third = clip("bob", 5);
    alice_one.send_clip(&third, Pacing::Upload).await.unwrap();
    one.standin.until(2, 10).await;
    alice.send_clip(&third, Pacing::Upload).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = one.standin.seen();
    let for_third = seen
        .iter()
        .filter(|s| s.body["ptt"]["clip_id"] == third.id.to_hex())
        .count();
    assert_eq!(for_third, 1, "{seen:?}");
}

/// A phone woken by its push connects while the clip is still spoken: it
/// joins it live, from its first packet, and the clip is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_connects_while_a_clip_is_spoken_joins_it_live() {
    let t = start(|_| {}).await;
    let (alice, _) = t.connect("alice").await;
    let c = clip("bob", 100); // two seconds, sent in real time
    let sending = {
        let (alice, c) = (alice.clone(), c.clone());
        tokio::spawn(async move { alice.send_clip(&c, Pacing::Live).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (bob, mut ev) = t.connect("bob").await;
    let live = next_matching(&mut ev, |e| match e {
        ptt_client::Event::Started { delivery, .. } => Some(delivery.live),
        _ => None,
    })
    .await;
    assert!(live, "joined as a live delivery");
    let got = next_complete(&mut ev).await;
    assert_eq!(got.id(), c.id);
    assert_eq!(got.packets, c.packets, "from its first packet");
    bob.ack(got.id()).await.unwrap();
    sending.await.unwrap().unwrap();
    assert_no_clip(&mut ev, Duration::from_millis(500)).await;
}

/// Median and 99th percentile of `v` (ms), sorted here.
fn p50_p99(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.5), at(0.99))
}

/// Benchmark (docs/benchmarks.md, "Waking phones"; not a test): from a
/// channel clip's first packet to each push request reaching the provider,
/// with 1,000 offline members registered in the channel, three rounds.
///
///   cargo nextest run --release -p relay --test push --run-ignored only bench_push_delay --no-capture
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it with --run-ignored only, in release"]
async fn bench_push_delay_with_1000_offline_members() {
    use futures_util::StreamExt;
    let p = pushing_with(PushProvider::Apns, |c| {
        c.push_min_interval = Duration::ZERO;
        c.max_connections = 5000;
        c.max_handshakes_per_second = 0;
    })
    .await;
    let n = 1000;
    futures_util::stream::iter(0..n)
        .map(|i| {
            let p = &p;
            async move {
                let user = format!("m{i:04}");
                let (c, _) =
                    p.t.try_connect_with(
                        &p.t.token_with(&user, &[("big", Listen)]),
                        Default::default(),
                    )
                    .await
                    .unwrap();
                let r = c
                    .register_push(PushRegister {
                        provider: PushProvider::Apns,
                        device_id: "phone".into(),
                        token: format!("tok-{user}"),
                        topic: TOPIC.into(),
                    })
                    .await
                    .unwrap();
                assert_eq!(r.code, ErrorCode::NoError);
                c.close();
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    let router = &p.t.relay.shared().router;
    while router.online() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (alice, _) = p.t.member("alice", &[("big", Talk)]).await;
    for round in 0..3 {
        let mut c = clip("x", 5);
        c.target = Target::Channel("big".into());
        let before = p.standin.seen().len();
        let t0 = Instant::now();
        alice.send_clip(&c, Pacing::Upload).await.unwrap();
        let seen = p.standin.until(before + n, 60).await;
        let mut ms: Vec<f64> = seen[before..]
            .iter()
            .map(|s| s.at.duration_since(t0).as_secs_f64() * 1000.0)
            .collect();
        let (p50, p99) = p50_p99(&mut ms);
        println!(
            "round {round}: {n} pushes, first packet to push request: p50 {p50:.1} ms, p99 {p99:.1} ms, last {:.1} ms",
            ms[ms.len() - 1]
        );
    }
}

/// Benchmark (docs/benchmarks.md, "Waking phones"; not a test): from
/// `wake()` to the first audio of a clip being spoken to the user, over a
/// path of 50 ms each way: an SDK that was connected before (it holds a
/// ticket: 0-RTT) against a new SDK process (no ticket: a full
/// handshake). Five rounds, alternating.
///
///   cargo nextest run --release -p relay --test push --run-ignored only bench_wake --no-capture
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it with --run-ignored only, in release"]
async fn bench_wake_to_first_audio() {
    use ptt_client::sdk::{Config, Sdk, Status};
    struct Ear(tokio::sync::mpsc::UnboundedSender<(Instant, bool)>);
    impl ptt_client::sdk::Listener for Ear {
        fn clip(&self, _: ptt_client::sdk::IncomingClip) -> bool {
            true
        }
        fn sent(&self, _: codec::wire::ClipId, _: ptt_client::sdk::Sent) {}
        fn status(&self, s: Status) {
            if matches!(s, Status::Connected { .. }) {
                let _ = self.0.send((Instant::now(), false));
            }
        }
        fn talk(&self, e: ptt_client::sdk::TalkEvent) {
            if matches!(e, ptt_client::sdk::TalkEvent::Audio { .. }) {
                let _ = self.0.send((Instant::now(), true));
            }
        }
    }
    let t = start(|_| {}).await;
    let (alice, _) = t.connect("alice").await;
    // Each SDK behind a forwarder of its own (one forwarder follows one
    // client address).
    // A user of its own per run: nothing stored from an earlier run comes
    // first.
    let sdk = |dir: &std::path::Path, tap: &Tap, user: &str| {
        let cfg = Config::new(
            &tap.addr.to_string(),
            t.relay.files().cert.clone(),
            dir.to_path_buf(),
            &t.token(user),
        );
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Sdk::start(cfg, std::sync::Arc::new(Ear(tx))).unwrap(), rx)
    };

    let speak = |to: String| {
        let alice = alice.clone();
        tokio::spawn(async move {
            let c = clip(&to, 150);
            alice.send_clip(&c, Pacing::Live).await.unwrap();
        })
    };
    async fn first_audio(
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<(Instant, bool)>,
    ) -> Instant {
        loop {
            let (at, audio) = rx.recv().await.unwrap();
            if audio {
                return at;
            }
        }
    }
    let (mut warm, mut cold) = (Vec::new(), Vec::new());
    let router = &t.relay.shared().router;
    for round in 0..5 {
        // 0-RTT: connected once (a ticket), asleep, woken.
        let (warm_user, cold_user) = (format!("warm{round}"), format!("cold{round}"));
        let dir = tempfile::tempdir().unwrap();
        let tap = Tap::delayed(t.relay.quic_addr(), Duration::from_millis(50)).await;
        let (bob, mut rx) = sdk(dir.path(), &tap, &warm_user);
        rx.recv().await.unwrap(); // connected
        bob.sleep().await;
        while router.is_online(&warm_user) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let talking = speak(warm_user.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = Instant::now();
        bob.wake();
        warm.push(first_audio(&mut rx).await.duration_since(t0).as_secs_f64() * 1000.0);
        bob.stop().await;
        talking.await.unwrap();
        // A new app process: no ticket, a full handshake.
        let talking = speak(cold_user.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let dir = tempfile::tempdir().unwrap();
        let tap = Tap::delayed(t.relay.quic_addr(), Duration::from_millis(50)).await;
        let t0 = Instant::now();
        let (bob, mut rx) = sdk(dir.path(), &tap, &cold_user);
        cold.push(first_audio(&mut rx).await.duration_since(t0).as_secs_f64() * 1000.0);
        bob.stop().await;
        talking.await.unwrap();
    }
    println!("wake to first audio, 50 ms one-way: 0-RTT (ticket held) {warm:.1?} ms");
    println!("wake to first audio, 50 ms one-way: full handshake (new process) {cold:.1?} ms");
    let (w, _) = p50_p99(&mut warm);
    let (c, _) = p50_p99(&mut cold);
    println!("medians: 0-RTT {w:.1} ms, full handshake {c:.1} ms");
}

/// An SDK that cannot reach its relay retries with backoff; told to sleep,
/// it stops at once: not one more datagram (counted at a forwarder in
/// front of the relay's address, with nothing behind it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asleep_an_offline_sdk_stops_trying() {
    use ptt_client::sdk::{Config, Sdk, Status};
    let t = start(|_| {}).await;
    let (cert, token) = (t.relay.files().cert.clone(), t.token("bob"));
    let nowhere = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let tap = Tap::start(nowhere).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(
        &tap.addr.to_string(),
        cert,
        dir.path().to_path_buf(),
        &token,
    );
    cfg.reconnect_min = Duration::from_millis(100);
    cfg.reconnect_max = Duration::from_millis(400);
    cfg.connect_timeout = Duration::from_millis(300);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tap.record();
    let bob = Sdk::start(cfg, std::sync::Arc::new(App(tx))).unwrap();
    heard(&mut rx, "a failed attempt", |h| {
        matches!(h, Heard::Status(Status::Offline { .. })).then_some(())
    })
    .await;
    assert!(!tap.take().is_empty(), "it tried");
    bob.sleep().await;
    heard(&mut rx, "asleep", |h| {
        matches!(h, Heard::Status(Status::Asleep)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    tap.record();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent = tap.take();
    assert!(sent.is_empty(), "{} datagrams while asleep", sent.len());
    bob.stop().await;
}
