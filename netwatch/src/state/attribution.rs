//! Which processes and endpoints the kernel's protocol counters moved for: each stream record
//! is matched to the counters its event increments (a CLOSE -> SYN_SENT is one `Tcp
//! ActiveOpens`, a SYN retransmitted is one `TcpExt TCPSynRetrans`), and the agent keeps,
//! for the last [`BUCKETS`] seconds, how many each process and endpoint accounted for in
//! each second.
//!
//! Memory is bounded: at most [`KEYS_PER_BUCKET`] processes x endpoints per second, the rest
//! counted together as "others".
use std::{collections::HashMap, collections::VecDeque, net::SocketAddr};

use serde::{Deserialize, Serialize};

use crate::{
    kernel::events::{Comm, TcpState},
    record::{Resent, StreamRecord, TransitionRecord},
    state::table::{Direction, Failure},
};

/// How a counter's increase is matched to sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Evidence {
    /// Each event is one increment of the counter, made for that socket (the kernel may
    /// count increments of which no event is seen).
    Exact,
    /// The sockets that did what increments the counter, some of which the kernel may not
    /// have counted (or counted more than once): the event cannot tell.
    Candidates,
}

/// A counter that events account for, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub group: &'static str,
    pub name: &'static str,
    pub evidence: Evidence,
    /// What the events counted are.
    pub events: &'static str,
}

const fn rule(group: &'static str, name: &'static str, exact: bool, events: &'static str) -> Rule {
    let evidence = if exact { Evidence::Exact } else { Evidence::Candidates };
    Rule { group, name, evidence, events }
}

/// Every counter netwatch can attribute from its events; the index is a counter's id. Where
/// the kernel increments each is in docs/ARCHITECTURE.md (section 1, "Protocol counters").
pub const RULES: [Rule; 11] = [
    rule("Tcp", "ActiveOpens", true, "connects (CLOSE -> SYN_SENT)"),
    rule("Tcp", "PassiveOpens", true, "handshakes completed on a listener (LISTEN -> SYN_RECV)"),
    rule("Tcp", "AttemptFails", true, "connects that failed (SYN_SENT or SYN_RECV -> CLOSE)"),
    rule(
        "Tcp",
        "EstabResets",
        true,
        "ESTABLISHED or CLOSE_WAIT -> CLOSE: reset, timed out, aborted",
    ),
    rule(
        "Tcp",
        "OutRsts",
        false,
        "resets sent by owners, by closed listeners, and refusals of connects to this host",
    ),
    rule(
        "Tcp",
        "RetransSegs",
        true,
        "retransmissions (an offloaded one may count several segments)",
    ),
    rule("TcpExt", "TCPSynRetrans", true, "SYNs and SYN-ACKs sent again"),
    rule("TcpExt", "TCPTimeouts", false, "retransmissions (by a timeout, or fast)"),
    rule(
        "TcpExt",
        "TCPAbortOnTimeout",
        false,
        "connections that timed out (an ICMP error ends a connect the same way)",
    ),
    rule("TcpExt", "TCPAbortOnClose", false, "resets sent by an owner's close"),
    rule("TcpExt", "TCPAbortOnData", false, "resets sent by an owner's close"),
];

/// The id of a counter of [`RULES`]; a name not there fails the build where a constant is
/// made of it.
const fn id(group: &str, name: &str) -> u8 {
    const fn same(a: &str, b: &str) -> bool {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let mut i = 0;
        while i < a.len() {
            if a[i] != b[i] {
                return false;
            }
            i += 1;
        }
        true
    }
    let mut i = 0;
    while i < RULES.len() {
        if same(RULES[i].group, group) && same(RULES[i].name, name) {
            return i as u8;
        }
        i += 1;
    }
    panic!("no such counter in RULES")
}

const ACTIVE_OPENS: u8 = id("Tcp", "ActiveOpens");
const PASSIVE_OPENS: u8 = id("Tcp", "PassiveOpens");
const ATTEMPT_FAILS: u8 = id("Tcp", "AttemptFails");
const ESTAB_RESETS: u8 = id("Tcp", "EstabResets");
const OUT_RSTS: u8 = id("Tcp", "OutRsts");
const RETRANS_SEGS: u8 = id("Tcp", "RetransSegs");
const SYN_RETRANS: u8 = id("TcpExt", "TCPSynRetrans");
const TIMEOUTS: u8 = id("TcpExt", "TCPTimeouts");
const ABORT_ON_TIMEOUT: u8 = id("TcpExt", "TCPAbortOnTimeout");
const ABORT_ON_CLOSE: u8 = id("TcpExt", "TCPAbortOnClose");
const ABORT_ON_DATA: u8 = id("TcpExt", "TCPAbortOnData");

