//! Clip framing: after the header message, a clip stream carries Opus
//! packets as records `length (varint, >= 1) | packet`, then the end record
//! `0x00 | packet_count (varint) | final_granule (varint)`, then FIN.
//!
//! [`Framer`] is a sans-IO scanner of those records: feed it the unconsumed
//! bytes, it says how many form complete, valid records. It checks every
//! packet (RFC 6716 §3) and the clip limits as bytes arrive, so a relay can
//! forward exactly the validated prefix and refuse the rest at once.

use bytes::BufMut;

use crate::error::ClipError;
use crate::opus_packet;
use crate::varint;

/// The end record's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClipEnd {
    /// Number of packets the clip carried.
    pub packet_count: u64,
    /// Ogg granule position of the end of the clip (RFC 7845 §4): samples
    /// at 48 kHz from the start of decoding, pre-skip included. At most the
    /// packets' total duration; smaller values cut the end of the last
    /// packet (the encoder's padding).
    pub final_granule: u64,
}

impl ClipEnd {
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u8(0);
        varint::put(buf, self.packet_count);
        varint::put(buf, self.final_granule);
    }

    pub fn to_bytes(&self) -> bytes::Bytes {
        let mut b = bytes::BytesMut::with_capacity(17);
        self.encode(&mut b);
        b.freeze()
    }
}

/// Appends one packet record.
pub fn put_packet(buf: &mut impl BufMut, packet: &[u8]) {
    varint::put(buf, packet.len() as u64);
    buf.put_slice(packet);
}

/// The byte offset just past the first `n` packet records of `buf`; `None`
/// if `buf` ends first or holds an end record before them. (The records
/// were validated once; this only steps over them.)
pub fn skip_packets(buf: &[u8], n: u64) -> Option<usize> {
    let mut pos = 0;
    for _ in 0..n {
        let (len, used) = varint::get(buf.get(pos..)?)?;
        if len == 0 {
            return None;
        }
        pos = pos
            .checked_add(used)?
            .checked_add(usize::try_from(len).ok()?)?;
        if pos > buf.len() {
            return None;
        }
    }
    Some(pos)
}

/// Limits a [`Framer`] enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    pub max_packet_bytes: u64,
    /// Total Opus bytes of the clip.
    pub max_clip_bytes: u64,
    /// Total duration in samples at 48 kHz.
    pub max_clip_samples: u64,
}

impl FrameLimits {
    /// Limits from milliseconds.
    pub fn new(max_packet_bytes: u64, max_clip_bytes: u64, max_clip_ms: u64) -> Self {
        Self {
            max_packet_bytes,
            max_clip_bytes,
            max_clip_samples: max_clip_ms.saturating_mul(48),
        }
    }

    /// Generous limits for a receiver that trusts its relay's checks.
    pub fn permissive() -> Self {
        Self::new(64 * 1024, u64::MAX, u64::MAX / 48)
    }
}

/// Result of one [`Framer::scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// Bytes at the front of the input that are complete packet records.
    pub records: usize,
    /// When the end record followed them: its content and its size in bytes.
    pub end: Option<(ClipEnd, usize)>,
}

/// The longest an Opus packet plays: 120 ms at 48 kHz (RFC 6716 §3.2.5).
pub const MAX_PACKET_SAMPLES: u64 = 5760;

/// Scans packet records. See the module docs.
#[derive(Debug, Clone)]
pub struct Framer {
    limits: FrameLimits,
    /// The clip's pre-skip: decoded samples that are dropped, not played.
    pre_skip: u64,
    packets: u64,
    bytes: u64,
    samples: u64,
    ended: bool,
}

impl Framer {
    /// A framer for a clip with no pre-skip.
    pub fn new(limits: FrameLimits) -> Self {
        Self::for_clip(limits, 0)
    }

    /// A framer for a clip whose format has `pre_skip`. Its duration limit
    /// counts the audio the clip plays: from the end of the pre-skip to its
    /// final granule. While packets arrive, their total duration may exceed
    /// the limit by the pre-skip and one packet (the encoder's padding at
    /// the end); the end record then must bring the played audio within
    /// the limit. A 60.000 s recording thus fits a 60 s limit although its
    /// packets hold 60.02 s of samples.
    pub fn for_clip(limits: FrameLimits, pre_skip: u16) -> Self {
        Self {
            limits,
            pre_skip: u64::from(pre_skip),
            packets: 0,
            bytes: 0,
            samples: 0,
            ended: false,
        }
    }

    /// Most samples the packets may hold while they arrive.
    fn max_packet_samples(&self) -> u64 {
        self.limits
            .max_clip_samples
            .saturating_add(self.pre_skip)
            .saturating_add(MAX_PACKET_SAMPLES)
    }

    pub fn packets(&self) -> u64 {
        self.packets
    }

    /// Opus payload bytes so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Audio so far, in samples at 48 kHz.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Scans `buf`, which must start right after what earlier scans consumed
    /// (`records` plus the end record). Calls after the end record see any
    /// byte as an error.
    pub fn scan(&mut self, buf: &[u8]) -> Result<Scan, ClipError> {
        self.scan_with(buf, |_, _| {})
    }

