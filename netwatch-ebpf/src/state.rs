//! TCP state transitions: `tp_btf/inet_sock_set_state` (primary), the classic tracepoint
//! (fallback without BTF), and the `sock_ops` connect callback that releases a held-back
//! CLOSE->SYN_SENT once the kernel has picked its local port.

use core::ffi::c_void;

use crate::{globals::*, record::*};
use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_SOCK_OPS_TCP_CONNECT_CB,
    helpers::generated::bpf_get_socket_cookie,
    macros::{btf_tracepoint, sock_ops, tracepoint},
    programs::{BtfTracePointContext, SockOpsContext, TracePointContext},
};
use netwatch_common::{AF_INET, AF_INET6, IPPROTO_TCP, SockEvent, flags, kind, tcp_state};

// ---------------------------------------------------------------------------------------------
// tp_btf/inet_sock_set_state(const struct sock *sk, int oldstate, int newstate)
// ---------------------------------------------------------------------------------------------

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn state_btf(ctx: BtfTracePointContext) -> u32 {
    let sk: *const u8 = ctx.arg(0);
    if !is_tcp(sk) {
        return 0;
    }
    let mut event = new_event(kind::STATE_BTF);
    fill_tcp_event(&mut event, sk);
    let oldstate: i32 = ctx.arg(1);
    let newstate: i32 = ctx.arg(2);
    event.oldstate = oldstate as u8;
    event.newstate = newstate as u8;
    if event.newstate == tcp_state::CLOSE {
        event.bytes_sent = read_kernel(sk, constant(&OFF_TP_BYTES_SENT));
        event.bytes_received = read_kernel(sk, constant(&OFF_TP_BYTES_RECEIVED));
        event.bytes_retrans = read_kernel(sk, constant(&OFF_TP_BYTES_RETRANS));
        event.total_retrans = read_kernel(sk, constant(&OFF_TP_TOTAL_RETRANS));
        // SOCK_DONE (bit 1 of sk_flags) is set by tcp_fin(): the peer's FIN arrived, and
        // bytes_received counts it as one byte. (sk_shutdown cannot tell: close() sets it.)
        let sk_flags: u64 = read_kernel(sk, constant(&OFF_SK_FLAGS));
        event.fin_received = ((sk_flags >> 1) & 1) as u8;
        let rcv_nxt: u32 = read_kernel(sk, constant(&OFF_TP_RCV_NXT));
        let copied_seq: u32 = read_kernel(sk, constant(&OFF_TP_COPIED_SEQ));
        event.unread = rcv_nxt.wrapping_sub(copied_seq);
        if matches!(
            event.oldstate,
            tcp_state::FIN_WAIT1 | tcp_state::FIN_WAIT2 | tcp_state::CLOSING
        ) && timewait_made(sk, event.cookie)
        {
            event.flags |= flags::TIMEWAIT;
        }
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

/// Whether `sk` (a typed pointer a tp_btf or trampoline program was given) is a TCP socket.
#[inline(always)]
pub(crate) fn is_tcp(sk: *const u8) -> bool {
    !sk.is_null() && read_kernel::<u16>(sk, constant(&OFF_SK_PROTOCOL)) == IPPROTO_TCP as u16
}

/// Fills `event` with the TCP socket `sk`'s identity: its cookie, addresses, netns and inode.
/// (Filling in place rather than returning a record keeps 6.1's verifier at a fifth of the
/// instructions.)
#[inline(always)]
pub(crate) fn fill_tcp_event(event: &mut SockEvent, sk: *const u8) {
    event.skaddr = sk as u64;
    // SAFETY: `sk` is the hook's own typed socket argument.
    event.cookie = unsafe { bpf_get_socket_cookie(sk as *mut c_void) };
    event.protocol = IPPROTO_TCP;
    fill_from_sock(event, sk);
    event.inode = inode_of_sock(sk);
}

/// Whether `tcp_time_wait()` has just made a timewait socket for `sk` (whose cookie is
/// `cookie`). It adds the timewait socket at the head of the established-hash chain of the
/// 4-tuple, then closes `sk`; a timewait socket carries the full socket's cookie. So the
/// first entries of that chain tell, without a lookup from userspace. Two are looked at, in
/// case another socket joined the chain in between.
#[inline(always)]
fn timewait_made(sk: *const u8, cookie: u64) -> bool {
    if constant(&OFF_NET_TW_HASHINFO) == 0 {
        return false;
    }
    let net: u64 = read_kernel(sk, constant(&OFF_SKC_NET));
    let mut hashinfo: u64 = read_kernel(net as *const u8, constant(&OFF_NET_TW_HASHINFO));
    if constant(&OFF_DEATH_ROW_HASHINFO) != 0 {
        // 5.18-6.0: `tcp_death_row` is a pointer to the row.
        hashinfo = read_kernel(hashinfo as *const u8, constant(&OFF_DEATH_ROW_HASHINFO));
    }
    let ehash: u64 = read_kernel(hashinfo as *const u8, constant(&OFF_HASHINFO_EHASH));
    let mask: u32 = read_kernel(hashinfo as *const u8, constant(&OFF_HASHINFO_EHASH_MASK));
    let hash: u32 = read_kernel(sk, constant(&OFF_SKC_HASH));
    // Each bucket is one `hlist_nulls_head` (a pointer).
    let mut node: u64 = read_kernel(ehash as *const u8, (hash & mask) as usize * 8);
    for _ in 0..2 {
        // An odd value is the chain's end marker (and 0, a failed read).
        if node == 0 || node & 1 != 0 {
            return false;
        }
        // The link is `sock_common.skc_nulls_node`; `__sk_common` starts a `struct sock`, so
        // its offsets in `sock` are those in `sock_common`.
        let common = (node as usize).wrapping_sub(constant(&OFF_SKC_NULLS_NODE)) as *const u8;
        let state: u8 = read_kernel(common, constant(&OFF_SKC_STATE));
        let its_cookie: u64 = read_kernel(common, constant(&OFF_SKC_COOKIE));
        if state == tcp_state::TIME_WAIT && its_cookie == cookie {
            return true;
        }
        node = read_kernel(node as *const u8, 0);
    }
    false
}

/// Emits a held-back CLOSE->SYN_SENT for `cookie`, with `sport` if it is now known.
#[inline(always)]
pub(crate) fn flush_pending_connect(cookie: u64, sport: u16) {
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
pub(crate) fn fill_from_sock(event: &mut SockEvent, sk: *const u8) {
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
pub(crate) fn inode_of_sock(sk: *const u8) -> u64 {
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

pub(crate) fn try_state_classic(ctx: &TracePointContext) -> Result<(), i32> {
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
