//! Per-connection state-machine histories the agent keeps: every transition of every socket
//! from the moment netwatch saw it, and closed connections for a bounded retention (count and
//! age). Pure: transition records and snapshot rows in, histories out.
use std::collections::VecDeque;

use chrono::{DateTime, Utc};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::{
    host::snapshot::{Protocol, Snapshot},
    kernel::events::{Comm, TcpState},
    record::{Owner, Resent, RetransmitRecord, TransitionRecord},
    state::table::{Ending, Failure},
};

/// Transitions kept per connection (a connection has about a dozen in its life).
const STEPS: usize = 64;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FirstSeen {
    /// Already there when the agent took its snapshot, in this state.
    Snapshot,
    /// Its first transition was seen.
    Event,
    /// Its first transition seen was not its beginning (it began before the log read, or
    /// netwatch, saw it): its first steps are missing.
    Midway,
}

/// One transition in a connection's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub time: DateTime<Utc>,
    pub old: TcpState,
    pub new: TcpState,
    /// Time spent in `old`, when netwatch saw it begin.
    pub duration_ns: Option<u64>,
    /// The socket's owner at this transition.
    pub pid: Option<u32>,
    pub comm: Option<Comm>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct History {
    pub cookie: u64,
    pub netns: u32,
    pub laddr: std::net::IpAddr,
    pub lport: u16,
    pub raddr: std::net::IpAddr,
    pub rport: u16,
    pub first_seen: FirstSeen,
    /// The state it was in when the snapshot found it.
    pub snapshot_state: Option<TcpState>,
    /// The process holding it when the snapshot found it (the first, by pid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_owner: Option<Owner>,
    pub steps: Vec<Step>,
    pub closed: bool,
    pub failure: Option<Failure>,
    pub lifespan_ns: Option<u64>,
    pub bytes_sent: Option<u64>,
    pub bytes_received: Option<u64>,
    /// At close: segments retransmitted in the connection's life (the kernel's count).
    pub retransmits: Option<u32>,
    /// Retransmissions netwatch saw as they happened (`tcp_retransmit_skb`), open or closed.
    #[serde(default)]
    pub retransmits_seen: u64,
    /// What ended a connection whose end no tracepoint reports (a timewait socket's expiry
    /// or reuse, its namespace's deletion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ending: Option<Ending>,
    /// Events were lost while the connection was open: some of its steps may be missing.
    /// If a new snapshot no longer had it, it is closed here without its last steps.
    #[serde(default)]
    pub lost_events: bool,
    /// The owner's container, pod or unit: the last transition's, or the snapshot owner's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<std::sync::Arc<crate::host::workload::Workload>>,
}

impl History {
    fn new(
        cookie: u64,
        netns: u32,
        (laddr, lport): (std::net::IpAddr, u16),
        (raddr, rport): (std::net::IpAddr, u16),
        first_seen: FirstSeen,
    ) -> History {
        History {
            cookie,
            netns,
            laddr,
            lport,
            raddr,
            rport,
            first_seen,
            snapshot_state: None,
            snapshot_owner: None,
            steps: Vec::new(),
            closed: false,
            failure: None,
            lifespan_ns: None,
            bytes_sent: None,
            bytes_received: None,
            retransmits: None,
            retransmits_seen: 0,
            ending: None,
            lost_events: false,
            workload: None,
        }
    }
}

/// Whether a socket's transition is its first: it begins closed (connect, listen), or as a
/// listener's child.
pub fn is_birth(old: TcpState, new: TcpState) -> bool {
    old == TcpState::Close
        || old == TcpState::SynRecv
        || (old == TcpState::Listen && new == TcpState::SynRecv)
}

#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// Closed connections kept at most.
    pub count: usize,
    /// Closed connections older than this (since they closed) are dropped.
    pub max_age: chrono::Duration,
}

impl Default for Retention {
    /// The agent's defaults: 10 000 closed connections (each a few hundred bytes to ~2 KB
    /// with its steps, so a few to 20 MB) for at most an hour.
    fn default() -> Self {
        Retention { count: 10_000, max_age: chrono::Duration::hours(1) }
    }
}

