//! Ogg Opus files a user hands to `client-sim send`: reading must never
//! panic, what reads writes back to a file that reads the same, and
//! decodes without a panic.
#![no_main]

use codec::ogg_opus::OggOpus;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = OggOpus::read(data) {
        let out = f.write(Vec::new(), 1).expect("writing to memory");
        let back = OggOpus::read(&out).expect("our own file reads");
        assert_eq!(back.packets, f.packets);
        assert_eq!(back.format, f.format);
        assert_eq!(back.final_granule, f.final_granule);
        // libopus decodes whatever passed the structure checks (or says
        // why it cannot): never a panic.
        if f.packets.len() <= 200 {
            let _ = codec::audio::decode::decode(&f);
        }
    }
});
