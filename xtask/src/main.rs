//! `cargo xtask`: the project's own set-up, run and test orchestration.
//!
//! Every command first makes sure the machine has what the build and the tests need and
//! installs what is missing, printing each step and how long it took. With everything present
//! the checks cost well under a second.
mod bench;
mod dist;
mod image;
mod setup;
mod vm;

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Set up, build, run and test netwatch")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install whatever is missing (Debian packages, rust-src, bpf-linker, tracefs mount).
    Setup,
    /// Set up, build in release mode and run netwatch as root; arguments after `--` go to it.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run the unit tests, the privileged integration tests, the kernel matrix
    /// (`vm`), and `dist` with its bare-root test.
    Test,
    /// Build the static binary and the .deb into target/dist, with checksums, and test the
    /// binary in a bare root under qemu.
    Dist,
    /// Set up, build, and run the privileged tests on each kernel of the matrix under qemu.
    Vm {
        /// Only the kernels whose label contains this.
        #[arg(long)]
        kernel: Option<String>,
        /// Only these test binaries (agent, table, watch...), for a quicker look.
        #[arg(long, value_delimiter = ',')]
        tests: Vec<String>,
    },
    /// Set up, build in release mode and run the benchmarks (report in target/bench/).
    Bench {
        /// Socket counts for the snapshot scenario.
        #[arg(long, value_delimiter = ',', default_value = "10000,50000,100000")]
        sockets: Vec<usize>,
        /// `--history-keep` values for the retention scenario.
        #[arg(long, value_delimiter = ',', default_value = "10000,40000")]
        retention: Vec<usize>,
        /// Only these scenarios (retention, snapshot, overhead, latency, tax, tax-vm, idle,
        /// soak).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let root = workspace_root();
    match cli.command {
        Task::Setup => setup::ensure_all(),
        Task::Run { args } => {
            setup::ensure_all()?;
            step("build netwatch (release)", || {
                cargo(&root, &["build", "--release", "-p", "netwatch"])
            })?;
            if !setup::is_root() {
                bail!(
                    "netwatch loads eBPF programs and must run as root: run `sudo -E cargo xtask \
                     run` (or `sudo {}`)",
                    root.join("target/release/netwatch").display()
                );
            }
            let binary = root.join("target/release/netwatch");
            let error = Command::new(&binary).args(&args).exec();
            Err(error).with_context(|| format!("starting {}", binary.display()))
        }
        Task::Bench { sockets, retention, only } => {
            setup::ensure_all()?;
            if !setup::is_root() {
                bail!("the benchmarks load eBPF programs: run `sudo -E cargo xtask bench`");
            }
            step("build netwatch and sockpeer (release)", || {
                cargo(
                    &root,
                    &["build", "--release", "-p", "netwatch", "-p", "netwatch-tests", "--bins"],
                )
            })?;
            setup::ensure_packages(&["libbpf-tools", "net-tools", "bpftool", "tmux"])?;
            let started = std::time::Instant::now();
            let bench = bench::Bench::new(&root);
            // Retention first: the snapshot scenario leaves thousands of TIME_WAIT sockets
            // behind, which a new agent would take in.
            const SCENARIOS: [&str; 11] = [
                "retention",
                "snapshot",
                "overhead",
                "otlp",
                "latency",
                "tax",
                "tax-vm",
                "idle",
                "soak",
                "top",
                "log",
            ];
            if let Some(unknown) = only.iter().find(|o| !SCENARIOS.contains(&o.as_str())) {
                bail!("no scenario '{unknown}': choose from {}", SCENARIOS.join(", "));
            }
            let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
            if wanted("retention") {
                bench.retention(&retention)?;
            }
            if wanted("snapshot") {
                bench.snapshot(&sockets)?;
            }
            if wanted("overhead") {
                bench.overhead()?;
            }
            if wanted("otlp") {
                setup::ensure_packages(&["python3-venv"])?;
                setup::ensure_test_python(&root)?;
                bench.otlp()?;
            }
            if wanted("latency") {
                bench.latency()?;
            }
            if wanted("tax") {
                bench.tax()?;
            }
            if wanted("tax-vm") {
                ensure_matrix_packages()?;
                bench.tax_in_vm()?;
            }
            if wanted("idle") {
                bench.idle()?;
            }
            if wanted("soak") {
                bench.soak()?;
            }
            if wanted("top") {
                bench.top()?;
            }
            if wanted("log") {
                bench.log()?;
            }
            eprintln!("==> benchmarks done in {:.0?}", started.elapsed());
            Ok(())
        }
        Task::Test => {
            setup::ensure_all()?;
            if !setup::is_root() {
                bail!("the integration tests load eBPF programs: run `sudo -E cargo xtask test`");
            }
            setup::ensure_packages(TEST_PACKAGES)?;
            setup::ensure_test_python(&root)?;
            step("formatting (cargo fmt --check)", || {
                cargo(&root, &["fmt", "--all", "--", "--check"])
            })?;
            step("lints (cargo clippy -D warnings)", || {
                cargo(&root, &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])
            })?;
            step("unit tests", || {
                cargo(
                    &root,
                    &[
                        "test",
                        "--release",
                        "--workspace",
                        "--exclude",
                        "netwatch-ebpf",
                        "--exclude",
                        "netwatch-tests",
                    ],
                )
            })?;
            step("build netwatch (release)", || {
                cargo(&root, &["build", "--release", "-p", "netwatch"])
            })?;
            let binary = root.join("target/release/netwatch");
            step("privileged integration tests", || {
                let status = Command::new(env_or("CARGO", "cargo"))
                    .current_dir(&root)
                    .env("NETWATCH_BIN", &binary)
                    .args(["test", "--release", "-p", "netwatch-tests", "--", "--test-threads=1"])
                    .status()
                    .context("running cargo")?;
                if !status.success() {
                    bail!("integration tests failed ({status})");
                }
                Ok(())
            })?;
            kernel_matrix(&root, None, &[])?;
            dist::dist(&root).map(drop)
        }
        Task::Dist => {
            setup::ensure_all()?;
            if !setup::is_root() {
                bail!(
                    "the bare-root test boots a kernel with qemu: run `sudo -E cargo xtask dist`"
                );
            }
            dist::dist(&root).map(drop)
        }
        Task::Vm { kernel, tests } => {
            setup::ensure_all()?;
            if !setup::is_root() {
                bail!("the kernel matrix boots kernels with qemu: run `sudo -E cargo xtask vm`");
            }
            setup::ensure_packages(TEST_PACKAGES)?;
            setup::ensure_test_python(&root)?;
            step("build netwatch (release)", || {
                cargo(&root, &["build", "--release", "-p", "netwatch"])
            })?;
            kernel_matrix(&root, kernel.as_deref(), &tests)
        }
    }
}

