//! Opus decoding back to PCM (libopus), with packet-loss concealment and
//! in-band FEC for missing packets.

use super::{AudioError, Pcm, RATE};
use crate::ogg_opus::OggOpus;
use crate::opus_packet;
use crate::wire::AudioFormat;

/// Longest packet: 120 ms at 48 kHz.
const MAX_FRAME_SAMPLES: usize = 5760;
/// Duration assumed for a lost packet with no neighbour to tell: 20 ms.
const DEFAULT_LOST_SAMPLES: usize = 960;

fn dec_err(e: opus::Error) -> AudioError {
    AudioError::Decode {
        index: 0,
        why: e.to_string(),
    }
}

/// Samples per channel in packet `p`.
fn samples_of(p: &[u8]) -> Result<usize, AudioError> {
    opus_packet::parse(p)
        .map(|i| (i.samples() as usize).min(MAX_FRAME_SAMPLES))
        .map_err(|why| AudioError::Decode {
            index: 0,
            why: why.to_owned(),
        })
}

/// One clip's Opus packets to 48 kHz PCM, packet by packet (a live clip
/// as it arrives, or a whole one, [`decode_packets`]): the clip's pre-skip
/// dropped from the first samples, its output gain applied.
pub struct Decoder {
    dec: opus::Decoder,
    channels: usize,
    /// Pre-skip samples (per channel) still to drop.
    skip: usize,
    /// The output gain as a factor, when there is one.
    gain: Option<f32>,
    buf: Vec<f32>,
}

impl Decoder {
    pub fn new(format: &AudioFormat) -> Result<Decoder, AudioError> {
        let ch = match format.channels {
            1 => opus::Channels::Mono,
            2 => opus::Channels::Stereo,
            n => {
                return Err(AudioError::Decode {
                    index: 0,
                    why: format!("{n} channels"),
                });
            }
        };
        let channels = usize::from(format.channels);
        Ok(Decoder {
            dec: opus::Decoder::new(RATE, ch).map_err(dec_err)?,
            channels,
            skip: usize::from(format.pre_skip),
            gain: (format.output_gain != 0)
                .then(|| 10f32.powf(f32::from(format.output_gain) / (20.0 * 256.0))),
            buf: vec![0f32; MAX_FRAME_SAMPLES * channels],
        })
    }

    /// Decodes one packet (interleaved samples in [-1, 1]). `None`: a lost
    /// packet, concealed for 20 ms.
    pub fn decode(&mut self, packet: Option<&[u8]>) -> Result<Vec<f32>, AudioError> {
        match packet {
            Some(p) => self.run(p, samples_of(p)?, false),
            None => self.recover(DEFAULT_LOST_SAMPLES, None),
        }
    }

    /// A lost packet of `samples` per channel: rebuilt from the FEC data in
    /// `next` (the packet after it) when there is some, else concealed.
    pub fn recover(&mut self, samples: usize, next: Option<&[u8]>) -> Result<Vec<f32>, AudioError> {
        let samples = samples.min(MAX_FRAME_SAMPLES);
        match next {
            Some(q) => self.run(q, samples, true),
            None => self.run(&[], samples, false),
        }
    }

    /// [`Decoder::decode`] to 16-bit samples, as most speaker APIs take
    /// them.
    pub fn decode_i16(&mut self, packet: Option<&[u8]>) -> Result<Vec<i16>, AudioError> {
        Ok(self
            .decode(packet)?
            .into_iter()
            .map(|s| (s.clamp(-1.0, 1.0) * 32767.0) as i16)
            .collect())
    }

    fn run(&mut self, data: &[u8], samples: usize, fec: bool) -> Result<Vec<f32>, AudioError> {
        let n = self
            .dec
            .decode_float(data, &mut self.buf[..samples * self.channels], fec)
            .map_err(dec_err)?;
        let skip = self.skip.min(n);
        self.skip -= skip;
        let mut out = self.buf[skip * self.channels..n * self.channels].to_vec();
        if let Some(g) = self.gain {
            for s in &mut out {
                *s = (*s * g).clamp(-1.0, 1.0);
            }
        }
        Ok(out)
    }
}

