//! The pure, synchronous socket state: events and snapshot rows in, enriched transitions and
//! table rows out. No I/O.
//!
//! For each socket it keeps what the stream needs to say more than the kernel record does:
//! who owns the socket (not merely who was on the CPU), when it was created, and when it
//! entered its current state. Ownership follows DESIGN.md: the current task counts as owner
//! only for transitions that run inside the owner's own system call; every other transition
//! (softirq: handshake completion, peer FIN, RST, timers, loopback delivery) keeps the owner
//! already known. A passively opened socket inherits its listener's owner until accepted.
//!
//! For the agent's table it also keeps each socket's row (addresses, netns, inode) and every
//! (process, fd) holding it, as `ss -p` lists them: from the snapshot, then from socket(),
//! accept(), dup*(), close(), fork, exec and exit events.
use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use rustc_hash::{FxHashMap, FxHashSet};

use crate::{
    host::snapshot::{FdOwner, Protocol, SocketRow, Timer, TimerKind},
    kernel::events::{Event, Family, FdSocket, Retransmit, SockKey, StateChange, Task, TcpState},
};

/// A process that owns a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub comm: String,
}

impl From<&Task> for Owner {
    fn from(task: &Task) -> Self {
        Owner { pid: task.pid, comm: task.comm.clone() }
    }
}

/// A state change with what the table knows about its socket.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub change: StateChange,
    /// None when no transition or creation of this socket was seen in process context.
    pub owner: Option<Owner>,
    /// Time spent in `change.old`; for a socket's first transition out of CLOSE, the time
    /// since it was created. None when netwatch did not see the old state begin.
    pub in_old_state_ns: Option<u64>,
    /// At CLOSE: how long the socket lived, when netwatch saw it born (created, or cloned
    /// from its listener).
    pub lifespan_ns: Option<u64>,
    /// At CLOSE: why the connection failed, if it did.
    pub failure: Option<Failure>,
}

/// How a connection ended badly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// A RST answered the SYN: nothing listens there.
    Refused,
    /// The kernel gave up: the SYN, or later data or keepalives, went unanswered.
    Timeout,
    /// The owner closed the socket while it was still connecting.
    Aborted,
    /// The peer's RST ended the connection.
    Reset,
    /// This host reset an open connection: its owner closed it with unread data or with
    /// SO_LINGER 0 (the kernel sends a RST instead of a FIN).
    ResetSent,
}

impl Failure {
    pub fn name(self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::Timeout => "timeout",
            Failure::Aborted => "aborted",
            Failure::Reset => "reset",
            Failure::ResetSent => "reset_sent",
        }
    }
}

/// What a table row needs beyond the state.
#[derive(Clone, Debug, PartialEq)]
struct Facts {
    protocol: Protocol,
    family: Family,
    netns: u32,
    local: (IpAddr, u16),
    remote: (IpAddr, u16),
    inode: u64,
    uid: Option<u32>,
    v6only: bool,
    /// A TIME_WAIT socket's end, in CLOCK_MONOTONIC ns.
    expires_ns: Option<u64>,
}

#[derive(Debug, Default)]
struct Socket {
    created_ns: Option<u64>,
    state: Option<TcpState>,
    /// When `state` began; None for a state found in the snapshot.
    since_ns: Option<u64>,
    owner: Option<Owner>,
    /// The last file reference is gone; the socket disappears at its CLOSE transition.
    released: bool,
    facts: Option<Facts>,
    /// Every (pid, fd) holding the socket, with the process's command name.
    holders: Holders,
    /// The state the socket was in when it received a RST.
    reset_in: Option<TcpState>,
    /// The owners the socket had, oldest first, with when each took over (None: found in the
    /// snapshot); at most OWNER_HISTORY entries.
    owner_history: VecDeque<(Option<u64>, Owner)>,
    /// A passively opened socket not accepted yet: the listener whose accept queue holds it.
    queued_on: Option<SockKey>,
    /// Segments retransmitted (`tcp_retransmit_skb`); for a listener, SYN-ACKs.
    retransmits: u64,
}

/// The (pid, fd) pairs holding a socket, with each process's command name: a sorted vector,
/// since a socket has one or two holders and a map's node would cost ten times the memory
/// (the table keeps one per socket on the host).
#[derive(Debug, Default)]
struct Holders(Vec<((u32, i32), String)>);

impl Holders {
    fn insert(&mut self, key: (u32, i32), comm: String) {
        match self.0.binary_search_by_key(&key, |(k, _)| *k) {
            Ok(at) => self.0[at].1 = comm,
            Err(at) => {
                self.0.reserve_exact(1);
                self.0.insert(at, (key, comm));
            }
        }
    }

    fn remove(&mut self, key: &(u32, i32)) {
        if let Ok(at) = self.0.binary_search_by_key(key, |(k, _)| *k) {
            self.0.remove(at);
        }
    }

    fn extend(&mut self, holders: impl IntoIterator<Item = ((u32, i32), String)>) {
        for (key, comm) in holders {
            self.insert(key, comm);
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&(u32, i32), &String) -> bool) {
        self.0.retain(|(key, comm)| keep(key, comm));
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = (&(u32, i32), &String)> {
        self.0.iter().map(|(key, comm)| (key, comm))
    }

    fn keys(&self) -> impl Iterator<Item = &(u32, i32)> {
        self.0.iter().map(|(key, _)| key)
    }

    fn of_pid(&self, pid: u32) -> impl Iterator<Item = (&(u32, i32), &String)> {
        self.iter().filter(move |((holder, _), _)| *holder == pid)
    }

    fn comms_of_pid_mut(&mut self, pid: u32) -> impl Iterator<Item = &mut String> {
        self.0.iter_mut().filter(move |((holder, _), _)| *holder == pid).map(|(_, comm)| comm)
    }
}

/// How many owners a socket remembers.
const OWNER_HISTORY: usize = 8;

impl Socket {
    fn set_owner(&mut self, owner: Option<Owner>, at_ns: Option<u64>) {
        if let Some(new) = &owner
            && self.owner.as_ref() != Some(new)
        {
            if self.owner_history.len() == OWNER_HISTORY {
                self.owner_history.pop_front();
            }
            // Most sockets only ever have one owner: grow one entry at a time.
            self.owner_history.reserve_exact(1);
            self.owner_history.push_back((at_ns, new.clone()));
        }
        self.owner = owner;
    }
}

/// A socket as the table lists it: `ss`'s row, every holder, and the time in its state.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub row: SocketRow,
    pub owners: Vec<FdOwner>,
    pub in_state_ns: Option<u64>,
    /// The owners the socket had, oldest first, with how long ago each took over.
    pub owner_history: Vec<(Option<u64>, Owner)>,
}

