//! Handshake and failure statistics the agent keeps from the stream: connect latency
//! (SYN_SENT -> ESTABLISHED), failed connects by reason and retransmitted segments, per remote
//! endpoint and per process; and each listener's accept queue. Pure: records, the table's
//! listener counts and the kernel's queue lengths in, summaries out.
//!
//! Memory is bounded: each key keeps its count, max and last `SAMPLES` latencies (the
//! percentiles are over those), and at most `KEYS` keys per table are kept, the least
//! recently seen going first.
use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use std::net::IpAddr;

use crate::{
    host::snapshot::SocketRow,
    kernel::events::{Comm, TcpState},
    record::{Endpoints, Resent, RetransmitRecord, TransitionRecord},
    state::table::{Direction, Failure, Listener},
};

const SAMPLES: usize = 4096;
const KEYS: usize = 1024;
/// Pids remembered per command.
const PIDS: usize = 16;

#[derive(Debug, Default)]
struct Series {
    count: u64,
    max_ns: u64,
    recent: VecDeque<u64>,
    failures: BTreeMap<String, u64>,
    retransmits: u64,
    last_seen: u64,
    /// The processes of a command, most recent last; at most PIDS.
    pids: VecDeque<u32>,
}

/// One row of `netwatch stats`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// A remote endpoint: `ADDR:PORT` connected to (outbound), or `ADDR -> :PORT`, a peer
    /// address (its ephemeral ports folded together) and the local port it came in on
    /// (inbound). A process: its command name, `-` when not known.
    pub key: String,
    /// For a command: its pids seen, most recent last (at most 16).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pids: Vec<u32>,
    pub connects: u64,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// Failed connects by reason (refused, timeout, aborted, reset, reset_sent).
    pub failed: BTreeMap<String, u64>,
    /// Segments retransmitted on these connections.
    #[serde(default)]
    pub retransmits: u64,
}

/// One listener's line of `netwatch stats`: what netwatch counted since it saw the listener
/// (or since the agent started), and the kernel's queues at the moment of asking.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListenerSummary {
    pub netns: u32,
    pub laddr: IpAddr,
    pub lport: u16,
    pub pid: Option<u32>,
    pub comm: Option<Comm>,
    /// Handshakes completed, and of those taken by accept(2).
    pub handshakes: u64,
    pub accepted: u64,
    /// Connections waiting for accept(2), as counted from events; and the most there were.
    pub queued: u32,
    pub peak_queued: u32,
    /// SYN-ACKs sent again to clients that did not complete the handshake.
    pub synack_retransmits: u64,
    /// From the kernel when asked: the accept queue's length and limit (the listener's
    /// Recv-Q and Send-Q in `ss`), and half-open connections (SYN_RECV) waiting for the
    /// client's ACK. Null when the kernel could not be asked.
    pub accept_queue: Option<u32>,
    pub backlog: Option<u32>,
    pub half_open: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub by_remote: Vec<Summary>,
    pub by_process: Vec<Summary>,
    #[serde(default)]
    pub listeners: Vec<ListenerSummary>,
}

/// Each listener's counts next to the kernel's view of it; `kernel` holds the LISTEN and
/// SYN_RECV rows of a sock_diag dump (None when it failed).
pub fn listener_summaries(
    listeners: Vec<Listener>,
    kernel: Option<&[SocketRow]>,
) -> Vec<ListenerSummary> {
    listeners
        .into_iter()
        .map(|l| {
            let at = |row: &&SocketRow| row.netns == l.netns && row.local.1 == l.local.1;
            let listening = kernel.map(|rows| {
                rows.iter().filter(at).find(|r| r.cookie == l.cookie && r.state == TcpState::Listen)
            });
            // A half-open connection belongs to the listener on its port and address, or to
            // a wildcard one.
            let half_open = kernel.map(|rows| {
                rows.iter()
                    .filter(at)
                    .filter(|r| {
                        r.state == TcpState::SynRecv
                            && (r.local.0 == l.local.0 || l.local.0.is_unspecified())
                    })
                    .count() as u32
            });
            ListenerSummary {
                netns: l.netns,
                laddr: l.local.0,
                lport: l.local.1,
                pid: l.owner.as_ref().map(|o| o.pid),
                comm: l.owner.map(|o| o.comm),
                handshakes: l.queue.handshakes,
                accepted: l.queue.accepted,
                queued: l.queue.queued,
                peak_queued: l.queue.peak_queued,
                synack_retransmits: l.queue.synack_retransmits,
                accept_queue: listening.flatten().map(|r| r.recv_q),
                backlog: listening.flatten().map(|r| r.send_q),
                half_open,
            }
        })
        .collect()
}

