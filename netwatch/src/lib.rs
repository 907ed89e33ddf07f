//! netwatch: a real-time TCP connection tracer built on eBPF.
//!
//! The folders follow the data's path: [`kernel`] (load and attach the programs, read and
//! decode the ring buffer) and [`host`] (the one-time snapshot: sock_diag, `/proc`) feed
//! [`state`] (the socket table, histories, statistics, and the tracer that runs the
//! pipeline), which emits [`record`]s; [`serve`] is what the agent offers (local API,
//! metrics, event log), [`recorded`] reads the event log back, [`output`] renders records
//! and rows, [`query`] is what the user asked to see, and [`cmd`] has one module per verb;
//! [`top`] is the live full-screen view. [`cli`] parses the command line.
pub mod cli;
pub mod cmd;
pub mod error;
pub mod host;
pub mod kernel;
pub mod output;
pub mod query;
pub mod record;
pub mod recorded;
pub mod serve;
pub mod state;
pub mod top;

pub use error::{Error, Result};
