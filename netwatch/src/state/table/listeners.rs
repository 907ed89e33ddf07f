//! Listening sockets: finding the listener of a passively opened socket, its accept queue as
//! counted from events, and retransmissions (a listener's are SYN-ACKs).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::kernel::events::{Retransmit, SockKey, TcpState};

use super::{Owner, Table};

/// Listeners by (netns, local port, local address).
pub(super) type ListenerKey = (u32, u16, IpAddr);

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
    /// Who opened the connection, when known.
    pub direction: Option<super::Direction>,
    /// Retransmits of this socket seen so far, this one included.
    pub count: u64,
}

impl Table {
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
                    direction: socket.direction,
                    count: socket.retransmits,
                }
            }
            None => RetransmitSeen { owner: None, state: None, direction: None, count: 1 },
        }
    }

    /// Puts the passive socket `child` in `listener`'s accept queue.
    pub(super) fn enqueue(&mut self, child: SockKey, listener: SockKey) {
        let Some(queue) = self.accept_queues.get_mut(&listener) else { return };
        let socket = self.sockets.entry(child).or_default();
        socket.direction = Some(super::Direction::Inbound);
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
            .flat_map(|(&(netns, port, addr), group)| {
                group.iter().filter_map(move |(key, owner)| {
                    let SockKey::Cookie(cookie) = *key else { return None };
                    Some(Listener {
                        cookie,
                        netns,
                        local: (addr, port),
                        owner: owner.clone(),
                        queue: self.accept_queues.get(key).copied().unwrap_or_default(),
                    })
                })
            })
            .collect();
        listeners.sort_by_key(|l| (l.netns, l.local.1, l.local.0, l.cookie));
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

    /// The listener a passively opened socket came from, and its owner: the one the kernel
    /// named (`chosen`, a cookie), else the first at the exact local address, then at a
    /// wildcard of either family (a `[::]` listener takes IPv4 too).
    pub(super) fn listener_of(
        &self,
        netns: u32,
        (addr, port): (IpAddr, u16),
        chosen: Option<u64>,
    ) -> Option<(SockKey, Option<Owner>)> {
        let groups = || {
            [addr, IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)]
                .into_iter()
                .filter_map(move |a| self.listeners.get(&(netns, port, a)))
        };
        let named = chosen
            .and_then(|cookie| groups().flatten().find(|(key, _)| *key == SockKey::Cookie(cookie)));
        named.or_else(|| groups().next().and_then(|g| g.first())).cloned()
    }

    /// Adds a listener at `at` (beside others there: SO_REUSEPORT).
    pub(super) fn add_listener(&mut self, at: ListenerKey, key: SockKey, owner: Option<Owner>) {
        let group = self.listeners.entry(at).or_default();
        group.retain(|(k, _)| *k != key);
        group.push((key, owner));
    }

    pub(super) fn remove_listener(&mut self, at: ListenerKey, key: SockKey) {
        if let Some(group) = self.listeners.get_mut(&at) {
            group.retain(|(k, _)| *k != key);
            if group.is_empty() {
                self.listeners.remove(&at);
            }
        }
    }
}
