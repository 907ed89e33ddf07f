//! What `/proc` says about sockets: the `/proc/net` tables (the snapshot's fallback) and
//! which processes hold which socket through `/proc/PID/fd`.
use std::{collections::HashMap, fs::File, io, net::IpAddr};

use super::snapshot::{Holder, NetNamespace, Protocol, SocketRow, in_namespace};
use crate::kernel::events::{Family, TcpState};

/// The /proc/net tables as seen from inside `namespace` (`/proc/thread-self/net` follows the
/// reading thread's namespace).
pub(super) fn read_proc_net(namespace: &NetNamespace) -> io::Result<Vec<SocketRow>> {
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
        scope: None,
    }
}

/// /proc/net does not say whether an IPv6 socket is IPV6_V6ONLY. The kernel sets it on any
/// socket bound to a specific, non-v4-mapped IPv6 address; a wildcard one gets the option's
/// default, net.ipv6.bindv6only (a program may have changed it: this is a guess).
fn v6only_guess(local: IpAddr) -> bool {
    match local {
        IpAddr::V6(v6) if v6.is_unspecified() => {
            std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|v| v.trim() == "1")
        }
        local => super::snapshot::v6only_by_bind(local),
    }
}

/// Socket inode -> processes holding it, from `/proc/*/fd`.
///
/// Hand-rolled rather than procfs's `Process::fd()`, which opens and stats every fd (four
/// system calls each): one `readlink` per fd is what `ss -p` costs too, and at 10k sockets
/// that halves the snapshot. `/proc/PID/stat` is read (with procfs's parser) only for
/// processes that hold a socket.
pub fn socket_owners(
    problems: &mut Vec<String>,
    cgroup_root: Option<&std::path::Path>,
) -> HashMap<u64, Vec<Holder>> {
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
        let mut process: Option<Option<(procfs::process::Stat, u64)>> = None;
        for fd in fds.flatten() {
            let Some(inode) = std::fs::read_link(fd.path()).ok().and_then(|t| socket_inode(&t))
            else {
                continue;
            };
            let Some(fd_number) = fd.file_name().to_str().and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let process = process.get_or_insert_with(|| {
                let stat = procfs::process::Stat::from_file(entry.path().join("stat")).ok()?;
                let cgroup = cgroup_root.and_then(|root| super::cgroup::id_of_pid(root, pid));
                Some((stat, cgroup.unwrap_or(0)))
            });
            let Some((stat, cgroup_id)) = process else { break };
            owners.entry(inode).or_default().push(Holder {
                pid,
                comm: stat.comm.as_str().into(),
                fd: fd_number,
                start_time: Some(stat.starttime),
                cgroup_id: *cgroup_id,
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
    use super::*;

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
        let owners = socket_owners(&mut problems, crate::host::cgroup::root());
        let me = std::process::id();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        assert!(
            owners.values().flatten().any(|o| o.pid == me && o.fd == fd),
            "fd {fd} of pid {me} not found"
        );
    }
}
