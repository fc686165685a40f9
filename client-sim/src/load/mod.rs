//! `client-sim load`: thousands of virtual users in one process, every
//! delivery verified, every latency measured. See `docs/load.md`.

pub mod baseline;
pub mod impair;
pub mod report;
pub mod run;
pub mod source;
pub mod stats;
pub mod verify;
pub mod workload;

pub use report::Report;
pub use run::{LoadTarget, run};
pub use source::Source;
pub use workload::{Mode, PressFrom, Workload, WorkloadArgs};
