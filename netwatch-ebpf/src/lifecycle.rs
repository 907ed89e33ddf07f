//! cgroup socket hooks on the cgroup v2 root: a socket's creation and release, and a UDP
//! socket's first send. Each runs in the acting task and always allows (returns 1).

use crate::{globals::*, record::*};
use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::{bpf_get_current_task, bpf_get_socket_cookie},
    macros::{cgroup_sock, cgroup_sock_addr, map},
    maps::LruHashMap,
    programs::{SockAddrContext, SockContext},
};
use netwatch_common::{AF_INET6, IPPROTO_TCP, IPPROTO_UDP, kind};

// ---------------------------------------------------------------------------------------------
// cgroup socket hooks (root cgroup v2): creation and release, in the acting task's context.
// ---------------------------------------------------------------------------------------------

#[inline(always)]
pub(crate) fn sock_lifecycle(ctx: &SockContext, event_kind: u8) {
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
// cgroup sendmsg4/sendmsg6: a UDP socket's first send. A socket that was never bound is bound
// by the kernel to an ephemeral port before this hook runs (inet_send_prepare), with no other
// event to say so; report its addresses once per socket.
// ---------------------------------------------------------------------------------------------

/// UDP sockets whose first send was reported, by cookie; LRU so it cannot fill up.
#[map]
pub(crate) static UDP_SENT: LruHashMap<u64, u8> = LruHashMap::with_max_entries(65_536, 0);

#[inline(always)]
pub(crate) fn udp_first_send(ctx: &SockAddrContext) {
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
