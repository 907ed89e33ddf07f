//! `cargo xtask vm`: the privileged tests on other kernels. Each kernel of [`MATRIX`] boots
//! under qemu with software emulation (TCG: this machine's /dev/kvm is a nested hypervisor
//! under which a stock kernel crawls), with this machine's root shared read-only over 9p, so
//! that the built test binaries, `ss`, `ip` and `nft` are all there. A small initramfs loads
//! the virtio and 9p modules, mounts the shared root with tmpfs over the writable places, and
//! runs each test binary inside it; results come back on the serial console.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// A kernel the tests run on: a Debian package that installs it in /boot and /lib/modules
/// (the set-up installs it). Adding a kernel is one line here.
pub struct Kernel {
    pub label: &'static str,
    pub package: &'static str,
}

pub const MATRIX: &[Kernel] = &[Kernel { label: "debian-12", package: "linux-image-amd64" }];

/// What the matrix needs on the host, besides the kernels.
pub const PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "cpio"];

/// One kernel's run: each test binary's counts, and the console log.
pub struct Outcome {
    pub label: &'static str,
    /// How many test binaries were sent in.
    pub expected: usize,
    pub release: String,
    pub binaries: Vec<BinaryResult>,
    pub took: Duration,
    pub console: PathBuf,
}

#[derive(Debug, PartialEq, Eq)]
pub struct BinaryResult {
    pub name: String,
    pub passed: u32,
    pub failed: u32,
    /// Whether the binary printed its result line (false: it hung, crashed or timed out).
    pub finished: bool,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.binaries.len() == self.expected
            && self.binaries.iter().all(|b| b.finished && b.failed == 0)
    }
}

/// Virtio and 9p, in modules.dep order: Debian builds them as modules.
const BOOT_MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci",
    "net/9p/9pnet",
    "net/9p/9pnet_virtio",
    "fs/netfs/netfs",
    "fs/fscache/fscache",
    "fs/9p/9p",
];

