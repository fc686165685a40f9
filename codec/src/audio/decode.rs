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

fn dec_err(index: usize) -> impl Fn(opus::Error) -> AudioError {
    move |e| AudioError::Decode {
        index,
        why: e.to_string(),
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
    let nch = usize::from(format.channels);
    let mut dec = opus::Decoder::new(RATE, ch).map_err(dec_err(0))?;
    let mut out: Vec<f32> = Vec::new();
    let mut buf = vec![0f32; MAX_FRAME_SAMPLES * nch];
    let samples_of = |p: &[u8]| opus_packet::parse(p).map(|i| i.samples() as usize);
    let mut last_len = DEFAULT_LOST_SAMPLES;
    for (i, p) in packets.iter().enumerate() {
        let n = match p {
            Some(p) => {
                let want = samples_of(p).map_err(|why| AudioError::Decode {
                    index: i,
                    why: why.to_owned(),
                })?;
                let n = dec
                    .decode_float(p, &mut buf[..want * nch], false)
                    .map_err(dec_err(i))?;
                last_len = want;
                n
            }
            None => {
                // The lost packet's length: its successor's, else the last.
                let next = packets.get(i + 1).copied().flatten();
                let len = next.and_then(|q| samples_of(q).ok()).unwrap_or(last_len);
                match next {
                    // FEC data in the next packet rebuilds this one.
                    Some(q) => dec.decode_float(q, &mut buf[..len * nch], true),
                    None => dec.decode_float(&[], &mut buf[..len * nch], false),
                }
                .map_err(dec_err(i))?
            }
        };
        out.extend_from_slice(&buf[..n * nch]);
    }
    let skip = usize::from(format.pre_skip) * nch;
    let mut end = out.len();
    if let Some(g) = final_granule {
        end = end.min(usize::try_from(g).unwrap_or(usize::MAX).saturating_mul(nch));
    }
    let mut samples = if skip < end {
        out[skip..end].to_vec()
    } else {
        Vec::new()
    };
    if format.output_gain != 0 {
        let gain = 10f32.powf(f32::from(format.output_gain) / (20.0 * 256.0));
        for s in &mut samples {
            *s = (*s * gain).clamp(-1.0, 1.0);
        }
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
