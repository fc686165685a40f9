//! The durable store: every clip on local disk in a redb database
//! (`DATA_DIR/clips.redb`) before the sender hears "accepted", with the hot
//! path in memory: a [`MemoryStore`] holds every undelivered clip, so reads
//! never touch the disk.
//!
//! One committer thread owns the write side. Appends and acks queue to it;
//! it takes everything queued, writes it in one transaction and syncs once
//! (group commit), then answers every waiting append. So durability costs
//! one fsync per batch, not per clip.
//!
//! Why redb: an embedded, pure-Rust, ACID key-value store with
//! copy-on-write B-trees and checksummed commits: a crash or a torn write
//! leaves the last committed state, which is what "accepted" promised. Its
//! single writer matches the committer; it needs no background compaction
//! (deleted clips' pages are reused).
//!
//! Tables: `clips` (id → the clip), `refs` (id → recipients still owed it,
//! when more than one),
//! `mailbox` ((recipient, id) → (order, created_ms)), `ids` (id →
//! (accepted_ms, sender), for the dedupe window).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use codec::wire::ClipId;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::store::{Appended, ClipStore, Cursor, MemoryStore, StoreError, StoreStats, StoredClip};

const CLIPS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("clips");
const REFS: TableDefinition<&[u8], u64> = TableDefinition::new("refs");
const MAILBOX: TableDefinition<(&str, &[u8]), (u64, u64)> = TableDefinition::new("mailbox");
const IDS: TableDefinition<&[u8], (u64, &str)> = TableDefinition::new("ids");

/// Most operations one commit takes.
const MAX_BATCH: usize = 1024;
/// Operations waiting for the committer, at most (appends wait when full).
const QUEUE: usize = 4096;

/// Where the committer answers an operation.
type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Op {
    Put {
        clip: Arc<StoredClip>,
        recipients: Vec<Arc<str>>,
        reply: Reply<Appended>,
    },
    Ack {
        recipient: Arc<str>,
        id: ClipId,
    },
    /// One more recipient for a stored (or history) clip.
    AddCopy {
        clip: Arc<StoredClip>,
        recipient: Arc<str>,
        reply: Reply<Appended>,
    },
    Expire {
        before_ms: u64,
        forget_ids_before_ms: u64,
        reply: Reply<u64>,
    },
    /// Answered once everything queued before it is on disk.
    Sync(Reply<()>),
    /// Like `Sync`, then the committer closes the database and stops.
    Close(Reply<()>),
}

/// Whether redb says the file itself is unreadable (not a transient I/O
/// failure).
fn damaged(e: &redb::StorageError) -> bool {
    match e {
        redb::StorageError::Corrupted(_) => true,
        redb::StorageError::Io(io) => io.kind() == std::io::ErrorKind::InvalidData,
        _ => false,
    }
}

/// What recovery found on open.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    pub clips: u64,
    pub copies: u64,
    pub ids: u64,
    /// Records that could not be read back (damaged): skipped.
    pub damaged: u64,
}

pub struct DiskStore {
    mem: MemoryStore,
    ops: mpsc::Sender<Op>,
}

fn failed(e: impl std::fmt::Display) -> StoreError {
    StoreError::Failed(e.to_string())
}

impl DiskStore {
    /// Opens (or creates) the database in `dir` and loads every undelivered
    /// clip into memory.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Self, Recovered), StoreError> {
        let path = dir.join("clips.redb");
        let db = match Database::create(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::Storage(e)) if damaged(&e) => {
                let why = e.to_string();
                // Nothing in it can be read: keep it for inspection and
                // start with an empty store rather than not at all.
                let aside = dir.join(format!("clips.redb.damaged-{}", crate::now_ms()));
                std::fs::rename(&path, &aside).map_err(failed)?;
                tracing::error!(
                    file = %aside.display(),
                    %why,
                    "the clip store is damaged beyond repair: moved aside, starting empty"
                );
                Database::create(&path)
                    .map_err(|e| failed(format!("opening {}: {e}", path.display())))?
            }
            Err(e) => return Err(failed(format!("opening {}: {e}", path.display()))),
        };
        Self::with_database(db, max_bytes)
    }

    /// Opens the store on any redb storage backend (tests simulate crashes
    /// with one).
    pub fn open_with_backend(
        backend: impl redb::StorageBackend,
        max_bytes: u64,
    ) -> Result<(Self, Recovered), StoreError> {
        let db = Database::builder()
            .create_with_backend(backend)
            .map_err(|e| failed(format!("opening the store: {e}")))?;
        Self::with_database(db, max_bytes)
    }

    fn with_database(db: Database, max_bytes: u64) -> Result<(Self, Recovered), StoreError> {
        let mem = MemoryStore::new(max_bytes);
        let rec = recover(&db, &mem)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || committer(db, rx))
            .map_err(failed)?;
        Ok((Self { mem, ops: tx }, rec))
    }

    /// Waits until every operation queued so far is on disk.
    pub async fn sync(&self) {
        let _ = self.call(Op::Sync).await;
    }

    /// Writes what is queued, closes the database and stops the committer
    /// (later operations fail). For shutdown, and for reopening in tests.
    pub async fn close(&self) {
        let _ = self.call(Op::Close).await;
    }

    /// Queues an operation for the committer.
    async fn queue(&self, op: Op) -> Result<(), StoreError> {
        self.ops
            .send(op)
            .await
            .map_err(|_| failed("store committer stopped"))
    }

    /// Queues an operation and waits for the committer's answer.
    async fn call<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.queue(op(tx)).await?;
        rx.await.map_err(|_| failed("store committer stopped"))?
    }
}

