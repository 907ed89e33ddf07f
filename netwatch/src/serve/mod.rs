//! What the agent offers while it runs: the local [`api`] socket, Prometheus [`metrics`]
//! (the kernel's counters among them, as node_exporter names them: [`netstat`]) and the
//! durable [`eventlog`]; metrics [`per_workload`] on request; and [`otlp`] export to an
//! OpenTelemetry collector.
pub mod api;
pub mod eventlog;
pub mod metrics;
pub mod netstat;
pub mod otlp;
pub mod per_workload;
pub mod scrape;
