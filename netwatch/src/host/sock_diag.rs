//! Netlink sock_diag: a socket opened inside one namespace, the requests netwatch makes of it
//! (dumps by state, exact 4-tuple lookups), and the parser of its replies.
use std::{collections::HashMap, io, net::IpAddr};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
pub use netlink_packet_sock_diag::inet::nlas::TcpInfo;
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use super::snapshot::{Protocol, SocketRow, Timer, TimerKind, in_namespace, is_link_local};
use crate::kernel::events::{Family, TcpState};

/// Offset of `idiag_expires` in the netlink message (16-byte header + inet_diag_msg field).
/// Read by hand because netlink-packet-sock-diag drops it for TIME_WAIT rows.
const EXPIRES_OFFSET: usize = 16 + 4 + 48;

/// A sock_diag socket opened inside one network namespace. It answers for that namespace
/// from any thread, so only opening it needs a thread that joins the namespace; a batch of
/// lookups shares one. It also keeps the namespace alive: drop it after the batch.
pub struct DiagSocket {
    socket: Socket,
    netns: u32,
    interfaces: Interfaces,
    sequence: u32,
    receive: Vec<u8>,
}

impl DiagSocket {
    /// Opens a socket in the namespace at `path` (inode `netns`).
    pub fn open(path: &std::path::Path, netns: u32) -> io::Result<DiagSocket> {
        let (socket, interfaces) = in_namespace(path, Self::connected)?;
        Ok(DiagSocket { socket, netns, interfaces, sequence: 0, receive: vec![0; 1 << 16] })
    }

    /// Opens a socket in the calling thread's own namespace (inode `netns`): joining no
    /// namespace, it needs no privilege.
    pub fn open_here(netns: u32) -> io::Result<DiagSocket> {
        let (socket, interfaces) = Self::connected()?;
        Ok(DiagSocket { socket, netns, interfaces, sequence: 0, receive: vec![0; 1 << 16] })
    }