/// A timewait socket to look up again: its cookie and where to find it.
#[derive(Clone, Debug, PartialEq)]
pub struct TimewaitSocket {
    pub cookie: u64,
    pub netns: u32,
    pub family: Family,
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
}

/// Listeners by (netns, local port, local address).
type ListenerKey = (u32, u16, IpAddr);

/// What the table counts for a listening socket since netwatch saw it listen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AcceptQueue {
    /// Connections whose handshake completed (the kernel made their socket).
    pub handshakes: u64,
    /// Of those, taken by accept(2).
    pub accepted: u64,
    /// Established connections waiting for accept(2) now: the kernel's accept queue.
    pub queued: u32,
    /// The most `queued` has been.
    pub peak_queued: u32,
    /// SYN-ACKs sent again to half-open connections that did not complete the handshake.
    pub synack_retransmits: u64,
}

/// A listener as [`Table::listeners`] reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct Listener {
    pub cookie: u64,
    pub netns: u32,
    pub local: (IpAddr, u16),
    pub owner: Option<Owner>,
    pub queue: AcceptQueue,
}

/// What the table knows about a retransmitting socket, for its record.
#[derive(Clone, Debug, PartialEq)]
pub struct RetransmitSeen {
    pub owner: Option<Owner>,
    pub state: Option<TcpState>,
    /// Retransmits of this socket seen so far, this one included.
    pub count: u64,
}

/// Sockets that reached CLOSE but may still be reused (connect again) are kept for at most
/// this many; beyond it the oldest are forgotten.
const CLOSED_KEPT: usize = 4096;

#[derive(Debug, Default)]
pub struct Table {
    // Fx hashing: the keys are kernel cookies and pids, which no one outside chooses, and
    // SipHash was a tenth of the agent's time under load (cargo xtask bench, perf).
    sockets: FxHashMap<SockKey, Socket>,
    /// Each listening socket's key and owner, to find the listener of a new passive socket.
    listeners: HashMap<ListenerKey, (SockKey, Option<Owner>)>,
    /// Accept-queue counts, by listening socket.
    accept_queues: FxHashMap<SockKey, AcceptQueue>,
    closed: VecDeque<SockKey>,
    /// Sockets each process holds, for fork, exec and exit.
    by_pid: FxHashMap<u32, FxHashSet<SockKey>>,
    /// Holders the snapshot found for sockets it did not list (an unbound UDP socket, a TCP
    /// socket not yet connected), by inode: claimed when an event names that inode.
    unclaimed: HashMap<u64, Vec<FdOwner>>,
}

/// Transitions that run in the system call of the process that owns the socket.
fn runs_in_owner_syscall(old: TcpState, new: TcpState) -> bool {
    use TcpState::*;
    matches!(
        (old, new),
        (Close, SynSent) | (Close, Listen) | (Listen, Close) | (_, FinWait1) | (CloseWait, LastAck)
    )
}

