//! Space: segments deleted once nothing in them is owed, a long-owed
//! clip written again at the head so it pins nothing.

use super::*;

impl Committer {
    /// Deletes the oldest segments no clip needs any more; rewrites the
    /// oldest one's owed clips first when too many segments are closed.
    pub(super) fn collect_garbage(&mut self) {
        loop {
            let dead: Vec<u64> = self
                .segs
                .iter()
                .take_while(|(n, s)| **n != self.cur_seq && s.owed == 0)
                .map(|(n, _)| *n)
                .collect();
            if !dead.is_empty() {
                if let Err(e) = self.delete(&dead) {
                    self.poison(&e);
                    return;
                }
                continue;
            }
            let sealed = self.segs.len().saturating_sub(1);
            let total: u64 = self.segs.values().map(|s| s.bytes).sum();
            if sealed <= self.opts.sealed_segments || total <= 2 * self.owed_bytes {
                return;
            }
            let Some(&head) = self.segs.keys().next() else {
                return;
            };
            if let Err(e) = self.rewrite(head) {
                self.poison(&e);
                return;
            }
        }
    }

    /// Writes segment `head`'s owed clips again in the current segment.
    pub(super) fn rewrite(&mut self, head: u64) -> Result<(), StoreError> {
        self.buf.clear();
        self.bodies.clear();
        let ids: Vec<ClipId> = self
            .owed
            .iter()
            .filter(|(_, l)| l.seg == head)
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            if let Some(l) = self.owed.get(id) {
                log::put_split(
                    &mut self.buf,
                    &mut self.bodies,
                    Some(self.cur_seq),
                    l.accepted_ms,
                    &l.copies.to_vec(),
                    &l.clip,
                );
            }
        }
        self.write_batch()?;
        for id in &ids {
            if let Some(l) = self.owed.get_mut(id) {
                l.seg = self.cur_seq;
            }
        }
        let n = ids.len() as u64;
        if let Some(s) = self.segs.get_mut(&head) {
            s.owed -= n;
        }
        if let Some(s) = self.segs.get_mut(&self.cur_seq) {
            s.owed += n;
        }
        info!(
            segment = head,
            clips = n,
            "store: moved undelivered clips out of an old segment"
        );
        Ok(())
    }

    /// Deletes segments (oldest first), carrying their ids that are still
    /// in the dedupe window to an ids file first.
    pub(super) fn delete(&mut self, dead: &[u64]) -> Result<(), StoreError> {
        let mut carry = Vec::new();
        let mut newest = 0;
        for n in dead {
            if let Some(s) = self.segs.get_mut(n) {
                for (id, at, sender) in std::mem::take(&mut s.ids) {
                    self.recent.remove(&id);
                    if at >= self.forget_before {
                        newest = newest.max(at);
                        log::id(&mut carry, None, &id, at, &sender);
                    }
                }
            }
        }
        if !carry.is_empty() {
            let full = self
                .ids_file
                .as_ref()
                .is_none_or(|f| f.2 >= self.opts.ids_file_bytes);
            if full {
                let n = self.next_ids_seq;
                self.next_ids_seq += 1;
                let f = new_file(&*self.dir, &ids_name(n), IDS_MAGIC)?;
                self.ids_file = Some((f, n, IDS_MAGIC.len() as u64));
                self.ids_files.insert(n, 0);
            }
            if let Some((f, n, len)) = self.ids_file.as_mut() {
                f.append(&carry).and_then(|()| f.sync()).map_err(io_error)?;
                *len += carry.len() as u64;
                let e = self.ids_files.entry(*n).or_default();
                *e = (*e).max(newest);
            }
        }
        // Oldest first, each removal durable before the next: a later
        // segment holds acks of the earlier ones' clips, so it must never
        // be gone while an earlier one comes back after a crash.
        // A dead segment's file is kept for reuse while there are fewer
        // than `spare_segments` spares (renamed: gone under its old name
        // all the same).
        for n in dead {
            let recycle = self.free.len() < self.opts.spare_segments
                && self.segs.get(n).is_some_and(|s| !s.v1);
            if recycle {
                self.dir
                    .rename(&seg_name(*n), &free_name(*n))
                    .map_err(io_error)?;
                self.free.insert(0, *n);
            } else {
                self.dir.remove(&seg_name(*n)).map_err(io_error)?;
            }
            self.dir.sync().map_err(io_error)?;
            self.segs.remove(n);
        }
        Ok(())
    }
}
