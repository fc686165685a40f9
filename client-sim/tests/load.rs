//! `client-sim load` against a real relay on loopback: clean runs, runs
//! through loss and jitter, churn and storms, and relay faults the verifier
//! must catch.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use client_sim::load::{self, LoadTarget, Mode, PressFrom, Report, Source, Workload};
use relay::{Config, Relay};

async fn relay() -> (Relay, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(Config::for_tests(dir.path())).await.unwrap();
    (relay, dir)
}

async fn run(relay: &Relay, w: Workload) -> Report {
    let target = LoadTarget {
        relays: vec![relay.quic_addr()],
        server_name: "localhost".into(),
        ca: relay.files().cert.clone(),
        key: codec::token::TokenKey::from_file(&relay.files().secret, Duration::ZERO).unwrap(),
        relay_pid: Some(std::process::id()),
    };
    let r = load::run(target, w, Source::builtin().unwrap())
        .await
        .unwrap();
    eprintln!("{}", r.table());
    r
}

fn assert_clean(r: &Report) {
    assert!(!r.failed(), "lost/duplicated/corrupted:\n{}", r.table());
    assert!(r.counts.deliveries_ok > 0);
    assert_eq!(
        r.counts.deliveries_ok, r.clips_accepted,
        "every accepted clip arrived once"
    );
    assert_eq!(r.send_failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_users_for_twenty_seconds_lose_nothing() {
    let (relay, _d) = relay().await;
    let r = run(
        &relay,
        Workload {
            users: 200,
            duration: Duration::from_secs(20),
            ..Workload::default()
        },
    )
    .await;
    assert_clean(&r);
    assert!(r.first_frame_ms.count > 0);
    let json = serde_json::to_value(&r).unwrap();
    for key in [
        "deliveries_ok",
        "lost",
        "duplicated",
        "corrupted",
        "clips_per_s",
        "first_frame_ms",
        "delivery_ms",
        "access_ms",
        "wire_bytes_per_voice_s",
        "opus_bytes_per_voice_s",
        "datagrams_per_clip",
        "workload",
    ] {
        assert!(json.get(key).is_some(), "report lacks {key}");
    }
    assert!(json["first_frame_ms"].get("p99").is_some());
    assert!(r.html().unwrap().contains("<svg"));
    // Every user both sends and receives: no leg of its own to count.
    assert!(json["datagrams_per_clip_relay_to_recipient"].is_null());
}

/// Users in fixed pairs (one talks, one listens): each connection carries
/// one leg, so the datagrams of every leg and direction are counted, and
/// they add up to the whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_count_datagrams_per_clip_on_each_leg() {
    let (relay, _d) = relay().await;
    let r = run(
        &relay,
        Workload {
            users: 20,
            pairs: true,
            mode: Mode::Upload,
            duration: Duration::from_secs(4),
            talk_interval: Duration::from_millis(500),
            clip_min: Duration::from_secs(1),
            clip_max: Duration::from_secs(1),
            ..Workload::default()
        },
    )
    .await;
    assert_clean(&r);
    let legs = [
        r.datagrams_per_clip_sender_to_relay,
        r.datagrams_per_clip_relay_to_sender,
        r.datagrams_per_clip_relay_to_recipient,
        r.datagrams_per_clip_recipient_to_relay,
    ]
    .map(|l| l.expect("one leg per connection"));
    // A 1 s clip is ~50 Opus packets: at least a few datagrams carry it
    // each way, and each leg's ACKs come back.
    assert!(legs.iter().all(|l| *l > 0.0), "{legs:?}");
    assert!(legs[0] >= 2.0 && legs[2] >= 2.0, "{legs:?}");
    // What they carry: the clip's data goes as STREAM frames both ways.
    let frames = r.frames_per_clip.as_ref().expect("frames per leg");
    for leg in ["sender_to_relay", "relay_to_recipient"] {
        assert!(frames[leg]["stream"] >= 1.0, "{frames:?}");
    }
    let sum: f64 = legs.iter().sum();
    assert!(
        (sum - r.datagrams_per_clip).abs() < 1e-6 * sum.max(1.0),
        "{sum} vs {}",
        r.datagrams_per_clip
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_loss_and_100ms_jitter_lose_nothing() {
    let (relay, _d) = relay().await;
    let r = run(
        &relay,
        Workload {
            users: 200,
            duration: Duration::from_secs(20),
            loss_pct: 10.0,
            jitter: Duration::from_millis(100),
            grace: Duration::from_secs(30),
            ..Workload::default()
        },
    )
    .await;
    assert_clean(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_storm_and_address_change_lose_nothing() {
    let (relay, _d) = relay().await;
    let r = run(
        &relay,
        Workload {
            users: 100,
            duration: Duration::from_secs(10),
            talk_interval: Duration::from_secs(3),
            offline_share: 0.3,
            storm_at: Some(Duration::from_secs(6)),
            rebind_at: Some(Duration::from_secs(3)),
            reorder_pct: 5.0,
            grace: Duration::from_secs(30),
            ..Workload::default()
        },
    )
    .await;
    assert!(!r.failed(), "{}", r.table());
    assert!(r.counts.deliveries_ok > 0);
    assert!(r.connects > 100, "the storm reconnected everyone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verifier_catches_relay_faults() {
    let w = Workload {
        users: 20,
        duration: Duration::from_secs(4),
        talk_interval: Duration::from_millis(500),
        mode: Mode::Upload,
        grace: Duration::from_secs(3),
        ..Workload::default()
    };
    // (drop every, duplicate every, corrupt every)
    for (faults, what) in [
        ((3, 0, 0), "lost"),
        ((0, 3, 0), "duplicated"),
        ((0, 0, 3), "corrupted"),
    ] {
        let (relay, _d) = relay().await;
        relay.shared().faults.set(faults.0, faults.1, faults.2);
        let r = run(&relay, w.clone()).await;
        assert!(r.failed(), "{what}: the verifier missed it\n{}", r.table());
        let n = match what {
            "lost" => r.counts.lost,
            "duplicated" => r.counts.duplicated,
            _ => r.counts.corrupted,
        };
        assert!(n > 0, "{what} not counted\n{}", r.table());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_sends_the_same_workload_to_a_bare_sink() {
    let (relay, _d) = relay().await;
    let files = relay.files();
    let sink =
        client_sim::load::baseline::sink("127.0.0.1:0".parse().unwrap(), &files.cert, &files.key)
            .unwrap();
    let w = Workload {
        users: 4,
        endpoints: 2,
        duration: Duration::from_secs(2),
        clip_min: Duration::from_secs(1),
        clip_max: Duration::from_secs(1),
        ..Workload::default()
    };
    let r = client_sim::load::baseline::run(
        sink.local_addr().unwrap(),
        "localhost",
        &files.cert,
        &w,
        &Source::builtin().unwrap(),
    )
    .await
    .unwrap();
    eprint!("{}", r.table());
    assert!(r.clips > 10, "{r:?}");
    assert!(r.clips_per_s > 0.0 && r.ack_ms.count == r.clips);
    assert!((r.voice_s_per_s - r.clips_per_s).abs() < 0.05 * r.clips_per_s + 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_deliver_every_clip_to_every_member() {
    let (relay, _d) = relay().await;
    let r = run(
        &relay,
        Workload {
            users: 60,
            channel_size: 10,
            duration: Duration::from_secs(8),
            talk_interval: Duration::from_secs(3),
            clip_min: Duration::from_millis(500),
            clip_max: Duration::from_secs(2),
            ..Workload::default()
        },
    )
    .await;
    assert!(!r.failed(), "{}", r.table());
    assert!(r.clips_accepted > 0);
    assert_eq!(
        r.counts.deliveries_ok,
        r.clips_accepted * 9,
        "every other member"
    );
    assert!(r.last_member_first_frame_ms.count > 0);
}

/// Access time with a reconnect: each talker's phone sleeps between
/// presses, so every press connects first; with tickets the reconnects
/// go in 0-RTT, without them none does, and nothing is lost either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presses_from_sleep_reconnect_with_and_without_zero_rtt() {
    let (relay, _d) = relay().await;
    for zero_rtt in [true, false] {
        let r = run(
            &relay,
            Workload {
                users: 20,
                channel_size: 5,
                talkers_per_channel: 1,
                press_from: PressFrom::Asleep,
                zero_rtt,
                duration: Duration::from_secs(6),
                talk_interval: Duration::from_millis(1500),
                clip_min: Duration::from_millis(300),
                clip_max: Duration::from_millis(600),
                delay: Duration::from_millis(20),
                ..Workload::default()
            },
        )
        .await;
        assert!(!r.failed(), "{}", r.table());
        assert!(r.clips_accepted > 4, "{}", r.table());
        assert_eq!(
            r.counts.deliveries_ok,
            r.clips_accepted * 4,
            "{}",
            r.table()
        );
        // Each press connected (listeners once each, talkers per press).
        assert!(r.connects >= 16 + r.clips_accepted, "{}", r.table());
        if zero_rtt {
            assert!(r.zero_rtt_connects > 0, "{}", r.table());
        } else {
            assert_eq!(r.zero_rtt_connects, 0, "{}", r.table());
        }
        assert!(r.press_to_relay_ms.count > 0 && r.press_to_listener_ms.count > 0);
        // The press comes before the relay has the header, which comes
        // before the listener has it (20 ms each way).
        assert!(r.press_to_listener_ms.p50 >= r.press_to_relay_ms.p50);
        assert!(r.press_to_relay_ms.p50 >= 20.0, "{}", r.table());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generators_with_their_own_first_user_share_a_relay_without_collisions() {
    // How 100,000 sessions are spread over several processes
    // (`--first-user`): two generators at once, each its own users.
    let (relay, _d) = relay().await;
    let w = |first_user| Workload {
        users: 20,
        first_user,
        duration: Duration::from_secs(5),
        ..Workload::default()
    };
    let (a, b) = tokio::join!(run(&relay, w(0)), run(&relay, w(1000)));
    // A shared name would have replaced the other's session (lost clips).
    assert_clean(&a);
    assert_clean(&b);
    let usage = &relay.shared().usage;
    let today = relay::testing::today();
    for (user, seen) in [
        ("load-000000", true),
        ("load-000019", true),
        ("load-001000", true),
        ("load-001019", true),
        ("load-000020", false),
        ("load-001020", false),
    ] {
        assert_eq!(!usage.days(user, 0, today).is_empty(), seen, "{user}");
    }
}
