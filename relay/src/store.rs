//! The clip store: where complete clips wait for recipients to acknowledge
//! them. One copy of each clip, shared by all its recipients; each
//! recipient has an ordered mailbox of references to it.
//!
//! [`ClipStore`] is the seam for other engines (a durable on-disk log, NATS
//! JetStream): append (durable when it returns), read a recipient's mailbox
//! from a cursor, ack (release a recipient's copy), expire, and remember clip
//! ids for sender retries.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use codec::ClipEnd;
use codec::wire::{AudioFormat, ClipId, Delivery, Message, Target};
use relay_core::hash::{DashMap, HashMap};
use thiserror::Error;

/// What every copy of a clip shares.
#[derive(Debug)]
pub struct ClipMeta {
    pub id: ClipId,
    /// The sender's user id, from its token.
    pub sender: Arc<str>,
    pub target: Target,
    pub format: AudioFormat,
    /// When the relay received the header, Unix ms.
    pub created_ms: u64,
}

impl ClipMeta {
    /// The `Delivery` message that opens a delivery stream, encoded once per
    /// clip and shared by every recipient.
    pub fn delivery_header(&self, live: bool) -> Bytes {
        Message::Delivery(Delivery {
            clip_id: self.id,
            sender: self.sender.to_string(),
            target: self.target.clone(),
            format: self.format,
            created_ms: self.created_ms,
            live,
        })
        .to_bytes()
    }
}

/// A complete clip as stored: its packet records exactly as they go on the
/// wire, so delivery writes them without re-encoding.
#[derive(Debug)]
pub struct StoredClip {
    pub meta: Arc<ClipMeta>,
    /// Packet records (`length | packet`...), without the end record.
    pub body: Bytes,
    pub end: ClipEnd,
    /// `Delivery` header with `live = false`, pre-encoded.
    pub header: Bytes,
    /// The end record, pre-encoded.
    pub end_bytes: Bytes,
    /// Where the relay's store accepted it among all clips (its mailbox
    /// sequence at acceptance): 0 until then. Channel history given at
    /// connect is merged into a mailbox by it.
    accepted: AtomicU64,
}

impl StoredClip {
    /// The clip as one byte string (for disk): header, body and end, each
    /// length-prefixed (u32, big-endian) but the end, which closes it.
    pub fn to_record(&self) -> Vec<u8> {
        let mut v =
            Vec::with_capacity(8 + self.header.len() + self.body.len() + self.end_bytes.len());
        self.write_record(&mut v);
        v
    }

    /// Appends [`StoredClip::to_record`]'s bytes to `out`.
    pub fn write_record(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.header.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.header);
        out.extend_from_slice(&(self.body.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.body);
        out.extend_from_slice(&self.end_bytes);
    }

    /// Reads [`StoredClip::to_record`]'s bytes back; `None` if they are
    /// not a valid clip (a damaged file).
    pub fn from_record(rec: &[u8]) -> Option<Self> {
        let take = |at: usize| -> Option<(usize, usize)> {
            let n = u32::from_be_bytes(rec.get(at..at + 4)?.try_into().ok()?) as usize;
            (rec.len() >= at + 4 + n).then_some((at + 4, at + 4 + n))
        };
        let (h0, h1) = take(0)?;
        let (b0, b1) = take(h1)?;
        let header = &rec[h0..h1];
        let d = match Message::decode(header, header.len()).ok()?? {
            (Message::Delivery(d), n) if n == header.len() => d,
            _ => return None,
        };
        let body = Bytes::copy_from_slice(&rec[b0..b1]);
        let mut framer = codec::Framer::new(codec::FrameLimits::permissive());
        let scan = framer.scan(&rec[b0..]).ok()?;
        let (end, n) = scan.end?;
        if scan.records != body.len() || b1 + n != rec.len() {
            return None;
        }
        let meta = Arc::new(ClipMeta {
            id: d.clip_id,
            sender: Arc::from(d.sender.as_str()),
            target: d.target,
            format: d.format,
            created_ms: d.created_ms,
        });
        Some(Self::new(meta, body, end))
    }

