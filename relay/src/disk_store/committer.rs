//! The committer thread: batches of appends, copies and acks written
//! with one `writev` and one sync, then answered.

use super::*;

/// Starts segment `n`: a spare file written again from its start when
/// there is one, else a new file; its name durable before any record.
pub(super) fn open_segment(
    dir: &dyn LogDir,
    free: &mut Vec<u64>,
    n: u64,
) -> Result<Box<dyn LogFile>, StoreError> {
    let Some(k) = free.pop() else {
        return new_file(dir, &seg_name(n), SEGMENT_MAGIC);
    };
    let mut f = dir.reuse(&free_name(k), &seg_name(n)).map_err(io_error)?;
    f.append(SEGMENT_MAGIC).map_err(io_error)?;
    f.sync().map_err(io_error)?;
    dir.sync().map_err(io_error)?;
    Ok(f)
}

/// Creates a file with its magic, durable (file and directory synced).
pub(super) fn new_file(
    dir: &dyn LogDir,
    name: &str,
    magic: &[u8; 8],
) -> Result<Box<dyn LogFile>, StoreError> {
    let mut f = dir.create(name).map_err(io_error)?;
    f.append(magic).map_err(io_error)?;
    f.sync().map_err(io_error)?;
    dir.sync().map_err(io_error)?;
    Ok(f)
}

