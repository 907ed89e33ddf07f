//! `cargo xtask dist`: one file to copy. A static musl build of netwatch with the kernel
//! object inside, stripped; a `.deb` with that binary, man pages, bash/zsh/fish completions and
//! a sandboxed systemd unit for the agent (`systemd-analyze verify` must pass on it); SHA-256
//! checksums; and a boot of Debian 12's kernel with a root that holds nothing but busybox,
//! the sock_diag modules and the binary, in which it must trace; and the container image
//! around it, run as the Kubernetes DaemonSet runs it ([`crate::image`]).
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{setup, step, vm};

pub const TARGET: &str = "x86_64-unknown-linux-musl";

/// What the packaging needs on the host; musl-tools for ring's C and assembly (the TLS of
/// OTLP export), which must be built against musl.
pub const PACKAGES: &[&str] = &["dpkg-dev", "systemd", "binutils", "musl-tools"];

/// sock_diag for `netwatch table` and the agent's lookups (Debian builds them as modules).
const BARE_MODULES: &[&str] = &["net/ipv4/inet_diag", "net/ipv4/tcp_diag", "net/ipv4/udp_diag"];

const BARE_INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp
mount -t bpf bpf /sys/fs/bpf; mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tracefs tracefs /sys/kernel/tracing
for m in /mods/*.ko; do insmod "$m"; done
ip link set lo up
echo "=== bare: kernel $(uname -r)"
timeout -s KILL 300 sh /guest.sh
echo "=== bare: end"
sync; poweroff -f
"#;

/// The bare root's work: each check prints `=== bare: PASS name` or `=== bare: FAIL name`.
const BARE_GUEST: &str = r#"#!/bin/sh
pass() { echo "=== bare: PASS $1"; }
fail() { echo "=== bare: FAIL $1"; }
netwatch --version
netwatch check && pass check || fail check
netwatch agent > /tmp/agent.log 2>&1 &
for i in $(seq 50); do [ -S /run/netwatch/agent.sock ] && break; sleep 0.2; done
[ -S /run/netwatch/agent.sock ] && pass agent || { fail agent; cat /tmp/agent.log; }
netwatch watch --json > /tmp/watch.json 2> /tmp/watch.err &
WATCH=$!
sleep 2
nc -l -p 18081 > /dev/null &
nc -l -p 18080 -e sh -c 'echo hello' &
sleep 1
nc 127.0.0.1 18080 < /dev/null > /tmp/reply
nc 127.0.0.1 9 < /dev/null 2> /dev/null
sleep 2
netwatch table -tanp > /tmp/table.txt 2>&1
cat /tmp/table.txt
grep -q 'LISTEN .*:18081 .*"nc"' /tmp/table.txt && pass table || fail table
kill -INT $WATCH; sleep 1
cat /tmp/watch.err
grep '"rport":18080' /tmp/watch.json | grep '"new":"ESTABLISHED"' | grep -q '"comm":"nc"' \
  && pass connect || fail connect
grep '"rport":9' /tmp/watch.json | grep -q '"failure":"refused"' && pass refused || fail refused
"#;

const BARE_CHECKS: &[&str] = &["check", "agent", "table", "connect", "refused"];

/// The workspace's version, which xtask shares (`version.workspace`).
pub(crate) const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The kernel the bare-root test boots: the first of the matrix.
fn bare_kernel() -> &'static str {
    vm::MATRIX[0].package
}

use setup::run_visible as run;

/// Builds everything into target/dist and runs the bare-root test; returns the binary.
pub fn dist(root: &Path) -> anyhow::Result<PathBuf> {
    setup::ensure_packages(
        &[PACKAGES, vm::PACKAGES, crate::image::PACKAGES, &[bare_kernel()]].concat(),
    )?;
    setup::ensure_target(TARGET)?;
    let version = VERSION;
    let out = root.join("target/dist");
    std::fs::create_dir_all(&out)?;
    let binary = step(&format!("build a static netwatch ({TARGET})"), || {
        run(Command::new(crate::env_or("CARGO", "cargo"))
            .current_dir(root)
            .env("CC_x86_64_unknown_linux_musl", "musl-gcc")
            .args(["build", "--release", "-p", "netwatch", "--target", TARGET]))?;
        let built = root.join("target").join(TARGET).join("release/netwatch");
        let binary = out.join(format!("netwatch-{version}-{TARGET}"));
        std::fs::copy(&built, &binary)?;
        run(Command::new("strip").arg(&binary))?;
        let static_only = Command::new("file").arg(&binary).output();
        if let Ok(output) = static_only {
            let kind = String::from_utf8_lossy(&output.stdout);
            if !kind.contains("static") {
                bail!("{} is not static: {kind}", binary.display());
            }
        }
        Ok(binary)
    })?;
    let size = std::fs::metadata(&binary)?.len();
    eprintln!("==> {}: {:.1} MiB ({size} bytes)", binary.display(), size as f64 / 1048576.0);
    let deb = step("build the .deb", || deb(root, &binary, version, &out))?;
    step("checksums", || {
        let names =
            [&binary, &deb].map(|p| p.file_name().map(|n| n.to_os_string()).unwrap_or_default());
        let output = Command::new("sha256sum").current_dir(&out).args(names).output()?;
        std::fs::write(out.join("SHA256SUMS"), &output.stdout)?;
        eprint!("{}", String::from_utf8_lossy(&output.stdout));
        Ok(())
    })?;
    step("the static binary in a bare root (qemu)", || bare_root(root, &binary))?;
    crate::image::test(root, &out)?;
    Ok(binary)
}

/// The .deb: the binary, man pages and completions it writes itself, and the agent's unit.
fn deb(root: &Path, binary: &Path, version: &str, out: &Path) -> anyhow::Result<PathBuf> {
    let stage = out.join("deb");
    let _ = std::fs::remove_dir_all(&stage);
    let docs = out.join("docs");
    let _ = std::fs::remove_dir_all(&docs);
    run(Command::new(binary).arg("generate-docs").arg(&docs))?;
    let place = |from: &Path, to: &str| -> anyhow::Result<()> {
        let target = stage.join(to);
        std::fs::create_dir_all(target.parent().context("no parent")?)?;
        std::fs::copy(from, &target).with_context(|| format!("copying {}", from.display()))?;
        Ok(())
    };
    place(binary, "usr/bin/netwatch")?;
    for page in std::fs::read_dir(docs.join("man"))? {
        let page = page?.path();
        let name = page.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        place(&page, &format!("usr/share/man/man1/{name}"))?;
        run(Command::new("gzip")
            .args(["-9n"])
            .arg(stage.join(format!("usr/share/man/man1/{name}"))))?;
    }
    let completions = docs.join("completions");
    place(&completions.join("netwatch.bash"), "usr/share/bash-completion/completions/netwatch")?;
    place(&completions.join("_netwatch"), "usr/share/zsh/vendor-completions/_netwatch")?;
    place(&completions.join("netwatch.fish"), "usr/share/fish/vendor_completions.d/netwatch.fish")?;
    let unit = root.join("packaging/netwatch-agent.service");
    place(&unit, "lib/systemd/system/netwatch-agent.service")?;
    verify_unit(&unit, binary, out)?;
    let mut control = String::new();
    let _ = writeln!(control, "Package: netwatch");
    let _ = writeln!(control, "Version: {version}");
    let _ = writeln!(control, "Architecture: amd64");
    let _ = writeln!(control, "Maintainer: netwatch developers <netwatch@localhost>");
    let _ = writeln!(control, "Section: net");
    let _ = writeln!(control, "Priority: optional");
    let _ = writeln!(control, "Description: live TCP connection tracer (eBPF)");
    let _ = writeln!(
        control,
        " Every TCP and UDP socket on the host, its real owner and its state machine's\n history, live, with no polling. One static binary; the agent runs as a\n systemd service (netwatch-agent.service)."
    );
    std::fs::create_dir_all(stage.join("DEBIAN"))?;
    std::fs::write(stage.join("DEBIAN/control"), control)?;
    let deb = out.join(format!("netwatch_{version}_amd64.deb"));
    run(Command::new("dpkg-deb").args(["--build", "--root-owner-group"]).arg(&stage).arg(&deb))?;
    Ok(deb)
}

/// `systemd-analyze verify` on the unit, with ExecStart pointed at the built binary (verify
/// checks that the command exists).
fn verify_unit(unit: &Path, binary: &Path, out: &Path) -> anyhow::Result<()> {
    let dir = out.join("unit-check");
    std::fs::create_dir_all(&dir)?;
    let text = std::fs::read_to_string(unit)?
        .replace("ExecStart=/usr/bin/netwatch", &format!("ExecStart={}", binary.display()));
    let copy = dir.join("netwatch-agent.service");
    std::fs::write(&copy, text)?;
    // The man page is in the package, not on this machine.
    let output =
        Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&copy).output()?;
    let said = String::from_utf8_lossy(&output.stderr);
    // verify also reports on units it pulls in from this machine; only ours is checked.
    let ours: Vec<&str> = said.lines().filter(|l| l.contains("netwatch-agent.service")).collect();
    if !output.status.success() || !ours.is_empty() {
        let said = if ours.is_empty() { said.trim().to_string() } else { ours.join("; ") };
        bail!("systemd-analyze verify netwatch-agent.service: {said}");
    }
    Ok(())
}

/// Boots Debian 12's kernel with busybox, the sock_diag modules and `binary` only.
fn bare_root(root: &Path, binary: &Path) -> anyhow::Result<()> {
    let release = vm::kernel_release(bare_kernel())?;
    let dir = root.join("target/dist/bare");
    std::fs::create_dir_all(&dir)?;
    let image = vm::Image {
        release: &release,
        modules: BARE_MODULES,
        init: BARE_INIT,
        guest: BARE_GUEST,
        files: &[(binary, "bin/netwatch")],
    };
    let image = vm::initramfs(&dir, &image)?;
    let console = vm::boot(&release, &image, Duration::from_secs(400), None)?;
    std::fs::write(dir.join("console.log"), &console)?;
    let failed: Vec<&&str> = BARE_CHECKS
        .iter()
        .filter(|check| !console.contains(&format!("=== bare: PASS {check}")))
        .collect();
    eprintln!(
        "==> bare root on {release}: {} of {} checks passed",
        BARE_CHECKS.len() - failed.len(),
        BARE_CHECKS.len()
    );
    if !failed.is_empty() {
        bail!(
            "in the bare root, failed: {failed:?} (console: {})",
            dir.join("console.log").display()
        );
    }
    Ok(())
}
