//! Silence trimming driven by voice activity (sans-IO): from one voice flag
//! per 10 ms frame, decide which stretches of a recording to keep. Leading
//! and trailing silence go, long pauses shrink, and padding around voice
//! (`lead` before, `hangover` after) keeps every syllable's onset and tail.

use std::ops::Range;

use super::FRAME_10MS;

/// Trimming settings. Durations are in ms and rounded to 10 ms frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrimConfig {
    pub enabled: bool,
    /// Audio kept before each stretch of voice.
    pub lead_ms: u32,
    /// Audio kept after each stretch of voice.
    pub hangover_ms: u32,
    /// A pause (between two stretches of voice) longer than this is cut
    /// down to `hangover_ms + lead_ms`; shorter pauses are kept whole.
    pub max_pause_ms: u32,
    /// Voice flagged for less than this (a click, a bump) does not count.
    pub min_voice_ms: u32,
}

impl Default for TrimConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            lead_ms: 150,
            hangover_ms: 300,
            max_pause_ms: 700,
            min_voice_ms: 30,
        }
    }
}

impl TrimConfig {
    pub fn off() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }
}

fn frames(ms: u32) -> usize {
    (ms as usize).div_ceil(10)
}

/// Sample ranges (48 kHz) to keep out of `total` samples, given one voice
/// flag per 10 ms frame. Keeps everything when trimming is off or when no
/// voice was found at all (a detector miss must not lose a recording).
#[allow(clippy::single_range_in_vec_init)] // a list of one range is meant
pub fn plan(flags: &[bool], total: usize, cfg: &TrimConfig) -> Vec<Range<usize>> {
    if !cfg.enabled || total == 0 {
        return vec![0..total];
    }
    // Runs of voice, in frames, without blips.
    let min_voice = frames(cfg.min_voice_ms).max(1);
    let mut runs: Vec<Range<usize>> = Vec::new();
    let mut i = 0;
    while i < flags.len() {
        if flags[i] {
            let s = i;
            while i < flags.len() && flags[i] {
                i += 1;
            }
            if i - s >= min_voice {
                runs.push(s..i);
            }
        } else {
            i += 1;
        }
    }
    if runs.is_empty() {
        return vec![0..total];
    }
    let (lead, hang, max_pause) = (
        frames(cfg.lead_ms),
        frames(cfg.hangover_ms),
        frames(cfg.max_pause_ms),
    );
    let n = flags.len();
    // Merge runs whose pause is short enough to keep whole, then pad.
    let mut kept: Vec<Range<usize>> = Vec::new();
    for r in runs {
        match kept.last_mut() {
            Some(last) if r.start - last.end <= max_pause => last.end = r.end,
            _ => kept.push(r),
        }
    }
    let mut out: Vec<Range<usize>> = Vec::with_capacity(kept.len());
    for r in kept {
        let s = r.start.saturating_sub(lead);
        let e = (r.end + hang).min(n);
        match out.last_mut() {
            Some(last) if s <= last.end => last.end = e,
            _ => out.push(s..e),
        }
    }
    out.into_iter()
        .map(|r| (r.start * FRAME_10MS).min(total)..(r.end * FRAME_10MS).min(total))
        .filter(|r| !r.is_empty())
        .collect()
}

/// Samples of the short fades applied where two kept stretches are joined
/// (2.5 ms), so a cut never clicks.
pub const SPLICE_FADE: usize = 120;

/// Joins the kept ranges of `samples`, fading each cut in and out.
pub fn apply(samples: &[f32], keep: &[Range<usize>]) -> Vec<f32> {
    let mut out = Vec::with_capacity(keep.iter().map(|r| r.len()).sum());
    for r in keep {
        let r = r.start.min(samples.len())..r.end.min(samples.len());
        let seg = &samples[r.clone()];
        let start = out.len();
        out.extend_from_slice(seg);
        let len = seg.len();
        let fade = SPLICE_FADE.min(len / 2);
        if r.start > 0 {
            for k in 0..fade {
                out[start + k] *= k as f32 / fade as f32;
            }
        }
        if r.end < samples.len() {
            for k in 0..fade {
                out[start + len - 1 - k] *= k as f32 / fade as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(pattern: &str) -> Vec<bool> {
        // Each character is 10 ms: '#' voice, '.' silence.
        pattern.chars().map(|c| c == '#').collect()
    }

    fn cfg() -> TrimConfig {
        TrimConfig {
            enabled: true,
            lead_ms: 20,
            hangover_ms: 30,
            max_pause_ms: 60,
            min_voice_ms: 20,
        }
    }

    fn in_frames(r: &[Range<usize>]) -> Vec<Range<usize>> {
        r.iter()
            .map(|r| r.start / FRAME_10MS..r.end.div_ceil(FRAME_10MS))
            .collect()
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn cuts_lead_and_tail_with_padding() {
        let f = flags("..........####..........");
        let p = plan(&f, f.len() * FRAME_10MS, &cfg());
        assert_eq!(in_frames(&p), vec![8..17]);
    }

    #[test]
    fn short_pauses_stay_long_pauses_shrink() {
        let f = flags("..###....###...........###..");
        let p = plan(&f, f.len() * FRAME_10MS, &cfg());
        // Pause of 4 frames (<= 6) kept whole; pause of 11 frames shrinks
        // to hangover 3 + lead 2.
        assert_eq!(in_frames(&p), vec![0..15, 21..28]);
        // The long pause (frames 12..23) keeps 12..15 and 21..23.
        let kept: usize = in_frames(&p).iter().map(|r| r.len()).sum();
        assert_eq!(kept, 15 + 7);
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn blips_do_not_count_and_no_voice_keeps_all() {
        let f = flags("....#.......#.....");
        let total = f.len() * FRAME_10MS;
        assert_eq!(plan(&f, total, &cfg()), vec![0..total]);
        assert_eq!(plan(&[], 0, &cfg()), vec![0..0]);
        assert_eq!(plan(&f, total, &TrimConfig::off()), vec![0..total]);
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn partial_last_frame_is_clamped() {
        let f = flags("..##");
        let p = plan(&f, 3 * FRAME_10MS + 7, &cfg());
        assert_eq!(p, vec![0..3 * FRAME_10MS + 7]);
    }

    #[test]
    fn apply_joins_with_fades() {
        let s = vec![1.0f32; 2000];
        let out = apply(&s, &[0..500, 1000..1500]);
        assert_eq!(out.len(), 1000);
        assert_eq!(out[0], 1.0, "no fade at the true start");
        assert!(out[499] < 0.05, "fade out before the cut");
        assert!(out[500] < 0.05, "fade in after the cut");
        assert_eq!(out[750], 1.0);
    }
}
