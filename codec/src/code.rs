//! Error codes: one number space used in QUIC CONNECTION_CLOSE (application),
//! RESET_STREAM and STOP_SENDING frames, and in `Rejected` and `GoAway`
//! messages. `docs/protocol.md` lists what a client should do for each.

use std::fmt;

macro_rules! codes {
    ($($(#[$doc:meta])* $name:ident = $value:expr, $text:expr;)*) => {
        /// A protocol error code. Unknown values from a newer peer decode as
        /// [`ErrorCode::Other`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[$doc])* $name,)*
            /// A code this version does not know.
            Other(u64),
        }

        impl ErrorCode {
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            pub fn to_u64(self) -> u64 {
                match self {
                    $(ErrorCode::$name => $value,)*
                    ErrorCode::Other(v) => v,
                }
            }

            pub fn from_u64(v: u64) -> Self {
                match v {
                    $($value => ErrorCode::$name,)*
                    other => ErrorCode::Other(other),
                }
            }

            /// Stable lower-case name, used in logs, metrics labels and CLI
            /// output.
            pub fn name(self) -> &'static str {
                match self {
                    $(ErrorCode::$name => $text,)*
                    ErrorCode::Other(_) => "unknown",
                }
            }
        }
    };
}

codes! {
    /// Normal close; nothing went wrong.
    NoError = 0x0, "no_error";
    /// The peer sent bytes this protocol does not allow.
    ProtocolViolation = 0x1, "protocol_violation";
    /// The first stream did not start with `Auth`, or auth came too late.
    Unauthenticated = 0x2, "unauthenticated";
    /// The token's `exp` has passed: mint a new one.
    TokenExpired = 0x3, "token_expired";
    /// The token's signature, algorithm or claims are wrong.
    TokenInvalid = 0x4, "token_invalid";
    /// The relay is at a capacity limit; retry after the hinted delay.
    ServerBusy = 0x5, "server_busy";
    /// The relay is shutting down; reconnect (to another relay).
    GoingAway = 0x6, "going_away";
    /// A newer connection of the same user replaced this one.
    SessionReplaced = 0x7, "session_replaced";
    /// The relay failed internally; retry.
    Internal = 0x8, "internal";
    /// The clip is longer than the relay's `max_clip_ms`.
    ClipTooLong = 0x10, "clip_too_long";
    /// The clip has more Opus bytes than `max_clip_bytes`.
    ClipTooLarge = 0x11, "clip_too_large";
    /// An Opus packet exceeds `max_packet_bytes` or a frame 1275 bytes.
    PacketTooLarge = 0x12, "packet_too_large";
    /// An Opus packet breaks RFC 6716 §3 (TOC byte, frame lengths).
    BadPacket = 0x13, "bad_packet";
    /// No byte arrived on a clip upload for `upload_idle_timeout`.
    UploadIdleTimeout = 0x14, "upload_idle_timeout";
    /// The target user or channel name is not acceptable.
    BadTarget = 0x15, "bad_target";
    /// Another sender already used this clip id.
    ClipIdConflict = 0x16, "clip_id_conflict";
    /// The store has no room; retry later.
    StorageFull = 0x17, "storage_full";
    /// Delivery streams only: the sender stopped before the clip was complete.
    CutOff = 0x18, "cut_off";
    /// The sender is over a rate limit; retry after the hinted delay.
    RateLimited = 0x19, "rate_limited";
    /// The token does not grant this action.
    NotAllowed = 0x1a, "not_allowed";
    /// Too many clip uploads at once on this connection.
    TooManyStreams = 0x1b, "too_many_streams";
    /// Another member holds the channel's floor; the reason names them.
    FloorBusy = 0x1c, "floor_busy";
    /// The clip was cut because a priority talker took the floor.
    Preempted = 0x1d, "preempted";
}

impl ErrorCode {
    /// The codes a client retries a refused clip on (`Rejected`, §6 of
    /// docs/protocol.md), with the same clip id, after the relay's
    /// `retry_after_ms` or a backoff ([`crate::retry::Backoff`]). The one
    /// list every client uses (the SDK, `client-sim`; the web app's copy
    /// is checked against it).
    pub const RETRYABLE: &'static [ErrorCode] = &[
        ErrorCode::ServerBusy,
        ErrorCode::GoingAway,
        ErrorCode::Internal,
        ErrorCode::UploadIdleTimeout,
        ErrorCode::StorageFull,
        ErrorCode::RateLimited,
    ];

    /// Whether a clip refused with this code may be sent again (same id):
    /// the relay was busy, going away, failing, the upload fell behind
    /// real time on a poor link, or the user is over a rate. Unknown codes
    /// count as `internal`.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorCode::Other(_)) || Self::RETRYABLE.contains(&self)
    }

    /// Whether a connection the relay closed with this code should be made
    /// again by itself (after a backoff): a normal close, or a retryable
    /// code. Not after a token problem (get a new one), `session_replaced`
    /// (another device took over) or a protocol violation.
    pub fn reconnects(self) -> bool {
        self == ErrorCode::NoError || self.is_retryable()
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::Other(v) => write!(f, "unknown (0x{v:x})"),
            c => write!(f, "{} (0x{:x})", c.name(), c.to_u64()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for &c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u64(c.to_u64()), c);
            assert!(seen.insert(c.to_u64()), "duplicate value for {c}");
        }
        assert_eq!(ErrorCode::from_u64(0xdead), ErrorCode::Other(0xdead));
    }

    /// The retry rule as docs/protocol.md §6 states it.
    #[test]
    fn the_retryable_codes_are_the_specs() {
        let retried: Vec<&str> = ErrorCode::ALL
            .iter()
            .filter(|c| c.is_retryable())
            .map(|c| c.name())
            .collect();
        assert_eq!(
            retried,
            [
                "server_busy",
                "going_away",
                "internal",
                "upload_idle_timeout",
                "storage_full",
                "rate_limited"
            ]
        );
        assert!(ErrorCode::Other(0x99).is_retryable(), "unknown is internal");
        for c in ["cut_off", "floor_busy", "preempted", "clip_id_conflict"] {
            let code = ErrorCode::ALL.iter().find(|x| x.name() == c).unwrap();
            assert!(!code.is_retryable(), "{c}");
        }
        assert!(ErrorCode::NoError.reconnects());
        assert!(ErrorCode::GoingAway.reconnects());
        assert!(!ErrorCode::SessionReplaced.reconnects());
        assert!(!ErrorCode::TokenExpired.reconnects());
    }
}
