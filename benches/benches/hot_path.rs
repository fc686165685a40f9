//! The per-packet and per-clip work of the relay: decoding what senders
//! write, validating packet records, and the store's append/read/ack.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use codec::wire::{AudioFormat, ClipHeader, ClipId, Message, Target};
use codec::{ClipEnd, FrameLimits, Framer};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use relay::testing::{ClipMeta, ClipStore, MemoryStore, StoredClip};

fn header() -> Message {
    Message::ClipHeader(ClipHeader {
        clip_id: ClipId([7; 16]),
        target: Target::User("bob@example".into()),
        format: AudioFormat::default(),
    })
}

/// One second of 16 kbit/s voice: 50 packets of 40 bytes, as records.
fn records() -> Bytes {
    let mut b = BytesMut::new();
    for i in 0..50u8 {
        let mut p = [i; 40];
        p[0] = 31 << 3;
        codec::framing::put_packet(&mut b, &p);
    }
    ClipEnd {
        packet_count: 50,
        final_granule: 48_000,
    }
    .encode(&mut b);
    b.freeze()
}

fn wire(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire");
    let h = header();
    g.bench_function("encode_clip_header", |b| {
        let mut buf = BytesMut::with_capacity(128);
        b.iter(|| {
            buf.clear();
            black_box(&h).encode(&mut buf);
        })
    });
    let bytes = h.to_bytes();
    g.bench_function("decode_clip_header", |b| {
        b.iter(|| Message::decode(black_box(&bytes), 65536).unwrap())
    });
    g.bench_function("encode_packet_record", |b| {
        let p = [9u8; 40];
        let mut buf = BytesMut::with_capacity(64);
        b.iter(|| {
            buf.clear();
            codec::framing::put_packet(&mut buf, black_box(&p));
        })
    });
    let recs = records();
    g.throughput(Throughput::Elements(50));
    g.bench_function("scan_1s_of_packets", |b| {
        b.iter(|| {
            let mut f = Framer::new(FrameLimits::new(1275, 1 << 20, 60_000));
            f.scan(black_box(&recs)).unwrap()
        })
    });
    g.finish();
}

fn clip(n: u64) -> Arc<StoredClip> {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_be_bytes());
    let meta = Arc::new(ClipMeta {
        id: ClipId(id),
        sender: "alice".into(),
        target: Target::User("bob".into()),
        format: AudioFormat::default(),
        created_ms: 0,
    });
    Arc::new(StoredClip::new(
        meta,
        records(),
        ClipEnd {
            packet_count: 50,
            final_granule: 48_000,
        },
    ))
}

fn store(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("store");
    let recipients: Vec<Arc<str>> = vec!["bob".into()];
    let s = MemoryStore::new(u64::MAX);
    let mut n = 0u64;
    g.bench_function("append_read_ack", |b| {
        b.iter(|| {
            n += 1;
            let c = clip(n);
            rt.block_on(async {
                s.append(c.clone(), &recipients).await.unwrap();
                let got = s.read("bob", 0, 1).await.unwrap();
                s.ack("bob", &got[0].1.meta.id).await.unwrap();
            })
        })
    });
    // The same under contention: 2 threads, disjoint recipients.
    g.bench_function("append_read_ack_2_threads", |b| {
        let s = Arc::new(MemoryStore::new(u64::MAX));
        b.iter_custom(|iters| {
            let start = std::time::Instant::now();
            std::thread::scope(|sc| {
                for t in 0..2u64 {
                    let s = s.clone();
                    sc.spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .build()
                            .unwrap();
                        let who: Arc<str> = format!("user{t}").into();
                        for i in 0..iters {
                            let c = clip((t << 40) | i);
                            rt.block_on(async {
                                s.append(c.clone(), std::slice::from_ref(&who))
                                    .await
                                    .unwrap();
                                s.ack(&who, &c.meta.id).await.unwrap();
                            });
                        }
                    });
                }
            });
            // Time per operation pair, both threads together.
            start.elapsed() / 2
        })
    });
    g.finish();
    rt.block_on(async {
        s.expire(0, u64::MAX).await.unwrap();
    });
}

/// Routing one packet of a live clip to N recipients: one push into the
/// shared `LiveClip`, then every recipient's reader takes it (no copy: each
/// gets the same `Bytes`). Time per packet for all N.
fn routing(c: &mut Criterion) {
    use relay::testing::{LiveClip, Next};
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("route_packet");
    let packet = {
        let mut b = BytesMut::new();
        let mut p = [7u8; 40];
        p[0] = 31 << 3;
        codec::framing::put_packet(&mut b, &p);
        b.freeze()
    };
    for n in [1usize, 10, 100, 1000] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("to_{n}_recipients"), |b| {
            let live = LiveClip::new(clip(0).meta.clone());
            let mut readers: Vec<_> = (0..n).map(|_| live.reader()).collect();
            b.iter(|| {
                live.push(packet.clone(), 1).expect("an unpoisoned clip");
                rt.block_on(async {
                    for r in &mut readers {
                        match r.next().await {
                            Next::Data(segs) => {
                                black_box(segs);
                            }
                            _ => unreachable!(),
                        }
                    }
                });
            })
        });
    }
    g.finish();
}

criterion_group!(benches, wire, store, routing);
criterion_main!(benches);