    pub fn new(meta: Arc<ClipMeta>, body: Bytes, end: ClipEnd) -> Self {
        Self {
            header: meta.delivery_header(false),
            end_bytes: end.to_bytes(),
            meta,
            body,
            end,
            accepted: AtomicU64::new(0),
        }
    }

    /// Its place in acceptance order (0: not accepted yet).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Notes its place in acceptance order, once.
    fn mark_accepted(&self, n: u64) {
        let _ = self
            .accepted
            .compare_exchange(0, n, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Bytes this clip holds in memory (approximate).
    pub fn size(&self) -> u64 {
        (self.body.len() + self.header.len() + self.end_bytes.len() + 128) as u64
    }
}

/// Position in one recipient's mailbox: clips after it come later.
pub type Cursor = u64;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The store is at its size budget: tell the sender to retry later.
    #[error("store full ({limit} bytes)")]
    Full { limit: u64 },
    /// A disk operation failed; what was asked was not done.
    #[error("store I/O error ({kind}): {message}")]
    Io {
        kind: std::io::ErrorKind,
        message: String,
    },
    /// The store's committer has stopped (the store was closed): nothing
    /// more is stored.
    #[error("store stopped")]
    Stopped,
    /// An earlier write failed, so the store refuses every change until the
    /// relay restarts (and recovers from what is on disk).
    #[error("store unavailable after a write failure: {0}")]
    Unavailable(Box<StoreError>),
}

/// Outcome of [`ClipStore::append`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Stored now, for every recipient.
    New,
    /// This sender's clip id was already stored (a retry); nothing changed.
    Duplicate,
    /// Another sender already used this clip id; nothing changed.
    Conflict,
}

impl Appended {
    /// The outcome for a clip id already stored by `known` when `sender`
    /// sends it.
    pub fn for_known(known: &str, sender: &str) -> Self {
        if known == sender {
            Appended::Duplicate
        } else {
            Appended::Conflict
        }
    }
}

/// Counters for dashboards and admission.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    /// Recipient copies waiting for an ack.
    pub pending: u64,
    /// Bytes held.
    pub bytes: u64,
    /// Clip ids remembered for retries.
    pub remembered_ids: u64,
}

/// A channel history entry: (channel, sequence number, clip).
pub type HistoryEntry = (String, u64, Arc<StoredClip>);

/// How a store reports that a clip is committing
/// ([`ClipStore::append_reporting`]); dropped unreported when it never is.
pub struct CommitReport(tokio::sync::oneshot::Sender<()>);

impl CommitReport {
    /// A report and the caller's side of it (ready once reported; an error
    /// when the store dropped it unreported).
    pub fn new() -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Self(tx), rx)
    }

    pub fn report(self) {
        let _ = self.0.send(());
    }
}

