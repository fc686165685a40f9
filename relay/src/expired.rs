//! `Expired` notices: the copies the relay dropped at `clip_ttl` without
//! its recipient's ack, kept per user until the user's client acks them
//! (`Ack` with the clip id), so no clip addressed to a user disappears
//! without the user's client being told. Sans-IO; the relay keeps the book
//! in `DATA_DIR/expired.json` with the disk store, written before the
//! copies are dropped.
//!
//! Bounded: at most `per_user` notices per user (the oldest are folded
//! into the next one's `also` count), and a notice waits for its user at
//! most `expired_notice_ttl` after its clip expired.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use relay_core::hash::DashMap;

use codec::wire::{ClipId, Expired, Target};
use serde::{Deserialize, Serialize};

use crate::store::ClipMeta;

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("expired.json")
}

/// One notice as the file lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub user: String,
    /// The clip id, hex.
    pub clip: String,
    pub sender: String,
    /// `user` or `channel`.
    pub kind: String,
    pub to: String,
    pub created_ms: u64,
    pub also: u64,
}

pub struct ExpiredBook {
    /// Per user, oldest first (sharded: a user's ack locks one shard).
    users: DashMap<String, VecDeque<Expired>>,
    per_user: usize,
    dirty: AtomicBool,
}

impl ExpiredBook {
    pub fn new(per_user: usize) -> Self {
        Self {
            users: DashMap::default(),
            per_user: per_user.max(1),
            dirty: AtomicBool::new(false),
        }
    }

    /// `user`'s copy of `clip` is about to be dropped unacked: the new
    /// notice, or None if the book already had it (a sweep repeated after
    /// a crash).
    pub fn add(&self, user: &str, clip: &ClipMeta) -> Option<Expired> {
        let mut list = self.users.entry(user.to_owned()).or_default();
        if list.iter().any(|n| n.clip_id == clip.id) {
            return None;
        }
        let notice = Expired {
            clip_id: clip.id,
            sender: clip.sender.to_string(),
            target: clip.target.clone(),
            created_ms: clip.created_ms,
            also: 0,
        };
        // Oldest first.
        insert_in_order(&mut list, notice.clone());
        while list.len() > self.per_user {
            if let Some(oldest) = list.pop_front()
                && let Some(next) = list.front_mut()
            {
                next.also += 1 + oldest.also;
            }
        }
        self.dirty.store(true, Ordering::SeqCst);
        Some(notice)
    }

    /// What `user`'s client has not acked yet, oldest first.
    pub fn notices(&self, user: &str) -> Vec<Expired> {
        self.users
            .get(user)
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// `user`'s client acked `id`: true if it was a notice (now gone).
    pub fn ack(&self, user: &str, id: &ClipId) -> bool {
        {
            let Some(mut list) = self.users.get_mut(user) else {
                return false;
            };
            let Some(i) = list.iter().position(|n| n.clip_id == *id) else {
                return false;
            };
            list.remove(i);
        }
        self.users.remove_if(user, |_, l| l.is_empty());
        self.dirty.store(true, Ordering::SeqCst);
        true
    }

    /// Drops notices of clips created before `before_ms` (waited long
    /// enough for their user). Returns how many.
    pub fn prune(&self, before_ms: u64) -> usize {
        let mut n = 0;
        self.users.retain(|_, list| {
            let before = list.len();
            list.retain(|x| x.created_ms >= before_ms);
            n += before - list.len();
            !list.is_empty()
        });
        if n > 0 {
            self.dirty.store(true, Ordering::SeqCst);
        }
        n
    }

    /// Notices held, over all users.
    pub fn len(&self) -> usize {
        self.users.iter().map(|l| l.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The book as its file lists it, if it changed since the last call
    /// (`mark_dirty` again if writing it failed).
    pub fn take_changes(&self) -> Option<Vec<Entry>> {
        if !self.dirty.swap(false, Ordering::SeqCst) {
            return None;
        }
        let mut out = Vec::new();
        for list in self.users.iter() {
            let user = list.key();
            for n in list.iter() {
                let (kind, to) = match &n.target {
                    Target::User(u) => ("user", u),
                    Target::Channel(c) => ("channel", c),
                };
                out.push(Entry {
                    user: user.clone(),
                    clip: n.clip_id.to_hex(),
                    sender: n.sender.clone(),
                    kind: kind.to_owned(),
                    to: to.clone(),
                    created_ms: n.created_ms,
                    also: n.also,
                });
            }
        }
        Some(out)
    }

    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::SeqCst);
    }

    /// Loads the file's entries (at start); entries that do not parse are
    /// skipped.
    pub fn restore(&self, entries: Vec<Entry>) {
        for e in entries {
            let Some(clip_id) = ClipId::from_hex(&e.clip) else {
                continue;
            };
            let target = match e.kind.as_str() {
                "user" => Target::User(e.to),
                "channel" => Target::Channel(e.to),
                _ => continue,
            };
            let mut list = self.users.entry(e.user).or_default();
            insert_in_order(
                &mut list,
                Expired {
                    clip_id,
                    sender: e.sender,
                    target,
                    created_ms: e.created_ms,
                    also: e.also,
                },
            );
        }
    }
}

/// Puts `n` in `list` by creation time, oldest first.
fn insert_in_order(list: &mut VecDeque<Expired>, n: Expired) {
    let at = list.partition_point(|x| x.created_ms <= n.created_ms);
    list.insert(at, n);
}

#[cfg(test)]
mod tests {
    use super::*;
    use codec::wire::AudioFormat;
    use std::sync::Arc;

