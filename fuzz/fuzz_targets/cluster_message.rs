//! Messages from other relays (over NATS): any bytes decode to a message or
//! an error, never a panic; what decodes encodes back to the same bytes.
#![no_main]

use bytes::Bytes;
use codec::cluster::Relayed;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let b = Bytes::copy_from_slice(data);
    if let Ok(m) = Relayed::decode(&b) {
        assert_eq!(m.encode(), b);
    }
});
