//! netwatch's kernel programs: one small function per hook, each filling a [`SockEvent`] and
//! pushing it into the single `EVENTS` ring buffer.
//!
//! Rust eBPF gets no CO-RE relocations, so every kernel struct offset and every classic
//! tracepoint field offset is a read-only global that the loader resolves in userspace (from
//! `/sys/kernel/btf/vmlinux` and the tracepoint's `format` file) and patches in at load time.
//! The cgroup programs always return 1 (allow): returning 0 would refuse sockets host-wide.

// no_std/no_main only for the BPF target so host `cargo check/clippy --workspace` still work.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE,
        BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{bpf_get_current_task, bpf_get_socket_cookie, bpf_ktime_get_ns},
    },
    macros::{btf_tracepoint, cgroup_sock, cgroup_sock_addr, map, sock_ops, tracepoint},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::{
        BtfTracePointContext, SockAddrContext, SockContext, SockOpsContext, TracePointContext,
    },
};
use netwatch_common::{
    AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, SockEvent, config, flags, kind, tcp_state,
};

/// Declares read-only globals the loader overrides; 0 until then.
macro_rules! load_time_constants {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        $( $(#[$doc])* #[unsafe(no_mangle)] static $name: u32 = 0; )*
    };
}

load_time_constants!(
    /// Byte offsets inside `struct sock` / `struct inet_sock` / `struct net`, from BTF.
    OFF_SKC_DADDR,
    OFF_SKC_RCV_SADDR,
    OFF_SKC_DPORT,
    OFF_SKC_NUM,
    OFF_SKC_FAMILY,
    OFF_SKC_NET,
    OFF_SKC_V6_DADDR,
    OFF_SKC_V6_RCV_SADDR,
    OFF_SK_PROTOCOL,
    OFF_INET_SPORT,
    OFF_NET_NS_INUM,
    /// `task_struct.group_leader` and `task_struct.comm`: the process name, as `ss -p` shows
    /// it, rather than the current thread's.
    OFF_TASK_GROUP_LEADER,
    OFF_TASK_COMM,
    /// The fd-table walk of the ownership programs: task -> files -> fdt -> fd[n] -> file ->
    /// private_data (struct socket) -> sk -> skc_cookie.
    OFF_TASK_FILES,
    OFF_FILES_FDT,
    OFF_FDT_FD,
    OFF_FDT_MAX_FDS,
    OFF_FILE_PRIVATE_DATA,
    OFF_SOCKET_FILE,
    OFF_SOCKET_SK,
    OFF_SKC_COOKIE,
    OFF_SKC_STATE,
    /// `file.f_inode`, `inode.i_ino`: the socket inode `/proc/PID/fd` names.
    OFF_FILE_INODE,
    OFF_INODE_INO,
    /// `sock.sk_socket`: from a socket to its struct socket (and file, and inode).
    OFF_SK_SOCKET,
    /// `tcp_sock` counters read at CLOSE, and `sock.sk_flags` (for SOCK_DONE).
    OFF_TP_BYTES_SENT,
    OFF_TP_BYTES_RECEIVED,
    OFF_TP_BYTES_RETRANS,
    OFF_TP_TOTAL_RETRANS,
    OFF_SK_FLAGS,
    /// `task_struct.nsproxy`, `nsproxy.net_ns`: the current task's network namespace.
    OFF_TASK_NSPROXY,
    OFF_NSPROXY_NET_NS,
    /// `task_struct.pid` / `.tgid`: telling a new process from a new thread at fork.
    OFF_TASK_PID,
    OFF_TASK_TGID,
    /// Offsets of `ret` in `syscalls:sys_exit_*` and of the first argument in
    /// `syscalls:sys_enter_*` records (the same for every syscall).
    TP_SYSCALL_RET,
    TP_SYSCALL_ARG0,
    /// Offset of `msg` in `syscalls:sys_enter_recvmsg`, and of `msg_control` /
    /// `msg_controllen` in `struct user_msghdr`: fds passed with SCM_RIGHTS.
    TP_RECVMSG_MSG,
    /// Offset of `sock_cookie` in `tcp:tcp_receive_reset`.
    TP_RESET_COOKIE,
    OFF_MSGHDR_CONTROL,
    OFF_MSGHDR_CONTROLLEN,
    /// Field offsets of the classic `sock:inet_sock_set_state` record, from its format file.
    TP_SKADDR,
    TP_OLDSTATE,
    TP_NEWSTATE,
    TP_SPORT,
    TP_DPORT,
    TP_FAMILY,
    TP_PROTOCOL,
    TP_SADDR,
    TP_DADDR,
    TP_SADDR_V6,
    TP_DADDR_V6,
);

/// Reads a load-time constant so the verifier sees the patched value, not the compiled 0.
#[inline(always)]
fn constant(value: &'static u32) -> usize {
    // SAFETY: a valid, aligned static.
    unsafe { core::ptr::read_volatile(value) as usize }
}

/// Default 8 MiB (about 55 000 events: a few hundred ms of a busy host's events while the
/// agent waits for a CPU); userspace can resize it (`--ring-size`) before load.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Per CPU: [0] ring buffer reservation failures; [1] the most bytes the ring buffer held
/// unread right after this CPU wrote to it. Never reset by the kernel side.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// Switches userspace flips after attaching; see `netwatch_common::config`.
#[map]
static CONFIG: Array<u32> = Array::with_max_entries(config::LEN, 0);

/// CLOSE->SYN_SENT transitions waiting for the `sock_ops` connect callback, by socket cookie.
/// LRU so that a connect whose callback never comes cannot fill the map.
#[map]
static PENDING_CONNECT: LruHashMap<u64, SockEvent> = LruHashMap::with_max_entries(8192, 0);

#[inline(always)]
fn submit(event: &SockEvent) {
    // Waking the reader for every event costs both sides a context switch per event; the
    // agent also drains on a short timer (netwatch tracer.rs), so wake it only once an
    // eighth of the buffer is waiting.
    let unread = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let size = EVENTS.query(BPF_RB_RING_SIZE as u64);
    let wakeup = if unread >= size / 8 { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP };
    if EVENTS.output::<SockEvent>(event, wakeup as u64).is_err() {
        if let Some(lost) = LOST.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
            unsafe { *lost += 1 };
        }
    } else if let Some(peak) = LOST.get_ptr_mut(1) {
        let unread = unread + SockEvent::SIZE as u64;
        // SAFETY: as above.
        unsafe {
            if unread > *peak {
                *peak = unread;
            }
        }
    }
}

