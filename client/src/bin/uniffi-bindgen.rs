//! Generates the Kotlin, Swift and Python bindings of `ptt_client` from
//! its shared library (`scripts/sdk.sh` runs it).

fn main() {
    uniffi::uniffi_bindgen_main()
}
