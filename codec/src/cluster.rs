//! Messages between relays of a cluster (carried over NATS; see
//! `docs/cluster.md`). Sans-IO: the relay publishes what [`encode`] gives
//! and feeds what it receives to [`decode`].
//!
//! A live clip crosses to the relays whose users need it as a run of
//! messages on one subject, in order: `Start`, `Data`..., then `End` or
//! `Cut`. Each `Data` says where its packets start in the clip, so a
//! receiver skips what it has (a run sent again after the origin's NATS
//! link came back) and notices what it missed ([`Run`]). An `Ack` goes back
//! to the relay that accepted a direct clip, so it can drop its stored
//! copy. `Kept` tells the relay a user is connected to that a clip for
//! them was just stored in the cluster's JetStream stream (at that
//! sequence), and `HistoryKept` tells the relays of a channel's members
//! that a clip entered the channel's history, so each is delivered even if
//! its live run was missed or broken.
//!
//! Layout (integers big-endian): `kind:u8 | clip_id[16] | rest`, where
//! `rest` is
//!
//! | kind | rest |
//! |---|---|
//! | 1 `Start` | `origin:u64` then the clip's `Delivery` message (protocol encoding, `live = true`) |
//! | 3 `End` | `packet_count:u64 final_granule:u64` |
//! | 4 `Cut` | `code:u64` (protocol error code) |
//! | 5 `Ack` | the recipient's user id (UTF-8) |
//! | 7 `Data` | `offset:u64` (packets of the clip before this run) `packets:u32` then packet records (`varint len | Opus packet`...) as validated by the origin |
//! | 8 `Kept` | `seq:u64` (stream sequence) `origin:u64` then the recipient's user id (UTF-8) |
//! | 9 `HistoryKept` | `seq:u64` (sequence in the history stream) |
//! | 10 `Present` | nothing (the clip id is all zeros): a request on a user's subject, "is this user connected to you?"; a relay where it is answers (an empty reply), NATS says "no responders" when none is |
//!
//! Kinds 2 and 6 were `Data` and `Kept` without offset and origin; a relay
//! drops them (and any unknown kind) as it drops a malformed message, so a
//! relay of the older layout in the same cluster costs live runs (their
//! clips still arrive stored), never a misread clip.

use bytes::{BufMut, Bytes, BytesMut};

use crate::ErrorCode;
use crate::framing::ClipEnd;
use crate::wire::ClipId;

