//! Opus packet structure checks (RFC 6716 §3.4) on arbitrary bytes.
#![no_main]

use codec::opus_packet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = opus_packet::parse(data) {
        assert!((1..=48).contains(&info.frames));
        assert!(info.samples() <= opus_packet::MAX_PACKET_SAMPLES);
    }
});
