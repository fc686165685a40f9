//! Every message a peer can send: decode must never panic, and what decodes
//! re-encodes to a message that decodes the same.
#![no_main]

use codec::wire::{DEFAULT_MAX_MESSAGE_BYTES, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((msg, used))) = Message::decode(rest, DEFAULT_MAX_MESSAGE_BYTES) {
        assert!(used > 0 && used <= rest.len());
        if !matches!(msg, Message::Unknown(_)) {
            let again = msg.to_bytes();
            let (back, n) = Message::decode(&again, DEFAULT_MAX_MESSAGE_BYTES)
                .expect("re-encoded message decodes")
                .expect("re-encoded message is whole");
            assert_eq!(n, again.len());
            assert_eq!(back, msg);
        }
        rest = &rest[used..];
    }
});
