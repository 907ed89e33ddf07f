//! Kernel records in, typed events out: decoding of the `EVENTS` ring buffer and the async
//! reader that drains it when the kernel says it is readable (tokio `AsyncFd`, no polling).
use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use aya::maps::{MapData, RingBuf};
use netwatch_common::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, SockEvent, flags, kind};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

/// A TCP state as the kernel numbers it (`include/net/tcp_states.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TcpState {
    Established = 1,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
}

impl TcpState {
    pub const ALL: [TcpState; 12] = [
        TcpState::Established,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Listen,
        TcpState::Closing,
        TcpState::NewSynRecv,
    ];

    pub fn from_kernel(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code).checked_sub(1)?).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            TcpState::Established => "ESTABLISHED",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::FinWait1 => "FIN_WAIT1",
            TcpState::FinWait2 => "FIN_WAIT2",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::Listen => "LISTEN",
            TcpState::Closing => "CLOSING",
            TcpState::NewSynRecv => "NEW_SYN_RECV",
        }
    }

    /// The accepted spellings, for error messages.
    pub fn names() -> String {
        Self::ALL.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

impl FromStr for TcpState {
    type Err = String;

    /// Case-insensitive; `-` may stand for `_` (`syn-sent`), as `ss` spells states.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_uppercase().replace('-', "_");
        Self::ALL
            .iter()
            .copied()
            .find(|state| state.name() == wanted)
            .ok_or_else(|| format!("unknown TCP state '{s}' (expected one of: {})", Self::names()))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// Which tracepoint reported a transition; it decides how the socket is identified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateSource {
    /// `tp_btf/inet_sock_set_state`: identity is the socket cookie.
    TpBtf,
    /// Classic `sock:inet_sock_set_state`: identity is (netns, socket address).
    Tracepoint,
    /// No tracepoint: a timewait socket's change or end, or a socket's end with its network
    /// namespace, learned from sock_diag.
    SockDiag,
}

impl fmt::Display for StateSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StateSource::TpBtf => "tp_btf/inet_sock_set_state",
            StateSource::Tracepoint => "tracepoint sock:inet_sock_set_state",
            StateSource::SockDiag => "sock_diag",
        })
    }
}

/// How a socket is identified for the life of the boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SockKey {
    Cookie(u64),
    /// The fallback's identity: a `struct sock` address can be reused after the socket is freed.
    Addr {
        netns: u32,
        skaddr: u64,
    },
}

/// A task's command name. At most 15 bytes, it is kept inline: no allocation per event,
/// per clone into a record, or per owner kept in the table.
pub type Comm = compact_str::CompactString;

/// The task that was on the CPU when a hook ran: evidence of ownership, never proof.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub pid: u32,
    pub tid: u32,
    pub comm: Comm,
    /// Its cgroup v2 id (0 where not recorded).
    pub cgroup: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateChange {
    pub ts_ns: u64,
    pub source: StateSource,
    pub key: SockKey,
    pub cookie: Option<u64>,
    pub skaddr: u64,
    pub netns: u32,
    /// The socket's sockfs inode while it has a file; 0 otherwise.
    pub inode: u64,
    pub family: Family,
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
    pub old: TcpState,
    pub new: TcpState,
    pub task: Task,
    /// Emitted late, from the connect callback, so that the local port is known.
    pub deferred_connect: bool,
    /// On a tp_btf CLOSE: the kernel put a timewait socket in this one's place, in this
    /// substate (TIME_WAIT once the peer's FIN came, FIN_WAIT2 before).
    pub timewait: Option<TcpState>,
    /// The connection's totals, on a tp_btf CLOSE transition.
    pub totals: Option<Totals>,
    /// On LISTEN -> SYN_RECV: the cookie of the listener the child was cloned from, when
    /// the kernel said (see `state::clones`).
    pub listener: Option<u64>,
}

/// Data bytes received but never read at CLOSE, from `rcv_nxt - copied_seq`: a FIN the
/// owner did not read counts one there (a FIN it read moved `copied_seq` past it, and then
/// nothing before it is unread). More than a receive buffer can hold is a torn read: 0.
fn unread_data(sequence_gap: u32, fin_received: bool) -> u32 {
    let data = if fin_received { sequence_gap.saturating_sub(1) } else { sequence_gap };
    if data > 1 << 30 { 0 } else { data }
}

/// What a TCP connection carried, read from the socket as it closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Totals {
    /// Payload bytes sent, retransmissions not counted twice.
    pub bytes_sent: u64,
    /// Payload bytes received (the peer's FIN, which the kernel counts as one, is not).
    pub bytes_received: u64,
    /// Segments retransmitted.
    pub retransmits: u32,
    /// Data bytes received that the owner never read: why close() sent a reset.
    pub unread: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SockLife {
    pub ts_ns: u64,
    pub cookie: u64,
    pub task: Task,
}