/// The counters one event increments, by id into [`RULES`]: at most four, kept inline (this
/// runs for every record the agent handles).
#[derive(Clone, Copy, Debug, Default)]
pub struct CounterIds {
    ids: [u8; 4],
    len: usize,
}

impl CounterIds {
    fn push(&mut self, id: u8) {
        if let Some(slot) = self.ids.get_mut(self.len) {
            *slot = id;
            self.len += 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = u8> + '_ {
        self.ids[..self.len].iter().copied()
    }
}

/// The counters `record`'s event increments.
pub fn counters_of(record: &StreamRecord) -> CounterIds {
    let mut ids = CounterIds::default();
    match record {
        StreamRecord::Transition(t) => transition_counters(t, &mut ids),
        StreamRecord::Retransmit(r) => {
            ids.push(RETRANS_SEGS);
            // tcp_retransmit_skb counts a SYN's, tcp_rtx_synack a SYN-ACK's; the SYN-ACK
            // timer (tcp_syn_ack_timeout) counts a timeout for each.
            if r.resent == Resent::Synack || r.state == Some(TcpState::SynSent) {
                ids.push(SYN_RETRANS);
            }
            ids.push(TIMEOUTS);
        }
        StreamRecord::Lost(_) | StreamRecord::LogFailed(_) | StreamRecord::ExportDropped(_) => {}
    }
    ids
}

fn transition_counters(t: &TransitionRecord, ids: &mut CounterIds) {
    use TcpState::*;
    match (t.old, t.new) {
        (Close, SynSent) => ids.push(ACTIVE_OPENS),
        // tcp_create_openreq_child, as the handshake's last ACK makes the connection.
        (Listen, SynRecv) => ids.push(PASSIVE_OPENS),
        (Established | CloseWait, Close) => ids.push(ESTAB_RESETS),
        // tcp_done; an owner's close while connecting goes through tcp_set_state alone.
        (SynSent | SynRecv, Close) if t.failure != Some(Failure::Aborted) => {
            ids.push(ATTEMPT_FAILS);
        }
        _ => {}
    }
    match t.failure {
        // The RST that refused it came from this host's kernel.
        Some(Failure::Refused) if t.raddr.is_loopback() => ids.push(OUT_RSTS),
        // tcp_write_err, from tcp_write_timeout, connects included.
        Some(Failure::Timeout) => ids.push(ABORT_ON_TIMEOUT),
        // __tcp_close: unread data (OnClose), or SO_LINGER 0 (OnData).
        Some(Failure::ResetSent) => {
            ids.push(OUT_RSTS);
            ids.push(ABORT_ON_CLOSE);
            ids.push(ABORT_ON_DATA);
        }
        Some(Failure::ListenerClosed) => ids.push(OUT_RSTS),
        _ => {}
    }
}

/// Who an increase is put down to: the socket's owner, and the endpoint that tells its
/// connections apart: the local one of a server (a listener and what it accepted), the
/// remote one of a client.
#[derive(Clone, Debug, Hash, PartialEq, Eq, Serialize, Deserialize)]
pub struct Culprit {
    pub netns: u32,
    pub pid: Option<u32>,
    pub comm: Option<Comm>,
    pub endpoint: SocketAddr,
    /// Whether `endpoint` is the local end (a server's).
    pub local: bool,
}

impl Culprit {
    pub fn of(record: &StreamRecord) -> Option<Culprit> {
        let (netns, pid, comm, local, remote, inbound) = match record {
            StreamRecord::Transition(t) => {
                let inbound = t.direction == Some(Direction::Inbound)
                    || matches!(t.old, TcpState::Listen | TcpState::SynRecv);
                (t.netns, t.pid, t.comm.clone(), (t.laddr, t.lport), (t.raddr, t.rport), inbound)
            }
            StreamRecord::Retransmit(r) => {
                let inbound = r.direction == Some(Direction::Inbound) || r.resent == Resent::Synack;
                (r.netns, r.pid, r.comm.clone(), (r.laddr, r.lport), (r.raddr, r.rport), inbound)
            }
            StreamRecord::Lost(_) | StreamRecord::LogFailed(_) | StreamRecord::ExportDropped(_) => {
                return None;
            }
        };
        let endpoint = SocketAddr::from(if inbound { local } else { remote });
        Some(Culprit { netns, pid, comm, endpoint, local: inbound })
    }
}

/// Seconds kept: a quarter of an hour, one bucket a second.
pub const BUCKETS: usize = 900;
/// Distinct counter x culprit pairs one second keeps apart; more are counted as "others".
pub const KEYS_PER_BUCKET: usize = 128;

#[derive(Default)]
struct Bucket {
    /// CLOCK_MONOTONIC seconds.
    second: u64,
    counts: HashMap<(u8, Culprit), u64>,
    /// Increments beyond KEYS_PER_BUCKET distinct culprits, per counter.
    others: [u64; RULES.len()],
}

/// The agent's record of increments by culprit, second by second.
#[derive(Default)]
pub struct Attribution {
    buckets: VecDeque<Bucket>,
}

/// One counter's increments over an interval, by culprit, most first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attributed {
    pub group: String,
    pub name: String,
    pub evidence: Evidence,
    pub events: String,
    pub total: u64,
    pub culprits: Vec<CulpritCount>,
    /// Increments of culprits beyond the listed ones.
    pub others: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CulpritCount {
    #[serde(flatten)]
    pub culprit: Culprit,
    pub count: u64,
}

/// The agent's answer to `counters`: its start, and who moved the counters since the time
/// asked about.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Account {
    pub started: Option<chrono::DateTime<chrono::Utc>>,
    /// The agent's network namespace, and its counters when the agent started.
    pub netns: u32,
    pub baseline: Option<std::collections::BTreeMap<String, i64>>,
    pub attributed: Vec<Attributed>,
    /// Events are counted in whole seconds: from the start of the second the question's time
    /// falls in.
    pub counted_from: Option<chrono::DateTime<chrono::Utc>>,
    /// False when the question reaches back before the agent started, or before what it
    /// keeps.
    pub complete: bool,
}

