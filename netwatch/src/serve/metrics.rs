//! Prometheus metrics (`netwatch agent --metrics ADDR`): counters fed from the stream records,
//! gauges read from the table at scrape time, in the text format prometheus-client encodes.
//!
//! Label cardinality is bounded by construction: protocol x state, old x new state, failure
//! reason, loss reason, what was retransmitted. Nothing per connection; per remote endpoint
//! only when asked for (`--metrics-remotes N`), for at most N endpoints, the rest counted as
//! `remote="other"`; per process and endpoint likewise (`--metrics-causes N`). The kernel's
//! protocol counters come unprefixed, as node_exporter names them ([`super::netstat`]).
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Mutex,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{
    kernel::events::{Protocol, TcpState},
    record::{LossReason, Resent, StreamRecord},
    state::{
        attribution,
        table::{Ending, Failure},
    },
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SocketLabels {
    protocol: &'static str,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    old: &'static str,
    new: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndingLabels {
    ending: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResentLabels {
    resent: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RemoteLabels {
    remote: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    /// node_exporter's spelling: `TcpExt_TCPSynRetrans`.
    counter: String,
    comm: String,
    endpoint: String,
}

/// The opt-in counts of increments by process and endpoint, for the first `cap` pairs.
struct PerCause {
    cap: usize,
    labelled: Mutex<HashSet<(String, String)>>,
    increments: Family<CauseLabels, Counter>,
}

impl PerCause {
    fn observe(&self, record: &StreamRecord) {
        let ids = attribution::counters_of(record);
        if ids.is_empty() {
            return;
        }
        let Some(culprit) = attribution::Culprit::of(record) else { return };
        let mut pair =
            (culprit.comm.map(String::from).unwrap_or_default(), culprit.endpoint.to_string());
        let mut labelled = self.labelled.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !labelled.contains(&pair) {
            if labelled.len() < self.cap {
                labelled.insert(pair.clone());
            } else {
                pair = ("other".into(), "other".into());
            }
        }
        drop(labelled);
        for id in ids.iter() {
            let rule = &attribution::RULES[usize::from(id)];
            let labels = CauseLabels {
                counter: format!("{}_{}", rule.group, rule.name),
                comm: pair.0.clone(),
                endpoint: pair.1.clone(),
            };
            self.increments.get_or_create(&labels).inc();
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RemoteReasonLabels {
    remote: String,
    reason: &'static str,
}

/// The opt-in per-remote-endpoint counters and the endpoints they have labels for.
struct PerRemote {
    cap: usize,
    labelled: Mutex<HashSet<String>>,
    connects: Family<RemoteLabels, Counter>,
    failures: Family<RemoteReasonLabels, Counter>,
    retransmits: Family<RemoteLabels, Counter>,
}

impl PerRemote {
    /// `ip:port` for the first `cap` endpoints seen, `other` after that.
    fn label(&self, addr: IpAddr, port: u16) -> String {
        let endpoint = SocketAddr::from((addr, port)).to_string();
        let mut labelled = self.labelled.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if labelled.contains(&endpoint) {
            endpoint
        } else if labelled.len() < self.cap {
            labelled.insert(endpoint.clone());
            endpoint
        } else {
            "other".into()
        }
    }
}

/// What the agent reports about itself at scrape time.
#[derive(Clone, Copy, Debug, Default)]
pub struct Health {
    /// When the table was last rebuilt from a snapshot (Unix time, seconds).
    pub last_snapshot: f64,
    /// The most bytes the ring buffer held unread at once, and its size.
    pub ring_peak_bytes: u64,
    pub ring_size_bytes: u64,
}

/// Bytes allocated and not freed, as glibc counts them (its arenas and mmapped chunks); None
/// with another allocator (the static musl build), which then has no such metric. RSS also
/// holds what the allocator keeps free, which depends on the history of allocations; this
/// does not.
fn heap_allocated_bytes() -> Option<u64> {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallinfo2 has no preconditions (it locks each arena while it counts).
        let info = unsafe { libc::mallinfo2() };
        Some((info.uordblks + info.hblkhd) as u64)
    }
    #[cfg(not(target_env = "gnu"))]
    {
        None
    }
}

pub struct Metrics {
    registry: Registry,
    sockets: Family<SocketLabels, Gauge>,
    transitions: Family<TransitionLabels, Counter>,
    /// `transitions`' counters by (old, new), looked up once each: the family's lookup hashes
    /// its labels under a lock, once per transition otherwise.
    transition_counters: Box<[std::sync::OnceLock<Counter>]>,
    connect_latency: Histogram,
    connect_failures: Family<ReasonLabels, Counter>,
    lost: Family<ReasonLabels, Counter>,
    retransmits: Family<ResentLabels, Counter>,
    sockets_ended: Family<EndingLabels, Counter>,
    log_failures: Counter,
    records: Counter,
    snapshot_time: Gauge<f64, std::sync::atomic::AtomicU64>,
    ring_peak: Gauge,
    ring_size: Gauge,
    heap: Gauge,
    per_remote: Option<PerRemote>,
    per_cause: Option<PerCause>,
    per_workload: Option<super::per_workload::PerWorkload>,
    /// The kernel's counters, unprefixed.
    netstat: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(0, 0)
    }
}

impl Metrics {
    /// `remotes`: how many remote endpoints get labels of their own (0: none); `causes`: how
    /// many process and endpoint pairs.
    pub fn new(remotes: usize, causes: usize) -> Metrics {
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
        let retransmits = Family::<ResentLabels, Counter>::default();
        registry.register(
            "retransmits",
            "TCP retransmissions: resent=segment (tcp_retransmit_skb) or synack (a listener's \
             SYN-ACK to a half-open connection)",
            retransmits.clone(),
        );
        let sockets_ended = Family::<EndingLabels, Counter>::default();
        registry.register(
            "sockets_ended",
            "Sockets whose end no tracepoint reports (timewait sockets, a deleted namespace's), \
             by what ended them",
            sockets_ended.clone(),
        );
        // Every known label value exists from the start, at zero: an alert on a rate, or on
        // absent(), works before the first loss or failure.
        for reason in LossReason::ALL {
            let _ = lost.get_or_create(&ReasonLabels { reason: reason.name() });
        }
        for failure in Failure::ALL {
            let _ = connect_failures.get_or_create(&ReasonLabels { reason: failure.name() });
        }
        for resent in Resent::ALL {
            let _ = retransmits.get_or_create(&ResentLabels { resent: resent.name() });
        }
        for ending in Ending::ALL {
            let _ = sockets_ended.get_or_create(&EndingLabels { ending: ending.name() });
        }
        let log_failures = Counter::default();
        registry.register(
            "log_failures",
            "Times the event log could not be written and logging stopped (tracing goes on)",
            log_failures.clone(),
        );
        let records = Counter::default();
        registry.register("records", "Stream records processed by the agent", records.clone());
        let snapshot_time = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "last_snapshot_timestamp_seconds",
            "When the agent last took a snapshot (Unix time)",
            snapshot_time.clone(),
        );
        let ring_peak = Gauge::default();
        registry.register(
            "ring_buffer_peak_bytes",
            "The most bytes of events the ring buffer held unread at once (events are lost \
             when it is full)",
            ring_peak.clone(),
        );
        let ring_size = Gauge::default();
        registry.register("ring_buffer_size_bytes", "The ring buffer's size", ring_size.clone());
        let heap = Gauge::default();
        if heap_allocated_bytes().is_some() {
            registry.register(
                "heap_allocated_bytes",
                "Bytes the agent has allocated and not freed (glibc's mallinfo2): its memory \
                 without what the allocator holds free",
                heap.clone(),
            );
        }
        let per_remote = (remotes > 0).then(|| {
            let remote = PerRemote {
                cap: remotes,
                labelled: Mutex::new(HashSet::new()),
                connects: Family::default(),
                failures: Family::default(),
                retransmits: Family::default(),
            };
            registry.register(
                "remote_connects",
                "Completed handshakes by remote endpoint (--metrics-remotes)",
                remote.connects.clone(),
            );
            registry.register(
                "remote_connect_failures",
                "Failed connections by remote endpoint and reason (--metrics-remotes)",
                remote.failures.clone(),
            );
            registry.register(
                "remote_retransmits",
                "Retransmitted segments by remote endpoint (--metrics-remotes)",
                remote.retransmits.clone(),
            );
            remote
        });
        let per_cause = (causes > 0).then(|| {
            let per_cause = PerCause {
                cap: causes,
                labelled: Mutex::new(HashSet::new()),
                increments: Family::default(),
            };
            registry.register(
                "counter_causes",
                "Increments of the kernel's protocol counters (node_netstat_*) by the process and \
                 endpoint whose event made them, as `netwatch counters` attributes them \
                 (--metrics-causes)",
                per_cause.increments.clone(),
            );
            per_cause
        });
        let mut netstat = Registry::default();
        netstat.register_collector(Box::new(super::netstat::NetstatCollector));
        Metrics {
            registry,
            per_cause,
            per_workload: None,
            netstat,
            sockets,
            transitions,
            transition_counters: (0..TcpState::ALL.len().pow(2))
                .map(|_| std::sync::OnceLock::new())
                .collect(),
            connect_latency,
            connect_failures,
            lost,
            retransmits,
            sockets_ended,
            log_failures,
            records,
            snapshot_time,
            ring_peak,
            ring_size,
            heap,
            per_remote,
        }
    }

    fn transition_counter(&self, old: TcpState, new: TcpState) -> &Counter {
        // TcpState's discriminants are the kernel's, 1 to 12, as TcpState::ALL lists them.
        let index = |state: TcpState| state as usize - 1;
        let at = index(old) * TcpState::ALL.len() + index(new);
        self.transition_counters[at].get_or_init(|| {
            let labels = TransitionLabels { old: old.name(), new: new.name() };
            self.transitions.get_or_create(&labels).clone()
        })
    }

    pub fn observe(&self, record: &StreamRecord) {
        self.records.inc();
        if let Some(per_cause) = &self.per_cause {
            per_cause.observe(record);
        }
        if let Some(per_workload) = &self.per_workload {
            per_workload.observe(record);
        }
        match record {
            StreamRecord::Transition(t) => {
                self.transition_counter(t.old, t.new).inc();
                let connected = t.old == TcpState::SynSent && t.new == TcpState::Established;
                if connected && let Some(ns) = t.duration_ns {
                    self.connect_latency.observe(ns as f64 / 1e9);
                }
                if connected && let Some(remote) = &self.per_remote {
                    let labels = RemoteLabels { remote: remote.label(t.raddr, t.rport) };
                    remote.connects.get_or_create(&labels).inc();
                }
                if let Some(failure) = t.failure {
                    let reason = failure.name();
                    if let Some(remote) = &self.per_remote {
                        let labels =
                            RemoteReasonLabels { remote: remote.label(t.raddr, t.rport), reason };
                        remote.failures.get_or_create(&labels).inc();
                    }
                    self.connect_failures.get_or_create(&ReasonLabels { reason }).inc();
                }
                if let Some(ending) = t.ending {
                    let labels = EndingLabels { ending: ending.name() };
                    self.sockets_ended.get_or_create(&labels).inc();
                }
            }
            StreamRecord::Retransmit(r) => {
                self.retransmits.get_or_create(&ResentLabels { resent: r.resent.name() }).inc();
                if r.resent == Resent::Segment
                    && let Some(remote) = &self.per_remote
                {
                    let labels = RemoteLabels { remote: remote.label(r.raddr, r.rport) };
                    remote.retransmits.get_or_create(&labels).inc();
                }
            }
            StreamRecord::LogFailed(_) => {
                self.log_failures.inc();
            }
            // Counted by the exporter itself (netwatch_otlp_dropped_records).
            StreamRecord::ExportDropped(_) => {}
            StreamRecord::Lost(loss) => {
                let reason = loss.reason.name();
                self.lost.get_or_create(&ReasonLabels { reason }).inc_by(loss.count);
            }
        }
    }

    /// Also counts connects, failures and retransmits per workload, for the first `cap`.
    pub fn count_workloads(&mut self, cap: usize) {
        if cap > 0 {
            self.per_workload =
                Some(super::per_workload::PerWorkload::new(cap, &mut self.registry));
        }
    }

    /// Adds the OTLP exporter's counts.
    pub fn register_otlp(&mut self, counters: &super::otlp::Counters) {
        counters.register(&mut self.registry);
    }

    /// The text exposition, with the socket gauges set from `counts` (sockets by protocol and
    /// state) and the agent's own from `health` first.
    pub fn render(&self, counts: &HashMap<(Protocol, TcpState), u64>, health: Health) -> String {
        self.snapshot_time.set(health.last_snapshot);
        self.ring_peak.set(i64::try_from(health.ring_peak_bytes).unwrap_or(i64::MAX));
        self.ring_size.set(i64::try_from(health.ring_size_bytes).unwrap_or(i64::MAX));
        if let Some(bytes) = heap_allocated_bytes() {
            self.heap.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        self.sockets.clear();
        for (&(protocol, state), &count) in counts {
            let labels = SocketLabels { protocol: protocol.name(), state: state.name() };
            self.sockets.get_or_create(&labels).set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut text = String::new();
        let encoded = encode_registry(&mut text, &self.registry)
            .and_then(|()| encode_registry(&mut text, &self.netstat))
            .and_then(|()| encode_eof(&mut text));
        if encoded.is_err() {
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
        let metrics = Metrics::new(0, 0);
        let lost = crate::record::LossRecord {
            time: chrono::DateTime::from_timestamp_nanos(0),
            reason: LossReason::RingBufferFull,
            count: 7,
            total: 7,
        };
        metrics.observe(&StreamRecord::Lost(lost));
        let text = metrics.render(&HashMap::new(), Health::default());
        assert!(
            text.contains("netwatch_lost_events_total{reason=\"ring_buffer_full\"} 7"),
            "{text}"
        );
        assert!(text.contains("# TYPE netwatch_connect_latency_seconds histogram"), "{text}");
        assert!(text.contains("netwatch_records_total 1"), "{text}");
        assert!(text.contains("\nnode_netstat_Tcp_ActiveOpens "), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn increments_by_cause_are_bounded() {
        use std::net::{IpAddr, Ipv4Addr};
        let metrics = Metrics::new(0, 1);
        for port in [80, 443] {
            let record = crate::record::RetransmitRecord {
                time: chrono::DateTime::from_timestamp_nanos(0),
                mono_ns: 0,
                resent: Resent::Segment,
                state: Some(TcpState::SynSent),
                pid: Some(7),
                comm: Some("curl".into()),
                family: crate::kernel::events::Family::Ipv4,
                laddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                lport: 5000,
                raddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                rport: port,
                cookie: 1,
                netns: 1,
                count: 1,
                direction: None,
                workload: None,
            };
            metrics.observe(&StreamRecord::Retransmit(Box::new(record)));
        }
        let text = metrics.render(&HashMap::new(), Health::default());
        for line in [
            "netwatch_counter_causes_total{counter=\"TcpExt_TCPSynRetrans\",comm=\"curl\",endpoint=\"127.0.0.1:80\"} 1",
            "netwatch_counter_causes_total{counter=\"Tcp_RetransSegs\",comm=\"other\",endpoint=\"other\"} 1",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        for zero in [
            "netwatch_lost_events_total{reason=\"skipped\"} 0",
            "netwatch_connect_failures_total{reason=\"listener_closed\"} 0",
            "netwatch_retransmits_total{resent=\"synack\"} 0",
            "netwatch_sockets_ended_total{ending=\"reused\"} 0",
        ] {
            assert!(text.contains(zero), "known labels exist at zero: {zero} in {text}");
        }
    }
}
