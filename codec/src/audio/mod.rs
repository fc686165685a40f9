//! The audio path a phone runs before it sends, and a listener after it
//! receives (feature `opus`; clean-up and the pipeline that uses it need
//! feature `audio`; the relay enables neither):
//!
//! ```text
//! WAV (any rate, any channels) ─► wav::read ─► resample::to_48k_mono
//!   ─► clean::Cleaner (high-pass, noise suppression, AGC, voice flag per 10 ms)
//!   ─► trim::plan (cut leading/trailing silence, shorten long pauses)
//!   ─► encode::Encoder (Opus, voice, wideband, 16 kbit/s, 20 ms) ─► OggOpus
//! OggOpus ─► decode::decode (packet-loss concealment, FEC) ─► wav::write
//! ```
//!
//! [`pipeline::SendPipeline`] runs the send side in one call. Live talk
//! goes frame by frame instead: [`live::LiveEncoder`] turns microphone
//! frames into Opus packets as they are spoken, [`decode::Decoder`] turns
//! packets back into PCM as they arrive.

#[cfg(feature = "audio")]
pub mod clean;
pub mod decode;
pub mod encode;
pub mod live;
#[cfg(feature = "audio")]
pub mod pipeline;
pub mod resample;
pub mod trim;
pub mod wav;

use thiserror::Error;

/// Processing rate of everything between the resampler and the encoder.
pub const RATE: u32 = 48_000;
/// Samples in one 10 ms frame at [`RATE`]: the unit of clean-up and of the
/// voice-activity flags.
pub const FRAME_10MS: usize = 480;

/// PCM audio: interleaved samples in [-1, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct Pcm {
    pub rate: u32,
    pub channels: u16,
    pub samples: Vec<f32>,
}

impl Pcm {
    /// 48 kHz mono audio.
    pub fn mono_48k(samples: Vec<f32>) -> Self {
        Self {
            rate: RATE,
            channels: 1,
            samples,
        }
    }

    /// Frames (samples per channel).
    pub fn frames(&self) -> usize {
        self.samples.len() / usize::from(self.channels.max(1))
    }

    pub fn duration_secs(&self) -> f64 {
        self.frames() as f64 / f64::from(self.rate.max(1))
    }
}

/// Why audio could not be read, processed or written.
#[derive(Debug, Error)]
pub enum AudioError {
    #[error("not a readable WAV file: {0}")]
    Wav(String),
    #[error("WAV data is truncated or unreadable: {0}")]
    Truncated(String),
    #[error("the audio is empty (no samples)")]
    Empty,
    #[error("sample rate {0} Hz is not supported (8000..=384000)")]
    Rate(u32),
    #[error("{0} channels are not supported (1..=32)")]
    Channels(u16),
    #[error("{bits}-bit {format} samples are not supported")]
    SampleFormat { bits: u16, format: &'static str },
    #[error("audio longer than the limit of {0} s")]
    TooLong(u64),
    #[error("resampling failed: {0}")]
    Resample(String),
    #[error("audio processing (webrtc) failed: {0}")]
    Processing(String),
    #[error("invalid encoder setting: {0}")]
    Config(String),
    #[error("Opus encoder: {0}")]
    Encode(String),
    #[error("Opus stream is broken: packet #{index}: {why}")]
    Decode { index: usize, why: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
