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
    /// fexit/inet_csk_clone_lock: a new connection's child socket (`skaddr`) was cloned from
    /// the listener whose cookie is `cookie` (SO_REUSEPORT listeners share an address).
    pub const CHILD_OF: u8 = 15;
    /// fentry/security_sock_graft: the current task is accepting the TCP connection
    /// `cookie`, whose fd it has not got yet (`arg` is -1). It also reaches a task that was
    /// blocked in accept(2) before the fexit programs attached, which fexit never sees.
    pub const GRAFT: u8 = 16;
}

/// The kernel programs' names: the functions in `netwatch-ebpf`, which the loader looks up
/// and attaches, and which the kernel lists (keeping 15 bytes of each).
pub mod program {
    pub const STATE_BTF: &str = "state_btf";
    pub const STATE_CLASSIC: &str = "state_classic";
    pub const SOCK_CREATE: &str = "sock_create";
    pub const SOCK_RELEASE: &str = "sock_release";
    pub const ACCEPT_EXIT: &str = "accept_exit";
    pub const FD_OPEN_EXIT: &str = "fd_open_exit";
    pub const CLOSE_ENTER: &str = "close_enter";
    pub const ADDR_SYSCALL_ENTER: &str = "addr_syscall_enter";
    pub const ADDR_SYSCALL_EXIT: &str = "addr_syscall_exit";
    pub const RECVMSG_ENTER: &str = "recvmsg_enter";
    pub const RECVMSG_EXIT: &str = "recvmsg_exit";
    pub const RESET_RECEIVED: &str = "reset_received";
    pub const RETRANSMIT: &str = "retransmit";
    pub const SYNACK_RETRANSMIT: &str = "synack_retransmit";
    pub const PROCESS_FORK: &str = "process_fork";
    pub const PROCESS_EXEC: &str = "process_exec";
    pub const PROCESS_EXIT: &str = "process_exit";
    pub const UDP_SENDMSG4: &str = "udp_sendmsg4";
    pub const UDP_SENDMSG6: &str = "udp_sendmsg6";
    pub const CONNECT_PORT: &str = "connect_port";
    pub const CHILD_OF: &str = "child_of";

    pub const ALL: [&str; 21] = [
        STATE_BTF,
        STATE_CLASSIC,
        SOCK_CREATE,
        SOCK_RELEASE,
        ACCEPT_EXIT,
        FD_OPEN_EXIT,
        CLOSE_ENTER,
        ADDR_SYSCALL_ENTER,
        ADDR_SYSCALL_EXIT,
        RECVMSG_ENTER,
        RECVMSG_EXIT,
        RESET_RECEIVED,
        RETRANSMIT,
        SYNACK_RETRANSMIT,
        PROCESS_FORK,
        PROCESS_EXEC,
        PROCESS_EXIT,
        UDP_SENDMSG4,
        UDP_SENDMSG6,
        CONNECT_PORT,
        CHILD_OF,
    ];

    /// A program on a BPF trampoline.
    pub struct Trampoline {
        pub program: &'static str,
        /// The kernel function it attaches to.
        pub function: &'static str,
        pub hook: TrampolineHook,
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    pub enum TrampolineHook {
        /// Before the call, with its arguments.
        Entry,
        /// After it, with its arguments and its return value.
        Exit,
    }

    /// Trampoline programs standing in for a `syscalls:*` tracepoint program, attached all or
    /// none.
    pub struct TrampolineGroup {
        /// The tracepoint program whose work they do.
        pub stands_for: &'static str,
        /// Another tracepoint program they make unnecessary (an enter program whose exit
        /// program they replace: an fexit has the call's arguments).
        pub replaces: Option<&'static str>,
        /// How a user names the group's hooks.
        pub attach: &'static str,
        pub programs: &'static [Trampoline],
    }

    const fn exit(program: &'static str, function: &'static str) -> Trampoline {
        Trampoline { program, function, hook: TrampolineHook::Exit }
    }

    const fn entry(program: &'static str, function: &'static str) -> Trampoline {
        Trampoline { program, function, hook: TrampolineHook::Entry }
    }

