//! Each user's data use: UDP payload bytes in and out of the relay (QUIC's
//! own headers, tags, ACKs and retransmissions included), per user per UTC
//! day, for the user (`UsageQuery` on the control stream) and for operators
//! (`GET /usage`, `GET /usage/top` on the admin listener). Never a metric
//! label per user: the book is read on request.
//!
//! Sessions are sampled (their connection's byte counters since the last
//! sample) every `usage_interval`, when they end, and before an answer, so
//! the figures are current to the answer. With the disk store the book is
//! kept in `DATA_DIR/usage.json`, written whole when it changed, every
//! `usage_interval` and at shutdown: a crash loses at most the last
//! interval.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use codec::wire::DayUsage;
use relay_core::hash::DashMap;
use serde::{Deserialize, Serialize};

pub use codec::wire::{date, day_of};

/// Today's UTC day (days since 1970-01-01).
pub fn today() -> u64 {
    day_of(crate::now_ms())
}

/// One user's total over some days.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Total {
    pub user: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub bytes: u64,
}

/// Per-user, per-day byte counts, bounded by `keep_days` days per user and
/// `max_users` users.
pub struct UsageBook {
    keep_days: u64,
    max_users: usize,
    /// Each user's days with traffic, oldest first, at most `keep_days`.
    users: DashMap<Arc<str>, Vec<DayUsage>>,
    dirty: AtomicBool,
    /// Bytes not counted because the book was full of users.
    dropped: AtomicU64,
}

impl UsageBook {
    pub fn new(keep_days: u64, max_users: usize) -> Self {
        Self {
            keep_days: keep_days.max(1),
            max_users,
            users: DashMap::default(),
            dirty: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        }
    }

    /// Adds bytes to `user`'s `day`. A new user when the book holds
    /// `max_users` is not counted (returns false; see [`Self::dropped`]).
    pub fn add(&self, user: &Arc<str>, day: u64, up: u64, down: u64) -> bool {
        if up == 0 && down == 0 {
            return true;
        }
        let mut days = match self.users.get_mut(user) {
            Some(d) => d,
            None if self.users.len() >= self.max_users => {
                self.dropped.fetch_add(up + down, Ordering::Relaxed);
                return false;
            }
            None => self.users.entry(user.clone()).or_default(),
        };
        match days.iter().rposition(|d| d.day <= day) {
            Some(i) if days[i].day == day => {
                days[i].bytes_up += up;
                days[i].bytes_down += down;
            }
            at => {
                let i = at.map_or(0, |i| i + 1);
                days.insert(
                    i,
                    DayUsage {
                        day,
                        bytes_up: up,
                        bytes_down: down,
                    },
                );
                let excess = days.len().saturating_sub(self.keep_days as usize);
                days.drain(..excess);
            }
        }
        self.dirty.store(true, Ordering::Relaxed);
        true
    }

    /// `user`'s days within the `n` days up to `today` (0: all kept),
    /// oldest first.
    pub fn days(&self, user: &str, n: u64, today: u64) -> Vec<DayUsage> {
        let first = self.first_day(n, today);
        self.users.get(user).map_or_else(Vec::new, |d| {
            d.iter().filter(|d| d.day >= first).copied().collect()
        })
    }

    fn first_day(&self, n: u64, today: u64) -> u64 {
        let n = if n == 0 {
            self.keep_days
        } else {
            n.min(self.keep_days)
        };
        today.saturating_sub(n - 1)
    }

    /// The `limit` users with the most bytes (both ways) in the `n` days up
    /// to `today`, most first.
    pub fn top(&self, n: u64, today: u64, limit: usize) -> Vec<Total> {
        let first = self.first_day(n, today);
        let mut all: Vec<Total> = self
            .users
            .iter()
            .filter_map(|e| {
                let (up, down) = e
                    .value()
                    .iter()
                    .filter(|d| d.day >= first)
                    .fold((0, 0), |(u, d), x| (u + x.bytes_up, d + x.bytes_down));
                (up + down > 0).then(|| Total {
                    user: e.key().to_string(),
                    bytes_up: up,
                    bytes_down: down,
                    bytes: up + down,
                })
            })
            .collect();
        all.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.user.cmp(&b.user)));
        all.truncate(limit);
        all
    }

    /// Forgets days older than `keep_days` before `today`, and users left
    /// with none.
    pub fn prune(&self, today: u64) {
        let first = today.saturating_sub(self.keep_days - 1);
        self.users.retain(|_, d| {
            let before = d.len();
            d.retain(|x| x.day >= first);
            if d.len() != before {
                self.dirty.store(true, Ordering::Relaxed);
            }
            !d.is_empty()
        });
    }

    /// Users in the book.
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Bytes not counted because the book was full (`usage_max_users`).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The whole book, for its file; `None` when nothing changed since
    /// the last snapshot.
    pub fn snapshot_if_changed(&self) -> Option<Vec<UserDays>> {
        if !self.dirty.swap(false, Ordering::SeqCst) {
            return None;
        }
        Some(
            self.users
                .iter()
                .map(|e| UserDays {
                    user: e.key().to_string(),
                    days: e
                        .value()
                        .iter()
                        .map(|d| (d.day, d.bytes_up, d.bytes_down))
                        .collect(),
                })
                .collect(),
        )
    }

    /// A snapshot could not be written: write it again next time.
    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::SeqCst);
    }

    /// Reads a book back from its file's entries.
    pub fn restore(&self, list: Vec<UserDays>) {
        for u in list {
            let user: Arc<str> = Arc::from(u.user.as_str());
            for (day, up, down) in u.days {
                self.add(&user, day, up, down);
            }
        }
        self.dirty.store(false, Ordering::SeqCst);
    }
}

