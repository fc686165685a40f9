//! Recovery: the log replayed into memory and a committer set up. The
//! replay itself is a pure fold over the records read back (`Replay`);
//! `recover` reads the files, feeds it, and carries out what it found.

use super::*;

/// A fold over the records of the log's files, oldest first: what is
/// still owed, to whom and in which order, and which ids were seen where.
#[derive(Default)]
pub(super) struct Replay {
    owed: HashMap<ClipId, Owed>,
    /// Ids first seen in segments: (accepted_ms, sender).
    recent: HashMap<ClipId, (u64, Arc<str>)>,
    /// Ids found only in ids files.
    carried: HashMap<ClipId, (u64, Arc<str>)>,
    segs: BTreeMap<u64, Seg>,
    /// Ids files: number → newest accepted_ms in it.
    ids_files: BTreeMap<u64, u64>,
    max_order: u64,
}

/// What the replay found, in the order the memory store takes it.
pub(super) struct Replayed {
    /// Every id known (dedupe window), oldest first.
    pub(super) ids: Vec<(ClipId, u64, Arc<str>)>,
    /// Clips still owed, in acceptance order (their first copy's order).
    pub(super) clips: Vec<Arc<StoredClip>>,
    /// Users' copies, in their queue order.
    pub(super) copies: Vec<(Arc<str>, Arc<StoredClip>)>,
    /// Channels' history entries.
    pub(super) history: Vec<HistoryEntry>,
    pub(super) owed: HashMap<ClipId, Owed>,
    pub(super) owed_bytes: u64,
    pub(super) segs: BTreeMap<u64, Seg>,
    pub(super) recent: HashMap<ClipId, (u64, Arc<str>)>,
    pub(super) ids_files: BTreeMap<u64, u64>,
    /// The next copy's order number.
    pub(super) next_order: u64,
}

impl Replay {
    /// The records of segment `n` (`len` bytes valid; `v1`: written by the
    /// first version).
    pub(super) fn segment(&mut self, n: u64, len: u64, v1: bool, records: Vec<Record>) {
        let seg = self.segs.entry(n).or_default();
        seg.bytes = len;
        seg.v1 = v1;
        for r in records {
            match r {
                Record::Put {
                    id,
                    accepted_ms,
                    sender,
                    copies,
                    clip,
                } => {
                    self.max_order = copies.iter().fold(self.max_order, |m, (_, o)| m.max(*o));
                    remember(&mut self.recent, seg, id, accepted_ms, sender);
                    let bytes = clip.size();
                    let copies = Copies::from_vec(copies);
                    let (seg, accepted_ms) = (n, accepted_ms);
                    self.owed.insert(
                        id,
                        Owed {
                            seg,
                            clip,
                            accepted_ms,
                            copies,
                            bytes,
                        },
                    );
                }
                Record::AddCopy {
                    id,
                    order,
                    recipient,
                } => {
                    self.max_order = self.max_order.max(order);
                    if let Some(s) = self.owed.get_mut(&id) {
                        s.copies.insert(recipient, order);
                    }
                }
                Record::Ack { id, recipient } => {
                    if let Some(s) = self.owed.get_mut(&id) {
                        s.copies.remove(&recipient);
                        if s.copies.is_empty() {
                            self.owed.remove(&id);
                        }
                    }
                }
                Record::Id {
                    id,
                    accepted_ms,
                    sender,
                } => remember(&mut self.recent, seg, id, accepted_ms, sender),
                Record::Seal => {}
            }
        }
    }

    /// The records of ids file `n` (ids carried out of deleted segments).
    pub(super) fn ids_file(&mut self, n: u64, records: Vec<Record>) {
        let mut newest_ms = 0;
        for r in records {
            if let Record::Id {
                id,
                accepted_ms,
                sender,
            } = r
            {
                newest_ms = newest_ms.max(accepted_ms);
                if !self.recent.contains_key(&id) {
                    self.carried.entry(id).or_insert((accepted_ms, sender));
                }
            }
        }
        self.ids_files.insert(n, newest_ms);
    }

