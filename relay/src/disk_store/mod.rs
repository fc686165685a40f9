//! The durable store: every clip on local disk, in an append-only segment
//! log (`DATA_DIR/log/`), before the sender hears "accepted", with the hot
//! path in memory: a [`MemoryStore`] holds every undelivered clip, so reads
//! never touch the disk.
//!
//! One committer thread owns the write side. Appends and acks queue to it;
//! it takes everything queued, encodes it as records into one buffer (clip
//! bodies are not copied: they go out from their `Bytes`), writes it all
//! with one `writev` and syncs once (group commit), then answers every
//! waiting append. Durability costs one sequential write and one fdatasync
//! per batch.
//!
//! Why a segment log and not an embedded B-tree (the first version used
//! redb): a clip here is written once, read from memory, and deleted
//! within milliseconds to days. A B-tree pays for that with random page
//! rewrites (copy-on-write of the leaf and branch pages of four tables per
//! clip, twice: on insert and on delete); measured, that capped the durable
//! clip rate at half the in-memory one, the relay's core busy in page
//! building. The log writes each clip's bytes once, sequentially, and an
//! ack is a 40-byte tombstone; space comes back by deleting whole segment
//! files. `docs/benchmarks.md` has both numbers.
//!
//! Files (format in [`crate::segment_log`]): `seg-N.log`, segments of
//! records, a new one every [`LogOptions::segment_bytes`]; `ids-N.log`,
//! clip ids carried out of deleted segments for the dedupe window.
//!
//! Space: a segment is deleted when every clip put in it has been acked or
//! expired and every older segment is gone (acks in a segment may refer to
//! clips in older ones, so deletion goes oldest first). A long-undelivered
//! clip would pin its segment and everything after it: when more than
//! [`LogOptions::sealed_segments`] segments are closed and the log is more
//! than twice the owed data, the oldest segment's owed clips are written
//! again at the head (with their remaining recipients) and it is deleted.
//!
//! Crash safety: a segment is created, its magic synced and the directory
//! synced before any record goes into it; a batch is answered only after
//! its fdatasync; deletions are synced (directory) before the next ones.
//! Recovery replays every segment oldest first; a record cut short or
//! failing its CRC ends the valid part of its segment: in the newest one
//! that is the torn tail of the last batch (truncated, never answered); in
//! an older one it is damage (counted and logged; the rest of that segment
//! is skipped).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use codec::wire::ClipId;
use relay_core::hash::{DashMap, HashMap, HashSet};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::segment_log::{self as log, IDS_MAGIC, LogDir, LogFile, Record, SEGMENT_MAGIC};
mod committer;
mod copies;
mod gc;
mod recover;

use committer::{new_file, open_segment};
use copies::Copies;
use recover::recover;

use crate::store::{
    Appended, ClipStore, ClusterCache, CommitReport, Cursor, HistoryEntry, MemoryStore, StoreError,
    StoreStats, StoredClip,
};

/// Most operations one commit takes.
const MAX_BATCH: usize = 1024;
/// Operations waiting for the committer, at most (appends wait when full).
const QUEUE: usize = 4096;

/// Log tuning (fixed in production; tests use small segments).
#[derive(Debug, Clone, Copy)]
pub struct LogOptions {
    /// A new segment is started once the current one holds this many bytes.
    pub segment_bytes: u64,
    /// Closed segments kept before the oldest one's owed clips are
    /// rewritten so it can be deleted.
    pub sealed_segments: usize,
    /// An ids file is closed at this size.
    pub ids_file_bytes: u64,
    /// Deleted segment files kept (as `free-N.log`) to be written again as
    /// new segments: overwriting a file's blocks makes each fdatasync one
    /// I/O, where growing a new file also updates its size and extents.
    pub spare_segments: usize,
    /// Least time between the starts of two commits (`store_commit_interval`):
    /// under load, operations gather for this long and share one write and
    /// one sync. Zero: commit as soon as anything is queued.
    pub commit_interval: std::time::Duration,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 * 1024 * 1024,
            sealed_segments: 4,
            ids_file_bytes: 16 * 1024 * 1024,
            spare_segments: 2,
            commit_interval: std::time::Duration::from_millis(3),
        }
    }
}

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
    /// A channel history entry: a copy owed to the channel's history
    /// (a pseudo-recipient, [`history_holder`]); answered with its order.
    History {
        clip: Arc<StoredClip>,
        holder: Arc<str>,
        reply: Reply<u64>,
    },
    Expire {
        before_ms: u64,
        forget_ids_before_ms: u64,
        reply: Reply<u64>,
    },
    /// Answered once everything queued before it is on disk.
    Sync(Reply<()>),
    /// Like `Sync`, then the committer stops.
    Close(Reply<()>),
}

