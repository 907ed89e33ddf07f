//! Wire types shared by the kernel programs (`netwatch-ebpf`) and the agent (`netwatch`).
//!
//! Everything here crosses the kernel/user boundary as raw bytes through the `EVENTS` ring
//! buffer, so it is `#[repr(C)]`, made of fixed-width integers with explicit padding, and uses
//! integer codes instead of `bool` or Rust enums. The userspace decoder checks the length and
//! every code before trusting a record.
#![no_std]

/// Which kernel hook produced a [`SockEvent`]. One tag per hook.
pub mod kind {
    /// `tp_btf/inet_sock_set_state`: a TCP state transition, keyed by socket cookie.
    pub const STATE_BTF: u8 = 1;
    /// Classic `sock:inet_sock_set_state` tracepoint (no BTF): keyed by socket address.
    pub const STATE_CLASSIC: u8 = 2;
    /// cgroup `sock_create`: a TCP socket was created by the current task.
    pub const SOCK_CREATE: u8 = 3;
    /// cgroup `sock_release`: the last file reference to a TCP socket went away.
    pub const SOCK_RELEASE: u8 = 4;
    /// `syscalls:sys_exit_accept4` / `sys_exit_accept`: the current task received the socket
    /// (`cookie`) as file descriptor `fd`; found by walking its fd table.
    pub const ACCEPT: u8 = 5;
    /// `socket(2)` or `dup*(2)` returned `arg` as a new fd for the socket `cookie`.
    pub const FD_OPEN: u8 = 6;
    /// `close(2)` of fd `arg`, which refers to the socket `cookie` (sent before the close).
    pub const FD_CLOSE: u8 = 7;
    /// `bind(2)` or `connect(2)` on fd `arg` succeeded: the socket's addresses and state now.
    pub const ADDRS: u8 = 8;
    /// The current process forked a new process whose tgid is `arg` (threads are not sent).
    pub const FORK: u8 = 9;
    /// The current process exec'd: `comm` is its new name; close-on-exec fds are gone.
    pub const EXEC: u8 = 10;
    /// The current process (its thread-group leader) exited.
    pub const EXIT: u8 = 11;
    /// `tcp:tcp_receive_reset`: the socket `cookie` received a RST.
    pub const RESET: u8 = 12;
    /// `tp_btf/tcp_retransmit_skb`: the connection `cookie` sent a segment again.
    pub const RETRANSMIT: u8 = 13;
    /// `tp_btf/tcp_retransmit_synack`: the listener `cookie` sent a SYN-ACK again to a
    /// half-open connection; the addresses are that connection's.
    pub const SYNACK_RETRANSMIT: u8 = 14;
}

/// `flags` bits of a [`SockEvent`].
pub mod flags {
    /// The CLOSE->SYN_SENT transition was held back until the `sock_ops` TCP_CONNECT callback,
    /// where the kernel has assigned the local port; `ts_ns` is still the transition's time.
    pub const DEFERRED_CONNECT: u8 = 1;
}

/// Kernel address family codes (`AF_INET`, `AF_INET6`).
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
/// `IPPROTO_TCP`, `IPPROTO_UDP`.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Kernel TCP state numbers (`include/net/tcp_states.h`).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
}

/// Indexes into the `CONFIG` array map, which userspace writes after attaching.
pub mod config {
    /// Non-zero once the `sock_ops` program is attached: the state program may then defer
    /// CLOSE->SYN_SENT until the local port is known.
    pub const DEFER_CONNECT: u32 = 0;
    pub const LEN: u32 = 1;
}

/// One record in the `EVENTS` ring buffer. 144 bytes, 8-byte aligned, no implicit padding.
///
/// Addresses are in network byte order; an IPv4 address uses the first 4 bytes. Ports are in
/// host byte order. Fields a hook cannot know are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the hook ran.
    pub ts_ns: u64,
    /// Socket cookie (`ss -e` prints it as `sk:`); 0 from the classic tracepoint.
    pub cookie: u64,
    /// `struct sock *` address: the identity the classic-tracepoint fallback has to use.
    pub skaddr: u64,
    /// `bpf_get_current_pid_tgid()`: tgid in the high 32 bits, thread id in the low.
    pub pid_tgid: u64,
    /// Inode of the socket's network namespace; 0 where it could not be read.
    pub netns: u32,
    /// Per kind: the fd for ACCEPT, FD_OPEN, FD_CLOSE and ADDRS; the child's tgid for FORK;
    /// -1 otherwise.
    pub arg: i32,
    /// One of [`kind`].
    pub kind: u8,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
    pub protocol: u8,
    /// Bits from [`flags`].
    pub flags: u8,
    /// One of [`tcp_state`]; 0 for non-transition events.
    pub oldstate: u8,
    pub newstate: u8,
    pub _pad0: [u8; 2],
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Process name (thread-group leader's comm) of the task on the CPU: evidence, not
    /// necessarily the owner.
    pub comm: [u8; 16],
    pub _pad1: [u8; 4],
    /// sockfs inode of the socket (what `/proc/PID/fd` links name); 0 where unknown.
    pub inode: u64,
    /// At a TCP socket's CLOSE transition (tp_btf only), its `tcp_sock` counters:
    /// `bytes_sent` (payload, retransmissions included), `bytes_received` (payload, plus one
    /// for a received FIN), `bytes_retrans`, and `total_retrans` (segments).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub bytes_retrans: u64,
    pub total_retrans: u32,
    /// At CLOSE: 1 if the peer's FIN was received (`SOCK_DONE` in `sk_flags`), else 0.
    pub fin_received: u8,
    pub _pad2: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<SockEvent>() == 144);
const _: () = assert!(core::mem::align_of::<SockEvent>() == 8);

impl SockEvent {
    pub const SIZE: usize = core::mem::size_of::<SockEvent>();

    pub const fn zeroed() -> Self {
        Self {
            ts_ns: 0,
            cookie: 0,
            skaddr: 0,
            pid_tgid: 0,
            netns: 0,
            arg: -1,
            kind: 0,
            family: 0,
            protocol: 0,
            flags: 0,
            oldstate: 0,
            newstate: 0,
            _pad0: [0; 2],
            sport: 0,
            dport: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            comm: [0; 16],
            _pad1: [0; 4],
            inode: 0,
            bytes_sent: 0,
            bytes_received: 0,
            bytes_retrans: 0,
            total_retrans: 0,
            fin_received: 0,
            _pad2: [0; 3],
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: plain old data, no padding that is not an explicit field, every bit pattern valid.
unsafe impl aya::Pod for SockEvent {}
