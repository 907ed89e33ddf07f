//! What `netwatch top` knows, kept current from its feed: every socket (a mirror of the
//! agent's table, by cookie), the recent stream, and the counts behind the header. Pure:
//! updates and the monotonic clock in; no I/O.
use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use crate::{
    host::snapshot::{Protocol, SocketRow},
    kernel::events::TcpState,
    record::{Listed, Owner, Resent, RowsChange, StreamRecord, TransitionRecord},
};

/// Stream lines kept for the transitions pane.
pub const STREAM_KEEP: usize = 2_000;
/// While the pane is paused, what arrives is kept up to this many lines, so that resuming
/// shows it.
pub const PAUSED_KEEP: usize = 200_000;
/// The window the header's rates are averaged over.
const RATE_WINDOW_NS: u64 = 5_000_000_000;

/// One socket as the connections pane shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Conn {
    pub listed: Listed,
    /// When `listed` came (CLOCK_MONOTONIC): its times (`in_state`, owners' `ago`) were
    /// counted then.
    pub listed_at_ns: u64,
    /// CLOCK_MONOTONIC when the current state began, when known.
    pub since_ns: Option<u64>,
    /// How long its handshake took, when netwatch saw it (either end).
    pub connect_ns: Option<u64>,
    pub retransmits: u64,
    /// Bytes and rates from its `tcp_info`, for the rows that were on screen (boxed: most
    /// rows never are).
    pub traffic: Option<Box<Traffic>>,
    /// The last process known to own it: shown for a socket no process holds any more
    /// (TIME_WAIT, an orphan closing), which `ss` shows with no process.
    pub last_owner: Option<Owner>,
}

/// A connection's byte counts from `tcp_info`, and their rates since the previous look.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Traffic {
    pub sent: u64,
    pub received: u64,
    pub sent_per_s: Option<f64>,
    pub received_per_s: Option<f64>,
    pub at_ns: u64,
}

impl Conn {
    pub fn row(&self) -> &SocketRow {
        &self.listed.row
    }

    /// The process to name for the socket: its latest owner while that one still holds it,
    /// else the first holder; and how many processes hold it.
    pub fn owner(&self) -> (Option<Owner>, usize) {
        let holders = &self.listed.owners;
        let mut pids: Vec<u32> = holders.iter().map(|h| h.pid).collect();
        pids.sort_unstable();
        pids.dedup();
        let latest = self.listed.owner_history.last().map(|change| &change.owner);
        let owner = match latest {
            Some(owner) if holders.iter().any(|h| h.pid == owner.pid) => Some(owner.clone()),
            _ => holders.first().map(|h| Owner {
                pid: h.pid,
                comm: h.comm.clone(),
                cgroup_id: h.cgroup_id,
            }),
        };
        (owner, pids.len())
    }

    pub fn in_state_ns(&self, now_ns: u64) -> Option<u64> {
        self.since_ns.map(|since| now_ns.saturating_sub(since))
    }

    /// A conn for a socket first heard of in a transition, until its row comes.
    fn from_transition(t: &TransitionRecord) -> Conn {
        let row = SocketRow {
            netns: t.netns,
            protocol: Protocol::Tcp,
            family: t.family,
            state: t.new,
            local: (t.laddr, t.lport),
            remote: (t.raddr, t.rport),
            cookie: t.cookie.unwrap_or(0),
            inode: 0,
            uid: 0,
            recv_q: 0,
            send_q: 0,
            timer: None,
            v6only: t.v6only,
            scope: None,
        };
        let listed = Listed {
            row,
            owners: Vec::new(),
            in_state: None,
            netns_name: None,
            queues_known: false,
            owner_history: Vec::new(),
            workload: t.workload.clone(),
        };
        Conn::new(listed, None, t.mono_ns)
    }

    fn new(listed: Listed, since_ns: Option<u64>, listed_at_ns: u64) -> Conn {
        let mut conn = Conn {
            listed,
            listed_at_ns,
            since_ns,
            connect_ns: None,
            retransmits: 0,
            traffic: None,
            last_owner: None,
        };
        conn.note_owner();
        conn
    }

    /// Keeps the current owner as the last known one.
    fn note_owner(&mut self) {
        let latest = self.listed.owner_history.last().map(|change| change.owner.clone());
        if let Some(owner) = self.owner().0.or(latest) {
            self.last_owner = Some(owner);
        }
    }
}

/// Event times in a sliding window, for a per-second rate.
#[derive(Debug, Default)]
struct Rate(VecDeque<u64>);

impl Rate {
    fn add(&mut self, at_ns: u64) {
        self.0.push_back(at_ns);
    }

    fn per_second(&mut self, now_ns: u64) -> f64 {
        let start = now_ns.saturating_sub(RATE_WINDOW_NS);
        while self.0.front().is_some_and(|&t| t < start) {
            self.0.pop_front();
        }
        self.0.len() as f64 / (RATE_WINDOW_NS as f64 / 1e9)
    }
}

#[derive(Debug, Default)]
pub struct Model {
    pub conns: FxHashMap<u64, Conn>,
    /// The recent stream, oldest first.
    pub stream: VecDeque<StreamRecord>,
    pub paused: bool,
    /// Lines that arrived while paused.
    pub unseen: usize,
    /// Lines dropped from a paused pane past [`PAUSED_KEEP`] (never hidden).
    pub dropped: u64,
    handshakes: Rate,
    failures: Rate,
    /// Events lost since start, as the stream reported them.
    pub lost: u64,
    /// Bumped by every change, so that the view redraws only when something changed.
    pub version: u64,
}

