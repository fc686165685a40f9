//! Clip audio for load: real Opus packets, so packet sizes are realistic.
//! Either an Ogg Opus file, or the built-in speech clip.

use bytes::Bytes;
use codec::ogg_opus::OggOpus;
use codec::wire::AudioFormat;

/// Packets to cut clips from.
#[derive(Debug, Clone)]
pub struct Source {
    pub format: AudioFormat,
    pub packets: Vec<Bytes>,
    /// Duration of each packet in samples at 48 kHz.
    pub packet_samples: Vec<u32>,
}

impl Source {
    pub fn from_ogg(f: OggOpus) -> anyhow::Result<Self> {
        anyhow::ensure!(!f.packets.is_empty(), "the Opus file has no packets");
        let packet_samples = f
            .packets
            .iter()
            .map(|p| codec::opus_packet::parse(p).map_or(960, |i| i.samples()))
            .collect();
        Ok(Self {
            format: f.format,
            packets: f.packets,
            packet_samples,
        })
    }

    /// The built-in clip: 9.3 s of espeak-ng speech encoded with
    /// `client-sim encode` at the defaults (16 kbit/s, 20 ms frames; about
    /// 35 bytes per packet, as real speech gives).
    pub fn builtin() -> anyhow::Result<Self> {
        Self::from_ogg(OggOpus::read(include_bytes!("../../assets/speech.opus"))?)
    }

    /// A clip of about `ms` milliseconds starting at packet `offset`,
    /// wrapping around: its packets and its final granule.
    pub fn cut(&self, offset: usize, ms: u64) -> (Vec<Bytes>, u64) {
        let want = ms * 48;
        let mut packets = Vec::new();
        let mut samples = 0u64;
        let mut i = offset % self.packets.len();
        while samples < want || packets.is_empty() {
            packets.push(self.packets[i].clone());
            samples += u64::from(self.packet_samples[i]);
            i = (i + 1) % self.packets.len();
        }
        (packets, samples)
    }

    /// A clip of a length uniform in `min..=max`, from a random offset.
    pub fn random_clip(
        &self,
        min: std::time::Duration,
        max: std::time::Duration,
        rng: &mut impl rand::Rng,
    ) -> (Vec<Bytes>, u64) {
        let span = max.saturating_sub(min);
        let ms = (min + span.mul_f64(rng.random::<f64>())).as_millis() as u64;
        self.cut(rng.random_range(0..self.len()), ms)
    }

    pub fn len(&self) -> usize {
        self.packets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_speech_has_voice_sized_packets() {
        let s = Source::builtin().unwrap();
        assert_eq!(s.len(), 466);
        let mean = s.packets.iter().map(|p| p.len()).sum::<usize>() / s.len();
        assert!((25..=60).contains(&mean), "mean packet {mean} B");
        let (p, g) = s.cut(460, 200);
        assert_eq!(p.len(), 10);
        assert_eq!(g, 9600);
    }
}