#[async_trait]
pub trait ClipStore: Send + Sync + 'static {
    /// Stores a complete clip for `recipients`. Returns once the clip is as
    /// safe as this store makes it (on disk, replicated); only then may the
    /// sender be told "accepted".
    async fn append(
        &self,
        clip: Arc<StoredClip>,
        recipients: &[Arc<str>],
    ) -> Result<Appended, StoreError>;

    /// [`ClipStore::append`], reporting when the clip is committing: a
    /// store that takes time to make a clip safe (a disk commit) and keeps
    /// the acks that come meanwhile reports it once it knows the clip is
    /// new and fits and from the moment it keeps those acks; an ack that
    /// follows the report is never lost. What that means for the clip's
    /// live recipients is the caller's to decide (the relay gives them the
    /// end before the commit). A store that makes a clip safe at once never
    /// reports (the caller learns from `append` returning).
    async fn append_reporting(
        &self,
        clip: Arc<StoredClip>,
        recipients: &[Arc<str>],
        _committing: CommitReport,
    ) -> Result<Appended, StoreError> {
        self.append(clip, recipients).await
    }

    /// Whether `recipient`'s copy of `id` is still waiting for its ack.
    fn holds(&self, recipient: &str, id: &ClipId) -> bool;

    /// The sender of `id` if a clip with that id was stored within the
    /// dedupe window.
    async fn sender_of(&self, id: &ClipId) -> Result<Option<Arc<str>>, StoreError>;

    /// Up to `limit` clips waiting for `recipient` after `after`, oldest
    /// first, each with its cursor.
    async fn read(
        &self,
        recipient: &str,
        after: Cursor,
        limit: usize,
    ) -> Result<Vec<(Cursor, Arc<StoredClip>)>, StoreError>;

    /// Gives `recipient` a copy of an already accepted clip (channel
    /// history for a member who was offline). False if it already has one.
    async fn queue_copy(
        &self,
        clip: Arc<StoredClip>,
        recipient: Arc<str>,
    ) -> Result<bool, StoreError>;

    /// Gives `recipient`, who just connected, the channel history it
    /// missed, merged with the clips already waiting for it in the order
    /// the relay accepted them all. Returns how many copies were new.
    /// Called before the recipient's session reads its mailbox.
    async fn queue_history(
        &self,
        recipient: Arc<str>,
        clips: Vec<Arc<StoredClip>>,
    ) -> Result<usize, StoreError>;

    /// `recipient` has `id` whole: release its copy. Returns whether a copy
    /// was held (false for repeated or unknown acks, which are harmless).
    async fn ack(&self, recipient: &str, id: &ClipId) -> Result<bool, StoreError>;

    /// The copies [`ClipStore::expire`] would drop for `before_ms`, with
    /// their recipients (for the `Expired` notices, kept before they go).
    fn expiring(&self, before_ms: u64) -> Vec<(Arc<str>, Arc<StoredClip>)>;

    /// Drops copies of clips created before `before_ms` (the TTL) and
    /// forgets clip ids accepted before `forget_ids_before_ms` (the dedupe
    /// window). Returns how many copies were dropped.
    async fn expire(&self, before_ms: u64, forget_ids_before_ms: u64) -> Result<u64, StoreError>;

    fn stats(&self) -> StoreStats;

    /// Keeps `clip` as an entry of channel `channel`'s history (one copy
    /// per channel, as safe as this store keeps clips). Returns the entry's
    /// sequence number; numbers rise.
    async fn add_history(&self, channel: &str, clip: Arc<StoredClip>) -> Result<u64, StoreError>;

    /// Clip `id` fell out of channel `channel`'s history (depth or age).
    async fn drop_history(&self, channel: &str, id: &ClipId) -> Result<(), StoreError>;

    /// History entries found when the store was opened, in no particular
    /// order. Taken once.
    fn recovered_history(&self) -> Vec<HistoryEntry> {
        Vec::new()
    }

    /// Writes out what is pending and releases the store (shutdown).
    async fn close(&self) {}
}

/// What only a cluster asks of the store: copies kept durably elsewhere
/// (JetStream) and queued here for delivery, and the direct clips this
/// relay still owes, to re-assert them in JetStream.
pub trait ClusterCache: Send + Sync + 'static {
    /// Queues `clip` for `recipient` in memory only: it is kept durably
    /// elsewhere (the cluster's JetStream stream). False if the recipient
    /// already has it queued, or this relay knew the clip already.
    fn queue_cached(&self, recipient: Arc<str>, clip: Arc<StoredClip>) -> bool;

    /// Every undelivered direct clip with its recipient, oldest first per
    /// recipient (a cluster re-asserts them in JetStream).
    fn pending_direct(&self) -> Vec<(Arc<str>, Arc<StoredClip>)>;
}

#[derive(Default)]
struct Mailbox {
    clips: BTreeMap<Cursor, Arc<StoredClip>>,
    index: HashMap<ClipId, Cursor>,
}