    fn connected() -> io::Result<(Socket, Interfaces)> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok((socket, Interfaces::of_this_namespace()))
    }

    /// The socket the kernel keeps for a TCP 4-tuple (after its full socket closed: the
    /// timewait socket, if any). An exact lookup, not a dump. A socket with an IPv6 link-local
    /// address is bound to its interface and found only with it, so each of the namespace's
    /// interfaces is tried in turn.
    pub fn lookup_tcp(
        &mut self,
        family: Family,
        local: (IpAddr, u16),
        remote: (IpAddr, u16),
    ) -> io::Result<Option<SocketRow>> {
        let mut interfaces = vec![0];
        if is_link_local(local.0) || is_link_local(remote.0) {
            interfaces.extend(self.interfaces.0.keys().copied());
        }
        let mut rows = Vec::new();
        for interface in interfaces {
            let exact = Some(Exact { local, remote, interface });
            self.query(Protocol::Tcp, family, exact, StateFlags::all(), &mut rows)?;
            if let Some(row) = rows.pop() {
                return Ok(Some(row));
            }
        }
        Ok(None)
    }

    /// The TCP listeners and half-open (SYN_RECV request) sockets: the kernel's accept queue
    /// length (a listener's `recv_q`) and backlog (`send_q`) right now. Queue lengths change
    /// with every packet and no tracepoint reports them; this is read when a user asks.
    pub fn passive_sockets(&mut self) -> io::Result<Vec<SocketRow>> {
        let mut rows = Vec::new();
        for family in [Family::Ipv4, Family::Ipv6] {
            let states = StateFlags::LISTEN | StateFlags::SYN_RECV;
            self.query(Protocol::Tcp, family, None, states.clone(), &mut rows)?;
        }
        Ok(rows)
    }

    /// The namespace's TCP sockets in TIME_WAIT or FIN_WAIT2, timewait sockets among them
    /// (a timewait socket's state is its substate).
    pub fn timewait_sockets(&mut self) -> io::Result<Vec<SocketRow>> {
        self.tcp_sockets_in(StateFlags::TIME_WAIT | StateFlags::FIN_WAIT2)
    }

    /// Every TCP socket in FIN_WAIT2, full or timewait (the substate).
    pub fn fin_wait2_sockets(&mut self) -> io::Result<Vec<SocketRow>> {
        self.tcp_sockets_in(StateFlags::FIN_WAIT2)
    }

    /// A TCP connection's `tcp_info` now (INET_DIAG_INFO), by exact 4-tuple lookup; None when
    /// the socket with that 4-tuple is gone or is another one than `cookie`.
    pub fn tcp_info(
        &mut self,
        family: Family,
        local: (IpAddr, u16),
        remote: (IpAddr, u16),
        cookie: u64,
    ) -> io::Result<Option<Box<TcpInfo>>> {
        let exact = Some(Exact { local, remote, interface: 0 });
        let mut found = None;
        let (states, info) = (StateFlags::all(), ExtensionFlags::INFO);
        self.request(Protocol::Tcp, family, exact, states, info, |sequence, datagram| {
            read_replies(datagram, sequence, true, |response, _| {
                if u64::from_ne_bytes(response.header.socket_id.cookie) == cookie {
                    found = response.nlas.iter().find_map(|nla| match nla {
                        Nla::TcpInfo(info) => Some(Box::new(info.clone())),
                        _ => None,
                    });
                }
            })
        })?;
        Ok(found)
    }

    /// Every TCP and UDP socket of the namespace as the kernel has it now (queues, uid,
    /// inode, timer), each TCP one with its `tcp_info` if `info` is asked for: what the
    /// table adds to an agent's rows, and `-i`.
    pub fn detailed(&mut self, info: bool) -> io::Result<Vec<(SocketRow, Option<Box<TcpInfo>>)>> {
        let interfaces = std::mem::take(&mut self.interfaces);
        let netns = self.netns;
        let mut found = Vec::new();
        let mut result = Ok(());
        'dumps: for protocol in [Protocol::Tcp, Protocol::Udp] {
            let extensions = match protocol {
                Protocol::Tcp if info => ExtensionFlags::INFO,
                _ => ExtensionFlags::empty(),
            };
            for family in [Family::Ipv4, Family::Ipv6] {
                let states = StateFlags::all();
                result = self.request(
                    protocol,
                    family,
                    None,
                    states,
                    extensions.clone(),
                    |sequence, datagram| {
                        let context = Context {
                            sequence,
                            netns,
                            protocol,
                            exact: false,
                            interfaces: &interfaces,
                        };
                        read_replies(datagram, sequence, false, |response, bytes| {
                            if let Some(row) = row_of(&context, response, bytes) {
                                let info = response.nlas.iter().find_map(|nla| match nla {
                                    Nla::TcpInfo(info) => Some(Box::new(info.clone())),
                                    _ => None,
                                });
                                found.push((row, info));
                            }
                        })
                    },
                );
                if result.is_err() {
                    break 'dumps;
                }
            }
        }
        self.interfaces = interfaces;
        result.map(|()| found)
    }

    fn tcp_sockets_in(&mut self, states: StateFlags) -> io::Result<Vec<SocketRow>> {
        let mut rows = Vec::new();
        for family in [Family::Ipv4, Family::Ipv6] {
            self.query(Protocol::Tcp, family, None, states.clone(), &mut rows)?;
        }
        Ok(rows)
    }

    /// A sock_diag dump of every socket of `protocol` and `family` in `states`, or, given a
    /// 4-tuple, the exact lookup of one; rows go to `rows`.
    pub(super) fn query(
        &mut self,
        protocol: Protocol,
        family: Family,
        exact: Option<Exact>,
        states: StateFlags,
        rows: &mut Vec<SocketRow>,
    ) -> io::Result<()> {
        // Taken for the request's length: the replies are read against them.
        let interfaces = std::mem::take(&mut self.interfaces);
        let netns = self.netns;
        let result = self.request(
            protocol,
            family,
            exact,
            states,
            ExtensionFlags::empty(),
            |sequence, datagram| {
                let context = Context {
                    sequence,
                    netns,
                    protocol,
                    exact: exact.is_some(),
                    interfaces: &interfaces,
                };
                parse_replies(datagram, &context, rows)
            },
        );
        self.interfaces = interfaces;
        result
    }

    /// Sends one request and hands each datagram of replies to `read` (with the request's
    /// sequence number) until it says the answer is complete. Replies to earlier requests
    /// (left by a failed one) are told apart by sequence number and skipped.
    fn request(
        &mut self,
        protocol: Protocol,
        family: Family,
        exact: Option<Exact>,
        states: StateFlags,
        extensions: ExtensionFlags,
        mut read: impl FnMut(u32, &[u8]) -> io::Result<bool>,
    ) -> io::Result<()> {
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;
        let mut header = NetlinkHeader::default();
        header.sequence_number = sequence;
        header.flags = if exact.is_some() { NLM_F_REQUEST } else { NLM_F_REQUEST | NLM_F_DUMP };
        let mut socket_id = match family {
            Family::Ipv4 => SocketId::new_v4(),
            Family::Ipv6 => SocketId::new_v6(),
        };
        if let Some(Exact { local, remote, interface }) = exact {
            (socket_id.source_address, socket_id.source_port) = local;
            (socket_id.destination_address, socket_id.destination_port) = remote;
            socket_id.interface_id = interface;
            socket_id.cookie = [0xff; 8]; // INET_DIAG_NOCOOKIE: match on the 4-tuple alone
        }
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family: match family {
                    Family::Ipv4 => AF_INET,
                    Family::Ipv6 => AF_INET6,
                },
                protocol: match protocol {
                    Protocol::Tcp => IPPROTO_TCP,
                    Protocol::Udp => IPPROTO_UDP,
                },
                extensions,
                states,
                socket_id,
            })
            .into(),
        );
        request.finalize();
        let mut buffer = vec![0; request.buffer_len()];
        request.serialize(&mut buffer);
        self.socket.send(&buffer, 0)?;
        loop {
            let size = self.socket.recv(&mut &mut self.receive[..], 0)?;
            if read(sequence, &self.receive[..size])? {
                return Ok(());
            }
        }
    }
}