/// A system call of `task` on one of its socket fds, with the socket as it was then.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FdSocket {
    pub ts_ns: u64,
    pub cookie: u64,
    pub fd: i32,
    pub inode: u64,
    pub task: Task,
    pub protocol: Protocol,
    pub family: Family,
    pub netns: u32,
    /// The kernel's `sk_state` (UDP: CLOSE unconnected, ESTABLISHED connected).
    pub state: Option<TcpState>,
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    State(StateChange),
    Created(SockLife),
    Released(SockLife),
    /// accept(2)/accept4(2) gave `task` the socket.
    Accepted(FdSocket),
    /// socket(2) or dup*(2) gave `task` a new fd for the socket.
    FdOpened(FdSocket),
    /// `task` is closing one of its fds for the socket.
    FdClosed(FdSocket),
    /// bind(2)/connect(2) settled the socket's addresses.
    Addresses(FdSocket),
    /// A new connection's child (by kernel address) was cloned from the listener with
    /// cookie `listener`.
    ChildOf {
        skaddr: u64,
        listener: u64,
    },
    /// `parent` forked the process `child_tgid`, which inherits its fds.
    Forked {
        ts_ns: u64,
        parent: Task,
        child_tgid: u32,
    },
    /// `task` exec'd (its comm is the new program's).
    Exec(Task),
    /// The process `task` exited.
    Exit(Task),
    /// The socket received a RST.
    Reset {
        ts_ns: u64,
        cookie: u64,
    },
    /// A connection sent a segment again, or a listener a SYN-ACK.
    Retransmit(Retransmit),
}

/// A retransmission: of a data segment by the connection `cookie`, or (`synack`) of a
/// SYN-ACK by the listener `cookie` to the half-open connection `local`/`remote`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retransmit {
    pub ts_ns: u64,
    pub cookie: u64,
    pub synack: bool,
    pub netns: u32,
    pub family: Family,
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than a SockEvent ({size})", size = SockEvent::SIZE)]
    Short(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u8),
    #[error("unknown address family {0}")]
    UnknownFamily(u8),
    #[error("unknown TCP state {0}")]
    UnknownState(u8),
    #[error("unknown protocol {0}")]
    UnknownProtocol(u8),
}

fn comm(raw: &[u8; 16]) -> Comm {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    Comm::from_utf8_lossy(&raw[..end])
}

fn task(raw: &SockEvent) -> Task {
    Task {
        pid: (raw.pid_tgid >> 32) as u32,
        tid: raw.pid_tgid as u32,
        comm: comm(&raw.comm),
        cgroup: raw.cgroup,
    }
}

fn family(code: u8) -> Result<Family, DecodeError> {
    match code {
        AF_INET => Ok(Family::Ipv4),
        AF_INET6 => Ok(Family::Ipv6),
        other => Err(DecodeError::UnknownFamily(other)),
    }
}

fn address(family: Family, bytes: &[u8; 16]) -> IpAddr {
    match family {
        Family::Ipv4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        Family::Ipv6 => IpAddr::V6(Ipv6Addr::from(*bytes)),
    }
}

