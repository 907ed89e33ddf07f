//! Timewait sockets, and every other end of a socket that no tracepoint reports.
//!
//! After an active close the kernel's full socket goes FIN_WAIT2 (or CLOSING) -> CLOSE, and
//! a timewait mini-socket, carrying the same cookie, takes over the 4-tuple for 60 s. No
//! tracepoint reports that socket's birth, its turn from the FIN_WAIT2 substate to
//! TIME_WAIT, or its end. The state program tells the birth: at the CLOSE it finds a
//! timewait socket with the closing socket's cookie at the head of the 4-tuple's
//! established-hash chain, where `tcp_time_wait()` has just put it, and whether the peer's
//! FIN came (the substate); see [`Table::enter_timewait`]. The connection then lives on in
//! TIME_WAIT (or FIN_WAIT2). Its end is learned from a new connection on the same 4-tuple (reused), from a periodic
//! sock_diag dump of the namespace ([`Table::reconcile_timewait`]: expired, or vanished before
//! its time), or from the namespace's deletion ([`Table::forget_namespace`]).
use std::collections::{HashMap, HashSet};

use crate::{
    host::snapshot::SocketRow,
    kernel::events::{Comm, SockKey, StateChange, StateSource, Task, TcpState, Totals},
};

use super::{
    Table,
    close::{Ending, Transition},
    socket::{Facts, FourTuple},
};

/// A timewait socket gone at most this long before its recorded expiry has expired: the
/// expiry is computed from a millisecond count read a moment after the kernel wrote it.
const EXPIRY_SLACK_NS: u64 = 1_000_000_000;

/// How long a timewait socket lives in TIME_WAIT (the kernel's TCP_TIMEWAIT_LEN).
const TIMEWAIT_LEN_NS: u64 = 60_000_000_000;

impl Table {
    /// A full socket's close (`change`, X -> CLOSE) that the kernel says left a timewait
    /// socket (same cookie) in the substate `change.timewait`. The connection goes on in that
    /// state: the transition into TIME_WAIT comes back, or None when the socket was already
    /// in the state the timewait socket has (FIN_WAIT2). The close's totals are kept for the
    /// summary at the timewait socket's end.
    pub(super) fn enter_timewait(&mut self, mut change: StateChange) -> Option<Transition> {
        let (Some(substate), Some(cookie)) = (change.timewait, change.cookie) else {
            return Some(self.apply_state(change));
        };
        let now_ns = change.ts_ns;
        let totals = change.totals.take();
        let key = change.key;
        let unchanged = self.sockets.get(&key).and_then(|s| s.state) == Some(substate);
        change.new = substate;
        let transition = (!unchanged).then(|| self.apply_state(change));
        let socket = self.sockets.entry(key).or_default();
        socket.close_totals = totals;
        socket.state = Some(substate);
        // A first guess, which the next sock_diag dump of the namespace replaces with the
        // kernel's timer (a FIN_WAIT2 timewait socket lives tcp_fin_timeout, at most this).
        let Some(facts) = socket.facts.as_mut() else { return transition };
        facts.expires_ns = Some(now_ns + TIMEWAIT_LEN_NS);
        let tuple = facts.four_tuple();
        // An older timewait socket on the same 4-tuple that no event said was taken over
        // (its new connection's SYN_SENT came without a port) ended when this one was made.
        if let Some(older) = self.timewaits.insert(tuple, cookie)
            && older != cookie
            && let Some(ended) = self.end_quietly(SockKey::Cookie(older), now_ns, Ending::Reused)
        {
            self.ended.push(ended);
        }
        transition
    }

    /// Ends a socket that no event reports the end of, at `ts_ns`: its state -> CLOSE, with
    /// the connection's summary and what ended it. None if the table does not have it.
    pub(super) fn end_quietly(
        &mut self,
        key: SockKey,
        ts_ns: u64,
        ending: Ending,
    ) -> Option<Transition> {
        let socket = self.sockets.remove(&key)?;
        let pids: Vec<u32> = socket.holders.keys().map(|(pid, _)| *pid).collect();
        self.forget_holders(key, pids);
        let facts = socket.facts.as_ref()?;
        let tuple = facts.four_tuple();
        if self.timewaits.get(&tuple).is_some_and(|cookie| SockKey::Cookie(*cookie) == key) {
            self.timewaits.remove(&tuple);
        }
        let old = socket.state?;
        let change = quiet_change(key, facts, old, TcpState::Close, ts_ns, socket.close_totals);
        Some(Transition {
            change,
            in_old_state_ns: socket.since_ns.map(|since| ts_ns.saturating_sub(since)),
            lifespan_ns: socket.created_ns.map(|born| ts_ns.saturating_sub(born)),
            owner: socket.owner,
            failure: None,
            ending: Some(ending),
            direction: socket.direction,
            v6only: false,
        })
    }