/// Closing transitions after which the kernel may keep a timewait socket for the 4-tuple.
pub fn may_leave_timewait(change: &StateChange) -> bool {
    use TcpState::*;
    change.new == Close && matches!(change.old, FinWait1 | FinWait2 | Closing)
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
    pub fn seed(&mut self, rows: &[SocketRow], owners: &HashMap<u64, Vec<FdOwner>>, now_ns: u64) {
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
            if let Some((listener, _)) = self.listener_of(row.netns, row.local) {
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

    /// Adds a socket found by a targeted lookup (a timewait socket after its full socket
    /// closed) or by the snapshot.
    pub fn insert_row(&mut self, row: &SocketRow, holders: Option<&Vec<FdOwner>>, now_ns: u64) {
        let owner = holders
            .and_then(|list| list.first())
            .map(|o| Owner { pid: o.pid, comm: o.comm.clone() });
        let key = SockKey::Cookie(row.cookie);
        if row.protocol == Protocol::Tcp && row.state == TcpState::Listen {
            self.listeners.insert((row.netns, row.local.1, row.local.0), (key, owner.clone()));
            self.accept_queues.entry(key).or_default();
        }
        let socket = self.sockets.entry(key).or_default();
        socket.state = Some(row.state);
        socket.since_ns = None;
        socket.set_owner(owner, None);
        socket.facts = Some(Facts {
            protocol: row.protocol,
            family: row.family,
            netns: row.netns,
            local: row.local,
            remote: row.remote,
            inode: row.inode,
            uid: Some(row.uid),
            v6only: row.v6only,
            expires_ns: row
                .timer
                .filter(|t| t.kind == TimerKind::Timewait)
                .map(|t| now_ns + u64::from(t.remaining_ms) * 1_000_000),
        });
        self.add_holders(key, holders.into_iter().flatten().cloned());
    }

    /// Records processes holding the socket `key` through their fds.
    fn add_holders(&mut self, key: SockKey, holders: impl IntoIterator<Item = FdOwner>) {
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
                let owner = Owner::from(&fd.task);
                self.hold(&fd);
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
                        let inherited: Vec<((u32, i32), String)> = socket
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
            Event::State(change) => return Some(self.apply_state(change)),
            Event::Retransmit(retransmit) => {
                self.retransmit(&retransmit);
            }
        }
        None
    }

    /// Counts a retransmission against its connection (or, for a SYN-ACK, its listener).
    pub fn retransmit(&mut self, retransmit: &Retransmit) -> RetransmitSeen {
        let key = SockKey::Cookie(retransmit.cookie);
        if retransmit.synack
            && let Some(queue) = self.accept_queues.get_mut(&key)
        {
            queue.synack_retransmits += 1;
        }
        match self.sockets.get_mut(&key) {
            Some(socket) => {
                socket.retransmits += 1;
                RetransmitSeen {
                    owner: socket.owner.clone(),
                    state: socket.state,
                    count: socket.retransmits,
                }
            }
            None => RetransmitSeen { owner: None, state: None, count: 1 },
        }
    }

    /// Puts the passive socket `child` in `listener`'s accept queue.
    fn enqueue(&mut self, child: SockKey, listener: SockKey) {
        let Some(queue) = self.accept_queues.get_mut(&listener) else { return };
        let socket = self.sockets.entry(child).or_default();
        if socket.queued_on.is_none() {
            socket.queued_on = Some(listener);
            queue.queued += 1;
            queue.peak_queued = queue.peak_queued.max(queue.queued);
        }
    }

    /// Every listening socket with its accept-queue counts.
    pub fn listeners(&self) -> Vec<Listener> {
        let mut listeners: Vec<Listener> = self
            .listeners
            .iter()
            .filter_map(|(&(netns, port, addr), (key, owner))| {
                let SockKey::Cookie(cookie) = *key else { return None };
                Some(Listener {
                    cookie,
                    netns,
                    local: (addr, port),
                    owner: owner.clone(),
                    queue: self.accept_queues.get(key).copied().unwrap_or_default(),
                })
            })
            .collect();
        listeners.sort_by_key(|l| (l.netns, l.local.1, l.local.0));
        listeners
    }

    /// Takes the counts a rebuilt table cannot know from `old`, the table it replaces:
    /// accept-queue totals of listeners that are still there.
    pub fn keep_counts_of(&mut self, old: &Table) {
        for (key, queue) in &mut self.accept_queues {
            if let Some(before) = old.accept_queues.get(key) {
                queue.handshakes += before.handshakes;
                queue.accepted += before.accepted;
                queue.synack_retransmits += before.synack_retransmits;
                queue.peak_queued = queue.peak_queued.max(before.peak_queued);
            }
        }
    }

    /// Records `fd.task` holding `fd.fd`, and what the event says about the socket.
    fn hold(&mut self, fd: &FdSocket) {
        self.learn(fd);
        let holder =
            FdOwner { pid: fd.task.pid, comm: fd.task.comm.clone(), fd: fd.fd, start_time: None };
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
            expires_ns: None,
        });
        facts.local = fd.local;
        facts.remote = fd.remote;
        facts.netns = fd.netns;
        if fd.inode != 0 {
            facts.inode = fd.inode;
        }
        if fd.protocol == Protocol::Udp
            && let Some(state) = fd.state
        {
            if socket.state != Some(state) {
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

    fn apply_state(&mut self, change: StateChange) -> Transition {
        self.claim_unclaimed(change.key, change.inode);
        let passive = change.old == TcpState::Listen && change.new == TcpState::SynRecv;
        let listener = passive.then(|| self.listener_of(change.netns, change.local)).flatten();
        if let Some((listener, _)) = &listener {
            if let Some(queue) = self.accept_queues.get_mut(listener) {
                queue.handshakes += 1;
            }
            self.enqueue(change.key, *listener);
        }
        let listener_owner = listener.and_then(|(_, owner)| owner);
        let socket = self.sockets.entry(change.key).or_default();

        if change.old == TcpState::Listen && change.new == TcpState::SynRecv {
            socket.created_ns.get_or_insert(change.ts_ns);
        }
        let lifespan_ns = (change.new == TcpState::Close)
            .then(|| socket.created_ns.map(|born| change.ts_ns.saturating_sub(born)))
            .flatten();
        // An open connection goes straight to CLOSE only when a RST ends it (received: a
        // tcp_receive_reset event came first; sent: close() released it first) or when the
        // kernel gives up on it (still held).
        let open = matches!(change.old, TcpState::Established | TcpState::CloseWait);
        let failure = match (change.new, socket.reset_in, change.old) {
            (TcpState::Close, Some(TcpState::SynSent), _) => Some(Failure::Refused),
            (TcpState::Close, Some(_), _) => Some(Failure::Reset),
            // close() releases the socket before its CLOSE transition; a timeout does not.
            (TcpState::Close, None, TcpState::SynSent) if socket.released => Some(Failure::Aborted),
            (TcpState::Close, None, TcpState::SynSent) => Some(Failure::Timeout),
            (TcpState::Close, None, _) if open && socket.released => Some(Failure::ResetSent),
            (TcpState::Close, None, _) if open => Some(Failure::Timeout),
            _ => None,
        };
        if change.new == TcpState::Close {
            socket.reset_in = None;
        }
        let in_old_state_ns = match (socket.state, socket.since_ns) {
            (Some(state), Some(since)) if state == change.old => {
                Some(change.ts_ns.saturating_sub(since))
            }
            (None, _) if change.old == TcpState::Close => {
                socket.created_ns.map(|created| change.ts_ns.saturating_sub(created))
            }
            _ => None,
        };
        if runs_in_owner_syscall(change.old, change.new) {
            socket.set_owner(Some(Owner::from(&change.task)), Some(change.ts_ns));
        } else if socket.owner.is_none() {
            socket.set_owner(listener_owner, Some(change.ts_ns));
        }
        socket.state = Some(change.new);
        socket.since_ns = Some(change.ts_ns);
        let facts = socket.facts.get_or_insert(Facts {
            protocol: Protocol::Tcp,
            family: change.family,
            netns: change.netns,
            local: change.local,
            remote: change.remote,
            inode: 0,
            uid: None,
            v6only: false,
            expires_ns: None,
        });
        // CLOSE->SYN_SENT held back for the port reports it; CLOSE reads 0 for it: keep the
        // best the socket has shown.
        if change.local.1 != 0 {
            facts.local = change.local;
        }
        facts.remote = change.remote;
        facts.netns = change.netns;
        if change.inode != 0 {
            facts.inode = change.inode;
        }
        let owner = socket.owner.clone();
        let released = socket.released;

        let listener = (change.netns, change.local.1, change.local.0);
        match (change.old, change.new) {
            (_, TcpState::Listen) => {
                self.listeners.insert(listener, (change.key, owner.clone()));
                self.accept_queues.entry(change.key).or_default();
            }
            // LISTEN -> SYN_RECV is a new child socket, not the listener changing.
            (TcpState::Listen, TcpState::Close) => {
                if self.listeners.get(&listener).is_some_and(|(key, _)| *key == change.key) {
                    self.listeners.remove(&listener);
                }
                self.accept_queues.remove(&change.key);
            }
            _ => {}
        }
        if change.new == TcpState::Close {
            // Without a cookie there is no release event to wait for; a reused address is a
            // new socket anyway.
            if released || matches!(change.key, SockKey::Addr { .. }) {
                if let Some(socket) = self.sockets.remove(&change.key) {
                    let pids: Vec<u32> = socket.holders.keys().map(|(pid, _)| *pid).collect();
                    self.forget_holders(change.key, pids);
                }
            } else {
                self.remember_closed(change.key);
            }
        }
        Transition { change, owner, in_old_state_ns, lifespan_ns, failure }
    }

    /// The owner of the listener a passively opened socket came from: the exact local address
    /// first, then a wildcard listener of either family (a `[::]` listener takes IPv4 too).
    fn listener_of(
        &self,
        netns: u32,
        (addr, port): (IpAddr, u16),
    ) -> Option<(SockKey, Option<Owner>)> {
        [addr, IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)]
            .iter()
            .find_map(|a| self.listeners.get(&(netns, port, *a)))
            .cloned()
    }

    fn remember_closed(&mut self, key: SockKey) {
        self.closed.push_back(key);
        while self.closed.len() > CLOSED_KEPT {
            let Some(oldest) = self.closed.pop_front() else {
                break;
            };
            if matches!(self.sockets.get(&oldest), Some(s) if s.state == Some(TcpState::Close)) {
                self.sockets.remove(&oldest);
            }
        }
    }

    /// After an exec, keeps only the holders of `pid` whose fd still names the same socket
    /// inode in `fds` (fd -> socket inode, read from /proc/PID/fd): close-on-exec fds are
    /// closed by the kernel without a close() call.
    pub fn keep_open_fds(&mut self, pid: u32, fds: &HashMap<i32, u64>) {
        let keys: Vec<SockKey> = self.by_pid.get(&pid).into_iter().flatten().copied().collect();
        for key in keys {
            let Some(socket) = self.sockets.get_mut(&key) else { continue };
            let inode = socket.facts.as_ref().map_or(0, |f| f.inode);
            socket.holders.retain(|(holder, fd), _| *holder != pid || fds.get(fd) == Some(&inode));
            if !socket.holders.keys().any(|(holder, _)| *holder == pid) {
                self.forget_holders(key, [pid]);
            }
        }
    }

    /// Every socket's holders by inode, listed or not: what a /proc scan would find.
    #[cfg(test)]
    fn holders_by_inode(&self) -> HashMap<u64, Vec<FdOwner>> {
        self.sockets
            .values()
            .filter_map(|s| {
                let inode = s.facts.as_ref()?.inode;
                let owners: Vec<FdOwner> = s
                    .holders
                    .iter()
                    .map(|((pid, fd), comm)| FdOwner {
                        pid: *pid,
                        comm: comm.clone(),
                        fd: *fd,
                        start_time: None,
                    })
                    .collect();
                (inode != 0 && !owners.is_empty()).then_some((inode, owners))
            })
            .collect()
    }

    /// Timewait sockets whose substate is FIN_WAIT2 (orphans whose peer has not closed yet).
    pub fn timewait_in_fin_wait2(&self) -> Vec<TimewaitSocket> {
        self.sockets
            .iter()
            .filter_map(|(key, socket)| {
                let (SockKey::Cookie(cookie), Some(facts)) = (key, &socket.facts) else {
                    return None;
                };
                (socket.state == Some(TcpState::FinWait2) && facts.expires_ns.is_some()).then_some(
                    TimewaitSocket {
                        cookie: *cookie,
                        netns: facts.netns,
                        family: facts.family,
                        local: facts.local,
                        remote: facts.remote,
                    },
                )
            })
            .collect()
    }

    /// Drops a socket that is known to be gone.
    pub fn forget(&mut self, cookie: u64) {
        self.sockets.remove(&SockKey::Cookie(cookie));
    }

    /// Network namespaces the table has sockets in.
    pub fn namespaces(&self) -> HashSet<u32> {
        self.sockets.values().filter_map(|s| s.facts.as_ref().map(|f| f.netns)).collect()
    }

    /// Forgets the sockets of a network namespace that is gone. The kernel destroys its
    /// timewait, orphaned and not yet accepted sockets with it and reports none of them;
    /// sockets some process holds keep a namespace alive, so they stay.
    pub fn forget_namespace(&mut self, netns: u32) {
        self.sockets.retain(|_, socket| {
            !socket.holders.is_empty() || socket.facts.as_ref().is_none_or(|f| f.netns != netns)
        });
    }

    /// Forgets timewait sockets whose time is up.
    pub fn expire(&mut self, now_ns: u64) {
        self.sockets.retain(|_, socket| {
            socket.facts.as_ref().and_then(|f| f.expires_ns).is_none_or(|end| end > now_ns)
        });
    }

    /// The sockets `ss -tuanp` would list, as of `now_ns`: TCP sockets in any state but CLOSE,
    /// bound UDP sockets, each with its holders and time in state.
    pub fn rows(&self, now_ns: u64) -> Vec<Row> {
        let mut rows = Vec::new();
        for (key, socket) in &self.sockets {
            let (SockKey::Cookie(cookie), Some(facts), Some(state)) =
                (key, &socket.facts, socket.state)
            else {
                continue;
            };
            let listed = match facts.protocol {
                Protocol::Tcp => state != TcpState::Close,
                Protocol::Udp => facts.local.1 != 0,
            };
            if !listed || facts.expires_ns.is_some_and(|end| end <= now_ns) {
                continue;
            }
            rows.push(Row {
                row: SocketRow {
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
                    v6only: facts.v6only,
                },
                owners: socket
                    .holders
                    .iter()
                    .map(|((pid, fd), comm)| FdOwner {
                        pid: *pid,
                        comm: comm.clone(),
                        fd: *fd,
                        start_time: None,
                    })
                    .collect(),
                in_state_ns: socket.since_ns.map(|since| now_ns.saturating_sub(since)),
                owner_history: socket
                    .owner_history
                    .iter()
                    .map(|(at, owner)| (at.map(|at| now_ns.saturating_sub(at)), owner.clone()))
                    .collect(),
            });
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::events::{Family, SockLife, StateSource};
    use TcpState::*;
    use std::collections::HashMap;

    fn task(pid: u32, comm: &str) -> Task {
        Task { pid, tid: pid, comm: comm.into() }
    }

    fn change(cookie: u64, ts_ns: u64, old: TcpState, new: TcpState, on_cpu: Task) -> Event {
        Event::State(StateChange {
            ts_ns,
            source: StateSource::TpBtf,
            key: SockKey::Cookie(cookie),
            cookie: Some(cookie),
            skaddr: 0,
            inode: 0,
            netns: 1,
            family: Family::Ipv4,
            local: (IpAddr::V4(Ipv4Addr::LOCALHOST), 8080),
            remote: (IpAddr::V4(Ipv4Addr::LOCALHOST), 40000),
            old,
            new,
            task: on_cpu,
            deferred_connect: false,
            totals: None,
        })
    }

    fn created(cookie: u64, ts_ns: u64, by: Task) -> Event {
        Event::Created(SockLife { ts_ns, cookie, task: by })
    }

    fn released(cookie: u64, ts_ns: u64) -> Event {
        Event::Released(SockLife { ts_ns, cookie, task: task(1, "x") })
    }

    #[test]
    fn first_transition_counts_from_creation() {
        let mut table = Table::new();
        assert_eq!(table.apply(created(1, 1_000, task(10, "curl"))), None);
        let t = table.apply(change(1, 4_000, Close, SynSent, task(10, "curl"))).unwrap();
        assert_eq!(t.in_old_state_ns, Some(3_000));
        let t = table.apply(change(1, 9_000, SynSent, Established, task(0, "swapper/1"))).unwrap();
        assert_eq!(t.in_old_state_ns, Some(5_000));
        assert_eq!(t.owner, Some(Owner { pid: 10, comm: "curl".into() }));
    }

    #[test]
    fn softirq_task_never_becomes_owner() {
        let mut table = Table::new();
        // Seen mid-life: no owner known, and the on-CPU task must not be taken as one.
        let t = table.apply(change(2, 10, Established, CloseWait, task(99, "peer"))).unwrap();
        assert_eq!(t.owner, None);
        assert_eq!(t.in_old_state_ns, None, "did not see ESTABLISHED begin");
        // close() by the owner names it.
        let t = table.apply(change(2, 20, CloseWait, LastAck, task(7, "server"))).unwrap();
        assert_eq!(t.owner, Some(Owner { pid: 7, comm: "server".into() }));
        assert_eq!(t.in_old_state_ns, Some(10));
        let t = table.apply(change(2, 30, LastAck, Close, task(0, "swapper/0"))).unwrap();
        assert_eq!(t.owner, Some(Owner { pid: 7, comm: "server".into() }));
    }

    #[test]
    fn passive_socket_inherits_the_listener_owner() {
        let mut table = Table::new();
        table.apply(created(5, 0, task(7, "server")));
        let t = table.apply(change(5, 100, Close, Listen, task(7, "server"))).unwrap();
        assert_eq!(t.in_old_state_ns, Some(100));
        // The child is cloned in softirq while the client is on the CPU.
        let t = table.apply(change(6, 200, Listen, SynRecv, task(8, "client"))).unwrap();
        assert_eq!(t.owner, Some(Owner { pid: 7, comm: "server".into() }));
        assert_eq!(t.in_old_state_ns, None, "the child never was in LISTEN itself");
        let t = table.apply(change(6, 250, SynRecv, Established, task(8, "client"))).unwrap();
        assert_eq!(t.owner, Some(Owner { pid: 7, comm: "server".into() }));
        assert_eq!(t.in_old_state_ns, Some(50));
    }

    #[test]
    fn the_accepting_process_takes_over_from_the_listener() {
        let mut table = Table::new();
        table.apply(change(5, 100, Close, Listen, task(7, "master")));
        table.apply(change(6, 200, Listen, SynRecv, task(8, "client")));
        table.apply(change(6, 250, SynRecv, Established, task(8, "client")));
        assert_eq!(
            table.apply(Event::Accepted(fd_event(6, 9, task(70, "worker"), Protocol::Tcp))),
            None
        );
        let t = table.apply(change(6, 400, Established, CloseWait, task(8, "client"))).unwrap();
        assert_eq!(t.owner, Some(Owner { pid: 70, comm: "worker".into() }));
    }

    fn fd_event(cookie: u64, fd: i32, by: Task, protocol: Protocol) -> FdSocket {
        FdSocket {
            ts_ns: 1,
            cookie,
            fd,
            inode: 1000 + cookie,
            task: by,
            protocol,
            family: Family::Ipv4,
            netns: 1,
            state: Some(if protocol == Protocol::Udp { Close } else { Established }),
            local: (IpAddr::V4(Ipv4Addr::LOCALHOST), 5353),
            remote: (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        }
    }

    fn holders(table: &Table, cookie: u64) -> Vec<(u32, i32, String)> {
        let rows = table.rows(0);
        let row = rows.iter().find(|r| r.row.cookie == cookie).expect("listed");
        row.owners.iter().map(|o| (o.pid, o.fd, o.comm.clone())).collect()
    }

    #[test]
    fn holders_follow_fds_across_dup_fork_exec_close_and_exit() {
        let mut table = Table::new();
        let udp = |fd, by| fd_event(1, fd, by, Protocol::Udp);
        table.apply(Event::FdOpened(udp(3, task(10, "app"))));
        table.apply(Event::FdOpened(udp(4, task(10, "app")))); // dup
        table.apply(Event::Forked { ts_ns: 2, parent: task(10, "app"), child_tgid: 11 });
        let expected = |list: &[(u32, i32, &str)]| {
            list.iter().map(|(p, f, c)| (*p, *f, c.to_string())).collect::<Vec<_>>()
        };
        assert_eq!(
            holders(&table, 1),
            expected(&[(10, 3, "app"), (10, 4, "app"), (11, 3, "app"), (11, 4, "app")])
        );
        table.apply(Event::Exec(task(11, "helper")));
        table.apply(Event::FdClosed(udp(4, task(10, "app"))));
        assert_eq!(
            holders(&table, 1),
            expected(&[(10, 3, "app"), (11, 3, "helper"), (11, 4, "helper")])
        );
        // The exec closed fd 4 (close-on-exec); fd 3 is still the same socket.
        table.keep_open_fds(11, &HashMap::from([(3, 1001), (4, 7777)]));
        assert_eq!(holders(&table, 1), expected(&[(10, 3, "app"), (11, 3, "helper")]));
        table.apply(Event::Exit(task(11, "helper")));
        assert_eq!(holders(&table, 1), expected(&[(10, 3, "app")]));
        // A fork after the exit does not bring the dead child's fds back.
        table.apply(Event::Forked { ts_ns: 3, parent: task(10, "app"), child_tgid: 12 });
        assert_eq!(holders(&table, 1), expected(&[(10, 3, "app"), (12, 3, "app")]));
        table.apply(released(1, 9));
        assert!(table.is_empty() && table.by_pid.is_empty(), "released UDP sockets leave no trace");
    }

    #[test]
    fn udp_rows_appear_once_bound_and_follow_connect() {
        let mut table = Table::new();
        let mut unbound = fd_event(2, 5, task(20, "dig"), Protocol::Udp);
        unbound.local.1 = 0;
        table.apply(Event::FdOpened(unbound.clone()));
        assert!(table.rows(0).is_empty(), "ss lists no unbound UDP socket");
        let mut connected = unbound;
        connected.local.1 = 40000;
        connected.remote = (IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53)), 53);
        connected.state = Some(Established);
        table.apply(Event::Addresses(connected));
        let rows = table.rows(0);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].row.state, rows[0].row.local.1, rows[0].row.remote.1),
            (Established, 40000, 53)
        );
        assert_eq!(rows[0].owners[0].pid, 20);
    }

    #[test]
    fn timewait_rows_expire() {
        let mut table = Table::new();
        let mut tw = row(9, TimeWait, 5000, 0);
        tw.timer = Some(Timer { kind: TimerKind::Timewait, remaining_ms: 60_000 });
        table.insert_row(&tw, None, 1_000);
        assert_eq!(table.rows(30_000_001_000)[0].row.timer.unwrap().remaining_ms, 30_000);
        assert!(table.rows(60_000_001_000).is_empty(), "gone at its end");
        table.expire(60_000_001_000);
        assert!(table.is_empty());
    }

    #[test]
    fn closed_tcp_sockets_are_not_listed_but_keep_their_holders() {
        let mut table = Table::new();
        table.apply(Event::FdOpened(fd_event(3, 7, task(30, "curl"), Protocol::Tcp)));
        table.apply(change(3, 10, Close, SynSent, task(30, "curl")));
        assert_eq!(table.rows(20)[0].in_state_ns, Some(10));
        table.apply(change(3, 30, SynSent, Close, task(0, "swapper/0")));
        assert!(table.rows(40).is_empty(), "a refused socket is not hashed: ss does not list it");
        table.apply(change(3, 50, Close, SynSent, task(30, "curl")));
        assert_eq!(holders(&table, 3), [(30, 7, "curl".to_string())]);
    }

    fn row(cookie: u64, state: TcpState, local_port: u16, inode: u64) -> SocketRow {
        SocketRow {
            netns: 1,
            protocol: Protocol::Tcp,
            family: Family::Ipv4,
            state,
            local: (IpAddr::V4(Ipv4Addr::LOCALHOST), local_port),
            remote: (IpAddr::V4(Ipv4Addr::LOCALHOST), 40000),
            cookie,
            inode,
            uid: 0,
            recv_q: 0,
            send_q: 0,
            timer: None,
            v6only: false,
        }
    }

    #[test]
    fn snapshot_seeds_owners_and_listeners_but_not_state_times() {
        let mut table = Table::new();
        let holder =
            |pid, comm: &str| FdOwner { pid, comm: comm.into(), fd: 3, start_time: Some(1) };
        let owners = HashMap::from([
            (10, vec![holder(7, "nginx"), holder(8, "nginx")]),
            (11, vec![holder(9, "app")]),
        ]);
        table.seed(&[row(1, Established, 5000, 11), row(2, Listen, 8080, 10)], &owners, 0);
        // A transition out of a snapshot state: owner known, time in state not.
        let t = table.apply(change(1, 50, Established, FinWait1, task(9, "app"))).unwrap();
        assert_eq!((t.owner.unwrap().pid, t.in_old_state_ns), (9, None));
        let t = table.apply(change(1, 70, FinWait1, FinWait2, task(0, "swapper/0"))).unwrap();
        assert_eq!(t.in_old_state_ns, Some(20));
        // A new connection to the seeded listener belongs to its first holder.
        let t = table.apply(change(3, 100, Listen, SynRecv, task(55, "client"))).unwrap();
        assert_eq!(t.owner, Some(Owner { pid: 7, comm: "nginx".into() }));
    }

    #[test]
    fn queued_events_win_over_the_snapshot() {
        let mut table = Table::new();
        // The snapshot saw the socket ESTABLISHED; the queue holds its earlier transitions
        // and the close that happened while the snapshot was being taken.
        table.seed(&[row(1, Established, 5000, 0)], &HashMap::new(), 0);
        table.apply(change(1, 10, Close, SynSent, task(4, "curl")));
        table.apply(change(1, 20, SynSent, Established, task(0, "swapper/0")));
        table.apply(change(1, 30, Established, Close, task(4, "curl")));
        table.apply(released(1, 40));
        assert!(table.is_empty(), "a socket closed during the snapshot is not resurrected");
    }

    #[test]
    fn owner_history_keeps_each_takeover() {
        let mut table = Table::new();
        table.apply(change(5, 100, Close, Listen, task(7, "master")));
        table.apply(change(6, 200, Listen, SynRecv, task(8, "client")));
        table.apply(Event::Accepted(fd_event(6, 9, task(70, "worker"), Protocol::Tcp)));
        let rows = table.rows(1_000);
        let child = rows.iter().find(|r| r.row.cookie == 6).unwrap();
        let history: Vec<(Option<u64>, u32)> =
            child.owner_history.iter().map(|(ago, o)| (*ago, o.pid)).collect();
        assert_eq!(history, [(Some(800), 7), (Some(999), 70)]);
    }

    #[test]
    fn failures_are_classified_at_close() {
        let failure = |events: Vec<Event>| {
            let mut table = Table::new();
            events.into_iter().filter_map(|e| table.apply(e)).last().and_then(|t| t.failure)
        };
        let reset = |cookie| Event::Reset { ts_ns: 0, cookie };
        let syn = |c| change(c, 1, Close, SynSent, task(1, "app"));
        assert_eq!(
            failure(vec![syn(1), reset(1), change(1, 2, SynSent, Close, task(0, "swapper/0"))]),
            Some(Failure::Refused)
        );
        assert_eq!(
            failure(vec![syn(2), change(2, 2, SynSent, Close, task(0, "swapper/0"))]),
            Some(Failure::Timeout)
        );
        assert_eq!(
            failure(vec![syn(3), released(3, 2), change(3, 3, SynSent, Close, task(1, "app"))]),
            Some(Failure::Aborted)
        );
        let established = change(4, 2, SynSent, Established, task(0, "swapper/0"));
        assert_eq!(
            failure(vec![
                syn(4),
                established.clone(),
                reset(4),
                change(4, 3, Established, Close, task(0, "x"))
            ]),
            Some(Failure::Reset)
        );
        let fin = change(4, 3, Established, FinWait1, task(1, "app"));
        assert_eq!(failure(vec![syn(4), established.clone(), fin.clone()]), None, "not at CLOSE");
        let fin_close = change(4, 4, FinWait2, Close, task(0, "x"));
        assert_eq!(failure(vec![syn(4), established.clone(), fin, fin_close]), None, "orderly");
        let abort = change(4, 3, Established, Close, task(1, "app"));
        assert_eq!(
            failure(vec![syn(4), established.clone(), released(4, 3), abort.clone()]),
            Some(Failure::ResetSent),
            "close() with SO_LINGER 0 or unread data"
        );
        assert_eq!(
            failure(vec![syn(4), established, abort]),
            Some(Failure::Timeout),
            "the kernel gave up on a connection its owner still holds"
        );
    }

    /// A retransmission counted against `cookie`, between the ports `change` uses.
    fn retransmit(cookie: u64, synack: bool) -> Retransmit {
        Retransmit {
            ts_ns: 300,
            cookie,
            synack,
            netns: 1,
            family: Family::Ipv4,
            local: (IpAddr::V4(Ipv4Addr::LOCALHOST), 8080),
            remote: (IpAddr::V4(Ipv4Addr::LOCALHOST), 40000),
        }
    }

    #[test]
    fn accept_queue_counts_handshakes_until_accept() {
        let mut table = Table::new();
        table.apply(change(5, 100, Close, Listen, task(7, "server")));
        for child in [6, 7, 8] {
            table.apply(change(child, 200, Listen, SynRecv, task(0, "swapper/0")));
            table.apply(change(child, 201, SynRecv, Established, task(0, "swapper/0")));
        }
        table.apply(Event::Accepted(fd_event(6, 9, task(7, "server"), Protocol::Tcp)));
        table.apply(Event::Accepted(fd_event(6, 10, task(7, "server"), Protocol::Tcp)));
        assert_eq!(table.retransmit(&retransmit(5, true)).count, 1);
        let [listener] = table.listeners().try_into().unwrap();
        assert_eq!((listener.cookie, listener.owner.map(|o| o.pid)), (5, Some(7)));
        assert_eq!(
            listener.queue,
            AcceptQueue {
                handshakes: 3,
                accepted: 1,
                queued: 2,
                peak_queued: 3,
                synack_retransmits: 1
            },
            "a second accept event for the same socket counts once"
        );
        table.apply(change(5, 400, Listen, Close, task(7, "server")));
        assert!(table.listeners().is_empty());
    }

    #[test]
    fn snapshot_children_without_a_file_wait_in_the_accept_queue() {
        let mut table = Table::new();
        let listener = row(1, Listen, 8080, 11);
        let waiting = row(2, Established, 8080, 0);
        let accepted = row(3, Established, 8080, 13);
        table.seed(&[waiting, listener, accepted], &HashMap::new(), 0);
        assert_eq!(table.listeners()[0].queue.queued, 1);
        table.apply(Event::Accepted(fd_event(2, 9, task(7, "server"), Protocol::Tcp)));
        let queue = table.listeners()[0].queue;
        assert_eq!((queue.queued, queue.accepted, queue.peak_queued), (0, 1, 1));
    }

    #[test]
    fn retransmits_count_per_connection() {
        let mut table = Table::new();
        table.apply(change(4, 1, Close, SynSent, task(1, "app")));
        table.apply(change(4, 2, SynSent, Established, task(0, "swapper/0")));
        table.retransmit(&retransmit(4, false));
        let seen = table.retransmit(&retransmit(4, false));
        assert_eq!(seen.count, 2);
        assert_eq!(seen.state, Some(Established));
        assert_eq!(seen.owner.map(|o| o.comm), Some("app".into()));
    }

    #[test]
    fn closed_listener_is_no_longer_inherited() {
        let mut table = Table::new();
        table.apply(change(5, 100, Close, Listen, task(7, "server")));
        table.apply(change(5, 150, Listen, Close, task(7, "server")));
        let t = table.apply(change(6, 200, Listen, SynRecv, task(8, "client"))).unwrap();
        assert_eq!(t.owner, None);
    }

    #[test]
    fn released_sockets_leave_the_table_at_close() {
        let mut table = Table::new();
        table.apply(created(1, 0, task(10, "curl")));
        table.apply(change(1, 1, Close, SynSent, task(10, "curl")));
        table.apply(change(1, 2, SynSent, Established, task(0, "swapper/0")));
        table.apply(released(1, 3));
        table.apply(change(1, 4, Established, FinWait1, task(10, "curl")));
        assert_eq!(table.len(), 1, "still closing");
        table.apply(change(1, 5, FinWait1, FinWait2, task(0, "swapper/0")));
        table.apply(change(1, 6, FinWait2, Close, task(0, "swapper/0")));
        assert!(table.is_empty());
        // Created and closed without ever connecting.
        table.apply(created(2, 0, task(10, "curl")));
        table.apply(released(2, 1));
        assert!(table.is_empty());
    }

    #[test]
    fn a_socket_reconnecting_after_failure_keeps_its_history() {
        let mut table = Table::new();
        table.apply(created(1, 0, task(10, "app")));
        table.apply(change(1, 10, Close, SynSent, task(10, "app")));
        table.apply(change(1, 20, SynSent, Close, task(0, "swapper/0")));
        let t = table.apply(change(1, 50, Close, SynSent, task(10, "app"))).unwrap();
        assert_eq!(t.in_old_state_ns, Some(30));
        table.apply(change(1, 60, SynSent, Close, task(0, "swapper/0")));
        table.apply(released(1, 70));
        assert!(table.is_empty());
    }

    #[test]
    fn unreleased_closed_sockets_are_bounded() {
        let mut table = Table::new();
        for cookie in 0..(CLOSED_KEPT as u64 + 100) {
            table.apply(change(cookie, 1, SynRecv, Close, task(0, "swapper/0")));
        }
        assert_eq!(table.len(), CLOSED_KEPT);
    }
}

