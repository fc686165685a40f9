//! Live talk, frame by frame: microphone PCM (any count of samples at a
//! time, typically 10 or 20 ms, at the microphone's rate) to Opus packets
//! as soon as each frame is complete (packets back to PCM as they arrive
//! is [`super::decode::Decoder`]). The same encoder settings and framing
//! as a recorded clip ([`super::encode::Encoder`]), so a live clip stored
//! by the relay is an ordinary clip.

use bytes::Bytes;
use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler};

use super::encode::{Encoder, EncoderConfig};
use super::{AudioError, RATE};
use crate::wire::AudioFormat;

/// Microphone rate to 48 kHz in 10 ms chunks (the resampler keeps its
/// filter state between them, so chunk edges leave no clicks).
struct Stream {
    r: Fft<f32>,
    chunk: usize,
    /// Input waiting for a whole chunk.
    input: Vec<f32>,
    /// Output frames of the resampler's delay still to drop.
    delay: usize,
    out: Vec<f32>,
}

impl Stream {
    fn new(from: u32) -> Result<Stream, AudioError> {
        if !from.is_multiple_of(100) || !(8000..=192_000).contains(&from) {
            // 10 ms must be a whole number of samples.
            return Err(AudioError::Rate(from));
        }
        let chunk = from as usize / 100;
        let r = Fft::<f32>::new(from as usize, RATE as usize, chunk, 1, FixedSync::Input)
            .map_err(|e| AudioError::Resample(e.to_string()))?;
        Ok(Stream {
            delay: r.output_delay(),
            out: vec![0f32; r.output_frames_max()],
            r,
            chunk,
            input: Vec::new(),
        })
    }

    /// Resamples what forms whole chunks; appends 48 kHz samples to `to`.
    fn push(&mut self, pcm: &[f32], to: &mut Vec<f32>) -> Result<(), AudioError> {
        self.input.extend_from_slice(pcm);
        let err = |e: &dyn std::fmt::Display| AudioError::Resample(e.to_string());
        let mut used = 0;
        while self.input.len() - used >= self.chunk {
            let chunk = &self.input[used..used + self.chunk];
            let input = InterleavedSlice::new(chunk, 1, self.chunk).map_err(|e| err(&e))?;
            let cap = self.out.len();
            let mut output =
                InterleavedSlice::new_mut(&mut self.out, 1, cap).map_err(|e| err(&e))?;
            let (_, n) = self
                .r
                .process_into_buffer(&input, &mut output, None)
                .map_err(|e| err(&e))?;
            let skip = self.delay.min(n);
            self.delay -= skip;
            to.extend_from_slice(&self.out[skip..n]);
            used += self.chunk;
        }
        self.input.drain(..used);
        Ok(())
    }
}

/// Microphone frames in, Opus packets out, for one clip.
pub struct LiveEncoder {
    enc: Encoder,
    mic_rate: u32,
    resample: Option<Stream>,
    /// 48 kHz samples waiting for a whole Opus frame.
    pending: Vec<f32>,
    /// Microphone samples taken so far.
    taken: u64,
    /// Packets made so far.
    packets: u64,
    /// Samples per Opus frame at 48 kHz.
    frame: usize,
}

impl LiveEncoder {
    /// An encoder for mono microphone audio at `mic_rate` Hz (a multiple
    /// of 100 between 8 and 192 kHz: 8, 16, 24, 32, 44.1 or 48 kHz).
    pub fn new(config: EncoderConfig, mic_rate: u32) -> Result<LiveEncoder, AudioError> {
        let resample = if mic_rate == RATE {
            None
        } else {
            Some(Stream::new(mic_rate)?)
        };
        Ok(LiveEncoder {
            frame: config.frame_samples(),
            enc: Encoder::new(config)?,
            mic_rate,
            resample,
            pending: Vec::new(),
            taken: 0,
            packets: 0,
        })
    }

    /// The clip's audio format (for its header).
    pub fn format(&self) -> AudioFormat {
        AudioFormat {
            channels: 1,
            pre_skip: self.enc.pre_skip(),
            input_rate: self.mic_rate,
            output_gain: 0,
        }
    }

    /// Microphone audio taken so far.
    pub fn duration(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.taken as f64 / f64::from(self.mic_rate))
    }

    /// Takes mono samples in [-1, 1]; returns the packets completed by
    /// them (none until a whole frame is there).
    pub fn push(&mut self, pcm: &[f32]) -> Result<Vec<Bytes>, AudioError> {
        self.taken += pcm.len() as u64;
        match &mut self.resample {
            Some(s) => s.push(pcm, &mut self.pending)?,
            None => self.pending.extend_from_slice(pcm),
        }
        self.drain()
    }

    /// [`LiveEncoder::push`] for 16-bit samples, as most microphone APIs
    /// give them.
    pub fn push_i16(&mut self, pcm: &[i16]) -> Result<Vec<Bytes>, AudioError> {
        let f: Vec<f32> = pcm.iter().map(|&s| f32::from(s) / 32768.0).collect();
        self.push(&f)
    }

    fn drain(&mut self) -> Result<Vec<Bytes>, AudioError> {
        let fs = self.frame;
        let mut out = Vec::new();
        let mut used = 0;
        while self.pending.len() - used >= fs {
            out.push(self.enc.encode_frame(&self.pending[used..used + fs])?);
            used += fs;
        }
        self.pending.drain(..used);
        self.packets += out.len() as u64;
        Ok(out)
    }

    /// Ends the clip: the rest of the audio, padded with silence to whole
    /// frames and past the encoder's lookahead. Returns the last packets
    /// and the clip's final granule (pre-skip plus the audio's 48 kHz
    /// samples), so a decoder gives back exactly what was spoken.
    pub fn finish(mut self) -> Result<(Vec<Bytes>, u64), AudioError> {
        let samples = self.taken * u64::from(RATE) / u64::from(self.mic_rate);
        if let Some(s) = &mut self.resample {
            // Zeros push the last real samples out of the resampler.
            let flush = vec![0f32; s.chunk * 4];
            s.push(&flush, &mut self.pending)?;
        }
        let mut out = self.drain()?;
        let fs = self.frame as u64;
        let pre_skip = u64::from(self.enc.pre_skip());
        let granule = pre_skip + samples;
        // The real samples still pending (the flush's zeros past them are
        // padding either way).
        let mut buf = std::mem::take(&mut self.pending);
        while self.packets * fs < granule {
            buf.resize(fs as usize, 0.0);
            out.push(self.enc.encode_frame(&buf)?);
            self.packets += 1;
            buf.clear();
        }
        Ok((out, granule))
    }
}

