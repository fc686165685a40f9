//! WAV files in and out, with `hound`.

use std::io::{Read, Seek, Write};
use std::path::Path;

use hound::{SampleFormat, WavReader, WavSpec, WavWriter};

use super::{AudioError, Pcm};

/// Highest and lowest sample rates accepted: anything outside is a broken
/// or hostile header, not audio.
pub const MIN_RATE: u32 = 8_000;
pub const MAX_RATE: u32 = 384_000;
/// Most channels accepted (they are mixed down to mono).
pub const MAX_CHANNELS: u16 = 32;
/// Longest input read: ten minutes (clips are far shorter; this bounds
/// memory on a bad or hostile file).
pub const MAX_SECONDS: u64 = 600;

/// Reads a WAV file: 8/16/24/32-bit integer or 32-bit float PCM, any rate in
/// [`MIN_RATE`]..=[`MAX_RATE`], 1..=[`MAX_CHANNELS`] channels.
pub fn read_file(path: &Path) -> Result<Pcm, AudioError> {
    let f = std::fs::File::open(path)?;
    read(std::io::BufReader::new(f))
}

/// Reads WAV data from any reader.
pub fn read<R: Read>(r: R) -> Result<Pcm, AudioError> {
    let rdr = WavReader::new(r).map_err(|e| AudioError::Wav(e.to_string()))?;
    let spec = rdr.spec();
    if !(MIN_RATE..=MAX_RATE).contains(&spec.sample_rate) {
        return Err(AudioError::Rate(spec.sample_rate));
    }
    if spec.channels == 0 || spec.channels > MAX_CHANNELS {
        return Err(AudioError::Channels(spec.channels));
    }
    let frames = u64::from(rdr.duration());
    if frames > MAX_SECONDS * u64::from(spec.sample_rate) {
        return Err(AudioError::TooLong(MAX_SECONDS));
    }
    let trunc = |e: hound::Error| AudioError::Truncated(e.to_string());
    let samples: Vec<f32> = match (spec.sample_format, spec.bits_per_sample) {
        (SampleFormat::Float, 32) => rdr
            .into_samples::<f32>()
            .map(|s| {
                s.map(|v| {
                    if v.is_finite() {
                        v.clamp(-1.0, 1.0)
                    } else {
                        0.0
                    }
                })
            })
            .collect::<Result<_, _>>()
            .map_err(trunc)?,
        (SampleFormat::Int, bits @ (8 | 16 | 24 | 32)) => {
            let scale = 1.0 / (1u64 << (bits - 1)) as f32;
            rdr.into_samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<Result<_, _>>()
                .map_err(trunc)?
        }
        (SampleFormat::Float, bits) => {
            return Err(AudioError::SampleFormat {
                bits,
                format: "float",
            });
        }
        (SampleFormat::Int, bits) => {
            return Err(AudioError::SampleFormat {
                bits,
                format: "integer",
            });
        }
    };
    if samples.len() < usize::from(spec.channels) {
        return Err(AudioError::Empty);
    }
    Ok(Pcm {
        rate: spec.sample_rate,
        channels: spec.channels,
        samples,
    })
}

/// Writes 16-bit PCM WAV.
pub fn write_file(path: &Path, pcm: &Pcm) -> Result<(), AudioError> {
    let f = std::fs::File::create(path)?;
    write(std::io::BufWriter::new(f), pcm)
}

/// Writes 16-bit PCM WAV to any seekable writer.
pub fn write<W: Write + Seek>(w: W, pcm: &Pcm) -> Result<(), AudioError> {
    let spec = WavSpec {
        channels: pcm.channels,
        sample_rate: pcm.rate,
        bits_per_sample: 16,
        sample_format: SampleFormat::Int,
    };
    let err = |e: hound::Error| AudioError::Wav(e.to_string());
    let mut wr = WavWriter::new(w, spec).map_err(err)?;
    {
        let mut w16 = wr.get_i16_writer(pcm.samples.len() as u32);
        for &s in &pcm.samples {
            w16.write_sample((s.clamp(-1.0, 1.0) * 32767.0).round() as i16);
        }
        w16.flush().map_err(err)?;
    }
    wr.finalize().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn wav_bytes(spec: WavSpec, samples: &[i32]) -> Vec<u8> {
        let mut c = Cursor::new(Vec::new());
        let mut w = WavWriter::new(&mut c, spec).unwrap();
        for &s in samples {
            w.write_sample(s).unwrap();
        }
        w.finalize().unwrap();
        c.into_inner()
    }

    fn spec(rate: u32, channels: u16, bits: u16) -> WavSpec {
        WavSpec {
            channels,
            sample_rate: rate,
            bits_per_sample: bits,
            sample_format: SampleFormat::Int,
        }
    }

    #[test]
    fn round_trip_16_bit() {
        let pcm = Pcm {
            rate: 22_050,
            channels: 2,
            samples: (0..1000).map(|i| ((i as f32) / 50.0).sin() * 0.5).collect(),
        };
        let mut c = Cursor::new(Vec::new());
        write(&mut c, &pcm).unwrap();
        let back = read(Cursor::new(c.into_inner())).unwrap();
        assert_eq!((back.rate, back.channels), (22_050, 2));
        assert_eq!(back.samples.len(), pcm.samples.len());
        for (a, b) in back.samples.iter().zip(&pcm.samples) {
            assert!((a - b).abs() < 1.0 / 16_000.0);
        }
    }

    #[test]
    fn reads_8_24_32_bit() {
        for bits in [8u16, 24, 32] {
            let max = (1i64 << (bits - 1)) - 1;
            let b = wav_bytes(spec(8_000, 1, bits), &[0, max as i32, -(max as i32)]);
            let p = read(Cursor::new(b)).unwrap();
            assert!((p.samples[1] - 1.0).abs() < 0.01, "{bits}: {:?}", p.samples);
            assert!((p.samples[2] + 1.0).abs() < 0.01);
        }
    }

    #[test]
    fn bad_input_gets_clear_errors() {
        assert!(matches!(
            read(Cursor::new(b"not a wav file at all".to_vec())),
            Err(AudioError::Wav(_))
        ));
        assert!(matches!(
            read(Cursor::new(Vec::new())),
            Err(AudioError::Wav(_))
        ));
        // Zero-length data chunk.
        let b = wav_bytes(spec(16_000, 1, 16), &[]);
        assert!(matches!(read(Cursor::new(b)), Err(AudioError::Empty)));
        // Truncated: the header promises more data than there is.
        let mut b = wav_bytes(spec(16_000, 1, 16), &[1; 1000]);
        b.truncate(b.len() - 501);
        let e = read(Cursor::new(b)).unwrap_err();
        assert!(matches!(e, AudioError::Truncated(_)), "{e}");
        // Absurd rates.
        for rate in [1, 4_000, 1_000_000] {
            let b = wav_bytes(spec(rate, 1, 16), &[1, 2, 3]);
            assert!(matches!(read(Cursor::new(b)), Err(AudioError::Rate(r)) if r == rate));
        }
    }
}
