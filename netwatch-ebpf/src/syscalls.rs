//! Ownership through BPF trampolines on the x86-64 system-call entry points
//! (`__x64_sys_*`), where the kernel allows them: the same work as the `syscalls:*`
//! tracepoint programs in [`crate::fds`], at a cost only to the system calls hooked. Any
//! enabled `syscalls:*` tracepoint sends every system call of every task through the slow
//! path; these do not. Each entry point takes the caller's `struct pt_regs *`; an fexit
//! program also gets the return value, as the argument after it.

use crate::{
    fds::*,
    globals::*,
    record::{new_event, read_kernel, submit},
    state::{fill_tcp_event, is_tcp},
};
use aya_ebpf::{
    macros::{fentry, fexit},
    programs::{FEntryContext, FExitContext},
};
use netwatch_common::kind;

/// `struct pt_regs` offsets of the first two system-call arguments (`di`, `si`) on x86-64:
/// part of the kernel's user ABI, unlike the structs whose offsets come from BTF.
const REGS_DI: usize = 112;
const REGS_SI: usize = 104;

/// The system call's argument in `offset` of its registers.
#[inline(always)]
fn argument(regs: *const u8, offset: usize) -> u64 {
    read_kernel(regs, offset)
}

/// A new fd for a socket, from the return value of an fexit on an entry point.
#[inline(always)]
fn returned_fd(ctx: &FExitContext, event_kind: u8) {
    let ret: i64 = ctx.arg(1);
    if ret >= 0 {
        fd_event(event_kind, ret as u32);
    }
}

macro_rules! returns_fd {
    ($($name:ident => $function:literal, $kind:expr;)*) => {$(
        #[doc = concat!("fexit/", $function, ": the fd it returned.")]
        #[fexit(function = $function)]
        pub fn $name(ctx: FExitContext) -> i32 {
            returned_fd(&ctx, $kind);
            0
        }
    )*};
}

returns_fd! {
    fx_accept => "__x64_sys_accept", kind::ACCEPT;
    fx_accept4 => "__x64_sys_accept4", kind::ACCEPT;
    fx_socket => "__x64_sys_socket", kind::FD_OPEN;
    fx_dup => "__x64_sys_dup", kind::FD_OPEN;
    fx_dup2 => "__x64_sys_dup2", kind::FD_OPEN;
    fx_dup3 => "__x64_sys_dup3", kind::FD_OPEN;
    // As with the tracepoint (see `Attacher::ownership`), fcntl's other returns are harmless.
    fx_fcntl => "__x64_sys_fcntl", kind::FD_OPEN;
    fx_pidfd_getfd => "__x64_sys_pidfd_getfd", kind::FD_OPEN;
}

/// fentry/__x64_sys_close: looked up before the fd goes away.
#[fentry(function = "__x64_sys_close")]
pub fn fx_close(ctx: FEntryContext) -> i32 {
    let regs: *const u8 = ctx.arg(0);
    fd_event(kind::FD_CLOSE, argument(regs, REGS_DI) as u32);
    0
}

/// fexit on bind and connect: the addresses the kernel settled on (the fd is the first
/// argument, still in the registers; no map from enter to exit is needed).
#[inline(always)]
fn addresses(ctx: &FExitContext) {
    let regs: *const u8 = ctx.arg(0);
    addresses_settled(ctx.arg(1), argument(regs, REGS_DI) as u32);
}

/// fexit/__x64_sys_bind.
#[fexit(function = "__x64_sys_bind")]
pub fn fx_bind(ctx: FExitContext) -> i32 {
    addresses(&ctx);
    0
}

/// fexit/__x64_sys_connect.
#[fexit(function = "__x64_sys_connect")]
pub fn fx_connect(ctx: FExitContext) -> i32 {
    addresses(&ctx);
    0
}

/// fexit/__x64_sys_recvmsg: fds received with SCM_RIGHTS (the user `msghdr` is the second
/// argument).
#[fexit(function = "__x64_sys_recvmsg")]
pub fn fx_recvmsg(ctx: FExitContext) -> i32 {
    let regs: *const u8 = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    if ret >= 0 {
        received_fds(argument(regs, REGS_SI));
    }
    0
}

/// fentry/security_sock_graft(sk, parent): `accept()` gives the current task a connection,
/// in its own system call, before the fd is installed. An fexit sees only calls that began
/// after it attached; a task already blocked in accept(2) when netwatch started returns
/// past it, but calls this afresh once a connection comes.
#[fentry(function = "security_sock_graft")]
pub fn fx_graft(ctx: FEntryContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    if !is_tcp(sk) {
        return 0;
    }
    let mut event = new_event(kind::GRAFT);
    fill_tcp_event(&mut event, sk);
    event.arg = -1;
    event.newstate = read_kernel(sk, constant(&OFF_SKC_STATE));
    submit(&event);
    0
}