    /// A new connection (`opener`) on a timewait socket's 4-tuple has replaced it.
    pub(super) fn end_reused(
        &mut self,
        netns: u32,
        local: (std::net::IpAddr, u16),
        remote: (std::net::IpAddr, u16),
        ts_ns: u64,
        opener: SockKey,
    ) {
        let Some(&cookie) = self.timewaits.get(&(netns, local, remote)) else { return };
        if SockKey::Cookie(cookie) != opener
            && let Some(ended) = self.end_quietly(SockKey::Cookie(cookie), ts_ns, Ending::Reused)
        {
            self.ended.push(ended);
        }
    }

    /// Transitions the table made on its own while applying the last event, to go before the
    /// one [`Table::apply`] returned: timewait sockets a new connection took over.
    pub fn take_ended(&mut self) -> Vec<Transition> {
        std::mem::take(&mut self.ended)
    }

    /// The timewait sockets in the FIN_WAIT2 substate, by network namespace.
    pub fn fin_wait2_timewaits(&self) -> HashMap<u32, Vec<u64>> {
        let mut namespaces: HashMap<u32, Vec<u64>> = HashMap::new();
        for (&(netns, _, _), &cookie) in &self.timewaits {
            let socket = self.sockets.get(&SockKey::Cookie(cookie));
            if socket.is_some_and(|s| s.state == Some(TcpState::FinWait2)) {
                namespaces.entry(netns).or_default().push(cookie);
            }
        }
        namespaces
    }

    /// Network namespaces with timewait sockets, each with whether it is due for a look at
    /// `now_ns`: one of its timewait sockets is past its expiry, or in the FIN_WAIT2 substate
    /// (whose turn to TIME_WAIT, when the peer's FIN arrives, no event reports).
    pub fn timewait_namespaces(&self, now_ns: u64) -> HashMap<u32, bool> {
        let mut namespaces: HashMap<u32, bool> = HashMap::new();
        for (&(netns, _, _), &cookie) in &self.timewaits {
            let due = self.sockets.get(&SockKey::Cookie(cookie)).is_none_or(|socket| {
                socket.state == Some(TcpState::FinWait2)
                    || socket
                        .facts
                        .as_ref()
                        .and_then(|f| f.expires_ns)
                        .is_none_or(|end| end <= now_ns)
            });
            *namespaces.entry(netns).or_default() |= due;
        }
        namespaces
    }

    /// Brings the timewait sockets of `netns` in line with `dump`, sock_diag's TIME_WAIT and
    /// FIN_WAIT2 sockets of that namespace as of `now_ns`: a FIN_WAIT2 timewait socket whose
    /// peer's FIN came is now in TIME_WAIT, and one that is not there any more has ended.
    pub fn reconcile_timewait(
        &mut self,
        netns: u32,
        dump: &[SocketRow],
        now_ns: u64,
    ) -> Vec<Transition> {
        let found: HashMap<u64, &SocketRow> = dump.iter().map(|row| (row.cookie, row)).collect();
        let ours: Vec<(FourTuple, u64)> = self
            .timewaits
            .iter()
            .filter(|((ns, _, _), _)| *ns == netns)
            .map(|(tuple, cookie)| (*tuple, *cookie))
            .collect();
        let mut transitions = Vec::new();
        for (tuple, cookie) in ours {
            let key = SockKey::Cookie(cookie);
            match found.get(&cookie) {
                Some(row) => transitions.extend(self.refresh_timewait(key, row, now_ns)),
                None => {
                    let expired = self
                        .sockets
                        .get(&key)
                        .and_then(|s| s.facts.as_ref()?.expires_ns)
                        .is_none_or(|end| now_ns + EXPIRY_SLACK_NS >= end);
                    let ending = if expired {
                        Ending::Expired
                    } else if self.has_other_connection_on(tuple, key) {
                        Ending::Reused
                    } else {
                        Ending::Vanished
                    };
                    match self.end_quietly(key, now_ns, ending) {
                        Some(transition) => transitions.push(transition),
                        None => {
                            self.timewaits.remove(&tuple);
                        }
                    }
                }
            }
        }
        transitions
    }

