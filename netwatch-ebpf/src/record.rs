//! Building a record and handing it to userspace: the `EVENTS` ring buffer, the loss and
//! peak counters, the switches userspace sets, and the reads every program shares.

use crate::globals::*;
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_RING_SIZE},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_current_task, bpf_ktime_get_ns,
            bpf_probe_read_kernel,
        },
    },
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
};
use netwatch_common::{SockEvent, config};

/// Default 8 MiB (about 55 000 events: a few hundred ms of a busy host's events while the
/// agent waits for a CPU); userspace can resize it (`--ring-size`) before load.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Per CPU: [0] ring buffer reservation failures; [1] the most bytes the ring buffer held
/// unread right after this CPU wrote to it. Never reset by the kernel side.
#[map]
pub(crate) static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// Switches userspace flips after attaching; see `netwatch_common::config`.
#[map]
pub(crate) static CONFIG: Array<u32> = Array::with_max_entries(config::LEN, 0);

/// CLOSE->SYN_SENT transitions waiting for the `sock_ops` connect callback, by socket cookie.
/// LRU so that a connect whose callback never comes cannot fill the map.
#[map]
pub(crate) static PENDING_CONNECT: LruHashMap<u64, SockEvent> =
    LruHashMap::with_max_entries(8192, 0);

#[inline(always)]
pub(crate) fn submit(event: &SockEvent) {
    // With no flag the kernel wakes the reader only when it had read everything before this
    // event: the first event after a quiet spell. A busy reader drains on its own short
    // timer meanwhile (netwatch tracer.rs), so events in a burst cost no wakeups; an eighth
    // of the buffer waiting wakes it regardless.
    let unread = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let size = EVENTS.query(BPF_RB_RING_SIZE as u64);
    let wakeup = if unread >= size / 8 { BPF_RB_FORCE_WAKEUP } else { 0 };
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
pub(crate) fn new_event(kind: u8) -> SockEvent {
    let mut event = SockEvent::zeroed();
    event.kind = kind;
    // SAFETY: helper with no arguments.
    event.ts_ns = unsafe { bpf_ktime_get_ns() };
    event.pid_tgid = bpf_get_current_pid_tgid();
    event.comm = process_comm();
    // SAFETY: helper with no arguments; every program type that calls new_event (tracing,
    // tracepoint, cgroup sock and sock_addr) may call it since 5.7.
    event.cgroup = unsafe { bpf_get_current_cgroup_id() };
    event
}

/// The current process's name (its thread-group leader's comm); the current thread's comm
/// when the offsets are unknown (no BTF) or the read fails.
#[inline(always)]
pub(crate) fn process_comm() -> [u8; 16] {
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
///
/// Without a branch on the helper's result: the helper zeroes its destination when the read
/// fails, and a branch per read doubles the paths the verifier walks. Kernels before about
/// 6.8 could not prune those paths (a zeroed stack slot and a read one never compare equal),
/// and state_btf passed the 6.1 verifier's million-instruction limit.
#[inline(always)]
pub(crate) fn read_kernel<T: Default>(base: *const u8, offset: usize) -> T {
    let mut value = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: the helper checks the source address and fails instead of faulting; on success
    // or failure it writes all `size_of::<T>()` bytes of `value` (zeros on failure), and
    // every T read this way is plain data for which all zeros is a valid value.
    unsafe {
        bpf_probe_read_kernel(
            value.as_mut_ptr().cast(),
            core::mem::size_of::<T>() as u32,
            base.wrapping_add(offset).cast(),
        );
        value.assume_init()
    }
}

#[inline(always)]
pub(crate) fn defer_connect_enabled() -> bool {
    CONFIG.get(config::DEFER_CONNECT).is_some_and(|v| *v != 0)
}
