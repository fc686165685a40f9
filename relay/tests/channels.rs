//! Talk channels: membership and rights from the token, floor control,
//! priority pre-emption, fan-out to every online member.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use codec::ErrorCode;
use codec::token::Right::{Listen, Priority, Talk};
use codec::wire::Target;
use common::*;
use ptt_client::{Event, OutgoingClip, Pacing};

/// Four channel clips from `talker` to "ops", one after the other.
async fn say_four(talker: &ptt_client::Client) -> Vec<OutgoingClip> {
    let mut said = Vec::new();
    for i in 0..4 {
        let c = channel_clip("ops", 3 + i);
        talker.send_clip(&c, Pacing::Upload).await.unwrap();
        said.push(c);
    }
    said
}

/// Takes `n` complete clips, acking each, and returns their ids in the
/// order their delivery streams were opened.
async fn take_in_stream_order(
    client: &ptt_client::Client,
    events: &mut tokio::sync::mpsc::Receiver<Event>,
    n: usize,
) -> Vec<codec::wire::ClipId> {
    let mut opened = Vec::new();
    let mut complete = 0;
    while complete < n {
        match next_matching(events, |e| match e {
            Event::Started { delivery, seq, .. } => Some(Err((seq, delivery.clip_id))),
            Event::Complete(c) => Some(Ok(c.id())),
            _ => None,
        })
        .await
        {
            Err(x) => opened.push(x),
            Ok(id) => {
                client.ack(id).await.unwrap();
                complete += 1;
            }
        }
    }
    opened.sort();
    opened.into_iter().map(|(_, id)| id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_talker_at_a_time_and_every_member_hears_it() {
    let t = start(|_| {}).await;
    let (alice, _) = t.member("alice", &[("ops", Talk)]).await;
    let (bob, mut bob_ev) = t.member("bob", &[("ops", Talk)]).await;
    let mut listeners = Vec::new();
    for name in ["carol", "dave", "erin"] {
        listeners.push(t.member(name, &[("ops", Listen)]).await);
    }
    // Alice talks for a second; Bob presses meanwhile and is told who
    // holds the floor.
    let c = channel_clip("ops", 50);
    let talking = {
        let (alice, c) = (alice.clone(), c.clone());
        tokio::spawn(async move { alice.send_clip(&c, Pacing::Live).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, reason) = rejected(bob.send_clip(&channel_clip("ops", 5), Pacing::Upload).await);
    assert_eq!(code, ErrorCode::FloorBusy);
    assert!(
        reason.contains("busy") && reason.contains("alice"),
        "{reason}"
    );
    talking.await.unwrap().unwrap();
    // Every member but the talker has it, marked with the channel.
    let mut all: Vec<_> = listeners.iter_mut().map(|(_, ev)| ev).collect();
    all.push(&mut bob_ev);
    for ev in all {
        let got = next_complete(ev).await;
        assert_eq!(got.id(), c.id);
        assert_eq!(got.delivery.sender, "alice");
        assert_eq!(got.delivery.target, Target::Channel("ops".into()));
        assert_eq!(got.packets, c.packets);
    }
    // The floor is free again once the clip ended: now Bob talks.
    let next = channel_clip("ops", 5);
    bob.send_clip(&next, Pacing::Upload).await.unwrap();
    let got = next_complete(&mut listeners[0].1).await;
    assert_eq!(got.id(), next.id);
    assert_eq!(got.delivery.sender, "bob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_talker_preempts() {
    let t = start(|_| {}).await;
    let (alice, _) = t.member("alice", &[("ops", Talk)]).await;
    let (chief, _) = t.member("chief", &[("ops", Priority)]).await;
    let (_carol, mut carol_ev) = t.member("carol", &[("ops", Listen)]).await;
    let long = channel_clip("ops", 100);
    let talking = {
        let (alice, c) = (alice.clone(), long.clone());
        tokio::spawn(async move { alice.send_clip(&c, Pacing::Live).await })
    };
    // Alice is on the air: carol hears her (on a loaded machine that can
    // take longer than any fixed wait).
    next_matching(&mut carol_ev, |e| match e {
        Event::FirstPacket { id, .. } if id == long.id => Some(()),
        _ => None,
    })
    .await;
    let urgent = channel_clip("ops", 5);
    chief.send_clip(&urgent, Pacing::Upload).await.unwrap();
    let (code, _) = rejected(talking.await.unwrap());
    assert_eq!(code, ErrorCode::Preempted);
    // Carol was told Alice's clip was cut, and has the chief's (the two
    // come on separate streams, in either order).
    let (mut cut, mut got) = (None, None);
    while cut.is_none() || got.is_none() {
        match next_matching(&mut carol_ev, |e| match e {
            Event::Cut { id, .. } if id == long.id => Some(e),
            Event::Complete(_) => Some(e),
            _ => None,
        })
        .await
        {
            Event::Cut { code, .. } => cut = Some(code),
            Event::Complete(c) => got = Some(c),
            _ => {}
        }
    }
    assert_eq!(cut, Some(ErrorCode::Preempted));
    let got = got.unwrap();
    assert_eq!(got.id(), urgent.id);
    assert_eq!(got.delivery.sender, "chief");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rights_are_enforced() {
    let t = start(|_| {}).await;
    let (alice, _) = t.member("alice", &[("ops", Talk)]).await;
    let (lurker, _) = t.member("lurker", &[("ops", Listen)]).await;
    let (outsider, mut outsider_ev) = t.member("outsider", &[("other", Talk)]).await;
    let (code, _) = rejected(
        lurker
            .send_clip(&channel_clip("ops", 3), Pacing::Upload)
            .await,
    );
    assert_eq!(code, ErrorCode::NotAllowed, "listen only");
    let (code, _) = rejected(
        outsider
            .send_clip(&channel_clip("ops", 3), Pacing::Upload)
            .await,
    );
    assert_eq!(code, ErrorCode::NotAllowed, "not a member");
    alice
        .send_clip(&channel_clip("ops", 3), Pacing::Upload)
        .await
        .unwrap();
    assert_no_clip(&mut outsider_ev, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiners_get_what_they_missed_in_order_once() {
    let t = start(|c| c.channel_history_depth = 3).await;
    let (alice, _) = t.member("alice", &[("ops", Talk)]).await;
    let (_carol, mut carol_ev) = t.member("carol", &[("ops", Listen)]).await;
    // Dave is offline while Alice says four things.
    let said = say_four(&alice).await;
    for c in &said {
        let got = next_complete(&mut carol_ev).await;
        assert_eq!(got.id(), c.id, "online members in order");
    }
    // Dave connects: the last three (the history's depth), oldest first.
    let (dave, mut dave_ev) = t.member("dave", &[("ops", Listen)]).await;
    let order = take_in_stream_order(&dave, &mut dave_ev, 3).await;
    let want: Vec<_> = said[1..].iter().map(|c| c.id).collect();
    assert_eq!(order, want);
    assert_no_clip(&mut dave_ev, Duration::from_millis(300)).await;
    // Once: a reconnect replays nothing more.
    dave.shutdown().await;
    let (_dave, mut dave_ev) = t.member("dave", &[("ops", Listen)]).await;
    assert_no_clip(&mut dave_ev, Duration::from_millis(500)).await;
    // A user without the channel gets none of it.
    let (_eve, mut eve_ev) = t.member("eve", &[("other", Listen)]).await;
    assert_no_clip(&mut eve_ev, Duration::from_millis(300)).await;
}

/// A member who was away gets what was said to it and in its channels in
/// the order the relay accepted it: the channel history it missed is
/// merged with the clips waiting for it, not queued behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_member_gets_direct_clips_and_history_in_acceptance_order() {
    for store in [
        relay::config::StoreKind::Memory,
        relay::config::StoreKind::Disk,
    ] {
        let t = start(|c| c.store = store).await;
        let (alice, _) = t.member("alice", &[("ops", Talk)]).await;
        let (bob, _) = t.member("bob", &[("ops", Talk)]).await;
        // Dave is offline: a clip to him, one to the channel, one to him.
        let said = [clip("dave", 3), channel_clip("ops", 4), clip("dave", 5)];
        alice.send_clip(&said[0], Pacing::Upload).await.unwrap();
        bob.send_clip(&said[1], Pacing::Upload).await.unwrap();
        alice.send_clip(&said[2], Pacing::Upload).await.unwrap();
        let (dave, mut dave_ev) = t.member("dave", &[("ops", Listen)]).await;
        let opened = take_in_stream_order(&dave, &mut dave_ev, said.len()).await;
        let want: Vec<_> = said.iter().map(|c| c.id).collect();
        assert_eq!(
            opened, want,
            "{store:?} store: stream order is acceptance order"
        );
        assert_no_clip(&mut dave_ev, Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_older_than_its_age_is_not_replayed() {
    let t = start(|c| c.channel_history_age = Duration::from_millis(200)).await;
    let (alice, _) = t.member("alice", &[("ops", Talk)]).await;
    alice
        .send_clip(&channel_clip("ops", 3), Pacing::Upload)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_dave, mut dave_ev) = t.member("dave", &[("ops", Listen)]).await;
    assert_no_clip(&mut dave_ev, Duration::from_millis(500)).await;
    // A fresh one is replayed to the next member who connects.
    let c = channel_clip("ops", 3);
    alice.send_clip(&c, Pacing::Upload).await.unwrap();
    let (_erin, mut erin_ev) = t.member("erin", &[("ops", Listen)]).await;
    assert_eq!(next_complete(&mut erin_ev).await.id(), c.id);
}

/// With the disk store, channel history and members' cursors survive a
/// restart: a member who was offline gets what it missed (within the
/// depth), in order, once; one who already had it gets nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_cursors_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let depth = |c: &mut relay::Config| c.channel_history_depth = 3;
    let said;
    {
        let t = start_in(dir.path(), depth).await;
        let (alice, _) = t.member("alice", &[("ops", Talk)]).await;
        let (carol, mut carol_ev) = t.member("carol", &[("ops", Listen)]).await;
        said = say_four(&alice).await;
        for c in &said {
            let got = next_complete(&mut carol_ev).await;
            assert_eq!(got.id(), c.id);
            carol.ack(got.id()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        t.relay.shutdown().await;
    }
    // Restarted: Dave, offline all along, gets the last three in order.
    {
        let t = start_in(dir.path(), depth).await;
        let (dave, mut dave_ev) = t.member("dave", &[("ops", Listen)]).await;
        let mut got = Vec::new();
        while got.len() < 3 {
            let c = next_complete(&mut dave_ev).await;
            dave.ack(c.id()).await.unwrap();
            got.push(c.id());
        }
        let want: Vec<_> = said[1..].iter().map(|c| c.id).collect();
        let mut sorted = got.clone();
        sorted.sort_by_key(|id| want.iter().position(|w| w == id));
        assert_eq!(sorted, want, "the history's last three");
        assert_no_clip(&mut dave_ev, Duration::from_millis(300)).await;
        // Carol heard them all before the restart: nothing again.
        let (_carol, mut carol_ev) = t.member("carol", &[("ops", Listen)]).await;
        assert_no_clip(&mut carol_ev, Duration::from_millis(500)).await;
        dave.shutdown().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        t.relay.shutdown().await;
    }
    // Once more: Dave's cursor survived too.
    let t = start_in(dir.path(), depth).await;
    let (_dave, mut dave_ev) = t.member("dave", &[("ops", Listen)]).await;
    assert_no_clip(&mut dave_ev, Duration::from_millis(500)).await;
}

/// Members who connect while a channel clip is spoken hear it live, once.
/// They were not among its recipients at the press, so a copy is queued
/// for them when it is stored; heard live and acked before that (its end
/// reaches them as its commit starts), that copy is released, never sent
/// again on the same connection. (A load run of 1 talker → 999 members
/// found ~500 such second deliveries of a first clip.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_who_join_while_a_clip_is_spoken_hear_it_once() {
    // Acks at once, not held: the race at its widest.
    let t = start(|c| c.ack_batch = 1).await;
    let (alice, _) = t.member("alice", &[("ops", Talk)]).await;
    let c = channel_clip("ops", 25);
    let talking = {
        let (alice, c) = (alice.clone(), c.clone());
        tokio::spawn(async move { alice.send_clip(&c, Pacing::Live).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut heard = Vec::new();
    for i in 0..8 {
        let (m, mut ev) = t.member(&format!("m{i}"), &[("ops", Listen)]).await;
        heard.push(tokio::spawn(async move {
            let (mut whole, mut again) = (0, 0);
            let quiet = tokio::time::sleep(Duration::from_secs(3));
            tokio::pin!(quiet);
            loop {
                tokio::select! {
                    e = ev.recv() => match e {
                        Some(Event::Complete(clip)) => {
                            whole += 1;
                            m.ack(clip.id()).await.unwrap();
                        }
                        Some(Event::Redelivered { .. }) => again += 1,
                        Some(_) => {}
                        None => break,
                    },
                    () = &mut quiet => break,
                }
            }
            (whole, again)
        }));
    }
    talking.await.unwrap().unwrap();
    for h in heard {
        assert_eq!(h.await.unwrap(), (1, 0), "heard once, and not again");
    }
    assert_eq!(t.settle_pending(0).await, 0, "every copy released");
}