/// Decodes packets to 48 kHz PCM with `format`'s channel count. `None`
/// marks a lost packet: it is rebuilt from the next packet's FEC data when
/// there is some, otherwise concealed (PLC) for the duration of its
/// neighbours. Pre-skip is dropped, `final_granule` (when given) cuts the
/// end exactly, and the output gain is applied.
pub fn decode_packets(
    format: &AudioFormat,
    packets: &[Option<&[u8]>],
    final_granule: Option<u64>,
) -> Result<Pcm, AudioError> {
    let mut dec = Decoder::new(format)?;
    let at = |index: usize| {
        move |e: AudioError| match e {
            AudioError::Decode { why, .. } => AudioError::Decode { index, why },
            other => other,
        }
    };
    let mut samples: Vec<f32> = Vec::new();
    let mut last_len = DEFAULT_LOST_SAMPLES;
    for (i, p) in packets.iter().enumerate() {
        let pcm = match p {
            Some(p) => {
                last_len = samples_of(p).map_err(at(i))?;
                dec.run(p, last_len, false)
            }
            None => {
                // The lost packet's length: its successor's, else the last.
                let next = packets.get(i + 1).copied().flatten();
                let len = next.and_then(|q| samples_of(q).ok()).unwrap_or(last_len);
                dec.recover(len, next)
            }
        };
        samples.extend(pcm.map_err(at(i))?);
    }
    if let Some(g) = final_granule {
        let real = g.saturating_sub(u64::from(format.pre_skip));
        let end = usize::try_from(real).unwrap_or(usize::MAX);
        samples.truncate(end.saturating_mul(usize::from(format.channels)));
    }
    Ok(Pcm {
        rate: RATE,
        channels: u16::from(format.channels),
        samples,
    })
}

/// Decodes an Ogg Opus file to 48 kHz PCM, as `opusdec` would.
pub fn decode(file: &OggOpus) -> Result<Pcm, AudioError> {
    let packets: Vec<Option<&[u8]>> = file.packets.iter().map(|p| Some(&p[..])).collect();
    decode_packets(&file.format, &packets, Some(file.final_granule))
}

#[cfg(test)]
mod tests {
    use super::super::encode::{EncoderConfig, encode};
    use super::*;

    fn tone(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 48_000.0).sin() * 0.3)
            .collect()
    }

    fn rms(s: &[f32]) -> f32 {
        (s.iter().map(|v| v * v).sum::<f32>() / s.len().max(1) as f32).sqrt()
    }

    #[test]
    fn round_trip_keeps_length_and_level() {
        let x = tone(48_000);
        let f = encode(&x, 48_000, &EncoderConfig::default()).unwrap();
        let y = decode(&f).unwrap();
        assert_eq!(y.samples.len(), x.len());
        let (a, b) = (rms(&x), rms(&y.samples[4800..]));
        assert!((a - b).abs() / a < 0.2, "rms {a} -> {b}");
    }

    #[test]
    fn lost_packets_are_concealed_with_and_without_fec() {
        let x = tone(48_000);
        for fec in [false, true] {
            let cfg = EncoderConfig {
                fec,
                ..EncoderConfig::default()
            };
            let f = encode(&x, 48_000, &cfg).unwrap();
            let mut pk: Vec<Option<&[u8]>> = f.packets.iter().map(|p| Some(&p[..])).collect();
            for i in (5..pk.len() - 1).step_by(7) {
                pk[i] = None;
            }
            let last = pk.len() - 1;
            pk[last] = None;
            let y = decode_packets(&f.format, &pk, Some(f.final_granule)).unwrap();
            assert_eq!(y.samples.len(), x.len(), "fec {fec}");
            // Concealment keeps sound going: no dropouts to silence.
            assert!(rms(&y.samples[4800..40_000]) > 0.1, "fec {fec}");
        }
    }

    #[test]
    fn broken_packets_are_errors() {
        let fmt = AudioFormat::default();
        // Code 3 with zero frames: structurally invalid.
        let e = decode_packets(&fmt, &[Some(&[0x03, 0x00])], None).unwrap_err();
        assert!(matches!(e, AudioError::Decode { index: 0, .. }), "{e}");
    }

    #[test]
    fn output_gain_is_applied() {
        let x = tone(9_600);
        let mut f = encode(&x, 48_000, &EncoderConfig::default()).unwrap();
        let plain = decode(&f).unwrap();
        f.format.output_gain = -6 * 256; // -6 dB
        let quiet = decode(&f).unwrap();
        let ratio = rms(&quiet.samples) / rms(&plain.samples);
        assert!((ratio - 0.501).abs() < 0.01, "{ratio}");
    }
}
