//! The load-time globals: kernel struct and tracepoint field offsets, read-only statics that
//! the loader resolves in userspace and patches in before load (Rust eBPF has no CO-RE).

/// Declares read-only globals the loader overrides; 0 until then.
macro_rules! load_time_constants {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        $( $(#[$doc])* #[unsafe(no_mangle)] pub(crate) static $name: u32 = 0; )*
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
    /// `tcp_sock.rcv_nxt` and `.copied_seq`: what was received but not read, at CLOSE.
    OFF_TP_RCV_NXT,
    OFF_TP_COPIED_SEQ,
    /// The established hash, where a timewait socket takes a closing socket's place:
    /// `sock_common.skc_nulls_node` (the chain link) and `.skc_hash`, the namespace's
    /// `net.ipv4.tcp_death_row.hashinfo` (0: not found; with OFF_DEATH_ROW_HASHINFO set, the
    /// row is a pointer and `hashinfo` is at that offset in it), and that table's `ehash`
    /// and `ehash_mask`.
    OFF_SKC_NULLS_NODE,
    OFF_SKC_HASH,
    OFF_NET_TW_HASHINFO,
    OFF_DEATH_ROW_HASHINFO,
    OFF_HASHINFO_EHASH,
    OFF_HASHINFO_EHASH_MASK,
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
    /// 1 when tp_btf/tcp_retransmit_skb passes `err` (its third argument, from 6.3); before
    /// that the tracepoint fired only for retransmissions that were sent.
    RETRANSMIT_HAS_ERR,
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
pub(crate) fn constant(value: &'static u32) -> usize {
    // SAFETY: a valid, aligned static.
    unsafe { core::ptr::read_volatile(value) as usize }
}
