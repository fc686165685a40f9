//! Messages between relays of a cluster (carried over NATS; see
//! `docs/cluster.md`). Sans-IO: the relay publishes what [`encode`] gives
//! and feeds what it receives to [`decode`].
//!
//! A live clip crosses to the relays whose users need it as a run of
//! messages on one subject, in order: `Start`, `Data`..., then `End` or
//! `Cut`. An `Ack` goes back to the relay that accepted a direct clip, so
//! it can drop its stored copy. `Kept` tells the relay a user is connected
//! to that a clip for them was just stored in the cluster's JetStream
//! stream (at that sequence), so it is queued even if its live run was
//! missed.
//!
//! Layout (integers big-endian): `kind:u8 | clip_id[16] | rest`, where
//! `rest` is
//!
//! | kind | rest |
//! |---|---|
//! | 1 `Start` | `origin:u64` then the clip's `Delivery` message (protocol encoding, `live = true`) |
//! | 2 `Data` | `packets:u32` then packet records (`varint len | Opus packet`...) as validated by the origin |
//! | 3 `End` | `packet_count:u64 final_granule:u64` |
//! | 4 `Cut` | `code:u64` (protocol error code) |
//! | 5 `Ack` | the recipient's user id (UTF-8) |
//! | 6 `Kept` | `seq:u64` (stream sequence) then the recipient's user id (UTF-8) |

use bytes::{BufMut, Bytes, BytesMut};

use crate::ErrorCode;
use crate::framing::ClipEnd;
use crate::wire::ClipId;

const START: u8 = 1;
const DATA: u8 = 2;
const END: u8 = 3;
const CUT: u8 = 4;
const ACK: u8 = 5;
const KEPT: u8 = 6;

/// One message between relays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relayed {
    /// A clip starts: who accepted it (a relay id) and its `Delivery`
    /// header bytes.
    Start {
        clip: ClipId,
        origin: u64,
        header: Bytes,
    },
    /// Packet records, in order.
    Data {
        clip: ClipId,
        packets: u32,
        records: Bytes,
    },
    /// The clip is complete (accepted and stored by its origin).
    End { clip: ClipId, end: ClipEnd },
    /// The clip will not complete.
    Cut { clip: ClipId, code: ErrorCode },
    /// `recipient` has the clip.
    Ack { clip: ClipId, recipient: String },
    /// The clip is stored for `recipient` at stream sequence `seq`.
    Kept {
        clip: ClipId,
        seq: u64,
        recipient: String,
    },
}

/// Why bytes are not a relay message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClusterError {
    #[error("relay message too short")]
    Short,
    #[error("unknown relay message kind {0}")]
    Kind(u8),
    #[error("relay message has bytes after its end")]
    Trailing,
    #[error("recipient is not UTF-8")]
    Utf8,
}

impl Relayed {
    pub fn clip(&self) -> ClipId {
        match self {
            Relayed::Start { clip, .. }
            | Relayed::Data { clip, .. }
            | Relayed::End { clip, .. }
            | Relayed::Cut { clip, .. }
            | Relayed::Ack { clip, .. }
            | Relayed::Kept { clip, .. } => *clip,
        }
    }

    /// Encodes the message (one copy of a `Data`'s records).
    pub fn encode(&self) -> Bytes {
        let (kind, extra) = match self {
            // Built by `encode_data`, before any buffer here is allocated.
            Relayed::Data {
                clip,
                packets,
                records,
            } => return Relayed::encode_data(*clip, *packets, std::slice::from_ref(records)),
            Relayed::Start { header, .. } => (START, 8 + header.len()),
            Relayed::End { .. } => (END, 16),
            Relayed::Cut { .. } => (CUT, 8),
            Relayed::Ack { recipient, .. } => (ACK, recipient.len()),
            Relayed::Kept { recipient, .. } => (KEPT, 8 + recipient.len()),
        };
        let mut b = BytesMut::with_capacity(17 + extra);
        b.put_u8(kind);
        b.put_slice(&self.clip().0);
        match self {
            Relayed::Start { origin, header, .. } => {
                b.put_u64(*origin);
                b.put_slice(header);
            }
            Relayed::Data { .. } => {} // returned above
            Relayed::End { end, .. } => {
                b.put_u64(end.packet_count);
                b.put_u64(end.final_granule);
            }
            Relayed::Cut { code, .. } => b.put_u64(code.to_u64()),
            Relayed::Ack { recipient, .. } => b.put_slice(recipient.as_bytes()),
            Relayed::Kept { seq, recipient, .. } => {
                b.put_u64(*seq);
                b.put_slice(recipient.as_bytes());
            }
        }
        b.freeze()
    }

    /// Encodes a `Data` whose records are the concatenation of `runs`,
    /// copying each once (a live clip's segments go out without being
    /// joined first).
    pub fn encode_data(clip: ClipId, packets: u32, runs: &[Bytes]) -> Bytes {
        let len: usize = runs.iter().map(Bytes::len).sum();
        let mut b = BytesMut::with_capacity(21 + len);
        b.put_u8(DATA);
        b.put_slice(&clip.0);
        b.put_u32(packets);
        for r in runs {
            b.put_slice(r);
        }
        b.freeze()
    }