#[cfg(test)]
mod tests {
    use super::super::decode::Decoder;
    use super::*;

    fn speechy(rate: u32, secs: f32) -> Vec<f32> {
        // Two tones with a slow amplitude wobble: enough for Opus to code.
        (0..(rate as f32 * secs) as usize)
            .map(|i| {
                let t = i as f32 / rate as f32;
                let env = 0.5 + 0.5 * (2.0 * std::f32::consts::PI * 3.0 * t).sin();
                env * 0.3
                    * ((2.0 * std::f32::consts::PI * 220.0 * t).sin()
                        + 0.5 * (2.0 * std::f32::consts::PI * 660.0 * t).sin())
            })
            .collect()
    }

    /// At 48 kHz, pushing 10 ms at a time gives exactly the packets and the
    /// final granule of encoding the whole clip at once.
    #[test]
    fn live_at_48k_equals_the_whole_clip_encoding() {
        let pcm = speechy(48_000, 1.37);
        let whole = Encoder::new(EncoderConfig::default())
            .unwrap()
            .encode_clip(&pcm, 48_000)
            .unwrap();
        let mut live = LiveEncoder::new(EncoderConfig::default(), 48_000).unwrap();
        let mut packets = Vec::new();
        for c in pcm.chunks(480) {
            packets.extend(live.push(c).unwrap());
        }
        assert_eq!(live.format(), whole.format);
        let (last, granule) = live.finish().unwrap();
        packets.extend(last);
        assert_eq!(granule, whole.final_granule);
        assert_eq!(packets, whole.packets);
    }

    /// A 16 kHz microphone in 20 ms frames: every packet leaves as soon as
    /// its 20 ms were spoken (one per push after the first), and the clip
    /// decodes live to the spoken length at 48 kHz, close to the input.
    #[test]
    fn a_16k_microphone_round_trips_live() {
        let pcm = speechy(16_000, 1.0);
        let mut enc = LiveEncoder::new(EncoderConfig::default(), 16_000).unwrap();
        let format = enc.format();
        assert_eq!(format.input_rate, 16_000);
        let mut packets = Vec::new();
        for (i, c) in pcm.chunks(320).enumerate() {
            let got = enc.push(c).unwrap();
            // The resampler's delay holds the first frame back at most one
            // push; then each 20 ms in gives a packet out.
            if i >= 2 {
                assert!(!got.is_empty(), "push {i} gave no packet");
            }
            packets.extend(got);
        }
        assert_eq!(enc.duration(), std::time::Duration::from_secs(1));
        let (last, granule) = enc.finish().unwrap();
        packets.extend(last);
        assert_eq!(granule, u64::from(format.pre_skip) + 48_000);
        let mut dec = Decoder::new(&format).unwrap();
        let mut out = Vec::new();
        for p in &packets {
            out.extend(dec.decode(Some(p)).unwrap());
        }
        let real = (granule - u64::from(format.pre_skip)) as usize;
        assert!(out.len() >= real, "{} < {real}", out.len());
        out.truncate(real);
        // Compare with the input brought to 48 kHz: most of the energy is
        // the same signal (a codec at 16 kbit/s is not bit exact).
        let reference = super::super::resample::resample_mono(&pcm, 16_000, 48_000).unwrap();
        let n = reference.len().min(out.len());
        let dot: f32 = (0..n).map(|i| reference[i] * out[i]).sum();
        let e1: f32 = reference[..n].iter().map(|x| x * x).sum();
        let e2: f32 = out[..n].iter().map(|x| x * x).sum();
        let corr = dot / (e1.sqrt() * e2.sqrt());
        assert!(corr > 0.8, "correlation {corr}");
    }

    #[test]
    fn rates_that_are_not_whole_10ms_are_refused() {
        assert!(matches!(
            LiveEncoder::new(EncoderConfig::default(), 11_025),
            Err(AudioError::Rate(11_025))
        ));
    }

    #[test]
    fn a_lost_packet_is_concealed() {
        let format = AudioFormat::default();
        let mut dec = Decoder::new(&format).unwrap();
        let out = dec.decode(None).unwrap();
        // 20 ms, less what is left of the pre-skip.
        assert_eq!(out.len(), 960 - usize::from(format.pre_skip).min(960));
    }
}
