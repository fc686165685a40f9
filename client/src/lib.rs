//! The client side of ptt/1, the push-to-talk relay's protocol
//! (`docs/protocol.md`): connect and authenticate, send clips (live or
//! recorded), receive deliveries in order and acknowledge each one once
//! it is kept. `client-sim` (send, listen, load) and the relay's tests are
//! built on it; byte formats come from `codec`, which is sans-IO.

pub mod acks;
pub mod client;
pub mod failover;
#[cfg(feature = "ffi")]
pub mod ffi;
pub mod inbox;
pub mod net;
pub mod outbox;
pub mod push;
pub mod sdk;

pub use client::{
    Client, ClientError, ClientOptions, Event, OutgoingClip, Pacing, ReceivedClip, SeenIds,
    SendOutcome,
};
pub use net::NetError;

#[cfg(feature = "ffi")]
uniffi::setup_scaffolding!();