fn recover(db: &Database, mem: &MemoryStore) -> Result<Recovered, StoreError> {
    let mut rec = Recovered::default();
    let txn = db.begin_write().map_err(failed)?;
    {
        // Create the tables on first open.
        txn.open_table(CLIPS).map_err(failed)?;
        txn.open_table(REFS).map_err(failed)?;
        txn.open_table(MAILBOX).map_err(failed)?;
        txn.open_table(IDS).map_err(failed)?;
    }
    txn.commit().map_err(failed)?;
    let txn = db.begin_read().map_err(failed)?;
    let ids = txn.open_table(IDS).map_err(failed)?;
    let mut id_list = Vec::new();
    for row in ids.iter().map_err(failed)? {
        let (k, v) = row.map_err(failed)?;
        let Ok(id) = <[u8; 16]>::try_from(k.value()) else {
            rec.damaged += 1;
            continue;
        };
        let (at, sender) = v.value();
        id_list.push((at, ClipId(id), Arc::<str>::from(sender)));
    }
    id_list.sort_by_key(|(at, _, _)| *at);
    for (at, id, sender) in id_list {
        mem.restore_id(id, sender, at);
        rec.ids += 1;
    }
    let clips = txn.open_table(CLIPS).map_err(failed)?;
    let mut loaded: HashMap<[u8; 16], Arc<StoredClip>> = HashMap::new();
    for row in clips.iter().map_err(failed)? {
        let (k, v) = row.map_err(failed)?;
        match (
            <[u8; 16]>::try_from(k.value()),
            StoredClip::from_record(v.value()),
        ) {
            (Ok(id), Some(c)) if c.meta.id.0 == id => {
                loaded.insert(id, Arc::new(c));
                rec.clips += 1;
            }
            _ => {
                warn!("damaged clip record in the store: skipped");
                rec.damaged += 1;
            }
        }
    }
    let mailbox = txn.open_table(MAILBOX).map_err(failed)?;
    let mut copies: Vec<(u64, Arc<str>, Arc<StoredClip>)> = Vec::new();
    for row in mailbox.iter().map_err(failed)? {
        let (k, v) = row.map_err(failed)?;
        let (recipient, id) = k.value();
        let (order, _) = v.value();
        match <[u8; 16]>::try_from(id).ok().and_then(|id| loaded.get(&id)) {
            Some(c) => copies.push((order, Arc::from(recipient), c.clone())),
            None => rec.damaged += 1,
        }
    }
    copies.sort_by_key(|(order, _, _)| *order);
    for (_, r, c) in copies {
        mem.restore_copy(r, c);
        rec.copies += 1;
    }
    if rec.clips > 0 || rec.damaged > 0 {
        info!(
            clips = rec.clips,
            copies = rec.copies,
            damaged = rec.damaged,
            "store recovered"
        );
    }
    Ok(rec)
}