/// What recovery found on open.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    pub clips: u64,
    pub copies: u64,
    pub ids: u64,
    /// Records or files that could not be read back (damaged): skipped.
    pub damaged: u64,
    /// Bytes of a torn last batch (never acknowledged) dropped from the
    /// newest segment.
    pub torn_bytes: u64,
    /// Channel history entries.
    pub history: u64,
}

/// What holds a channel's history entries in the log: a recipient name no
/// user can have (user ids have no control characters).
const HISTORY_HOLDER: &str = "\u{1}history\u{1}";

/// The pseudo-recipient holding channel `c`'s history entries.
pub fn history_holder(c: &str) -> Arc<str> {
    Arc::from(format!("{HISTORY_HOLDER}{c}"))
}

pub struct DiskStore {
    mem: MemoryStore,
    /// Clips being committed, with the recipients that acked them before
    /// the commit ended (live recipients have a clip whole before it is
    /// on disk: see [`ClipStore::append_reporting`]).
    committing: DashMap<ClipId, Committing>,
    ops: mpsc::Sender<Op>,
    /// History entries found on open, until the relay takes them.
    history: std::sync::Mutex<Vec<HistoryEntry>>,
}

/// A clip id whose `Put` is on its way to disk.
#[derive(Default)]
struct Committing {
    /// Appends of this id in flight (a retry may race the first).
    appends: usize,
    /// The clip is on disk and in memory: acks go to memory now.
    inserted: bool,
    /// Recipients that acked it before.
    acked: HashSet<Arc<str>>,
}

/// Counts an append in its id's [`Committing`] entry while it lives (also
/// when the append is cancelled), removing the entry after the last.
struct InFlight<'a> {
    map: &'a DashMap<ClipId, Committing>,
    id: ClipId,
}

impl<'a> InFlight<'a> {
    fn new(map: &'a DashMap<ClipId, Committing>, id: ClipId) -> Self {
        map.entry(id).or_default().appends += 1;
        Self { map, id }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.map.remove_if_mut(&self.id, |_, c| {
            c.appends = c.appends.saturating_sub(1);
            c.appends == 0
        });
    }
}

fn io_error(e: std::io::Error) -> StoreError {
    StoreError::Io {
        kind: e.kind(),
        message: e.to_string(),
    }
}

fn seg_name(n: u64) -> String {
    format!("seg-{n:020}.log")
}

fn free_name(n: u64) -> String {
    format!("free-{n:020}.log")
}

fn ids_name(n: u64) -> String {
    format!("ids-{n:020}.log")
}

