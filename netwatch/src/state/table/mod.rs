//! The pure, synchronous socket state: events and snapshot rows in, enriched transitions and
//! table rows out. No I/O.
//!
//! For each socket it keeps what the stream needs to say more than the kernel record does:
//! who owns the socket (not merely who was on the CPU), when it was created, and when it
//! entered its current state. Ownership (docs/ARCHITECTURE.md): the current task counts as owner
//! only for transitions that run inside the owner's own system call; every other transition
//! (softirq: handshake completion, peer FIN, RST, timers, loopback delivery) keeps the owner
//! already known. A passively opened socket inherits its listener's owner until accepted.
//!
//! For the agent's table it also keeps each socket's row (addresses, netns, inode) and every
//! (process, fd) holding it, as `ss -p` lists them: from the snapshot, then from socket(),
//! accept(), dup*(), close(), fork, exec and exit events.
use std::collections::{HashMap, HashSet, VecDeque};

use rustc_hash::{FxHashMap, FxHashSet};

use crate::{
    host::snapshot::{Holder, Protocol, SocketRow, Timer, TimerKind},
    kernel::events::{Comm, Event, FdSocket, SockKey, TcpState},
};

mod changes;
mod close;
mod listeners;
#[cfg(test)]
mod properties;
mod socket;
#[cfg(test)]
mod tests;
mod timewait;

pub use close::{Direction, Ending, Failure, Transition};
pub use listeners::{AcceptQueue, Listener, RetransmitSeen};
pub use socket::{Owner, Row};

use listeners::ListenerKey;
use socket::{Facts, FourTuple, Socket};

#[derive(Debug, Default)]
pub struct Table {
    // Fx hashing: the keys are kernel cookies and pids, which no one outside chooses, and
    // SipHash was a tenth of the agent's time under load (cargo xtask bench, perf).
    sockets: FxHashMap<SockKey, Socket>,
    /// Each listening socket's key and owner, to find the listener of a new passive socket;
    /// several share an address with SO_REUSEPORT.
    listeners: FxHashMap<ListenerKey, Vec<(SockKey, Option<Owner>)>>,
    /// Accept-queue counts, by listening socket.
    accept_queues: FxHashMap<SockKey, AcceptQueue>,
    closed: VecDeque<SockKey>,
    /// Sockets each process holds, for fork, exec and exit.
    by_pid: FxHashMap<u32, FxHashSet<SockKey>>,
    /// Holders the snapshot found for sockets it did not list (an unbound UDP socket, a TCP
    /// socket not yet connected), by inode: claimed when an event names that inode.
    unclaimed: HashMap<u64, Vec<Holder>>,
    /// Timewait sockets by 4-tuple (cookie), to tell when a new connection takes one over.
    timewaits: FxHashMap<FourTuple, u64>,
    /// Transitions made while applying an event, ahead of its own ([`Table::take_ended`]).
    ended: Vec<Transition>,
    /// Sockets whose rows changed, while someone mirrors the table ([`Table::track_changes`]).
    changed: Option<FxHashSet<u64>>,
}

impl Table {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of sockets currently tracked.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Seeds the table from a snapshot taken at `now_ns`, after the programs were attached.
    /// Events queued meanwhile are applied afterwards and win: they are newer than any
    /// snapshot row. A socket's state found here has no known start; its stream owner is the
    /// first process (lowest pid) holding it, and a listener's owner passes on to the
    /// connections it spawns.
    pub fn seed(&mut self, rows: &[SocketRow], owners: &HashMap<u64, Vec<Holder>>, now_ns: u64) {
        // Rows without a cookie (read from /proc/net) could never be matched with events.
        for row in rows.iter().filter(|r| r.cookie != 0) {
            self.insert_row(row, owners.get(&row.inode).filter(|_| row.inode != 0), now_ns);
        }
        // Established sockets without a file are children waiting in their listener's accept
        // queue (an orphan has left ESTABLISHED/CLOSE_WAIT when its file closed).
        for row in rows.iter().filter(|r| {
            r.cookie != 0
                && r.inode == 0
                && r.protocol == Protocol::Tcp
                && matches!(r.state, TcpState::Established | TcpState::CloseWait)
        }) {
            if let Some((listener, _)) = self.listener_of(row.netns, row.local, None) {
                self.enqueue(SockKey::Cookie(row.cookie), listener);
            }
        }
        let listed: HashSet<u64> = rows.iter().map(|r| r.inode).collect();
        self.unclaimed = owners
            .iter()
            .filter(|(inode, _)| !listed.contains(inode))
            .map(|(i, o)| (*i, o.clone()))
            .collect();
    }

