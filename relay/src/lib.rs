//! The push-to-talk relay: accepts Opus clips over QUIC, relays them live
//! to online recipients as they arrive, stores them for the others, and
//! delivers the stored ones on reconnect. `docs/architecture.md` follows a
//! clip through these modules.

mod admin;
mod cluster;
mod conn;
mod credit;
mod cursors;
mod disk_store;
mod error;
mod expired;
mod faults;
mod json_file;
mod live;
mod metrics;
mod push;
mod segment_log;
mod server;
mod signal;
mod state;
mod store;
mod tls;
mod usage;
mod web;
mod webtransport;

/// The `ptt-relay` command line.
pub mod cli;
/// The relay's settings: `Config` and the types of its fields.
pub mod config;
/// What the relay's own tests, benchmarks and fuzz targets reach into; not
/// an interface for applications.
pub mod testing;

pub use config::Config;
pub use error::StartError;
pub use server::Relay;

/// Wall-clock time, Unix milliseconds.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod house;
