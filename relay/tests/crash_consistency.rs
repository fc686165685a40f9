//! Crash consistency of the durable store: a simulated disk keeps what was
//! synced and loses or tears what was not. The store runs appends and acks
//! (with tiny segments, so segments are rotated, deleted and compacted
//! throughout) while "power" is cut at random points; the disk image at
//! the cut (synced bytes, plus a random part of the unsynced writes, the
//! last one torn; directory changes not yet synced kept or lost) is
//! reopened (dead segment files are recycled: written again from their
//! start under a new number, the old bytes after the new ones). Every clip the store had acknowledged before the cut must be
//! there, byte for byte and in order; no clip whose ack was synced before
//! the cut may come back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use codec::ClipEnd;
use codec::wire::{AudioFormat, ClipId, Target};
use rand::{Rng, SeedableRng};
use relay::testing::{Appended, ClipMeta, ClipStore, StoredClip};
use relay::testing::{DiskStore, LogOptions};
use relay::testing::{LogDir, LogFile};

/// One simulated file.
#[derive(Debug, Default, Clone)]
struct File {
    /// What reads see.
    now: Vec<u8>,
    /// What survives a power cut for sure: the bytes at the last sync.
    synced: Vec<u8>,
    /// Writes since the last sync, in order: (offset, bytes).
    unsynced: Vec<(usize, Vec<u8>)>,
}

/// Writes `data` into `b` at `at` (overwriting, growing as needed).
fn write_at(b: &mut Vec<u8>, at: usize, data: &[u8]) {
    if b.len() < at + data.len() {
        b.resize(at + data.len(), 0);
    }
    b[at..at + data.len()].copy_from_slice(data);
}

#[derive(Debug, Default)]
struct Dir {
    /// Names in the directory now, each naming a file (by number).
    names: BTreeMap<String, u64>,
    /// Every file ever created (a handle keeps writing to its file after a
    /// rename, as on a real file system).
    data: BTreeMap<u64, File>,
    next: u64,
    /// Names as of the last directory sync, with the file each named
    /// (creations, renames and removals since then may or may not survive
    /// a cut).
    durable: BTreeMap<String, u64>,
    /// Files removed, ever (the test checks segments were deleted).
    removals: u64,
    /// Files written again from their start (recycled segments), ever.
    reuses: u64,
}

/// A log directory on a simulated disk that keeps what was synced and
/// loses or tears what was not.
#[derive(Debug, Clone, Default)]
struct SimDir(Arc<Mutex<Dir>>);

impl SimDir {
    fn from_image(image: BTreeMap<String, Vec<u8>>) -> Self {
        let mut d = Dir::default();
        for (name, b) in image {
            d.next += 1;
            d.names.insert(name.clone(), d.next);
            d.durable.insert(name, d.next);
            d.data.insert(
                d.next,
                File {
                    now: b.clone(),
                    synced: b,
                    unsynced: Vec::new(),
                },
            );
        }
        SimDir(Arc::new(Mutex::new(d)))
    }

    /// The disk after a power cut now: each file's synced bytes, then the
    /// first `k` of its unsynced writes (`k` random), the last of them
    /// torn at a random byte; directory changes since the last directory
    /// sync survive or not, each at random.
    fn cut(&self, rng: &mut impl Rng) -> BTreeMap<String, Vec<u8>> {
        let d = self.0.lock().unwrap();
        let content = |id: u64, rng: &mut dyn rand::RngCore| {
            let f = &d.data[&id];
            let mut b = f.synced.clone();
            let k = rng.random_range(0..=f.unsynced.len());
            for (i, (at, data)) in f.unsynced[..k].iter().enumerate() {
                let data = if i + 1 == k {
                    &data[..rng.random_range(0..=data.len())]
                } else {
                    &data[..]
                };
                write_at(&mut b, *at, data);
            }
            b
        };
        let mut img = BTreeMap::new();
        let names: BTreeSet<&String> = d.names.keys().chain(d.durable.keys()).collect();
        for name in names {
            let now = d.names.get(name);
            let then = d.durable.get(name);
            // Unchanged since the last directory sync: as it is. Created,
            // renamed or removed since: the new state or the old one.
            let id = if now == then || rng.random_bool(0.5) {
                now
            } else {
                then
            };
            if let Some(id) = id {
                img.insert(name.clone(), content(*id, rng));
            }
        }
        img
    }
}

/// A handle: the directory, the file's number, where the next write goes.
struct SimFile(SimDir, u64, usize);

impl LogFile for SimFile {
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        let mut d = (self.0).0.lock().unwrap();
        let f = d.data.get_mut(&self.1).ok_or(io::ErrorKind::NotFound)?;
        write_at(&mut f.now, self.2, data);
        f.unsynced.push((self.2, data.to_vec()));
        self.2 += data.len();
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        let mut d = (self.0).0.lock().unwrap();
        let f = d.data.get_mut(&self.1).ok_or(io::ErrorKind::NotFound)?;
        f.synced = f.now.clone();
        f.unsynced.clear();
        Ok(())
    }
}

