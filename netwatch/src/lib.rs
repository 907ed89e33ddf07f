//! netwatch: a real-time TCP connection tracer built on eBPF.
//!
//! The data's path, one module per stage: [`loader`] (load, attach, fallbacks) ->
//! [`events`] (ring buffer, decoding) -> [`table`] (pure per-socket state: owners, times) ->
//! [`filter`] -> [`output`] (text lines, NDJSON). [`tracer`] runs that pipeline for
//! [`watch`] and for the [`agent`], which serves it to watch clients over [`api`]. [`snapshot`]
//! (sock_diag in every netns, `/proc/*/fd` owners) feeds [`listing`], the `table` view, whose
//! filter language is [`query`]. [`cli`] parses the command line into its configuration.
pub mod agent;
pub mod api;
pub mod btf;
pub mod cli;
pub mod error;
pub mod eventlog;
pub mod events;
pub mod filter;
pub mod history;
pub mod history_cmd;
pub mod listing;
pub mod loader;
pub mod metrics;
pub mod output;
pub mod query;
pub mod report;
pub mod services;
pub mod snapshot;
pub mod stats;
pub mod table;
pub mod tracer;
pub mod watch;

pub use error::{Error, Result};
