//! The `Auth` token: arbitrary strings must be refused cleanly.
#![no_main]

use std::time::Duration;

use codec::token::TokenKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = TokenKey::new(&[7u8; 32], Duration::from_secs(30)).expect("key");
    if let Ok(s) = std::str::from_utf8(data) {
        // A forged token cannot verify: any success would be a bug.
        assert!(key.verify(s).is_err());
    }
});