fn number(name: &str, prefix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

impl DiskStore {
    /// Opens (or creates) the log in `DATA_DIR/log` and loads every
    /// undelivered clip into memory.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        opts: LogOptions,
    ) -> Result<(Self, Recovered), StoreError> {
        if dir.join("clips.redb").exists() {
            warn!(
                "DATA_DIR/clips.redb is from an older ptt-relay (redb store) and is not read; \
                 deliver its clips with that version before upgrading, or remove it"
            );
        }
        let fs = log::FsDir::open(&dir.join("log")).map_err(|e| StoreError::Io {
            kind: e.kind(),
            message: format!("opening {}: {e}", dir.join("log").display()),
        })?;
        Self::open_with(Arc::new(fs), max_bytes, opts)
    }

    /// Opens the store on any [`LogDir`] (tests simulate crashes with one).
    pub fn open_with(
        dir: Arc<dyn LogDir>,
        max_bytes: u64,
        opts: LogOptions,
    ) -> Result<(Self, Recovered), StoreError> {
        let mem = MemoryStore::new(max_bytes);
        let (committer, rec, history) = recover(dir, &mem, opts)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || committer.run(rx))
            .map_err(io_error)?;
        let history = std::sync::Mutex::new(history);
        Ok((
            Self {
                mem,
                committing: DashMap::default(),
                ops: tx,
                history,
            },
            rec,
        ))
    }

    /// Waits until every operation queued so far is on disk.
    pub async fn sync(&self) {
        let _ = self.call(Op::Sync).await;
    }

    /// Writes what is queued and stops the committer (later operations
    /// fail). For shutdown, and for reopening in tests.
    pub async fn close(&self) {
        let _ = self.call(Op::Close).await;
    }

    /// Queues an operation for the committer.
    async fn send_op(&self, op: Op) -> Result<(), StoreError> {
        self.ops.send(op).await.map_err(|_| StoreError::Stopped)
    }

    /// Queues an operation and waits for the committer's answer.
    async fn call<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send_op(op(tx)).await?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }
}

/// A clip some recipient is still owed, as the committer tracks it.
struct Owed {
    /// The segment holding its latest `Put`.
    seg: u64,
    clip: Arc<StoredClip>,
    accepted_ms: u64,
    copies: Copies,
    /// Size of its `Put` record.
    bytes: u64,
}

/// A segment's bookkeeping.
#[derive(Default)]
struct Seg {
    /// Clips whose latest `Put` is here and that someone is still owed.
    owed: u64,
    /// File size.
    bytes: u64,
    /// Ids first put here: carried to an ids file when it is deleted.
    ids: Vec<(ClipId, u64, Arc<str>)>,
    /// Written by the first version (records not bound to the segment's
    /// number): removed when dead, never recycled.
    v1: bool,
}

/// The write side: owns the files and the index of what is owed where.
struct Committer {
    dir: Arc<dyn LogDir>,
    opts: LogOptions,
    cur: Box<dyn LogFile>,
    cur_seq: u64,
    /// The current segment ends with a `Seal` (it is full).
    sealed: bool,
    /// Numbers of `free-N.log` files waiting to be reused, at most
    /// `opts.spare_segments`.
    free: Vec<u64>,
    segs: BTreeMap<u64, Seg>,
    owed: HashMap<ClipId, Owed>,
    owed_bytes: u64,
    /// Ids put in segments not yet deleted: (accepted_ms, sender).
    /// Retries of an id racing its first commit are answered from here.
    recent: HashMap<ClipId, (u64, Arc<str>)>,
    ids_file: Option<(Box<dyn LogFile>, u64, u64)>,
    /// Ids files: number → newest accepted_ms in it.
    ids_files: BTreeMap<u64, u64>,
    next_ids_seq: u64,
    order: u64,
    /// Ids accepted before this are past the dedupe window.
    forget_before: u64,
    buf: Vec<u8>,
    /// Clip bodies to write into `buf` at these offsets (not copied).
    bodies: Vec<(usize, bytes::Bytes)>,
    /// Set after a failed write or sync: what is on disk is unknown, so
    /// nothing more is acknowledged.
    poisoned: Option<StoreError>,
}

