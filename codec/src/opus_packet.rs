//! Structure checks of one Opus packet (RFC 6716 §3.1–§3.4) without
//! decoding it: the TOC byte, the frame count and every frame length.
//! This is what lets the relay refuse garbage and know a clip's duration
//! without linking libopus.

/// Largest frame RFC 6716 allows (§3.2.1).
pub const MAX_FRAME_BYTES: usize = 1275;
/// Longest packet RFC 6716 allows: 120 ms at 48 kHz (§3.2.5).
pub const MAX_PACKET_SAMPLES: u32 = 5760;

/// What the TOC byte and frame-count byte say about a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    /// Number of frames in the packet (1..=48).
    pub frames: u32,
    /// Samples per frame at 48 kHz (120..=2880).
    pub samples_per_frame: u32,
    /// Whether the TOC's stereo flag is set.
    pub stereo: bool,
}

impl PacketInfo {
    /// Packet duration in samples at 48 kHz.
    pub fn samples(&self) -> u32 {
        self.frames * self.samples_per_frame
    }
}

/// Samples per frame at 48 kHz for a TOC `config` (Table 2 of RFC 6716).
fn frame_samples(config: u8) -> u32 {
    match config {
        // SILK-only: 10, 20, 40, 60 ms.
        0..=11 => [480, 960, 1920, 2880][usize::from(config % 4)],
        // Hybrid: 10, 20 ms.
        12..=15 => [480, 960][usize::from(config % 2)],
        // CELT-only: 2.5, 5, 10, 20 ms.
        _ => [120, 240, 480, 960][usize::from(config % 4)],
    }
}

/// Reads a frame length coded as in RFC 6716 §3.2.1: one byte below 252,
/// otherwise two. Returns (length, bytes used).
fn frame_len(buf: &[u8]) -> Result<(usize, usize), &'static str> {
    match buf {
        [] => Err("frame length missing"),
        [b0, ..] if *b0 < 252 => Ok((usize::from(*b0), 1)),
        [_] => Err("two-byte frame length cut short"),
        [b0, b1, ..] => Ok((usize::from(*b1) * 4 + usize::from(*b0), 2)),
    }
}