#[inline(always)]
fn new_event(kind: u8) -> SockEvent {
    let mut event = SockEvent::zeroed();
    event.kind = kind;
    // SAFETY: helper with no arguments.
    event.ts_ns = unsafe { bpf_ktime_get_ns() };
    event.pid_tgid = bpf_get_current_pid_tgid();
    event.comm = process_comm();
    event
}

/// The current process's name (its thread-group leader's comm); the current thread's comm
/// when the offsets are unknown (no BTF) or the read fails.
#[inline(always)]
fn process_comm() -> [u8; 16] {
    let comm_offset = constant(&OFF_TASK_COMM);
    if comm_offset != 0 {
        // SAFETY: helper with no arguments; the pointer is only used through probe reads.
        let task = unsafe { bpf_get_current_task() } as *const u8;
        let leader: u64 = read_kernel(task, constant(&OFF_TASK_GROUP_LEADER));
        if leader != 0 {
            let comm: [u8; 16] = read_kernel(leader as *const u8, comm_offset);
            if comm[0] != 0 {
                return comm;
            }
        }
    }
    bpf_get_current_comm().unwrap_or([0; 16])
}

/// Reads a `T` at `base + offset` in kernel memory; zero if the read faults.
#[inline(always)]
fn read_kernel<T: Default>(base: *const u8, offset: usize) -> T {
    // SAFETY: bpf_probe_read_kernel checks the address and fails instead of faulting.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset) as *const T).unwrap_or_default() }
}

#[inline(always)]
fn defer_connect_enabled() -> bool {
    CONFIG.get(config::DEFER_CONNECT).is_some_and(|v| *v != 0)
}

