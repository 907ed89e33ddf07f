//! Why connections fail or struggle: RSTs received, and segments and SYN-ACKs sent again.

use core::ffi::c_void;

use crate::{globals::*, record::*, state::*};
use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie,
    macros::{btf_tracepoint, fexit, tracepoint},
    programs::{BtfTracePointContext, FExitContext, TracePointContext},
};
use netwatch_common::{IPPROTO_TCP, kind};

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

/// tp_btf/tcp_retransmit_skb(sk, skb[, err]): a segment sent again; failed sends (`err`,
/// from 6.3) are not retransmissions the peer sees and are not counted by the kernel's
/// `total_retrans`. Before 6.3 there is no `err`, and only sent ones are traced. (The check
/// is on a load-time constant, so an older verifier never sees the third argument read.)
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn retransmit(ctx: BtfTracePointContext) -> u32 {
    let sk: *const u8 = ctx.arg(0);
    let err: i32 = if constant(&RETRANSMIT_HAS_ERR) != 0 { ctx.arg(2) } else { 0 };
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
pub(crate) fn submit_retransmit(event_kind: u8, counted: *const u8, connection: *const u8) {
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

/// fexit/inet_csk_clone_lock(listener, req, priority) -> child: the listener a new
/// connection came from. Listeners that share an address (SO_REUSEPORT) cannot be told apart
/// by the child's addresses. The return value is read as the argument after the last one,
/// which needs no helper (bpf_get_func_ret came in 5.17).
#[fexit(function = "inet_csk_clone_lock")]
pub fn child_of(ctx: FExitContext) -> i32 {
    let listener: *const u8 = ctx.arg(0);
    let child: *const u8 = ctx.arg(3);
    if listener.is_null() || child.is_null() {
        return 0;
    }
    let mut event = new_event(kind::CHILD_OF);
    event.skaddr = child as u64;
    // SAFETY: `listener` is the traced function's socket argument.
    event.cookie = unsafe { bpf_get_socket_cookie(listener as *mut c_void) };
    event.protocol = IPPROTO_TCP;
    submit(&event);
    0
}
