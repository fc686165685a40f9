//! The store's segment files, as found after a crash or disk damage: any
//! bytes give a valid prefix of records (never a panic, never an index past
//! the end). The input is also wrapped as one record with a correct
//! checksum, so the record decoder itself sees arbitrary payloads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::testing::{SEGMENT_MAGIC, parse_segment as parse};

fuzz_target!(|data: &[u8]| {
    if let Some(p) = parse(data, SEGMENT_MAGIC, Some(1)) {
        assert!(p.valid_until.is_none_or(|v| v <= data.len()));
    }
    let mut file = SEGMENT_MAGIC.to_vec();
    file.extend_from_slice(&(data.len() as u32).to_le_bytes());
    file.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    file.extend_from_slice(data);
    if let Some(p) = parse(&file, SEGMENT_MAGIC, None) {
        assert!(p.records.len() + p.bad_records as usize <= 1);
    }
});