/// The in-memory store: a dashmap of mailboxes keyed by recipient.
pub struct MemoryStore {
    mailboxes: DashMap<Arc<str>, Mailbox>,
    ids: DashMap<ClipId, Arc<str>>,
    /// Accepted ids in acceptance order, for forgetting them.
    id_log: Mutex<VecDeque<(u64, ClipId)>>,
    /// Source of cursors: one sequence for all mailboxes, taken under the
    /// mailbox's lock, so a mailbox's cursors rise in insertion order and
    /// never repeat even after an emptied mailbox is dropped.
    seq: AtomicU64,
    pending: AtomicU64,
    bytes: AtomicU64,
    max_bytes: u64,
}

impl MemoryStore {
    pub fn new(max_bytes: u64) -> Self {
        Self {
            mailboxes: DashMap::default(),
            ids: DashMap::default(),
            id_log: Mutex::new(VecDeque::new()),
            seq: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            max_bytes,
        }
    }

    /// Recovery: remembers that `sender` sent `id` at `accepted_ms`.
    pub(crate) fn restore_id(&self, id: ClipId, sender: Arc<str>, accepted_ms: u64) {
        self.ids.insert(id, sender);
        self.log_id(accepted_ms, id);
    }

    /// [`ClipStore::queue_cached`]: queued only if its id is new here, and
    /// known from now on, so a copy announced again is never queued twice,
    /// even once delivered and acked.
    pub(crate) fn cache(&self, recipient: Arc<str>, clip: Arc<StoredClip>) -> bool {
        match self.ids.entry(clip.meta.id) {
            dashmap::Entry::Occupied(_) => return false,
            dashmap::Entry::Vacant(v) => {
                v.insert(clip.meta.sender.clone());
            }
        }
        self.log_id(now_ms(), clip.meta.id);
        self.accept(&clip);
        self.queue(recipient, clip)
    }

    /// Gives `clip` its place in acceptance order (recovery, in log order).
    pub(crate) fn accept(&self, clip: &StoredClip) {
        clip.mark_accepted(self.seq.fetch_add(1, Ordering::Relaxed) + 1);
    }

    /// [`ClipStore::queue_history`]: `clips` join `recipient`'s mailbox
    /// and the whole mailbox is put in acceptance order. Its cursors are
    /// given anew, so this is only for a mailbox nobody is reading (a
    /// session reads its mailbox from the start, after this).
    pub(crate) fn queue_merged(&self, recipient: Arc<str>, clips: Vec<Arc<StoredClip>>) -> usize {
        let mut mb = self.mailboxes.entry(recipient).or_default();
        let mut all: Vec<(u64, Arc<StoredClip>)> = Vec::with_capacity(mb.clips.len() + clips.len());
        let mut added = 0;
        for clip in clips {
            if mb.index.contains_key(&clip.meta.id) {
                continue;
            }
            mb.index.insert(clip.meta.id, 0);
            added += 1;
            self.pending.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(clip.size(), Ordering::Relaxed);
            all.push((clip.accepted(), clip));
        }
        if added == 0 {
            return 0;
        }
        // A copy queued before its clip had a place (none today) keeps the
        // place it was queued at.
        all.extend(
            std::mem::take(&mut mb.clips)
                .into_iter()
                .map(|(cursor, clip)| {
                    (
                        match clip.accepted() {
                            0 => cursor,
                            n => n,
                        },
                        clip,
                    )
                }),
        );
        all.sort_by_key(|(at, _)| *at);
        for (_, clip) in all {
            let cursor = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
            mb.index.insert(clip.meta.id, cursor);
            mb.clips.insert(cursor, clip);
        }
        added
    }

    /// Notes when `id` was accepted, for the dedupe window's expiry.
    fn log_id(&self, at_ms: u64, id: ClipId) {
        if let Ok(mut log) = self.id_log.lock() {
            log.push_back((at_ms, id));
        }
    }

