//! State changes as the table sees them: who owns the socket at each one, how long the old
//! state lasted, and at CLOSE how long the connection lived, why it failed if it did, and
//! what ended it when no event of its own did (a timewait socket, a deleted namespace).
use crate::{
    host::snapshot::Protocol,
    kernel::events::{SockKey, StateChange, TcpState},
};

use super::{Owner, Table, socket::Facts};

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
    /// At a CLOSE that no tracepoint reported (a timewait socket's end, a namespace's
    /// deletion): what ended the socket.
    pub ending: Option<Ending>,
    /// Who opened the connection, when netwatch knows.
    pub direction: Option<Direction>,
    /// An IPv6 socket that takes no IPv4 (IPV6_V6ONLY), as far as netwatch knows: an IPv6
    /// wildcard is written `[::]`, not `*`.
    pub v6only: bool,
}

/// Which end opened a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// This host connected out (CLOSE -> SYN_SENT).
    Outbound,
    /// A listener here accepted it (LISTEN -> SYN_RECV), or its local port is a listener's.
    Inbound,
}

/// What ended a socket whose end no tracepoint reports: a timewait socket, or any socket of
/// a deleted network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// Its timer ran out: TIME_WAIT's 60 s, or `tcp_fin_timeout` in the FIN_WAIT2 substate.
    Expired,
    /// A new connection took over its 4-tuple (`tcp_tw_reuse`, or a new SYN it let through).
    Reused,
    /// It went before its time and no event said why: a RST from the peer ends a timewait
    /// socket (RFC 1337), as does `ss -K`.
    Vanished,
    /// Its network namespace was deleted, which destroys the sockets no process holds.
    NetnsDeleted,
}

impl Ending {
    pub const ALL: [Ending; 4] =
        [Ending::Expired, Ending::Reused, Ending::Vanished, Ending::NetnsDeleted];

    pub fn name(self) -> &'static str {
        match self {
            Ending::Expired => "expired",
            Ending::Reused => "reused",
            Ending::Vanished => "vanished",
            Ending::NetnsDeleted => "netns_deleted",
        }
    }
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
    /// Established but never accepted: its listener closed with it still in the accept
    /// queue, and the kernel reset it.
    ListenerClosed,
}

impl Failure {
    pub fn name(self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::Timeout => "timeout",
            Failure::Aborted => "aborted",
            Failure::Reset => "reset",
            Failure::ResetSent => "reset_sent",
            Failure::ListenerClosed => "listener_closed",
        }
    }

    pub const ALL: [Failure; 6] = [
        Failure::Refused,
        Failure::Timeout,
        Failure::Aborted,
        Failure::Reset,
        Failure::ResetSent,
        Failure::ListenerClosed,
    ];
}

/// Sockets that reached CLOSE but may still be reused (connect again) are kept for at most
/// this many; beyond it the oldest are forgotten.
pub(super) const CLOSED_KEPT: usize = 4096;

/// Transitions that run in the system call of the process that owns the socket.
fn runs_in_owner_syscall(old: TcpState, new: TcpState) -> bool {
    use TcpState::*;
    matches!(
        (old, new),
        (Close, SynSent) | (Close, Listen) | (Listen, Close) | (_, FinWait1) | (CloseWait, LastAck)
    )
}

impl Table {
    pub(super) fn apply_state(&mut self, change: StateChange) -> Transition {
        self.claim_unclaimed(change.key, change.inode);
        let passive = change.old == TcpState::Listen && change.new == TcpState::SynRecv;
        let listener = passive
            .then(|| self.listener_of(change.netns, change.local, change.listener))
            .flatten();
        if let Some((listener, _)) = &listener {
            if let Some(queue) = self.accept_queues.get_mut(listener) {
                queue.handshakes += 1;
            }
            self.enqueue(change.key, *listener);
        }
        let listener_owner = listener.and_then(|(_, owner)| owner);
        let opens = matches!(
            (change.old, change.new),
            (TcpState::Close, TcpState::SynSent) | (TcpState::Listen, TcpState::SynRecv)
        );
        if opens && change.local.1 != 0 {
            self.end_reused(change.netns, change.local, change.remote, change.ts_ns, change.key);
        }
        let known_direction = self.sockets.get(&change.key).and_then(|s| s.direction);
        let direction = match (change.old, change.new) {
            (TcpState::Close, TcpState::SynSent) => Some(Direction::Outbound),
            (TcpState::Listen, TcpState::SynRecv) => Some(Direction::Inbound),
            _ if known_direction.is_some() => known_direction,
            // Found by the snapshot: a connection on a listening port was accepted there.
            (_, TcpState::Listen) | (TcpState::Listen, _) => None,
            _ => self.listener_of(change.netns, change.local, None).map(|_| Direction::Inbound),
        };
        let socket = self.sockets.entry(change.key).or_default();
        socket.direction = direction;

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
        // An unaccepted connection whose listener is gone: the listener's close reset it.
        let orphaned_in_queue = change.new == TcpState::Close
            && socket.queued_on.is_some_and(|l| !self.accept_queues.contains_key(&l));
        let failure = match (change.new, socket.reset_in, change.old) {
            (TcpState::Close, Some(TcpState::SynSent), _) => Some(Failure::Refused),
            (TcpState::Close, Some(_), _) => Some(Failure::Reset),
            // close() releases the socket before its CLOSE transition; a timeout does not.
            (TcpState::Close, None, TcpState::SynSent) if socket.released => Some(Failure::Aborted),
            (TcpState::Close, None, TcpState::SynSent) => Some(Failure::Timeout),
            (TcpState::Close, None, _) if open && orphaned_in_queue => {
                Some(Failure::ListenerClosed)
            }
            // close() with data left unread resets the connection, from any synchronized
            // state (a server that shut down its side first is in FIN_WAIT2 by then).
            (TcpState::Close, None, old)
                if old != TcpState::SynRecv && change.totals.is_some_and(|t| t.unread > 0) =>
            {
                Some(Failure::ResetSent)
            }
            (TcpState::Close, None, _) if open && socket.released => Some(Failure::ResetSent),
            (TcpState::Close, None, _) if open => Some(Failure::Timeout),
            _ => None,
        };
        if change.new == TcpState::Close {
            socket.reset_in = None;
            // A child that dies in the accept queue leaves it.
            if let Some(queue) =
                socket.queued_on.take().and_then(|l| self.accept_queues.get_mut(&l))
            {
                queue.queued = queue.queued.saturating_sub(1);
            }
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
            scope: None,
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
        let v6only = facts.v6only();
        let owner = socket.owner.clone();
        let released = socket.released;

        let listener = (change.netns, change.local.1, change.local.0);
        match (change.old, change.new) {
            (_, TcpState::Listen) => {
                self.add_listener(listener, change.key, owner.clone());
                self.accept_queues.entry(change.key).or_default();
            }
            // LISTEN -> SYN_RECV is a new child socket, not the listener changing.
            (TcpState::Listen, TcpState::Close) => {
                self.remove_listener(listener, change.key);
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
        Transition {
            change,
            owner,
            in_old_state_ns,
            lifespan_ns,
            failure,
            ending: None,
            direction,
            v6only,
        }
    }

    pub(super) fn remember_closed(&mut self, key: SockKey) {
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
