//! Client library for the push-to-talk relay, and the `client-sim` tool
//! built on it: a person's `send` and `listen`.

pub mod client;
pub mod load;
pub mod net;

pub use client::{
    Client, ClientError, ClientOptions, Event, OutgoingClip, Pacing, ReceivedClip, SeenIds,
    SendOutcome,
};
