//! The container image (`deploy/image/Containerfile`, FROM scratch around the static binary),
//! built with buildah and run under podman the way `deploy/kubernetes/daemonset.yaml` runs
//! it: its capabilities (read from the manifest), host PID namespace, read-only root and
//! host mounts, its TLS files. It must trace as the host's own binary does, name its own
//! container, and answer the probes.
use std::{
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{dist::VERSION, setup::run_visible as run, step};

/// What building and running the image needs: runc, since crun refuses a host with both
/// cgroup hierarchies mounted (Debian 12 in some sandboxes); curl for the probes.
pub const PACKAGES: &[&str] = &["podman", "buildah", "runc", "curl", "openssl"];

const TAG: &str = "localhost/netwatch:test";
const NAME: &str = "netwatch-image-test";

/// The capabilities the DaemonSet adds, from its `add: [...]` line.
fn daemonset_capabilities(root: &Path) -> anyhow::Result<Vec<String>> {
    let manifest = std::fs::read_to_string(root.join("deploy/kubernetes/daemonset.yaml"))?;
    let line = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("add: ["))
        .context("no `add: [...]` capabilities in daemonset.yaml")?;
    let list = line.trim().trim_start_matches("add: [").trim_end_matches(']');
    Ok(list.split(',').map(|c| c.trim().to_string()).collect())
}

fn output(command: &mut Command) -> anyhow::Result<Output> {
    command.output().with_context(|| format!("running {command:?}"))
}

/// `wanted`, or this process's hard limit of `resource` if that is lower: podman's defaults
/// for a container's open files and processes can be above what the host allows, and
/// setting them then fails.
fn limit(resource: libc::__rlimit_resource_t, wanted: u64) -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid pointer to an rlimit.
    unsafe { libc::getrlimit(resource, &mut limit) };
    limit.rlim_max.min(wanted)
}

pub fn test(root: &Path, dist: &Path) -> anyhow::Result<()> {
    step("build the image (buildah, FROM scratch)", || {
        run(Command::new("buildah")
            .args(["build", "-q", "--build-arg", &format!("VERSION={VERSION}"), "-t", TAG, "-f"])
            .arg(root.join("deploy/image/Containerfile"))
            .arg(dist))
    })?;
    step("the image under podman, as the DaemonSet runs it", || run_as_daemonset(root, dist))
}

fn run_as_daemonset(root: &Path, dist: &Path) -> anyhow::Result<()> {
    let secret = dist.join("image-test-secret");
    let _ = std::fs::remove_dir_all(&secret);
    std::fs::create_dir_all(&secret)?;
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
        .args(["-nodes", "-days", "2", "-subj", "/CN=netwatch", "-addext"])
        .arg("subjectAltName=IP:127.0.0.1")
        .arg("-keyout")
        .arg(secret.join("tls.key"))
        .arg("-out")
        .arg(secret.join("tls.crt")))?;
    std::fs::write(secret.join("token"), "image-test-token\n")?;
    let caps = daemonset_capabilities(root)?;
    let cgroup = netwatch_cgroup_root().context("no cgroup2 hierarchy is mounted")?;
    let _ = output(Command::new("podman").args(["rm", "-f", NAME]));
    let mount = |from: &str, to: &str| format!("{from}:{to}:ro");
    let started = output(
        Command::new("podman")
            .args(["--runtime", "runc", "run", "-d", "--name", NAME])
            .arg(format!("--ulimit=nofile={0}:{0}", limit(libc::RLIMIT_NOFILE, 16384)))
            .arg(format!("--ulimit=nproc={0}:{0}", limit(libc::RLIMIT_NPROC, 1024)))
            .args(["--cap-drop=all", &format!("--cap-add={}", caps.join(","))])
            .args(["--pid=host", "--network=host", "--read-only", "--tmpfs=/run/netwatch"])
            .args(["--security-opt", "no-new-privileges"])
            .args(["-v", &mount(&cgroup, "/host/sys/fs/cgroup")])
            .args(["-v", &mount("/sys/kernel/tracing", "/sys/kernel/tracing")])
            .args(["-v", &mount("/var/log", "/host/var/log")])
            .args(["-v", &mount(&secret.display().to_string(), "/etc/netwatch")])
            .args([TAG, "agent", "--cgroup-root=/host/sys/fs/cgroup"])
            .args(["--kubelet-logs=/host/var/log", "--metrics=127.0.0.1:19911"])
            .args(["--metrics-tls-cert=/etc/netwatch/tls.crt"])
            .args(["--metrics-tls-key=/etc/netwatch/tls.key"])
            .args(["--metrics-token-file=/etc/netwatch/token"]),
    )?;
    if !started.status.success() {
        bail!("podman run: {}", String::from_utf8_lossy(&started.stderr));
    }
    let result = check_running(dist);
    let logs = output(Command::new("podman").args(["logs", NAME]))?;
    let _ = output(Command::new("podman").args(["rm", "-f", NAME]));
    let _ = std::fs::remove_dir_all(&secret);
    result.with_context(|| {
        format!("the agent in the image said:\n{}", String::from_utf8_lossy(&logs.stderr))
    })
}