/// Culprits listed per counter.
const LISTED: usize = 5;

impl Attribution {
    pub fn observe(&mut self, record: &StreamRecord) {
        let ids = counters_of(record);
        if ids.is_empty() {
            return;
        }
        let Some(culprit) = Culprit::of(record) else { return };
        let mono_ns = match record {
            StreamRecord::Transition(t) => t.mono_ns,
            StreamRecord::Retransmit(r) => r.mono_ns,
            StreamRecord::Lost(_) | StreamRecord::LogFailed(_) | StreamRecord::ExportDropped(_) => {
                return;
            }
        };
        let second = mono_ns / 1_000_000_000;
        if self.buckets.back().is_none_or(|b| b.second < second) {
            if self.buckets.len() == BUCKETS {
                self.buckets.pop_front();
            }
            self.buckets.push_back(Bucket { second, ..Bucket::default() });
        }
        // Records arrive in time order but for the odd late one: it joins the newest bucket.
        let Some(bucket) = self.buckets.back_mut() else { return };
        for id in ids.iter() {
            let key = (id, culprit.clone());
            if let Some(count) = bucket.counts.get_mut(&key) {
                *count += 1;
            } else if bucket.counts.len() < KEYS_PER_BUCKET {
                bucket.counts.insert(key, 1);
            } else {
                bucket.others[usize::from(id)] += 1;
            }
        }
    }