impl DiskStore {
    /// [`ClipStore::append`] and [`ClipStore::append_reporting`]: the
    /// clip's id is registered as committing (so acks of it are kept)
    /// before it is reported so.
    async fn put(
        &self,
        clip: Arc<StoredClip>,
        recipients: &[Arc<str>],
        committing: Option<CommitReport>,
    ) -> Result<Appended, StoreError> {
        // Answered from memory when possible: no disk write for retries or
        // a full store.
        if let Some(known) = self.mem.check_new(&clip, recipients.len())? {
            return Ok(known);
        }
        let id = clip.meta.id;
        let in_flight = InFlight::new(&self.committing, id);
        // From here on an ack of this clip is kept (see `ack`): the
        // recipients may have its end.
        if let Some(c) = committing {
            c.report();
        }
        let put = |reply| Op::Put {
            clip: clip.clone(),
            recipients: recipients.to_vec(),
            reply,
        };
        let outcome = self.call(put).await;
        // On disk: now visible in memory, without the copies acked during
        // the commit (under the entry's lock, so no ack slips in between).
        let (inserted, acked) = {
            let mut c = self.committing.entry(id).or_default();
            if matches!(outcome, Ok(Appended::New)) {
                c.inserted = true;
                let acked = std::mem::take(&mut c.acked);
                let owed: std::borrow::Cow<[Arc<str>]> = if acked.is_empty() {
                    recipients.into()
                } else {
                    recipients
                        .iter()
                        .filter(|r| !acked.contains(&***r))
                        .cloned()
                        .collect()
                };
                (Some(self.mem.insert(clip, &owed, false)), acked)
            } else {
                (None, HashSet::default())
            }
        };
        drop(in_flight);
        for recipient in acked {
            // The `Put` is on disk: the ack record follows it. (If it is
            // lost, a restart delivers the clip again, dropped by id.)
            if let Err(e) = self.send_op(Op::Ack { recipient, id }).await {
                warn!(error = %e, "ack during a commit not written");
            }
        }
        inserted.unwrap_or(outcome)
    }
}

#[async_trait]
impl ClipStore for DiskStore {
    async fn append(
        &self,
        clip: Arc<StoredClip>,
        recipients: &[Arc<str>],
    ) -> Result<Appended, StoreError> {
        self.put(clip, recipients, None).await
    }

    async fn append_reporting(
        &self,
        clip: Arc<StoredClip>,
        recipients: &[Arc<str>],
        committing: CommitReport,
    ) -> Result<Appended, StoreError> {
        self.put(clip, recipients, Some(committing)).await
    }

    fn holds(&self, recipient: &str, id: &ClipId) -> bool {
        self.mem.holds_copy(recipient, id)
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

    async fn queue_copy(
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
        Ok(self.mem.queue(recipient, clip))
    }

    async fn queue_history(
        &self,
        recipient: Arc<str>,
        clips: Vec<Arc<StoredClip>>,
    ) -> Result<usize, StoreError> {
        // All in one commit (the committer batches what is queued).
        let mut replies = Vec::with_capacity(clips.len());
        for clip in &clips {
            let (reply, rx) = oneshot::channel();
            self.send_op(Op::AddCopy {
                clip: clip.clone(),
                recipient: recipient.clone(),
                reply,
            })
            .await?;
            replies.push(rx);
        }
        for rx in replies {
            rx.await.map_err(|_| StoreError::Stopped)??;
        }
        Ok(self.mem.queue_merged(recipient, clips))
    }

    async fn ack(&self, recipient: &str, id: &ClipId) -> Result<bool, StoreError> {
        if let Some(mut c) = self.committing.get_mut(id)
            && !c.inserted
        {
            if !c.acked.contains(recipient) {
                c.acked.insert(Arc::from(recipient));
            }
            return Ok(true);
        }
        let held = self.mem.ack(recipient, id).await?;
        if held {
            // Written with the next commit; a crash before it redelivers
            // the clip, which the recipient drops by id.
            self.send_op(Op::Ack {
                recipient: Arc::from(recipient),
                id: *id,
            })
            .await?;
        }
        Ok(held)
    }

    fn expiring(&self, before_ms: u64) -> Vec<(Arc<str>, Arc<StoredClip>)> {
        self.mem.expiring(before_ms)
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

    async fn add_history(&self, channel: &str, clip: Arc<StoredClip>) -> Result<u64, StoreError> {
        self.call(|reply| Op::History {
            clip,
            holder: history_holder(channel),
            reply,
        })
        .await
    }

    async fn drop_history(&self, channel: &str, id: &ClipId) -> Result<(), StoreError> {
        self.send_op(Op::Ack {
            recipient: history_holder(channel),
            id: *id,
        })
        .await
    }

    fn recovered_history(&self) -> Vec<HistoryEntry> {
        self.history
            .lock()
            .map(|mut h| std::mem::take(&mut *h))
            .unwrap_or_default()
    }

    async fn close(&self) {
        DiskStore::close(self).await;
    }
}

impl ClusterCache for DiskStore {
    fn pending_direct(&self) -> Vec<(Arc<str>, Arc<StoredClip>)> {
        self.mem.pending_direct()
    }

    fn queue_cached(&self, recipient: Arc<str>, clip: Arc<StoredClip>) -> bool {
        // Acks of it find nothing in the log, and write nothing.
        self.mem.cache(recipient, clip)
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
        std::fs::create_dir_all(dir.path().join("log")).unwrap();
        std::fs::write(dir.path().join("log").join(seg_name(1)), vec![0x5a; 8192]).unwrap();
        let opened = DiskStore::open(dir.path(), u64::MAX, LogOptions::default());
        let kept = std::fs::read_dir(dir.path().join("log"))
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("seg-00000000000000000001.log.damaged-")
            });
        let (s, rec) = opened.unwrap();
        assert!(kept, "the damaged file is kept for inspection");
        assert_eq!(rec.damaged, 1);
        // The new store works.
        let r = s.append(clip(1, "alice"), &["bob".into()]).await;
        assert_eq!(r, Ok(Appended::New));
        s.close().await;
    }