    /// A timewait socket found again: a new expiry, and FIN_WAIT2 -> TIME_WAIT if the peer's
    /// FIN has come since.
    fn refresh_timewait(
        &mut self,
        key: SockKey,
        row: &SocketRow,
        now_ns: u64,
    ) -> Option<Transition> {
        let expires_ns = Facts::from_row(row, now_ns).expires_ns;
        let before = self.sockets.get(&key)?.facts.as_ref()?.expires_ns;
        // The kernel's timer, read again, moves by the dump's rounding: only a real change
        // (a timewait socket's timer restarted by a late FIN) changes the row.
        let moved = match (before, expires_ns) {
            (Some(old), Some(new)) => old.abs_diff(new) > 1_000_000_000,
            (old, new) => old != new,
        };
        if moved && let SockKey::Cookie(cookie) = key {
            self.mark_changed(cookie);
        }
        let socket = self.sockets.get_mut(&key)?;
        let facts = socket.facts.as_mut()?;
        facts.expires_ns = expires_ns;
        let old = socket.state?;
        if old == row.state {
            return None;
        }
        let change = quiet_change(key, facts, old, row.state, now_ns, None);
        let in_old_state_ns = socket.since_ns.map(|since| now_ns.saturating_sub(since));
        socket.state = Some(row.state);
        socket.since_ns = Some(now_ns);
        Some(Transition {
            change,
            owner: socket.owner.clone(),
            in_old_state_ns,
            lifespan_ns: None,
            failure: None,
            ending: None,
            direction: socket.direction,
            v6only: false,
        })
    }

    /// Whether a socket other than `key` is open on the 4-tuple `tuple`.
    fn has_other_connection_on(&self, tuple: FourTuple, key: SockKey) -> bool {
        self.sockets.iter().any(|(other, socket)| {
            *other != key
                && socket.state.is_some_and(|s| s != TcpState::Close)
                && socket.facts.as_ref().is_some_and(|f| f.four_tuple() == tuple)
        })
    }

    /// Network namespaces the table has sockets in.
    pub fn namespaces(&self) -> HashSet<u32> {
        self.sockets.values().filter_map(|s| s.facts.as_ref().map(|f| f.netns)).collect()
    }

    /// Ends the timewait sockets of a network namespace that can no longer be reached, at
    /// `now_ns`. Timewait sockets hold no reference to their namespace and go with it, with no
    /// event. Every other socket holds one and keeps the namespace alive (an orphan finishing
    /// its close, a child waiting in its listener's queue): those end with events of their
    /// own, as anywhere else.
    pub fn forget_namespace(&mut self, netns: u32, now_ns: u64) -> Vec<Transition> {
        let gone: Vec<u64> = self
            .timewaits
            .iter()
            .filter(|((ns, _, _), _)| *ns == netns)
            .map(|(_, cookie)| *cookie)
            .collect();
        let mut transitions = Vec::new();
        for cookie in gone {
            transitions.extend(self.end_quietly(
                SockKey::Cookie(cookie),
                now_ns,
                Ending::NetnsDeleted,
            ));
        }
        self.timewaits.retain(|(ns, _, _), _| *ns != netns);
        transitions
    }
}

/// A state change no tracepoint reported, learned from sock_diag or a namespace's deletion:
/// no task was on the CPU for it that netwatch knows of.
fn quiet_change(
    key: SockKey,
    facts: &Facts,
    old: TcpState,
    new: TcpState,
    ts_ns: u64,
    totals: Option<Totals>,
) -> StateChange {
    StateChange {
        ts_ns,
        source: StateSource::SockDiag,
        key,
        cookie: match key {
            SockKey::Cookie(cookie) => Some(cookie),
            SockKey::Addr { .. } => None,
        },
        skaddr: 0,
        netns: facts.netns,
        inode: facts.inode,
        family: facts.family,
        local: facts.local,
        remote: facts.remote,
        old,
        new,
        task: Task { pid: 0, tid: 0, comm: Comm::default(), cgroup: 0 },
        deferred_connect: false,
        timewait: None,
        listener: None,
        totals,
    }
}
