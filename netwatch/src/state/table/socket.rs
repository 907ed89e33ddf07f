//! One socket as the table keeps it: its owner, holders (pid, fd), state, and the facts a
//! table row needs.
use std::{collections::VecDeque, net::IpAddr};

use super::close::Direction;
pub use crate::record::Owner;
use crate::{
    host::snapshot::{Holder, Protocol, SocketRow, TimerKind},
    kernel::events::{Comm, Family, SockKey, Task, TcpState, Totals},
};

impl From<&Task> for Owner {
    fn from(task: &Task) -> Self {
        Owner { pid: task.pid, comm: task.comm.clone(), cgroup_id: task.cgroup }
    }
}

/// What a table row needs beyond the state.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Facts {
    pub(super) protocol: Protocol,
    pub(super) family: Family,
    pub(super) netns: u32,
    pub(super) local: (IpAddr, u16),
    pub(super) remote: (IpAddr, u16),
    pub(super) inode: u64,
    pub(super) uid: Option<u32>,
    pub(super) v6only: bool,
    /// The interface the socket is bound to, as sock_diag named it.
    pub(super) scope: Option<String>,
    /// A timewait socket's end, in CLOCK_MONOTONIC ns: set only for timewait sockets.
    pub(super) expires_ns: Option<u64>,
}

impl Facts {
    /// What a sock_diag row found at `now_ns` says about its socket.
    pub(super) fn from_row(row: &SocketRow, now_ns: u64) -> Facts {
        Facts {
            protocol: row.protocol,
            family: row.family,
            netns: row.netns,
            local: row.local,
            remote: row.remote,
            inode: row.inode,
            uid: Some(row.uid),
            v6only: row.v6only,
            scope: row.scope.clone(),
            expires_ns: row
                .timer
                .filter(|t| t.kind == TimerKind::Timewait)
                .map(|t| now_ns + u64::from(t.remaining_ms) * 1_000_000),
        }
    }

    /// Whether the socket takes no IPv4: as sock_diag said, or as its bind implies.
    pub(super) fn v6only(&self) -> bool {
        self.v6only || crate::host::snapshot::v6only_by_bind(self.local.0)
    }

    /// The socket's (netns, local, remote), the key of a timewait socket's 4-tuple.
    pub(super) fn four_tuple(&self) -> FourTuple {
        (self.netns, self.local, self.remote)
    }
}

/// A TCP connection's (netns, local, remote) endpoints.
pub(super) type FourTuple = (u32, (IpAddr, u16), (IpAddr, u16));

#[derive(Debug, Default)]
pub(super) struct Socket {
    pub(super) created_ns: Option<u64>,
    pub(super) state: Option<TcpState>,
    /// When `state` began; None for a state found in the snapshot.
    pub(super) since_ns: Option<u64>,
    pub(super) owner: Option<Owner>,
    /// The last file reference is gone; the socket disappears at its CLOSE transition.
    pub(super) released: bool,
    pub(super) facts: Option<Facts>,
    /// Every (pid, fd) holding the socket, with the process's command name.
    pub(super) holders: Holders,
    /// The state the socket was in when it received a RST.
    pub(super) reset_in: Option<TcpState>,
    /// When `owner` took over (None: found in the snapshot).
    pub(super) owner_since_ns: Option<u64>,
    /// The owners before `owner`, oldest first, with when each took over: empty, with nothing
    /// allocated, for the many sockets that only ever have one owner.
    pub(super) previous_owners: VecDeque<(Option<u64>, Owner)>,
    /// A passively opened socket not accepted yet: the listener whose accept queue holds it.
    pub(super) queued_on: Option<SockKey>,
    /// Segments retransmitted (`tcp_retransmit_skb`); for a listener, SYN-ACKs.
    pub(super) retransmits: u64,
    /// What the full socket carried when it closed into a timewait socket, for the summary
    /// at the timewait socket's own end.
    pub(super) close_totals: Option<Totals>,
    /// Who opened the connection, once known.
    pub(super) direction: Option<Direction>,
}

