//! The SDK with several relays: its home relay's path is cut (every
//! datagram dropped, as when a region dies), it moves to the next relay,
//! its outbox follows it, and it goes back home once home answers again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use codec::wire::{ClipId, Target};
use common::{speech, start, token};
use ptt_client::sdk::{Config, IncomingClip, Listener, Sdk, Sent, Status};
use relay::testing::Wire;
use tokio::sync::mpsc;

enum Heard {
    Status(Status),
    Sent(ClipId, Sent),
}

struct App(mpsc::UnboundedSender<Heard>);

impl Listener for App {
    fn clip(&self, _: IncomingClip) -> bool {
        true
    }

    fn sent(&self, id: ClipId, s: Sent) {
        let _ = self.0.send(Heard::Sent(id, s));
    }

    fn status(&self, s: Status) {
        let _ = self.0.send(Heard::Status(s));
    }
}

/// Waits (a bound, not a measure) until `f` holds.
async fn until(what: &str, secs: u64, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_moves_to_the_next_relay_and_comes_back_home() {
    let dir = tempfile::tempdir().unwrap();
    let home = start(&dir.path().join("a"), None).await;
    home.files().share_with(&dir.path().join("b")).unwrap();
    let other = start(&dir.path().join("b"), None).await;
    let (to_home, to_other) = (
        Wire::start(home.quic_addr()).await.unwrap(),
        Wire::start(other.quic_addr()).await.unwrap(),
    );
    let mut cfg = Config::new(
        "",
        home.files().cert.clone(),
        dir.path().join("app"),
        &token(&home, "alice"),
    );
    cfg.relays = vec![to_home.addr.to_string(), to_other.addr.to_string()];
    cfg.failover_after = Duration::from_secs(2);
    // An idle client notices a silent relay at its next keep-alive.
    cfg.transport.keep_alive = Duration::from_secs(1);
    cfg.reconnect_min = Duration::from_millis(200);
    cfg.reconnect_max = Duration::from_secs(1);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sdk = Sdk::start(cfg, Arc::new(App(tx))).unwrap();
    let on = |r: &relay::Relay| r.shared().router.session("alice").is_some();
    until("alice at home", 10, || on(&home)).await;
    assert!(!on(&other), "home first");
    let session = |r: &relay::Relay| r.shared().router.session("alice").map(|s| s.id);
    let first = session(&home);

    // Home's path dies; a clip recorded meanwhile waits in the outbox.
    to_home.set_cut(true);
    let cut = Instant::now();
    let ogg = std::fs::read(speech(dir.path(), "over to you")).unwrap();
    let id = sdk
        .send_file(Target::User("bob".into()), &ogg)
        .expect("kept in the outbox");
    until("alice on the other relay", 20, || on(&other)).await;
    let moved = cut.elapsed();
    eprintln!("moved {moved:?} after the cut (keep-alive 1 s, failover_after 2 s)");
    // The outbox followed: the other relay accepted the clip and keeps it
    // for Bob.
    let accepted = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(h) = rx.recv().await {
            if let Heard::Sent(got, s) = h
                && got == id
            {
                return s;
            }
        }
        panic!("listener gone");
    })
    .await
    .expect("the outbox's clip answered");
    assert_eq!(accepted, Sent::Accepted { duplicate: false });
    assert_eq!(other.shared().store.stats().pending, 1, "kept for bob");
    assert_eq!(home.shared().store.stats().pending, 0);

    // Home answers again: the SDK goes back (the other relay's session
    // ends; home has one).
    to_home.set_cut(false);
    let back = Instant::now();
    until("alice back home", 20, || {
        session(&home).is_some_and(|s| Some(s) != first) && !on(&other)
    })
    .await;
    eprintln!("back home {:?} after home answered again", back.elapsed());
    // And stays there.
    let settled = session(&home);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(session(&home), settled, "home session kept");
    assert!(!on(&other));
    while let Ok(h) = rx.try_recv() {
        if let Heard::Status(Status::SignedOut { why }) = h {
            panic!("signed out on the way: {why}");
        }
    }
    sdk.stop().await;
    let _ = to_other;
}

/// `relay` and `relays` naming different homes: a setup error, said at
/// start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_and_relays_must_agree() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(
        "127.0.0.1:1",
        dir.path().join("cert.pem"),
        dir.path().join("app"),
        "token",
    );
    cfg.relays = vec!["127.0.0.1:2".into(), "127.0.0.1:1".into()];
    let (tx, _rx) = mpsc::unbounded_channel();
    let e = Sdk::start(cfg, Arc::new(App(tx))).err().expect("refused");
    assert!(e.to_string().contains("is not the first of relays"), "{e}");
}