#[derive(Debug, Default)]
pub struct Stats {
    by_remote: HashMap<String, Series>,
    by_process: HashMap<String, Series>,
    clock: u64,
}

impl Stats {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record(&mut self, t: &TransitionRecord) {
        let latency = (t.old == TcpState::SynSent && t.new == TcpState::Established)
            .then_some(t.duration_ns)
            .flatten();
        let failure = t.failure.map(Failure::name);
        if latency.is_none() && failure.is_none() {
            return;
        }
        for series in self.series(remote_key(t.direction, t.endpoints()), t.pid, t.comm.as_deref())
        {
            if let Some(ns) = latency {
                series.count += 1;
                series.max_ns = series.max_ns.max(ns);
                if series.recent.len() == SAMPLES {
                    series.recent.pop_front();
                }
                series.recent.push_back(ns);
            }
            if let Some(reason) = failure {
                *series.failures.entry(reason.to_string()).or_default() += 1;
            }
        }
    }

    /// Counts a retransmitted segment against its remote endpoint and process.
    pub fn record_retransmit(&mut self, r: &RetransmitRecord) {
        if r.resent == Resent::Segment {
            let remote = remote_key(r.direction, r.endpoints());
            for series in self.series(remote, r.pid, r.comm.as_deref()) {
                series.retransmits += 1;
            }
        }
    }

    /// The remote endpoint's and the command's series, made if new (evicting the least
    /// recently seen key when a table is full); the command's remembers `pid`.
    fn series(&mut self, remote: String, pid: Option<u32>, comm: Option<&str>) -> [&mut Series; 2] {
        self.clock += 1;
        let process = comm.unwrap_or("-").to_string();
        let clock = self.clock;
        let [remote, process] = [(&mut self.by_remote, remote), (&mut self.by_process, process)]
            .map(|(table, key)| {
                if !table.contains_key(&key)
                    && table.len() >= KEYS
                    && let Some(oldest) =
                        table.iter().min_by_key(|(_, s)| s.last_seen).map(|(k, _)| k.clone())
                {
                    table.remove(&oldest);
                }
                let series = table.entry(key).or_default();
                series.last_seen = clock;
                series
            });
        if let Some(pid) = pid
            && process.pids.back() != Some(&pid)
        {
            process.pids.retain(|p| *p != pid);
            if process.pids.len() == PIDS {
                process.pids.pop_front();
            }
            process.pids.push_back(pid);
        }
        [remote, process]
    }

    pub fn report(&self) -> Report {
        let summarize = |table: &HashMap<String, Series>| {
            let mut rows: Vec<Summary> = table
                .iter()
                .map(|(key, s)| {
                    let mut sorted: Vec<u64> = s.recent.iter().copied().collect();
                    sorted.sort_unstable();
                    let pick = |q: f64| {
                        (!sorted.is_empty()).then(|| {
                            let at =
                                ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
                            sorted[at - 1] as f64 / 1e6
                        })
                    };
                    Summary {
                        key: key.clone(),
                        pids: s.pids.iter().copied().collect(),
                        connects: s.count,
                        p50_ms: pick(0.50),
                        p90_ms: pick(0.90),
                        p99_ms: pick(0.99),
                        max_ms: (s.count > 0).then(|| s.max_ns as f64 / 1e6),
                        failed: s.failures.clone(),
                        retransmits: s.retransmits,
                    }
                })
                .collect();
            rows.sort_by(|a, b| b.connects.cmp(&a.connects).then_with(|| a.key.cmp(&b.key)));
            rows
        };
        Report {
            by_remote: summarize(&self.by_remote),
            by_process: summarize(&self.by_process),
            listeners: Vec::new(),
        }
    }
}

