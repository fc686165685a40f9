//! Fault injection for tests of verification tools (`client-sim load` must
//! notice a relay that drops, duplicates or corrupts). Only the cargo
//! feature `fault-injection` can turn faults on ([`Faults::set`]); without
//! it [`Faults::pick`] is constant `None` and the hooks compile away.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};

/// What to do to one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Leave out the clip's first packet.
    DropPacket,
    /// Deliver the clip twice on the same connection.
    Duplicate,
    /// Flip a byte inside the clip's first packet.
    Corrupt,
}

/// Every n-th delivery gets a fault (0: never).
#[derive(Debug, Default)]
pub struct Faults {
    drop_packet_every: AtomicU64,
    duplicate_every: AtomicU64,
    corrupt_every: AtomicU64,
    deliveries: AtomicU64,
}

impl Faults {
    /// Turns faults on: every n-th delivery (0: never).
    #[cfg(feature = "fault-injection")]
    pub fn set(&self, drop_packet_every: u64, duplicate_every: u64, corrupt_every: u64) {
        self.drop_packet_every
            .store(drop_packet_every, Ordering::SeqCst);
        self.duplicate_every
            .store(duplicate_every, Ordering::SeqCst);
        self.corrupt_every.store(corrupt_every, Ordering::SeqCst);
    }

    /// The fault for the delivery starting now.
    pub fn pick(&self) -> Fault {
        if !cfg!(feature = "fault-injection") {
            return Fault::None;
        }
        let n = self.deliveries.fetch_add(1, Ordering::Relaxed) + 1;
        let hit = |a: &AtomicU64| {
            let every = a.load(Ordering::Relaxed);
            every > 0 && n.is_multiple_of(every)
        };
        if hit(&self.drop_packet_every) {
            Fault::DropPacket
        } else if hit(&self.duplicate_every) {
            Fault::Duplicate
        } else if hit(&self.corrupt_every) {
            Fault::Corrupt
        } else {
            Fault::None
        }
    }
}

/// Applies a packet fault to packet records (`len | packet`...): drops the
/// first record, or flips the last byte of the first packet.
pub fn mangle(fault: Fault, records: Bytes) -> Bytes {
    let Some((len, n)) = codec::varint::get(&records) else {
        return records;
    };
    let end = n + len as usize;
    if end > records.len() {
        return records;
    }
    match fault {
        Fault::DropPacket => records.slice(end..),
        Fault::Corrupt if len >= 2 => {
            let mut b = BytesMut::from(&records[..]);
            b[end - 1] ^= 0x5a;
            b.freeze()
        }
        _ => records,
    }
}