    /// The system-call programs' trampoline variants (`netwatch-ebpf`'s `syscalls`), on the
    /// x86-64 system-call entry points.
    pub const TRAMPOLINES: [TrampolineGroup; 5] = [
        TrampolineGroup {
            stands_for: ACCEPT_EXIT,
            replaces: None,
            attach: "fexit/__x64_sys_{accept,accept4}, fentry/security_sock_graft",
            programs: &[
                exit("fx_accept", "__x64_sys_accept"),
                exit("fx_accept4", "__x64_sys_accept4"),
                entry("fx_graft", "security_sock_graft"),
            ],
        },
        TrampolineGroup {
            stands_for: FD_OPEN_EXIT,
            replaces: None,
            attach: "fexit/__x64_sys_{socket,dup,dup2,dup3,fcntl,pidfd_getfd}",
            programs: &[
                exit("fx_socket", "__x64_sys_socket"),
                exit("fx_dup", "__x64_sys_dup"),
                exit("fx_dup2", "__x64_sys_dup2"),
                exit("fx_dup3", "__x64_sys_dup3"),
                exit("fx_fcntl", "__x64_sys_fcntl"),
                exit("fx_pidfd_getfd", "__x64_sys_pidfd_getfd"),
            ],
        },
        TrampolineGroup {
            stands_for: CLOSE_ENTER,
            replaces: None,
            attach: "fentry/__x64_sys_close",
            programs: &[entry("fx_close", "__x64_sys_close")],
        },
        TrampolineGroup {
            stands_for: ADDR_SYSCALL_EXIT,
            replaces: Some(ADDR_SYSCALL_ENTER),
            attach: "fexit/__x64_sys_{bind,connect}",
            programs: &[exit("fx_bind", "__x64_sys_bind"), exit("fx_connect", "__x64_sys_connect")],
        },
        TrampolineGroup {
            stands_for: RECVMSG_EXIT,
            replaces: Some(RECVMSG_ENTER),
            attach: "fexit/__x64_sys_recvmsg",
            programs: &[exit("fx_recvmsg", "__x64_sys_recvmsg")],
        },
    ];

    /// Every trampoline program's name.
    pub fn trampoline_programs() -> impl Iterator<Item = &'static str> {
        TRAMPOLINES.iter().flat_map(|group| group.programs.iter().map(|t| t.program))
    }
}

/// The maps of `netwatch-ebpf` that userspace opens.
pub mod map {
    /// The ring buffer every program writes its records to.
    pub const EVENTS: &str = "EVENTS";
    /// Per CPU: [0] ring reservation failures, [1] the most bytes ever unread.
    pub const LOST: &str = "LOST";
    /// Switches the loader sets after attaching (`config::*` indices).
    pub const CONFIG: &str = "CONFIG";
}

