//! Ownership: the system calls that give a process a socket fd, take one away, pass one over
//! a unix socket, or change a socket's addresses, each looked up in the acting process's own
//! fd table.

use crate::{globals::*, record::*, state::*};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_get_current_task, bpf_probe_read_user},
    },
    macros::{map, tracepoint},
    maps::LruHashMap,
    programs::TracePointContext,
};
use netwatch_common::{IPPROTO_TCP, IPPROTO_UDP, kind};

// ---------------------------------------------------------------------------------------------
// Ownership: system calls that give a process a socket fd, take one away, or change a
// socket's addresses, and the process lifecycle. All run in the acting process, so the fd is
// looked up in that process's own fd table (task -> files -> fdt -> fd[n] -> file -> socket).
// ---------------------------------------------------------------------------------------------

/// A socket found behind an fd of the current task.
pub(crate) struct FdSocket {
    sk: *const u8,
    inode: u64,
    protocol: u8,
}

#[inline(always)]
pub(crate) fn socket_of_fd(fd: u32) -> Option<FdSocket> {
    // SAFETY: helper with no arguments; the pointer is only used through probe reads.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let files: u64 = read_kernel(task, constant(&OFF_TASK_FILES));
    if files == 0 {
        return None;
    }
    let fdt: u64 = read_kernel(files as *const u8, constant(&OFF_FILES_FDT));
    let max_fds: u32 = read_kernel(fdt as *const u8, constant(&OFF_FDT_MAX_FDS));
    if fdt == 0 || fd >= max_fds {
        return None;
    }
    let fd_array: u64 = read_kernel(fdt as *const u8, constant(&OFF_FDT_FD));
    let file: u64 = read_kernel(fd_array as *const u8, fd as usize * 8);
    let socket: u64 = read_kernel(file as *const u8, constant(&OFF_FILE_PRIVATE_DATA));
    // Only a socket's file points back from its struct socket.
    let socket_file: u64 = read_kernel(socket as *const u8, constant(&OFF_SOCKET_FILE));
    if file == 0 || socket_file != file {
        return None;
    }
    let sk = read_kernel::<u64>(socket as *const u8, constant(&OFF_SOCKET_SK)) as *const u8;
    let protocol: u16 = read_kernel(sk, constant(&OFF_SK_PROTOCOL));
    if sk.is_null() || (protocol != IPPROTO_TCP as u16 && protocol != IPPROTO_UDP as u16) {
        return None;
    }
    let inode_ptr: u64 = read_kernel(file as *const u8, constant(&OFF_FILE_INODE));
    let inode: u64 = read_kernel(inode_ptr as *const u8, constant(&OFF_INODE_INO));
    Some(FdSocket { sk, inode, protocol: protocol as u8 })
}

/// Sends `event_kind` for the socket behind `fd`, with its addresses and state now.
/// Not inlined: the SCM_RIGHTS loop calls it several times.
#[inline(never)]
pub(crate) fn fd_event(event_kind: u8, fd: u32) {
    let Some(found) = socket_of_fd(fd) else {
        return;
    };
    // Non-zero once any hook asked for it: sock_create does for every TCP/UDP socket, the
    // state program for accepted children.
    let cookie: u64 = read_kernel(found.sk, constant(&OFF_SKC_COOKIE));
    if cookie == 0 {
        return;
    }
    let mut event = new_event(event_kind);
    event.cookie = cookie;
    event.skaddr = found.sk as u64;
    event.arg = fd as i32;
    event.inode = found.inode;
    event.protocol = found.protocol;
    event.newstate = read_kernel(found.sk, constant(&OFF_SKC_STATE));
    fill_from_sock(&mut event, found.sk);
    submit(&event);
}

/// The syscall's return value, or None when it failed.
#[inline(always)]
pub(crate) fn syscall_ret(ctx: &TracePointContext) -> Option<u32> {
    // SAFETY: the offset comes from the tracepoint's format file; the read is a checked helper.
    let ret: i64 = unsafe { ctx.read_at(constant(&TP_SYSCALL_RET)) }.unwrap_or(-1);
    (ret >= 0).then_some(ret as u32)
}

/// The syscall's first argument (an fd for every syscall this is attached to).
#[inline(always)]
pub(crate) fn syscall_arg0(ctx: &TracePointContext) -> Option<u32> {
    // SAFETY: as above.
    unsafe { ctx.read_at::<u64>(constant(&TP_SYSCALL_ARG0)) }.ok().map(|v| v as u32)
}

/// sys_exit_accept4 / sys_exit_accept: the accepting process receives the socket.
#[tracepoint]
pub fn accept_exit(ctx: TracePointContext) -> u32 {
    if let Some(fd) = syscall_ret(&ctx) {
        fd_event(kind::ACCEPT, fd);
    }
    0
}

/// sys_exit_socket, sys_exit_dup, sys_exit_dup2, sys_exit_dup3, sys_exit_fcntl (F_DUPFD),
/// sys_exit_pidfd_getfd: a new fd for a socket.
#[tracepoint]
pub fn fd_open_exit(ctx: TracePointContext) -> u32 {
    if let Some(fd) = syscall_ret(&ctx) {
        fd_event(kind::FD_OPEN, fd);
    }
    0
}

/// sys_enter_close: looked up before the fd goes away.
#[tracepoint]
pub fn close_enter(ctx: TracePointContext) -> u32 {
    if let Some(fd) = syscall_arg0(&ctx) {
        fd_event(kind::FD_CLOSE, fd);
    }
    0
}