/// Property: the table does not depend on where the snapshot fell. Sockets live through
/// random (truncated, interleaved) lifecycles; a snapshot is taken after event k, and the
/// queue the agent applies after it starts at any earlier event j (events during the
/// snapshot are both in it and queued). The rows must equal those of a table that saw every
/// event from the start.
#[cfg(test)]
mod properties {
    use std::net::{IpAddr, Ipv4Addr};

    use proptest::prelude::*;

    use super::*;
    use crate::kernel::events::{Family, SockLife, StateSource};

    fn task(pid: u32) -> Task {
        Task { pid, tid: pid, comm: format!("p{pid}") }
    }

    fn on_cpu() -> Task {
        Task { pid: 0, tid: 0, comm: "swapper/0".into() }
    }

    const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn state(cookie: u64, old: TcpState, new: TcpState, lport: u16, by: Task) -> Event {
        Event::State(StateChange {
            ts_ns: 0,
            source: StateSource::TpBtf,
            key: SockKey::Cookie(cookie),
            cookie: Some(cookie),
            skaddr: 0,
            inode: 1000 + cookie,
            netns: 1,
            family: Family::Ipv4,
            local: (LO, lport),
            remote: (
                if new == TcpState::Listen { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { LO },
                if new == TcpState::Listen { 0 } else { 80 },
            ),
            old,
            new,
            task: by,
            deferred_connect: false,
            totals: None,
        })
    }

    fn fd(
        kind: fn(FdSocket) -> Event,
        cookie: u64,
        fd: i32,
        protocol: Protocol,
        local: u16,
        remote: u16,
        by: Task,
    ) -> Event {
        kind(FdSocket {
            ts_ns: 0,
            cookie,
            fd,
            inode: 1000 + cookie,
            task: by,
            protocol,
            family: Family::Ipv4,
            netns: 1,
            state: Some(if remote != 0 { TcpState::Established } else { TcpState::Close }),
            local: (LO, local),
            remote: (if remote != 0 { LO } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) }, remote),
        })
    }

    fn life(kind: fn(SockLife) -> Event, cookie: u64, by: Task) -> Event {
        kind(SockLife { ts_ns: 0, cookie, task: by })
    }

    /// The full lifecycle of socket `cookie` of one of four kinds, owned by pid 100 + cookie.
    fn lifecycle(shape: u8, cookie: u64) -> Vec<Event> {
        use TcpState::*;
        let me = || task(100 + cookie as u32);
        let port = 40_000 + cookie as u16;
        match shape % 4 {
            0 => vec![
                life(Event::Created, cookie, me()),
                fd(Event::FdOpened, cookie, 3, Protocol::Tcp, 0, 0, me()),
                state(cookie, Close, SynSent, port, me()),
                state(cookie, SynSent, Established, port, on_cpu()),
                life(Event::Released, cookie, me()),
                state(cookie, Established, FinWait1, port, me()),
                state(cookie, FinWait1, FinWait2, port, on_cpu()),
                state(cookie, FinWait2, Close, port, on_cpu()),
            ],
            1 => vec![
                life(Event::Created, cookie, me()),
                fd(Event::FdOpened, cookie, 4, Protocol::Tcp, 0, 0, me()),
                state(cookie, Close, Listen, port, me()),
                fd(Event::FdOpened, cookie, 9, Protocol::Tcp, port, 0, me()),
                fd(Event::FdClosed, cookie, 9, Protocol::Tcp, port, 0, me()),
                life(Event::Released, cookie, me()),
                state(cookie, Listen, Close, port, me()),
            ],
            2 => vec![
                life(Event::Created, cookie, me()),
                fd(Event::FdOpened, cookie, 5, Protocol::Tcp, 0, 0, me()),
                state(cookie, Close, SynSent, port, me()),
                state(cookie, SynSent, Close, port, on_cpu()),
                fd(Event::FdClosed, cookie, 5, Protocol::Tcp, port, 80, me()),
                life(Event::Released, cookie, me()),
            ],
            _ => vec![
                life(Event::Created, cookie, me()),
                fd(Event::FdOpened, cookie, 6, Protocol::Udp, 0, 0, me()),
                fd(Event::Addresses, cookie, 6, Protocol::Udp, port, 0, me()),
                fd(Event::FdOpened, cookie, 7, Protocol::Udp, port, 0, me()),
                fd(Event::Addresses, cookie, 6, Protocol::Udp, port, 53, me()),
                fd(Event::FdClosed, cookie, 7, Protocol::Udp, port, 53, me()),
                life(Event::Released, cookie, me()),
            ],
        }
    }

    /// Cookie, state, endpoints and (pid, fd, comm) holders of a row.
    type Comparable = (u64, TcpState, (IpAddr, u16), (IpAddr, u16), Vec<(u32, i32, String)>);

    /// What must not depend on the snapshot's timing.
    fn comparable(table: &Table) -> Vec<Comparable> {
        let mut rows: Vec<_> = table
            .rows(1_000_000)
            .into_iter()
            .map(|r| {
                let owners = r.owners.iter().map(|o| (o.pid, o.fd, o.comm.clone())).collect();
                (r.row.cookie, r.row.state, r.row.local, r.row.remote, owners)
            })
            .collect();
        rows.sort_by_key(|r| r.0);
        rows
    }

    fn apply_all(table: &mut Table, events: &[Event]) {
        for (i, event) in events.iter().enumerate() {
            let mut event = event.clone();
            let ts = 10 * (i as u64 + 1);
            match &mut event {
                Event::State(c) => c.ts_ns = ts,
                Event::Created(l) | Event::Released(l) => l.ts_ns = ts,
                Event::Accepted(f)
                | Event::FdOpened(f)
                | Event::FdClosed(f)
                | Event::Addresses(f) => f.ts_ns = ts,
                _ => {}
            }
            table.apply(event);
        }
    }

    prop_compose! {
        /// Up to four sockets, each cut short at a random point, interleaved at random.
        fn scenario()(shapes in prop::collection::vec((any::<u8>(), 0usize..9), 1..5), order in prop::collection::vec(any::<u8>(), 0..64))
            -> Vec<Event>
        {
            let mut queues: Vec<std::collections::VecDeque<Event>> = shapes
                .iter()
                .enumerate()
                .map(|(i, (shape, cut))| {
                    let events = lifecycle(*shape, i as u64 + 1);
                    let keep = (*cut).min(events.len());
                    events.into_iter().take(keep).collect()
                })
                .collect();
            let mut merged = Vec::new();
            let mut picks = order.into_iter().cycle();
            while queues.iter().any(|q| !q.is_empty()) {
                let live: Vec<usize> = (0..queues.len()).filter(|i| !queues[*i].is_empty()).collect();
                let pick = live[usize::from(picks.next().unwrap_or(0)) % live.len()];
                merged.extend(queues[pick].pop_front());
            }
            merged
        }
    }

    proptest! {
        #[test]
        fn snapshot_timing_does_not_change_the_table(events in scenario(), k_frac in 0.0f64..=1.0, j_frac in 0.0f64..=1.0) {
            let n = events.len();
            let k = ((n as f64) * k_frac) as usize;
            let j = ((k as f64) * j_frac) as usize;

            let mut reference = Table::new();
            apply_all(&mut reference, &events);

            // What a snapshot taken after event k shows: rows and their holders.
            let mut before = Table::new();
            apply_all(&mut before, &events[..k]);
            let rows = before.rows(1_000);
            let snapshot_rows: Vec<SocketRow> = rows.iter().map(|r| r.row.clone()).collect();
            let owners = before.holders_by_inode();

            let mut seeded = Table::new();
            seeded.seed(&snapshot_rows, &owners, 1_000);
            apply_all(&mut seeded, &events[j..]);

            prop_assert_eq!(comparable(&seeded), comparable(&reference));
        }
    }
}
