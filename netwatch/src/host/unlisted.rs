//! Sockets older than netwatch that no dump lists (a UDP socket never bound, a TCP socket
//! not yet bound or connected), made known by their cookie.
//!
//! The kernel gives a socket its cookie only when something asks: sock_diag does as it dumps,
//! netwatch's programs do for sockets they see created. An unlisted socket created before the
//! agent has none, so the programs cannot name it when it later binds, connects or sends.
//! Asking for `SO_COOKIE` on a copy of one holder's fd (`pidfd_getfd`) gives it one; the copy
//! is closed at once, which the process does not notice.
use std::{
    collections::{HashMap, HashSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    os::unix::fs::MetadataExt as _,
};

use socket2::{Domain, SockRef, Type};

use super::snapshot::{Holder, Protocol, SocketRow};
use crate::kernel::events::{Family, TcpState};

/// Rows for the TCP and UDP sockets in `owners` (inode -> holders) that `listed` lacks, each
/// with its cookie, as CLOSE sockets without a port that no table lists. Sockets that cannot
/// be read (their holder just exited, or closed the fd) are left out: if they are still
/// there, their holders are claimed by inode as before.
pub fn unlisted_sockets(
    owners: &HashMap<u64, Vec<Holder>>,
    listed: &HashSet<u64>,
) -> Vec<SocketRow> {
    owners
        .iter()
        .filter(|(inode, _)| !listed.contains(inode))
        .filter_map(|(&inode, holders)| {
            let holder = holders.first()?;
            let copy = fd_copy(holder.pid, holder.fd).ok()?;
            row_of(&copy, inode, holder.pid).ok().flatten()
        })
        .collect()
}

/// A copy of process `pid`'s fd `fd` in this process.
fn fd_copy(pid: u32, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain system calls; each fd returned is owned once and closed on drop.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let copy = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if copy < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(copy as i32))
    }
}

/// The row of the socket behind `copy`, if it is still the TCP or UDP socket `inode`.
fn row_of(copy: &OwnedFd, inode: u64, pid: u32) -> io::Result<Option<SocketRow>> {
    // The fd may have been closed and reused since /proc was read.
    if std::fs::metadata(format!("/proc/self/fd/{}", copy.as_raw_fd()))?.ino() != inode {
        return Ok(None);
    }
    let socket = SockRef::from(copy);
    let protocol = match socket.r#type()? {
        Type::STREAM => Protocol::Tcp,
        Type::DGRAM => Protocol::Udp,
        _ => return Ok(None),
    };
    let (family, any) = match socket.domain()? {
        Domain::IPV4 => (Family::Ipv4, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        Domain::IPV6 => (Family::Ipv6, IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        _ => return Ok(None),
    };
    let local = socket.local_addr()?.as_socket().map_or((any, 0), |a| (a.ip(), a.port()));
    let netns = socket_netns(copy)
        .or_else(|_| std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino() as u32))?;
    Ok(Some(SocketRow {
        netns,
        protocol,
        family,
        state: TcpState::Close,
        local,
        remote: (any, 0),
        cookie: socket.cookie()?,
        inode,
        uid: 0,
        recv_q: 0,
        send_q: 0,
        timer: None,
        v6only: false,
        scope: None,
    }))
}

/// `SIOCGSKNS` (linux/sockios.h; not in the libc crate): a socket's own network namespace,
/// as an fd. The holder's namespace may differ: a socket keeps the one it was made in.
const SIOCGSKNS: libc::Ioctl = 0x894C;

/// The inode of the network namespace `socket` belongs to.
fn socket_netns(socket: &OwnedFd) -> io::Result<u32> {
    // SAFETY: an ioctl on our own socket fd that returns a new fd, owned below.
    let ns = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCGSKNS) };
    if ns < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `ns` is a new fd from the kernel, owned here only.
    let ns = unsafe { OwnedFd::from_raw_fd(ns) };
    Ok(std::fs::metadata(format!("/proc/self/fd/{}", ns.as_raw_fd()))?.ino() as u32)
}
