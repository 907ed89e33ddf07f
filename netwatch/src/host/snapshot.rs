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

use netlink_packet_sock_diag::inet::StateFlags;
use serde::{Deserialize, Serialize};

use super::{
    procfs::{read_proc_net, socket_owners},
    sock_diag::DiagSocket,
};

pub use crate::kernel::events::Protocol;
use crate::kernel::events::{Comm, Family, TcpState};

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
    /// The interface the socket is bound to (SO_BINDTODEVICE, or a link-local address's
    /// scope), which ss shows as `ADDR%IF`; none when unbound or not known (/proc/net).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// Whether binding to `local` makes an IPv6 socket IPV6_V6ONLY: any IPv6 address but `::`
/// and a v4-mapped one does (the kernel's `__inet6_bind`), which ss shows in its peer
/// (`[::]:*`, not `*:*`).
pub fn v6only_by_bind(local: IpAddr) -> bool {
    matches!(local, IpAddr::V6(v6) if !v6.is_unspecified() && v6.to_ipv4_mapped().is_none())
}

/// An IPv6 link-local address: a socket with one is always bound to its interface.
pub fn is_link_local(addr: IpAddr) -> bool {
    matches!(addr, IpAddr::V6(v6) if v6.is_unicast_link_local())
}

/// A process holding a socket through one of its file descriptors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub comm: Comm,
    pub fd: i32,
    /// Process start time in clock ticks since boot: (pid, start) names a process uniquely.
    /// None where an event, not /proc, named the holder.
    pub start_time: Option<u64>,
    /// The process's cgroup v2 id when it was found (0: not known).
    #[serde(default, skip_serializing)]
    pub cgroup_id: u64,
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
    /// Held sockets no dump lists (never bound or connected), given a cookie: only when asked
    /// for ([`Snapshot::find_unlisted`]).
    pub unlisted: Vec<SocketRow>,
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
        snapshot.owners = socket_owners(&mut snapshot.problems, super::cgroup::root());
        snapshot.took = started.elapsed();
        snapshot
    }
}

impl Snapshot {
    /// Finds the held sockets no dump lists and gives each a cookie (see [`super::unlisted`]),
    /// so that a table kept from events can follow them when they bind, connect or send.
    pub fn find_unlisted(&mut self) {
        let listed: std::collections::HashSet<u64> = self.rows.iter().map(|r| r.inode).collect();
        self.unlisted = super::unlisted::unlisted_sockets(&self.owners, &listed);
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
pub(super) fn in_namespace<T: Send>(
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
