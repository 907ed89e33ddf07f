//! The one-time picture of every TCP and UDP socket on the host: netlink sock_diag dumps in
//! every network namespace, joined to the processes holding them through `/proc/*/fd`.
//!
//! A netlink socket answers for the namespace it was created in, so each namespace is dumped
//! from a short-lived thread that first joins it with `setns`. Namespaces are found through
//! `/proc/*/ns/net` (one path per distinct inode) and the names in `/run/netns`.
use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io,
    net::IpAddr,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::PathBuf,
    time::{Duration, Instant},
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use serde::{Deserialize, Serialize};

pub use crate::kernel::events::Protocol;
use crate::kernel::events::{Family, TcpState};

/// The kernel timer running on a socket, as `ss -o` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimerKind {
    On,
    Keepalive,
    Timewait,
    Persist,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    pub kind: TimerKind,
    /// Time left until it fires, at the moment of the dump.
    pub remaining_ms: u32,
}

/// One socket as sock_diag reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketRow {
    pub netns: u32,
    pub protocol: Protocol,
    pub family: Family,
    /// For UDP the kernel reports CLOSE (unconnected) or ESTABLISHED (connected).
    pub state: TcpState,
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
    pub cookie: u64,
    /// sockfs inode (0 for TIME_WAIT and request sockets, which have no file).
    pub inode: u64,
    pub uid: u32,
    pub recv_q: u32,
    pub send_q: u32,
    pub timer: Option<Timer>,
    /// An IPv6 socket with IPV6_V6ONLY (an unspecified-address one without it takes IPv4 too).
    pub v6only: bool,
}

/// A process holding a socket through one of its file descriptors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub comm: String,
    pub fd: i32,
    /// Process start time in clock ticks since boot: (pid, start) names a process uniquely.
    /// None where an event, not /proc, named the holder.
    pub start_time: Option<u64>,
}

/// A network namespace and a path through which it can be entered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetNamespace {
    pub inode: u32,
    pub path: PathBuf,
    /// The `ip netns` name, when it has one.
    pub name: Option<String>,
}

#[derive(Debug, Default)]
pub struct Snapshot {
    pub rows: Vec<SocketRow>,
    /// Socket inode -> the processes holding it, in pid then fd order.
    pub owners: HashMap<u64, Vec<Holder>>,
    pub namespaces: Vec<NetNamespace>,
    /// Namespaces or processes that could not be read (they may have just gone away).
    pub problems: Vec<String>,
    pub took: Duration,
}

impl Snapshot {
    /// Dumps every namespace and joins owners.
    pub fn take() -> Snapshot {
        Snapshot::take_from(Source::SockDiag)
    }

    /// Dumps every namespace from `source`; sock_diag falls back to /proc/net per namespace
    /// when it fails (a kernel without inet_diag), and says so in `problems`.
    pub fn take_from(source: Source) -> Snapshot {
        let started = Instant::now();
        let mut snapshot = Snapshot { namespaces: network_namespaces(), ..Default::default() };
        for namespace in &snapshot.namespaces {
            let rows = match source {
                Source::SockDiag => dump_namespace(namespace).or_else(|error| {
                    snapshot.problems.push(format!(
                        "netns {}: sock_diag failed ({error}); read /proc/net instead (no \
                         cookies, timers or IPV6_V6ONLY)",
                        namespace.inode
                    ));
                    read_proc_net(namespace)
                }),
                Source::ProcNet => read_proc_net(namespace),
            };
            match rows {
                Ok(rows) => snapshot.rows.extend(rows),
                Err(error) => snapshot.problems.push(format!(
                    "netns {} ({}): {error}",
                    namespace.inode,
                    namespace.path.display()
                )),
            }
        }
        snapshot.owners = socket_owners(&mut snapshot.problems);
        snapshot.took = started.elapsed();
        snapshot
    }
}

/// Every distinct network namespace: named ones (`/run/netns/*`) first, then those only
/// reachable through a process.
pub fn network_namespaces() -> Vec<NetNamespace> {
    let mut found: BTreeMap<u32, NetNamespace> = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let path = entry.path();
            if let Ok(meta) = std::fs::metadata(&path) {
                let name = entry.file_name().to_string_lossy().into_owned();
                found.entry(meta.ino() as u32).or_insert(NetNamespace {
                    inode: meta.ino() as u32,
                    path,
                    name: Some(name),
                });
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let path = entry.path().join("ns/net");
            if let Ok(meta) = std::fs::metadata(&path) {
                found.entry(meta.ino() as u32).or_insert(NetNamespace {
                    inode: meta.ino() as u32,
                    path,
                    name: None,
                });
            }
        }
    }
    found.into_values().collect()
}