    fn meta(id: u8, created_ms: u64) -> ClipMeta {
        ClipMeta {
            id: ClipId([id; 16]),
            sender: Arc::from("alice"),
            target: Target::Channel("ops".into()),
            format: AudioFormat::default(),
            created_ms,
        }
    }

    #[test]
    fn kept_oldest_first_until_acked_once_each() {
        let b = ExpiredBook::new(8);
        assert!(b.add("bob", &meta(2, 200)).is_some());
        assert!(b.add("bob", &meta(1, 100)).is_some());
        // The same copy again (a sweep repeated after a crash): one notice.
        assert!(b.add("bob", &meta(1, 100)).is_none());
        let n = b.notices("bob");
        assert_eq!(
            n.iter().map(|x| x.clip_id).collect::<Vec<_>>(),
            [ClipId([1; 16]), ClipId([2; 16])]
        );
        assert_eq!(n[0].sender, "alice");
        assert_eq!(n[0].target, Target::Channel("ops".into()));
        // Nobody else sees them.
        assert!(b.notices("carol").is_empty());
        assert!(!b.ack("carol", &ClipId([1; 16])));
        assert!(b.ack("bob", &ClipId([1; 16])));
        assert!(!b.ack("bob", &ClipId([1; 16])));
        assert_eq!(b.len(), 1);
        assert!(b.ack("bob", &ClipId([2; 16])));
        assert!(b.is_empty());
    }

    #[test]
    fn past_the_bound_the_oldest_fold_into_a_count() {
        let b = ExpiredBook::new(3);
        for i in 1..=7u8 {
            b.add("bob", &meta(i, u64::from(i) * 10));
        }
        let n = b.notices("bob");
        assert_eq!(n.len(), 3);
        assert_eq!(n[0].clip_id, ClipId([5; 16]));
        // Clips 1..=4 are counted in the oldest notice kept.
        assert_eq!(n[0].also, 4);
        assert_eq!(n[1].also + n[2].also, 0);
        // Every copy counted once: itemized + also.
        assert_eq!(n.len() as u64 + n.iter().map(|x| x.also).sum::<u64>(), 7);
    }

    #[test]
    fn pruned_by_age_and_saved_and_restored() {
        let b = ExpiredBook::new(8);
        b.add("bob", &meta(1, 100));
        b.add("bob", &meta(2, 300));
        b.add("dan", &meta(3, 50));
        assert_eq!(b.prune(200), 2);
        let saved = b.take_changes().unwrap();
        assert!(b.take_changes().is_none(), "nothing changed since");
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        crate::json_file::save(&p, &saved).unwrap();
        let again = ExpiredBook::new(8);
        again.restore(crate::json_file::load(&p, "expired notices"));
        assert_eq!(again.notices("bob"), b.notices("bob"));
        assert!(again.notices("dan").is_empty());
    }
}
