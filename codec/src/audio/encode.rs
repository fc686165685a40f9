//! Opus encoding with libopus (`opus` crate): voice application, wideband,
//! 16 kbit/s and 20 ms frames by default.

use bytes::Bytes;

use super::{AudioError, RATE};
use crate::ogg_opus::OggOpus;
use crate::wire::AudioFormat;

/// Encoder settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderConfig {
    /// Target bitrate in bit/s (6000..=128000).
    pub bitrate: u32,
    /// Frame duration in ms: 10, 20, 40 or 60.
    pub frame_ms: u32,
    /// Encoder effort 0..=10: lower is faster, higher sounds better at the
    /// same bitrate.
    pub complexity: u8,
    /// Discontinuous transmission: near-empty packets during silence.
    pub dtx: bool,
    /// In-band forward error correction (lets a receiver rebuild a lost
    /// packet from the next one), tuned for `expected_loss_pct`.
    pub fec: bool,
    /// Packet loss the encoder expects, in percent (0..=100); it spends
    /// bits on FEC accordingly.
    pub expected_loss_pct: u8,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            bitrate: 16_000,
            frame_ms: 20,
            complexity: 5,
            dtx: false,
            fec: false,
            expected_loss_pct: 10,
        }
    }
}

impl EncoderConfig {
    pub fn validate(&self) -> Result<(), AudioError> {
        if ![10, 20, 40, 60].contains(&self.frame_ms) {
            return Err(AudioError::Config(format!(
                "frame size {} ms: use 10, 20, 40 or 60",
                self.frame_ms
            )));
        }
        if !(6_000..=128_000).contains(&self.bitrate) {
            return Err(AudioError::Config(format!(
                "bitrate {} bit/s: use 6000..=128000",
                self.bitrate
            )));
        }
        if self.complexity > 10 {
            return Err(AudioError::Config(format!(
                "complexity {}: use 0..=10",
                self.complexity
            )));
        }
        if self.expected_loss_pct > 100 {
            return Err(AudioError::Config("expected loss over 100%".into()));
        }
        Ok(())
    }

    /// Samples per frame at 48 kHz.
    pub fn frame_samples(&self) -> usize {
        self.frame_ms as usize * 48
    }
}

/// Largest packet we let libopus write (one frame's ceiling).
const MAX_PACKET: usize = 1275 * 3 + 7;

/// An Opus encoder for 48 kHz mono voice.
pub struct Encoder {
    enc: opus::Encoder,
    config: EncoderConfig,
    lookahead: u16,
}

fn opus_err(e: opus::Error) -> AudioError {
    AudioError::Encode(e.to_string())
}

impl Encoder {
    pub fn new(config: EncoderConfig) -> Result<Self, AudioError> {
        config.validate()?;
        let mut enc = opus::Encoder::new(RATE, opus::Channels::Mono, opus::Application::Voip)
            .map_err(opus_err)?;
        enc.set_bitrate(opus::Bitrate::Bits(config.bitrate as i32))
            .map_err(opus_err)?;
        enc.set_bandwidth(opus::Bandwidth::Wideband)
            .map_err(opus_err)?;
        enc.set_signal(opus::Signal::Voice).map_err(opus_err)?;
        enc.set_complexity(i32::from(config.complexity))
            .map_err(opus_err)?;
        enc.set_dtx(config.dtx).map_err(opus_err)?;
        enc.set_inband_fec(config.fec).map_err(opus_err)?;
        enc.set_packet_loss_perc(if config.fec {
            i32::from(config.expected_loss_pct)
        } else {
            0
        })
        .map_err(opus_err)?;
        let lookahead = enc.get_lookahead().map_err(opus_err)?;
        Ok(Self {
            enc,
            config,
            lookahead: u16::try_from(lookahead).unwrap_or(312),
        })
    }

    /// Samples at 48 kHz the decoder must skip at the start (RFC 7845
    /// pre-skip).
    pub fn pre_skip(&self) -> u16 {
        self.lookahead
    }

