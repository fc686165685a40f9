//! Ogg Opus files (RFC 7845): the format `opusenc` writes and every player
//! opens. Read into a [`OggOpus`] (packets as `Bytes`, header facts as an
//! [`AudioFormat`], the exact end as the final granule position) and written
//! back so that `opusdec` gives the same PCM.

use std::io::{self, Cursor, Write};

use bytes::Bytes;
use ogg::reading::PacketReader;
use ogg::writing::{PacketWriteEndInfo, PacketWriter};
use thiserror::Error;

use crate::opus_packet;
use crate::wire::AudioFormat;

/// Vendor string written into the OpusTags of files we make.
pub const VENDOR: &str = concat!("ptt-relay ", env!("CARGO_PKG_VERSION"));

/// Why an Ogg Opus file could not be read. None of these is recoverable for
/// that file: report it and skip the file.
#[derive(Debug, Error)]
pub enum OggOpusError {
    #[error("not a valid Ogg stream: {0}")]
    Ogg(String),
    #[error("the file has no packets")]
    Empty,
    #[error("not an Ogg Opus file: the first packet is not an OpusHead")]
    NotOpus,
    #[error("invalid OpusHead: {0}")]
    BadHead(&'static str),
    #[error("{0} channels (mapping family {1}) are not supported: only mono and stereo")]
    Unsupported(u8, u8),
    #[error("OpusTags packet missing or invalid")]
    BadTags,
    #[error("invalid Opus packet #{index}: {why}")]
    BadPacket { index: usize, why: &'static str },
    #[error("chained or multiplexed Ogg streams are not supported")]
    MultipleStreams,
    #[error("file larger than the limit of {0} bytes")]
    TooLarge(u64),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// An Ogg Opus file in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OggOpus {
    pub format: AudioFormat,
    /// OpusTags vendor string.
    pub vendor: String,
    /// OpusTags user comments (`KEY=value`).
    pub comments: Vec<String>,
    /// The Opus packets, in order, byte for byte.
    pub packets: Vec<Bytes>,
    /// Granule position of the last page (RFC 7845 §4): samples at 48 kHz
    /// from the start of decoding, pre-skip included. At most the packets'
    /// total duration; less when the encoder padded the last packet.
    pub final_granule: u64,
}

const HEAD_MAGIC: &[u8] = b"OpusHead";
const TAGS_MAGIC: &[u8] = b"OpusTags";

/// Largest file [`OggOpus::read_file`] loads (a minute of Opus at its
/// highest bitrate is under 4 MB).
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

impl OggOpus {
    /// A clip from packets; the final granule covers every sample.
    pub fn new(format: AudioFormat, packets: Vec<Bytes>) -> Self {
        let mut f = Self {
            format,
            vendor: VENDOR.to_owned(),
            comments: Vec::new(),
            packets,
            final_granule: 0,
        };
        f.final_granule = f.total_samples();
        f
    }

    /// Sum of the packets' durations in samples at 48 kHz.
    pub fn total_samples(&self) -> u64 {
        self.packets
            .iter()
            .map(|p| opus_packet::parse(p).map_or(0, |i| u64::from(i.samples())))
            .sum()
    }

    /// Playable duration in milliseconds (final granule less pre-skip).
    pub fn duration_ms(&self) -> u64 {
        self.final_granule
            .saturating_sub(u64::from(self.format.pre_skip))
            / 48
    }

    pub fn read_file(path: &std::path::Path) -> Result<Self, OggOpusError> {
        let len = std::fs::metadata(path)?.len();
        if len > MAX_FILE_BYTES {
            return Err(OggOpusError::TooLarge(MAX_FILE_BYTES));
        }
        Self::read(&std::fs::read(path)?)
    }

    /// Parses a whole Ogg Opus file.
    pub fn read(data: &[u8]) -> Result<Self, OggOpusError> {
        if data.is_empty() {
            return Err(OggOpusError::Empty);
        }
        let mut rdr = PacketReader::new(Cursor::new(data));
        let next = |rdr: &mut PacketReader<Cursor<&[u8]>>| {
            rdr.read_packet()
                .map_err(|e| OggOpusError::Ogg(e.to_string()))
        };
        let head = next(&mut rdr)?.ok_or(OggOpusError::Empty)?;
        let serial = head.stream_serial();
        let format = parse_head(&head.data)?;
        let tags = next(&mut rdr)?.ok_or(OggOpusError::BadTags)?;
        if tags.stream_serial() != serial {
            return Err(OggOpusError::MultipleStreams);
        }
        let (vendor, comments) = parse_tags(&tags.data).ok_or(OggOpusError::BadTags)?;
        let mut packets = Vec::new();
        let mut total = 0u64;
        let mut final_granule = None;
        while let Some(p) = next(&mut rdr)? {
            if p.stream_serial() != serial {
                return Err(OggOpusError::MultipleStreams);
            }
            let info = opus_packet::parse(&p.data).map_err(|why| OggOpusError::BadPacket {
                index: packets.len(),
                why,
            })?;
            total += u64::from(info.samples());
            if p.last_in_page() {
                final_granule = Some(p.absgp_page());
            }
            packets.push(Bytes::from(p.data));
        }
        let max = total;
        Ok(Self {
            format,
            vendor,
            comments,
            packets,
            // A last page granule past the audio cannot be honoured by any
            // decoder; treat it as "play everything".
            final_granule: final_granule.map_or(max, |g| g.min(max)),
        })
    }

    /// Writes the file: OpusHead and OpusTags on their own pages, then the
    /// packets on pages of about one second, the last page carrying
    /// [`OggOpus::final_granule`].
    pub fn write<W: Write>(&self, w: W, serial: u32) -> io::Result<W> {
        let mut pw = PacketWriter::new(w);
        pw.write_packet(
            head_bytes(&self.format),
            serial,
            PacketWriteEndInfo::EndPage,
            0,
        )?;
        let tags_end = if self.packets.is_empty() {
            PacketWriteEndInfo::EndStream
        } else {
            PacketWriteEndInfo::EndPage
        };
        pw.write_packet(
            tags_bytes(&self.vendor, &self.comments),
            serial,
            tags_end,
            0,
        )?;
        let mut granule = 0u64;
        let mut page_start = 0u64;
        let n = self.packets.len();
        for (i, p) in self.packets.iter().enumerate() {
            granule += opus_packet::parse(p).map_or(0, |i| u64::from(i.samples()));
            let (end, gp) = if i + 1 == n {
                (
                    PacketWriteEndInfo::EndStream,
                    self.final_granule.min(granule),
                )
            } else if granule - page_start >= 48_000 {
                page_start = granule;
                (PacketWriteEndInfo::EndPage, granule)
            } else {
                (PacketWriteEndInfo::NormalPacket, granule)
            };
            pw.write_packet(p.to_vec(), serial, end, gp)?;
        }
        Ok(pw.into_inner())
    }

    pub fn to_vec(&self, serial: u32) -> Vec<u8> {
        // Writing into a Vec cannot fail.
        self.write(Vec::new(), serial).unwrap_or_default()
    }
}

fn parse_head(d: &[u8]) -> Result<AudioFormat, OggOpusError> {
    if d.len() < 8 || &d[..8] != HEAD_MAGIC {
        return Err(OggOpusError::NotOpus);
    }
    if d.len() < 19 {
        return Err(OggOpusError::BadHead("shorter than 19 bytes"));
    }
    // Major version 0 (the high nibble); minor versions are compatible.
    if d[8] >> 4 != 0 {
        return Err(OggOpusError::BadHead("unsupported version"));
    }
    let channels = d[9];
    let mapping = d[18];
    if channels == 0 {
        return Err(OggOpusError::BadHead("zero channels"));
    }
    if mapping != 0 || channels > 2 {
        return Err(OggOpusError::Unsupported(channels, mapping));
    }
    Ok(AudioFormat {
        channels,
        pre_skip: u16::from_le_bytes([d[10], d[11]]),
        input_rate: u32::from_le_bytes([d[12], d[13], d[14], d[15]]),
        output_gain: i16::from_le_bytes([d[16], d[17]]),
    })
}

fn head_bytes(f: &AudioFormat) -> Vec<u8> {
    let mut v = Vec::with_capacity(19);
    v.extend_from_slice(HEAD_MAGIC);
    v.push(1);
    v.push(f.channels);
    v.extend_from_slice(&f.pre_skip.to_le_bytes());
    v.extend_from_slice(&f.input_rate.to_le_bytes());
    v.extend_from_slice(&f.output_gain.to_le_bytes());
    v.push(0);
    v
}

fn parse_tags(d: &[u8]) -> Option<(String, Vec<String>)> {
    let rest = d.strip_prefix(TAGS_MAGIC)?;
    let mut r = rest;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (a, b) = (r.get(..n)?, r.get(n..)?);
        r = b;
        Some(a)
    };
    let u32le = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let vlen = u32le(take(4)?);
    let vendor = String::from_utf8_lossy(take(vlen)?).into_owned();
    let count = u32le(take(4)?);
    let mut comments = Vec::new();
    for _ in 0..count {
        let n = u32le(take(4)?);
        comments.push(String::from_utf8_lossy(take(n)?).into_owned());
    }
    Some((vendor, comments))
}

fn tags_bytes(vendor: &str, comments: &[String]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(TAGS_MAGIC);
    v.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
    v.extend_from_slice(vendor.as_bytes());
    v.extend_from_slice(&(comments.len() as u32).to_le_bytes());
    for c in comments {
        v.extend_from_slice(&(c.len() as u32).to_le_bytes());
        v.extend_from_slice(c.as_bytes());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(n: usize) -> OggOpus {
        let packets = (0..n)
            .map(|i| {
                let mut p = vec![(i % 250) as u8; 1 + i % 300];
                p[0] = 31 << 3; // 20 ms CELT
                Bytes::from(p)
            })
            .collect();
        let mut f = OggOpus::new(
            AudioFormat {
                channels: 2,
                pre_skip: 312,
                input_rate: 44_100,
                output_gain: -256,
            },
            packets,
        );
        f.comments.push("TITLE=test".into());
        f
    }

    #[test]
    fn round_trip_keeps_everything() {
        for n in [1, 2, 49, 50, 51, 300] {
            let mut f = sample(n);
            f.final_granule -= 100; // exact end inside the last packet
            let bytes = f.to_vec(7);
            let back = OggOpus::read(&bytes).unwrap();
            assert_eq!(back, f, "n = {n}");
        }
    }

    #[test]
    fn large_packets_span_pages() {
        let mut f = sample(3);
        // An 80 ms packet of 4 frames of 20 ms, 4 * 1000 bytes: crosses the
        // 255-segment page boundary of the lacing table.
        let mut big = vec![7u8; 2 + 4 * 1000];
        big[0] = 31 << 3 | 3;
        big[1] = 4;
        f.packets.push(Bytes::from(big));
        f.final_granule = f.total_samples();
        assert_eq!(OggOpus::read(&f.to_vec(1)).unwrap(), f);
    }

    #[test]
    fn rejects_bad_files() {
        assert!(matches!(OggOpus::read(b""), Err(OggOpusError::Empty)));
        assert!(matches!(
            OggOpus::read(b"RIFF....WAVEfmt "),
            Err(OggOpusError::Ogg(_))
        ));
        // An Ogg file whose first packet is not OpusHead.
        let mut pw = PacketWriter::new(Vec::new());
        pw.write_packet(b"\x01vorbis".to_vec(), 1, PacketWriteEndInfo::EndStream, 0)
            .unwrap();
        assert!(matches!(
            OggOpus::read(&pw.into_inner()),
            Err(OggOpusError::NotOpus)
        ));
        // 6 channels (family 1).
        let mut f = sample(2);
        let mut bytes = f.to_vec(1);
        let at = bytes.windows(8).position(|w| w == HEAD_MAGIC).unwrap();
        bytes[at + 9] = 6;
        assert!(OggOpus::read(&bytes).is_err(), "CRC or channel check");
        // Truncated anywhere: an error or fewer packets, never a panic.
        f.packets.truncate(1);
        let bytes = sample(120).to_vec(3);
        for cut in (0..bytes.len()).step_by(97) {
            if let Ok(g) = OggOpus::read(&bytes[..cut]) {
                assert!(g.packets.len() < 120);
            }
        }
        // An invalid Opus packet inside a valid Ogg stream.
        let mut g = sample(2);
        g.packets[1] = Bytes::from_static(&[31 << 3 | 1, 0]);
        assert!(matches!(
            OggOpus::read(&g.to_vec(1)),
            Err(OggOpusError::BadPacket { index: 1, .. })
        ));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = OggOpus::read(&b);
        }

        #[test]
        fn corrupted_file_never_panics(pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut b = sample(60).to_vec(9);
            let i = pos.index(b.len());
            b[i] = byte;
            let _ = OggOpus::read(&b);
        }
    }
}