/// The initramfs's /init: mounts the host root and what a system has, hands module loading
/// to the host root's modprobe (inet_diag, nf_tables... load on demand as on a real system),
/// mounts the project again at its path, runs /guest.sh in the host root, and powers off.
const INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for m in /mods/*.ko; do insmod "$m"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /host || poweroff -f
H=/host
mount -t proc proc $H/proc; mount -t sysfs sysfs $H/sys; mount -t devtmpfs devtmpfs $H/dev
mkdir -p $H/dev/pts $H/dev/shm 2>/dev/null
mount -t devpts devpts $H/dev/pts; mount -t tmpfs tmpfs $H/dev/shm
for d in run tmp var/tmp root; do mount -t tmpfs tmpfs $H/$d; done
# The project (its built binaries) again at its own path, which a tmpfs may now hide (a CI
# clone under /tmp).
P=$(cat /project-root)
mkdir -p $H$P 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 project $H$P || poweroff -f
mount -t bpf bpf $H/sys/fs/bpf; mount -t cgroup2 cgroup2 $H/sys/fs/cgroup
mount -t tracefs tracefs $H/sys/kernel/tracing; mount -t debugfs debugfs $H/sys/kernel/debug
ip link set lo up
printf '#!/bin/sh\nexec /bin/chroot /host /sbin/modprobe "$@"\n' > /modprobe-host
chmod +x /modprobe-host; echo /modprobe-host > /proc/sys/kernel/modprobe
cp /guest.sh $H/tmp/guest.sh
echo "=== netwatch-vm: kernel $(uname -r)"
chroot $H /bin/bash /tmp/guest.sh < /dev/null
echo "=== netwatch-vm: end"
sync; poweroff -f
"#;

/// The installed kernel release (`6.1.0-56-amd64`) of `package` (a metapackage that depends
/// on `linux-image-RELEASE`), or of the package itself.
pub fn kernel_release(package: &str) -> anyhow::Result<String> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${Depends}", package])
        .output()
        .context("running dpkg-query")?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.split([' ', ',', '|'])
        .filter_map(|word| word.strip_prefix("linux-image-"))
        .find(|release| Path::new(&format!("/boot/vmlinuz-{release}")).exists())
        .map(String::from)
        .with_context(|| format!("no kernel of package {package} in /boot (is it installed?)"))
}

/// What goes into an initramfs besides busybox: kernel modules of `release` to load (paths
/// under `kernel/`, without `.ko`), the `/init` script, `/guest.sh`, and files to copy in
/// (source, path inside).
pub struct Image<'a> {
    pub release: &'a str,
    pub modules: &'a [&'a str],
    pub init: &'a str,
    pub guest: &'a str,
    pub files: &'a [(&'a Path, &'a str)],
}

/// Writes the initramfs into `dir` and returns its path.
pub fn initramfs(dir: &Path, image: &Image<'_>) -> anyhow::Result<PathBuf> {
    let root = dir.join("initramfs");
    let _ = std::fs::remove_dir_all(&root);
    for sub in ["bin", "proc", "sys", "dev", "host", "mods", "run", "tmp"] {
        std::fs::create_dir_all(root.join(sub))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).context("copying /bin/busybox")?;
    let applets = Command::new(root.join("bin/busybox")).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&applets.stdout).lines().filter(|a| *a != "busybox") {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    let modules = Path::new("/lib/modules").join(image.release).join("kernel");
    for (n, module) in image.modules.iter().enumerate() {
        let source = modules.join(format!("{module}.ko"));
        // Built into this kernel, or absent from it: nothing to load.
        if source.exists() {
            let name = Path::new(module).file_name().map(|n| n.to_string_lossy().into_owned());
            let target = root.join(format!("mods/{n:02}-{}.ko", name.unwrap_or_default()));
            std::fs::copy(&source, target)?;
        }
    }
    for (source, inside) in image.files {
        let target = root.join(inside.trim_start_matches('/'));
        std::fs::copy(source, &target)
            .with_context(|| format!("copying {} into the initramfs", source.display()))?;
    }
    write_executable(&root.join("init"), image.init)?;
    write_executable(&root.join("guest.sh"), image.guest)?;
    let image = dir.join("initrd.gz");
    let archive = format!(
        "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
        root.display(),
        image.display()
    );
    let status = Command::new("sh").args(["-c", &archive]).status()?;
    if !status.success() {
        bail!("building the initramfs failed ({status})");
    }
    Ok(image)
}

fn write_executable(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The guest's work: each test binary in turn, one test at a time, between markers the
/// console parser finds.
fn guest_script(root: &Path, netwatch: &Path, tests: &[PathBuf], per_binary: Duration) -> String {
    let mut script = String::from("#!/bin/bash\n");
    // init's PATH is busybox's; the tests run the host root's ip, ss, nft, nstat, sysctl.
    script.push_str("export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n");
    let _ = writeln!(script, "cd '{}'", root.join("tests").display());
    let _ = writeln!(script, "export NETWATCH_BIN='{}'", netwatch.display());
    let _ = writeln!(script, "'{}' --version", netwatch.display());
    // What works on this kernel, and each program's verified instructions, for the record.
    let _ = writeln!(script, "'{}' check", netwatch.display());
    for test in tests {
        let name = test_name(test);
        let _ = writeln!(script, "echo '=== netwatch-vm: begin {name}'");
        let _ = writeln!(
            script,
            "timeout -s KILL {} '{}' --test-threads=1 2>&1",
            per_binary.as_secs(),
            test.display()
        );
        let _ = writeln!(script, "echo \"=== netwatch-vm: end {name} rc=$?\"");
    }
    script
}

/// Test binaries the matrix leaves to the host run: what they check is netwatch's userspace
/// (arguments, the event log written and read back, the exporters); the programs their
/// agents load are those the other binaries check on every kernel, and each costs the
/// matrix about three times its host run. `cargo xtask vm --tests NAME` still runs one.
pub const HOST_ONLY: &[&str] = &["cli", "log", "otlp", "prometheus", "recorded"];

/// `table-6e8c471abc89ce9a` -> `table`.
pub fn test_name(path: &Path) -> String {
    let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    file.rsplit_once('-').map_or(file.clone(), |(name, _)| name.to_string())
}

/// Each binary's result from the console: the `test result:` line between its markers.
fn parse_console(console: &str) -> Vec<BinaryResult> {
    let mut results = Vec::new();
    let mut current: Option<BinaryResult> = None;
    for line in console.lines() {
        if let Some(name) = line.strip_prefix("=== netwatch-vm: begin ") {
            results.extend(current.take());
            current = Some(BinaryResult {
                name: name.trim().to_string(),
                passed: 0,
                failed: 0,
                finished: false,
            });
        } else if let (Some(result), Some(counts)) =
            (current.as_mut(), line.trim().strip_prefix("test result: "))
        {
            let count = |word: &str| {
                counts
                    .split(';')
                    .find_map(|part| {
                        part.trim().strip_suffix(word)?.trim().rsplit(' ').next()?.parse().ok()
                    })
                    .unwrap_or(0)
            };
            (result.passed, result.failed, result.finished) =
                (count("passed"), count("failed"), true);
        } else if line.starts_with("=== netwatch-vm: end ") {
            results.extend(current.take());
        }
    }
    results.extend(current);
    results
}

/// Boots each kernel of the matrix (or those whose label contains `only`) and runs `tests`
/// (test binaries) inside, with `netwatch` as the binary under test.
pub fn run(
    root: &Path,
    netwatch: &Path,
    tests: &[PathBuf],
    only: Option<&str>,
) -> anyhow::Result<Vec<Outcome>> {
    let mut outcomes = Vec::new();
    for kernel in MATRIX.iter().filter(|k| only.is_none_or(|o| k.label.contains(o))) {
        let release = kernel_release(kernel.package)?;
        let per_binary = Duration::from_secs(600);
        let guest = guest_script(root, netwatch, tests, per_binary);
        eprintln!("==> {}: kernel {release}, {} test binaries", kernel.label, tests.len());
        let started = Instant::now();
        let (console, console_path) =
            run_guest(root, &release, &guest, per_binary * tests.len() as u32)?;
        outcomes.push(Outcome {
            label: kernel.label,
            expected: tests.len(),
            release,
            binaries: parse_console(&console),
            took: started.elapsed(),
            console: console_path,
        });
    }
    Ok(outcomes)
}

/// Boots `release` with the project's initramfs running `guest` (a bash script, run with the
/// host root and the project shared), for at most `limit`; returns what the console printed
/// and where it was saved.
pub fn run_guest(
    root: &Path,
    release: &str,
    guest: &str,
    limit: Duration,
) -> anyhow::Result<(String, PathBuf)> {
    let dir = root.join("target/vm").join(release);
    std::fs::create_dir_all(&dir)?;
    let project_root = dir.join("project-root");
    std::fs::write(&project_root, root.display().to_string())?;
    let files = [(project_root.as_path(), "project-root")];
    let image = Image { release, modules: BOOT_MODULES, init: INIT, guest, files: &files };
    let image = initramfs(&dir, &image)?;
    let console = boot(release, &image, limit, Some(root))?;
    let console_path = dir.join("console.log");
    std::fs::write(&console_path, &console)?;
    Ok((console, console_path))
}

/// Boots `release` with `image`, returning everything the console printed; with `project`,
/// this machine's root and the project are shared read-only over 9p.
pub fn boot(
    release: &str,
    image: &Path,
    limit: Duration,
    project: Option<&Path>,
) -> anyhow::Result<String> {
    let share = |path: &Path, tag: &str| {
        format!(
            "local,path={},mount_tag={tag},security_model=none,readonly=on,multidevs=remap",
            path.display()
        )
    };
    let shares: Vec<String> = project
        .map(|project| {
            let host = share(Path::new("/"), "hostroot");
            vec!["-virtfs".into(), host, "-virtfs".into(), share(project, "project")]
        })
        .unwrap_or_default();
    let output = Command::new("timeout")
        .args(["-s", "KILL", &limit.as_secs().to_string(), "qemu-system-x86_64"])
        .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "2G"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(format!("/boot/vmlinuz-{release}"))
        .arg("-initrd")
        .arg(image)
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3"])
        .args(&shares)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running qemu-system-x86_64")?;
    Ok(String::from_utf8_lossy(&output.stdout).replace('\r', ""))
}

/// The per-kernel table printed after a run.
pub fn report(outcomes: &[Outcome]) -> String {
    let mut text = String::new();
    for outcome in outcomes {
        let _ = writeln!(
            text,
            "{} ({}): {} in {:.0?} (console: {})",
            outcome.label,
            outcome.release,
            if outcome.passed() { "PASSED" } else { "FAILED" },
            outcome.took,
            outcome.console.display()
        );
        for binary in &outcome.binaries {
            let state = if binary.finished { "" } else { " (no result: hung or crashed)" };
            let _ = writeln!(
                text,
                "  {:<10} {:>3} passed {:>3} failed{state}",
                binary.name, binary.passed, binary.failed
            );
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_results_are_read_per_binary() {
        let console = "\
=== netwatch-vm: kernel 6.1.0-56-amd64
=== netwatch-vm: begin table
running 4 tests
test result: ok. 4 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 2.90s
=== netwatch-vm: end table rc=0
=== netwatch-vm: begin watch
test result: FAILED. 10 passed; 6 failed; 0 ignored; 0 measured; 0 filtered out
=== netwatch-vm: end watch rc=101
=== netwatch-vm: begin agent
running 12 tests
";
        let results = parse_console(console);
        let summary: Vec<(&str, u32, u32, bool)> =
            results.iter().map(|r| (r.name.as_str(), r.passed, r.failed, r.finished)).collect();
        assert_eq!(
            summary,
            [("table", 4, 0, true), ("watch", 10, 6, true), ("agent", 0, 0, false)]
        );
        assert_eq!(test_name(Path::new("/x/target/release/deps/table-6e8c471abc89ce9a")), "table");
    }
}