    /// Adds sockets no dump lists, with the holders the snapshot found for them.
    pub fn seed_unlisted(&mut self, rows: &[SocketRow], now_ns: u64) {
        for row in rows {
            let holders = self.unclaimed.remove(&row.inode);
            self.insert_row(row, holders.as_ref(), now_ns);
        }
    }

    /// Adds a socket found by a targeted lookup (a timewait socket after its full socket
    /// closed) or by the snapshot.
    pub fn insert_row(&mut self, row: &SocketRow, holders: Option<&Vec<Holder>>, now_ns: u64) {
        let owner = holders.and_then(|list| list.first()).map(|o| Owner {
            pid: o.pid,
            comm: o.comm.clone(),
            cgroup_id: o.cgroup_id,
        });
        let key = SockKey::Cookie(row.cookie);
        if row.protocol == Protocol::Tcp && row.state == TcpState::Listen {
            self.add_listener((row.netns, row.local.1, row.local.0), key, owner.clone());
            self.accept_queues.entry(key).or_default();
        }
        let socket = self.sockets.entry(key).or_default();
        socket.state = Some(row.state);
        socket.since_ns = None;
        socket.set_owner(owner, None);
        let facts = Facts::from_row(row, now_ns);
        if facts.expires_ns.is_some() {
            self.timewaits.insert(facts.four_tuple(), row.cookie);
        }
        socket.facts = Some(facts);
        self.add_holders(key, holders.into_iter().flatten().cloned());
    }

    /// Records processes holding the socket `key` through their fds.
    fn add_holders(&mut self, key: SockKey, holders: impl IntoIterator<Item = Holder>) {
        let socket = self.sockets.entry(key).or_default();
        for holder in holders {
            socket.holders.insert((holder.pid, holder.fd), holder.comm);
            self.by_pid.entry(holder.pid).or_default().insert(key);
        }
    }

    /// Gives `key` the holders the snapshot found for `inode`, if nothing claimed them yet.
    fn claim_unclaimed(&mut self, key: SockKey, inode: u64) {
        if inode != 0
            && let Some(holders) = self.unclaimed.remove(&inode)
        {
            self.add_holders(key, holders);
        }
    }

    /// Applies one event; a state change comes back as a [`Transition`].
    pub fn apply(&mut self, event: Event) -> Option<Transition> {
        self.note_changes(&event);
        match event {
            Event::Created(life) => {
                let socket = self.sockets.entry(SockKey::Cookie(life.cookie)).or_default();
                socket.created_ns = Some(life.ts_ns);
                socket.set_owner(Some(Owner::from(&life.task)), Some(life.ts_ns));
            }
            Event::Released(life) => {
                let key = SockKey::Cookie(life.cookie);
                if let Some(socket) = self.sockets.get_mut(&key) {
                    socket.released = true;
                    // The last file reference is gone, whoever held it.
                    let holders = std::mem::take(&mut socket.holders);
                    let udp = socket.facts.as_ref().is_some_and(|f| f.protocol == Protocol::Udp);
                    // Never connected, already closed, or UDP: no CLOSE transition follows.
                    if udp || matches!(socket.state, None | Some(TcpState::Close)) {
                        self.sockets.remove(&key);
                    }
                    self.forget_holders(key, holders.keys().map(|(pid, _)| *pid));
                }
            }
            Event::Accepted(fd) => {
                // accept(2) runs in the receiving process: from now on it owns the socket.
                // Its fd comes with the system call's return (a graft comes before: -1).
                let owner = Owner::from(&fd.task);
                if fd.fd >= 0 {
                    self.hold(&fd);
                } else {
                    self.learn(&fd);
                }
                if let Some(socket) = self.sockets.get_mut(&SockKey::Cookie(fd.cookie)) {
                    socket.set_owner(Some(owner), Some(fd.ts_ns));
                    if let Some(queue) =
                        socket.queued_on.take().and_then(|l| self.accept_queues.get_mut(&l))
                    {
                        queue.accepted += 1;
                        queue.queued = queue.queued.saturating_sub(1);
                    }
                }
            }
            Event::FdOpened(fd) => self.hold(&fd),
            Event::FdClosed(fd) => {
                let key = SockKey::Cookie(fd.cookie);
                if let Some(socket) = self.sockets.get_mut(&key) {
                    socket.holders.remove(&(fd.task.pid, fd.fd));
                    if !socket.holders.keys().any(|(pid, _)| *pid == fd.task.pid) {
                        self.forget_holders(key, [fd.task.pid]);
                    }
                }
            }
            Event::Addresses(fd) => {
                self.learn(&fd);
            }
            Event::Forked { parent, child_tgid, .. } => {
                let keys: Vec<SockKey> =
                    self.by_pid.get(&parent.pid).into_iter().flatten().copied().collect();
                for key in &keys {
                    if let Some(socket) = self.sockets.get_mut(key) {
                        let inherited: Vec<((u32, i32), Comm)> = socket
                            .holders
                            .of_pid(parent.pid)
                            .map(|((_, fd), comm)| ((child_tgid, *fd), comm.clone()))
                            .collect();
                        socket.holders.extend(inherited);
                    }
                }
                if !keys.is_empty() {
                    self.by_pid.entry(child_tgid).or_default().extend(keys);
                }
            }
            Event::Exec(task) => {
                for key in self.by_pid.get(&task.pid).into_iter().flatten() {
                    if let Some(socket) = self.sockets.get_mut(key) {
                        for comm in socket.holders.comms_of_pid_mut(task.pid) {
                            comm.clone_from(&task.comm);
                        }
                    }
                }
            }
            Event::Exit(task) => {
                for key in self.by_pid.remove(&task.pid).into_iter().flatten() {
                    if let Some(socket) = self.sockets.get_mut(&key) {
                        socket.holders.retain(|(pid, _), _| *pid != task.pid);
                    }
                }
            }
            Event::Reset { cookie, .. } => {
                if let Some(socket) = self.sockets.get_mut(&SockKey::Cookie(cookie)) {
                    socket.reset_in = socket.state;
                }
            }
            Event::State(change) if change.timewait.is_some() => {
                return self.enter_timewait(change);
            }
            Event::State(change) => return Some(self.apply_state(change)),
            Event::Retransmit(retransmit) => {
                self.retransmit(&retransmit);
            }
            // Joined to the child's LISTEN -> SYN_RECV before the table sees it (clones).
            Event::ChildOf { .. } => {}
        }
        None
    }

