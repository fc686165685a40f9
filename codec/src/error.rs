use thiserror::Error;

use crate::code::ErrorCode;

/// Why bytes from a peer could not be decoded.
///
/// Every variant means the peer sent something this protocol does not allow:
/// the receiver closes the stream (or the connection, for the control stream)
/// with [`WireError::code`], and keeps nothing of it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    #[error("{0}: message body ends too early")]
    Truncated(&'static str),
    #[error("{0}: bytes left over after the message body")]
    TrailingBytes(&'static str),
    #[error("message of {len} bytes exceeds the limit of {max}")]
    MessageTooLong { len: u64, max: usize },
    #[error("{field} longer than {max} bytes")]
    FieldTooLong { field: &'static str, max: usize },
    #[error("{0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    #[error("invalid {field}: {why}")]
    Invalid {
        field: &'static str,
        why: &'static str,
    },
    #[error("unexpected message type 0x{0:x} here")]
    Unexpected(u64),
    #[error(transparent)]
    Clip(#[from] ClipError),
}

impl WireError {
    /// The protocol error code that tells the peer what it did wrong.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::Clip(e) => e.code(),
            _ => ErrorCode::ProtocolViolation,
        }
    }
}

/// Why a clip's packet stream was refused: a limit or an invalid Opus packet.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ClipError {
    #[error("Opus packet of {len} bytes exceeds the limit of {max}")]
    PacketTooLarge { len: u64, max: u64 },
    #[error("invalid Opus packet #{index}: {why}")]
    BadPacket { index: u64, why: &'static str },
    #[error("clip longer than {max_ms} ms")]
    TooLong { max_ms: u64 },
    #[error("clip larger than {max_bytes} bytes")]
    TooLarge { max_bytes: u64 },
    #[error("clip end says {claimed} packets, stream carried {actual}")]
    CountMismatch { claimed: u64, actual: u64 },
    #[error("clip end granule {granule} is past the audio's end {max}")]
    BadGranule { granule: u64, max: u64 },
    #[error("clip has no packets")]
    Empty,
    #[error("bytes after the clip end")]
    TrailingBytes,
    #[error("stream finished before the clip end")]
    Unfinished,
}

impl ClipError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ClipError::PacketTooLarge { .. } => ErrorCode::PacketTooLarge,
            ClipError::BadPacket { .. } => ErrorCode::BadPacket,
            ClipError::TooLong { .. } => ErrorCode::ClipTooLong,
            ClipError::TooLarge { .. } => ErrorCode::ClipTooLarge,
            _ => ErrorCode::ProtocolViolation,
        }
    }
}
