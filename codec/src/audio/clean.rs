//! Voice clean-up with WebRTC's audio processing module
//! (`webrtc-audio-processing` 0.5 over Debian's library): high-pass filter,
//! noise suppression, automatic gain control, and a voice-activity flag per
//! 10 ms frame. It works at 48 kHz mono in 480-sample frames.

use webrtc_audio_processing as apm;

use super::{AudioError, FRAME_10MS};

/// How hard noise suppression works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoiseLevel {
    Low,
    Moderate,
    High,
    VeryHigh,
}

/// Which clean-up stages run. Voice detection always runs: trimming needs
/// it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CleanConfig {
    /// Removes rumble below ~80 Hz.
    pub high_pass: bool,
    /// Noise suppression, `None` to switch it off.
    pub noise_suppression: Option<NoiseLevel>,
    /// Adaptive digital gain control toward `agc_target_dbfs`, with a
    /// limiter.
    pub gain_control: bool,
    /// AGC target level below full scale, in dB (0..=31; 3 means -3 dBFS).
    pub agc_target_dbfs: i32,
    /// Most gain the AGC adds, in dB (0..=90).
    pub agc_max_gain_db: i32,
}

impl Default for CleanConfig {
    fn default() -> Self {
        Self {
            high_pass: true,
            noise_suppression: Some(NoiseLevel::High),
            gain_control: true,
            agc_target_dbfs: 3,
            agc_max_gain_db: 15,
        }
    }
}

impl CleanConfig {
    /// Every stage off: only voice detection runs, the audio is untouched.
    pub fn off() -> Self {
        Self {
            high_pass: false,
            noise_suppression: None,
            gain_control: false,
            ..Self::default()
        }
    }

    fn is_off(&self) -> bool {
        !self.high_pass && self.noise_suppression.is_none() && !self.gain_control
    }

    fn apm_config(&self) -> apm::Config {
        apm::Config {
            echo_cancellation: None,
            gain_control: self.gain_control.then(|| apm::GainControl {
                mode: apm::GainControlMode::AdaptiveDigital,
                target_level_dbfs: self.agc_target_dbfs.clamp(0, 31),
                compression_gain_db: self.agc_max_gain_db.clamp(0, 90),
                enable_limiter: true,
            }),
            noise_suppression: self.noise_suppression.map(|l| apm::NoiseSuppression {
                suppression_level: match l {
                    NoiseLevel::Low => apm::NoiseSuppressionLevel::Low,
                    NoiseLevel::Moderate => apm::NoiseSuppressionLevel::Moderate,
                    NoiseLevel::High => apm::NoiseSuppressionLevel::High,
                    NoiseLevel::VeryHigh => apm::NoiseSuppressionLevel::VeryHigh,
                },
            }),
            voice_detection: Some(apm::VoiceDetection {
                detection_likelihood: apm::VoiceDetectionLikelihood::Moderate,
            }),
            enable_transient_suppressor: false,
            enable_high_pass_filter: self.high_pass,
        }
    }
}

/// A clean-up processor. One per audio stream: it adapts as it goes.
pub struct Cleaner {
    apm: apm::Processor,
    config: CleanConfig,
    frame: Vec<f32>,
}

impl Cleaner {
    pub fn new(config: CleanConfig) -> Result<Self, AudioError> {
        let init = apm::InitializationConfig {
            num_capture_channels: 1,
            num_render_channels: 1,
            ..apm::InitializationConfig::default()
        };
        let mut p =
            apm::Processor::new(&init).map_err(|e| AudioError::Processing(e.to_string()))?;
        p.set_config(config.apm_config());
        Ok(Self {
            apm: p,
            config,
            frame: vec![0.0; FRAME_10MS],
        })
    }

    /// Cleans one 10 ms frame (480 samples at 48 kHz) in place and says
    /// whether it holds voice. With every stage off the audio is left
    /// exactly as it was.
    pub fn process_frame(&mut self, frame: &mut [f32]) -> Result<bool, AudioError> {
        if frame.len() != FRAME_10MS {
            return Err(AudioError::Processing(format!(
                "frame of {} samples, expected {FRAME_10MS}",
                frame.len()
            )));
        }
        self.frame.copy_from_slice(frame);
        self.apm
            .process_capture_frame(&mut self.frame)
            .map_err(|e| AudioError::Processing(e.to_string()))?;
        if !self.config.is_off() {
            frame.copy_from_slice(&self.frame);
        }
        Ok(self.apm.get_stats().has_voice.unwrap_or(true))
    }

    /// Cleans 48 kHz mono audio in place (the last partial frame is padded
    /// with silence for processing) and returns one voice flag per 10 ms
    /// frame.
    pub fn process(&mut self, samples: &mut [f32]) -> Result<Vec<bool>, AudioError> {
        let mut flags = Vec::with_capacity(samples.len().div_ceil(FRAME_10MS));
        let mut chunks = samples.chunks_exact_mut(FRAME_10MS);
        for f in &mut chunks {
            flags.push(self.process_frame(f)?);
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut last = [0f32; FRAME_10MS];
            last[..rest.len()].copy_from_slice(rest);
            flags.push(self.process_frame(&mut last)?);
            let n = rest.len();
            rest.copy_from_slice(&last[..n]);
        }
        Ok(flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, amp: f32, seed: u32) -> Vec<f32> {
        let mut x = seed.max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32 * 2.0 - 1.0) * amp
            })
            .collect()
    }

    fn rms(s: &[f32]) -> f32 {
        (s.iter().map(|v| v * v).sum::<f32>() / s.len() as f32).sqrt()
    }

    #[test]
    fn off_leaves_audio_untouched() {
        let mut c = Cleaner::new(CleanConfig::off()).unwrap();
        let x = noise(48_000, 0.1, 7);
        let mut y = x.clone();
        let flags = c.process(&mut y).unwrap();
        assert_eq!(flags.len(), 100);
        assert_eq!(x, y);
    }

    #[test]
    fn suppresses_steady_noise() {
        let mut c = Cleaner::new(CleanConfig {
            gain_control: false,
            ..CleanConfig::default()
        })
        .unwrap();
        let mut y = noise(48_000 * 3, 0.05, 3);
        c.process(&mut y).unwrap();
        // After the suppressor has learned the noise (first second), it is
        // well down.
        let before = 0.05 / 3f32.sqrt();
        let after = rms(&y[48_000..]);
        assert!(after < before * 0.5, "noise rms {before} -> {after}");
    }

    #[test]
    fn wrong_frame_size_is_an_error() {
        let mut c = Cleaner::new(CleanConfig::default()).unwrap();
        assert!(c.process_frame(&mut [0.0; 100]).is_err());
    }
}
