//! Acks gathered into one `Ack` message (docs/protocol.md §2, "AckPolicy"):
//! the decisions, without I/O. A relay that announced `AckPolicy` takes up
//! to `max_ids` clip ids per `Ack`, held up to `hold_ms` for others to join
//! them; the `Ack` then leaves before the client's delayed QUIC ACK would,
//! and carries it: one datagram for several clips and their transport ACK.

use std::time::Duration;

use codec::wire::{AckPolicy, ClipId, Message};

/// The acks a connection holds, and the relay's policy for them.
#[derive(Debug, Default)]
pub struct AckBatch {
    /// `None` until the relay's `AckPolicy` (a relay without one takes one
    /// id per `Ack`).
    policy: Option<AckPolicy>,
    held: Vec<ClipId>,
}

/// What to do with an ack just given to [`AckBatch::push`].
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// Send this message now.
    Send(Message),
    /// Held: the first of a new batch, to be sent after [`AckBatch::hold`]
    /// (wake the sender).
    First,
    /// Held with others already waiting.
    Held,
}

impl AckBatch {
    /// The relay's policy; true when acks start being held with it (a
    /// task must now send them when due).
    pub fn set_policy(&mut self, p: AckPolicy) -> bool {
        let before = self.hold();
        self.policy = Some(p);
        before.is_zero() && !self.hold().is_zero()
    }

    /// How long an ack may be held: zero without a policy, or with one of
    /// one id per `Ack`.
    pub fn hold(&self) -> Duration {
        let p = self.policy.filter(|p| p.max_ids > 1);
        Duration::from_millis(p.map_or(0, |p| p.hold_ms))
    }

    /// `id` is to be acked.
    pub fn push(&mut self, id: ClipId) -> Push {
        self.held.push(id);
        // No hold (one id per `Ack`, at once), or the message is full.
        let full = self
            .policy
            .is_none_or(|p| self.held.len() as u64 >= p.max_ids);
        if self.hold().is_zero() || full {
            return Push::Send(self.message());
        }
        if self.held.len() == 1 {
            Push::First
        } else {
            Push::Held
        }
    }

    /// The held acks as one message (`None` when none are held).
    pub fn take(&mut self) -> Option<Message> {
        (!self.held.is_empty()).then(|| self.message())
    }

    /// The held acks (at least one) as one message.
    fn message(&mut self) -> Message {
        if self.held.len() == 1 {
            Message::Ack(self.held.remove(0))
        } else {
            Message::Acks(std::mem::take(&mut self.held))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> ClipId {
        ClipId([b; 16])
    }

    #[test]
    fn without_a_policy_each_ack_goes_at_once() {
        let mut b = AckBatch::default();
        assert_eq!(b.push(id(1)), Push::Send(Message::Ack(id(1))));
        assert_eq!(b.push(id(2)), Push::Send(Message::Ack(id(2))));
        assert_eq!(b.take(), None);
        // A policy of one id per `Ack`, or no hold, is the same.
        for (max_ids, hold_ms) in [(1, 20), (32, 0)] {
            assert!(!b.set_policy(AckPolicy { max_ids, hold_ms }));
            assert_eq!(b.push(id(3)), Push::Send(Message::Ack(id(3))));
        }
    }

    #[test]
    fn acks_are_held_and_sent_together_up_to_the_policys_count() {
        let mut b = AckBatch::default();
        assert!(b.set_policy(AckPolicy {
            max_ids: 3,
            hold_ms: 20,
        }));
        assert_eq!(b.push(id(1)), Push::First);
        assert_eq!(b.hold(), Duration::from_millis(20));
        assert_eq!(b.push(id(2)), Push::Held);
        // The third fills the message: it goes now, and a new batch starts.
        assert_eq!(
            b.push(id(3)),
            Push::Send(Message::Acks(vec![id(1), id(2), id(3)]))
        );
        assert_eq!(b.take(), None);
        assert_eq!(b.push(id(4)), Push::First);
        // The hold over: what is held goes, one id as a plain `Ack`.
        assert_eq!(b.take(), Some(Message::Ack(id(4))));
        assert_eq!(b.take(), None);
    }
}
