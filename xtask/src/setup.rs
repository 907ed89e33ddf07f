//! Makes sure the machine can build and test netwatch, installing what is missing.
//!
//! What is needed (docs/ARCHITECTURE.md, Toolchain): the nightly toolchain with rust-src (the eBPF crate
//! is built with `-Z build-std=core`), bpf-linker 0.13.0 linked against the same LLVM major as
//! nightly rustc (from Debian's llvm-N-dev), iproute2 (`ss`, `ip`) and nftables (`nft`, to drop chosen packets) for the tests, and tracefs
//! mounted for the classic-tracepoint fallback. Each check is cheap; each install says what it
//! runs, and a failure names the step and the command to run by hand.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::step;

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn ensure_all() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut installed = Vec::new();

    if nightly_llvm_major().is_err() {
        step("install the nightly toolchain", || {
            run_visible(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))
        })?;
        installed.push("nightly");
    }
    let llvm = nightly_llvm_major()?;

    let packages = [
        format!("llvm-{llvm}-dev"),
        format!("libpolly-{llvm}-dev"),
        "iproute2".into(),
        "nftables".into(),
    ];
    let missing: Vec<&str> =
        packages.iter().map(String::as_str).filter(|p| !package_installed(p)).collect();
    if !missing.is_empty() {
        step(&format!("install Debian packages: {}", missing.join(" ")), || {
            install_packages(&missing)
        })?;
        installed.push("Debian packages");
    }

    if !component_installed("nightly", "rust-src")? {
        step("add rust-src to the nightly toolchain", || {
            run_visible(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))
        })?;
        installed.push("rust-src");
    }

    // `cargo xtask test` checks formatting and lints with the workspace's own toolchain.
    for component in ["rustfmt", "clippy"] {
        if !component_installed("stable", component)? {
            step(&format!("add {component} to the stable toolchain"), || {
                run_visible(Command::new("rustup").args([
                    "component",
                    "add",
                    component,
                    "--toolchain",
                    "stable",
                ]))
            })?;
            installed.push(component);
        }
    }

    match bpf_linker_llvm() {
        Some((version, Some(major))) if version == BPF_LINKER_VERSION && major == llvm => {}
        found => {
            if let Some((version, major)) = found {
                let major = major.map_or("unknown".into(), |m| m.to_string());
                eprintln!(
                    "==> bpf-linker {version} (LLVM {major}) does not match the wanted \
                     {BPF_LINKER_VERSION} on LLVM {llvm} (nightly rustc's): rebuilding it"
                );
            }
            step(&format!("build bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm}"), || {
                install_bpf_linker(llvm)
            })?;
            installed.push("bpf-linker");
        }
    }

    if !tracefs_mounted() {
        step("mount tracefs at /sys/kernel/tracing", mount_tracefs)?;
        installed.push("tracefs");
    }

    let what = if installed.is_empty() { "all present".into() } else { installed.join(", ") };
    eprintln!("==> set-up checked in {:.2?} ({what})", started.elapsed());
    Ok(())
}

/// LLVM major version of the nightly rustc, e.g. 22 for "LLVM version: 22.1.4".
fn nightly_llvm_major() -> anyhow::Result<u32> {
    let output = Command::new("rustc")
        .args(["+nightly", "-vV"])
        .stderr(Stdio::null())
        .output()
        .context("running `rustc +nightly -vV` (is rustup installed?)")?;
    if !output.status.success() {
        bail!("no nightly toolchain");
    }
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|version| version.split('.').next()?.trim().parse().ok())
        .context("`rustc +nightly -vV` printed no LLVM version")
}

/// Installs the standard library of `target` for the stable toolchain, if missing.
pub fn ensure_target(target: &str) -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running rustup")?;
    if String::from_utf8_lossy(&installed.stdout).lines().any(|t| t.trim() == target) {
        return Ok(());
    }
    step(&format!("install the {target} target"), || {
        run_visible(Command::new("rustup").args(["target", "add", target]))
    })
}

/// Installs the Debian packages in `packages` that are missing.
pub fn ensure_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !package_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("install Debian packages: {}", missing.join(" ")), || install_packages(&missing))
}

/// The PyPI packages the tests run, in a virtual environment at `target/test-python`: the
/// OTLP receiver's (`tests/support/otlp_receiver.py`; Debian has neither opentelemetry-proto
/// nor a protobuf new enough for it) and kubernetes-validate for the manifests.
const TEST_PYTHON_PACKAGES: [&str; 3] =
    ["opentelemetry-proto==1.45.2", "grpcio==1.85.3", "kubernetes-validate==1.37.0"];