/// Checks `packet` against requirements R1–R7 of RFC 6716 §3.4.
pub fn parse(packet: &[u8]) -> Result<PacketInfo, &'static str> {
    let (&toc, rest) = packet.split_first().ok_or("empty packet")?;
    let config = toc >> 3;
    let stereo = toc & 0x4 != 0;
    let samples_per_frame = frame_samples(config);
    let frames = match toc & 0x3 {
        // One frame.
        0 => {
            if rest.len() > MAX_FRAME_BYTES {
                return Err("frame longer than 1275 bytes");
            }
            1
        }
        // Two frames of equal size.
        1 => {
            if rest.len() % 2 != 0 {
                return Err("code 1 packet with odd payload length");
            }
            if rest.len() / 2 > MAX_FRAME_BYTES {
                return Err("frame longer than 1275 bytes");
            }
            2
        }
        // Two frames, the first length coded.
        2 => {
            let (first, used) = frame_len(rest)?;
            let body = rest.len() - used;
            if first > body {
                return Err("code 2 first frame longer than packet");
            }
            if first > MAX_FRAME_BYTES || body - first > MAX_FRAME_BYTES {
                return Err("frame longer than 1275 bytes");
            }
            2
        }
        // Arbitrary number of frames.
        _ => {
            let (&fc, mut rest) = rest
                .split_first()
                .ok_or("code 3 frame count byte missing")?;
            let vbr = fc & 0x80 != 0;
            let padded = fc & 0x40 != 0;
            let count = u32::from(fc & 0x3f);
            if count == 0 {
                return Err("code 3 packet with zero frames");
            }
            if count * samples_per_frame > MAX_PACKET_SAMPLES {
                return Err("packet longer than 120 ms");
            }
            let mut padding = 0usize;
            if padded {
                loop {
                    let (&p, tail) = rest.split_first().ok_or("padding length cut short")?;
                    rest = tail;
                    if p == 255 {
                        padding += 254;
                    } else {
                        padding += usize::from(p);
                        break;
                    }
                }
            }
            if vbr {
                let mut sum = 0usize;
                for _ in 0..count - 1 {
                    let (n, used) = frame_len(rest)?;
                    rest = &rest[used..];
                    if n > MAX_FRAME_BYTES {
                        return Err("frame longer than 1275 bytes");
                    }
                    sum += n;
                }
                let last = rest
                    .len()
                    .checked_sub(sum + padding)
                    .ok_or("frame lengths exceed packet")?;
                if last > MAX_FRAME_BYTES {
                    return Err("frame longer than 1275 bytes");
                }
            } else {
                let body = rest
                    .len()
                    .checked_sub(padding)
                    .ok_or("padding exceeds packet")?;
                if body % count as usize != 0 {
                    return Err("code 3 CBR payload not a multiple of the frame count");
                }
                if body / count as usize > MAX_FRAME_BYTES {
                    return Err("frame longer than 1275 bytes");
                }
            }
            count
        }
    };
    Ok(PacketInfo {
        frames,
        samples_per_frame,
        stereo,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code0_durations() {
        // config 1 = SILK NB 20 ms; config 31 = CELT FB 20 ms; 16 = CELT 2.5 ms.
        assert_eq!(parse(&[1 << 3, 0xaa]).unwrap().samples(), 960);
        assert_eq!(parse(&[31 << 3]).unwrap().samples(), 960);
        assert_eq!(parse(&[16 << 3, 1, 2]).unwrap().samples(), 120);
        assert_eq!(
            parse(&[3 << 3 | 4, 1]).unwrap(),
            PacketInfo {
                frames: 1,
                samples_per_frame: 2880,
                stereo: true
            }
        );
    }

    #[test]
    fn r_rules() {
        assert!(parse(&[]).is_err(), "R1");
        let mut big = vec![0u8; 1277];
        assert!(parse(&big).is_err(), "R2");
        big.truncate(1276);
        assert!(parse(&big).is_ok());
        assert!(parse(&[1, 0, 0, 0]).is_err(), "R3 odd");
        assert_eq!(parse(&[1, 0, 0]).unwrap().frames, 2);
        assert!(parse(&[2]).is_err(), "R4 missing length");
        assert!(parse(&[2, 5, 1, 2]).is_err(), "R4 too long");
        assert_eq!(parse(&[2, 1, 9, 9]).unwrap().frames, 2);
        assert!(parse(&[2, 252]).is_err(), "R4 two-byte length cut");
        assert!(parse(&[3]).is_err(), "R5 no count");
        assert!(parse(&[3, 0]).is_err(), "R5 zero frames");
        // 7 frames of 20 ms = 140 ms > 120 ms.
        assert!(parse(&[1 << 3 | 3, 7]).is_err(), "R5 too long");
        assert_eq!(parse(&[1 << 3 | 3, 6]).unwrap().samples(), 5760);
        // CBR: 3 frames, 5 bytes: not a multiple.
        assert!(parse(&[3, 3, 1, 2, 3, 4, 5]).is_err(), "R6");
        assert_eq!(parse(&[3, 3, 1, 2, 3, 4, 5, 6]).unwrap().frames, 3);
        // Padding: flag + 255 (254) + 1 = 255 bytes of padding, not present.
        assert!(parse(&[3, 0x41, 255, 1]).is_err(), "R6 padding");
        // VBR: 2 frames, first 2 bytes, last 1.
        assert_eq!(parse(&[3, 0x82, 2, 7, 7, 7]).unwrap().frames, 2);
        assert!(parse(&[3, 0x82, 9, 7, 7, 7]).is_err(), "R7");
    }

    #[test]
    fn never_panics_on_short_garbage() {
        for a in 0..=255u8 {
            for b in [0u8, 1, 63, 64, 128, 200, 251, 252, 255] {
                let _ = parse(&[a, b]);
                let _ = parse(&[a, b, b]);
                let _ = parse(&[a]);
            }
        }
    }
}