    /// Records `fd.task` holding `fd.fd`, and what the event says about the socket.
    fn hold(&mut self, fd: &FdSocket) {
        self.learn(fd);
        let holder = Holder {
            pid: fd.task.pid,
            comm: fd.task.comm.clone(),
            fd: fd.fd,
            start_time: None,
            cgroup_id: fd.task.cgroup,
        };
        self.add_holders(SockKey::Cookie(fd.cookie), [holder]);
    }

    /// Takes a socket's addresses (and, for UDP, its state) from an fd event.
    fn learn(&mut self, fd: &FdSocket) {
        let key = SockKey::Cookie(fd.cookie);
        self.claim_unclaimed(key, fd.inode);
        let socket = self.sockets.entry(key).or_default();
        let facts = socket.facts.get_or_insert(Facts {
            protocol: fd.protocol,
            family: fd.family,
            netns: fd.netns,
            local: fd.local,
            remote: fd.remote,
            inode: fd.inode,
            uid: None,
            v6only: false,
            scope: None,
            expires_ns: None,
        });
        // A connected UDP socket that connects again starts a new association, as a TCP
        // socket's new state would.
        let new_peer = facts.remote != fd.remote;
        facts.local = fd.local;
        facts.remote = fd.remote;
        facts.netns = fd.netns;
        if fd.inode != 0 {
            facts.inode = fd.inode;
        }
        if fd.protocol == Protocol::Udp
            && let Some(state) = fd.state
        {
            if socket.state != Some(state) || new_peer {
                socket.since_ns = Some(fd.ts_ns);
            }
            socket.state = Some(state);
        }
    }

    /// Drops `key` from the per-process index of processes that no longer hold it.
    fn forget_holders(&mut self, key: SockKey, pids: impl IntoIterator<Item = u32>) {
        for pid in pids {
            if let Some(keys) = self.by_pid.get_mut(&pid) {
                keys.remove(&key);
                if keys.is_empty() {
                    self.by_pid.remove(&pid);
                }
            }
        }
    }

    /// After an exec, keeps only the holders of `pid` whose fd still names the same socket
    /// inode in `fds` (fd -> socket inode, read from /proc/PID/fd): close-on-exec fds are
    /// closed by the kernel without a close() call.
    pub fn keep_open_fds(&mut self, pid: u32, fds: &HashMap<i32, u64>) {
        let keys: Vec<SockKey> = self.by_pid.get(&pid).into_iter().flatten().copied().collect();
        for key in keys {
            if let SockKey::Cookie(cookie) = key {
                self.mark_changed(cookie);
            }
            let Some(socket) = self.sockets.get_mut(&key) else { continue };
            let inode = socket.facts.as_ref().map_or(0, |f| f.inode);
            socket.holders.retain(|(holder, fd), _| *holder != pid || fds.get(fd) == Some(&inode));
            if !socket.holders.keys().any(|(holder, _)| *holder == pid) {
                self.forget_holders(key, [pid]);
            }
        }
    }

    /// Whether process `pid` holds the socket `cookie` through some fd.
    pub fn holds(&self, cookie: u64, pid: u32) -> bool {
        self.sockets
            .get(&SockKey::Cookie(cookie))
            .is_some_and(|s| s.holders.keys().any(|(holder, _)| *holder == pid))
    }