/// What the snapshot found of a socket that has had no transition since: kept apart from the
/// open histories, at half a history's size, since most of a long-running host's sockets are
/// such (the agent keeps one per socket).
#[derive(Debug)]
struct Seed {
    netns: u32,
    local: (std::net::IpAddr, u16),
    remote: (std::net::IpAddr, u16),
    state: TcpState,
    owner: Option<Owner>,
    lost_events: bool,
}

impl Seed {
    fn history(&self, cookie: u64) -> History {
        let mut history =
            History::new(cookie, self.netns, self.local, self.remote, FirstSeen::Snapshot);
        history.snapshot_state = Some(self.state);
        history.snapshot_owner = self.owner.clone();
        history.lost_events = self.lost_events;
        history
    }
}

#[derive(Debug, Default)]
pub struct Histories {
    /// By cookie (Fx hashing: cookies are the kernel's counter, chosen by no one outside).
    open: FxHashMap<u64, History>,
    /// Open connections from the snapshot with no step yet, by cookie.
    seeded: FxHashMap<u64, Seed>,
    closed: VecDeque<(DateTime<Utc>, History)>,
    retention: Option<Retention>,
}

impl Histories {
    pub fn new(retention: Retention) -> Self {
        Histories { retention: Some(retention), ..Default::default() }
    }

    /// Sockets the agent's snapshot found (TCP only: UDP has no state machine), each with
    /// the owner the table gives it: the first process holding it.
    pub fn seed(&mut self, snapshot: &Snapshot) {
        let tcp = snapshot.rows.iter().filter(|r| r.protocol == Protocol::Tcp && r.cookie != 0);
        for row in tcp.filter(|row| !self.open.contains_key(&row.cookie)) {
            self.seeded.entry(row.cookie).or_insert_with(|| Seed {
                netns: row.netns,
                local: row.local,
                remote: row.remote,
                state: row.state,
                owner: snapshot
                    .owners
                    .get(&row.inode)
                    .filter(|_| row.inode != 0)
                    .and_then(|holders| holders.first())
                    .map(|h| Owner { pid: h.pid, comm: h.comm.clone(), cgroup_id: h.cgroup_id }),
                lost_events: false,
            });
        }
    }

    /// After lost events, the table was rebuilt from a new snapshot (`rows`, taken at `now`):
    /// open connections it no longer has ended unseen, and are closed as such; those it has
    /// that no history knows are added.
    pub fn reconcile(&mut self, snapshot: &Snapshot, now: DateTime<Utc>) {
        let present: std::collections::HashSet<u64> = snapshot
            .rows
            .iter()
            .filter(|r| r.protocol == Protocol::Tcp)
            .map(|r| r.cookie)
            .collect();
        let gone: Vec<u64> = (self.open.keys().chain(self.seeded.keys()))
            .filter(|cookie| !present.contains(cookie))
            .copied()
            .collect();
        for cookie in gone {
            if let Some(mut history) = self.take_open(cookie) {
                history.closed = true;
                history.lost_events = true;
                self.closed.push_back((now, history));
            }
        }
        self.seed(snapshot);
        self.expire(now);
    }

    /// Events were lost: every connection open now may be missing some of its steps.
    pub fn mark_lost(&mut self) {
        for history in self.open.values_mut() {
            history.lost_events = true;
        }
        for seed in self.seeded.values_mut() {
            seed.lost_events = true;
        }
    }

    pub fn record(&mut self, t: &TransitionRecord) {
        let Some(cookie) = t.cookie else { return };
        let first_seen = if is_birth(t.old, t.new) { FirstSeen::Event } else { FirstSeen::Midway };
        let history = self.open_entry(cookie, || {
            History::new(cookie, t.netns, (t.laddr, t.lport), (t.raddr, t.rport), first_seen)
        });
        if t.lport != 0 {
            history.lport = t.lport;
            history.laddr = t.laddr;
        }
        (history.raddr, history.rport) = (t.raddr, t.rport);
        if t.workload.is_some() {
            history.workload.clone_from(&t.workload);
        }
        if history.steps.len() < STEPS {
            history.steps.push(Step {
                time: t.time,
                old: t.old,
                new: t.new,
                duration_ns: t.duration_ns,
                pid: t.pid,
                comm: t.comm.clone(),
            });
        }
        if t.new == TcpState::Close {
            history.closed = true;
            history.failure = t.failure;
            history.lifespan_ns = t.lifespan_ns;
            history.bytes_sent = t.bytes_sent;
            history.bytes_received = t.bytes_received;
            history.retransmits = t.retransmits;
            history.ending = t.ending;
            if let Some(history) = self.open.remove(&cookie) {
                self.closed.push_back((t.time, history));
            }
            self.expire(t.time);
        }
    }

