//! A talk channel's recent clips, and the one rule of what it keeps: at
//! most a depth of entries, none older than an age.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

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
}
