//! The delivery ledger (sans-IO): which recipient must get which clip, and
//! what actually arrived. Every clip carries its checksum in its id (the
//! second half of the 128 bits is a hash of its packets), so a recipient
//! can tell a corrupted clip from the clip alone; the ledger knows which
//! clips each recipient is owed and when the relay accepted them.
//!
//! Counts: `deliveries_ok` (whole, checksum right, once), `corrupted`
//! (checksum wrong, or packets that do not match what was sent),
//! `duplicated` (a clip reached the application twice, or came again on
//! the same connection after it was acked: a relay or library bug),
//! `lost` (accepted by the relay, never arrived whole before the grace
//! period ended). A clip that comes again on a *new* connection after its
//! ack's connection died is a legal redelivery (the ack may have been lost)
//! and is counted as `redelivered`, not as an error.

use std::collections::HashMap;

use bytes::Bytes;
use codec::wire::ClipId;

/// Hash of a clip's content (XXH3, 64 bits): packet count, each packet's
/// length and bytes, and its end.
pub fn checksum(packets: &[Bytes], final_granule: u64) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&(packets.len() as u64).to_le_bytes());
    for p in packets {
        h.update(&(p.len() as u32).to_le_bytes());
        h.update(p);
    }
    h.update(&final_granule.to_le_bytes());
    h.digest()
}

/// A clip id whose second half is the clip's checksum.
pub fn clip_id(random: u64, sum: u64) -> ClipId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&random.to_be_bytes());
    id[8..].copy_from_slice(&sum.to_be_bytes());
    ClipId(id)
}

/// The checksum a clip id carries.
pub fn carried_sum(id: &ClipId) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&id.0[8..]);
    u64::from_be_bytes(b)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Counts {
    pub deliveries_ok: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub corrupted: u64,
    /// Legal redeliveries (ack lost with its connection), dropped by the
    /// client library.
    pub redelivered: u64,
    /// Clips that arrived but were never accepted by the relay for their
    /// sender (the sender gave up): not owed, not an error.
    pub unowed: u64,
    /// Copies the relay accepted: one per clip and recipient.
    pub accepted: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Sent, not yet accepted; not owed yet.
    Pending,
    /// Accepted by the relay: owed to the recipient.
    Owed,
    /// Arrived whole and right, acked on connection generation `gen`.
    Done { generation: u64 },
}

/// What the ledger says about one arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Corrupted,
    Duplicated,
    Unowed,
}

#[derive(Debug, Default)]
pub struct Ledger {
    /// (recipient, clip) → state. Recipients are indexes of virtual users.
    entries: HashMap<(u32, ClipId), State>,
    counts: Counts,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// A clip is being sent to `recipient`.
    pub fn sending(&mut self, recipient: u32, id: ClipId) {
        self.entries
            .entry((recipient, id))
            .or_insert(State::Pending);
    }

    /// The relay accepted the clip: it is owed to `recipient`.
    pub fn accepted(&mut self, recipient: u32, id: ClipId) {
        let e = self
            .entries
            .entry((recipient, id))
            .or_insert(State::Pending);
        if *e == State::Pending {
            *e = State::Owed;
            self.counts.accepted += 1;
        } else if matches!(e, State::Done { .. }) {
            // Delivered before the sender heard "accepted": fine.
            self.counts.accepted += 1;
        }
    }

    /// A clip arrived whole at `recipient` on its connection `generation`,
    /// with content checksum `sum` (computed from what arrived).
    pub fn arrived(&mut self, recipient: u32, id: ClipId, sum: u64, generation: u64) -> Verdict {
        if sum != carried_sum(&id) {
            self.counts.corrupted += 1;
            return Verdict::Corrupted;
        }
        match self.entries.get_mut(&(recipient, id)) {
            None => {
                self.counts.unowed += 1;
                Verdict::Unowed
            }
            Some(State::Done { .. }) => {
                self.counts.duplicated += 1;
                Verdict::Duplicated
            }
            Some(s) => {
                *s = State::Done { generation };
                self.counts.deliveries_ok += 1;
                Verdict::Ok
            }
        }
    }

    /// The client library dropped a redelivery of `id` on connection
    /// `generation`: legal if the ack went out on an earlier connection.
    pub fn redelivered(&mut self, recipient: u32, id: ClipId, generation: u64) -> Verdict {
        match self.entries.get(&(recipient, id)) {
            Some(State::Done { generation: g }) if *g < generation => {
                self.counts.redelivered += 1;
                Verdict::Ok
            }
            _ => {
                self.counts.duplicated += 1;
                Verdict::Duplicated
            }
        }
    }

    /// Clips still owed (accepted, not arrived).
    pub fn owed(&self) -> u64 {
        self.entries.values().filter(|s| **s == State::Owed).count() as u64
    }

    /// The final counts: whatever is still owed is lost.
    pub fn finish(&self) -> Counts {
        Counts {
            lost: self.owed(),
            ..self.counts
        }
    }

    pub fn counts(&self) -> Counts {
        self.counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clip(seed: u8) -> (Vec<Bytes>, ClipId) {
        let p = vec![Bytes::from(vec![0xf8, seed, 2, 3])];
        let id = clip_id(u64::from(seed), checksum(&p, 960));
        (p, id)
    }

    #[test]
    fn counts_every_outcome() {
        let mut l = Ledger::new();
        let (p1, a) = clip(1);
        let (_, b) = clip(2);
        let (_, c) = clip(3);
        for id in [a, b, c] {
            l.sending(7, id);
            l.accepted(7, id);
        }
        assert_eq!(l.arrived(7, a, checksum(&p1, 960), 1), Verdict::Ok);
        // The same clip again, whole: a duplicate at the application.
        assert_eq!(l.arrived(7, a, checksum(&p1, 960), 1), Verdict::Duplicated);
        // Redelivery on the same connection after the ack: a bug.
        assert_eq!(l.redelivered(7, a, 1), Verdict::Duplicated);
        // On a later connection: legal.
        assert_eq!(l.redelivered(7, a, 2), Verdict::Ok);
        // b arrives with other content: corrupted.
        assert_eq!(l.arrived(7, b, 12345, 1), Verdict::Corrupted);
        // Someone else's clip.
        let (p9, z) = clip(9);
        assert_eq!(l.arrived(7, z, checksum(&p9, 960), 1), Verdict::Unowed);
        let f = l.finish();
        assert_eq!(f.deliveries_ok, 1);
        assert_eq!(f.duplicated, 2);
        assert_eq!(f.redelivered, 1);
        assert_eq!(f.corrupted, 1);
        assert_eq!(f.unowed, 1);
        // b (corrupted, never whole) and c (never arrived) are lost.
        assert_eq!(f.lost, 2);
        assert_eq!(f.accepted, 3);
    }

    #[test]
    fn checksum_sees_any_change() {
        let (p, _) = clip(1);
        let mut q = p[0].to_vec();
        q[3] ^= 1;
        assert_ne!(checksum(&p, 960), checksum(&[Bytes::from(q)], 960));
        assert_ne!(checksum(&p, 960), checksum(&p, 959));
        let id = clip_id(5, 77);
        assert_eq!(carried_sum(&id), 77);
    }
}
