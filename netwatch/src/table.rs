//! The pure, synchronous socket state: events in, enriched transitions out. No I/O.
//!
//! For each socket it keeps what the stream needs to say more than the kernel record does:
//! who owns the socket (not merely who was on the CPU), when it was created, and when it
//! entered its current state. Ownership follows DESIGN.md: the current task counts as owner
//! only for transitions that run inside the owner's own system call; every other transition
//! (softirq: handshake completion, peer FIN, RST, timers, loopback delivery) keeps the owner
//! already known. A passively opened socket inherits its listener's owner.
use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{
    events::{Event, SockKey, StateChange, Task, TcpState},
    snapshot::{FdOwner, Protocol, SocketRow},
};

/// A process that owns a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub comm: String,
}

impl From<&Task> for Owner {
    fn from(task: &Task) -> Self {
        Owner {
            pid: task.pid,
            comm: task.comm.clone(),
        }
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
}

/// Listeners by (netns, local port, local address).
type ListenerKey = (u32, u16, IpAddr);

/// Sockets that reached CLOSE but may still be reused (connect again) are kept for at most
/// this many; beyond it the oldest are forgotten.
const CLOSED_KEPT: usize = 4096;

#[derive(Debug, Default)]
pub struct Table {
    sockets: HashMap<SockKey, Socket>,
    listeners: HashMap<ListenerKey, Owner>,
    closed: VecDeque<SockKey>,
}

/// Transitions that run in the system call of the process that owns the socket.
fn runs_in_owner_syscall(old: TcpState, new: TcpState) -> bool {
    use TcpState::*;
    matches!(
        (old, new),
        (Close, SynSent) | (Close, Listen) | (Listen, Close) | (_, FinWait1) | (CloseWait, LastAck)
    )
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

    /// Seeds the table from a snapshot taken after the programs were attached. Events queued
    /// meanwhile are applied afterwards and win: they are newer than any snapshot row. A
    /// socket's state found here has no known start; its owner is the first process (lowest
    /// pid) holding it, and a listener's owners pass on to the connections it accepts.
    pub fn seed(&mut self, rows: &[SocketRow], owners: &HashMap<u64, Vec<FdOwner>>) {
        for row in rows.iter().filter(|r| r.protocol == Protocol::Tcp) {
            let owner = (row.inode != 0)
                .then(|| owners.get(&row.inode))
                .flatten()
                .and_then(|list| list.first())
                .map(|o| Owner {
                    pid: o.pid,
                    comm: o.comm.clone(),
                });
            if row.state == TcpState::Listen
                && let Some(owner) = &owner
            {
                self.listeners
                    .insert((row.netns, row.local.1, row.local.0), owner.clone());
            }
            let socket = self.sockets.entry(SockKey::Cookie(row.cookie)).or_default();
            socket.state = Some(row.state);
            socket.since_ns = None;
            socket.owner = owner;
        }
    }

    /// Applies one event; a state change comes back as a [`Transition`].
    pub fn apply(&mut self, event: Event) -> Option<Transition> {
        match event {
            Event::Created(life) => {
                let socket = self
                    .sockets
                    .entry(SockKey::Cookie(life.cookie))
                    .or_default();
                socket.created_ns = Some(life.ts_ns);
                socket.owner = Some(Owner::from(&life.task));
                None
            }
            Event::Released(life) => {
                let key = SockKey::Cookie(life.cookie);
                if let Some(socket) = self.sockets.get_mut(&key) {
                    socket.released = true;
                    // Never connected, or already closed: no CLOSE transition will follow.
                    if matches!(socket.state, None | Some(TcpState::Close)) {
                        self.sockets.remove(&key);
                    }
                }
                None
            }
            Event::Accepted(accept) => {
                // accept(2) runs in the receiving process: from now on it owns the socket.
                let socket = self
                    .sockets
                    .entry(SockKey::Cookie(accept.cookie))
                    .or_default();
                socket.owner = Some(Owner::from(&accept.task));
                None
            }
            Event::State(change) => Some(self.apply_state(change)),
        }
    }

    fn apply_state(&mut self, change: StateChange) -> Transition {
        let listener_owner = (change.old == TcpState::Listen && change.new == TcpState::SynRecv)
            .then(|| self.listener_owner(change.netns, change.local))
            .flatten();
        let socket = self.sockets.entry(change.key).or_default();

        let in_old_state_ns = match (socket.state, socket.since_ns) {
            (Some(state), Some(since)) if state == change.old => {
                Some(change.ts_ns.saturating_sub(since))
            }
            (None, _) if change.old == TcpState::Close => socket
                .created_ns
                .map(|created| change.ts_ns.saturating_sub(created)),
            _ => None,
        };
        if runs_in_owner_syscall(change.old, change.new) {
            socket.owner = Some(Owner::from(&change.task));
        } else if socket.owner.is_none() {
            socket.owner = listener_owner;
        }
        socket.state = Some(change.new);
        socket.since_ns = Some(change.ts_ns);
        let owner = socket.owner.clone();
        let released = socket.released;

        let listener = (change.netns, change.local.1, change.local.0);
        match (change.old, change.new) {
            (_, TcpState::Listen) => {
                if let Some(owner) = &owner {
                    self.listeners.insert(listener, owner.clone());
                }
            }
            (TcpState::Listen, _) => {
                self.listeners.remove(&listener);
            }
            _ => {}
        }
        if change.new == TcpState::Close {
            // Without a cookie there is no release event to wait for; a reused address is a
            // new socket anyway.
            if released || matches!(change.key, SockKey::Addr { .. }) {
                self.sockets.remove(&change.key);
            } else {
                self.remember_closed(change.key);
            }
        }
        Transition {
            change,
            owner,
            in_old_state_ns,
        }
    }

    /// The owner of the listener a passively opened socket came from: the exact local address
    /// first, then a wildcard listener of either family (a `[::]` listener takes IPv4 too).
    fn listener_owner(&self, netns: u32, (addr, port): (IpAddr, u16)) -> Option<Owner> {
        [
            addr,
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ]
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Family, SockLife, StateSource};
    use TcpState::*;
    use std::collections::HashMap;

    fn task(pid: u32, comm: &str) -> Task {
        Task {
            pid,
            tid: pid,
            comm: comm.into(),
        }
    }

    fn change(cookie: u64, ts_ns: u64, old: TcpState, new: TcpState, on_cpu: Task) -> Event {
        Event::State(StateChange {
            ts_ns,
            source: StateSource::TpBtf,
            key: SockKey::Cookie(cookie),
            cookie: Some(cookie),
            skaddr: 0,
            netns: 1,
            family: Family::Ipv4,
            local: (IpAddr::V4(Ipv4Addr::LOCALHOST), 8080),
            remote: (IpAddr::V4(Ipv4Addr::LOCALHOST), 40000),
            old,
            new,
            task: on_cpu,
            deferred_connect: false,
        })
    }

    fn created(cookie: u64, ts_ns: u64, by: Task) -> Event {
        Event::Created(SockLife {
            ts_ns,
            cookie,
            task: by,
        })
    }

    fn released(cookie: u64, ts_ns: u64) -> Event {
        Event::Released(SockLife {
            ts_ns,
            cookie,
            task: task(1, "x"),
        })
    }

    #[test]
    fn first_transition_counts_from_creation() {
        let mut table = Table::new();
        assert_eq!(table.apply(created(1, 1_000, task(10, "curl"))), None);
        let t = table
            .apply(change(1, 4_000, Close, SynSent, task(10, "curl")))
            .unwrap();
        assert_eq!(t.in_old_state_ns, Some(3_000));
        let t = table
            .apply(change(1, 9_000, SynSent, Established, task(0, "swapper/1")))
            .unwrap();
        assert_eq!(t.in_old_state_ns, Some(5_000));
        assert_eq!(
            t.owner,
            Some(Owner {
                pid: 10,
                comm: "curl".into()
            })
        );
    }

    #[test]
    fn softirq_task_never_becomes_owner() {
        let mut table = Table::new();
        // Seen mid-life: no owner known, and the on-CPU task must not be taken as one.
        let t = table
            .apply(change(2, 10, Established, CloseWait, task(99, "peer")))
            .unwrap();
        assert_eq!(t.owner, None);
        assert_eq!(t.in_old_state_ns, None, "did not see ESTABLISHED begin");
        // close() by the owner names it.
        let t = table
            .apply(change(2, 20, CloseWait, LastAck, task(7, "server")))
            .unwrap();
        assert_eq!(
            t.owner,
            Some(Owner {
                pid: 7,
                comm: "server".into()
            })
        );
        assert_eq!(t.in_old_state_ns, Some(10));
        let t = table
            .apply(change(2, 30, LastAck, Close, task(0, "swapper/0")))
            .unwrap();
        assert_eq!(
            t.owner,
            Some(Owner {
                pid: 7,
                comm: "server".into()
            })
        );
    }

    #[test]
    fn passive_socket_inherits_the_listener_owner() {
        let mut table = Table::new();
        table.apply(created(5, 0, task(7, "server")));
        let t = table
            .apply(change(5, 100, Close, Listen, task(7, "server")))
            .unwrap();
        assert_eq!(t.in_old_state_ns, Some(100));
        // The child is cloned in softirq while the client is on the CPU.
        let t = table
            .apply(change(6, 200, Listen, SynRecv, task(8, "client")))
            .unwrap();
        assert_eq!(
            t.owner,
            Some(Owner {
                pid: 7,
                comm: "server".into()
            })
        );
        assert_eq!(
            t.in_old_state_ns, None,
            "the child never was in LISTEN itself"
        );
        let t = table
            .apply(change(6, 250, SynRecv, Established, task(8, "client")))
            .unwrap();
        assert_eq!(
            t.owner,
            Some(Owner {
                pid: 7,
                comm: "server".into()
            })
        );
        assert_eq!(t.in_old_state_ns, Some(50));
    }

    #[test]
    fn the_accepting_process_takes_over_from_the_listener() {
        let mut table = Table::new();
        table.apply(change(5, 100, Close, Listen, task(7, "master")));
        table.apply(change(6, 200, Listen, SynRecv, task(8, "client")));
        table.apply(change(6, 250, SynRecv, Established, task(8, "client")));
        let accept = crate::events::SockAccept {
            ts_ns: 300,
            cookie: 6,
            fd: 9,
            task: task(70, "worker"),
        };
        assert_eq!(table.apply(Event::Accepted(accept)), None);
        let t = table
            .apply(change(6, 400, Established, CloseWait, task(8, "client")))
            .unwrap();
        assert_eq!(
            t.owner,
            Some(Owner {
                pid: 70,
                comm: "worker".into()
            })
        );
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
        let holder = |pid, comm: &str| FdOwner {
            pid,
            comm: comm.into(),
            fd: 3,
            start_time: 1,
        };
        let owners = HashMap::from([
            (10, vec![holder(7, "nginx"), holder(8, "nginx")]),
            (11, vec![holder(9, "app")]),
        ]);
        table.seed(
            &[row(1, Established, 5000, 11), row(2, Listen, 8080, 10)],
            &owners,
        );
        // A transition out of a snapshot state: owner known, time in state not.
        let t = table
            .apply(change(1, 50, Established, FinWait1, task(9, "app")))
            .unwrap();
        assert_eq!((t.owner.unwrap().pid, t.in_old_state_ns), (9, None));
        let t = table
            .apply(change(1, 70, FinWait1, FinWait2, task(0, "swapper/0")))
            .unwrap();
        assert_eq!(t.in_old_state_ns, Some(20));
        // A new connection to the seeded listener belongs to its first holder.
        let t = table
            .apply(change(3, 100, Listen, SynRecv, task(55, "client")))
            .unwrap();
        assert_eq!(
            t.owner,
            Some(Owner {
                pid: 7,
                comm: "nginx".into()
            })
        );
    }

    #[test]
    fn queued_events_win_over_the_snapshot() {
        let mut table = Table::new();
        // The snapshot saw the socket ESTABLISHED; the queue holds its earlier transitions
        // and the close that happened while the snapshot was being taken.
        table.seed(&[row(1, Established, 5000, 0)], &HashMap::new());
        table.apply(change(1, 10, Close, SynSent, task(4, "curl")));
        table.apply(change(1, 20, SynSent, Established, task(0, "swapper/0")));
        table.apply(change(1, 30, Established, Close, task(4, "curl")));
        table.apply(released(1, 40));
        assert!(
            table.is_empty(),
            "a socket closed during the snapshot is not resurrected"
        );
    }

    #[test]
    fn closed_listener_is_no_longer_inherited() {
        let mut table = Table::new();
        table.apply(change(5, 100, Close, Listen, task(7, "server")));
        table.apply(change(5, 150, Listen, Close, task(7, "server")));
        let t = table
            .apply(change(6, 200, Listen, SynRecv, task(8, "client")))
            .unwrap();
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
        let t = table
            .apply(change(1, 50, Close, SynSent, task(10, "app")))
            .unwrap();
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