    pub(super) fn finish(self) -> Replayed {
        let mut ids: Vec<_> = self
            .recent
            .iter()
            .map(|(id, (at, s))| (*id, *at, s.clone()))
            .chain(self.carried.into_iter().map(|(id, (at, s))| (id, at, s)))
            .collect();
        ids.sort_by_key(|(_, at, _)| *at);
        let mut segs = self.segs;
        let mut places = Vec::with_capacity(self.owed.len());
        let mut copies = Vec::new();
        let mut history = Vec::new();
        let mut owed_bytes = 0;
        for s in self.owed.values() {
            if let Some(first) = s.copies.iter().map(|(_, o)| o).min() {
                places.push((first, s.clip.clone()));
            }
            for (r, o) in s.copies.iter() {
                match r.strip_prefix(HISTORY_HOLDER) {
                    Some(c) => history.push((c.to_owned(), o, s.clip.clone())),
                    None => copies.push((o, r.clone(), s.clip.clone())),
                }
            }
            if let Some(seg) = segs.get_mut(&s.seg) {
                seg.owed += 1;
            }
            owed_bytes += s.bytes;
        }
        places.sort_by_key(|(first, _)| *first);
        copies.sort_by_key(|(order, _, _)| *order);
        let mut recent = self.recent;
        recent.shrink_to_fit();
        Replayed {
            ids,
            clips: places.into_iter().map(|(_, c)| c).collect(),
            copies: copies.into_iter().map(|(_, r, c)| (r, c)).collect(),
            history,
            owed: self.owed,
            owed_bytes,
            segs,
            recent,
            ids_files: self.ids_files,
            next_order: self.max_order + 1,
        }
    }
}

/// Notes an id found in segment `seg` (the first time it is seen).
fn remember(
    ids: &mut HashMap<ClipId, (u64, Arc<str>)>,
    seg: &mut Seg,
    id: ClipId,
    accepted_ms: u64,
    sender: Arc<str>,
) {
    if let std::collections::hash_map::Entry::Vacant(v) = ids.entry(id) {
        seg.ids.push((id, accepted_ms, sender.clone()));
        v.insert((accepted_ms, sender));
    }
}

/// Reads a file's records; a damaged head moves it aside, a torn tail of
/// the newest file is cut. `None`: skip the file.
fn load(
    dir: &dyn LogDir,
    name: &str,
    magic: &[u8; 8],
    seed: log::Seed,
    newest: bool,
    rec: &mut Recovered,
) -> Option<(Vec<Record>, u64, bool)> {
    let bytes = match dir.read(name) {
        Ok(b) => b,
        Err(e) => {
            error!(file = name, error = %e, "cannot read a store file: skipped");
            rec.damaged += 1;
            return None;
        }
    };
    let Some(parsed) = log::parse(&bytes, magic, seed) else {
        let aside = format!("{name}.damaged-{}", crate::now_ms());
        error!(
            file = name,
            moved_to = aside,
            "store file damaged from its start: moved aside"
        );
        let _ = dir.rename(name, &aside);
        rec.damaged += 1;
        return None;
    };
    rec.damaged += parsed.bad_records;
    if let Some(valid) = parsed.valid_until {
        let dropped = (bytes.len() - valid) as u64;
        if newest {
            // The last batch before the crash, torn: never answered; or,
            // in a recycled file, its earlier life's bytes.
            info!(
                file = name,
                bytes = dropped,
                "store: cut the newest segment after its last whole record"
            );
            rec.torn_bytes += dropped;
            let _ = dir.truncate(name, valid as u64);
        } else {
            error!(
                file = name,
                at = valid,
                bytes = dropped,
                "store file damaged: the rest of it is skipped"
            );
            rec.damaged += 1;
        }
    }
    let len = parsed.valid_until.unwrap_or(bytes.len()) as u64;
    Some((parsed.records, len, parsed.v1))
}

/// The numbers of the files named `PREFIX-N.log`, ascending.
fn numbered(names: &[String], prefix: &str) -> Vec<u64> {
    let mut v: Vec<u64> = names.iter().filter_map(|n| number(n, prefix)).collect();
    v.sort_unstable();
    v
}

