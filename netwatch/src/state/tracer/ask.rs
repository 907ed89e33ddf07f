//! What no event says, asked of the kernel when a question needs it or on the loss check's
//! tick: timewait sockets' turn to TIME_WAIT and their ends, deleted namespaces, and the
//! half-open connections in listeners' SYN queues; and the table as a question sees it.
use std::collections::HashSet;

use super::*;
use crate::{kernel::events::Protocol, record::RowsChange, state::table::Row};

/// What a question can show, for [`Tracer::settle`] to ask the kernel no more than it needs.
#[derive(Clone, Copy, Debug)]
pub struct Scope {
    /// Sockets in TIME_WAIT: every timewait socket is checked.
    pub timewait: bool,
    /// Sockets in FIN_WAIT2: those of the timewait sockets in that substate are checked.
    pub fin_wait2: bool,
    /// Half-open connections (SYN_RECV), which only the kernel knows of.
    pub half_open: bool,
}

impl Scope {
    pub const ALL: Scope = Scope { timewait: true, fin_wait2: true, half_open: true };
    pub const NONE: Scope = Scope { timewait: false, fin_wait2: false, half_open: false };
    /// What a view that mirrors the table shows: every socket but the half-open ones, which
    /// have no events to keep them current.
    pub const LIVE: Scope = Scope { half_open: false, ..Scope::ALL };
}

impl Tracer {
    /// Brings everything up to the moment of asking, for an answer that includes all that
    /// happened before the question: applies the events the kernel has queued, reports new
    /// losses and rebuilds the table if there were any, and ends the sockets that went
    /// without an event (timewait sockets, deleted namespaces). Records go to `out`.
    /// Only what `scope` can show is checked with the kernel. Returns the sockets to leave
    /// out of the answer: timewait sockets no longer in FIN_WAIT2, when the question shows
    /// FIN_WAIT2 but not TIME_WAIT (the next full check tells whether they are in TIME_WAIT
    /// now or gone).
    pub fn settle(
        &mut self,
        out: &mut Vec<StreamRecord>,
        scope: Scope,
    ) -> anyhow::Result<HashSet<u64>> {
        self.catch_up(out);
        self.check_losses(out, true)?;
        self.forget_gone_namespaces(out);
        if scope.timewait {
            self.check_timewait(out, true);
        } else if scope.fin_wait2 {
            return Ok(self.fin_wait2_left());
        }
        Ok(HashSet::new())
    }

    /// The timewait sockets the table has in the FIN_WAIT2 substate that the kernel no
    /// longer has in FIN_WAIT2: one dump of FIN_WAIT2 sockets per namespace with some, far
    /// shorter than one of every timewait socket.
    fn fin_wait2_left(&mut self) -> HashSet<u64> {
        let mut left = HashSet::new();
        for (netns, cookies) in self.table.fin_wait2_timewaits() {
            let Some(namespace) = self.namespaces.get(&netns) else { continue };
            match self.diag.get(namespace).and_then(DiagSocket::fin_wait2_sockets) {
                Ok(rows) => {
                    let found: HashSet<u64> = rows.iter().map(|row| row.cookie).collect();
                    left.extend(cookies.into_iter().filter(|cookie| !found.contains(cookie)));
                }
                Err(error) => tracing::debug!("FIN_WAIT2 sockets in netns {netns}: {error}"),
            }
        }
        left
    }

    /// The table's rows as of the last [`Tracer::settle`], as `ss -tuanp` would list them:
    /// those whose socket `keep_row` keeps, then that `keep` keeps.
    fn listed_where(
        &self,
        keep_row: impl Fn(&SocketRow) -> bool,
        keep: impl Fn(&Listed) -> bool,
    ) -> Vec<Listed> {
        let now = WallClock::monotonic_now_ns();
        self.table
            .rows_where(now, keep_row)
            .into_iter()
            .map(|row| self.listed(row))
            .filter(keep)
            .collect()
    }

    fn listed(&self, row: Row) -> Listed {
        let cgroup = match row.owner_history.last() {
            Some((_, owner)) if owner.cgroup_id != 0 => owner.cgroup_id,
            _ => row.owners.first().map_or(0, |holder| holder.cgroup_id),
        };
        Listed {
            workload: self.workloads.of(cgroup),
            netns_name: self.namespaces.get(&row.row.netns).and_then(|ns| ns.name.clone()),
            in_state: row.in_state_ns.map(Duration::from_nanos),
            owners: row.owners,
            row: row.row,
            queues_known: false,
            owner_history: row
                .owner_history
                .into_iter()
                .map(|(ago, owner)| OwnerChange { owner, ago: ago.map(Duration::from_nanos) })
                .collect(),
        }
    }

    /// Starts or stops noting which rows change, for [`Tracer::take_changes`].
    pub fn track_changes(&mut self, on: bool) {
        self.tracking = on;
        self.table.track_changes(on);
        self.replaced &= on;
    }

    pub fn has_changes(&self) -> bool {
        self.replaced || self.table.has_changes()
    }

    /// The rows changed since the last call, or every row after the table was rebuilt.
    pub fn take_changes(&mut self) -> RowsChange {
        let now = WallClock::monotonic_now_ns();
        if std::mem::take(&mut self.replaced) {
            self.table.take_changed();
            let upsert = self.listed_where(|_| true, |_| true);
            return RowsChange { full: true, upsert, gone: Vec::new() };
        }
        let mut change = RowsChange::default();
        for cookie in self.table.take_changed() {
            match self.table.row(cookie, now) {
                Some(row) => change.upsert.push(self.listed(row)),
                None => change.gone.push(cookie),
            }
        }
        change
    }