    /// Decodes a message; `Start` headers and `Data` records are slices of
    /// `b` (no copy). The `Delivery` header and the records are checked by
    /// the receiver ([`crate::Message::decode`], [`crate::Framer`]).
    pub fn decode(b: &Bytes) -> Result<Relayed, ClusterError> {
        if b.len() < 17 {
            return Err(ClusterError::Short);
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[1..17]);
        let clip = ClipId(id);
        let rest = b.slice(17..);
        let u64_at = |r: &Bytes, at: usize| -> Result<u64, ClusterError> {
            let s = r.get(at..at + 8).ok_or(ClusterError::Short)?;
            Ok(u64::from_be_bytes(
                s.try_into().map_err(|_| ClusterError::Short)?,
            ))
        };
        let exact = |r: &Bytes, n: usize| {
            if r.len() > n {
                Err(ClusterError::Trailing)
            } else {
                Ok(())
            }
        };
        Ok(match b[0] {
            START => Relayed::Start {
                clip,
                origin: u64_at(&rest, 0)?,
                header: rest.slice(8..),
            },
            DATA => {
                let s = rest.get(..4).ok_or(ClusterError::Short)?;
                Relayed::Data {
                    clip,
                    packets: u32::from_be_bytes([s[0], s[1], s[2], s[3]]),
                    records: rest.slice(4..),
                }
            }
            END => {
                let end = ClipEnd {
                    packet_count: u64_at(&rest, 0)?,
                    final_granule: u64_at(&rest, 8)?,
                };
                exact(&rest, 16)?;
                Relayed::End { clip, end }
            }
            CUT => {
                let code = ErrorCode::from_u64(u64_at(&rest, 0)?);
                exact(&rest, 8)?;
                Relayed::Cut { clip, code }
            }
            ACK => Relayed::Ack {
                clip,
                recipient: std::str::from_utf8(&rest)
                    .map_err(|_| ClusterError::Utf8)?
                    .to_owned(),
            },
            KEPT => Relayed::Kept {
                clip,
                seq: u64_at(&rest, 0)?,
                recipient: std::str::from_utf8(&rest[8..])
                    .map_err(|_| ClusterError::Utf8)?
                    .to_owned(),
            },
            k => return Err(ClusterError::Kind(k)),
        })
    }
}

/// A NATS subject token for a user id or channel name: lowercase hex of
/// its UTF-8 bytes (ids may hold `.`, `*`, `>` or spaces, which subjects
/// cannot).
pub fn subject_token(name: &str) -> String {
    let mut s = String::with_capacity(2 * name.len());
    for b in name.bytes() {
        s.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        s.push(char::from_digit(u32::from(b & 15), 16).unwrap_or('0'));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u8) -> ClipId {
        ClipId([n; 16])
    }

    fn samples() -> Vec<Relayed> {
        vec![
            Relayed::Start {
                clip: id(1),
                origin: 0xdead_beef_0000_0001,
                header: Bytes::from_static(b"\x10delivery"),
            },
            Relayed::Data {
                clip: id(2),
                packets: 3,
                records: Bytes::from_static(b"\x02ab\x01c\x00"),
            },
            Relayed::End {
                clip: id(3),
                end: ClipEnd {
                    packet_count: 50,
                    final_granule: 48_312,
                },
            },
            Relayed::Cut {
                clip: id(4),
                code: ErrorCode::Preempted,
            },
            Relayed::Ack {
                clip: id(5),
                recipient: "bob.smith@example".into(),
            },
            Relayed::Kept {
                clip: id(6),
                seq: 77,
                recipient: "carol".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            assert_eq!(Relayed::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn truncated_or_padded_messages_are_refused() {
        for m in samples() {
            let b = m.encode();
            for cut in 0..17 {
                assert_eq!(Relayed::decode(&b.slice(..cut)), Err(ClusterError::Short));
            }
            if matches!(m, Relayed::End { .. } | Relayed::Cut { .. }) {
                let mut long = b.to_vec();
                long.push(0);
                assert_eq!(
                    Relayed::decode(&Bytes::from(long)),
                    Err(ClusterError::Trailing)
                );
                assert_eq!(
                    Relayed::decode(&b.slice(..b.len() - 1)),
                    Err(ClusterError::Short)
                );
            }
        }
        let mut bad = samples()[0].encode().to_vec();
        bad[0] = 9;
        assert_eq!(
            Relayed::decode(&Bytes::from(bad)),
            Err(ClusterError::Kind(9))
        );
    }

    #[test]
    fn data_from_several_runs_is_one_record_run() {
        let runs = [Bytes::from_static(b"\x02ab"), Bytes::from_static(b"\x01c")];
        let joined = Relayed::Data {
            clip: id(7),
            packets: 2,
            records: Bytes::from_static(b"\x02ab\x01c"),
        };
        assert_eq!(Relayed::encode_data(id(7), 2, &runs), joined.encode());
    }

    #[test]
    fn subject_tokens_are_safe_and_distinct() {
        assert_eq!(subject_token("a.b"), "612e62");
        assert_ne!(subject_token("ab"), subject_token("a.b"));
        assert!(subject_token("x *>").chars().all(|c| c.is_ascii_hexdigit()));
    }

    proptest! {
        #[test]
        fn decode_is_total(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let b = Bytes::from(b);
            if let Ok(m) = Relayed::decode(&b) {
                // What decodes encodes back to the same bytes.
                prop_assert_eq!(m.encode(), b);
            }
        }
    }
}
