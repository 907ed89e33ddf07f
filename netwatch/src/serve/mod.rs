//! What the agent offers while it runs: the local [`api`] socket, Prometheus [`metrics`] and
//! the durable [`eventlog`].
pub mod api;
pub mod eventlog;
pub mod metrics;