    /// Counts a retransmitted segment in its connection's history.
    pub fn record_retransmit(&mut self, r: &RetransmitRecord) {
        if r.resent == Resent::Segment {
            self.promote(r.cookie);
            if let Some(history) = self.open.get_mut(&r.cookie) {
                history.retransmits_seen += 1;
            }
        }
    }

    /// Makes `cookie`'s seed, if it has one, an open history.
    fn promote(&mut self, cookie: u64) {
        if let Some(seed) = self.seeded.remove(&cookie) {
            self.open.insert(cookie, seed.history(cookie));
        }
    }

    /// The open history of `cookie`: its own, the one its seed becomes, or `new`'s.
    fn open_entry(&mut self, cookie: u64, new: impl FnOnce() -> History) -> &mut History {
        self.promote(cookie);
        self.open.entry(cookie).or_insert_with(new)
    }

    /// Takes the open history of `cookie` out (a seed's made into one).
    fn take_open(&mut self, cookie: u64) -> Option<History> {
        self.promote(cookie);
        self.open.remove(&cookie)
    }

    /// Takes what a stream record tells of histories: a step, a retransmit, or a loss.
    pub fn observe(&mut self, record: &crate::record::StreamRecord) {
        use crate::record::StreamRecord;
        match record {
            StreamRecord::Transition(t) => self.record(t),
            StreamRecord::Retransmit(r) => self.record_retransmit(r),
            StreamRecord::Lost(_) => self.mark_lost(),
            StreamRecord::LogFailed(_) | StreamRecord::ExportDropped(_) => {}
        }
    }

    /// Drops closed connections beyond the retention.
    pub fn expire(&mut self, now: DateTime<Utc>) {
        let Some(retention) = self.retention else { return };
        while self.closed.len() > retention.count {
            self.closed.pop_front();
        }
        while self.closed.front().is_some_and(|(closed, _)| now - *closed > retention.max_age) {
            self.closed.pop_front();
        }
    }

    /// The connection with `cookie`, open or retained closed (`netwatch history --cookie`).
    pub fn of(&self, cookie: u64) -> Vec<History> {
        let open = self.open.get(&cookie).cloned();
        let seeded = self.seeded.get(&cookie).map(|seed| seed.history(cookie));
        let closed = self.closed.iter().filter(|(_, h)| h.cookie == cookie).map(|(_, h)| h.clone());
        open.into_iter().chain(seeded).chain(closed).collect()
    }

