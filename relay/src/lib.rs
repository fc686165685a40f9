//! The push-to-talk relay: accepts Opus clips over QUIC, relays them live
//! to online recipients as they arrive, stores them for the others, and
//! delivers the stored ones on reconnect. `docs/architecture.md` follows a
//! clip through these modules.

pub mod admin;
pub mod cluster;
pub mod config;
pub mod cursors;
pub mod disk_store;
pub mod error;
pub mod expired;
pub mod faults;
pub mod json_file;
pub mod limits;
pub mod live;
pub mod metrics;
pub mod push;
pub mod router;
pub mod segment_log;
pub mod server;
pub mod session;
pub mod signal;
pub mod state;
pub mod store;
pub mod tls;
pub mod usage;
pub mod web;
pub mod webtransport;

pub use config::{Config, Settings, StoreKind};
pub use server::Relay;

/// Wall-clock time, Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
