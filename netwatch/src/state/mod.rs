//! The state netwatch keeps from events: the socket [`table`] (owners, listeners, timewait
//! sockets), per-connection [`history`], handshake [`stats`], who moved the kernel's
//! counters ([`attribution`]), and the [`tracer`] that feeds
//! them from the kernel and keeps them sound after lost events ([`loss`]) and on kernels that
//! report a new connection before naming it ([`clones`]).
pub mod attribution;
pub mod clones;
pub mod history;
pub mod loss;
pub mod stats;
pub mod table;
pub mod tracer;