/// The fd of a bind/connect in progress, by thread, from enter to exit.
#[map]
pub(crate) static ADDR_SYSCALL_FD: LruHashMap<u64, u32> = LruHashMap::with_max_entries(4096, 0);

/// sys_enter_bind, sys_enter_connect.
#[tracepoint]
pub fn addr_syscall_enter(ctx: TracePointContext) -> u32 {
    if let Some(fd) = syscall_arg0(&ctx) {
        let _ = ADDR_SYSCALL_FD.insert(bpf_get_current_pid_tgid(), fd, 0);
    }
    0
}

/// sys_exit_bind, sys_exit_connect: the addresses the kernel settled on (a UDP connect picks
/// the local address and port here; there is no state transition to report it).
#[tracepoint]
pub fn addr_syscall_exit(ctx: TracePointContext) -> u32 {
    let key = bpf_get_current_pid_tgid();
    let Some(fd) = ADDR_SYSCALL_FD.get_ptr(key).map(|fd| {
        // SAFETY: pointer into the map value, read before the remove below.
        unsafe { *fd }
    }) else {
        return 0;
    };
    let _ = ADDR_SYSCALL_FD.remove(key);
    // SAFETY: as in syscall_ret.
    let ret: i64 = unsafe { ctx.read_at(constant(&TP_SYSCALL_RET)) }.unwrap_or(-1);
    addresses_settled(ret, fd);
    0
}

/// A bind or connect on `fd` returned `ret`: on success (or a connect under way) the kernel
/// has settled the socket's addresses.
#[inline(always)]
pub(crate) fn addresses_settled(ret: i64, fd: u32) {
    const EINPROGRESS: i64 = 115;
    if ret == 0 || ret == -EINPROGRESS {
        fd_event(kind::ADDRS, fd);
    }
}

/// The user `msghdr` of a recvmsg in progress that asked for control data, by thread.
#[map]
pub(crate) static RECVMSG_MSGHDR: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

/// sys_enter_recvmsg: remember the msghdr if the caller has room for control messages.
#[tracepoint]
pub fn recvmsg_enter(ctx: TracePointContext) -> u32 {
    // SAFETY: offset from the format file; checked helper reads.
    let msghdr: u64 = unsafe { ctx.read_at(constant(&TP_RECVMSG_MSG)) }.unwrap_or(0);
    let control: u64 = read_user(msghdr, constant(&OFF_MSGHDR_CONTROL));
    if control != 0 {
        let _ = RECVMSG_MSGHDR.insert(bpf_get_current_pid_tgid(), msghdr, 0);
    }
    0
}

/// Most fds one SCM_RIGHTS message is looked at for (the verifier needs a bound).
pub(crate) const MAX_PASSED_FDS: usize = 8;

/// sys_exit_recvmsg: fds received with SCM_RIGHTS are new holders of their sockets.
#[tracepoint]
pub fn recvmsg_exit(ctx: TracePointContext) -> u32 {
    let key = bpf_get_current_pid_tgid();
    let Some(msghdr) = RECVMSG_MSGHDR.get_ptr(key).map(|m| {
        // SAFETY: pointer into the map value, read before the remove below.
        unsafe { *m }
    }) else {
        return 0;
    };
    let _ = RECVMSG_MSGHDR.remove(key);
    if syscall_ret(&ctx).is_some() {
        received_fds(msghdr);
    }
    0
}

/// The fds a recvmsg that returned delivered with SCM_RIGHTS, from its user `msghdr`: each
/// is a new holder of its socket.
#[inline(always)]
pub(crate) fn received_fds(msghdr: u64) {
    // The kernel wrote back how much control data it delivered.
    let control: u64 = read_user(msghdr, constant(&OFF_MSGHDR_CONTROL));
    let control_len: u64 = read_user(msghdr, constant(&OFF_MSGHDR_CONTROLLEN));
    // struct cmsghdr { size_t cmsg_len; int cmsg_level; int cmsg_type; int fds[]; }
    let cmsg_len: u64 = read_user(control, 0);
    let level: i32 = read_user(control, 8);
    let cmsg_type: i32 = read_user(control, 12);
    const SOL_SOCKET: i32 = 1;
    const SCM_RIGHTS: i32 = 1;
    if control == 0
        || control_len < 20
        || level != SOL_SOCKET
        || cmsg_type != SCM_RIGHTS
        || cmsg_len < 20
    {
        return;
    }
    let count = ((cmsg_len.min(control_len) - 16) / 4) as usize;
    for i in 0..MAX_PASSED_FDS {
        if i >= count {
            break;
        }
        let fd: i32 = read_user(control, 16 + 4 * i);
        if fd >= 0 {
            fd_event(kind::FD_OPEN, fd as u32);
        }
    }
}

/// Reads a `T` at `base + offset` in the current process's memory; zero if the read faults
/// (without a branch on the result: see `read_kernel`).
#[inline(always)]
pub(crate) fn read_user<T: Default>(base: u64, offset: usize) -> T {
    let mut value = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: as in read_kernel; a null base fails the read and yields zeros.
    unsafe {
        bpf_probe_read_user(
            value.as_mut_ptr().cast(),
            core::mem::size_of::<T>() as u32,
            (base as usize).wrapping_add(offset) as *const core::ffi::c_void,
        );
        value.assume_init()
    }
}
