//! The relay's decisions, sans-IO. Every rule of who receives a clip, who
//! holds a channel's floor, which upload of a clip id runs, how far an
//! upload may fall behind real time, and when the relay says no lives
//! here, and is unit-tested here without sockets. The relay's connection
//! and cluster code (crate `relay`) tell it what happened, with `now`, and
//! carry out what it answers.
//!
//! This crate depends on `codec`, `dashmap` and `foldhash` only: no tokio, no quinn,
//! no clock of its own (a unit test in `relay/src/house.rs` reads the lock
//! file to keep it so).

pub mod admission;
pub mod deliver;
pub mod hash;
pub mod history;
pub mod limits;
pub mod refusal;
pub mod router;
pub mod upload;
