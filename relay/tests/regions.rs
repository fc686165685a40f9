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
use common::nats::NatsCluster;
use futures_util::StreamExt;

fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_outlives_the_other_regions_death() {
    let leaf = free_ports(3);
    let mut a = NatsCluster::start_from("deploy/regions/nats-first.conf", |i| {
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
