//! Crash consistency of the durable store: a simulated disk keeps what was
//! synced and loses or tears what was not. The store runs appends and acks
//! while "power" is cut at random points; the disk image at the cut (synced
//! bytes, plus a random part of the unsynced writes, the last one torn) is
//! reopened, and every clip the store had acknowledged before the cut must
//! be there, byte for byte.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use codec::ClipEnd;
use codec::wire::{AudioFormat, ClipId, Target};
use rand::{Rng, SeedableRng};
use relay::disk_store::DiskStore;
use relay::store::{Appended, ClipMeta, ClipStore, StoredClip};

#[derive(Debug, Default)]
struct Disk {
    /// What reads see.
    now: Vec<u8>,
    /// What survives a power cut for sure: the bytes at the last sync.
    synced: Vec<u8>,
    /// Writes since the last sync, in order.
    unsynced: Vec<(u64, Vec<u8>)>,
}

/// A redb storage backend on a simulated disk.
#[derive(Debug, Clone, Default)]
struct SimDisk(Arc<Mutex<Disk>>);

impl SimDisk {
    fn from_image(image: Vec<u8>) -> Self {
        SimDisk(Arc::new(Mutex::new(Disk {
            now: image.clone(),
            synced: image,
            unsynced: Vec::new(),
        })))
    }

    /// The disk after a power cut now: synced bytes, then the first `k` of
    /// the unsynced writes (`k` random), the last of them torn at a random
    /// byte.
    fn cut(&self, rng: &mut impl Rng) -> Vec<u8> {
        let d = self.0.lock().unwrap();
        let mut img = d.synced.clone();
        let k = rng.random_range(0..=d.unsynced.len());
        for (i, (off, data)) in d.unsynced[..k].iter().enumerate() {
            let data = if i + 1 == k {
                &data[..rng.random_range(0..=data.len())]
            } else {
                &data[..]
            };
            let end = *off as usize + data.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            img[*off as usize..end].copy_from_slice(data);
        }
        img
    }
}

impl redb::StorageBackend for SimDisk {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.0.lock().unwrap().now.len() as u64)
    }

    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, io::Error> {
        let d = self.0.lock().unwrap();
        let mut out = vec![0u8; len];
        let start = (offset as usize).min(d.now.len());
        let end = (offset as usize + len).min(d.now.len());
        out[..end - start].copy_from_slice(&d.now[start..end]);
        Ok(out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut d = self.0.lock().unwrap();
        // Until a sync, a crash keeps the synced size (`cut` starts from
        // the synced image).
        d.now.resize(len as usize, 0);
        Ok(())
    }

    fn sync_data(&self, _eventual: bool) -> Result<(), io::Error> {
        let mut d = self.0.lock().unwrap();
        d.synced = d.now.clone();
        d.unsynced.clear();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut d = self.0.lock().unwrap();
        let end = offset as usize + data.len();
        if d.now.len() < end {
            d.now.resize(end, 0);
        }
        d.now[offset as usize..end].copy_from_slice(data);
        d.unsynced.push((offset, data.to_vec()));
        Ok(())
    }
}

fn clip(n: u32, rng: &mut impl Rng) -> Arc<StoredClip> {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&n.to_be_bytes());
    let packets = rng.random_range(1..20u32);
    let mut body = Vec::new();
    for _ in 0..packets {
        let len = rng.random_range(2..120usize);
        let mut p = vec![31 << 3];
        p.extend((1..len).map(|_| rng.random::<u8>()));
        codec::framing::put_packet(&mut body, &p);
    }
    Arc::new(StoredClip::new(
        Arc::new(ClipMeta {
            id: ClipId(id),
            sender: "alice".into(),
            target: Target::User("bob".into()),
            format: AudioFormat::default(),
            created_ms: relay::now_ms(),
        }),
        Bytes::from(body),
        ClipEnd {
            packet_count: u64::from(packets),
            final_granule: u64::from(packets) * 960,
        },
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_synced_clip_survives_a_power_cut_anywhere() {
    let recipients: Vec<Arc<str>> = vec!["bob".into(), "carol".into()];
    for seed in 0..25u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let disk = SimDisk::default();
        let (store, _) = DiskStore::open_with_backend(disk.clone(), u64::MAX).unwrap();
        let store = Arc::new(store);
        let total = rng.random_range(5..60u32);
        let cut_after = rng.random_range(0..total);
        let mut accepted: Vec<Arc<StoredClip>> = Vec::new();
        let mut acked: Vec<ClipId> = Vec::new();
        let mut image = None;
        let mut n = 0;
        // Which batch of concurrent appends each clip was in.
        let mut batch_of = std::collections::HashMap::new();
        let mut batch = 0u32;
        while n < total {
            // A few appends at once, so commits batch.
            let k = rng.random_range(1..5u32).min(total - n);
            let clips: Vec<_> = (0..k).map(|i| clip(n + i, &mut rng)).collect();
            for c in &clips {
                batch_of.insert(c.meta.id, batch);
            }
            batch += 1;
            n += k;
            let mut tasks = Vec::new();
            for c in &clips {
                let (s, c, r) = (store.clone(), c.clone(), recipients.clone());
                tasks.push(tokio::spawn(async move { s.append(c, &r).await }));
            }
            for (t, c) in tasks.into_iter().zip(clips) {
                assert_eq!(t.await.unwrap(), Ok(Appended::New));
                accepted.push(c);
            }
            if rng.random_bool(0.3)
                && let Some(c) = accepted.first()
            {
                store.ack("bob", &c.meta.id).await.unwrap();
                acked.push(c.meta.id);
            }
            if image.is_none() && n > cut_after {
                // Power cut: what the store acknowledged so far is owed.
                image = Some((disk.cut(&mut rng), accepted.clone()));
            }
        }
        store.close().await;
        let (image, owed) = image.expect("a cut was taken");
        let (back, rec) = DiskStore::open_with_backend(SimDisk::from_image(image), u64::MAX)
            .unwrap_or_else(|e| panic!("seed {seed}: the store does not reopen: {e}"));
        assert_eq!(rec.damaged, 0, "seed {seed}");
        let carol: Vec<_> = back.read("carol", 0, 1000).await.unwrap();
        for c in &owed {
            let got = carol
                .iter()
                .find(|(_, g)| g.meta.id == c.meta.id)
                .unwrap_or_else(|| panic!("seed {seed}: accepted clip lost"));
            assert_eq!(got.1.body, c.body, "seed {seed}: bytes differ");
            assert_eq!(got.1.end, c.end);
        }
        // Order survives: a clip accepted after another (not concurrently)
        // comes after it.
        let batches: Vec<u32> = carol.iter().map(|(_, c)| batch_of[&c.meta.id]).collect();
        assert!(
            batches.windows(2).all(|w| w[0] <= w[1]),
            "seed {seed}: {batches:?}"
        );
        back.close().await;
    }
}
