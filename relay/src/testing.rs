//! The relay's insides that its own tests, benchmarks and fuzz targets
//! reach into (`Relay::shared`, the stores, the log format). Not an
//! interface for applications: it changes with the relay.

pub use crate::admin::UserUsage;
pub use crate::cluster::{Cluster, channel_subject, user_subject};
pub use crate::disk_store::{DiskStore, LogOptions};
pub use crate::live::{LiveClip, Next};
pub use crate::metrics::{CATALOGUE, handle as metrics_handle};
pub use crate::segment_log::{LogDir, LogFile, SEGMENT_MAGIC, parse as parse_segment};
pub use crate::server::transport;
pub use crate::state::Shared;
pub use crate::store::{Appended, ClipMeta, ClipStore, MemoryStore, StoredClip};
pub use crate::tls::{crypto_provider, ensure_data_dir, server_crypto};
pub use crate::usage::today;
pub use crate::web::PageConfig;

/// Wall-clock time, Unix milliseconds, as the relay reads it.
pub fn now_ms() -> u64 {
    crate::now_ms()
}