/// Runs `work` inside the network namespace at `path`, from a thread of its own so that the
/// caller's namespace never changes.
fn in_namespace<T: Send>(
    path: &std::path::Path,
    work: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    let file = File::open(path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: a valid namespace fd; setns only changes the calling thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                work()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    })
}

/// Runs the four dumps (TCP/UDP x IPv4/IPv6) of `namespace`.
fn dump_namespace(namespace: &NetNamespace) -> io::Result<Vec<SocketRow>> {
    let mut diag = DiagSocket::open(&namespace.path, namespace.inode)?;
    let mut rows = Vec::new();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        for family in [Family::Ipv4, Family::Ipv6] {
            diag.query(protocol, family, None, StateFlags::all(), &mut rows)?;
        }
    }
    Ok(rows)
}

/// Where a snapshot reads sockets from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Netlink sock_diag: cookies, timers, IPV6_V6ONLY.
    SockDiag,
    /// `/proc/net/{tcp,tcp6,udp,udp6}`, as netstat reads them: addresses, states, queues,
    /// uid and inode only.
    ProcNet,
}

/// The /proc/net tables as seen from inside `namespace` (`/proc/thread-self/net` follows the
/// reading thread's namespace).
fn read_proc_net(namespace: &NetNamespace) -> io::Result<Vec<SocketRow>> {
    use procfs::FromBufReadSI as _;
    let netns = namespace.inode;
    in_namespace(&namespace.path, move || {
        let open = |name: &str| -> io::Result<std::io::BufReader<File>> {
            Ok(std::io::BufReader::new(File::open(format!("/proc/thread-self/net/{name}"))?))
        };
        let info = procfs::current_system_info();
        let bad = |e: procfs::ProcError| io::Error::other(e.to_string());
        let mut rows = Vec::new();
        // The TCP and UDP tables are different types with the same columns.
        macro_rules! read {
            ($entries:ty, $protocol:expr, $files:expr) => {
                for (name, family) in $files {
                    for e in <$entries>::from_buf_read(open(name)?, info).map_err(bad)?.0 {
                        let Some(state) = TcpState::from_kernel(e.state as u8) else { continue };
                        let (local, remote) = (e.local_address, e.remote_address);
                        let queues = (e.rx_queue, e.tx_queue);
                        let row = proc_row(
                            netns, $protocol, family, state, local, remote, queues, e.uid, e.inode,
                        );
                        rows.push(row);
                    }
                }
            };
        }
        read!(
            procfs::net::TcpNetEntries,
            Protocol::Tcp,
            [("tcp", Family::Ipv4), ("tcp6", Family::Ipv6)]
        );
        read!(
            procfs::net::UdpNetEntries,
            Protocol::Udp,
            [("udp", Family::Ipv4), ("udp6", Family::Ipv6)]
        );
        Ok(rows)
    })
}

#[allow(clippy::too_many_arguments)] // one row's columns, as /proc/net lists them
fn proc_row(
    netns: u32,
    protocol: Protocol,
    family: Family,
    state: TcpState,
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
    (recv_q, send_q): (u32, u32),
    uid: u32,
    inode: u64,
) -> SocketRow {
    SocketRow {
        netns,
        protocol,
        family,
        state,
        local: (local.ip(), local.port()),
        remote: (remote.ip(), remote.port()),
        cookie: 0,
        inode,
        uid,
        recv_q,
        send_q,
        timer: None,
        v6only: v6only_guess(local.ip()),
    }
}

/// /proc/net does not say whether an IPv6 socket is IPV6_V6ONLY. The kernel sets it on any
/// socket bound to a specific, non-v4-mapped IPv6 address; a wildcard one gets the option's
/// default, net.ipv6.bindv6only (a program may have changed it: this is a guess).
fn v6only_guess(local: IpAddr) -> bool {
    match local {
        IpAddr::V4(_) => false,
        IpAddr::V6(v6) if v6.is_unspecified() => {
            std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|v| v.trim() == "1")
        }
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_none(),
    }
}

/// Offset of `idiag_expires` in the netlink message (16-byte header + inet_diag_msg field).
/// Read by hand because netlink-packet-sock-diag drops it for TIME_WAIT rows.
const EXPIRES_OFFSET: usize = 16 + 4 + 48;

/// A sock_diag socket opened inside one network namespace. It answers for that namespace
/// from any thread, so only opening it needs a thread that joins the namespace; a batch of
/// lookups shares one. It also keeps the namespace alive: drop it after the batch.
pub struct DiagSocket {
    socket: Socket,
    netns: u32,
    sequence: u32,
    receive: Vec<u8>,
}