/// An exact lookup's 4-tuple, and the interface a bound socket is found with (0: none).
#[derive(Clone, Copy, Debug)]
pub(super) struct Exact {
    local: (IpAddr, u16),
    remote: (IpAddr, u16),
    interface: u32,
}

/// The namespace's interface names by index, read when its sock_diag socket is opened: a
/// socket bound to an interface is shown with its name, as ss shows it.
#[derive(Debug, Default)]
pub struct Interfaces(HashMap<u32, String>);

impl Interfaces {
    /// The interfaces of the calling thread's network namespace.
    fn of_this_namespace() -> Interfaces {
        let mut names = HashMap::new();
        // SAFETY: if_nameindex returns an array ended by a zero entry, freed below; each name
        // is a NUL-terminated string inside it.
        unsafe {
            let list = libc::if_nameindex();
            if !list.is_null() {
                let mut entry = list;
                while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
                    let name = std::ffi::CStr::from_ptr((*entry).if_name);
                    names.insert((*entry).if_index, name.to_string_lossy().into_owned());
                    entry = entry.add(1);
                }
                libc::if_freenameindex(list);
            }
        }
        Interfaces(names)
    }

    /// The name of interface `index`, or `if<index>` for one gone since (ss's fallback).
    fn name(&self, index: u32) -> Option<String> {
        (index != 0).then(|| self.0.get(&index).cloned().unwrap_or_else(|| format!("if{index}")))
    }
}