/// Replays the log into `mem` and sets up the committer.
pub(super) fn recover(
    dir: Arc<dyn LogDir>,
    mem: &MemoryStore,
    opts: LogOptions,
) -> Result<(Committer, Recovered, Vec<HistoryEntry>), StoreError> {
    let mut rec = Recovered::default();
    let names = dir.list().map_err(io_error)?;
    let seg_nums = numbered(&names, "seg-");
    let ids_nums = numbered(&names, "ids-");
    let mut free = numbered(&names, "free-");
    let mut replay = Replay::default();
    let newest = seg_nums.last().copied();
    for &n in &seg_nums {
        let newest = Some(n) == newest;
        if let Some((records, len, v1)) = load(
            &*dir,
            &seg_name(n),
            SEGMENT_MAGIC,
            Some(n),
            newest,
            &mut rec,
        ) {
            replay.segment(n, len, v1, records);
        }
    }
    let newest = ids_nums.last().copied();
    for &n in &ids_nums {
        let newest = Some(n) == newest;
        if let Some((records, _, _)) = load(&*dir, &ids_name(n), IDS_MAGIC, None, newest, &mut rec)
        {
            replay.ids_file(n, records);
        }
    }
    let r = replay.finish();
    // Into memory: ids oldest first, clips in acceptance order, then
    // copies in theirs.
    for (id, at, sender) in &r.ids {
        mem.restore_id(*id, sender.clone(), *at);
    }
    for clip in &r.clips {
        mem.accept(clip);
    }
    for (user, clip) in &r.copies {
        mem.queue(user.clone(), clip.clone());
    }
    rec.ids = r.ids.len() as u64;
    rec.clips = r.owed.len() as u64;
    rec.copies = r.copies.len() as u64;
    rec.history = r.history.len() as u64;
    if rec.clips > 0 || rec.damaged > 0 || rec.torn_bytes > 0 {
        info!(
            clips = rec.clips,
            copies = rec.copies,
            damaged = rec.damaged,
            torn_bytes = rec.torn_bytes,
            "store recovered"
        );
    }
    // Spare files beyond the configured number go.
    while free.len() > opts.spare_segments {
        if let Some(n) = free.pop() {
            dir.remove(&free_name(n)).map_err(io_error)?;
            dir.sync().map_err(io_error)?;
        }
    }
    // New writes go to a new segment, numbered above every file that ever
    // held records (a recycled file's old records then fail their
    // checksums).
    let cur_seq = seg_nums.iter().chain(&free).max().map_or(1, |n| n + 1);
    let mut c = Committer {
        cur: open_segment(&*dir, &mut free, cur_seq)?,
        dir,
        opts,
        cur_seq,
        sealed: false,
        free,
        segs: r.segs,
        owed: r.owed,
        owed_bytes: r.owed_bytes,
        recent: r.recent,
        ids_file: None,
        next_ids_seq: ids_nums.last().map_or(1, |n| n + 1),
        ids_files: r.ids_files,
        order: r.next_order,
        forget_before: 0,
        buf: Vec::with_capacity(1 << 20),
        bodies: Vec::new(),
        poisoned: None,
    };
    c.segs.entry(cur_seq).or_default().bytes = SEGMENT_MAGIC.len() as u64;
    // Segments whose clips were all delivered before the crash go now.
    c.collect_garbage();
    Ok((c, rec, r.history))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use codec::ClipEnd;
    use codec::wire::{AudioFormat, Target};

    use crate::store::ClipMeta;

    fn clip(n: u8) -> Arc<StoredClip> {
        let meta = Arc::new(ClipMeta {
            id: ClipId([n; 16]),
            sender: "alice".into(),
            target: Target::User("bob".into()),
            format: AudioFormat::default(),
            created_ms: 1,
        });
        let end = ClipEnd {
            packet_count: 1,
            final_granule: 960,
        };
        Arc::new(StoredClip::new(meta, Bytes::from(vec![2, 0xf8, n]), end))
    }

    fn put(n: u8, at: u64, copies: &[(&str, u64)]) -> Record {
        Record::Put {
            id: ClipId([n; 16]),
            accepted_ms: at,
            sender: "alice".into(),
            copies: copies.iter().map(|(r, o)| ((*r).into(), *o)).collect(),
            clip: clip(n),
        }
    }

    fn ack(n: u8, r: &str) -> Record {
        Record::Ack {
            id: ClipId([n; 16]),
            recipient: r.into(),
        }
    }

    fn id_record(n: u8, at: u64) -> Record {
        Record::Id {
            id: ClipId([n; 16]),
            accepted_ms: at,
            sender: "alice".into(),
        }
    }

    fn users(r: &Replayed) -> Vec<(String, u8)> {
        let copies = r.copies.iter();
        copies
            .map(|(u, c)| (u.to_string(), c.meta.id.0[0]))
            .collect()
    }

    /// An ack in a later segment releases a copy put in an earlier one; a
    /// clip acked by all is owed to no one but its id is kept for dedupe.
    #[test]
    fn acks_release_copies_across_segments_and_ids_stay() {
        let mut r = Replay::default();
        r.segment(1, 100, false, vec![put(1, 10, &[("bob", 1), ("carol", 2)])]);
        r.segment(
            2,
            100,
            false,
            vec![put(2, 20, &[("bob", 3)]), ack(1, "bob")],
        );
        r.segment(3, 100, false, vec![ack(1, "carol"), ack(9, "bob")]);
        let out = r.finish();
        assert_eq!(users(&out), [("bob".to_owned(), 2)]);
        assert_eq!(out.owed.len(), 1);
        assert_eq!(out.segs[&1].owed, 0, "clip 1 pins no segment");
        assert_eq!(out.segs[&2].owed, 1);
        let ids: Vec<u8> = out.ids.iter().map(|(id, _, _)| id.0[0]).collect();
        assert_eq!(ids, [1, 2]);
        assert_eq!(out.next_order, 4);
    }

    /// Copies come back in their order, clips in acceptance order (their
    /// first copy's), however the records lie in the log.
    #[test]
    fn copies_and_clips_keep_their_order() {
        let mut r = Replay::default();
        r.segment(
            1,
            1,
            false,
            vec![put(1, 10, &[("bob", 5)]), put(2, 11, &[("bob", 2)])],
        );
        r.segment(
            2,
            1,
            false,
            vec![Record::AddCopy {
                id: ClipId([1; 16]),
                order: 7,
                recipient: "dave".into(),
            }],
        );
        let out = r.finish();
        let bob = |u: &str, n: u8| (u.to_owned(), n);
        assert_eq!(users(&out), [bob("bob", 2), bob("bob", 1), bob("dave", 1)]);
        let clips: Vec<u8> = out.clips.iter().map(|c| c.meta.id.0[0]).collect();
        assert_eq!(clips, [2, 1]);
        assert_eq!(out.next_order, 8);
    }

    /// A channel's history entries are held under its holder name and come
    /// back as history, not as a user's copy.
    #[test]
    fn history_holders_come_back_as_history() {
        let ops = history_holder("ops");
        let mut r = Replay::default();
        r.segment(1, 1, false, vec![put(1, 10, &[(&ops, 4), ("bob", 5)])]);
        let out = r.finish();
        assert_eq!(users(&out), [("bob".to_owned(), 1)]);
        assert_eq!(out.history.len(), 1);
        assert_eq!((out.history[0].0.as_str(), out.history[0].1), ("ops", 4));
    }

    /// Ids files add ids for dedupe (oldest first), never over a segment's,
    /// and only a segment's ids are the committer's to carry.
    #[test]
    fn ids_files_fill_the_dedupe_window() {
        let mut r = Replay::default();
        r.segment(
            5,
            1,
            false,
            vec![id_record(1, 50), put(2, 60, &[("bob", 1)])],
        );
        r.ids_file(3, vec![id_record(3, 5), id_record(1, 1), Record::Seal]);
        let out = r.finish();
        let ids: Vec<(u8, u64)> = out.ids.iter().map(|(id, at, _)| (id.0[0], *at)).collect();
        assert_eq!(ids, [(3, 5), (1, 50), (2, 60)]);
        assert_eq!(out.recent.len(), 2);
        assert_eq!(out.ids_files[&3], 5);
        assert_eq!(out.segs[&5].ids.len(), 2);
    }
}