impl DiagSocket {
    /// Opens a socket in the namespace at `path` (inode `netns`).
    pub fn open(path: &std::path::Path, netns: u32) -> io::Result<DiagSocket> {
        let socket = in_namespace(path, || {
            let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
            socket.bind_auto()?;
            socket.connect(&SocketAddr::new(0, 0))?;
            Ok(socket)
        })?;
        Ok(DiagSocket { socket, netns, sequence: 0, receive: vec![0; 1 << 16] })
    }

    /// The socket the kernel keeps for a TCP 4-tuple (after its full socket closed: the
    /// timewait socket, if any). An exact lookup, not a dump.
    pub fn lookup_tcp(
        &mut self,
        family: Family,
        local: (IpAddr, u16),
        remote: (IpAddr, u16),
    ) -> io::Result<Option<SocketRow>> {
        let mut rows = Vec::new();
        self.query(Protocol::Tcp, family, Some((local, remote)), StateFlags::all(), &mut rows)?;
        Ok(rows.pop())
    }

    /// The TCP listeners and half-open (SYN_RECV request) sockets: the kernel's accept queue
    /// length (a listener's `recv_q`) and backlog (`send_q`) right now. Queue lengths change
    /// with every packet and no tracepoint reports them; this is read when a user asks.
    pub fn passive_sockets(&mut self) -> io::Result<Vec<SocketRow>> {
        let mut rows = Vec::new();
        for family in [Family::Ipv4, Family::Ipv6] {
            let states = StateFlags::LISTEN | StateFlags::SYN_RECV;
            self.query(Protocol::Tcp, family, None, states, &mut rows)?;
        }
        Ok(rows)
    }

    /// The namespace's TCP sockets in TIME_WAIT or FIN_WAIT2, timewait sockets among them
    /// (a timewait socket's state is its substate).
    pub fn timewait_sockets(&mut self) -> io::Result<Vec<SocketRow>> {
        let mut rows = Vec::new();
        for family in [Family::Ipv4, Family::Ipv6] {
            let states = StateFlags::TIME_WAIT | StateFlags::FIN_WAIT2;
            self.query(Protocol::Tcp, family, None, states, &mut rows)?;
        }
        Ok(rows)
    }

    /// A sock_diag dump of every socket of `protocol` and `family` in `states`, or, given a
    /// 4-tuple, the exact lookup of one; rows go to `rows`. Replies to earlier requests (left
    /// by a failed one) are told apart by sequence number and skipped.
    fn query(
        &mut self,
        protocol: Protocol,
        family: Family,
        exact: Option<((IpAddr, u16), (IpAddr, u16))>,
        states: StateFlags,
        rows: &mut Vec<SocketRow>,
    ) -> io::Result<()> {
        self.sequence = self.sequence.wrapping_add(1);
        let (socket, netns, sequence) = (&mut self.socket, self.netns, self.sequence);
        let receive = &mut self.receive;
        let mut header = NetlinkHeader::default();
        header.sequence_number = sequence;
        header.flags = if exact.is_some() { NLM_F_REQUEST } else { NLM_F_REQUEST | NLM_F_DUMP };
        let mut socket_id = match family {
            Family::Ipv4 => SocketId::new_v4(),
            Family::Ipv6 => SocketId::new_v6(),
        };
        if let Some((local, remote)) = exact {
            (socket_id.source_address, socket_id.source_port) = local;
            (socket_id.destination_address, socket_id.destination_port) = remote;
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
                extensions: ExtensionFlags::empty(),
                states,
                socket_id,
            })
            .into(),
        );
        request.finalize();
        let mut buffer = vec![0; request.buffer_len()];
        request.serialize(&mut buffer);
        socket.send(&buffer, 0)?;

        loop {
            let size = socket.recv(&mut &mut receive[..], 0)?;
            let datagram = &receive[..size];
            if parse_replies(datagram, sequence, netns, protocol, exact.is_some(), rows)? {
                return Ok(());
            }
        }
    }
}