// ---------------------------------------------------------------------------------------------
// tp_btf/inet_sock_set_state(const struct sock *sk, int oldstate, int newstate)
// ---------------------------------------------------------------------------------------------

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn state_btf(ctx: BtfTracePointContext) -> u32 {
    let sk: *const u8 = ctx.arg(0);
    if sk.is_null() {
        return 0;
    }
    let protocol: u16 = read_kernel(sk, constant(&OFF_SK_PROTOCOL));
    if protocol != IPPROTO_TCP as u16 {
        return 0;
    }
    let oldstate: i32 = ctx.arg(1);
    let newstate: i32 = ctx.arg(2);

    let mut event = new_event(kind::STATE_BTF);
    event.skaddr = sk as u64;
    // SAFETY: `sk` is the tracepoint's own socket argument.
    event.cookie = unsafe { bpf_get_socket_cookie(sk as *mut c_void) };
    event.protocol = IPPROTO_TCP;
    event.oldstate = oldstate as u8;
    event.newstate = newstate as u8;
    fill_from_sock(&mut event, sk);
    event.inode = inode_of_sock(sk);
    if event.newstate == tcp_state::CLOSE {
        event.bytes_sent = read_kernel(sk, constant(&OFF_TP_BYTES_SENT));
        event.bytes_received = read_kernel(sk, constant(&OFF_TP_BYTES_RECEIVED));
        event.bytes_retrans = read_kernel(sk, constant(&OFF_TP_BYTES_RETRANS));
        event.total_retrans = read_kernel(sk, constant(&OFF_TP_TOTAL_RETRANS));
        // SOCK_DONE (bit 1 of sk_flags) is set by tcp_fin(): the peer's FIN arrived, and
        // bytes_received counts it as one byte. (sk_shutdown cannot tell: close() sets it.)
        let sk_flags: u64 = read_kernel(sk, constant(&OFF_SK_FLAGS));
        event.fin_received = ((sk_flags >> 1) & 1) as u8;
    }

    if defer_connect_enabled() {
        if event.oldstate == tcp_state::CLOSE && event.newstate == tcp_state::SYN_SENT {
            // The kernel picks the local port only after this transition; hold the event
            // until the sock_ops TCP_CONNECT callback, which runs once the port is assigned.
            if PENDING_CONNECT.insert(event.cookie, event, 0).is_ok() {
                return 0;
            }
        } else if event.oldstate == tcp_state::SYN_SENT {
            flush_pending_connect(event.cookie, 0);
        }
    }
    submit(&event);
    0
}

/// Emits a held-back CLOSE->SYN_SENT for `cookie`, with `sport` if it is now known.
#[inline(always)]
fn flush_pending_connect(cookie: u64, sport: u16) {
    if let Some(pending) = PENDING_CONNECT.get_ptr_mut(cookie) {
        // SAFETY: pointer into the map value, valid until the remove below.
        let mut event = unsafe { *pending };
        if sport != 0 {
            event.sport = sport;
        }
        event.flags |= flags::DEFERRED_CONNECT;
        submit(&event);
        let _ = PENDING_CONNECT.remove(cookie);
    }
}

#[inline(always)]
fn fill_from_sock(event: &mut SockEvent, sk: *const u8) {
    let family: u16 = read_kernel(sk, constant(&OFF_SKC_FAMILY));
    event.family = family as u8;
    // inet_sport survives until the socket is freed; skc_num is already 0 at CLOSE and not
    // yet copied into inet_sport for an autobound listener.
    let sport = u16::from_be(read_kernel(sk, constant(&OFF_INET_SPORT)));
    event.sport = if sport != 0 { sport } else { read_kernel(sk, constant(&OFF_SKC_NUM)) };
    event.dport = u16::from_be(read_kernel(sk, constant(&OFF_SKC_DPORT)));
    if event.family == AF_INET6 {
        event.saddr = read_kernel(sk, constant(&OFF_SKC_V6_RCV_SADDR));
        event.daddr = read_kernel(sk, constant(&OFF_SKC_V6_DADDR));
    } else {
        let saddr: [u8; 4] = read_kernel(sk, constant(&OFF_SKC_RCV_SADDR));
        let daddr: [u8; 4] = read_kernel(sk, constant(&OFF_SKC_DADDR));
        event.saddr[..4].copy_from_slice(&saddr);
        event.daddr[..4].copy_from_slice(&daddr);
    }
    let net: u64 = read_kernel(sk, constant(&OFF_SKC_NET));
    if net != 0 {
        event.netns = read_kernel(net as *const u8, constant(&OFF_NET_NS_INUM));
    }
}

