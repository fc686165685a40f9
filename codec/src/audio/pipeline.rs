//! The whole send side in one call: PCM of any rate → 48 kHz mono →
//! clean-up and voice flags → trimming → Opus.

use std::time::{Duration, Instant};

use super::clean::{CleanConfig, Cleaner};
use super::encode::{Encoder, EncoderConfig};
use super::trim::{self, TrimConfig};
use super::{AudioError, Pcm, RATE, resample};
use crate::ogg_opus::OggOpus;

/// Settings of the send pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SendConfig {
    /// Clean-up stages; `CleanConfig::off()` leaves the audio untouched.
    pub clean: CleanConfig,
    pub trim: TrimConfig,
    pub encoder: EncoderConfig,
}

/// What the pipeline did, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SendReport {
    pub input_secs: f64,
    /// Audio left after trimming.
    pub kept_secs: f64,
    /// 10 ms frames flagged as voice (0 when voice detection did not run).
    pub voice_frames: usize,
    pub frames: usize,
    pub packets: usize,
    /// Opus payload bytes.
    pub opus_bytes: usize,
    pub resample_time: Duration,
    pub clean_time: Duration,
    pub encode_time: Duration,
}

/// Runs the send side.
pub struct SendPipeline {
    config: SendConfig,
}

impl SendPipeline {
    pub fn new(config: SendConfig) -> Result<Self, AudioError> {
        config.encoder.validate()?;
        Ok(Self { config })
    }

    /// PCM in, an Ogg Opus clip out.
    pub fn run(&self, input: &Pcm) -> Result<(OggOpus, SendReport), AudioError> {
        let mut report = SendReport {
            input_secs: input.duration_secs(),
            ..SendReport::default()
        };
        if input.frames() == 0 {
            return Err(AudioError::Empty);
        }
        let t = Instant::now();
        let mut pcm = resample::to_48k_mono(input)?;
        report.resample_time = t.elapsed();
        let c = &self.config;
        let t = Instant::now();
        let needs_apm = c.trim.enabled || c.clean != CleanConfig::off();
        let flags = if needs_apm {
            Cleaner::new(c.clean)?.process(&mut pcm.samples)?
        } else {
            Vec::new()
        };
        report.frames = flags.len();
        report.voice_frames = flags.iter().filter(|&&v| v).count();
        let keep = trim::plan(&flags, pcm.samples.len(), &c.trim);
        let samples = if keep.len() == 1 && keep[0] == (0..pcm.samples.len()) {
            pcm.samples
        } else {
            trim::apply(&pcm.samples, &keep)
        };
        report.clean_time = t.elapsed();
        report.kept_secs = samples.len() as f64 / f64::from(RATE);
        let t = Instant::now();
        let file = Encoder::new(c.encoder)?.encode_clip(&samples, input.rate)?;
        report.encode_time = t.elapsed();
        report.packets = file.packets.len();
        report.opus_bytes = file.packets.iter().map(|p| p.len()).sum();
        Ok((file, report))
    }
}
