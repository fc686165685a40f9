//! Audio settings on the command line (`encode`, `send --wav`) and the
//! `encode` / `decode` commands.

use std::path::Path;

use anyhow::Context;
use clap::{Args, ValueEnum};
use codec::audio::clean::{CleanConfig, NoiseLevel};
use codec::audio::encode::EncoderConfig;
use codec::audio::pipeline::{SendConfig, SendPipeline, SendReport};
use codec::audio::trim::TrimConfig;
use codec::audio::{decode, wav};
use codec::ogg_opus::OggOpus;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Noise {
    Low,
    Moderate,
    High,
    VeryHigh,
}

/// Parses a bitrate: `16000`, `16k`, `16kbit`.
fn parse_bitrate(s: &str) -> Result<u32, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix("bit").unwrap_or(&t);
    let (num, mult) = match t.strip_suffix('k') {
        Some(n) => (n, 1000.0),
        None => (t, 1.0),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a bitrate (e.g. 16k or 16000)"))?;
    Ok((v * mult).round() as u32)
}

#[derive(Args, Debug, Clone)]
pub struct AudioArgs {
    /// Opus bitrate (bit/s; `16k` = 16000).
    #[arg(long, default_value = "16k", value_parser = parse_bitrate)]
    pub bitrate: u32,
    /// Opus frame size in ms: 10, 20, 40 or 60.
    #[arg(long, default_value_t = 20)]
    pub frame_ms: u32,
    /// Encoder complexity 0..=10 (speed against quality).
    #[arg(long, default_value_t = EncoderConfig::default().complexity)]
    pub complexity: u8,
    /// Discontinuous transmission: tiny packets in silence.
    #[arg(long)]
    pub dtx: bool,
    /// In-band forward error correction against packet loss.
    #[arg(long)]
    pub fec: bool,
    /// Packet loss to prepare FEC for, in percent.
    #[arg(long, default_value_t = 10)]
    pub loss_pct: u8,
    /// Keep silence: no trimming of leading/trailing silence and pauses.
    #[arg(long)]
    pub no_trim: bool,
    /// No clean-up at all (high-pass, noise suppression, gain control).
    #[arg(long)]
    pub no_clean: bool,
    /// No high-pass filter.
    #[arg(long)]
    pub no_high_pass: bool,
    /// No noise suppression.
    #[arg(long)]
    pub no_noise_suppression: bool,
    /// Noise suppression strength.
    #[arg(long, value_enum, default_value = "high")]
    pub noise_level: Noise,
    /// No automatic gain control.
    #[arg(long)]
    pub no_agc: bool,
    /// Audio kept before speech when trimming, ms.
    #[arg(long, default_value_t = TrimConfig::default().lead_ms)]
    pub lead_ms: u32,
    /// Audio kept after speech when trimming, ms.
    #[arg(long, default_value_t = TrimConfig::default().hangover_ms)]
    pub hangover_ms: u32,
    /// Pauses longer than this are shortened when trimming, ms.
    #[arg(long, default_value_t = TrimConfig::default().max_pause_ms)]
    pub max_pause_ms: u32,
}

impl AudioArgs {
    pub fn config(&self) -> SendConfig {
        let clean = if self.no_clean {
            CleanConfig::off()
        } else {
            CleanConfig {
                high_pass: !self.no_high_pass,
                noise_suppression: (!self.no_noise_suppression).then_some(match self.noise_level {
                    Noise::Low => NoiseLevel::Low,
                    Noise::Moderate => NoiseLevel::Moderate,
                    Noise::High => NoiseLevel::High,
                    Noise::VeryHigh => NoiseLevel::VeryHigh,
                }),
                gain_control: !self.no_agc,
                ..CleanConfig::default()
            }
        };
        SendConfig {
            clean,
            trim: TrimConfig {
                enabled: !self.no_trim,
                lead_ms: self.lead_ms,
                hangover_ms: self.hangover_ms,
                max_pause_ms: self.max_pause_ms,
                ..TrimConfig::default()
            },
            encoder: EncoderConfig {
                bitrate: self.bitrate,
                frame_ms: self.frame_ms,
                complexity: self.complexity,
                dtx: self.dtx,
                fec: self.fec,
                expected_loss_pct: self.loss_pct,
            },
        }
    }
}

/// WAV file → cleaned, trimmed Opus clip.
pub fn encode_wav(input: &Path, args: &AudioArgs) -> anyhow::Result<(OggOpus, SendReport)> {
    let pcm = wav::read_file(input).with_context(|| format!("reading {}", input.display()))?;
    let p = SendPipeline::new(args.config())?;
    p.run(&pcm)
        .with_context(|| format!("encoding {}", input.display()))
}

pub fn describe(r: &SendReport) -> String {
    let kbps = if r.kept_secs > 0.0 {
        r.opus_bytes as f64 * 8.0 / r.kept_secs / 1000.0
    } else {
        0.0
    };
    format!(
        "{:.2} s in, {:.2} s kept ({} of {} frames voice), {} packets, {} bytes ({kbps:.1} kbit/s)",
        r.input_secs, r.kept_secs, r.voice_frames, r.frames, r.packets, r.opus_bytes
    )
}

/// `client-sim encode IN.wav OUT.opus`.
pub fn encode_cmd(input: &Path, output: &Path, args: &AudioArgs) -> anyhow::Result<()> {
    let (file, report) = encode_wav(input, args)?;
    write_atomic(output, &file.to_vec(rand::random()))?;
    eprintln!("{}: {}", output.display(), describe(&report));
    Ok(())
}

/// `client-sim decode IN.opus OUT.wav`.
pub fn decode_cmd(input: &Path, output: &Path) -> anyhow::Result<()> {
    let file = OggOpus::read_file(input).with_context(|| format!("reading {}", input.display()))?;
    let pcm = decode::decode(&file).with_context(|| format!("decoding {}", input.display()))?;
    write_wav(output, &pcm)?;
    eprintln!(
        "{}: {:.2} s, {} channel(s), 48000 Hz",
        output.display(),
        pcm.duration_secs(),
        pcm.channels
    );
    Ok(())
}

/// Decodes a clip and writes it as WAV.
pub fn write_clip_wav(path: &Path, file: &OggOpus) -> anyhow::Result<()> {
    let pcm = decode::decode(file)?;
    write_wav(path, &pcm)
}

fn write_wav(path: &Path, pcm: &codec::audio::Pcm) -> anyhow::Result<()> {
    let mut buf = std::io::Cursor::new(Vec::new());
    wav::write(&mut buf, pcm)?;
    write_atomic(path, &buf.into_inner())
}

/// Writes through a temporary file and a rename, so a reader never sees
/// half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitrates_parse() {
        assert_eq!(parse_bitrate("16k"), Ok(16_000));
        assert_eq!(parse_bitrate("12.5k"), Ok(12_500));
        assert_eq!(parse_bitrate("24000"), Ok(24_000));
        assert_eq!(parse_bitrate("32kbit"), Ok(32_000));
        assert!(parse_bitrate("fast").is_err());
    }
}
