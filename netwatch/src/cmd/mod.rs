//! One module per verb of the command line; each turns its resolved arguments into output.
pub mod agent;
pub mod history;
pub mod stats;
pub mod table;
pub mod watch;