/// The (pid, fd) pairs holding a socket, with each process's command name: a sorted vector,
/// since a socket has one or two holders and a map's node would cost ten times the memory
/// (the table keeps one per socket on the host).
#[derive(Debug, Default)]
pub(super) struct Holders(pub(super) Vec<((u32, i32), Comm)>);

impl Holders {
    pub(super) fn insert(&mut self, key: (u32, i32), comm: Comm) {
        match self.0.binary_search_by_key(&key, |(k, _)| *k) {
            Ok(at) => self.0[at].1 = comm,
            Err(at) => {
                self.0.reserve_exact(1);
                self.0.insert(at, (key, comm));
            }
        }
    }

    pub(super) fn remove(&mut self, key: &(u32, i32)) {
        if let Ok(at) = self.0.binary_search_by_key(key, |(k, _)| *k) {
            self.0.remove(at);
        }
    }

    pub(super) fn extend(&mut self, holders: impl IntoIterator<Item = ((u32, i32), Comm)>) {
        for (key, comm) in holders {
            self.insert(key, comm);
        }
    }

    pub(super) fn retain(&mut self, mut keep: impl FnMut(&(u32, i32), &Comm) -> bool) {
        self.0.retain(|(key, comm)| keep(key, comm));
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&(u32, i32), &Comm)> {
        self.0.iter().map(|(key, comm)| (key, comm))
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &(u32, i32)> {
        self.0.iter().map(|(key, _)| key)
    }

    pub(super) fn of_pid(&self, pid: u32) -> impl Iterator<Item = (&(u32, i32), &Comm)> {
        self.iter().filter(move |((holder, _), _)| *holder == pid)
    }

    /// The holders as a table row lists them.
    pub(super) fn to_vec(&self) -> Vec<Holder> {
        self.iter()
            .map(|((pid, fd), comm)| Holder {
                pid: *pid,
                comm: comm.clone(),
                fd: *fd,
                start_time: None,
                cgroup_id: 0,
            })
            .collect()
    }

    pub(super) fn comms_of_pid_mut(&mut self, pid: u32) -> impl Iterator<Item = &mut Comm> {
        self.0.iter_mut().filter(move |((holder, _), _)| *holder == pid).map(|(_, comm)| comm)
    }
}

/// How many owners a socket remembers.
pub(super) const OWNER_HISTORY: usize = 8;

impl Socket {
    pub(super) fn set_owner(&mut self, owner: Option<Owner>, at_ns: Option<u64>) {
        // The same process again is no change of owner; it may tell its cgroup at last
        // (the snapshot could not read it) or anew (it moved).
        if let (Some(current), Some(new)) = (&mut self.owner, &owner)
            && (current.pid, &current.comm) == (new.pid, &new.comm)
        {
            if new.cgroup_id != 0 {
                current.cgroup_id = new.cgroup_id;
            }
            return;
        }
        if self.owner == owner {
            return;
        }
        if let Some(old) = self.owner.take() {
            if self.previous_owners.len() == OWNER_HISTORY {
                self.previous_owners.pop_front();
            }
            // Few sockets change owners more than once: grow one entry at a time.
            self.previous_owners.reserve_exact(1);
            self.previous_owners.push_back((self.owner_since_ns, old));
        }
        // At most OWNER_HISTORY in all, the current owner included.
        if owner.is_some() && self.previous_owners.len() == OWNER_HISTORY {
            self.previous_owners.pop_front();
        }
        self.owner_since_ns = at_ns.filter(|_| owner.is_some());
        self.owner = owner;
    }

    /// The owners the socket had, the current one last, with when each took over.
    pub(super) fn owner_history(&self) -> impl Iterator<Item = (Option<u64>, &Owner)> {
        let current = self.owner.as_ref().map(|owner| (self.owner_since_ns, owner));
        self.previous_owners.iter().map(|(at, owner)| (*at, owner)).chain(current)
    }
}

/// A socket as the table lists it: `ss`'s row, every holder, and the time in its state.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub row: SocketRow,
    pub owners: Vec<Holder>,
    pub in_state_ns: Option<u64>,
    /// The owners the socket had, oldest first, with how long ago each took over.
    pub owner_history: Vec<(Option<u64>, Owner)>,
}
