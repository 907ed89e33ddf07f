//! The process lifecycle: fork copies fds, exec renames and closes close-on-exec fds, exit.

use crate::{globals::*, record::*};
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use netwatch_common::kind;

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