/// What the privileged tests run besides netwatch: `netwatch top` in tmux's pseudo-terminal,
/// serving python's http.server; Prometheus and promtool for the metrics and alert rules;
/// python3-venv for the tests' PyPI packages ([`setup::ensure_test_python`]); openssl
/// for the certificate of the metrics endpoint's TLS.
const TEST_PACKAGES: &[&str] =
    &["tmux", "python3", "python3-venv", "prometheus", "openssl", "curl"];

/// qemu, busybox and every kernel of the matrix.
fn ensure_matrix_packages() -> anyhow::Result<()> {
    let kernels: Vec<&str> = vm::MATRIX.iter().map(|k| k.package).collect();
    setup::ensure_packages(&[vm::PACKAGES, &kernels].concat())
}

/// Installs what the matrix needs, builds the test binaries, boots each kernel and runs them.
fn kernel_matrix(root: &Path, only: Option<&str>, names: &[String]) -> anyhow::Result<()> {
    ensure_matrix_packages()?;
    let mut tests = step("build the test binaries (release)", || test_binaries(root))?;
    if names.is_empty() {
        tests.retain(|t| !vm::HOST_ONLY.contains(&vm::test_name(t).as_str()));
    } else {
        tests.retain(|t| names.iter().any(|n| vm::test_name(t) == *n));
    }
    let outcomes = step("kernel matrix (qemu)", || {
        vm::run(root, &root.join("target/release/netwatch"), &tests, only)
    })?;
    eprint!("{}", vm::report(&outcomes));
    if outcomes.iter().all(vm::Outcome::passed) {
        Ok(())
    } else {
        bail!("the kernel matrix failed: see the console logs above")
    }
}

/// The privileged test binaries, built (not run), as cargo reports their paths.
fn test_binaries(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = Command::new(env_or("CARGO", "cargo"))
        .current_dir(root)
        .args(["test", "--release", "-p", "netwatch-tests", "--no-run", "--message-format=json"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo")?;
    if !output.status.success() {
        bail!("building the test binaries failed ({})", output.status);
    }
    let mut binaries: Vec<PathBuf> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["target"]["kind"][0] == "test")
        .filter_map(|message| message["executable"].as_str().map(PathBuf::from))
        .collect();
    binaries.sort();
    binaries.dedup();
    Ok(binaries)
}

/// Runs one named step, printing when it starts and how long it took.
pub fn step<T>(name: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    eprintln!("==> {name}");
    let started = Instant::now();
    let result = f().with_context(|| format!("step '{name}' failed"));
    eprintln!(
        "==> {name}: {} in {:.1?}",
        if result.is_ok() { "done" } else { "FAILED" },
        started.elapsed()
    );
    result
}

fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(env_or("CARGO", "cargo"))
        .current_dir(root)
        .args(args)
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

pub(crate) fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}