/// The load-time globals of `netwatch-ebpf`: read-only statics the loader patches with
/// kernel struct offsets (from BTF) and tracepoint field offsets (from tracefs) before load.
pub mod global {
    pub const OFF_SKC_DADDR: &str = "OFF_SKC_DADDR";
    pub const OFF_SKC_RCV_SADDR: &str = "OFF_SKC_RCV_SADDR";
    pub const OFF_SKC_DPORT: &str = "OFF_SKC_DPORT";
    pub const OFF_SKC_NUM: &str = "OFF_SKC_NUM";
    pub const OFF_SKC_FAMILY: &str = "OFF_SKC_FAMILY";
    pub const OFF_SKC_NET: &str = "OFF_SKC_NET";
    pub const OFF_SKC_V6_DADDR: &str = "OFF_SKC_V6_DADDR";
    pub const OFF_SKC_V6_RCV_SADDR: &str = "OFF_SKC_V6_RCV_SADDR";
    pub const OFF_SK_PROTOCOL: &str = "OFF_SK_PROTOCOL";
    pub const OFF_INET_SPORT: &str = "OFF_INET_SPORT";
    pub const OFF_NET_NS_INUM: &str = "OFF_NET_NS_INUM";
    pub const OFF_TASK_GROUP_LEADER: &str = "OFF_TASK_GROUP_LEADER";
    pub const OFF_TASK_COMM: &str = "OFF_TASK_COMM";
    pub const OFF_TASK_FILES: &str = "OFF_TASK_FILES";
    pub const OFF_FILES_FDT: &str = "OFF_FILES_FDT";
    pub const OFF_FDT_FD: &str = "OFF_FDT_FD";
    pub const OFF_FDT_MAX_FDS: &str = "OFF_FDT_MAX_FDS";
    pub const OFF_FILE_PRIVATE_DATA: &str = "OFF_FILE_PRIVATE_DATA";
    pub const OFF_SOCKET_FILE: &str = "OFF_SOCKET_FILE";
    pub const OFF_SOCKET_SK: &str = "OFF_SOCKET_SK";
    pub const OFF_SKC_COOKIE: &str = "OFF_SKC_COOKIE";
    pub const OFF_SKC_STATE: &str = "OFF_SKC_STATE";
    pub const OFF_FILE_INODE: &str = "OFF_FILE_INODE";
    pub const OFF_INODE_INO: &str = "OFF_INODE_INO";
    pub const OFF_SK_SOCKET: &str = "OFF_SK_SOCKET";
    pub const OFF_TP_BYTES_SENT: &str = "OFF_TP_BYTES_SENT";
    pub const OFF_TP_BYTES_RECEIVED: &str = "OFF_TP_BYTES_RECEIVED";
    pub const OFF_TP_BYTES_RETRANS: &str = "OFF_TP_BYTES_RETRANS";
    pub const OFF_TP_TOTAL_RETRANS: &str = "OFF_TP_TOTAL_RETRANS";
    pub const OFF_SK_FLAGS: &str = "OFF_SK_FLAGS";
    pub const OFF_TP_RCV_NXT: &str = "OFF_TP_RCV_NXT";
    pub const OFF_TP_COPIED_SEQ: &str = "OFF_TP_COPIED_SEQ";
    pub const OFF_SKC_NULLS_NODE: &str = "OFF_SKC_NULLS_NODE";
    pub const OFF_SKC_HASH: &str = "OFF_SKC_HASH";
    pub const OFF_NET_TW_HASHINFO: &str = "OFF_NET_TW_HASHINFO";
    pub const OFF_DEATH_ROW_HASHINFO: &str = "OFF_DEATH_ROW_HASHINFO";
    pub const OFF_HASHINFO_EHASH: &str = "OFF_HASHINFO_EHASH";
    pub const OFF_HASHINFO_EHASH_MASK: &str = "OFF_HASHINFO_EHASH_MASK";
    pub const OFF_TASK_NSPROXY: &str = "OFF_TASK_NSPROXY";
    pub const OFF_NSPROXY_NET_NS: &str = "OFF_NSPROXY_NET_NS";
    pub const OFF_TASK_PID: &str = "OFF_TASK_PID";
    pub const OFF_TASK_TGID: &str = "OFF_TASK_TGID";
    pub const TP_SYSCALL_RET: &str = "TP_SYSCALL_RET";
    pub const TP_SYSCALL_ARG0: &str = "TP_SYSCALL_ARG0";
    pub const TP_RECVMSG_MSG: &str = "TP_RECVMSG_MSG";
    pub const TP_RESET_COOKIE: &str = "TP_RESET_COOKIE";
    pub const RETRANSMIT_HAS_ERR: &str = "RETRANSMIT_HAS_ERR";
    pub const OFF_MSGHDR_CONTROL: &str = "OFF_MSGHDR_CONTROL";
    pub const OFF_MSGHDR_CONTROLLEN: &str = "OFF_MSGHDR_CONTROLLEN";
    pub const TP_SKADDR: &str = "TP_SKADDR";
    pub const TP_OLDSTATE: &str = "TP_OLDSTATE";
    pub const TP_NEWSTATE: &str = "TP_NEWSTATE";
    pub const TP_SPORT: &str = "TP_SPORT";
    pub const TP_DPORT: &str = "TP_DPORT";
    pub const TP_FAMILY: &str = "TP_FAMILY";
    pub const TP_PROTOCOL: &str = "TP_PROTOCOL";
    pub const TP_SADDR: &str = "TP_SADDR";
    pub const TP_DADDR: &str = "TP_DADDR";
    pub const TP_SADDR_V6: &str = "TP_SADDR_V6";
    pub const TP_DADDR_V6: &str = "TP_DADDR_V6";