/// One user in `usage.json`: `[day, bytes_up, bytes_down]` per day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserDays {
    pub user: String,
    pub days: Vec<(u64, u64, u64)>,
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("usage.json")
}

/// Bytes of one connection since its last sample.
#[derive(Debug, Default)]
pub struct Sampler {
    up: u64,
    down: u64,
}

impl Sampler {
    /// Takes the connection's totals (received from the user, sent to it)
    /// and returns what is new since the last call.
    pub fn delta(&mut self, up: u64, down: u64) -> (u64, u64) {
        let d = (up.saturating_sub(self.up), down.saturating_sub(self.down));
        self.up = self.up.max(up);
        self.down = self.down.max(down);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn days_add_up_in_order_and_old_ones_go() {
        let b = UsageBook::new(3, 100);
        let alice = u("alice");
        b.add(&alice, 10, 100, 5);
        b.add(&alice, 10, 50, 5);
        b.add(&alice, 12, 1, 2);
        // A sample taken just before midnight and counted after it.
        b.add(&alice, 11, 7, 7);
        let days = b.days("alice", 0, 12);
        assert_eq!(
            days.iter()
                .map(|d| (d.day, d.bytes_up, d.bytes_down))
                .collect::<Vec<_>>(),
            [(10, 150, 10), (11, 7, 7), (12, 1, 2)]
        );
        assert_eq!(b.days("alice", 1, 12).len(), 1, "today only");
        assert_eq!(b.days("alice", 2, 12).len(), 2);
        // At most keep_days days per user: the oldest goes.
        b.add(&alice, 13, 1, 1);
        assert_eq!(b.days("alice", 0, 13)[0].day, 11);
        // Pruning forgets days before the window, then the user.
        b.prune(20);
        assert!(b.days("alice", 0, 20).is_empty());
        assert_eq!(b.users(), 0);
        // Nobody else's figures.
        assert!(b.days("bob", 0, 13).is_empty());
    }

    #[test]
    fn top_users_by_bytes_and_the_user_cap() {
        let b = UsageBook::new(7, 2);
        b.add(&u("alice"), 5, 10, 10);
        b.add(&u("bob"), 5, 100, 0);
        b.add(&u("bob"), 1, 1000, 0);
        // A third user does not fit: not counted, and said so.
        assert!(!b.add(&u("carol"), 5, 1, 1));
        assert_eq!(b.dropped(), 2);
        let top = b.top(1, 5, 10);
        assert_eq!(
            top.iter()
                .map(|t| (t.user.as_str(), t.bytes))
                .collect::<Vec<_>>(),
            [("bob", 100), ("alice", 20)]
        );
        let top = b.top(0, 5, 1);
        assert_eq!(top.len(), 1);
        assert_eq!((top[0].user.as_str(), top[0].bytes_up), ("bob", 1100));
    }

    #[test]
    fn snapshot_round_trip_and_dirty_flag() {
        let b = UsageBook::new(7, 10);
        assert!(b.snapshot_if_changed().is_none());
        b.add(&u("alice"), 3, 1, 2);
        let snap = b.snapshot_if_changed().unwrap();
        assert!(b.snapshot_if_changed().is_none(), "taken once");
        let json = serde_json::to_string(&snap).unwrap();
        let back = UsageBook::new(7, 10);
        back.restore(serde_json::from_str(&json).unwrap());
        assert_eq!(back.days("alice", 0, 3), b.days("alice", 0, 3));
    }

    #[test]
    fn sampler_gives_what_is_new() {
        let mut s = Sampler::default();
        assert_eq!(s.delta(100, 10), (100, 10));
        assert_eq!(s.delta(150, 10), (50, 0));
        assert_eq!(s.delta(150, 30), (0, 20));
    }
}
