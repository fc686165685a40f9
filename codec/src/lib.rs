//! Every byte format of the push-to-talk relay.
//!
//! - [`wire`]: the messages of the relay protocol (sans-IO encode/decode).
//! - [`framing`]: Opus packet records on a clip stream, with limit checks.
//! - [`opus_packet`]: structure checks of one Opus packet (RFC 6716 §3).
//! - [`ogg_opus`]: Ogg Opus files (RFC 7845), read and written in pure Rust.
//! - [`code`]: the protocol's error codes.
//! - [`cluster`]: messages between the relays of a cluster.
//! - [`retry`]: how long to wait before trying again (one rule for all).
//!
//! Nothing here does I/O or knows about tokio: the relay and the clients
//! feed bytes in and get messages and events out.

#[cfg(feature = "opus")]
pub mod audio;
pub mod cluster;
pub mod code;
pub mod error;
pub mod framing;
pub mod ogg_opus;
pub mod opus_packet;
pub mod retry;
#[cfg(feature = "token")]
pub mod token;
pub mod varint;
pub mod wire;

pub use code::ErrorCode;
pub use error::{ClipError, WireError};
pub use framing::{ClipEnd, FrameLimits, Framer, Scan};
pub use wire::{AudioFormat, ClipId, Message, Target};