    /// Queues `clip` for `recipient` behind what it already has (recovery,
    /// channel history). False if it already had it.
    pub(crate) fn queue(&self, recipient: Arc<str>, clip: Arc<StoredClip>) -> bool {
        let mut mb = self.mailboxes.entry(recipient).or_default();
        // Already queued: it keeps its place (overwriting the index would
        // orphan the queued copy, which no ack could then release).
        if mb.index.contains_key(&clip.meta.id) {
            return false;
        }
        let cursor = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        mb.index.insert(clip.meta.id, cursor);
        self.pending.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(clip.size(), Ordering::Relaxed);
        mb.clips.insert(cursor, clip);
        true
    }

    /// Whether `recipients` copies of `clip` fit the budget.
    fn check_room(&self, clip: &StoredClip, recipients: usize) -> Result<(), StoreError> {
        let need = clip.size() * recipients as u64;
        if self.bytes.load(Ordering::Relaxed) + need > self.max_bytes {
            return Err(StoreError::Full {
                limit: self.max_bytes,
            });
        }
        Ok(())
    }

    /// What appending `clip` would answer without storing anything: a
    /// retry or a conflict (`Some`), no room (`Err`), or a new clip
    /// (`None`).
    pub(crate) fn check_new(
        &self,
        clip: &StoredClip,
        recipients: usize,
    ) -> Result<Option<Appended>, StoreError> {
        if let Some(known) = self.ids.get(&clip.meta.id) {
            return Ok(Some(Appended::for_known(&known, &clip.meta.sender)));
        }
        self.check_room(clip, recipients).map(|()| None)
    }

    /// Inserts a clip for `recipients`; with `check_budget` false the
    /// budget was already checked (the disk store checks it before its
    /// write, and the clip is on disk by now: it must not be refused).
    pub(crate) fn insert(
        &self,
        clip: Arc<StoredClip>,
        recipients: &[Arc<str>],
        check_budget: bool,
    ) -> Result<Appended, StoreError> {
        let id = clip.meta.id;
        match self.ids.entry(id) {
            dashmap::Entry::Occupied(e) => {
                return Ok(Appended::for_known(e.get(), &clip.meta.sender));
            }
            dashmap::Entry::Vacant(v) => {
                if check_budget {
                    self.check_room(&clip, recipients.len())?;
                }
                v.insert(clip.meta.sender.clone());
            }
        }
        self.log_id(now_ms(), id);
        self.accept(&clip);
        // A copy already queued (restored, or cached from the cluster)
        // keeps its place.
        for r in recipients {
            self.queue(r.clone(), clip.clone());
        }
        Ok(Appended::New)
    }

    /// Whether `recipient`'s copy of `id` is queued.
    pub(crate) fn holds_copy(&self, recipient: &str, id: &ClipId) -> bool {
        self.mailboxes
            .get(recipient)
            .is_some_and(|mb| mb.index.contains_key(id))
    }

    fn release(&self, clip: &StoredClip) {
        self.pending.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(clip.size(), Ordering::Relaxed);
    }
}

fn now_ms() -> u64 {
    crate::now_ms()
}

#[async_trait]
impl ClipStore for MemoryStore {
    async fn append(
        &self,
        clip: Arc<StoredClip>,
        recipients: &[Arc<str>],
    ) -> Result<Appended, StoreError> {
        self.insert(clip, recipients, true)
    }

    async fn sender_of(&self, id: &ClipId) -> Result<Option<Arc<str>>, StoreError> {
        Ok(self.ids.get(id).map(|s| s.clone()))
    }

    async fn read(
        &self,
        recipient: &str,
        after: Cursor,
        limit: usize,
    ) -> Result<Vec<(Cursor, Arc<StoredClip>)>, StoreError> {
        Ok(self.mailboxes.get(recipient).map_or_else(Vec::new, |mb| {
            mb.clips
                .range(after + 1..)
                .take(limit)
                .map(|(c, clip)| (*c, clip.clone()))
                .collect()
        }))
    }

    async fn queue_copy(
        &self,
        clip: Arc<StoredClip>,
        recipient: Arc<str>,
    ) -> Result<bool, StoreError> {
        Ok(self.queue(recipient, clip))
    }

