//! Prometheus metrics (`netwatch agent --metrics ADDR`): counters fed from the stream records,
//! gauges read from the table at scrape time, in the text format prometheus-client encodes.
//!
//! Label cardinality is bounded by construction: protocol x state, old x new state, failure
//! reason, loss reason. Nothing per connection or per endpoint.
use std::net::SocketAddr;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{
    output::{LossReason, StreamRecord, table::Listed},
    table::Failure,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SocketLabels {
    protocol: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    old: String,
    new: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

pub struct Metrics {
    registry: Registry,
    sockets: Family<SocketLabels, Gauge>,
    transitions: Family<TransitionLabels, Counter>,
    connect_latency: Histogram,
    connect_failures: Family<ReasonLabels, Counter>,
    lost: Family<ReasonLabels, Counter>,
    retransmits: Counter,
    records: Counter,
    snapshot_time: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("netwatch");
        let sockets = Family::<SocketLabels, Gauge>::default();
        registry.register("sockets", "Sockets in the table by protocol and state", sockets.clone());
        let transitions = Family::<TransitionLabels, Counter>::default();
        registry.register(
            "transitions",
            "TCP state transitions by old and new state",
            transitions.clone(),
        );
        // 50 us .. ~26 s.
        let connect_latency = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.00005, 2.0, 20),
        );
        registry.register(
            "connect_latency_seconds",
            "SYN_SENT to ESTABLISHED time",
            connect_latency.clone(),
        );
        let connect_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "connect_failures",
            "Failed connections by reason",
            connect_failures.clone(),
        );
        let lost = Family::<ReasonLabels, Counter>::default();
        registry.register("lost_events", "Events lost, by reason", lost.clone());
        let retransmits = Counter::default();
        registry.register(
            "retransmits",
            "Segments retransmitted by connections that closed",
            retransmits.clone(),
        );
        let records = Counter::default();
        registry.register("records", "Stream records processed by the agent", records.clone());
        let snapshot_time = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "last_snapshot_timestamp_seconds",
            "When the agent last took a snapshot (Unix time)",
            snapshot_time.clone(),
        );
        Metrics {
            registry,
            sockets,
            transitions,
            connect_latency,
            connect_failures,
            lost,
            retransmits,
            records,
            snapshot_time,
        }
    }

    pub fn observe(&self, record: &StreamRecord) {
        self.records.inc();
        match record {
            StreamRecord::Transition(t) => {
                let labels =
                    TransitionLabels { old: t.old.name().into(), new: t.new.name().into() };
                self.transitions.get_or_create(&labels).inc();
                if t.old == crate::events::TcpState::SynSent
                    && t.new == crate::events::TcpState::Established
                    && let Some(ns) = t.duration_ns
                {
                    self.connect_latency.observe(ns as f64 / 1e9);
                }
                if let Some(failure) = t.failure {
                    let reason = match failure {
                        Failure::Refused => "refused",
                        Failure::Timeout => "timeout",
                        Failure::Aborted => "aborted",
                        Failure::Reset => "reset",
                    };
                    self.connect_failures
                        .get_or_create(&ReasonLabels { reason: reason.into() })
                        .inc();
                }
                if let Some(n) = t.retransmits {
                    self.retransmits.inc_by(u64::from(n));
                }
            }
            StreamRecord::Lost(loss) => {
                let reason = match loss.reason {
                    LossReason::RingBufferFull => "ring_buffer_full",
                    LossReason::Malformed => "malformed",
                    LossReason::ClientTooSlow => "client_too_slow",
                };
                self.lost.get_or_create(&ReasonLabels { reason: reason.into() }).inc_by(loss.count);
            }
        }
    }

    pub fn snapshot_taken(&self, unix_seconds: f64) {
        self.snapshot_time.set(unix_seconds);
    }

    /// The text exposition, with the socket gauges set from `rows` first.
    pub fn render(&self, rows: &[Listed]) -> String {
        self.sockets.clear();
        for listed in rows {
            let labels = SocketLabels {
                protocol: listed.row.protocol.name().into(),
                state: listed.row.state.name().into(),
            };
            self.sockets.get_or_create(&labels).inc();
        }
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text = "# encoding failed\n".into();
        }
        text
    }
}

/// Binds the metrics endpoint; a clear error when the address is taken or not allowed.
pub async fn bind(address: SocketAddr) -> Result<tokio::net::TcpListener, crate::Error> {
    tokio::net::TcpListener::bind(address).await.map_err(|source| {
        crate::Error::io(
            format!("cannot serve metrics on {address} (choose another with --metrics ADDR)"),
            source,
        )
    })
}

/// The HTTP response to a request whose head is `head`: the exposition for `GET /metrics`
/// (produced by `body` only then), 404 for anything else.
///
/// Hand-written rather than a web framework: one read-only route on a scrape endpoint, and
/// hyper/axum would add more to the build than the rest of netwatch's dependencies.
pub async fn respond<F: std::future::Future<Output = String>>(
    head: &str,
    body: impl FnOnce() -> F,
) -> String {
    if head.starts_with("GET /metrics ") || head.starts_with("GET /metrics?") {
        let body = body().await;
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_gauges() {
        let metrics = Metrics::new();
        let lost = crate::output::LossRecord {
            time: chrono::DateTime::from_timestamp_nanos(0),
            reason: LossReason::RingBufferFull,
            count: 7,
            total: 7,
        };
        metrics.observe(&StreamRecord::Lost(lost));
        let text = metrics.render(&[]);
        assert!(
            text.contains("netwatch_lost_events_total{reason=\"ring_buffer_full\"} 7"),
            "{text}"
        );
        assert!(text.contains("# TYPE netwatch_connect_latency_seconds histogram"), "{text}");
        assert!(text.contains("netwatch_records_total 1"), "{text}");
    }
}