/// What a reply is read against: the request, and the namespace it was made in.
pub struct Context<'a> {
    pub sequence: u32,
    pub netns: u32,
    pub protocol: Protocol,
    /// An exact lookup (one reply, or ENOENT) rather than a dump.
    pub exact: bool,
    pub interfaces: &'a Interfaces,
}

/// Reads one datagram of sock_diag replies to the request into `rows`; true once the answer
/// is complete (the dump's DONE, an exact lookup's one reply or ENOENT). Replies to other
/// requests are skipped; anything malformed is an error, never a panic.
pub fn parse_replies(
    datagram: &[u8],
    context: &Context<'_>,
    rows: &mut Vec<SocketRow>,
) -> io::Result<bool> {
    read_replies(datagram, context.sequence, context.exact, |response, bytes| {
        if let Some(row) = row_of(context, response, bytes) {
            rows.push(row);
        }
    })
}

/// The row of one reply (`bytes`, its whole message); None for a family or state netwatch
/// does not know.
fn row_of(context: &Context<'_>, response: &InetResponse, bytes: &[u8]) -> Option<SocketRow> {
    let expires = bytes
        .get(EXPIRES_OFFSET..EXPIRES_OFFSET + 4)
        .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    let v6only = response.nlas.iter().any(|nla| matches!(nla, Nla::SkV6Only(true)));
    row_from(context, &response.header, expires, v6only)
}

/// Reads one datagram of replies to request `sequence`, handing each socket to `each` with
/// its message's bytes; true once the answer is complete (the dump's DONE, an exact lookup's
/// one reply or ENOENT). Replies to other requests are skipped; anything malformed is an
/// error, never a panic.
fn read_replies(
    datagram: &[u8],
    sequence: u32,
    exact: bool,
    mut each: impl FnMut(&InetResponse, &[u8]),
) -> io::Result<bool> {
    let malformed = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut offset = 0;
    while offset < datagram.len() {
        let bytes = &datagram[offset..];
        let message = NetlinkMessage::<SockDiagMessage>::deserialize(bytes)
            .map_err(|e| malformed(format!("sock_diag reply: {e}")))?;
        let length = message.header.length as usize;
        if length == 0 {
            return Err(malformed("sock_diag reply of length 0".into()));
        }
        offset += length;
        if message.header.sequence_number != sequence {
            continue;
        }
        match message.payload {
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(error) => {
                let code = error.code.map_or(0, |c| -c.get());
                // An exact lookup of a socket that is not there answers ENOENT.
                if exact && code == libc::ENOENT {
                    return Ok(true);
                }
                return Err(io::Error::other(format!(
                    "sock_diag: {}",
                    io::Error::from_raw_os_error(code)
                )));
            }
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                each(&response, bytes);
                if exact {
                    return Ok(true);
                }
            }
            _ => {}
        }
    }
    Ok(false)
}

