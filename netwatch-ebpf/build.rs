//! Rebuild the kernel programs when `bpf-linker` changes: cargo cannot express a dependency on
//! a binary, so key on the linker's path (its mtime is checked by cargo).
use which::which;

fn main() {
    match which("bpf-linker") {
        Ok(linker) => println!("cargo:rerun-if-changed={}", linker.display()),
        // Host builds (clippy, check) never link BPF; aya-build reports a missing linker itself.
        Err(_) => println!("cargo:rerun-if-env-changed=PATH"),
    }
}