    async fn queue_history(
        &self,
        recipient: Arc<str>,
        clips: Vec<Arc<StoredClip>>,
    ) -> Result<usize, StoreError> {
        Ok(self.queue_merged(recipient, clips))
    }

    async fn add_history(&self, _channel: &str, _clip: Arc<StoredClip>) -> Result<u64, StoreError> {
        // The relay keeps the history itself; memory has nothing to add.
        Ok(self.seq.fetch_add(1, Ordering::Relaxed) + 1)
    }

    async fn drop_history(&self, _channel: &str, _id: &ClipId) -> Result<(), StoreError> {
        Ok(())
    }

    async fn ack(&self, recipient: &str, id: &ClipId) -> Result<bool, StoreError> {
        let removed = {
            let Some(mut mb) = self.mailboxes.get_mut(recipient) else {
                return Ok(false);
            };
            let removed = mb.index.remove(id).and_then(|c| mb.clips.remove(&c));
            if let Some(clip) = &removed {
                self.release(clip);
            }
            removed.is_some()
        };
        self.mailboxes
            .remove_if(recipient, |_, mb| mb.clips.is_empty());
        Ok(removed)
    }

    fn expiring(&self, before_ms: u64) -> Vec<(Arc<str>, Arc<StoredClip>)> {
        let mut out = Vec::new();
        for mb in self.mailboxes.iter() {
            out.extend(
                mb.clips
                    .values()
                    .filter(|c| c.meta.created_ms < before_ms)
                    .map(|c| (mb.key().clone(), c.clone())),
            );
        }
        out
    }

    async fn expire(&self, before_ms: u64, forget_ids_before_ms: u64) -> Result<u64, StoreError> {
        let mut dropped = 0;
        for mut mb in self.mailboxes.iter_mut() {
            let old: Vec<Cursor> = mb
                .clips
                .iter()
                .filter(|(_, c)| c.meta.created_ms < before_ms)
                .map(|(k, _)| *k)
                .collect();
            for k in old {
                if let Some(clip) = mb.clips.remove(&k) {
                    mb.index.remove(&clip.meta.id);
                    self.release(&clip);
                    dropped += 1;
                }
            }
        }
        self.mailboxes.retain(|_, mb| !mb.clips.is_empty());
        if let Ok(mut log) = self.id_log.lock() {
            while let Some(&(at, id)) = log.front() {
                if at >= forget_ids_before_ms {
                    break;
                }
                log.pop_front();
                self.ids.remove(&id);
            }
        }
        Ok(dropped)
    }

    fn holds(&self, recipient: &str, id: &ClipId) -> bool {
        self.holds_copy(recipient, id)
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            pending: self.pending.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            remembered_ids: self.ids.len() as u64,
        }
    }
}

impl ClusterCache for MemoryStore {
    fn queue_cached(&self, recipient: Arc<str>, clip: Arc<StoredClip>) -> bool {
        self.cache(recipient, clip)
    }