/// Makes the tests' virtual environment under `root`'s target directory.
pub fn ensure_test_python(root: &Path) -> anyhow::Result<()> {
    let venv = root.join("target/test-python");
    let python = venv.join("bin/python");
    let check = "import grpc, kubernetes_validate, \
                 opentelemetry.proto.collector.logs.v1.logs_service_pb2_grpc";
    let ready = || Command::new(&python).args(["-c", check]).stderr(Stdio::null()).status();
    if ready().is_ok_and(|s| s.success()) {
        return Ok(());
    }
    step("install the tests' Python packages (target/test-python)", || {
        run_visible(Command::new("/usr/bin/python3").args(["-m", "venv"]).arg(&venv))?;
        run_visible(
            Command::new(venv.join("bin/pip")).args(["install", "-q"]).args(TEST_PYTHON_PACKAGES),
        )
    })
}

fn package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

fn install_packages(packages: &[&str]) -> anyhow::Result<()> {
    let by_hand = format!("apt-get update && apt-get install -y {}", packages.join(" "));
    if !is_root() {
        bail!("installing Debian packages needs root; run by hand: sudo sh -c '{by_hand}'");
    }
    run_visible(Command::new("apt-get").args(["update", "-q"]))
        .with_context(|| format!("run by hand: {by_hand}"))?;
    run_visible(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages),
    )
    .with_context(|| format!("run by hand: {by_hand}"))
}

fn component_installed(toolchain: &str, component: &str) -> anyhow::Result<bool> {
    let output = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", toolchain])
        .output()
        .context("running rustup")?;
    Ok(String::from_utf8_lossy(&output.stdout).lines().any(|l| l.starts_with(component)))
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn bpf_linker_path() -> PathBuf {
    let in_cargo_home = cargo_bin_dir().join("bpf-linker");
    if in_cargo_home.exists() { in_cargo_home } else { PathBuf::from("bpf-linker") }
}

/// The installed bpf-linker's version and the LLVM major of the libLLVM it is linked to.
fn bpf_linker_llvm() -> Option<(String, Option<u32>)> {
    let path = bpf_linker_path();
    let output = Command::new(&path).arg("--version").output().ok()?;
    let version = String::from_utf8_lossy(&output.stdout).split_whitespace().nth(1)?.to_string();
    let full_path = if path.is_absolute() {
        path
    } else {
        PathBuf::from(
            String::from_utf8_lossy(&Command::new("which").arg(&path).output().ok()?.stdout).trim(),
        )
    };
    let ldd = Command::new("ldd").arg(full_path).output().ok()?;
    let major = String::from_utf8_lossy(&ldd.stdout).lines().find_map(|line| {
        let rest = line.trim().strip_prefix("libLLVM")?;
        let digits: String = rest
            .trim_start_matches(|c: char| !c.is_ascii_digit())
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    });
    Some((version, major))
}

fn install_bpf_linker(llvm: u32) -> anyhow::Result<()> {
    let prefix = format!("/usr/lib/llvm-{llvm}");
    let path = format!("{prefix}/bin:{}", std::env::var("PATH").unwrap_or_default());
    let feature = format!("llvm-{llvm}");
    let args = [
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--force",
        "--no-default-features",
        "--features",
        &feature,
    ];
    run_visible(Command::new("cargo").env("LLVM_PREFIX", &prefix).env("PATH", &path).args(args))
        .with_context(|| {
            format!(
                "run by hand: LLVM_PREFIX={prefix} PATH={prefix}/bin:$PATH cargo {}",
                args.join(" ")
            )
        })
}

fn tracefs_mounted() -> bool {
    ["/sys/kernel/tracing/events", "/sys/kernel/debug/tracing/events"]
        .iter()
        .any(|p| Path::new(p).is_dir())
}

fn mount_tracefs() -> anyhow::Result<()> {
    let by_hand = "mount -t tracefs tracefs /sys/kernel/tracing";
    if !is_root() {
        bail!("mounting tracefs needs root; run by hand: sudo {by_hand}");
    }
    run_visible(Command::new("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]))
        .with_context(|| format!("run by hand: {by_hand}"))
}

pub(crate) fn run_visible(command: &mut Command) -> anyhow::Result<()> {
    let status = command.status().with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}
