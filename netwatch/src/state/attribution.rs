//! Which processes and endpoints the kernel's protocol counters moved for: each stream record
//! is matched to the counters its event increments (a CLOSE -> SYN_SENT is one `Tcp
//! ActiveOpens`, a SYN retransmitted is one `TcpExt TCPSynRetrans`), and the agent keeps,
//! for the last hour, how many each process and endpoint accounted for in every ten seconds.
//!
//! Memory is bounded: at most [`KEYS_PER_BUCKET`] processes x endpoints per bucket, the rest
//! counted together as "others", and [`BUCKETS`] buckets.
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
    /// Each event is one increment of the counter, made for that socket.
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

/// Every counter netwatch can attribute from its events; the index is a counter's id.
pub const RULES: [Rule; 11] = [
    rule("Tcp", "ActiveOpens", true, "connects (CLOSE -> SYN_SENT)"),
    rule(
        "Tcp",
        "PassiveOpens",
        true,
        "handshakes completed on a listener (SYN_RECV -> ESTABLISHED)",
    ),
    rule("Tcp", "AttemptFails", true, "connects refused or timed out"),
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
    rule(
        "TcpExt",
        "TCPTimeouts",
        false,
        "connections that retransmitted (a timeout or a fast retransmit)",
    ),
    rule(
        "TcpExt",
        "TCPAbortOnTimeout",
        true,
        "connections killed after their retransmissions timed out",
    ),
    rule(
        "TcpExt",
        "TCPAbortOnClose",
        false,
        "connections reset by their owner's close (unread data, or SO_LINGER 0)",
    ),
    rule(
        "TcpExt",
        "TCPAbortOnLinger",
        false,
        "connections reset by their owner's close (unread data, or SO_LINGER 0)",
    ),
];

fn id(group: &str, name: &str) -> u8 {
    RULES.iter().position(|r| r.group == group && r.name == name).unwrap_or(0) as u8
}

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

    fn extend(&mut self, ids: impl IntoIterator<Item = u8>) {
        ids.into_iter().for_each(|id| self.push(id));
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
            ids.push(id("Tcp", "RetransSegs"));
            if r.resent == Resent::Synack || r.state == Some(TcpState::SynSent) {
                ids.push(id("TcpExt", "TCPSynRetrans"));
            }
            if r.resent == Resent::Segment {
                ids.push(id("TcpExt", "TCPTimeouts"));
            }
        }
        StreamRecord::Lost(_) | StreamRecord::LogFailed(_) => {}
    }
    ids
}

fn transition_counters(t: &TransitionRecord, ids: &mut CounterIds) {
    use TcpState::*;
    match (t.old, t.new) {
        (Close, SynSent) => ids.push(id("Tcp", "ActiveOpens")),
        (SynRecv, Established) => ids.push(id("Tcp", "PassiveOpens")),
        (Established | CloseWait, Close) => ids.push(id("Tcp", "EstabResets")),
        _ => {}
    }
    let connecting = matches!(t.old, SynSent | SynRecv);
    match t.failure {
        Some(Failure::Refused | Failure::Timeout) if connecting => {
            ids.push(id("Tcp", "AttemptFails"));
        }
        _ => {}
    }
    match t.failure {
        Some(Failure::Refused) if t.raddr.is_loopback() => ids.push(id("Tcp", "OutRsts")),
        Some(Failure::Timeout) if !connecting => ids.push(id("TcpExt", "TCPAbortOnTimeout")),
        Some(Failure::ResetSent) => ids.extend([
            id("Tcp", "OutRsts"),
            id("TcpExt", "TCPAbortOnClose"),
            id("TcpExt", "TCPAbortOnLinger"),
        ]),
        Some(Failure::ListenerClosed) => ids.push(id("Tcp", "OutRsts")),
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
            StreamRecord::Lost(_) | StreamRecord::LogFailed(_) => return None,
        };
        let endpoint = SocketAddr::from(if inbound { local } else { remote });
        Some(Culprit { netns, pid, comm, endpoint, local: inbound })
    }
}

/// Seconds of events one bucket sums.
const BUCKET_SECONDS: u64 = 10;
/// Buckets kept: one hour.
const BUCKETS: usize = 360;
/// Distinct counter x culprit pairs one bucket keeps apart; more are counted as "others".
pub const KEYS_PER_BUCKET: usize = 256;

#[derive(Default)]
struct Bucket {
    /// CLOCK_MONOTONIC seconds / BUCKET_SECONDS.
    slot: u64,
    counts: HashMap<(u8, Culprit), u64>,
    /// Increments beyond KEYS_PER_BUCKET distinct culprits, per counter.
    others: [u64; RULES.len()],
}

/// The agent's record of increments by culprit, for the last hour.
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

/// The agent's answer to `counters`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub started: Option<chrono::DateTime<chrono::Utc>>,
    /// The agent's network namespace, and its counters when the agent started.
    pub netns: u32,
    pub baseline: Option<std::collections::BTreeMap<String, i64>>,
    pub attributed: Vec<Attributed>,
    /// False when the question reaches back before what the agent keeps.
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
            StreamRecord::Lost(_) | StreamRecord::LogFailed(_) => return,
        };
        let slot = mono_ns / 1_000_000_000 / BUCKET_SECONDS;
        if self.buckets.back().is_none_or(|b| b.slot < slot) {
            if self.buckets.len() == BUCKETS {
                self.buckets.pop_front();
            }
            self.buckets.push_back(Bucket { slot, ..Bucket::default() });
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

    /// The increments since `since_ns` (CLOCK_MONOTONIC), in `netns` if given, counters with
    /// none left out; and whether the record reaches back that far (it keeps an hour).
    pub fn since(&self, since_ns: u64, netns: Option<u32>) -> (Vec<Attributed>, bool) {
        let first = since_ns / 1_000_000_000 / BUCKET_SECONDS;
        let complete =
            self.buckets.len() < BUCKETS || self.buckets.front().is_some_and(|b| b.slot <= first);
        let mut by_counter: Vec<HashMap<&Culprit, u64>> = vec![HashMap::new(); RULES.len()];
        let mut others = [0u64; RULES.len()];
        for bucket in self.buckets.iter().filter(|b| b.slot >= first) {
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
