//! WAV files a user hands to `client-sim encode` / `send --wav`: reading
//! must never panic, and what reads is audio the resampler accepts.
#![no_main]

use codec::audio::{resample, wav};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(pcm) = wav::read(std::io::Cursor::new(data)) {
        assert!(pcm.channels >= 1);
        assert!(pcm.samples.iter().all(|s| s.is_finite() && s.abs() <= 1.0));
        if pcm.frames() <= 48_000 {
            let _ = resample::to_48k_mono(&pcm);
        }
    }
});