    /// The increments from the second `since_ns` (CLOCK_MONOTONIC) falls in, in `netns` if
    /// given, counters with none left out; and whether the record reaches back that far.
    pub fn since(&self, since_ns: u64, netns: Option<u32>) -> (Vec<Attributed>, bool) {
        let first = since_ns / 1_000_000_000;
        let complete =
            self.buckets.len() < BUCKETS || self.buckets.front().is_some_and(|b| b.second <= first);
        let mut by_counter: Vec<HashMap<&Culprit, u64>> = vec![HashMap::new(); RULES.len()];
        let mut others = [0u64; RULES.len()];
        for bucket in self.buckets.iter().filter(|b| b.second >= first) {
            for ((id, culprit), count) in &bucket.counts {
                if netns.is_some_and(|n| n != culprit.netns) {
                    continue;
                }
                *by_counter[usize::from(*id)].entry(culprit).or_default() += count;
            }
            for (sum, count) in others.iter_mut().zip(bucket.others) {
                *sum += count;
            }
        }
        let attributed = RULES
            .iter()
            .zip(by_counter)
            .zip(others)
            .filter_map(|((rule, culprits), beyond)| {
                let total = culprits.values().sum::<u64>() + beyond;
                if total == 0 {
                    return None;
                }
                let mut culprits: Vec<CulpritCount> = culprits
                    .into_iter()
                    .map(|(culprit, count)| CulpritCount { culprit: culprit.clone(), count })
                    .collect();
                culprits.sort_by(|a, b| {
                    b.count.cmp(&a.count).then_with(|| a.culprit.endpoint.cmp(&b.culprit.endpoint))
                });
                let listed: u64 = culprits.iter().take(LISTED).map(|c| c.count).sum();
                culprits.truncate(LISTED);
                Some(Attributed {
                    group: rule.group.into(),
                    name: rule.name.into(),
                    evidence: rule.evidence,
                    events: rule.events.into(),
                    total,
                    culprits,
                    others: total - listed,
                })
            })
            .collect();
        (attributed, complete)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn transition(
        old: TcpState,
        new: TcpState,
        failure: Option<Failure>,
        rport: u16,
    ) -> StreamRecord {
        let mut record = crate::state::stats::tests::record(old, new, None, failure, 42);
        (record.mono_ns, record.netns, record.rport) = (5_000_000_000, 7, rport);
        record.raddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
        record.direction = Some(Direction::Outbound);
        StreamRecord::Transition(Box::new(record))
    }

    fn names(record: &StreamRecord) -> Vec<&'static str> {
        counters_of(record).iter().map(|id| RULES[usize::from(id)].name).collect()
    }

    #[test]
    fn events_name_the_counters_the_kernel_increments_for_them() {
        use TcpState::*;
        assert_eq!(names(&transition(Close, SynSent, None, 80)), ["ActiveOpens"]);
        assert_eq!(
            names(&transition(SynSent, Close, Some(Failure::Refused), 80)),
            ["AttemptFails", "OutRsts"]
        );
        assert_eq!(
            names(&transition(Established, Close, Some(Failure::Timeout), 80)),
            ["EstabResets", "TCPAbortOnTimeout"]
        );
        assert!(names(&transition(Established, FinWait1, None, 80)).is_empty());
    }

    #[test]
    fn increments_are_summed_by_culprit_most_first() {
        use TcpState::*;
        let mut attribution = Attribution::default();
        for port in [80, 80, 80, 443] {
            attribution.observe(&transition(Close, SynSent, None, port));
        }
        let (attributed, complete) = attribution.since(0, None);
        assert!(complete);
        assert!(attribution.since(0, Some(8)).0.is_empty(), "another namespace's");
        let opens = &attributed[0];
        assert_eq!((opens.name.as_str(), opens.total, opens.others), ("ActiveOpens", 4, 0));
        assert_eq!(opens.culprits[0].count, 3);
        assert_eq!(opens.culprits[0].culprit.endpoint.port(), 80);
        assert_eq!(opens.culprits[0].culprit.comm.as_deref(), Some("curl"));
        assert!(attribution.since(20_000_000_000, None).0.is_empty(), "nothing after 20 s");
    }

    #[test]
    fn a_bucket_keeps_a_bounded_number_of_culprits() {
        let mut attribution = Attribution::default();
        for port in 0..(KEYS_PER_BUCKET as u16 + 10) {
            attribution.observe(&transition(TcpState::Close, TcpState::SynSent, None, port));
        }
        let (attributed, _) = attribution.since(0, None);
        assert_eq!(attributed[0].total, KEYS_PER_BUCKET as u64 + 10);
        assert_eq!(attributed[0].culprits.len(), LISTED);
        assert_eq!(attributed[0].others, KEYS_PER_BUCKET as u64 + 10 - LISTED as u64);
    }
}