impl Committer {
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        let mut last = std::time::Instant::now();
        while let Some(first) = rx.blocking_recv() {
            // Right after a commit, let more operations gather (they share
            // the next write and sync) instead of syncing a handful.
            let wait = self.opts.commit_interval.saturating_sub(last.elapsed());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            last = std::time::Instant::now();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            if self.commit(batch) {
                return;
            }
        }
    }

    /// Writes one batch and answers it. True when asked to close.
    pub(super) fn commit(&mut self, batch: Vec<Op>) -> bool {
        let started = std::time::Instant::now();
        crate::metrics::hot().store_batch.record(batch.len() as f64);
        if self.poisoned.is_none()
            && self.segs.get(&self.cur_seq).map_or(0, |s| s.bytes) >= self.opts.segment_bytes
            && let Err(e) = self.rotate()
        {
            self.poison(&e);
        }
        self.buf.clear();
        self.bodies.clear();
        let answers = self.encode(batch);
        let close = answers.close;
        // The batch that fills the segment (or the last one) ends it.
        let pending: usize =
            self.buf.len() + self.bodies.iter().map(|(_, b)| b.len()).sum::<usize>();
        let full = self.segs.get(&self.cur_seq).map_or(0, |s| s.bytes) + pending as u64
            >= self.opts.segment_bytes;
        let seal = self.poisoned.is_none() && !self.sealed && (full || close);
        if seal {
            log::seal(&mut self.buf, Some(self.cur_seq));
        }
        let written = self.write_batch();
        self.sealed |= seal && written.is_ok();
        crate::metrics::hot().store_sync.record(started.elapsed());
        answers.send(written);
        if close {
            return true;
        }
        // The next segment is started now, between batches.
        if self.sealed
            && self.poisoned.is_none()
            && let Err(e) = self.rotate()
        {
            self.poison(&e);
        }
        if self.poisoned.is_none() {
            self.collect_garbage();
        }
        false
    }

    /// Encodes a batch's operations into the buffer; what to answer once
    /// it is written.
    fn encode(&mut self, batch: Vec<Op>) -> Answers {
        let mut a = Answers::default();
        for op in batch {
            match op {
                Op::Put {
                    clip,
                    recipients,
                    reply,
                } => a.replies.push((reply, self.put(clip, &recipients))),
                Op::AddCopy {
                    clip,
                    recipient,
                    reply,
                } => {
                    self.queue_copy(clip, recipient, true);
                    a.replies.push((reply, Appended::New));
                }
                Op::History {
                    clip,
                    holder,
                    reply,
                } => {
                    let order = self.queue_copy(clip, holder, false);
                    a.expiries.push((reply, order));
                }
                Op::Ack { recipient, id } => self.ack(&id, &recipient),
                Op::Expire {
                    before_ms,
                    forget_ids_before_ms,
                    reply,
                } => {
                    self.forget_before = forget_ids_before_ms;
                    a.expiries.push((reply, self.expire(before_ms)));
                }
                Op::Sync(tx) => a.syncs.push(tx),
                Op::Close(tx) => {
                    a.syncs.push(tx);
                    a.close = true;
                }
            }
        }
        a
    }

    pub(super) fn poison(&mut self, e: &StoreError) {
        if self.poisoned.is_none() {
            error!(error = %e, "store write failed: no more clips are accepted until restart");
            self.poisoned = Some(e.clone());
        }
    }

    /// Appends the batch's records and syncs them.
    pub(super) fn write_batch(&mut self) -> Result<(), StoreError> {
        if let Some(first) = &self.poisoned {
            return Err(StoreError::Unavailable(Box::new(first.clone())));
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * self.bodies.len() + 1);
        let mut from = 0;
        let mut len = self.buf.len();
        for (at, body) in &self.bodies {
            parts.push(&self.buf[from..*at]);
            parts.push(body);
            len += body.len();
            from = *at;
        }
        parts.push(&self.buf[from..]);
        let r = self
            .cur
            .append_parts(&parts)
            .and_then(|()| self.cur.sync())
            .map_err(io_error);
        match r {
            Ok(()) => {
                if let Some(s) = self.segs.get_mut(&self.cur_seq) {
                    s.bytes += len as u64;
                }
                Ok(())
            }
            Err(e) => {
                self.poison(&e);
                Err(e)
            }
        }
    }

    pub(super) fn put(&mut self, clip: Arc<StoredClip>, recipients: &[Arc<str>]) -> Appended {
        let id = clip.meta.id;
        if let Some((at, s)) = self.recent.get(&id)
            && *at >= self.forget_before
        {
            return Appended::for_known(s, &clip.meta.sender);
        }
        let now = crate::now_ms();
        let sender = clip.meta.sender.clone();
        let seg = self.segs.entry(self.cur_seq).or_default();
        seg.ids.push((id, now, sender.clone()));
        self.recent.insert(id, (now, sender.clone()));
        if recipients.is_empty() {
            // Nobody to deliver to (a channel with no other member online):
            // only the id is kept; history copies store the clip later.
            log::id(&mut self.buf, Some(self.cur_seq), &id, now, &sender);
            return Appended::New;
        }
        let copies: Vec<(Arc<str>, u64)> = recipients
            .iter()
            .map(|r| {
                self.order += 1;
                (r.clone(), self.order)
            })
            .collect();
        log::put_split(
            &mut self.buf,
            &mut self.bodies,
            Some(self.cur_seq),
            now,
            &copies,
            &clip,
        );
        self.track(id, clip, now, Copies::from_vec(copies));
        Appended::New
    }

    /// Starts tracking a clip put in the current segment.
    pub(super) fn track(
        &mut self,
        id: ClipId,
        clip: Arc<StoredClip>,
        accepted_ms: u64,
        copies: Copies,
    ) {
        let bytes = clip.size();
        self.owed_bytes += bytes;
        if let Some(s) = self.segs.get_mut(&self.cur_seq) {
            s.owed += 1;
        }
        if let Some(old) = self.owed.insert(
            id,
            Owed {
                seg: self.cur_seq,
                clip,
                accepted_ms,
                copies,
                bytes,
            },
        ) {
            self.untrack(&old);
        }
    }

    pub(super) fn untrack(&mut self, l: &Owed) {
        self.owed_bytes -= l.bytes;
        if let Some(s) = self.segs.get_mut(&l.seg) {
            s.owed -= 1;
        }
    }

    /// Returns the copy's order number: a new one, or with `at_accepted`
    /// the clip's first copy's (a member's copy of channel history takes
    /// the clip's place in acceptance order, also after a restart).
    pub(super) fn queue_copy(
        &mut self,
        clip: Arc<StoredClip>,
        recipient: Arc<str>,
        at_accepted: bool,
    ) -> u64 {
        let id = clip.meta.id;
        self.order += 1;
        let mut order = self.order;
        match self.owed.get_mut(&id) {
            Some(l) => match l.copies.get(&recipient) {
                Some(o) => return o,
                None => {
                    if at_accepted && let Some(first) = l.copies.iter().map(|(_, o)| o).min() {
                        order = first;
                    }
                    log::add_copy(&mut self.buf, Some(self.cur_seq), &id, order, &recipient);
                    l.copies.insert(recipient, order);
                }
            },
            None => {
                // Delivered to everyone before (or never stored): its `Put`
                // may be gone with its segment, so store it again.
                let copies = vec![(recipient, order)];
                let at = clip.meta.created_ms;
                let seed = Some(self.cur_seq);
                log::put_split(&mut self.buf, &mut self.bodies, seed, at, &copies, &clip);
                self.track(id, clip, at, Copies::from_vec(copies));
            }
        }
        order
    }

    pub(super) fn ack(&mut self, id: &ClipId, recipient: &str) {
        let Some(l) = self.owed.get_mut(id) else {
            return;
        };
        if !l.copies.remove(recipient) {
            return;
        }
        log::ack(&mut self.buf, Some(self.cur_seq), id, recipient);
        if l.copies.is_empty()
            && let Some(l) = self.owed.remove(id)
        {
            self.untrack(&l);
        }
    }

    /// Drops copies of clips created before `before_ms`; returns how many.
    pub(super) fn expire(&mut self, before_ms: u64) -> u64 {
        let old: Vec<ClipId> = self
            .owed
            .iter()
            .filter(|(_, l)| l.clip.meta.created_ms < before_ms)
            .map(|(id, _)| *id)
            .collect();
        let mut n = 0;
        for id in old {
            if let Some(l) = self.owed.remove(&id) {
                for (r, _) in l.copies.iter() {
                    log::ack(&mut self.buf, Some(self.cur_seq), &id, r);
                    n += 1;
                }
                self.untrack(&l);
            }
        }
        // Ids files wholly past the dedupe window.
        let gone: Vec<u64> = self
            .ids_files
            .iter()
            .filter(|&(n, newest)| {
                *newest < self.forget_before && self.ids_file.as_ref().is_none_or(|f| f.1 != *n)
            })
            .map(|(n, _)| *n)
            .collect();
        for f in gone {
            if self.dir.remove(&ids_name(f)).is_ok() {
                self.ids_files.remove(&f);
            }
        }
        n
    }

    /// Closes the current segment (sealing it, unless its last batch did)
    /// and starts the next.
    pub(super) fn rotate(&mut self) -> Result<(), StoreError> {
        if !self.sealed {
            self.buf.clear();
            self.bodies.clear();
            log::seal(&mut self.buf, Some(self.cur_seq));
            self.write_batch()?;
            self.sealed = true;
        }
        let next = self.cur_seq + 1;
        self.cur = open_segment(&*self.dir, &mut self.free, next)?;
        self.cur_seq = next;
        self.sealed = false;
        self.segs.entry(next).or_default().bytes = SEGMENT_MAGIC.len() as u64;
        Ok(())
    }
}

/// What a batch answers once it is written (or failed to be).
#[derive(Default)]
struct Answers {
    replies: Vec<(Reply<Appended>, Appended)>,
    expiries: Vec<(Reply<u64>, u64)>,
    syncs: Vec<Reply<()>>,
    close: bool,
}

impl Answers {
    fn send(self, written: Result<(), StoreError>) {
        match written {
            Ok(()) => {
                for (reply, outcome) in self.replies {
                    let _ = reply.send(Ok(outcome));
                }
                for (reply, n) in self.expiries {
                    let _ = reply.send(Ok(n));
                }
            }
            Err(e) => {
                warn!(error = %e, "store write failed: nothing in this batch was accepted");
                for (reply, _) in self.replies {
                    let _ = reply.send(Err(e.clone()));
                }
                for (reply, _) in self.expiries {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
        for tx in self.syncs {
            let _ = tx.send(Ok(()));
        }
    }
}