const START: u8 = 1;
const END: u8 = 3;
const CUT: u8 = 4;
const ACK: u8 = 5;
const DATA: u8 = 7;
const KEPT: u8 = 8;
const HISTORY_KEPT: u8 = 9;
const PRESENT: u8 = 10;

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
    /// Packet records, in order: `packets` of them, the first being the
    /// clip's packet number `offset` (from 0).
    Data {
        clip: ClipId,
        offset: u64,
        packets: u32,
        records: Bytes,
    },
    /// The clip is complete (accepted and stored by its origin).
    End { clip: ClipId, end: ClipEnd },
    /// The clip will not complete.
    Cut { clip: ClipId, code: ErrorCode },
    /// `recipient` has the clip.
    Ack { clip: ClipId, recipient: String },
    /// The clip is stored for `recipient` at stream sequence `seq`;
    /// `origin` (a relay id) accepted it and takes the recipient's ack.
    Kept {
        clip: ClipId,
        seq: u64,
        origin: u64,
        recipient: String,
    },
    /// The channel clip is in the channel's history at sequence `seq`.
    HistoryKept { clip: ClipId, seq: u64 },
    /// Is the user of this subject connected to you? (A request.)
    Present,
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
            | Relayed::Kept { clip, .. }
            | Relayed::HistoryKept { clip, .. } => *clip,
            Relayed::Present => ClipId([0; 16]),
        }
    }

    /// Encodes the message (one copy of a `Data`'s records).
    pub fn encode(&self) -> Bytes {
        let (kind, extra) = match self {
            // Built by `encode_data`, before any buffer here is allocated.
            Relayed::Data {
                clip,
                offset,
                packets,
                records,
            } => {
                let runs = std::slice::from_ref(records);
                return Relayed::encode_data(*clip, *offset, *packets, runs);
            }
            Relayed::Start { header, .. } => (START, 8 + header.len()),
            Relayed::End { .. } => (END, 16),
            Relayed::Cut { .. } => (CUT, 8),
            Relayed::Ack { recipient, .. } => (ACK, recipient.len()),
            Relayed::Kept { recipient, .. } => (KEPT, 16 + recipient.len()),
            Relayed::HistoryKept { .. } => (HISTORY_KEPT, 8),
            Relayed::Present => (PRESENT, 0),
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
            Relayed::Kept {
                seq,
                origin,
                recipient,
                ..
            } => {
                b.put_u64(*seq);
                b.put_u64(*origin);
                b.put_slice(recipient.as_bytes());
            }
            Relayed::HistoryKept { seq, .. } => b.put_u64(*seq),
            Relayed::Present => {}
        }
        b.freeze()
    }

    /// Encodes a `Data` whose records are the concatenation of `runs`,
    /// copying each once (a live clip's segments go out without being
    /// joined first).
    pub fn encode_data(clip: ClipId, offset: u64, packets: u32, runs: &[Bytes]) -> Bytes {
        let len: usize = runs.iter().map(Bytes::len).sum();
        let mut b = BytesMut::with_capacity(29 + len);
        b.put_u8(DATA);
        b.put_slice(&clip.0);
        b.put_u64(offset);
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
                let s = rest.get(8..12).ok_or(ClusterError::Short)?;
                Relayed::Data {
                    clip,
                    offset: u64_at(&rest, 0)?,
                    packets: u32::from_be_bytes([s[0], s[1], s[2], s[3]]),
                    records: rest.slice(12..),
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
                origin: u64_at(&rest, 8)?,
                recipient: std::str::from_utf8(&rest[16..])
                    .map_err(|_| ClusterError::Utf8)?
                    .to_owned(),
            },
            HISTORY_KEPT => {
                let seq = u64_at(&rest, 0)?;
                exact(&rest, 8)?;
                Relayed::HistoryKept { clip, seq }
            }
            PRESENT => {
                exact(&rest, 0)?;
                if clip != ClipId([0; 16]) {
                    return Err(ClusterError::Trailing);
                }
                Relayed::Present
            }
            k => return Err(ClusterError::Kind(k)),
        })
    }
}

/// Where a receiving relay is in a relayed clip: how many of its packets it
/// has, so it can tell which part of each `Data` is new. An origin whose
/// NATS link broke sends the run again from packet 0 once it is back; a
/// message lost with the link leaves a gap, which cuts the live run (the
/// clip then comes from the cluster's store). Sans-IO: fed each `Data`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    have: u64,
}

/// What a receiver does with one `Data` ([`Run::take`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// These records (the end of the message's, `packets` of them) are
    /// new: validate and append them.
    New { records: Bytes, packets: u64 },
    /// Nothing new: the run was sent again.
    Repeat,
    /// Packets from `have` up to `offset` never came: the run is broken.
    Gap { have: u64, offset: u64 },
    /// The records do not hold the packets the message says.
    Malformed,
}

impl Run {
    /// Packets received so far.
    pub fn have(&self) -> u64 {
        self.have
    }

    /// Takes a `Data` of `packets` records starting at packet `offset`.
    pub fn take(&mut self, offset: u64, packets: u32, records: &Bytes) -> Take {
        if offset > self.have {
            return Take::Gap {
                have: self.have,
                offset,
            };
        }
        let end = offset + u64::from(packets);
        if end <= self.have {
            return Take::Repeat;
        }
        let Some(at) = crate::framing::skip_packets(records, self.have - offset) else {
            return Take::Malformed;
        };
        let new = end - self.have;
        let tail = records.slice(at..);
        if crate::framing::skip_packets(&tail, new) != Some(tail.len()) {
            return Take::Malformed;
        }
        self.have = end;
        Take::New {
            records: tail,
            packets: new,
        }
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

/// The name a [`subject_token`] was made from; `None` for a token that is
/// not lowercase hex of UTF-8.
pub fn subject_name(token: &str) -> Option<String> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let hex = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let bytes = token
        .as_bytes()
        .chunks(2)
        .map(|p| Some(hex(p[0])? << 4 | hex(p[1])?))
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
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
                offset: 40,
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
                origin: 0x0123_4567_89ab_cdef,
                recipient: "carol".into(),
            },
            Relayed::HistoryKept {
                clip: id(8),
                seq: 1_000_001,
            },
            Relayed::Present,
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
            if matches!(
                m,
                Relayed::End { .. } | Relayed::Cut { .. } | Relayed::HistoryKept { .. }
            ) {
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
        // Unknown kinds, and the older layouts of Data (2) and Kept (6).
        for kind in [2, 6, 11] {
            let mut bad = samples()[0].encode().to_vec();
            bad[0] = kind;
            assert_eq!(
                Relayed::decode(&Bytes::from(bad)),
                Err(ClusterError::Kind(kind))
            );
        }
    }