/// The sockfs inode of a socket that still has its file; 0 for an orphan or a child not yet
/// accepted.
#[inline(always)]
fn inode_of_sock(sk: *const u8) -> u64 {
    let socket: u64 = read_kernel(sk, constant(&OFF_SK_SOCKET));
    if socket == 0 {
        return 0;
    }
    let file: u64 = read_kernel(socket as *const u8, constant(&OFF_SOCKET_FILE));
    if file == 0 {
        return 0;
    }
    let inode: u64 = read_kernel(file as *const u8, constant(&OFF_FILE_INODE));
    if inode == 0 {
        return 0;
    }
    read_kernel(inode as *const u8, constant(&OFF_INODE_INO))
}

// ---------------------------------------------------------------------------------------------
// Classic sock:inet_sock_set_state, the fallback when BTF is missing.
// ---------------------------------------------------------------------------------------------

#[tracepoint]
pub fn state_classic(ctx: TracePointContext) -> u32 {
    let _ = try_state_classic(&ctx);
    0
}

fn try_state_classic(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY: offsets come from this tracepoint's format file; reads are checked helpers.
    unsafe {
        let protocol: u16 = ctx.read_at(constant(&TP_PROTOCOL))?;
        if protocol != IPPROTO_TCP as u16 {
            return Ok(());
        }
        let mut event = new_event(kind::STATE_CLASSIC);
        event.protocol = IPPROTO_TCP;
        event.skaddr = ctx.read_at::<u64>(constant(&TP_SKADDR))?;
        event.oldstate = ctx.read_at::<i32>(constant(&TP_OLDSTATE))? as u8;
        event.newstate = ctx.read_at::<i32>(constant(&TP_NEWSTATE))? as u8;
        event.sport = ctx.read_at::<u16>(constant(&TP_SPORT))?;
        event.dport = ctx.read_at::<u16>(constant(&TP_DPORT))?;
        event.family = ctx.read_at::<u16>(constant(&TP_FAMILY))? as u8;
        if event.family == AF_INET {
            let saddr: [u8; 4] = ctx.read_at(constant(&TP_SADDR))?;
            let daddr: [u8; 4] = ctx.read_at(constant(&TP_DADDR))?;
            event.saddr[..4].copy_from_slice(&saddr);
            event.daddr[..4].copy_from_slice(&daddr);
        } else {
            event.saddr = ctx.read_at(constant(&TP_SADDR_V6))?;
            event.daddr = ctx.read_at(constant(&TP_DADDR_V6))?;
        }
        submit(&event);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// cgroup socket hooks (root cgroup v2): creation and release, in the acting task's context.
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn sock_lifecycle(ctx: &SockContext, event_kind: u8) {
    // SAFETY: the kernel passes a valid bpf_sock.
    let sock = unsafe { &*ctx.sock };
    if sock.protocol != IPPROTO_TCP as u32 && sock.protocol != IPPROTO_UDP as u32 {
        return;
    }
    let mut event = new_event(event_kind);
    // SAFETY: the program's own context. This also makes the kernel assign the cookie that
    // the fd-walking programs read raw later.
    event.cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    event.family = sock.family as u8;
    event.protocol = sock.protocol as u8;
    submit(&event);
}

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    sock_lifecycle(&ctx, kind::SOCK_CREATE);
    1 // always allow
}

#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    sock_lifecycle(&ctx, kind::SOCK_RELEASE);
    1 // always allow
}

// ---------------------------------------------------------------------------------------------
// Ownership: system calls that give a process a socket fd, take one away, or change a
// socket's addresses, and the process lifecycle. All run in the acting process, so the fd is
// looked up in that process's own fd table (task -> files -> fdt -> fd[n] -> file -> socket).
// ---------------------------------------------------------------------------------------------

/// A socket found behind an fd of the current task.
struct FdSocket {
    sk: *const u8,
    inode: u64,
    protocol: u8,
}

