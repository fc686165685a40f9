//! Deliveries to one session: which clips are open on its connection (so
//! none goes out twice), the window of stored deliveries not yet
//! acknowledged, and the pump's order: live clips first.

use crate::hash::HashMap;

use codec::wire::ClipId;

/// The clips open on one connection: started and not yet acknowledged.
#[derive(Debug, Default)]
pub struct Deliveries {
    /// Each open clip, and whether it came from the store (stored ones
    /// count in the window).
    open: HashMap<ClipId, bool>,
    stored_open: usize,
    /// The last [`ACKED_HERE`] live clips acked on this connection.
    acked: std::collections::VecDeque<ClipId>,
}

/// How many of a connection's latest acks of live deliveries
/// [`Deliveries`] remembers. A member who joins a channel while a clip is
/// being spoken hears it live; its catch-up copy, queued once the clip is
/// stored, may come after the member already acked it: that copy must be
/// released, not sent again on the same connection. The window is the
/// store's commit (milliseconds); 32 acks (512 bytes, kept only by a
/// session that acked live clips) is far more than a connection gives in
/// it.
pub const ACKED_HERE: usize = 32;

impl Deliveries {
    /// Starts delivering `id` unless it is open already. A stored clip
    /// starts only if `held` says the store still holds the copy, asked
    /// after the open check: the pump reads a batch of stored clips and
    /// starts them one by one, and an ack (the store releases the copy,
    /// then [`Deliveries::finish`]) may land in between. Checked in this
    /// order, the clip is either still open (its ack has not finished) or
    /// no longer held, so an acked clip never starts again.
    pub fn begin(&mut self, id: ClipId, stored: bool, held: impl FnOnce() -> bool) -> bool {
        if self.open.contains_key(&id) || !held() {
            return false;
        }
        self.open.insert(id, stored);
        if stored {
            self.stored_open += 1;
        }
        true
    }

    /// `id` is acknowledged on this connection: finished and, if it was
    /// delivered live, remembered (a copy of it queued later is released,
    /// [`Deliveries::acked_here`]).
    pub fn acked(&mut self, id: &ClipId) -> bool {
        if self.open.get(id) == Some(&false) {
            if self.acked.len() == ACKED_HERE {
                self.acked.pop_front();
            }
            self.acked.push_back(*id);
        }
        self.finish(id)
    }

    /// Whether `id` was acked on this connection lately: a stored copy of
    /// it is released, not delivered again.
    pub fn acked_here(&self, id: &ClipId) -> bool {
        self.acked.contains(id)
    }

    /// `id` is acknowledged, or its delivery was abandoned. True when that
    /// freed room in the stored-delivery window.
    pub fn finish(&mut self, id: &ClipId) -> bool {
        if self.open.remove(id) == Some(true) {
            self.stored_open -= 1;
            return true;
        }
        false
    }

    /// Stored deliveries open (the window's use).
    pub fn stored_open(&self) -> usize {
        self.stored_open
    }

    /// Every delivery open, live or stored.
    pub fn open(&self) -> usize {
        self.open.len()
    }
}

/// What a session's delivery pump does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Start the live clip waiting: live first, always (an offer precedes
    /// the store's change for the same clip, so a clip relayed live is
    /// never sent again from the store, and a live clip is not held behind
    /// stored ones).
    Live,
    /// Read up to this many stored clips and start them.
    Stored(usize),
    /// Nothing to start: wait for a live offer, a store change or an ack.
    Wait,
}

