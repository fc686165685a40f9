//! A talk channel's recent clips, and the one rule of what it keeps: at
//! most a depth of entries, none older than an age.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::hash::DashMap;
use codec::wire::ClipId;

/// What the history needs of a clip.
pub trait Aged {
    fn id(&self) -> ClipId;
    /// When the sender created it (Unix ms).
    fn created_ms(&self) -> u64;
}

impl<T: Aged + ?Sized> Aged for Arc<T> {
    fn id(&self) -> ClipId {
        (**self).id()
    }

    fn created_ms(&self) -> u64 {
        (**self).created_ms()
    }
}

/// A channel's recent clips: (sequence number, clip), oldest first. The
/// store numbers the entries (and keeps them, with the disk store).
#[derive(Debug)]
pub struct History<C> {
    pub clips: VecDeque<(u64, C)>,
}

impl<C> Default for History<C> {
    fn default() -> Self {
        Self {
            clips: VecDeque::new(),
        }
    }
}

impl<C: Aged> History<C> {
    /// Adds entry `seq` in sequence order (entries of one channel rarely
    /// race), then trims (see [`History::trim`]).
    pub fn insert(&mut self, seq: u64, clip: C, depth: usize, cutoff_ms: u64) -> Vec<ClipId> {
        let at = self.clips.partition_point(|(s, _)| *s < seq);
        self.clips.insert(at, (seq, clip));
        self.trim(depth, cutoff_ms)
    }

    /// The one rule of what a channel's history keeps: at most `depth`
    /// entries, none created before `cutoff_ms` ([`cutoff_ms`]). Drops the
    /// rest, oldest first, and returns their ids (for the store to
    /// release).
    pub fn trim(&mut self, depth: usize, cutoff_ms: u64) -> Vec<ClipId> {
        let mut gone = Vec::new();
        while self.clips.len() > depth
            || self
                .clips
                .front()
                .is_some_and(|(_, c)| c.created_ms() < cutoff_ms)
        {
            if let Some((_, old)) = self.clips.pop_front() {
                gone.push(old.id());
            }
        }
        gone
    }
}

/// History holds no clip created before this (Unix ms), at `now_ms`, for a
/// history of `age` (`channel_history_age`): the one age rule.
pub fn cutoff_ms(now_ms: u64, age: Duration) -> u64 {
    now_ms.saturating_sub(age.as_millis() as u64)
}

/// Which history entries each member has been given, by user and channel:
/// an entry goes to a member once, whether as a recipient, to a member
/// online when it was recorded, or in the replay at connect. Bounded: a
/// member's set keeps twice the history's depth (older entries are never
/// offered again). Its newest entry per member is the member's cursor,
/// written to disk when it changed.
#[derive(Debug)]
pub struct Seen {
    by: DashMap<(Arc<str>, String), BTreeSet<u64>>,
    keep: usize,
    dirty: AtomicBool,
}

impl Seen {
    /// For a history of `depth` entries.
    pub fn new(depth: usize) -> Self {
        Self {
            by: DashMap::default(),
            keep: depth.max(1) * 2,
            dirty: AtomicBool::new(false),
        }
    }

    /// Marks entry `seq` of channel `c` as given to `user`; false if it
    /// already was (someone else gives it).
    pub fn claim(&self, user: &Arc<str>, c: &str, seq: u64) -> bool {
        let mut e = self.by.entry((user.clone(), c.to_owned())).or_default();
        let new = e.insert(seq);
        if new {
            self.dirty.store(true, Ordering::Relaxed);
        }
        while e.len() > self.keep {
            e.pop_first();
        }
        new
    }