/// The committer thread: batches queued operations into one transaction.
fn committer(db: Database, mut rx: mpsc::Receiver<Op>) {
    let mut order = next_order(&db).unwrap_or(1);
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        crate::metrics::hot().store_batch.record(batch.len() as f64);
        let mut replies = Vec::new();
        let mut expiries = Vec::new();
        let mut syncs = Vec::new();
        let mut closes = Vec::new();
        let result = (|| -> Result<(), StoreError> {
            let txn = db.begin_write().map_err(failed)?;
            {
                let mut clips = txn.open_table(CLIPS).map_err(failed)?;
                let mut refs = txn.open_table(REFS).map_err(failed)?;
                let mut mailbox = txn.open_table(MAILBOX).map_err(failed)?;
                let mut ids = txn.open_table(IDS).map_err(failed)?;
                for op in batch.drain(..) {
                    match op {
                        Op::Put {
                            clip,
                            recipients,
                            reply,
                        } => {
                            let id = &clip.meta.id.0[..];
                            let known =
                                ids.get(id).map_err(failed)?.map(|v| v.value().1.to_owned());
                            let outcome = match known {
                                Some(s) => Appended::for_known(&s, &clip.meta.sender),
                                // Nobody to deliver to (a channel with no
                                // other member online): only the id is
                                // kept; history copies store it later.
                                None if recipients.is_empty() => {
                                    ids.insert(id, (crate::now_ms(), &*clip.meta.sender))
                                        .map_err(failed)?;
                                    Appended::New
                                }
                                None => {
                                    clips.insert(id, &clip.to_record()[..]).map_err(failed)?;
                                    // One recipient (the common case): no
                                    // `refs` row; its absence means 1.
                                    if recipients.len() > 1 {
                                        refs.insert(id, recipients.len() as u64).map_err(failed)?;
                                    }
                                    for r in &recipients {
                                        mailbox
                                            .insert((&**r, id), (order, clip.meta.created_ms))
                                            .map_err(failed)?;
                                        order += 1;
                                    }
                                    ids.insert(id, (crate::now_ms(), &*clip.meta.sender))
                                        .map_err(failed)?;
                                    Appended::New
                                }
                            };
                            replies.push((reply, outcome));
                        }
                        Op::AddCopy {
                            clip,
                            recipient,
                            reply,
                        } => {
                            let id = &clip.meta.id.0[..];
                            let key = (&*recipient, id);
                            if mailbox.get(key).map_err(failed)?.is_none() {
                                let refs_now = if clips.get(id).map_err(failed)?.is_some() {
                                    refs.get(id).map_err(failed)?.map_or(1, |v| v.value())
                                } else {
                                    // Fully acked before: store it again.
                                    clips.insert(id, &clip.to_record()[..]).map_err(failed)?;
                                    0
                                };
                                refs.insert(id, refs_now + 1).map_err(failed)?;
                                mailbox
                                    .insert(key, (order, clip.meta.created_ms))
                                    .map_err(failed)?;
                                order += 1;
                            }
                            replies.push((reply, Appended::New));
                        }
                        Op::Ack { recipient, id } => {
                            let key = &id.0[..];
                            if mailbox
                                .remove((&*recipient, key))
                                .map_err(failed)?
                                .is_some()
                            {
                                release(&mut refs, &mut clips, key)?;
                            }
                        }
                        Op::Expire {
                            before_ms,
                            forget_ids_before_ms,
                            reply,
                        } => {
                            let mut old: Vec<(String, Vec<u8>)> = Vec::new();
                            for row in mailbox.iter().map_err(failed)? {
                                let (k, v) = row.map_err(failed)?;
                                if v.value().1 < before_ms {
                                    let (r, id) = k.value();
                                    old.push((r.to_owned(), id.to_vec()));
                                }
                            }
                            for (r, id) in &old {
                                mailbox.remove((r.as_str(), &id[..])).map_err(failed)?;
                                release(&mut refs, &mut clips, id)?;
                            }
                            let mut forget: Vec<Vec<u8>> = Vec::new();
                            for row in ids.iter().map_err(failed)? {
                                let (k, v) = row.map_err(failed)?;
                                if v.value().0 < forget_ids_before_ms {
                                    forget.push(k.value().to_vec());
                                }
                            }
                            for id in &forget {
                                ids.remove(&id[..]).map_err(failed)?;
                            }
                            expiries.push((reply, old.len() as u64));
                        }
                        Op::Sync(tx) => syncs.push(tx),
                        Op::Close(tx) => closes.push(tx),
                    }
                }
            }
            txn.commit().map_err(failed)
        })();
        crate::metrics::hot().store_sync.record(started.elapsed());
        match result {
            Ok(()) => {
                for (reply, outcome) in replies {
                    let _ = reply.send(Ok(outcome));
                }
                for (reply, n) in expiries {
                    let _ = reply.send(Ok(n));
                }
            }
            Err(e) => {
                warn!(error = %e, "store commit failed: nothing in this batch was accepted");
                for (reply, _) in replies {
                    let _ = reply.send(Err(e.clone()));
                }
                for (reply, _) in expiries {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
        for tx in syncs {
            let _ = tx.send(Ok(()));
        }
        if !closes.is_empty() {
            drop(db);
            for tx in closes {
                let _ = tx.send(Ok(()));
            }
            return;
        }
    }
}

fn release(
    refs: &mut redb::Table<&[u8], u64>,
    clips: &mut redb::Table<&[u8], &[u8]>,
    id: &[u8],
) -> Result<(), StoreError> {
    // No `refs` row: one recipient.
    let left = refs
        .get(id)
        .map_err(failed)?
        .map_or(1, |v| v.value())
        .saturating_sub(1);
    if left == 0 {
        refs.remove(id).map_err(failed)?;
        clips.remove(id).map_err(failed)?;
    } else if left == 1 {
        refs.remove(id).map_err(failed)?;
    } else {
        refs.insert(id, left).map_err(failed)?;
    }
    Ok(())
}

/// The next mailbox order number: one past the largest stored.
fn next_order(db: &Database) -> Result<u64, StoreError> {
    let txn = db.begin_read().map_err(failed)?;
    let mailbox = txn.open_table(MAILBOX).map_err(failed)?;
    let mut max = 0;
    for row in mailbox.iter().map_err(failed)? {
        let (_, v) = row.map_err(failed)?;
        max = max.max(v.value().0);
    }
    Ok(max + 1)
}

#[async_trait]
impl ClipStore for DiskStore {
    async fn append(
        &self,
        clip: Arc<StoredClip>,
        recipients: &[Arc<str>],
    ) -> Result<Appended, StoreError> {
        // Answered from memory when possible: no disk write for retries or
        // a full store.
        if let Some(known) = self.mem.check_new(&clip, recipients.len())? {
            return Ok(known);
        }
        let put = |reply| Op::Put {
            clip: clip.clone(),
            recipients: recipients.to_vec(),
            reply,
        };
        match self.call(put).await? {
            // On disk: now visible in memory.
            Appended::New => self.mem.insert(clip, recipients, false),
            other => Ok(other),
        }
    }

    async fn sender_of(&self, id: &ClipId) -> Result<Option<Arc<str>>, StoreError> {
        self.mem.sender_of(id).await
    }

    async fn read(
        &self,
        recipient: &str,
        after: Cursor,
        limit: usize,
    ) -> Result<Vec<(Cursor, Arc<StoredClip>)>, StoreError> {
        self.mem.read(recipient, after, limit).await
    }

    async fn add_copy(
        &self,
        clip: Arc<StoredClip>,
        recipient: Arc<str>,
    ) -> Result<bool, StoreError> {
        self.call(|reply| Op::AddCopy {
            clip: clip.clone(),
            recipient: recipient.clone(),
            reply,
        })
        .await?;
        Ok(self.mem.restore_copy(recipient, clip))
    }

    async fn ack(&self, recipient: &str, id: &ClipId) -> Result<bool, StoreError> {
        let held = self.mem.ack(recipient, id).await?;
        if held {
            // Written with the next commit; a crash before it redelivers
            // the clip, which the recipient drops by id.
            self.queue(Op::Ack {
                recipient: Arc::from(recipient),
                id: *id,
            })
            .await?;
        }
        Ok(held)
    }

    async fn expire(&self, before_ms: u64, forget_ids_before_ms: u64) -> Result<u64, StoreError> {
        let n = self.mem.expire(before_ms, forget_ids_before_ms).await?;
        self.call(|reply| Op::Expire {
            before_ms,
            forget_ids_before_ms,
            reply,
        })
        .await?;
        Ok(n)
    }

    fn stats(&self) -> StoreStats {
        self.mem.stats()
    }

    async fn close(&self) {
        DiskStore::close(self).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use codec::ClipEnd;
    use codec::wire::{AudioFormat, Target};

    use crate::store::ClipMeta;

    fn clip(n: u8, sender: &str) -> Arc<StoredClip> {
        let meta = Arc::new(ClipMeta {
            id: ClipId([n; 16]),
            sender: sender.into(),
            target: Target::User("bob".into()),
            format: AudioFormat::default(),
            created_ms: crate::now_ms(),
        });
        Arc::new(StoredClip::new(
            meta,
            Bytes::from(vec![2, 0xf8, n]),
            ClipEnd {
                packet_count: 1,
                final_granule: 960,
            },
        ))
    }

    #[test]
    fn records_round_trip_and_damage_is_detected() {
        let c = clip(7, "alice");
        let rec = c.to_record();
        let back = StoredClip::from_record(&rec).unwrap();
        assert_eq!(back.meta.id, c.meta.id);
        assert_eq!(back.body, c.body);
        assert_eq!(back.end, c.end);
        assert_eq!(back.header, c.header);
        for cut in 0..rec.len() {
            assert!(
                StoredClip::from_record(&rec[..cut]).is_none(),
                "cut at {cut}"
            );
        }
        let mut bad = rec.clone();
        bad[4] = 0x7f; // not a Delivery
        assert!(StoredClip::from_record(&bad).is_none());
    }

    #[tokio::test]
    async fn a_damaged_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("clips.redb"), vec![0x5a; 8192]).unwrap();
        let opened = DiskStore::open(dir.path(), u64::MAX);
        let kept = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("clips.redb.damaged-")
            });
        let (s, rec) = opened.unwrap();
        assert!(kept, "the damaged file is kept for inspection");
        assert_eq!(rec, Recovered::default());
        // The new store works.
        let r = s.append(clip(1, "alice"), &["bob".into()]).await;
        assert_eq!(r, Ok(Appended::New));
        s.close().await;
    }

    #[tokio::test]
    async fn survives_reopen_in_order_and_forgets_acked() {
        let dir = tempfile::tempdir().unwrap();
        let bob: Arc<str> = "bob".into();
        let carol: Arc<str> = "carol".into();
        {
            let (s, rec) = DiskStore::open(dir.path(), u64::MAX).unwrap();
            assert_eq!(rec, Recovered::default());
            for n in 1..=5u8 {
                let r = s
                    .append(clip(n, "alice"), &[bob.clone(), carol.clone()])
                    .await;
                assert_eq!(r, Ok(Appended::New));
            }
            assert_eq!(
                s.append(clip(3, "alice"), std::slice::from_ref(&bob)).await,
                Ok(Appended::Duplicate)
            );
            assert_eq!(
                s.append(clip(3, "mallory"), std::slice::from_ref(&bob))
                    .await,
                Ok(Appended::Conflict)
            );
            assert!(s.ack("bob", &ClipId([2; 16])).await.unwrap());
            assert!(s.ack("carol", &ClipId([2; 16])).await.unwrap());
            assert!(s.ack("bob", &ClipId([4; 16])).await.unwrap());
            s.close().await;
        }
        let (s, rec) = DiskStore::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(rec.clips, 4, "clip 2 fully acked and gone");
        assert_eq!(rec.copies, 4 + 3);
        assert_eq!(rec.damaged, 0);
        let got: Vec<u8> = s
            .read("bob", 0, 10)
            .await
            .unwrap()
            .iter()
            .map(|(_, c)| c.meta.id.0[0])
            .collect();
        assert_eq!(got, vec![1, 3, 5]);
        let got: Vec<u8> = s
            .read("carol", 0, 10)
            .await
            .unwrap()
            .iter()
            .map(|(_, c)| c.meta.id.0[0])
            .collect();
        assert_eq!(got, vec![1, 3, 4, 5]);
        // A clip with no recipient leaves no record; a copy added later is
        // released by its ack like any other.
        assert_eq!(s.append(clip(20, "alice"), &[]).await, Ok(Appended::New));
        assert!(s.add_copy(clip(20, "alice"), bob.clone()).await.unwrap());
        assert!(s.ack("bob", &ClipId([20; 16])).await.unwrap());
        // Retries of acked clips are still recognised after the restart.
        assert_eq!(
            s.append(clip(2, "alice"), std::slice::from_ref(&bob)).await,
            Ok(Appended::Duplicate)
        );
        // New clips go behind the recovered ones.
        assert_eq!(
            s.append(clip(9, "alice"), std::slice::from_ref(&bob)).await,
            Ok(Appended::New)
        );
        let last = s.read("bob", 0, 10).await.unwrap();
        assert_eq!(last.last().unwrap().1.meta.id.0[0], 9);
        s.close().await;
        let (_s, rec) = DiskStore::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(rec.clips, 4 + 1, "clip 20 left nothing behind");
    }
}