    /// Like [`Framer::scan`], calling `on_packet(offset, packet)` for every
    /// complete packet, `offset` being where its bytes start in `buf`.
    pub fn scan_with(
        &mut self,
        buf: &[u8],
        mut on_packet: impl FnMut(usize, &[u8]),
    ) -> Result<Scan, ClipError> {
        if self.ended {
            return if buf.is_empty() {
                Ok(Scan {
                    records: 0,
                    end: None,
                })
            } else {
                Err(ClipError::TrailingBytes)
            };
        }
        let mut pos = 0;
        while let Some((len, n)) = varint::get(&buf[pos..]) {
            if len == 0 {
                let Some((packet_count, n1)) = varint::get(&buf[pos + n..]) else {
                    break;
                };
                let Some((final_granule, n2)) = varint::get(&buf[pos + n + n1..]) else {
                    break;
                };
                let end = ClipEnd {
                    packet_count,
                    final_granule,
                };
                self.check_end(&end)?;
                self.ended = true;
                return Ok(Scan {
                    records: pos,
                    end: Some((end, n + n1 + n2)),
                });
            }
            if len > self.limits.max_packet_bytes {
                return Err(ClipError::PacketTooLarge {
                    len,
                    max: self.limits.max_packet_bytes,
                });
            }
            if self.bytes + len > self.limits.max_clip_bytes {
                return Err(ClipError::TooLarge {
                    max_bytes: self.limits.max_clip_bytes,
                });
            }
            let start = pos + n;
            let Some(packet) = buf.get(start..start + len as usize) else {
                break;
            };
            let info = opus_packet::parse(packet).map_err(|why| ClipError::BadPacket {
                index: self.packets,
                why,
            })?;
            let samples = self.samples + u64::from(info.samples());
            if samples > self.max_packet_samples() {
                return Err(ClipError::TooLong {
                    max_ms: self.limits.max_clip_samples / 48,
                });
            }
            on_packet(start, packet);
            self.samples = samples;
            self.bytes += len;
            self.packets += 1;
            pos = start + len as usize;
        }
        Ok(Scan {
            records: pos,
            end: None,
        })
    }

