//! netwatch's kernel programs: one small function per hook, each filling a [`SockEvent`] and
//! pushing it into the single `EVENTS` ring buffer.
//!
//! Rust eBPF gets no CO-RE relocations, so every kernel struct offset and every classic
//! tracepoint field offset is a read-only global that the loader resolves in userspace (from
//! `/sys/kernel/btf/vmlinux` and the tracepoint's `format` file) and patches in at load time.
//! The cgroup programs always return 1 (allow): returning 0 would refuse sockets host-wide.
//!
//! One module per concern: [`state`] (TCP transitions), [`lifecycle`] (socket creation,
//! release, UDP first send), [`fds`] (ownership through fds; [`syscalls`], the same on BPF
//! trampolines where the kernel allows them), [`tcp`] (resets and
//! retransmits), [`process`] (fork, exec, exit); [`record`] builds and submits records and
//! [`globals`] holds the offsets the loader patches. The names userspace looks up are in
//! `netwatch_common::{program, map, global}`.

// no_std/no_main only for the BPF target so host `cargo check/clippy --workspace` still work.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod fds;
mod globals;
mod lifecycle;
mod process;
mod record;
mod state;
mod syscalls;
mod tcp;

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