    pub const ALL: [&str; 60] = [
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
        OFF_TASK_GROUP_LEADER,
        OFF_TASK_COMM,
        OFF_TASK_FILES,
        OFF_FILES_FDT,
        OFF_FDT_FD,
        OFF_FDT_MAX_FDS,
        OFF_FILE_PRIVATE_DATA,
        OFF_SOCKET_FILE,
        OFF_SOCKET_SK,
        OFF_SKC_COOKIE,
        OFF_SKC_STATE,
        OFF_FILE_INODE,
        OFF_INODE_INO,
        OFF_SK_SOCKET,
        OFF_TP_BYTES_SENT,
        OFF_TP_BYTES_RECEIVED,
        OFF_TP_BYTES_RETRANS,
        OFF_TP_TOTAL_RETRANS,
        OFF_SK_FLAGS,
        OFF_TP_RCV_NXT,
        OFF_TP_COPIED_SEQ,
        OFF_SKC_NULLS_NODE,
        OFF_SKC_HASH,
        OFF_NET_TW_HASHINFO,
        OFF_DEATH_ROW_HASHINFO,
        OFF_HASHINFO_EHASH,
        OFF_HASHINFO_EHASH_MASK,
        OFF_TASK_NSPROXY,
        OFF_NSPROXY_NET_NS,
        OFF_TASK_PID,
        OFF_TASK_TGID,
        TP_SYSCALL_RET,
        TP_SYSCALL_ARG0,
        TP_RECVMSG_MSG,
        TP_RESET_COOKIE,
        RETRANSMIT_HAS_ERR,
        OFF_MSGHDR_CONTROL,
        OFF_MSGHDR_CONTROLLEN,
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
    ];
}

/// `flags` bits of a [`SockEvent`].
pub mod flags {
    /// The CLOSE->SYN_SENT transition was held back until the `sock_ops` TCP_CONNECT callback,
    /// where the kernel has assigned the local port; `ts_ns` is still the transition's time.
    pub const DEFERRED_CONNECT: u8 = 1;
    /// At CLOSE from FIN_WAIT1, FIN_WAIT2 or CLOSING: `tcp_time_wait()` put a timewait
    /// socket with this socket's cookie in its place (found at the head of its
    /// established-hash chain). Without it, no timewait socket was made.
    pub const TIMEWAIT: u8 = 2;
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

/// One record in the `EVENTS` ring buffer. 152 bytes, 8-byte aligned, no implicit padding.
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
    /// At a TCP socket's CLOSE transition (tp_btf only): `rcv_nxt - copied_seq`, the bytes
    /// received that the owner never read, plus one for a FIN it never read. Data left
    /// unread is why close() resets a connection.
    pub unread: u32,
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
    /// `bpf_get_current_cgroup_id()`: the cgroup v2 id (the inode of its directory in the
    /// cgroup2 mount) of the task on the CPU, taken with `pid_tgid` and `comm` and as much
    /// evidence as they are. Where the task is the owner acting (a socket made, accepted,
    /// bound, connected), this is the owner's container, kept after it exits.
    pub cgroup: u64,
}

const _: () = assert!(core::mem::size_of::<SockEvent>() == 152);
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
            unread: 0,
            inode: 0,
            bytes_sent: 0,
            bytes_received: 0,
            bytes_retrans: 0,
            total_retrans: 0,
            fin_received: 0,
            _pad2: [0; 3],
            cgroup: 0,
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: plain old data, no padding that is not an explicit field, every bit pattern valid.
unsafe impl aya::Pod for SockEvent {}