/// The host's cgroup2 mount (the agent's default), to mount at the DaemonSet's path.
fn netwatch_cgroup_root() -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        after.starts_with("cgroup2 ").then(|| before.split(' ').nth(4).map(String::from))?
    })
}

fn check_running(dist: &Path) -> anyhow::Result<()> {
    let exec =
        |args: &[&str]| output(Command::new("podman").args(["exec", NAME, "/netwatch"]).args(args));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = output(Command::new("podman").args(["logs", NAME]))?;
        if String::from_utf8_lossy(&logs.stderr).contains("serving") {
            break;
        }
        if Instant::now() > deadline {
            bail!("the agent did not start within 30 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The same hooks as the host's own binary on this kernel.
    let host_binary = dist.join(format!("netwatch-{VERSION}-{}", crate::dist::TARGET));
    let host = output(Command::new(&host_binary).arg("check"))?;
    let inside = exec(&["check"])?;
    if host.status.code() != inside.status.code() {
        bail!(
            "netwatch check: {:?} in the image, {:?} on the host:\n{}",
            inside.status.code(),
            host.status.code(),
            String::from_utf8_lossy(&inside.stdout)
        );
    }
    // Its own listener, owned by itself, in its own container.
    let id = output(Command::new("podman").args(["inspect", "--format", "{{.Id}}", NAME]))?;
    let id = String::from_utf8_lossy(&id.stdout).trim().to_string();
    let table = exec(&["table", "-tl", "--json", "sport = :19911"])?;
    let rows: serde_json::Value = serde_json::from_slice(&table.stdout)
        .with_context(|| String::from_utf8_lossy(&table.stderr).into_owned())?;
    let row = &rows[0];
    if row["owners"][0]["comm"] != "netwatch" || row["workload"]["container_id"] != id.as_str() {
        bail!("the agent's listener is not its own, in container {id}: {rows}");
    }
    // The probes' path answers without the token; the metrics only with it.
    let curl = |path: &str, token: Option<&str>| -> anyhow::Result<String> {
        let mut command = Command::new("curl");
        command.args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"]);
        if let Some(token) = token {
            command.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
        let out = output(command.arg(format!("https://127.0.0.1:19911{path}")))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let answers = [
        curl("/healthz", None)?,
        curl("/metrics", None)?,
        curl("/metrics", Some("image-test-token"))?,
    ];
    if answers != ["200", "401", "200"] {
        bail!("/healthz, /metrics without and with the token answered {answers:?}");
    }
    eprintln!(
        "==> image: check as on the host, own listener in container {}, probes {answers:?}",
        &id[..12]
    );
    Ok(())
}