    /// Packet records `\x01 n` for n in `from..to`.
    fn records(from: u8, to: u8) -> Bytes {
        Bytes::from((from..to).flat_map(|n| [1, n]).collect::<Vec<u8>>())
    }

    #[test]
    fn a_run_takes_new_packets_once_skips_repeats_and_sees_gaps() {
        let mut run = Run::default();
        assert_eq!(
            run.take(0, 3, &records(0, 3)),
            Take::New {
                records: records(0, 3),
                packets: 3
            }
        );
        // The origin sends the run again from 0 (its link came back): only
        // the packets not had yet are new.
        assert_eq!(run.take(0, 2, &records(0, 2)), Take::Repeat);
        assert_eq!(
            run.take(0, 5, &records(0, 5)),
            Take::New {
                records: records(3, 5),
                packets: 2
            }
        );
        assert_eq!(run.have(), 5);
        // A message lost on the way: the run is broken, nothing taken.
        assert_eq!(
            run.take(7, 1, &records(7, 8)),
            Take::Gap { have: 5, offset: 7 }
        );
        assert_eq!(run.have(), 5);
        // Records short of (or beyond) what the message claims.
        assert_eq!(run.take(0, 9, &records(0, 5)), Take::Malformed);
        assert_eq!(run.take(5, 1, &records(5, 7)), Take::Malformed);
        assert_eq!(run.have(), 5);
    }

    #[test]
    fn data_from_several_runs_is_one_record_run() {
        let runs = [Bytes::from_static(b"\x02ab"), Bytes::from_static(b"\x01c")];
        let joined = Relayed::Data {
            clip: id(7),
            offset: 5,
            packets: 2,
            records: Bytes::from_static(b"\x02ab\x01c"),
        };
        assert_eq!(Relayed::encode_data(id(7), 5, 2, &runs), joined.encode());
    }

    #[test]
    fn subject_tokens_are_safe_and_distinct() {
        assert_eq!(subject_token("a.b"), "612e62");
        assert_ne!(subject_token("ab"), subject_token("a.b"));
        assert!(subject_token("x *>").chars().all(|c| c.is_ascii_hexdigit()));
        for name in ["a.b", "dispatch desk 1", "é>*", ""] {
            assert_eq!(subject_name(&subject_token(name)).as_deref(), Some(name));
        }
        for junk in ["6", "zz", "612E62", "ff"] {
            assert_eq!(subject_name(junk), None, "{junk}");
        }
    }

    proptest! {
        /// However a clip's packets are cut into runs, and whichever runs
        /// are sent again from the start, what a receiver takes is the
        /// clip once, in order.
        #[test]
        fn a_run_rebuilds_the_clip_from_runs_and_resends(
            cuts in proptest::collection::vec(1u8..6, 1..12),
            resend_after in proptest::collection::vec(any::<bool>(), 12),
        ) {
            let mut run = Run::default();
            let mut got = Vec::new();
            let mut sent = 0u8;
            for (i, n) in cuts.iter().enumerate() {
                let from = sent;
                sent += n;
                let t = run.take(u64::from(from), u32::from(*n), &records(from, sent));
                if let Take::New { records, .. } = t {
                    got.extend_from_slice(&records);
                }
                if resend_after[i] {
                    // The origin's link came back: everything again from 0.
                    let t = run.take(0, u32::from(sent), &records(0, sent));
                    prop_assert_eq!(t, Take::Repeat);
                }
            }
            prop_assert_eq!(Bytes::from(got), records(0, sent));
            prop_assert_eq!(run.have(), u64::from(sent));
        }

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