/// The pump's rule: live first; stored clips while the store may have more
/// (`scan`) and the window (`window` stored deliveries unacknowledged at
/// most) has room.
pub fn next_step(live_waiting: bool, scan: bool, window: usize, stored_open: usize) -> Step {
    let room = window.saturating_sub(stored_open);
    if live_waiting {
        Step::Live
    } else if scan && room > 0 {
        Step::Stored(room)
    } else {
        Step::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const X: ClipId = ClipId([9; 16]);

    fn id(n: u8) -> ClipId {
        ClipId([n; 16])
    }

    /// A member heard X live and acked it; X's catch-up copy came after:
    /// the pump sees X acked here. Only the latest [`ACKED_HERE`] acks
    /// are kept.
    #[test]
    fn a_clip_acked_on_this_connection_is_known_as_such() {
        let mut d = Deliveries::default();
        assert!(d.begin(X, false, || true));
        assert!(!d.acked(&X), "a live delivery frees no window");
        assert!(d.acked_here(&X));
        assert!(!d.acked_here(&id(1)));
        // A stored delivery's ack is not remembered: its copy is gone.
        assert!(d.begin(id(2), true, || true));
        d.acked(&id(2));
        assert!(!d.acked_here(&id(2)));
        for n in 0..ACKED_HERE {
            let other = ClipId([n as u8 | 0x80; 16]);
            assert!(d.begin(other, false, || true));
            d.acked(&other);
        }
        assert!(!d.acked_here(&X), "forgotten after {ACKED_HERE} more");
    }

    /// The pump read stored clip X (its live delivery is open), then X's
    /// ack released the copy and finished the live delivery, then the pump
    /// reached X in its batch: X must not start again.
    #[test]
    fn an_acked_clip_read_before_its_ack_does_not_start_again() {
        let mut d = Deliveries::default();
        assert!(d.begin(X, false, || true), "live delivery");
        // The pump's batch has X. Then the ack: the store releases the
        // copy (so it no longer holds it), then the delivery ends.
        let held = false;
        assert!(!d.finish(&X), "a live delivery holds no window room");
        assert!(!d.begin(X, true, || held), "acked: not delivered twice");
        assert_eq!(d.stored_open(), 0);
    }

    /// The same race with the ack not yet finished: X is still open.
    #[test]
    fn a_clip_open_live_does_not_start_from_the_store() {
        let mut d = Deliveries::default();
        assert!(d.begin(X, false, || true));
        assert!(!d.begin(X, true, || true));
        assert!(!d.begin(X, false, || true));
    }

    /// A stored clip the store holds starts once and counts in the window
    /// until acked; after the ack (and the copy released) it is not
    /// started again, while a redelivery on a later read would need the
    /// store to hold it again.
    #[test]
    fn stored_deliveries_count_in_the_window_until_acked() {
        let mut d = Deliveries::default();
        assert!(d.begin(X, true, || true));
        assert_eq!(d.stored_open(), 1);
        assert!(!d.begin(X, true, || true), "open already");
        assert!(d.finish(&X), "the ack frees window room");
        assert_eq!(d.stored_open(), 0);
        assert!(!d.begin(X, true, || false), "released by the ack");
        assert!(!d.finish(&X), "a repeated ack changes nothing");
    }

    /// Stored deliveries count in the window; acks free room.
    #[test]
    fn the_window_counts_stored_deliveries_only() {
        let mut d = Deliveries::default();
        assert!(d.begin(id(1), true, || true));
        assert!(d.begin(id(2), true, || true));
        assert!(d.begin(id(3), false, || true));
        assert_eq!((d.stored_open(), d.open()), (2, 3));
        assert_eq!(next_step(false, true, 2, d.stored_open()), Step::Wait);
        assert!(d.finish(&id(1)));
        assert_eq!(next_step(false, true, 2, d.stored_open()), Step::Stored(1));
    }

    /// Live first, whatever the store has and the window allows.
    #[test]
    fn live_goes_first() {
        assert_eq!(next_step(true, true, 8, 0), Step::Live);
        assert_eq!(next_step(true, false, 0, 0), Step::Live);
        assert_eq!(next_step(false, true, 8, 3), Step::Stored(5));
        assert_eq!(next_step(false, false, 8, 0), Step::Wait);
    }
}
