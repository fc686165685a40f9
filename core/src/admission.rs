//! Connection admission: what the relay does with a new handshake, before
//! it has spent anything on it.

use codec::ErrorCode;

use crate::refusal::Refusal;

/// A handshake arriving, as the accept loop sees it.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    /// The relay is shutting down.
    pub draining: bool,
    /// Connections not yet authenticated, this one left out.
    pub unauthenticated: usize,
    /// Connections served, this one left out.
    pub connections: usize,
    /// The client proved its address (a Retry token).
    pub validated: bool,
}

/// The limits admission keeps (settings of the same names).
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub max_unauthenticated_connections: usize,
    pub max_connections: usize,
}

/// What to do with the handshake.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Refused at once (CONNECTION_REFUSED, no state kept); the reason is
    /// the `ptt_connections_rejected_total` label.
    Refuse(&'static str),
    /// Ask the client to prove its address first (a Retry costs no state).
    Retry,
    /// Complete the handshake, then close with this refusal (the client
    /// learns why and when to come back).
    Busy(Refusal),
    /// Serve it.
    Serve,
}

/// Decides a handshake's fate. `rate` takes a token from the handshake
/// rate limit; it is asked only when the cheaper checks pass, so refused
/// handshakes spend none.
pub fn admit(a: Arrival, caps: Caps, rate: impl FnOnce() -> bool) -> Admission {
    if a.draining {
        return Admission::Refuse("draining");
    }
    if a.unauthenticated >= caps.max_unauthenticated_connections {
        return Admission::Refuse("unauthenticated_limit");
    }
    if !rate() {
        // A flood: unvalidated clients prove their address, validated
        // ones are refused.
        return match a.validated {
            true => Admission::Refuse("handshake_rate"),
            false => Admission::Retry,
        };
    }
    if a.connections >= caps.max_connections {
        return Admission::Busy(Refusal::new(
            ErrorCode::ServerBusy,
            format!(
                "relay at max_connections ({}); retry later",
                caps.max_connections
            ),
        ));
    }
    Admission::Serve
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: Caps = Caps {
        max_unauthenticated_connections: 2,
        max_connections: 3,
    };

    fn arrival() -> Arrival {
        Arrival {
            draining: false,
            unauthenticated: 0,
            connections: 0,
            validated: false,
        }
    }

    #[test]
    fn a_draining_relay_refuses_and_spends_no_rate() {
        let a = Arrival {
            draining: true,
            ..arrival()
        };
        let mut asked = false;
        let d = admit(a, CAPS, || {
            asked = true;
            true
        });
        assert_eq!(d, Admission::Refuse("draining"));
        assert!(!asked);
    }

    #[test]
    fn the_unauthenticated_cap_refuses_before_the_rate() {
        let a = Arrival {
            unauthenticated: 2,
            ..arrival()
        };
        assert_eq!(
            admit(a, CAPS, || panic!("rate asked")),
            Admission::Refuse("unauthenticated_limit")
        );
        let a = Arrival {
            unauthenticated: 1,
            ..arrival()
        };
        assert_eq!(admit(a, CAPS, || true), Admission::Serve);
    }

    #[test]
    fn over_the_rate_unvalidated_clients_get_a_retry_validated_ones_a_refusal() {
        assert_eq!(admit(arrival(), CAPS, || false), Admission::Retry);
        let validated = Arrival {
            validated: true,
            ..arrival()
        };
        assert_eq!(
            admit(validated, CAPS, || false),
            Admission::Refuse("handshake_rate")
        );
    }

    #[test]
    fn past_max_connections_the_client_hears_server_busy() {
        let a = Arrival {
            connections: 3,
            ..arrival()
        };
        let Admission::Busy(r) = admit(a, CAPS, || true) else {
            panic!("not busy")
        };
        assert_eq!(r.code, ErrorCode::ServerBusy);
        assert!(r.reason.contains("max_connections (3)"), "{}", r.reason);
        let a = Arrival {
            connections: 2,
            ..arrival()
        };
        assert_eq!(admit(a, CAPS, || true), Admission::Serve);
    }
}