    /// Encodes one frame of exactly [`EncoderConfig::frame_samples`]
    /// samples.
    pub fn encode_frame(&mut self, frame: &[f32]) -> Result<Bytes, AudioError> {
        if frame.len() != self.config.frame_samples() {
            return Err(AudioError::Encode(format!(
                "frame of {} samples, expected {}",
                frame.len(),
                self.config.frame_samples()
            )));
        }
        let mut out = [0u8; MAX_PACKET];
        let n = self.enc.encode_float(frame, &mut out).map_err(opus_err)?;
        Ok(Bytes::copy_from_slice(&out[..n]))
    }

    /// Encodes a whole clip of 48 kHz mono samples. The last frame is
    /// padded with silence; the file's final granule marks the true end, so
    /// a decoder gives back exactly `samples.len()` samples.
    pub fn encode_clip(&mut self, samples: &[f32], input_rate: u32) -> Result<OggOpus, AudioError> {
        if samples.is_empty() {
            return Err(AudioError::Empty);
        }
        let fs = self.config.frame_samples();
        let pre_skip = usize::from(self.lookahead);
        // Enough frames to flush the lookahead past the last real sample.
        let frames = (samples.len() + pre_skip).div_ceil(fs);
        let mut packets = Vec::with_capacity(frames);
        let mut buf = vec![0f32; fs];
        for i in 0..frames {
            let start = (i * fs).min(samples.len());
            let end = ((i + 1) * fs).min(samples.len());
            let n = end - start;
            buf[..n].copy_from_slice(&samples[start..end]);
            buf[n..].fill(0.0);
            packets.push(self.encode_frame(&buf)?);
        }
        let format = AudioFormat {
            channels: 1,
            pre_skip: self.lookahead,
            input_rate,
            output_gain: 0,
        };
        let mut f = OggOpus::new(format, packets);
        f.final_granule = (pre_skip + samples.len()) as u64;
        Ok(f)
    }
}

/// Encodes 48 kHz mono samples with `config`.
pub fn encode(
    samples: &[f32],
    input_rate: u32,
    config: &EncoderConfig,
) -> Result<OggOpus, AudioError> {
    Encoder::new(*config)?.encode_clip(samples, input_rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(n: usize) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.05).sin() * 0.3).collect()
    }

    #[test]
    fn clip_has_exact_length_and_valid_packets() {
        for frame_ms in [10, 20, 40, 60] {
            let cfg = EncoderConfig {
                frame_ms,
                ..EncoderConfig::default()
            };
            let f = encode(&tone(48_000 + 123), 48_000, &cfg).unwrap();
            assert_eq!(f.duration_ms(), 1002, "{frame_ms} ms frames");
            assert!(f.final_granule <= f.total_samples());
            for p in &f.packets {
                let info = crate::opus_packet::parse(p).unwrap();
                assert_eq!(info.samples() as usize, frame_ms as usize * 48);
            }
        }
    }

    #[test]
    fn bad_settings_are_refused() {
        for cfg in [
            EncoderConfig {
                frame_ms: 30,
                ..EncoderConfig::default()
            },
            EncoderConfig {
                bitrate: 1_000,
                ..EncoderConfig::default()
            },
            EncoderConfig {
                complexity: 11,
                ..EncoderConfig::default()
            },
        ] {
            assert!(matches!(Encoder::new(cfg), Err(AudioError::Config(_))));
        }
        assert!(matches!(
            encode(&[], 48_000, &EncoderConfig::default()),
            Err(AudioError::Empty)
        ));
    }

    #[test]
    fn dtx_makes_silence_cheap() {
        let silence = vec![0f32; 48_000 * 2];
        let plain = encode(&silence, 48_000, &EncoderConfig::default()).unwrap();
        let dtx = encode(
            &silence,
            48_000,
            &EncoderConfig {
                dtx: true,
                ..EncoderConfig::default()
            },
        )
        .unwrap();
        let bytes = |f: &OggOpus| f.packets.iter().map(|p| p.len()).sum::<usize>();
        assert!(
            bytes(&dtx) < bytes(&plain),
            "{} vs {}",
            bytes(&dtx),
            bytes(&plain)
        );
    }
}
