//! Any rate and channel count to 48 kHz mono, with `rubato`'s FFT
//! resampler (synchronous, fixed ratio).

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler};

use super::{AudioError, Pcm, RATE};

/// Mixes all channels down to one (their mean).
pub fn downmix(pcm: &Pcm) -> Vec<f32> {
    let ch = usize::from(pcm.channels.max(1));
    if ch == 1 {
        return pcm.samples.clone();
    }
    let scale = 1.0 / ch as f32;
    pcm.samples
        .chunks_exact(ch)
        .map(|f| f.iter().sum::<f32>() * scale)
        .collect()
}

/// Resamples mono `samples` from `from` Hz to `to` Hz. The output has
/// `ceil(len * to / from)` samples and no added delay.
pub fn resample_mono(samples: &[f32], from: u32, to: u32) -> Result<Vec<f32>, AudioError> {
    if from == to || samples.is_empty() {
        return Ok(samples.to_vec());
    }
    let err = |e: &dyn std::fmt::Display| AudioError::Resample(e.to_string());
    let mut r = Fft::<f32>::new(from as usize, to as usize, 1024, 1, FixedSync::Input)
        .map_err(|e| err(&e))?;
    let cap = r.process_all_needed_output_len(samples.len());
    let mut out = vec![0f32; cap];
    let input = InterleavedSlice::new(samples, 1, samples.len()).map_err(|e| err(&e))?;
    let mut output = InterleavedSlice::new_mut(&mut out, 1, cap).map_err(|e| err(&e))?;
    let (_, produced) = r
        .process_all_into_buffer(&input, &mut output, samples.len(), None)
        .map_err(|e| err(&e))?;
    out.truncate(produced);
    Ok(out)
}

/// Any PCM to 48 kHz mono.
pub fn to_48k_mono(pcm: &Pcm) -> Result<Pcm, AudioError> {
    let mono = downmix(pcm);
    Ok(Pcm::mono_48k(resample_mono(&mono, pcm.rate, RATE)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(rate: u32, hz: f32, secs: f32) -> Vec<f32> {
        (0..(rate as f32 * secs) as usize)
            .map(|i| (2.0 * std::f32::consts::PI * hz * i as f32 / rate as f32).sin() * 0.5)
            .collect()
    }

    /// Zero crossings per second of a signal: twice its frequency.
    fn crossings(s: &[f32], rate: u32) -> f32 {
        let n = s
            .windows(2)
            .filter(|w| (w[0] < 0.0) != (w[1] < 0.0))
            .count();
        n as f32 / (s.len() as f32 / rate as f32)
    }

    #[test]
    fn keeps_length_and_pitch() {
        for rate in [8_000, 11_025, 16_000, 22_050, 44_100, 96_000] {
            let x = tone(rate, 440.0, 1.0);
            let y = resample_mono(&x, rate, RATE).unwrap();
            assert!(
                (y.len() as i64 - 48_000).abs() <= 1,
                "{rate}: {} samples",
                y.len()
            );
            let f = crossings(&y[4800..43200], RATE) / 2.0;
            assert!((f - 440.0).abs() < 3.0, "{rate}: {f} Hz");
            let peak = y[4800..43200].iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!((peak - 0.5).abs() < 0.05, "{rate}: peak {peak}");
        }
    }

    #[test]
    fn downmixes_by_mean() {
        let p = Pcm {
            rate: 48_000,
            channels: 2,
            samples: vec![1.0, 0.0, 0.5, 0.5],
        };
        assert_eq!(downmix(&p), vec![0.5, 0.5]);
    }
}