/// What a connection is counted under: the endpoint it connected to, or, for one accepted
/// here, its peer's address and the local port (the peer's ephemeral port would make a key
/// per connection).
/// An IPv4-mapped address (`::ffff:a.b.c.d`, a dual-stack socket's IPv4 peer) counts as the
/// IPv4 address it is, so one endpoint is one key.
fn remote_key(direction: Option<Direction>, ends: Endpoints) -> String {
    let Endpoints { local, remote } = ends;
    let remote = (remote.0.to_canonical(), remote.1);
    match direction {
        Some(Direction::Inbound) => format!("{} -> :{}", remote.0, local.1),
        // A peer's address is never a wildcard, nor its port 0: ss writes it as std does.
        _ => std::net::SocketAddr::from(remote).to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use chrono::DateTime;

    use super::*;
    use crate::kernel::events::{Family, StateSource};

    /// A transition of curl's connection 127.0.0.1:40000 -> 10.0.0.5:5432, for tests.
    pub(crate) fn record(
        old: TcpState,
        new: TcpState,
        ms: Option<u64>,
        failure: Option<Failure>,
        pid: u32,
    ) -> TransitionRecord {
        TransitionRecord {
            time: DateTime::from_timestamp_nanos(0),
            mono_ns: 0,
            old,
            new,
            duration_ns: ms.map(|ms| ms * 1_000_000),
            duration_ms: ms.map(|ms| ms as f64),
            pid: Some(pid),
            comm: Some("curl".into()),
            family: Family::Ipv4,
            laddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            lport: 40000,
            raddr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)),
            rport: 5432,
            cookie: Some(1),
            netns: 1,
            skaddr: "0x0".into(),
            task_pid: 0,
            task_tid: 0,
            task_comm: "swapper/0".into(),
            source: StateSource::TpBtf,
            lifespan_ns: None,
            bytes_sent: None,
            bytes_received: None,
            retransmits: None,
            failure,
            ending: None,
            direction: None,
            v6only: false,
            workload: None,
        }
    }

    #[test]
    fn one_endpoint_is_one_key_whatever_the_socket_family() {
        let ends = |local: &str, remote: &str| Endpoints {
            local: (local.parse().unwrap(), 40000),
            remote: (remote.parse().unwrap(), 8000),
        };
        let mapped = remote_key(None, ends("::ffff:127.0.0.1", "::ffff:127.0.0.1"));
        assert_eq!(mapped, remote_key(None, ends("127.0.0.1", "127.0.0.1")));
        assert_eq!(mapped, "127.0.0.1:8000");
        assert_eq!(remote_key(None, ends("::1", "::1")), "[::1]:8000");
        let inbound =
            remote_key(Some(Direction::Inbound), ends("::ffff:10.0.0.1", "::ffff:10.0.0.2"));
        assert_eq!(inbound, "10.0.0.2 -> :40000");
    }

    #[test]
    fn latency_percentiles_and_failures_per_endpoint_and_process() {
        use TcpState::*;
        let mut stats = Stats::new();
        for ms in 1..=100 {
            stats.record(&record(SynSent, Established, Some(ms), None, 7));
        }
        stats.record(&record(SynSent, Close, Some(3), Some(Failure::Refused), 7));
        stats.record(&record(SynSent, Close, Some(3000), Some(Failure::Timeout), 8));
        stats.record(&record(Established, FinWait1, Some(5), None, 7)); // not a handshake
        let report = stats.report();
        let remote = &report.by_remote[0];
        assert_eq!((remote.key.as_str(), remote.connects), ("10.0.0.5:5432", 100));
        assert_eq!(
            (remote.p50_ms, remote.p90_ms, remote.p99_ms, remote.max_ms),
            (Some(50.0), Some(90.0), Some(99.0), Some(100.0))
        );
        assert_eq!(remote.failed, BTreeMap::from([("refused".into(), 1), ("timeout".into(), 1)]));
        // One row per command, whatever its pids.
        let processes: Vec<(&str, u64, &[u32])> = report
            .by_process
            .iter()
            .map(|s| (s.key.as_str(), s.connects, s.pids.as_slice()))
            .collect();
        assert_eq!(processes, [("curl", 100, &[7, 8][..])]);
        let text = crate::output::stats::text(&report);
        assert!(text.contains("10.0.0.5:5432") && text.contains("refused=1 timeout=1"), "{text}");
        assert!(text.contains("curl[8,7]"), "{text}");
    }

    #[test]
    fn inbound_connections_count_by_peer_address_and_local_port() {
        let mut stats = Stats::new();
        for rport in [50_001, 50_002, 50_003] {
            let mut reset = record(TcpState::Established, TcpState::Close, None, None, 9);
            (reset.rport, reset.failure) = (rport, Some(Failure::Reset));
            reset.direction = Some(Direction::Inbound);
            stats.record(&reset);
        }
        let report = stats.report();
        let keys: Vec<&str> = report.by_remote.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["10.0.0.5 -> :40000"], "ephemeral ports folded together");
        assert_eq!(report.by_remote[0].failed.get("reset"), Some(&3));
    }

    #[test]
    fn keys_are_bounded() {
        let mut stats = Stats::new();
        for pid in 0..(KEYS as u32 + 10) {
            let mut connect = record(TcpState::SynSent, TcpState::Established, Some(1), None, pid);
            connect.comm = Some(compact_str::format_compact!("cmd{pid}"));
            stats.record(&connect);
        }
        assert_eq!(stats.by_process.len(), KEYS);
        assert!(!stats.by_process.contains_key("cmd0"), "the least recently seen went first");
        assert_eq!(stats.by_process["cmd1033"].pids, [1033]);
    }
}
