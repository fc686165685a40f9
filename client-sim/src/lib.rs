//! The `client-sim` tool: a person's `send` and `listen`, and operators'
//! `load` generator and its reports. The client itself is `ptt_client`.

pub mod load;