impl Model {
    /// A model of the table `rows`, as listed at `now_ns`.
    pub fn new(rows: Vec<Listed>, now_ns: u64) -> Model {
        let mut model = Model::default();
        model.replace(rows, now_ns);
        model
    }

    fn replace(&mut self, rows: Vec<Listed>, now_ns: u64) {
        let mut old = std::mem::take(&mut self.conns);
        for listed in rows {
            let cookie = listed.row.cookie;
            let since = listed.in_state.map(|d| now_ns.saturating_sub(d.as_nanos() as u64));
            let conn = match old.remove(&cookie) {
                Some(mut conn) => {
                    conn.since_ns = since;
                    conn.listed = listed;
                    conn.listed_at_ns = now_ns;
                    conn.note_owner();
                    conn
                }
                None => Conn::new(listed, since, now_ns),
            };
            self.conns.insert(cookie, conn);
        }
        self.version += 1;
    }

    /// Applies a change of rows sent by the agent (or the direct tracer).
    pub fn apply_rows(&mut self, change: RowsChange, now_ns: u64) {
        if change.full {
            return self.replace(change.upsert, now_ns);
        }
        for cookie in change.gone {
            self.conns.remove(&cookie);
        }
        for listed in change.upsert {
            let since = listed.in_state.map(|d| now_ns.saturating_sub(d.as_nanos() as u64));
            match self.conns.get_mut(&listed.row.cookie) {
                Some(conn) => {
                    // A state the stream already gave keeps its exact start.
                    if conn.row().state != listed.row.state || conn.since_ns.is_none() {
                        conn.since_ns = since;
                    }
                    conn.listed = listed;
                    conn.listed_at_ns = now_ns;
                    conn.note_owner();
                }
                None => {
                    self.conns.insert(listed.row.cookie, Conn::new(listed, since, now_ns));
                }
            }
        }
        self.version += 1;
    }

    /// Applies one stream record: the socket's new state (gone at CLOSE) and the pane's line.
    pub fn apply(&mut self, record: StreamRecord) {
        self.take_in(&record);
        self.push_line(record);
    }

    /// Applies a record to the sockets only (a replay catching up to where it starts).
    pub fn take_in(&mut self, record: &StreamRecord) {
        match record {
            StreamRecord::Transition(t) => self.transition(t),
            StreamRecord::Retransmit(r) => {
                let cookie = r.cookie;
                if r.resent == Resent::Segment
                    && let Some(conn) = self.conns.get_mut(&cookie)
                {
                    conn.retransmits = conn.retransmits.max(r.count);
                }
            }
            StreamRecord::Lost(loss) => self.lost += loss.count,
            StreamRecord::LogFailed(_) | StreamRecord::ExportDropped(_) => {}
        }
        self.version += 1;
    }

    fn transition(&mut self, t: &TransitionRecord) {
        let handshake = matches!(t.old, TcpState::SynSent | TcpState::SynRecv)
            && t.new == TcpState::Established;
        if handshake {
            self.handshakes.add(t.mono_ns);
        }
        if t.failure.is_some() {
            self.failures.add(t.mono_ns);
        }
        let Some(cookie) = t.cookie else { return };
        if t.new == TcpState::Close {
            self.conns.remove(&cookie);
            return;
        }
        let conn = self.conns.entry(cookie).or_insert_with(|| Conn::from_transition(t));
        conn.listed.row.state = t.new;
        conn.since_ns = Some(t.mono_ns);
        if t.new == TcpState::Established && matches!(t.old, TcpState::SynSent | TcpState::SynRecv)
        {
            conn.connect_ns = t.duration_ns;
        }
        if let (Some(pid), Some(comm)) = (t.pid, &t.comm) {
            conn.last_owner = Some(Owner { pid, comm: comm.clone(), cgroup_id: 0 });
        }
    }

    fn push_line(&mut self, record: StreamRecord) {
        self.stream.push_back(record);
        let keep = if self.paused {
            self.unseen += 1;
            PAUSED_KEEP
        } else {
            STREAM_KEEP
        };
        while self.stream.len() > keep {
            self.stream.pop_front();
            if self.paused {
                self.dropped += 1;
            }
        }
    }

    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
        if !paused {
            self.unseen = 0;
            let excess = self.stream.len().saturating_sub(STREAM_KEEP);
            self.stream.drain(..excess);
        }
        self.version += 1;
    }

    /// Handshakes completed and connections failed per second, over the last few seconds.
    pub fn rates(&mut self, now_ns: u64) -> (f64, f64) {
        (self.handshakes.per_second(now_ns), self.failures.per_second(now_ns))
    }

    /// Records a look at a connection's `tcp_info` byte counts.
    pub fn set_traffic(&mut self, cookie: u64, sent: u64, received: u64, now_ns: u64) {
        let Some(conn) = self.conns.get_mut(&cookie) else { return };
        let rate = |before: u64, after: u64, seconds: f64| {
            (seconds > 0.0).then(|| after.saturating_sub(before) as f64 / seconds)
        };
        let traffic = match conn.traffic.as_deref() {
            Some(old) => {
                let seconds = now_ns.saturating_sub(old.at_ns) as f64 / 1e9;
                Traffic {
                    sent,
                    received,
                    sent_per_s: rate(old.sent, sent, seconds),
                    received_per_s: rate(old.received, received, seconds),
                    at_ns: now_ns,
                }
            }
            None => {
                Traffic { sent, received, sent_per_s: None, received_per_s: None, at_ns: now_ns }
            }
        };
        if conn.traffic.as_deref() != Some(&traffic) {
            conn.traffic = Some(Box::new(traffic));
            self.version += 1;
        }
    }
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
