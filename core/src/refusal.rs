//! Why the relay says no, one type everywhere: to an upload (`Rejected`,
//! with STOP_SENDING while the client may still write) and to a
//! connection (CONNECTION_CLOSE). docs/protocol.md §6 lists what a client
//! does with each code.

use std::time::Duration;

use codec::ErrorCode;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    /// Said to the client (`Rejected.reason`, the close reason).
    pub reason: String,
    /// When the client may try again (`Rejected.retry_after_ms`).
    pub retry_after: Option<Duration>,
}

impl Refusal {
    pub fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            retry_after: None,
        }
    }

    /// Another sender used this clip id.
    pub fn conflict() -> Self {
        Self::new(
            ErrorCode::ClipIdConflict,
            "clip id in use by another sender",
        )
    }

    /// The relay holds `max_inflight_bytes` of clips being received: the
    /// sender tries again shortly.
    pub fn inflight_full(max_inflight_bytes: u64) -> Self {
        Self::new(
            ErrorCode::ServerBusy,
            format!("relay at max_inflight_bytes ({max_inflight_bytes})"),
        )
        .retry_after(Duration::from_millis(500))
    }

    /// The sender's clip budget is spent; `wait` until it allows one more.
    pub fn rate_limited(clips_per_minute: u32, bytes_per_minute: u64, wait: Duration) -> Self {
        Self::new(
            ErrorCode::RateLimited,
            format!("over {clips_per_minute} clips or {bytes_per_minute} bytes per minute"),
        )
        .retry_after(wait)
    }

    /// A channel's floor is held by `holder`.
    pub fn floor_busy(holder: &str, channel: &str) -> Self {
        Self::new(
            ErrorCode::FloorBusy,
            format!("busy: {holder} holds the floor of {channel}"),
        )
    }

    /// The floor's holder, pre-empted by `by` (who has priority).
    pub fn preempted(by: &str, channel: &str) -> Self {
        Self::new(
            ErrorCode::Preempted,
            format!("{by} (priority) took the floor of {channel}"),
        )
    }

    /// The floor's holder, superseded by the same user's newer clip.
    pub fn superseded_by_newer() -> Self {
        Self::new(ErrorCode::CutOff, "superseded by a newer clip")
    }

    /// An upload taken over by a retry of the same clip by its sender
    /// (listeners hear it cut off; the retry goes on).
    pub fn superseded() -> Self {
        Self::new(ErrorCode::CutOff, "superseded by a retry of the same clip")
    }

    /// Try again after `wait` (at least 1 ms on the wire).
    pub fn retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait.max(Duration::from_millis(1)));
        self
    }

    /// `retry_after` as `Rejected` carries it (0: no hint).
    pub fn retry_after_ms(&self) -> u64 {
        self.retry_after.map_or(0, |d| d.as_millis() as u64)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.name(), self.reason)
    }
}

/// What listeners of a clip hear when its upload ends without it: a
/// pre-emption as such (a higher priority took the floor), anything else
/// as a cut.
pub fn heard_as(upload_ended_by: ErrorCode) -> ErrorCode {
    if upload_ended_by == ErrorCode::Preempted {
        ErrorCode::Preempted
    } else {
        ErrorCode::CutOff
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hint_is_at_least_a_millisecond_and_absent_is_zero() {
        let r = Refusal::new(ErrorCode::RateLimited, "slow down");
        assert_eq!(r.retry_after_ms(), 0);
        assert_eq!(r.clone().retry_after(Duration::ZERO).retry_after_ms(), 1);
        assert_eq!(r.retry_after(Duration::from_secs(2)).retry_after_ms(), 2000);
        assert_eq!(Refusal::conflict().code, ErrorCode::ClipIdConflict);
    }

    /// Listeners hear a pre-emption as one; every other end of an upload
    /// (taken over, too slow, the sender gone, a bad packet) as a cut.
    #[test]
    fn listeners_hear_a_preemption_as_such_and_the_rest_as_a_cut() {
        assert_eq!(heard_as(ErrorCode::Preempted), ErrorCode::Preempted);
        for code in [
            ErrorCode::ClipIdConflict,
            ErrorCode::UploadIdleTimeout,
            ErrorCode::ProtocolViolation,
            ErrorCode::NoError,
        ] {
            assert_eq!(heard_as(code), ErrorCode::CutOff, "{code:?}");
        }
    }
}
