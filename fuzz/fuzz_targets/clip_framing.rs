//! Clip framing as the relay reads it: bytes arriving in arbitrary chunks.
//! The first byte picks the chunk size. Scanning must never panic, and must
//! agree with a scan of the whole input at once.
#![no_main]

use codec::{FrameLimits, Framer};
use libfuzzer_sys::fuzz_target;

fn scan_all(data: &[u8], chunk: usize) -> (Result<u64, ()>, u64) {
    let mut f = Framer::new(FrameLimits::new(7657, 1 << 20, 60_000));
    let mut buf: Vec<u8> = Vec::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        match f.scan(&buf) {
            Ok(s) => {
                let used = s.records + s.end.map_or(0, |(_, n)| n);
                buf.drain(..used);
            }
            Err(_) => return (Err(()), f.packets()),
        }
    }
    (Ok(f.samples()), f.packets())
}

fuzz_target!(|data: &[u8]| {
    let Some((&c, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(c).max(1);
    let (a, pa) = scan_all(rest, chunk);
    let (b, pb) = scan_all(rest, rest.len().max(1));
    // An error may surface at a different packet when chunked, but success
    // must match exactly.
    if a.is_ok() && b.is_ok() {
        assert_eq!(a, b);
        assert_eq!(pa, pb);
    }
});