#[inline(always)]
fn socket_of_fd(fd: u32) -> Option<FdSocket> {
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
fn fd_event(event_kind: u8, fd: u32) {
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
fn syscall_ret(ctx: &TracePointContext) -> Option<u32> {
    // SAFETY: the offset comes from the tracepoint's format file; the read is a checked helper.
    let ret: i64 = unsafe { ctx.read_at(constant(&TP_SYSCALL_RET)) }.unwrap_or(-1);
    (ret >= 0).then_some(ret as u32)
}

/// The syscall's first argument (an fd for every syscall this is attached to).
#[inline(always)]
fn syscall_arg0(ctx: &TracePointContext) -> Option<u32> {
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

/// sys_exit_socket, sys_exit_dup, sys_exit_dup2, sys_exit_dup3: a new fd for a socket.
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
static ADDR_SYSCALL_FD: LruHashMap<u64, u32> = LruHashMap::with_max_entries(4096, 0);

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
    const EINPROGRESS: i64 = 115;
    if ret == 0 || ret == -EINPROGRESS {
        fd_event(kind::ADDRS, fd);
    }
    0
}

/// The user `msghdr` of a recvmsg in progress that asked for control data, by thread.
#[map]
static RECVMSG_MSGHDR: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

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
const MAX_PASSED_FDS: usize = 8;

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
    if syscall_ret(&ctx).is_none() {
        return 0;
    }
    // The kernel wrote back how much control data it delivered.
    let control: u64 = read_user(msghdr, constant(&OFF_MSGHDR_CONTROL));
    let control_len: u64 = read_user(msghdr, constant(&OFF_MSGHDR_CONTROLLEN));
    // struct cmsghdr { size_t cmsg_len; int cmsg_level; int cmsg_type; int fds[]; }
    let cmsg_len: u64 = read_user(control, 0);
    let level: i32 = read_user(control, 8);
    let cmsg_type: i32 = read_user(control, 12);
    const SOL_SOCKET: i32 = 1;
    const SCM_RIGHTS: i32 = 1;
    if control_len < 20 || level != SOL_SOCKET || cmsg_type != SCM_RIGHTS || cmsg_len < 20 {
        return 0;
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
    0
}

/// Reads a `T` at `base + offset` in the current process's memory; zero if the read faults.
#[inline(always)]
fn read_user<T: Default>(base: u64, offset: usize) -> T {
    if base == 0 {
        return T::default();
    }
    // SAFETY: bpf_probe_read_user checks the address and fails instead of faulting.
    unsafe { bpf_probe_read_user((base as usize + offset) as *const T).unwrap_or_default() }
}

/// tcp:tcp_receive_reset: which socket a RST killed (refused connect, reset connection).
#[tracepoint]
pub fn reset_received(ctx: TracePointContext) -> u32 {
    // SAFETY: offset from the format file; checked helper read.
    if let Ok(cookie) = unsafe { ctx.read_at::<u64>(constant(&TP_RESET_COOKIE)) } {
        let mut event = new_event(kind::RESET);
        event.cookie = cookie;
        event.protocol = IPPROTO_TCP;
        submit(&event);
    }
    0
}

/// tp_btf/tcp_retransmit_skb(sk, skb, err): a segment sent again; failed sends (`err`) are
/// not retransmissions the peer sees and are not counted by the kernel's `total_retrans`.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn retransmit(ctx: BtfTracePointContext) -> u32 {
    let sk: *const u8 = ctx.arg(0);
    let err: i32 = ctx.arg(2);
    if err == 0 {
        submit_retransmit(kind::RETRANSMIT, sk, sk);
    }
    0
}

/// tp_btf/tcp_retransmit_synack(listener, req): a half-open connection did not answer the
/// SYN-ACK in time. The request socket has the connection's addresses (a sock_common).
#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn synack_retransmit(ctx: BtfTracePointContext) -> u32 {
    submit_retransmit(kind::SYNACK_RETRANSMIT, ctx.arg(0), ctx.arg(1));
    0
}

/// A retransmit event: the cookie of `counted` (the socket it is counted against), the
/// addresses of `connection`.
#[inline(always)]
fn submit_retransmit(event_kind: u8, counted: *const u8, connection: *const u8) {
    if counted.is_null() || connection.is_null() {
        return;
    }
    let mut event = new_event(event_kind);
    // SAFETY: `counted` is a socket argument of the calling tracepoint.
    event.cookie = unsafe { bpf_get_socket_cookie(counted as *mut c_void) };
    event.protocol = IPPROTO_TCP;
    fill_from_sock(&mut event, connection);
    submit(&event);
}