fn row_from(
    context: &Context<'_>,
    header: &netlink_packet_sock_diag::inet::InetResponseHeader,
    expires_ms: u32,
    v6only: bool,
) -> Option<SocketRow> {
    use netlink_packet_sock_diag::inet::Timer as DiagTimer;
    let id = &header.socket_id;
    let family = match header.family {
        AF_INET => Family::Ipv4,
        AF_INET6 => Family::Ipv6,
        _ => return None,
    };
    let timer = header.timer.as_ref().map(|timer| Timer {
        kind: match timer {
            DiagTimer::Retransmit(..) => TimerKind::On,
            DiagTimer::KeepAlive(_) => TimerKind::Keepalive,
            DiagTimer::TimeWait => TimerKind::Timewait,
            DiagTimer::Probe(_) => TimerKind::Persist,
        },
        remaining_ms: expires_ms,
    });
    Some(SocketRow {
        netns: context.netns,
        protocol: context.protocol,
        family,
        state: TcpState::from_kernel(header.state)?,
        local: (id.source_address, id.source_port),
        remote: (id.destination_address, id.destination_port),
        cookie: u64::from_ne_bytes(id.cookie),
        inode: u64::from(header.inode),
        uid: header.uid,
        recv_q: header.recv_queue,
        send_q: header.send_queue,
        timer,
        v6only,
        scope: context.interfaces.name(id.interface_id),
    })
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::DoneMessage;
    use netlink_packet_sock_diag::inet::{InetResponse, InetResponseHeader};
    use proptest::prelude::*;

    use super::*;

    /// One netlink message as the kernel would send it.
    fn message(sequence: u32, payload: NetlinkPayload<SockDiagMessage>) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = sequence;
        let mut message = NetlinkMessage::new(header, payload);
        message.finalize();
        let mut buffer = vec![0; message.buffer_len()];
        message.serialize(&mut buffer);
        buffer
    }

    /// A dump's reply: one ESTABLISHED IPv4 socket on local port `port`.
    fn socket_reply(sequence: u32, port: u16) -> Vec<u8> {
        let mut socket_id = SocketId::new_v4();
        socket_id.source_address = IpAddr::from([127, 0, 0, 1]);
        socket_id.source_port = port;
        socket_id.destination_address = IpAddr::from([127, 0, 0, 1]);
        socket_id.destination_port = 40000;
        socket_id.cookie = 7u64.to_ne_bytes();
        let header = InetResponseHeader {
            family: AF_INET,
            state: 1,
            timer: None,
            socket_id,
            recv_queue: 0,
            send_queue: 0,
            uid: 0,
            inode: 42,
        };
        let response = InetResponse { header, nlas: Default::default() };
        message(sequence, SockDiagMessage::InetResponse(Box::new(response)).into())
    }

    static NO_INTERFACES: std::sync::LazyLock<Interfaces> =
        std::sync::LazyLock::new(Interfaces::default);

    fn context(sequence: u32) -> Context<'static> {
        Context {
            sequence,
            netns: 1,
            protocol: Protocol::Tcp,
            exact: false,
            interfaces: &NO_INTERFACES,
        }
    }

    fn done(sequence: u32) -> Vec<u8> {
        message(sequence, NetlinkPayload::Done(DoneMessage::default()))
    }

    #[test]
    fn replies_are_read_until_done_and_other_requests_are_skipped() {
        let datagram = [socket_reply(3, 80), socket_reply(2, 81), socket_reply(3, 82)].concat();
        let mut rows = Vec::new();
        let done_yet = parse_replies(&datagram, &context(3), &mut rows).unwrap();
        assert!(!done_yet);
        let ports: Vec<u16> = rows.iter().map(|r| r.local.1).collect();
        assert_eq!(ports, [80, 82], "the reply to request 2 is not ours");
        assert_eq!((rows[0].cookie, rows[0].inode, rows[0].state), (7, 42, TcpState::Established));
        assert!(parse_replies(&done(3), &context(3), &mut rows).unwrap());
    }

    proptest! {
        /// Truncated, bit-flipped or random replies are errors or rows, never a panic, and
        /// never more rows than messages.
        #[test]
        fn malformed_replies_never_panic(
            cut in 0usize..400,
            flips in prop::collection::vec((0usize..400, any::<u8>()), 0..8),
            noise in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut datagram =
                [socket_reply(1, 80), socket_reply(1, 81), done(1)].concat();
            datagram.truncate(cut.min(datagram.len()));
            for (at, bits) in flips {
                if let Some(byte) = datagram.get_mut(at) {
                    *byte ^= bits;
                }
            }
            datagram.extend(noise);
            let mut rows = Vec::new();
            let _ = parse_replies(&datagram, &context(1), &mut rows);
            prop_assert!(rows.len() <= 2);
        }
    }
}