    fn check_end(&self, end: &ClipEnd) -> Result<(), ClipError> {
        if end.packet_count != self.packets {
            return Err(ClipError::CountMismatch {
                claimed: end.packet_count,
                actual: self.packets,
            });
        }
        if self.packets == 0 {
            return Err(ClipError::Empty);
        }
        let max = self.samples;
        if end.final_granule > max {
            return Err(ClipError::BadGranule {
                granule: end.final_granule,
                max,
            });
        }
        if end.final_granule.saturating_sub(self.pre_skip) > self.limits.max_clip_samples {
            return Err(ClipError::TooLong {
                max_ms: self.limits.max_clip_samples / 48,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A valid 20 ms CELT packet of `n` bytes (n >= 1).
    fn pkt(n: usize, fill: u8) -> Vec<u8> {
        let mut p = vec![fill; n];
        p[0] = 31 << 3; // CELT FB 20 ms, code 0
        p
    }

    fn clip(packets: &[Vec<u8>], pre_skip: u64) -> Vec<u8> {
        let mut b = Vec::new();
        for p in packets {
            put_packet(&mut b, p);
        }
        ClipEnd {
            packet_count: packets.len() as u64,
            final_granule: 960 * packets.len() as u64 - pre_skip,
        }
        .encode(&mut b);
        b
    }

    fn limits() -> FrameLimits {
        FrameLimits::new(1275, 10_000, 60_000)
    }

    #[test]
    fn whole_clip_in_one_scan() {
        let packets = vec![pkt(40, 1), pkt(70, 2), pkt(1, 0)];
        let b = clip(&packets, 312);
        let mut f = Framer::new(limits());
        let mut seen = Vec::new();
        let s = f
            .scan_with(&b, |off, p| seen.push((off, p.to_vec())))
            .unwrap();
        assert_eq!(s.records, 1 + 40 + 2 + 70 + 1 + 1);
        let (end, n) = s.end.unwrap();
        assert_eq!(end.packet_count, 3);
        assert_eq!(s.records + n, b.len());
        assert_eq!(
            seen.iter().map(|x| x.1.clone()).collect::<Vec<_>>(),
            packets
        );
        assert_eq!(seen[1].0, 1 + 40 + 2);
        assert_eq!(f.samples(), 3 * 960);
        assert!(f.scan(&[1]).is_err(), "bytes after the end");
    }

    #[test]
    fn skip_packets_steps_over_whole_records_only() {
        let packets = vec![pkt(40, 1), pkt(70, 2), pkt(1, 0)];
        let b = clip(&packets, 312);
        assert_eq!(skip_packets(&b, 0), Some(0));
        assert_eq!(skip_packets(&b, 2), Some(1 + 40 + 2 + 70));
        assert_eq!(skip_packets(&b, 3), Some(1 + 40 + 2 + 70 + 1 + 1));
        // The end record is not a packet; and bytes that end mid-record.
        assert_eq!(skip_packets(&b, 4), None);
        assert_eq!(skip_packets(&b[..50], 2), None);
    }

    /// A 60.000 s recording (opusenc: pre-skip 312, 3,001 packets of
    /// 20 ms, the last one padded) fits a 60 s limit: the limit counts the
    /// audio the clip plays, not the samples its packets hold.
    #[test]
    fn a_sixty_second_recording_fits_a_sixty_second_limit() {
        let limits = FrameLimits::new(1275, u64::MAX, 60_000);
        let packets = vec![pkt(3, 0); 3001];
        let with_end = |granule: u64| {
            let mut b = Vec::new();
            for p in &packets {
                put_packet(&mut b, p);
            }
            ClipEnd {
                packet_count: 3001,
                final_granule: granule,
            }
            .encode(&mut b);
            b
        };
        let exact = 312 + 60 * 48_000;
        let s = Framer::for_clip(limits, 312)
            .scan(&with_end(exact))
            .unwrap();
        assert!(s.end.is_some());
        // One sample more of played audio is over the limit.
        assert!(matches!(
            Framer::for_clip(limits, 312).scan(&with_end(exact + 1)),
            Err(ClipError::TooLong { max_ms: 60_000 })
        ));
        // Packets beyond the limit, the pre-skip and one packet of padding
        // are refused as they arrive, before any end record.
        let mut f = Framer::for_clip(limits, 312);
        let mut b = Vec::new();
        for p in vec![pkt(3, 0); 3000 + 7] {
            put_packet(&mut b, &p);
        }
        assert!(matches!(f.scan(&b), Err(ClipError::TooLong { .. })));
    }

    #[test]
    fn limits_are_enforced_as_bytes_arrive() {
        // Declared length above max_packet_bytes is refused before the body.
        let mut b = Vec::new();
        varint::put(&mut b, 2000);
        assert!(matches!(
            Framer::new(limits()).scan(&b),
            Err(ClipError::PacketTooLarge { len: 2000, .. })
        ));
        // Clip byte budget.
        let mut f = Framer::new(FrameLimits::new(1275, 100, 60_000));
        let mut b = Vec::new();
        put_packet(&mut b, &pkt(60, 0));
        put_packet(&mut b, &pkt(60, 0));
        assert!(matches!(f.scan(&b), Err(ClipError::TooLarge { .. })));
        // Duration: 60 ms limit, 4 packets of 20 ms.
        let mut f = Framer::new(FrameLimits::new(1275, 10_000, 60));
        let b = clip(&vec![pkt(3, 0); 4], 0);
        assert!(matches!(f.scan(&b), Err(ClipError::TooLong { max_ms: 60 })));
        // Bad TOC structure (code 1 with odd payload).
        let mut b = Vec::new();
        put_packet(&mut b, &[31 << 3 | 1, 0]);
        assert!(matches!(
            Framer::new(limits()).scan(&b),
            Err(ClipError::BadPacket { index: 0, .. })
        ));
    }

    #[test]
    fn end_record_is_checked() {
        let mut b = Vec::new();
        put_packet(&mut b, &pkt(5, 0));
        ClipEnd {
            packet_count: 2,
            final_granule: 0,
        }
        .encode(&mut b);
        assert!(matches!(
            Framer::new(limits()).scan(&b),
            Err(ClipError::CountMismatch { .. })
        ));
        let mut b = Vec::new();
        put_packet(&mut b, &pkt(5, 0));
        ClipEnd {
            packet_count: 1,
            final_granule: 961,
        }
        .encode(&mut b);
        assert!(matches!(
            Framer::new(limits()).scan(&b),
            Err(ClipError::BadGranule { .. })
        ));
        let b = ClipEnd {
            packet_count: 0,
            final_granule: 0,
        }
        .to_bytes();
        assert_eq!(Framer::new(limits()).scan(&b), Err(ClipError::Empty));
    }

    proptest! {
        /// Feeding a clip in arbitrary pieces gives the same packets as one
        /// scan: nothing lost, nothing doubled, whatever the split points.
        #[test]
        fn split_anywhere(sizes in proptest::collection::vec(1usize..300, 1..30),
                          cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10)) {
            let packets: Vec<_> = sizes.iter().enumerate().map(|(i, &n)| pkt(n, i as u8)).collect();
            let b = clip(&packets, 0);
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(b.len() + 1)).collect();
            points.push(b.len());
            points.sort();
            let mut f = Framer::new(FrameLimits::new(1275, 1 << 20, 60_000));
            let mut pending = Vec::new();
            let mut got = Vec::new();
            let mut fed = 0;
            let mut ended = false;
            for p in points {
                pending.extend_from_slice(&b[fed..p]);
                fed = p;
                let s = f.scan_with(&pending, |_, pk| got.push(pk.to_vec())).unwrap();
                let used = s.records + s.end.map_or(0, |e| e.1);
                ended |= s.end.is_some();
                pending.drain(..used);
            }
            prop_assert!(ended);
            prop_assert!(pending.is_empty());
            prop_assert_eq!(got, packets);
        }

        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut f = Framer::new(limits());
            let _ = f.scan(&b);
        }
    }
}