/// Reads one datagram of sock_diag replies to request `sequence` into `rows`; true once the
/// answer is complete (the dump's DONE, an exact lookup's one reply or ENOENT). Replies to
/// other requests are skipped; anything malformed is an error, never a panic.
pub fn parse_replies(
    datagram: &[u8],
    sequence: u32,
    netns: u32,
    protocol: Protocol,
    exact: bool,
    rows: &mut Vec<SocketRow>,
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
                let expires = bytes
                    .get(EXPIRES_OFFSET..EXPIRES_OFFSET + 4)
                    .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                let v6only = response.nlas.iter().any(|nla| {
                    matches!(nla, netlink_packet_sock_diag::inet::nlas::Nla::SkV6Only(true))
                });
                if let Some(row) = row_from(netns, protocol, &response.header, expires, v6only) {
                    rows.push(row);
                }
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
    netns: u32,
    protocol: Protocol,
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
        netns,
        protocol,
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
    })
}

/// Socket inode -> processes holding it, from `/proc/*/fd`.
///
/// Hand-rolled rather than procfs's `Process::fd()`, which opens and stats every fd (four
/// system calls each): one `readlink` per fd is what `ss -p` costs too, and at 10k sockets
/// that halves the snapshot. `/proc/PID/stat` is read (with procfs's parser) only for
/// processes that hold a socket.
pub fn socket_owners(problems: &mut Vec<String>) -> HashMap<u64, Vec<Holder>> {
    use procfs::FromRead as _;
    let mut owners: HashMap<u64, Vec<Holder>> = HashMap::new();
    let entries = match std::fs::read_dir("/proc") {
        Ok(entries) => entries,
        Err(error) => {
            problems.push(format!("cannot list /proc: {error}"));
            return owners;
        }
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
            continue;
        };
        // Processes exit while we look: whatever cannot be read is simply not there any more.
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let mut process: Option<Option<procfs::process::Stat>> = None;
        for fd in fds.flatten() {
            let Some(inode) = std::fs::read_link(fd.path()).ok().and_then(|t| socket_inode(&t))
            else {
                continue;
            };
            let Some(fd_number) = fd.file_name().to_str().and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let stat = process.get_or_insert_with(|| {
                procfs::process::Stat::from_file(entry.path().join("stat")).ok()
            });
            let Some(stat) = stat else { break };
            owners.entry(inode).or_default().push(Holder {
                pid,
                comm: stat.comm.clone(),
                fd: fd_number,
                start_time: Some(stat.starttime),
            });
        }
    }
    for list in owners.values_mut() {
        list.sort_by_key(|o| (o.pid, o.fd));
    }
    owners
}

/// fd -> socket inode for one process (empty if it is gone).
pub fn socket_fds(pid: u32) -> HashMap<i32, u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return HashMap::new() };
    fds.flatten()
        .filter_map(|fd| {
            let inode = socket_inode(&std::fs::read_link(fd.path()).ok()?)?;
            Some((fd.file_name().to_str()?.parse().ok()?, inode))
        })
        .collect()
}

/// The inode of an fd link target `socket:[12345]`.
fn socket_inode(target: &std::path::Path) -> Option<u64> {
    target.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
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

    fn done(sequence: u32) -> Vec<u8> {
        message(sequence, NetlinkPayload::Done(DoneMessage::default()))
    }

    #[test]
    fn replies_are_read_until_done_and_other_requests_are_skipped() {
        let datagram = [socket_reply(3, 80), socket_reply(2, 81), socket_reply(3, 82)].concat();
        let mut rows = Vec::new();
        let done_yet = parse_replies(&datagram, 3, 1, Protocol::Tcp, false, &mut rows).unwrap();
        assert!(!done_yet);
        let ports: Vec<u16> = rows.iter().map(|r| r.local.1).collect();
        assert_eq!(ports, [80, 82], "the reply to request 2 is not ours");
        assert_eq!((rows[0].cookie, rows[0].inode, rows[0].state), (7, 42, TcpState::Established));
        assert!(parse_replies(&done(3), 3, 1, Protocol::Tcp, false, &mut rows).unwrap());
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
            let _ = parse_replies(&datagram, 1, 1, Protocol::Tcp, false, &mut rows);
            prop_assert!(rows.len() <= 2);
        }
    }

    #[test]
    fn socket_links_give_their_inode() {
        assert_eq!(socket_inode(std::path::Path::new("socket:[4026]")), Some(4026));
        assert_eq!(socket_inode(std::path::Path::new("pipe:[4026]")), None);
        assert_eq!(socket_inode(std::path::Path::new("/dev/null")), None);
        assert_eq!(socket_inode(std::path::Path::new("socket:[x]")), None);
    }

    #[test]
    fn finds_this_process_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut problems = Vec::new();
        let owners = socket_owners(&mut problems);
        let me = std::process::id();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        assert!(
            owners.values().flatten().any(|o| o.pid == me && o.fd == fd),
            "fd {fd} of pid {me} not found"
        );
    }
}