    fn pending_direct(&self) -> Vec<(Arc<str>, Arc<StoredClip>)> {
        let mut out = Vec::new();
        for mb in self.mailboxes.iter() {
            for clip in mb.clips.values() {
                if matches!(clip.meta.target, Target::User(_)) {
                    out.push((mb.key().clone(), clip.clone()));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clip(n: u8, sender: &str, created_ms: u64) -> Arc<StoredClip> {
        let meta = Arc::new(ClipMeta {
            id: ClipId([n; 16]),
            sender: sender.into(),
            target: Target::User("bob".into()),
            format: AudioFormat::default(),
            created_ms,
        });
        Arc::new(StoredClip::new(
            meta,
            Bytes::from_static(&[1, 0xf8]),
            ClipEnd {
                packet_count: 1,
                final_granule: 960,
            },
        ))
    }

    fn users(names: &[&str]) -> Vec<Arc<str>> {
        names.iter().map(|n| Arc::from(*n)).collect()
    }

    #[tokio::test]
    async fn append_read_ack_in_order() {
        let s = MemoryStore::new(1 << 20);
        for i in 1..=3 {
            assert_eq!(
                s.append(clip(i, "alice", 0), &users(&["bob", "carol"]))
                    .await
                    .unwrap(),
                Appended::New
            );
        }
        let got = s.read("bob", 0, 10).await.unwrap();
        assert_eq!(
            got.iter().map(|(_, c)| c.meta.id.0[0]).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        // Reading from a cursor and with a limit.
        let after_first = s.read("bob", got[0].0, 1).await.unwrap();
        assert_eq!(after_first.len(), 1);
        assert_eq!(after_first[0].1.meta.id.0[0], 2);
        assert_eq!(s.stats().pending, 6);
        // Ack releases only bob's copy; repeated acks are harmless.
        assert!(s.ack("bob", &ClipId([2; 16])).await.unwrap());
        assert!(!s.ack("bob", &ClipId([2; 16])).await.unwrap());
        assert!(!s.ack("nobody", &ClipId([2; 16])).await.unwrap());
        assert_eq!(s.read("bob", 0, 10).await.unwrap().len(), 2);
        assert_eq!(s.read("carol", 0, 10).await.unwrap().len(), 3);
        assert_eq!(s.stats().pending, 5);
        // One copy of the payload, shared.
        let b = s.read("bob", 0, 1).await.unwrap();
        let c = s.read("carol", 0, 1).await.unwrap();
        assert!(Arc::ptr_eq(&b[0].1, &c[0].1));
        // An emptied mailbox is dropped, and later cursors still rise.
        let last = s.read("bob", 0, 10).await.unwrap().last().unwrap().0;
        for i in [1, 3] {
            s.ack("bob", &ClipId([i; 16])).await.unwrap();
        }
        s.append(clip(9, "alice", 0), &users(&["bob"]))
            .await
            .unwrap();
        let again = s.read("bob", last, 10).await.unwrap();
        assert_eq!(
            again.len(),
            1,
            "a reader at an old cursor sees the new clip"
        );
    }

    /// Channel history a member missed joins its mailbox at the place the
    /// clip was accepted, not behind the clips already waiting, once.
    #[tokio::test]
    async fn history_joins_a_mailbox_in_acceptance_order() {
        let s = MemoryStore::new(1 << 20);
        let dave = users(&["dave"]);
        s.append(clip(1, "alice", 0), &dave).await.unwrap();
        // A channel clip while Dave was away: nobody else to deliver to.
        let said = clip(2, "bob", 0);
        s.append(said.clone(), &[]).await.unwrap();
        s.append(clip(3, "alice", 0), &dave).await.unwrap();
        let ids = |v: Vec<(Cursor, Arc<StoredClip>)>| -> Vec<u8> {
            v.iter().map(|(_, c)| c.meta.id.0[0]).collect()
        };
        assert_eq!(ids(s.read("dave", 0, 10).await.unwrap()), [1, 3]);
        let dave: Arc<str> = "dave".into();
        assert_eq!(
            s.queue_history(dave.clone(), vec![said.clone()]).await,
            Ok(1)
        );
        assert_eq!(ids(s.read("dave", 0, 10).await.unwrap()), [1, 2, 3]);
        assert_eq!(s.stats().pending, 3);
        // Once: given again, nothing changes.
        assert_eq!(s.queue_history(dave, vec![said]).await, Ok(0));
        assert_eq!(ids(s.read("dave", 0, 10).await.unwrap()), [1, 2, 3]);
        assert!(s.ack("dave", &ClipId([2; 16])).await.unwrap());
        assert_eq!(ids(s.read("dave", 0, 10).await.unwrap()), [1, 3]);
        assert_eq!(s.stats().pending, 2);
    }

    /// A copy cached before the clip is appended (the cluster announced it
    /// before its live run ended) is one copy, and an ack releases it.
    #[tokio::test]
    async fn a_cached_copy_then_the_append_is_one_copy() {
        let s = MemoryStore::new(1 << 20);
        let c = clip(4, "alice", 0);
        assert!(s.queue_cached("bob".into(), c.clone()));
        assert!(!s.queue_cached("bob".into(), c.clone()));
        // The live run's append finds it known: one copy.
        assert_eq!(
            s.append(c.clone(), &users(&["bob"])).await.unwrap(),
            Appended::Duplicate
        );
        assert_eq!(s.stats().pending, 1);
        assert!(s.ack("bob", &c.meta.id).await.unwrap());
        assert_eq!(s.stats().pending, 0);
        // Announced again after the ack: not queued again.
        assert!(!s.queue_cached("bob".into(), c.clone()));
        assert!(s.read("bob", 0, 10).await.unwrap().is_empty());
        // Queued by recovery first, then appended: still one copy.
        let d = clip(5, "alice", 0);
        assert!(s.queue("bob".into(), d.clone()));
        s.append(d.clone(), &users(&["bob"])).await.unwrap();
        assert_eq!(s.stats().pending, 1);
        assert!(s.ack("bob", &d.meta.id).await.unwrap());
        assert_eq!(s.stats().pending, 0);
    }

    #[tokio::test]
    async fn retries_and_conflicts() {
        let s = MemoryStore::new(1 << 20);
        s.append(clip(1, "alice", 0), &users(&["bob"]))
            .await
            .unwrap();
        assert_eq!(
            s.append(clip(1, "alice", 0), &users(&["bob"]))
                .await
                .unwrap(),
            Appended::Duplicate
        );
        assert_eq!(
            s.append(clip(1, "mallory", 0), &users(&["bob"]))
                .await
                .unwrap(),
            Appended::Conflict
        );
        assert_eq!(s.read("bob", 0, 10).await.unwrap().len(), 1);
        assert_eq!(
            s.sender_of(&ClipId([1; 16])).await.unwrap().as_deref(),
            Some("alice")
        );
        // Still remembered after the ack, forgotten after the window.
        s.ack("bob", &ClipId([1; 16])).await.unwrap();
        assert!(s.sender_of(&ClipId([1; 16])).await.unwrap().is_some());
        s.expire(0, u64::MAX).await.unwrap();
        assert!(s.sender_of(&ClipId([1; 16])).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn budget_and_ttl() {
        let one = clip(1, "a", 0).size();
        let s = MemoryStore::new(one * 2);
        s.append(clip(1, "a", 10), &users(&["b"])).await.unwrap();
        s.append(clip(2, "a", 20), &users(&["b"])).await.unwrap();
        assert!(matches!(
            s.append(clip(3, "a", 30), &users(&["b"])).await,
            Err(StoreError::Full { .. })
        ));
        assert_eq!(s.expire(15, 0).await.unwrap(), 1);
        assert_eq!(s.stats().pending, 1);
        // Room again.
        s.append(clip(3, "a", 30), &users(&["b"])).await.unwrap();
        assert_eq!(s.stats().bytes, 2 * one);
    }

    #[tokio::test]
    async fn concurrent_appends_and_acks() {
        let s = Arc::new(MemoryStore::new(u64::MAX));
        let mut tasks = Vec::new();
        for t in 0..8u8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..100u8 {
                    let mut id = [t; 16];
                    id[1] = i;
                    let c = clip(0, "a", 0);
                    let meta = Arc::new(ClipMeta {
                        id: ClipId(id),
                        sender: "a".into(),
                        target: c.meta.target.clone(),
                        format: c.meta.format,
                        created_ms: 0,
                    });
                    let c = Arc::new(StoredClip::new(meta, c.body.clone(), c.end));
                    s.append(c, &users(&["r"])).await.unwrap();
                    if i % 2 == 0 {
                        assert!(s.ack("r", &ClipId(id)).await.unwrap());
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(s.stats().pending, 400);
        assert_eq!(s.read("r", 0, 1000).await.unwrap().len(), 400);
    }
}
