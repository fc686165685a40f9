//! A copy the relay drops at `clip_ttl` without its recipient's ack is never
//! lost silently: the recipient's client gets an `Expired` notice (on
//! connecting, or at once if online), until it acks it; kept across a
//! restart with the disk store; nobody else sees it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use codec::wire::{Expired, Target};
use common::*;
use ptt_client::{Event, Pacing};
use tokio::sync::mpsc;

fn short_ttl(c: &mut relay::Config) {
    c.clip_ttl = Duration::from_secs(1);
}

async fn next_expired(events: &mut mpsc::Receiver<Event>) -> Expired {
    next_matching(events, |e| match e {
        Event::Expired(x) => Some(x),
        Event::Complete(c) => panic!("clip {} delivered after it expired", c.id()),
        _ => None,
    })
    .await
}

/// Nothing but maybe housekeeping for `wait`: no notice, no clip.
async fn assert_quiet(events: &mut mpsc::Receiver<Event>, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, events.recv()).await {
        assert!(
            !matches!(ev, Event::Expired(_) | Event::Complete(_)),
            "unexpected {ev:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_recipient_is_told_of_each_expired_clip_until_it_acks_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let t = start_in(dir.path(), short_ttl).await;
    let (alice, _a) = t.connect("alice").await;
    let first = clip("bob", 10);
    let second = clip("bob", 20);
    alice.send_clip(&first, Pacing::Upload).await.unwrap();
    alice.send_clip(&second, Pacing::Upload).await.unwrap();
    assert_eq!(t.pending(), 2);
    // The sweep runs every TTL (1 s here): both copies go.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while t.pending() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(t.pending(), 0, "the copies did not expire");

    // Bob connects: no clip, a notice for each, oldest first.
    let (bob, mut bob_ev) = t.connect("bob").await;
    let n1 = next_expired(&mut bob_ev).await;
    let n2 = next_expired(&mut bob_ev).await;
    assert_eq!((n1.clip_id, n2.clip_id), (first.id, second.id));
    assert_eq!(n1.sender, "alice");
    assert_eq!(n1.target, Target::User("bob".into()));
    assert!(n1.created_ms <= n2.created_ms && n1.created_ms > 0);
    assert_eq!(n1.also + n2.also, 0);
    // Bob acks the first only.
    bob.ack(first.id).await.unwrap();
    // Carol sees nothing of Bob's.
    let (_carol, mut carol_ev) = t.connect("carol").await;
    assert_quiet(&mut carol_ev, Duration::from_millis(300)).await;
    bob.shutdown().await;

    // A restart keeps what was not acked.
    let (t, mut bob_ev) = {
        t.relay.shutdown().await;
        let t = start_in(dir.path(), short_ttl).await;
        let (_bob, ev) = t.connect("bob").await;
        (t, ev)
    };
    let again = next_expired(&mut bob_ev).await;
    assert_eq!(again.clip_id, second.id);
    assert_quiet(&mut bob_ev, Duration::from_millis(300)).await;
    let (bob, mut bob_ev) = t.connect("bob").await;
    let n = next_expired(&mut bob_ev).await;
    assert_eq!(n.clip_id, second.id);
    bob.ack(second.id).await.unwrap();
    bob.shutdown().await;
    let (_bob, mut bob_ev) = t.connect("bob").await;
    assert_quiet(&mut bob_ev, Duration::from_millis(500)).await;
    assert_eq!(t.relay.shared().expired.len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_recipient_whose_app_could_not_keep_a_clip_is_told_when_it_expires() {
    let t = start(short_ttl).await;
    let (alice, _a) = t.connect("alice").await;
    let seen = ptt_client::SeenIds::new(64);
    let opts = ptt_client::ClientOptions {
        seen: Some(seen.clone()),
        ..Default::default()
    };
    let (bob, mut bob_ev) = t.try_connect_with(&t.token("bob"), opts).await.unwrap();
    let c = clip("bob", 10);
    alice.send_clip(&c, Pacing::Upload).await.unwrap();
    // Bob's app gets it whole but cannot keep it: no ack, not seen.
    assert_eq!(next_complete(&mut bob_ev).await.id(), c.id);
    seen.forget(&c.id);
    // Still online when the copy expires: told at once.
    let x = next_expired(&mut bob_ev).await;
    assert_eq!(x.clip_id, c.id);
    assert_eq!(t.pending(), 0);
    bob.ack(c.id).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !t.relay.shared().expired.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(t.relay.shared().expired.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_for_a_clip_the_client_already_has_is_acked_not_passed_on() {
    let t = start(short_ttl).await;
    let (alice, _a) = t.connect("alice").await;
    let (bob, mut bob_ev) = t.connect("bob").await;
    let c = clip("bob", 10);
    alice.send_clip(&c, Pacing::Upload).await.unwrap();
    // Kept by the app (seen) but the ack never sent: the copy expires
    // and the notice is answered by the client library itself.
    assert_eq!(next_complete(&mut bob_ev).await.id(), c.id);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while (t.pending() > 0 || !t.relay.shared().expired.is_empty())
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(t.pending(), 0);
    assert!(
        t.relay.shared().expired.is_empty(),
        "the notice was not acked"
    );
    assert_quiet(&mut bob_ev, Duration::from_millis(200)).await;
    drop(bob);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_is_kept_for_expired_notice_ttl_after_its_clip_expired_then_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let ttls = |c: &mut relay::Config| {
        c.clip_ttl = Duration::from_secs(1);
        c.expired_notice_ttl = Duration::from_secs(2);
    };
    let t = start_in(dir.path(), ttls).await;
    let (alice, _a) = t.connect("alice").await;
    let c = clip("bob", 10);
    let before = tokio::time::Instant::now();
    alice.send_clip(&c, Pacing::Upload).await.unwrap();
    let sent = tokio::time::Instant::now();
    // The copy goes at the TTL and its notice is kept for Bob.
    let deadline = sent + Duration::from_secs(10);
    while (t.pending() > 0 || t.relay.shared().expired.is_empty())
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(t.pending(), 0, "the copy did not expire");
    assert_eq!(t.relay.shared().expired.len(), 1);
    // Still kept well inside clip_ttl + expired_notice_ttl (3 s).
    tokio::time::sleep_until(sent + Duration::from_millis(1500)).await;
    assert_eq!(t.relay.shared().expired.len(), 1, "pruned too early");
    // Gone a sweep or two after it: Bob, away for longer, is not told.
    let deadline = sent + Duration::from_secs(15);
    while !t.relay.shared().expired.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        t.relay.shared().expired.is_empty(),
        "the notice outlived expired_notice_ttl"
    );
    assert!(
        before.elapsed() >= Duration::from_secs(3),
        "pruned too early"
    );
    let (_bob, mut bob_ev) = t.connect("bob").await;
    assert_quiet(&mut bob_ev, Duration::from_millis(500)).await;
    // And a restart does not bring it back from the notices' file.
    t.relay.shutdown().await;
    let t = start_in(dir.path(), ttls).await;
    assert!(t.relay.shared().expired.is_empty());
    let (_bob, mut bob_ev) = t.connect("bob").await;
    assert_quiet(&mut bob_ev, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ack_of_a_notice_frees_the_expired_delivery_s_place_in_the_window() {
    let t = start(|c| {
        c.clip_ttl = Duration::from_secs(3);
        // Sweeps every 100 ms, so each copy expires close to its TTL.
        c.dedupe_window = Duration::from_millis(100);
        c.max_unacked_deliveries = 1;
    })
    .await;
    let (alice, _a) = t.connect("alice").await;
    let first = clip("bob", 10);
    let second = clip("bob", 20);
    let start = tokio::time::Instant::now();
    alice.send_clip(&first, Pacing::Upload).await.unwrap();
    tokio::time::sleep_until(start + Duration::from_millis(1500)).await;
    alice.send_clip(&second, Pacing::Upload).await.unwrap();
    // Bob takes the first from the store and never acks it: the window
    // of one is full, the second waits.
    let (_bob, mut bob_ev) = t.connect("bob").await;
    assert_eq!(next_complete(&mut bob_ev).await.id(), first.id);
    let quiet_until = start + Duration::from_millis(2600);
    while let Ok(Some(ev)) = tokio::time::timeout_at(quiet_until, bob_ev.recv()).await {
        assert!(!matches!(ev, Event::Complete(_)), "window overrun: {ev:?}");
    }
    assert_eq!(t.pending(), 2);
    // The first copy expires at 3 s; Bob's client already has it, so it
    // acks the notice itself, and that ack frees the place: the second
    // comes, long before its own TTL (4.5 s).
    assert_eq!(next_complete(&mut bob_ev).await.id(), second.id);
    assert!(start.elapsed() < Duration::from_millis(4500));
    assert_eq!(t.pending(), 1, "the second copy waits for Bob's ack");
}