/// tp_btf/sched_process_fork(parent, child): a new process inherits every fd.
#[btf_tracepoint(function = "sched_process_fork")]
pub fn process_fork(ctx: BtfTracePointContext) -> u32 {
    let child: *const u8 = ctx.arg(1);
    let pid: u32 = read_kernel(child, constant(&OFF_TASK_PID));
    let tgid: u32 = read_kernel(child, constant(&OFF_TASK_TGID));
    if pid != 0 && pid == tgid {
        let mut event = new_event(kind::FORK);
        event.arg = tgid as i32;
        submit(&event);
    }
    0
}

/// sched:sched_process_exec.
#[tracepoint]
pub fn process_exec(_ctx: TracePointContext) -> u32 {
    submit(&new_event(kind::EXEC));
    0
}

/// sched:sched_process_exit, reported for the thread-group leader only.
#[tracepoint]
pub fn process_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if pid_tgid >> 32 == pid_tgid & 0xffff_ffff {
        submit(&new_event(kind::EXIT));
    }
    0
}

// ---------------------------------------------------------------------------------------------
// cgroup sendmsg4/sendmsg6: a UDP socket's first send. A socket that was never bound is bound
// by the kernel to an ephemeral port before this hook runs (inet_send_prepare), with no other
// event to say so; report its addresses once per socket.
// ---------------------------------------------------------------------------------------------

/// UDP sockets whose first send was reported, by cookie; LRU so it cannot fill up.
#[map]
static UDP_SENT: LruHashMap<u64, u8> = LruHashMap::with_max_entries(65_536, 0);

#[inline(always)]
fn udp_first_send(ctx: &SockAddrContext) {
    // SAFETY: the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if UDP_SENT.get_ptr(cookie).is_some() {
        return;
    }
    let _ = UDP_SENT.insert(cookie, 1, 0);
    // SAFETY: the kernel passes a valid bpf_sock_addr whose sk, when set, is a bpf_sock.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: checked for null above; fields of the context's socket.
    let sock = unsafe { &*sk };
    if sock.protocol != IPPROTO_UDP as u32 {
        return;
    }
    let mut event = new_event(kind::ADDRS);
    event.cookie = cookie;
    event.protocol = IPPROTO_UDP;
    event.family = sock.family as u8;
    event.newstate = sock.state as u8;
    event.sport = sock.src_port as u16;
    event.dport = u16::from_be(sock.dst_port);
    if event.family == AF_INET6 {
        for i in 0..4 {
            event.saddr[4 * i..4 * i + 4].copy_from_slice(&sock.src_ip6[i].to_ne_bytes());
            event.daddr[4 * i..4 * i + 4].copy_from_slice(&sock.dst_ip6[i].to_ne_bytes());
        }
    } else {
        event.saddr[..4].copy_from_slice(&sock.src_ip4.to_ne_bytes());
        event.daddr[..4].copy_from_slice(&sock.dst_ip4.to_ne_bytes());
    }
    // Sending happens in the socket's own namespace as far as the sender can tell: use the
    // sending task's.
    // SAFETY: helper with no arguments; the pointer is only used through probe reads.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let nsproxy: u64 = read_kernel(task, constant(&OFF_TASK_NSPROXY));
    let net: u64 = read_kernel(nsproxy as *const u8, constant(&OFF_NSPROXY_NET_NS));
    if nsproxy != 0 && net != 0 {
        event.netns = read_kernel(net as *const u8, constant(&OFF_NET_NS_INUM));
    }
    submit(&event);
}

#[cgroup_sock_addr(sendmsg4)]
pub fn udp_sendmsg4(ctx: SockAddrContext) -> i32 {
    udp_first_send(&ctx);
    1 // always allow
}

#[cgroup_sock_addr(sendmsg6)]
pub fn udp_sendmsg6(ctx: SockAddrContext) -> i32 {
    udp_first_send(&ctx);
    1 // always allow
}

// ---------------------------------------------------------------------------------------------
// sock_ops: TCP_CONNECT runs in the connecting task after the local port was assigned.
// ---------------------------------------------------------------------------------------------

#[sock_ops]
pub fn connect_port(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // SAFETY: the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        flush_pending_connect(cookie, ctx.local_port() as u16);
    }
    1 // never changes the connection; `reply` is left as other programs set it
}

#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