/// The web app's copy of the failover rule (`Relays` in web/ptt.js, run by
/// node) takes the same steps as `ptt_client::failover::Relays`: the same
/// relay and the same wait after every loss, the same home tries.
#[test]
fn the_web_app_fails_over_by_the_same_rule() {
    use ptt_client::failover::{Lost, Relays};
    // (step, why or time, hint ms, random unit)
    let steps: &[(&str, &str, u64, f64)] = &[
        ("lost", "unanswered", 0, 0.1),
        ("lost", "unanswered", 0, 0.9),
        ("lost", "unanswered", 0, 0.5),
        ("lost", "unanswered", 700, 0.3),
        ("connected", "1000", 0, 0.2),
        ("home_due", "", 0, 0.0),
        ("home_silent", "1300", 0, 0.7),
        ("home_due", "", 0, 0.0),
        ("home_answered", "2000", 0, 0.4),
        ("home_due", "", 0, 0.0),
        ("lost", "closed", 0, 0.6),
        ("lost", "closed", 1500, 0.6),
        ("lost", "going_away", 2000, 0.8),
        ("connected", "9000", 0, 0.5),
        ("lost", "closed", 0, 0.0),
        ("lost", "unanswered", 0, 1.0),
        ("lost", "unanswered", 0, 0.5),
    ];
    let t0 = std::time::Instant::now();
    let mut r = Relays::new(
        vec!["a".into(), "b".into(), "c".into()],
        codec::retry::Backoff {
            min: Duration::from_millis(250),
            max: Duration::from_secs(30),
        },
        Duration::from_secs(3),
    );
    let ms = |s: &str| Duration::from_millis(s.parse().unwrap());
    let mut ours = Vec::new();
    for &(step, arg, hint, unit) in steps {
        match step {
            "lost" => {
                let why = match arg {
                    "unanswered" => Lost::Unanswered,
                    "closed" => Lost::Closed,
                    _ => Lost::GoingAway {
                        hint: Duration::from_millis(hint),
                    },
                };
                let n = r.lost(why, Duration::from_millis(hint), unit);
                ours.push(serde_json::json!([n.index, n.wait.as_secs_f64() * 1000.0]));
            }
            "connected" => r.connected(t0 + ms(arg), unit),
            "home_silent" => r.home_silent(t0 + ms(arg), unit),
            "home_answered" => r.home_answered(t0 + ms(arg), unit),
            _ => {}
        }
        match step {
            "lost" | "connected" | "home_silent" | "home_answered" => {
                if step != "lost" {
                    ours.push(serde_json::Value::Null);
                }
            }
            _ => ours.push(serde_json::json!(
                r.home_due().map(|t| (t - t0).as_secs_f64() * 1000.0)
            )),
        }
    }
    let ptt_js = common::repo().join("web/ptt.js");
    let script = format!(
        r#"import {{ Relays }} from "{}";
const r = new Relays(["a", "b", "c"]);
const out = [];
for (const [step, arg, hint, unit] of {}) {{
  if (step === "lost") {{
    const why = {{ unanswered: "unanswered", closed: "closed", going_away: "goingAway" }}[arg];
    const n = r.lost(why, hint, unit);
    out.push([n.index, n.waitMs]);
  }} else if (step === "connected") {{ r.connected(Number(arg), unit); out.push(null); }}
  else if (step === "home_silent") {{ r.homeSilent(Number(arg), unit); out.push(null); }}
  else if (step === "home_answered") {{ r.homeAnswered(Number(arg), unit); out.push(null); }}
  else out.push(r.atHome ? null : r.homeDue);
}}
console.log(JSON.stringify(out));
"#,
        ptt_js.display(),
        serde_json::to_string(steps).unwrap()
    );
    let theirs: Vec<serde_json::Value> =
        serde_json::from_slice(&common::run_node(&script)).unwrap();
    assert_eq!(theirs.len(), ours.len());
    let close = |a: &serde_json::Value, b: &serde_json::Value| match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() < 0.01,
        _ => a == b,
    };
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        let same = match (a.as_array(), b.as_array()) {
            (Some(x), Some(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| close(p, q)),
            _ => close(a, b),
        };
        assert!(same, "step {i} {:?}: Rust {a}, web/ptt.js {b}", steps[i]);
    }
}