impl LogDir for SimDir {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.0.lock().unwrap().names.keys().cloned().collect())
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        let d = self.0.lock().unwrap();
        let id = d.names.get(name).ok_or(io::ErrorKind::NotFound)?;
        Ok(d.data[id].now.clone())
    }

    fn create(&self, name: &str) -> io::Result<Box<dyn LogFile>> {
        let mut d = self.0.lock().unwrap();
        d.next += 1;
        let id = d.next;
        d.data.insert(id, File::default());
        d.names.insert(name.to_owned(), id);
        Ok(Box::new(SimFile(self.clone(), id, 0)))
    }

    fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        let id = *d.names.get(name).ok_or(io::ErrorKind::NotFound)?;
        let f = d.data.get_mut(&id).ok_or(io::ErrorKind::NotFound)?;
        f.now.truncate(len as usize);
        f.synced = f.now.clone();
        f.unsynced.clear();
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        d.names.remove(name).ok_or(io::ErrorKind::NotFound)?;
        d.removals += 1;
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        let id = d.names.remove(from).ok_or(io::ErrorKind::NotFound)?;
        d.names.insert(to.to_owned(), id);
        Ok(())
    }

    fn reuse(&self, from: &str, to: &str) -> io::Result<Box<dyn LogFile>> {
        self.rename(from, to)?;
        let id = self.0.lock().unwrap().names[to];
        self.0.lock().unwrap().reuses += 1;
        Ok(Box::new(SimFile(self.clone(), id, 0)))
    }

    fn sync(&self) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        d.durable = d.names.clone();
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
            created_ms: relay::testing::now_ms(),
        }),
        Bytes::from(body),
        ClipEnd {
            packet_count: u64::from(packets),
            final_granule: u64::from(packets) * 960,
        },
    ))
}

fn opts() -> LogOptions {
    LogOptions {
        segment_bytes: 1500,
        sealed_segments: 2,
        ids_file_bytes: 400,
        // One spare: some dead segments are recycled, others removed.
        spare_segments: 1,
        // Commit at once: batches still form from concurrent appends, and
        // a thousand runs do not wait out the interval.
        commit_interval: std::time::Duration::ZERO,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_synced_clip_survives_a_power_cut_anywhere() {
    let recipients: Vec<Arc<str>> = vec!["bob".into(), "carol".into()];
    let (mut removals, mut reuses) = (0, 0);
    for seed in 0..1000u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let disk = SimDir::default();
        let (store, _) = DiskStore::open_with(Arc::new(disk.clone()), u64::MAX, opts()).unwrap();
        let store = Arc::new(store);
        let total = rng.random_range(5..80u32);
        let cut_after = rng.random_range(0..total);
        let mut accepted: Vec<Arc<StoredClip>> = Vec::new();
        // Clips carol acked (maybe not yet on disk), and those whose ack
        // was synced.
        let mut carol_acked: BTreeSet<ClipId> = BTreeSet::new();
        let mut carol_synced: BTreeSet<ClipId> = BTreeSet::new();
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
            // Most clips are delivered to both soon (so segments die and
            // are deleted); some wait (so old segments get compacted).
            for c in &accepted {
                if !carol_acked.contains(&c.meta.id) && rng.random_bool(0.4) {
                    store.ack("bob", &c.meta.id).await.unwrap();
                    store.ack("carol", &c.meta.id).await.unwrap();
                    carol_acked.insert(c.meta.id);
                }
            }
            if rng.random_bool(0.3) {
                store.sync().await;
                carol_synced.clone_from(&carol_acked);
            }
            if image.is_none() && n > cut_after {
                // Power cut: what the store acknowledged so far is owed.
                image = Some((disk.cut(&mut rng), accepted.clone(), carol_synced.clone()));
            }
        }
        store.close().await;
        removals += disk.0.lock().unwrap().removals;
        reuses += disk.0.lock().unwrap().reuses;
        let (image, accepted_then, synced_then) = image.expect("a cut was taken");
        let (back, rec) =
            DiskStore::open_with(Arc::new(SimDir::from_image(image)), u64::MAX, opts())
                .unwrap_or_else(|e| panic!("seed {seed}: the store does not reopen: {e}"));
        assert_eq!(rec.damaged, 0, "seed {seed}");
        let carol: Vec<_> = back.read("carol", 0, 1000).await.unwrap();
        for c in &accepted_then {
            let got = carol.iter().find(|(_, g)| g.meta.id == c.meta.id);
            if carol_acked.contains(&c.meta.id) {
                // Acked later, or before the cut: gone or not, but never
                // back once its ack was synced.
                if synced_then.contains(&c.meta.id) {
                    assert!(got.is_none(), "seed {seed}: a synced ack came undone");
                }
                continue;
            }
            let got = got.unwrap_or_else(|| panic!("seed {seed}: accepted clip lost"));
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
        // Retries of every clip accepted before the cut are still known.
        for c in &accepted_then {
            assert_eq!(
                back.append(c.clone(), &recipients).await,
                Ok(Appended::Duplicate),
                "seed {seed}: a retry would be delivered again"
            );
        }
        back.close().await;
    }
    assert!(
        removals > 100 && reuses > 100,
        "segments were deleted ({removals}) and recycled ({reuses}) along the way"
    );
}