    /// Records what sock_diag says of a socket and no event carries: whether an IPv6 socket
    /// takes IPv4 too (IPV6_V6ONLY), and the interface it is bound to.
    pub fn learn_from_diag(&mut self, row: &SocketRow) {
        if let Some(facts) =
            self.sockets.get_mut(&SockKey::Cookie(row.cookie)).and_then(|s| s.facts.as_mut())
        {
            facts.v6only = row.v6only;
            facts.scope.clone_from(&row.scope);
        }
    }

    /// Every socket's holders by inode, listed or not: what a /proc scan would find.
    #[cfg(test)]
    fn holders_by_inode(&self) -> HashMap<u64, Vec<Holder>> {
        self.sockets
            .values()
            .filter_map(|s| {
                let inode = s.facts.as_ref()?.inode;
                let owners = s.holders.to_vec();
                (inode != 0 && !owners.is_empty()).then_some((inode, owners))
            })
            .collect()
    }

    /// How many sockets [`Table::rows_where`] lists, by protocol and state, without making the
    /// rows.
    pub fn counts(&self) -> HashMap<(Protocol, TcpState), u64> {
        let mut counts = HashMap::new();
        for (key, socket) in &self.sockets {
            if let (SockKey::Cookie(_), Some(facts), Some(state)) =
                (key, &socket.facts, socket.state)
                && is_listed(facts, state)
            {
                *counts.entry((facts.protocol, state)).or_default() += 1;
            }
        }
        counts
    }

    /// Every row [`Table::rows_where`] gives.
    #[cfg(test)]
    pub fn rows(&self, now_ns: u64) -> Vec<Row> {
        self.rows_where(now_ns, |_| true)
    }

    /// The sockets `ss -tuanp` would list, as of `now_ns` (TCP sockets in any state but
    /// CLOSE, bound UDP sockets), each with its holders and time in state: those whose socket
    /// `keep` keeps, asked before the row's owners are gathered.
    pub fn rows_where(&self, now_ns: u64, keep: impl Fn(&SocketRow) -> bool) -> Vec<Row> {
        let mut rows = Vec::new();
        for (key, socket) in &self.sockets {
            let Some(row) = self.socket_row(key, socket, now_ns).filter(|row| keep(row)) else {
                continue;
            };
            rows.push(self.with_owners(row, socket, now_ns));
        }
        rows
    }

    /// A listed socket's row, with its holders and time in state.
    fn row_of(&self, key: &SockKey, socket: &Socket, now_ns: u64) -> Option<Row> {
        let row = self.socket_row(key, socket, now_ns)?;
        Some(self.with_owners(row, socket, now_ns))
    }

    /// What sock_diag would say of a socket `ss -tuan` lists; None for one it does not list.
    fn socket_row(&self, key: &SockKey, socket: &Socket, now_ns: u64) -> Option<SocketRow> {
        let (SockKey::Cookie(cookie), Some(facts), Some(state)) =
            (key, &socket.facts, socket.state)
        else {
            return None;
        };
        is_listed(facts, state).then(|| SocketRow {
            netns: facts.netns,
            protocol: facts.protocol,
            family: facts.family,
            state,
            local: facts.local,
            remote: facts.remote,
            cookie: *cookie,
            inode: facts.inode,
            uid: facts.uid.unwrap_or(0),
            recv_q: 0,
            send_q: 0,
            timer: facts.expires_ns.map(|end| Timer {
                kind: TimerKind::Timewait,
                remaining_ms: (end.saturating_sub(now_ns) / 1_000_000) as u32,
            }),
            v6only: facts.v6only(),
            scope: facts.scope.clone(),
        })
    }

    fn with_owners(&self, row: SocketRow, socket: &Socket, now_ns: u64) -> Row {
        Row {
            // A timewait socket has no file: ss lists no process for it, even while the
            // full socket it replaced is still held (shut down, not yet closed).
            owners: if row.timer.is_some_and(|t| t.kind == TimerKind::Timewait) {
                Vec::new()
            } else {
                socket.holders.to_vec()
            },
            in_state_ns: socket.since_ns.map(|since| now_ns.saturating_sub(since)),
            owner_history: socket
                .owner_history()
                .map(|(at, owner)| (at.map(|at| now_ns.saturating_sub(at)), owner.clone()))
                .collect(),
            row,
        }
    }
}

/// Whether `ss -tuan` lists a socket: TCP in any state but CLOSE, UDP once bound.
fn is_listed(facts: &socket::Facts, state: TcpState) -> bool {
    match facts.protocol {
        Protocol::Tcp => state != TcpState::Close,
        Protocol::Udp => facts.local.1 != 0,
    }
}
