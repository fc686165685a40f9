//! Each user's data use, counted by the relay: told to the user on its
//! control stream (`UsageQuery`) and to operators (`/usage`,
//! `/usage/top`), kept across a restart with the disk store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use codec::wire::Usage;
use common::*;
use ptt_client::{Client, Pacing};

/// Today's (up, down) bytes in an answer.
fn today(u: &Usage) -> (u64, u64) {
    u.days
        .iter()
        .find(|d| d.day == u.today)
        .map_or((0, 0), |d| (d.bytes_up, d.bytes_down))
}

async fn today_of(c: &Client) -> (u64, u64) {
    today(&c.usage(1).await.unwrap())
}

/// `got` is `opus` bytes plus what QUIC and ptt/1 add around them: at
/// least the Opus bytes, at most a quarter more plus a few packets' worth.
fn carries(got: u64, opus: u64, what: &str) {
    assert!(
        got >= opus && got <= opus + opus / 4 + 3_000,
        "{what}: {got} bytes for {opus} bytes of Opus"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_clip_is_counted_for_its_sender_and_its_recipient_each_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let t = start_in(dir.path(), |_| {}).await;
    let (alice, _) = t.connect("alice").await;
    let (bob, mut bob_ev) = t.connect("bob").await;
    let c = clip("bob", 500);
    let opus: u64 = c.packets.iter().map(|p| p.len() as u64).sum();
    assert!(opus > 25_000);
    let (a_up0, a_down0) = today_of(&alice).await;
    let (b_up0, b_down0) = today_of(&bob).await;
    // The handshake and Auth are counted from the start of the connection.
    assert!(a_up0 > 1_000 && a_down0 > 1_000, "{a_up0} {a_down0}");

    alice.send_clip(&c, Pacing::Upload).await.unwrap();
    let got = next_complete(&mut bob_ev).await;
    assert_eq!(got.id(), c.id);
    bob.ack(c.id).await.unwrap();

    let (a_up1, a_down1) = today_of(&alice).await;
    let (b_up1, b_down1) = today_of(&bob).await;
    // Alice sent the clip up; Bob got it down.
    carries(a_up1 - a_up0, opus, "alice up");
    carries(b_down1 - b_down0, opus, "bob down");
    // Each sees their own figures: Alice's way down and Bob's way up
    // carried only ACKs, answers and the usage queries.
    assert!(
        a_down1 - a_down0 < opus / 5,
        "alice down {}",
        a_down1 - a_down0
    );
    assert!(b_up1 - b_up0 < opus / 5, "bob up {}", b_up1 - b_up0);

    // Operators see the same, current to the request.
    let admin = t.relay.admin_addr();
    let (code, body) = http_get(admin, "/usage?user=alice").await;
    assert_eq!(code, 200, "{body}");
    let u: relay::testing::UserUsage = serde_json::from_str(&body).unwrap();
    assert_eq!(u.user, "alice");
    assert_eq!(u.days.len(), 1);
    assert_eq!(u.days[0].date, u.today);
    assert!(u.bytes_up >= a_up1 && u.bytes_down >= a_down1, "{body}");
    let (code, body) = http_get(admin, "/usage/top?days=1&n=5").await;
    assert_eq!(code, 200, "{body}");
    let top: serde_json::Value = serde_json::from_str(&body).unwrap();
    let users: Vec<(&str, u64)> = top["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["user"].as_str().unwrap(), u["bytes"].as_u64().unwrap()))
        .collect();
    assert_eq!(users.len(), 2, "{body}");
    assert!(users[0].1 >= users[1].1, "most first: {body}");
    let (code, _) = http_get(admin, "/usage").await;
    assert_eq!(code, 400, "a user is needed");
    let (code, body) = http_get(admin, "/usage?user=nobody").await;
    assert_eq!(code, 200);
    assert!(body.contains("\"days\":[]"), "{body}");

    // With the disk store the book survives a restart.
    alice.shutdown().await;
    bob.shutdown().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    t.relay.shutdown().await;
    let t = start_in(dir.path(), |_| {}).await;
    let (_, body) = http_get(t.relay.admin_addr(), "/usage?user=bob").await;
    let u: relay::testing::UserUsage = serde_json::from_str(&body).unwrap();
    assert!(u.bytes_down >= b_down1, "{body}");
}