    /// Open connections, then closed ones, each oldest first.
    pub fn all(&self) -> Vec<History> {
        let seeded = self.seeded.iter().map(|(cookie, seed)| seed.history(*cookie));
        let mut open: Vec<History> = self.open.values().cloned().chain(seeded).collect();
        open.sort_by_key(|h| (h.steps.first().map(|s| s.time), h.cookie));
        open.into_iter().chain(self.closed.iter().map(|(_, h)| h.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use std::collections::HashMap;

    use crate::{
        host::snapshot::{Holder, SocketRow},
        kernel::events::{Family, StateSource},
        output::history::path,
    };

    fn record(
        cookie: u64,
        ms: i64,
        old: TcpState,
        new: TcpState,
        duration_ms: Option<u64>,
    ) -> TransitionRecord {
        TransitionRecord {
            time: DateTime::from_timestamp_nanos(ms * 1_000_000),
            mono_ns: 0,
            old,
            new,
            duration_ns: duration_ms.map(|d| d * 1_000_000),
            duration_ms: None,
            pid: Some(7),
            comm: Some("curl".into()),
            family: Family::Ipv4,
            laddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            lport: 40000,
            raddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            rport: 80,
            cookie: Some(cookie),
            netns: 1,
            skaddr: "0x0".into(),
            task_pid: 7,
            task_tid: 7,
            task_comm: "curl".into(),
            source: StateSource::TpBtf,
            lifespan_ns: (new == TcpState::Close).then_some(20_000_000),
            bytes_sent: None,
            bytes_received: None,
            retransmits: None,
            failure: None,
            ending: None,
            direction: None,
            v6only: false,
            workload: None,
        }
    }

    #[test]
    fn a_connection_keeps_its_path_and_closed_ones_are_retained_within_bounds() {
        use TcpState::*;
        let mut histories =
            Histories::new(Retention { count: 2, max_age: chrono::Duration::seconds(60) });
        for cookie in 1..=3 {
            let base = cookie as i64 * 100;
            histories.record(&record(cookie, base, Close, SynSent, Some(1)));
            histories.record(&record(cookie, base + 2, SynSent, Established, Some(2)));
            histories.record(&record(cookie, base + 20, Established, Close, Some(18)));
        }
        let all = histories.all();
        assert_eq!(all.iter().map(|h| h.cookie).collect::<Vec<_>>(), [2, 3], "count bound");
        assert_eq!(
            path(&all[0]),
            "CLOSE 1.00ms -> SYN_SENT 2.00ms -> ESTABLISHED 18.00ms -> CLOSE"
        );
        assert!(all[0].closed && all[0].lifespan_ns == Some(20_000_000));
        histories.expire(DateTime::from_timestamp_nanos(400_000_000 + 61_000_000_000));
        assert!(histories.all().is_empty(), "age bound");
    }

    #[test]
    fn snapshot_sockets_say_so() {
        let mut histories = Histories::new(Retention::default());
        let row = SocketRow {
            netns: 1,
            protocol: Protocol::Tcp,
            family: Family::Ipv4,
            state: TcpState::Established,
            local: (IpAddr::V4(Ipv4Addr::LOCALHOST), 5000),
            remote: (IpAddr::V4(Ipv4Addr::LOCALHOST), 6000),
            cookie: 9,
            inode: 1,
            uid: 0,
            recv_q: 0,
            send_q: 0,
            timer: None,
            v6only: false,
            scope: None,
        };
        let holder =
            Holder { pid: 77, comm: "sshd".into(), fd: 4, start_time: Some(1), cgroup_id: 0 };
        let snapshot = Snapshot {
            rows: vec![row],
            owners: HashMap::from([(1, vec![holder])]),
            ..Snapshot::default()
        };
        histories.seed(&snapshot);
        assert_eq!(path(&histories.all()[0]), "ESTABLISHED (since before netwatch)");
        assert_eq!(
            histories.all()[0].snapshot_owner,
            Some(Owner { pid: 77, comm: "sshd".into(), cgroup_id: 0 })
        );
        histories.record(&record(9, 50, TcpState::Established, TcpState::FinWait1, None));
        let history = &histories.all()[0];
        assert_eq!(history.first_seen, FirstSeen::Snapshot);
        assert_eq!(path(history), "ESTABLISHED -> FIN_WAIT1");
        assert_eq!(
            history.snapshot_owner,
            Some(Owner { pid: 77, comm: "sshd".into(), cgroup_id: 0 })
        );

        // A second socket from the snapshot, with no step: marked when events are lost, and
        // closed as such when a new snapshot no longer has it.
        let other = SocketRow { cookie: 10, inode: 2, ..snapshot.rows[0].clone() };
        histories.seed(&Snapshot { rows: vec![other], ..Snapshot::default() });
        histories.mark_lost();
        let listed = histories.all();
        let seeded = listed.iter().find(|h| h.cookie == 10).unwrap();
        assert!(seeded.lost_events && !seeded.closed && seeded.steps.is_empty());
        histories.reconcile(&snapshot, DateTime::from_timestamp_nanos(60_000_000));
        let listed = histories.all();
        let gone = listed.iter().find(|h| h.cookie == 10).unwrap();
        assert!(gone.closed && gone.lost_events);
        assert_eq!(gone.snapshot_state, Some(TcpState::Established));
    }
}