    /// How many sockets the table lists, by protocol and state.
    pub fn counts(&self) -> HashMap<(Protocol, TcpState), u64> {
        self.table.counts()
    }

    /// The table's rows, and the half-open connections waiting in the
    /// listeners' SYN queues: request sockets, which are not full sockets and pass no
    /// tracepoint (the state change comes with the handshake's last ACK). They are read from
    /// sock_diag at the moment of asking, as `ss` reads them, one dump per namespace with a
    /// listener; they have no process, as in `ss`. Only the rows whose socket `keep_row`
    /// keeps (a cheap first look, before owners are gathered) and that `keep` keeps; the
    /// half-open ones only when `scope` shows them.
    pub fn listed_with_half_open(
        &mut self,
        scope: Scope,
        keep_row: impl Fn(&SocketRow) -> bool,
        keep: impl Fn(&Listed) -> bool,
    ) -> Vec<Listed> {
        let mut rows = self.listed_where(&keep_row, &keep);
        if !scope.half_open {
            return rows;
        }
        let listeners = self.listeners();
        let known: std::collections::HashSet<u64> = rows.iter().map(|l| l.row.cookie).collect();
        let half_open = self
            .passive_sockets(&listeners)
            .unwrap_or_default()
            .into_iter()
            .filter(|row| row.state == TcpState::SynRecv && !known.contains(&row.cookie))
            .filter(|row| keep_row(row));
        let half_open = half_open.map(|row| Listed {
            netns_name: self.namespaces.get(&row.netns).and_then(|ns| ns.name.clone()),
            in_state: None,
            owners: Vec::new(),
            row,
            queues_known: false,
            owner_history: Vec::new(),
            workload: None,
        });
        rows.extend(half_open.filter(keep));
        rows
    }

    /// Every listening socket with its accept-queue counts.
    pub fn listeners(&self) -> Vec<crate::state::table::Listener> {
        self.table.listeners()
    }

    /// The kernel's listeners and half-open connections now, in every namespace that has one
    /// of `listeners`; None if a namespace could not be read.
    pub fn passive_sockets(
        &mut self,
        listeners: &[crate::state::table::Listener],
    ) -> Option<Vec<SocketRow>> {
        if listeners.iter().any(|l| !self.namespaces.contains_key(&l.netns)) {
            self.learn_namespaces();
        }
        let wanted: std::collections::BTreeSet<u32> = listeners.iter().map(|l| l.netns).collect();
        let mut rows = Vec::new();
        for netns in wanted {
            let namespace = self.namespaces.get(&netns)?;
            match self.diag.get(namespace).and_then(DiagSocket::passive_sockets) {
                Ok(found) => rows.extend(found),
                Err(error) => {
                    tracing::warn!("listener queues in netns {netns}: {error}");
                    return None;
                }
            }
        }
        Some(rows)
    }

    /// A deleted network namespace takes its sockets with it, and no event says so. Check
    /// that each namespace the table has sockets in can still be reached (one stat of a known
    /// path each; a /proc scan only when one cannot) and end the sockets of the rest.
    pub(super) fn forget_gone_namespaces(&mut self, out: &mut Vec<StreamRecord>) {
        use std::os::unix::fs::MetadataExt as _;
        let reachable = |ns: &NetNamespace| {
            std::fs::metadata(&ns.path).is_ok_and(|m| m.ino() == u64::from(ns.inode))
        };
        let in_table = self.table.namespaces();
        let unsure: Vec<u32> = in_table
            .iter()
            .filter(|&&inode| inode != 0)
            .filter(|inode| self.namespaces.get(inode).is_none_or(|ns| !reachable(ns)))
            .copied()
            .collect();
        if unsure.is_empty() {
            return;
        }
        self.namespaces.clear();
        self.learn_namespaces();
        let now = WallClock::monotonic_now_ns();
        for inode in unsure {
            if !self.namespaces.contains_key(&inode) {
                tracing::debug!("netns {inode} is gone: ending its sockets");
                self.diag.0.remove(&inode);
                self.timewait_checked.remove(&inode);
                let ended = self.table.forget_namespace(inode, now);
                self.push_transitions(ended, out);
            }
        }
    }

    /// Compares the table's timewait sockets with sock_diag's, one dump per namespace that
    /// has some: those in the FIN_WAIT2 substate or past their expiry every second, the rest
    /// every TIMEWAIT_CHECK_INTERVAL (a RST ends a timewait socket with no event), and all
    /// of them when `all` is set (a question is being answered).
    pub(super) fn check_timewait(&mut self, out: &mut Vec<StreamRecord>, all: bool) {
        let now = WallClock::monotonic_now_ns();
        let interval = TIMEWAIT_CHECK_INTERVAL.as_nanos() as u64;
        for (netns, due) in self.table.timewait_namespaces(now) {
            let last = self.timewait_checked.get(&netns).copied().unwrap_or(0);
            if !(all || due || now.saturating_sub(last) >= interval) {
                continue;
            }
            let Some(namespace) = self.namespaces.get(&netns) else { continue };
            let dump = self.diag.get(namespace).and_then(DiagSocket::timewait_sockets);
            match dump {
                Ok(rows) => {
                    let now = WallClock::monotonic_now_ns();
                    self.timewait_checked.insert(netns, now);
                    let changed = self.table.reconcile_timewait(netns, &rows, now);
                    self.push_transitions(changed, out);
                }
                Err(error) => tracing::debug!("timewait sockets in netns {netns}: {error}"),
            }
        }
    }
}