    fn small() -> LogOptions {
        LogOptions {
            segment_bytes: 600,
            sealed_segments: 2,
            ids_file_bytes: 200,
            ..LogOptions::default()
        }
    }

    fn files(dir: &Path, prefix: &str) -> usize {
        std::fs::read_dir(dir.join("log"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with(prefix))
            })
            .count()
    }

    fn open_small(dir: &Path) -> (DiskStore, Recovered) {
        let fs = log::FsDir::open(&dir.join("log")).unwrap();
        DiskStore::open_with(Arc::new(fs), u64::MAX, small()).unwrap()
    }

    /// Delivered clips' segments are deleted; an undelivered clip in an
    /// old segment is moved forward instead of pinning the log; ids of
    /// deleted segments still answer retries after a restart.
    #[tokio::test]
    async fn space_comes_back_and_a_pinned_clip_moves_forward() {
        let dir = tempfile::tempdir().unwrap();
        let bob: Arc<str> = "bob".into();
        let carol: Arc<str> = "carol".into();
        {
            let (s, _) = open_small(dir.path());
            // Carol is offline for good: her clip is put first.
            assert_eq!(
                s.append(clip(200, "alice"), std::slice::from_ref(&carol))
                    .await,
                Ok(Appended::New)
            );
            for n in 1..=60u8 {
                assert_eq!(
                    s.append(clip(n, "alice"), std::slice::from_ref(&bob)).await,
                    Ok(Appended::New)
                );
                assert!(s.ack("bob", &ClipId([n; 16])).await.unwrap());
            }
            s.sync().await;
            // A few segments of ~600 bytes at most, not one per 2-3 clips.
            let segs = files(dir.path(), "seg-");
            assert!(segs <= small().sealed_segments + 2, "{segs} segments left");
            assert!(files(dir.path(), "ids-") >= 1, "ids carried out");
            assert_eq!(
                files(dir.path(), "free-"),
                small().spare_segments,
                "dead segments kept for reuse"
            );
            s.close().await;
        }
        let (s, rec) = open_small(dir.path());
        assert_eq!((rec.clips, rec.copies, rec.damaged), (1, 1, 0));
        let got = s.read("carol", 0, 10).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1.body, clip(200, "alice").body);
        assert!(s.read("bob", 0, 10).await.unwrap().is_empty());
        // Every id is still known: retries are duplicates, not new clips.
        for n in [1u8, 30, 60, 200] {
            assert_eq!(
                s.append(clip(n, "alice"), std::slice::from_ref(&bob)).await,
                Ok(Appended::Duplicate),
                "clip {n}"
            );
        }
        // Past the dedupe window, ids files go.
        assert_eq!(s.expire(0, u64::MAX).await, Ok(0));
        s.sync().await;
        assert_eq!(files(dir.path(), "ids-"), 0);
        s.close().await;
    }

    /// A torn last write is dropped and reported, not counted as damage.
    #[tokio::test]
    async fn a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (s, _) = DiskStore::open(dir.path(), u64::MAX, LogOptions::default()).unwrap();
            s.append(clip(1, "alice"), &["bob".into()]).await.unwrap();
            s.close().await;
        }
        let seg = dir.path().join("log").join(seg_name(1));
        let mut bytes = std::fs::read(&seg).unwrap();
        // Without the seal a clean close wrote (a crash writes none).
        bytes.truncate(bytes.len() - 9);
        let whole = bytes.len();
        let mut more = Vec::new();
        log::put(
            &mut more,
            Some(1),
            1,
            &[("bob".into(), 9)],
            &clip(2, "alice"),
        );
        bytes.extend_from_slice(&more[..more.len() / 2]);
        std::fs::write(&seg, &bytes).unwrap();
        let (s, rec) = DiskStore::open(dir.path(), u64::MAX, LogOptions::default()).unwrap();
        assert_eq!((rec.clips, rec.damaged), (1, 0));
        assert_eq!(rec.torn_bytes, (more.len() / 2) as u64);
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), whole as u64);
        s.close().await;
    }

    #[tokio::test]
    async fn survives_reopen_in_order_and_forgets_acked() {
        let dir = tempfile::tempdir().unwrap();
        let bob: Arc<str> = "bob".into();
        let carol: Arc<str> = "carol".into();
        {
            let (s, rec) = DiskStore::open(dir.path(), u64::MAX, LogOptions::default()).unwrap();
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
        let (s, rec) = DiskStore::open(dir.path(), u64::MAX, LogOptions::default()).unwrap();
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
        assert!(s.queue_copy(clip(20, "alice"), bob.clone()).await.unwrap());
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
        let (_s, rec) = DiskStore::open(dir.path(), u64::MAX, LogOptions::default()).unwrap();
        assert_eq!(rec.clips, 4 + 1, "clip 20 left nothing behind");
    }

    /// Channel history a member missed joins its mailbox at the place the
    /// clip was accepted, and keeps that place after a restart.
    #[tokio::test]
    async fn history_joins_a_mailbox_in_acceptance_order_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let dave: Arc<str> = "dave".into();
        let ids = |v: Vec<(Cursor, Arc<StoredClip>)>| -> Vec<u8> {
            v.iter().map(|(_, c)| c.meta.id.0[0]).collect()
        };
        {
            let (s, _) = DiskStore::open(dir.path(), u64::MAX, LogOptions::default()).unwrap();
            s.append(clip(1, "alice"), std::slice::from_ref(&dave))
                .await
                .unwrap();
            // A channel clip while Dave was away, kept as history.
            let said = clip(2, "bob");
            s.append(said.clone(), &[]).await.unwrap();
            s.add_history("ops", said.clone()).await.unwrap();
            s.append(clip(3, "alice"), std::slice::from_ref(&dave))
                .await
                .unwrap();
            assert_eq!(s.queue_history(dave.clone(), vec![said]).await, Ok(1));
            assert_eq!(ids(s.read("dave", 0, 10).await.unwrap()), [1, 2, 3]);
            s.close().await;
        }
        let (s, rec) = DiskStore::open(dir.path(), u64::MAX, LogOptions::default()).unwrap();
        assert_eq!(rec.copies, 3);
        assert_eq!(ids(s.read("dave", 0, 10).await.unwrap()), [1, 2, 3]);
        // History recovered with the restart merges the same way.
        let s2 = s.recovered_history();
        assert_eq!(s2.len(), 1);
        assert!(s.ack("dave", &ClipId([2; 16])).await.unwrap());
        let erin: Arc<str> = "erin".into();
        s.append(clip(4, "alice"), std::slice::from_ref(&erin))
            .await
            .unwrap();
        assert_eq!(
            s.queue_history(erin.clone(), vec![s2[0].2.clone()]).await,
            Ok(1)
        );
        assert_eq!(ids(s.read("erin", 0, 10).await.unwrap()), [2, 4]);
        s.close().await;
    }

    /// The earliest ack there can be: one that arrives the moment the store
    /// reports the clip committing (when the relay gives live recipients
    /// its end).
    /// It is kept and releases the copy, so the clip is never queued, or
    /// delivered, again to whoever acked it live. (When the end went out
    /// before the store tracked the commit, such an ack found nothing to
    /// release and the copy was queued after it: a second delivery.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ack_right_after_the_early_end_is_never_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (bob, carol): (Arc<str>, Arc<str>) = ("bob".into(), "carol".into());
        let (s, _) = DiskStore::open(dir.path(), u64::MAX, LogOptions::default()).unwrap();
        let id = ClipId([8; 16]);
        let to = [bob.clone(), carol.clone()];
        let (committing, reported) = CommitReport::new();
        let append = s.append_reporting(clip(8, "alice"), &to, committing);
        // Bob acks the moment the store reports the clip committing (the
        // relay has given him its end then), before the commit is done.
        let ack = async {
            reported.await.expect("a new clip is reported committing");
            s.ack("bob", &id).await
        };
        let (appended, acked) = tokio::join!(append, ack);
        assert_eq!(appended, Ok(Appended::New));
        assert_eq!(acked, Ok(true), "the ack is kept, not dropped");
        assert!(!s.holds("bob", &id), "bob acked it: no copy left for him");
        assert!(s.holds("carol", &id));
        assert!(s.read("bob", 0, 10).await.unwrap().is_empty());
        // A retry or a clip the store already has is never reported.
        let (committing, reported) = CommitReport::new();
        assert_eq!(
            s.append_reporting(clip(8, "alice"), &to, committing).await,
            Ok(Appended::Duplicate)
        );
        assert!(reported.await.is_err(), "a known clip is not committing");
        s.close().await;
        let (s, rec) = DiskStore::open(dir.path(), u64::MAX, LogOptions::default()).unwrap();
        assert_eq!(rec.copies, 1, "after a reopen only carol's copy is left");
        assert!(!s.holds("bob", &id));
        s.close().await;
    }

    /// An ack that comes while its clip is being committed (the recipient
    /// had it whole from the live relay) releases the copy: the clip is
    /// not queued for that recipient once on disk, and not after a reopen.
    #[tokio::test]
    async fn an_ack_during_the_commit_releases_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let slow = LogOptions {
            commit_interval: std::time::Duration::from_secs(1),
            ..LogOptions::default()
        };
        let (bob, carol): (Arc<str>, Arc<str>) = ("bob".into(), "carol".into());
        {
            let (s, _) = DiskStore::open(dir.path(), u64::MAX, slow).unwrap();
            let s = Arc::new(s);
            // A first commit; the next waits `commit_interval` after it.
            s.sync().await;
            let id = ClipId([7; 16]);
            let appending = tokio::spawn({
                let (s, to) = (s.clone(), vec![bob.clone(), carol.clone()]);
                async move { s.append(clip(7, "alice"), &to).await }
            });
            while !s.committing.contains_key(&id) {
                tokio::task::yield_now().await;
            }
            assert!(s.ack("bob", &id).await.unwrap());
            assert!(!appending.is_finished(), "the ack came during the commit");
            assert_eq!(appending.await.unwrap(), Ok(Appended::New));
            assert!(s.read("bob", 0, 10).await.unwrap().is_empty());
            assert_eq!(s.read("carol", 0, 10).await.unwrap().len(), 1);
            assert!(s.committing.is_empty());
            s.close().await;
        }
        let (s, rec) = DiskStore::open(dir.path(), u64::MAX, slow).unwrap();
        assert_eq!(rec.copies, 1, "only carol's copy is left");
        assert!(s.read("bob", 0, 10).await.unwrap().is_empty());
        s.close().await;
    }
}