/// Decodes one ring buffer record. Never panics: anything malformed is an error to count.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    if bytes.len() < SockEvent::SIZE {
        return Err(DecodeError::Short(bytes.len()));
    }
    // SAFETY: the length is checked above, SockEvent is plain old data valid for any bits, and
    // read_unaligned makes no alignment assumption about the ring buffer slice.
    let raw: SockEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    match raw.kind {
        kind::STATE_BTF | kind::STATE_CLASSIC => {
            let family = family(raw.family)?;
            let state = |code| TcpState::from_kernel(code).ok_or(DecodeError::UnknownState(code));
            let (source, key, cookie) = if raw.kind == kind::STATE_BTF {
                (StateSource::TpBtf, SockKey::Cookie(raw.cookie), Some(raw.cookie))
            } else {
                let key = SockKey::Addr { netns: raw.netns, skaddr: raw.skaddr };
                (StateSource::Tracepoint, key, None)
            };
            Ok(Event::State(StateChange {
                ts_ns: raw.ts_ns,
                source,
                key,
                cookie,
                skaddr: raw.skaddr,
                netns: raw.netns,
                inode: raw.inode,
                family,
                local: (address(family, &raw.saddr), raw.sport),
                remote: (address(family, &raw.daddr), raw.dport),
                old: state(raw.oldstate)?,
                new: state(raw.newstate)?,
                task: task(&raw),
                deferred_connect: raw.flags & flags::DEFERRED_CONNECT != 0,
                timewait: (raw.flags & flags::TIMEWAIT != 0).then_some(
                    if raw.fin_received & 1 != 0 { TcpState::TimeWait } else { TcpState::FinWait2 },
                ),
                listener: None,
                totals: (raw.kind == kind::STATE_BTF
                    && raw.newstate == netwatch_common::tcp_state::CLOSE)
                    .then(|| Totals {
                        bytes_sent: raw.bytes_sent.saturating_sub(raw.bytes_retrans),
                        bytes_received: raw
                            .bytes_received
                            .saturating_sub(u64::from(raw.fin_received & 1)),
                        retransmits: raw.total_retrans,
                        unread: unread_data(raw.unread, raw.fin_received & 1 != 0),
                    }),
            }))
        }
        kind::SOCK_CREATE | kind::SOCK_RELEASE => {
            let life = SockLife { ts_ns: raw.ts_ns, cookie: raw.cookie, task: task(&raw) };
            Ok(if raw.kind == kind::SOCK_CREATE {
                Event::Created(life)
            } else {
                Event::Released(life)
            })
        }
        kind::ACCEPT | kind::GRAFT | kind::FD_OPEN | kind::FD_CLOSE | kind::ADDRS => {
            let family = family(raw.family)?;
            let protocol = match raw.protocol {
                IPPROTO_TCP => Protocol::Tcp,
                IPPROTO_UDP => Protocol::Udp,
                other => return Err(DecodeError::UnknownProtocol(other)),
            };
            let fd = FdSocket {
                ts_ns: raw.ts_ns,
                cookie: raw.cookie,
                fd: raw.arg,
                inode: raw.inode,
                task: task(&raw),
                protocol,
                family,
                netns: raw.netns,
                state: TcpState::from_kernel(raw.newstate),
                local: (address(family, &raw.saddr), raw.sport),
                remote: (address(family, &raw.daddr), raw.dport),
            };
            Ok(match raw.kind {
                kind::ACCEPT | kind::GRAFT => Event::Accepted(fd),
                kind::FD_OPEN => Event::FdOpened(fd),
                kind::FD_CLOSE => Event::FdClosed(fd),
                _ => Event::Addresses(fd),
            })
        }
        kind::FORK => {
            Ok(Event::Forked { ts_ns: raw.ts_ns, parent: task(&raw), child_tgid: raw.arg as u32 })
        }
        kind::EXEC => Ok(Event::Exec(task(&raw))),
        kind::EXIT => Ok(Event::Exit(task(&raw))),
        kind::RESET => Ok(Event::Reset { ts_ns: raw.ts_ns, cookie: raw.cookie }),
        kind::CHILD_OF => Ok(Event::ChildOf { skaddr: raw.skaddr, listener: raw.cookie }),
        kind::RETRANSMIT | kind::SYNACK_RETRANSMIT => {
            let family = family(raw.family)?;
            Ok(Event::Retransmit(Retransmit {
                ts_ns: raw.ts_ns,
                cookie: raw.cookie,
                synack: raw.kind == kind::SYNACK_RETRANSMIT,
                netns: raw.netns,
                family,
                local: (address(family, &raw.saddr), raw.sport),
                remote: (address(family, &raw.daddr), raw.dport),
            }))
        }
        other => Err(DecodeError::UnknownKind(other)),
    }
}

/// The `EVENTS` ring buffer, registered with tokio so that reads wait for the kernel's wakeup.
pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
    /// Records that failed to decode since start.
    pub malformed: u64,
}

impl EventReader {
    pub fn new(ring: RingBuf<MapData>) -> std::io::Result<Self> {
        // SAFETY: the RingBuf owns its map fd and lives inside the AsyncFd, so the fd stays
        // open for as long as it is registered.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self { ring, malformed: 0 })
    }

    /// Waits until the ring buffer has data, then appends every available event to `out`.
    pub async fn read_batch(&mut self, out: &mut Vec<Event>) -> std::io::Result<()> {
        let mut guard = self.ring.readable_mut().await?;
        Self::drain(guard.get_inner_mut(), &mut self.malformed, out);
        guard.clear_ready();
        Ok(())
    }

    /// Appends whatever is in the ring buffer now, without waiting (used at shutdown).
    pub fn read_available(&mut self, out: &mut Vec<Event>) {
        Self::drain(self.ring.get_mut(), &mut self.malformed, out);
    }

    fn drain(ring: &mut RingBuf<MapData>, malformed: &mut u64, out: &mut Vec<Event>) {
        while let Some(item) = ring.next() {
            match decode(&item) {
                Ok(event) => out.push(event),
                Err(error) => {
                    *malformed += 1;
                    tracing::debug!("dropping malformed ring buffer record: {error}");
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "events_tests.rs"]
mod tests;
