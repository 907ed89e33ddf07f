//! netwatch: a real-time TCP connection tracer built on eBPF.
//!
//! The data's path, one module per stage: [`loader`] (load, attach, fallbacks) ->
//! [`events`] (ring buffer, decoding) -> [`table`] (pure per-socket state: owners, times) ->
//! [`filter`] -> [`output`] (text lines, NDJSON). [`watch`] runs that loop; [`cli`] parses the
//! command line into its configuration.
pub mod btf;
pub mod cli;
pub mod error;
pub mod events;
pub mod filter;
pub mod loader;
pub mod output;
pub mod table;
pub mod watch;

pub use error::{Error, Result};