    /// Undoes [`Seen::claim`] for an entry that could not be given.
    pub fn unclaim(&self, user: &Arc<str>, c: &str, seq: u64) {
        if let Some(mut e) = self.by.get_mut(&(user.clone(), c.to_owned())) {
            e.remove(&seq);
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// A member's entries as read back from its cursor.
    pub fn restore(&self, user: Arc<str>, c: String, seen: BTreeSet<u64>) {
        self.by.insert((user, c), seen);
    }

    /// Each member's newest entry given, if anything changed since the
    /// last call (then call [`Seen::unsaved`] if they could not be kept).
    pub fn changed_cursors(&self) -> Option<BTreeMap<(String, String), u64>> {
        if !self.dirty.swap(false, Ordering::SeqCst) {
            return None;
        }
        let cursors = self.by.iter().filter_map(|e| {
            let (user, c) = e.key();
            e.value()
                .last()
                .map(|m| ((user.to_string(), c.clone()), *m))
        });
        Some(cursors.collect())
    }

    /// The cursors from [`Seen::changed_cursors`] were not written.
    pub fn unsaved(&self) {
        self.dirty.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct C(u8, u64);

    impl Aged for C {
        fn id(&self) -> ClipId {
            ClipId([self.0; 16])
        }
        fn created_ms(&self) -> u64 {
            self.1
        }
    }

    #[test]
    fn entries_take_their_place_by_sequence() {
        let mut h = History::default();
        for seq in [3u64, 1, 2] {
            assert!(h.insert(seq, C(seq as u8, 10), 5, 0).is_empty());
        }
        let order: Vec<u64> = h.clips.iter().map(|(s, _)| *s).collect();
        assert_eq!(order, [1, 2, 3]);
        assert_eq!(h.insert(4, C(4, 10), 3, 0), [ClipId([1; 16])]);
    }

    #[test]
    fn history_keeps_its_depth_and_age() {
        let mut h = History::default();
        for n in 1..=5u8 {
            h.clips.push_back((u64::from(n), C(n, u64::from(n) * 1000)));
        }
        assert_eq!(h.trim(3, 0), [ClipId([1; 16]), ClipId([2; 16])]);
        assert_eq!(h.trim(3, 4000), [ClipId([3; 16])], "older than the cutoff");
        assert!(h.trim(3, 4000).is_empty(), "nothing more to drop");
        assert_eq!(h.clips.len(), 2);
        assert_eq!(cutoff_ms(100_000, Duration::from_secs(60)), 40_000);
        assert_eq!(cutoff_ms(10, Duration::from_secs(60)), 0);
    }

    /// An entry goes to each member once; an entry that could not be given
    /// may be claimed again; each member's set is its own.
    #[test]
    fn a_history_entry_goes_to_each_member_once() {
        let seen = Seen::new(4);
        let (bob, carol): (Arc<str>, Arc<str>) = ("bob".into(), "carol".into());
        assert!(seen.claim(&bob, "ops", 7));
        assert!(!seen.claim(&bob, "ops", 7), "given already");
        assert!(seen.claim(&carol, "ops", 7), "another member");
        assert!(seen.claim(&bob, "sales", 7), "another channel");
        seen.unclaim(&bob, "ops", 7);
        assert!(seen.claim(&bob, "ops", 7), "not given after all: again");
    }

    /// A member's set keeps twice the depth; the cursors (newest per
    /// member) come out only when something changed.
    #[test]
    fn seen_sets_are_bounded_and_cursors_say_the_newest() {
        let seen = Seen::new(2);
        let bob: Arc<str> = "bob".into();
        for seq in 1..=10 {
            seen.claim(&bob, "ops", seq);
        }
        assert!(
            seen.claim(&bob, "ops", 1),
            "forgotten: older than the history"
        );
        let cursors = seen.changed_cursors().expect("changed");
        assert_eq!(cursors[&("bob".to_owned(), "ops".to_owned())], 10);
        assert!(seen.changed_cursors().is_none(), "nothing new");
        seen.unsaved();
        assert!(seen.changed_cursors().is_some(), "written again");
        assert!(!seen.claim(&bob, "ops", 10));
        assert!(
            seen.changed_cursors().is_none(),
            "a repeated claim changes nothing"
        );
    }
}
