//! What the scenarios share: a network namespace and an agent of the bench's own, and the
//! readings they take (RSS, CPU time, kernel run time, metrics, latency summaries).
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::*;

/// A network namespace made for one scenario, deleted with everything in it when dropped.
pub(super) struct Namespace(String);

impl Namespace {
    pub(super) fn new() -> anyhow::Result<Namespace> {
        let name = format!("nwbench-{}", std::process::id());
        let run = |args: &[&str]| -> anyhow::Result<()> {
            let status = Command::new("ip").args(args).status().context("running ip")?;
            if !status.success() {
                bail!("ip {args:?} failed: {status}");
            }
            Ok(())
        };
        run(&["netns", "add", &name])?;
        let namespace = Namespace(name);
        run(&["netns", "exec", &namespace.0, "ip", "link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    pub(super) fn command(&self, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.0]).arg(program);
        command
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A `netwatch agent` on its own socket, stopped with SIGTERM when dropped. Its stderr is
/// drained into `stderr` (a closed pipe would fail its later warnings).
pub(super) struct Agent {
    pub(super) child: Child,
    pub(super) socket: PathBuf,
    pub(super) netwatch: PathBuf,
    pub(super) stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Agent {
    pub(super) fn start(bench: &Bench, args: &[&str]) -> anyhow::Result<Agent> {
        let socket =
            std::env::temp_dir().join(format!("netwatch-bench-{}.sock", std::process::id()));
        let netwatch = bench.bin("netwatch");
        let mut child = Command::new(&netwatch)
            .args(["agent", "--socket"])
            .arg(&socket)
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the agent")?;
        let mut reader = BufReader::new(child.stderr.take().context("stderr")?);
        // Warnings (a program this kernel refuses) come before the line that says it serves.
        let mut said = String::new();
        let mut line = String::new();
        while reader.read_line(&mut line)? > 0 && !line.contains("serving") {
            said.push_str(&line);
            line.clear();
        }
        said.push_str(&line);
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(said.clone()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                if let Ok(mut text) = sink.lock() {
                    text.push_str(&line);
                    text.push('\n');
                }
            }
        });
        let agent = Agent { child, socket, netwatch, stderr };
        if !line.contains("serving") {
            bail!("the agent did not start: {said}");
        }
        Ok(agent)
    }

    /// How many times the agent said it lost events (and rebuilt its table).
    pub(super) fn loss_reports(&self) -> usize {
        self.stderr.lock().map_or(0, |text| text.matches("events were lost").count())
    }

    pub(super) fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmRSS")
    }

    /// How many closed connections `netwatch history --closed` lists.
    pub(super) fn closed_histories(&self) -> anyhow::Result<usize> {
        let output = Command::new(&self.netwatch)
            .args(["history", "--closed", "--json", "--socket"])
            .arg(&self.socket)
            .output()?;
        if !output.status.success() {
            bail!("netwatch history failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        // One object per history, each with exactly one "cookie" key.
        Ok(String::from_utf8_lossy(&output.stdout).matches("\"cookie\":").count())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// One JSON object of the snapshot report.
pub(super) fn serde_like(
    size: usize,
    ours: &Timing,
    ss: &Timing,
    net: Option<&Timing>,
    (rss, idle): (u64, u64),
    (heap, idle_heap): (u64, u64),
) -> String {
    let t = |t: &Timing| {
        format!(r#"{{"median_ms":{:.3},"min_ms":{:.3},"max_ms":{:.3}}}"#, t.median, t.min, t.max)
    };
    format!(
        r#"{{"sockets":{size},"netwatch_table":{},"ss_tanp":{},"netstat_tanp":{},"agent_rss_kib":{rss},"idle_agent_rss_kib":{idle},"agent_heap_bytes":{heap},"idle_agent_heap_bytes":{idle_heap}}}"#,
        t(ours),
        t(ss),
        net.map_or("null".into(), t)
    )
}

pub(super) fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.exists())
}

/// CLOCK_MONOTONIC in ns: the clock of the kernel's event timestamps.
pub(super) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// User plus system CPU time a process has used, in seconds.
pub(super) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let after = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |at: usize| -> anyhow::Result<u64> {
        Ok(fields.get(at).context("short /proc/PID/stat")?.parse()?)
    };
    let ticks = field(11)? + field(12)?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / per_second)
}

/// Percentiles of latencies in ns, reported in ms.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Latency {
    pub(super) samples: usize,
    pub(super) p50: f64,
    pub(super) p99: f64,
    pub(super) max: f64,
}

pub(super) fn latency(mut ns: Vec<u64>) -> Latency {
    if ns.is_empty() {
        return Latency::default();
    }
    ns.sort_unstable();
    let pick =
        |q: f64| ns[((ns.len() as f64 * q).ceil() as usize).clamp(1, ns.len()) - 1] as f64 / 1e6;
    Latency { samples: ns.len(), p50: pick(0.5), p99: pick(0.99), max: pick(1.0) }
}

/// The value after `"key":` in a JSON line, as a number (enough for the flat records netwatch
/// prints; xtask has no JSON dependency).
pub(super) fn json_number(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = line[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// One metric's value summed over its label sets, from a Prometheus text scrape.
pub(super) fn metric_sum(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `GET /metrics` from the agent.
pub(super) fn scrape(address: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default())
}

/// Total run time (ns) and runs of the BPF programs process `pid` holds, from its fds'
/// fdinfo (counted while `kernel.bpf_stats_enabled` is 1).
pub(super) fn bpf_run_time(pid: u32) -> anyhow::Result<(u64, u64)> {
    let (mut ns, mut runs) = (0, 0);
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else { continue };
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("run_time_ns:") {
                ns += v.trim().parse::<u64>().unwrap_or(0);
            } else if let Some(v) = line.strip_prefix("run_cnt:") {
                runs += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Ok((ns, runs))
}

/// Per program of process `pid`, by name (from bpftool): (run time ns, runs), counted while
/// `kernel.bpf_stats_enabled` is 1.
pub(super) fn bpf_programs(pid: u32) -> anyhow::Result<Vec<(String, u64, u64)>> {
    let mine: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))?
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .filter_map(|text| {
            text.lines().find_map(|l| l.strip_prefix("prog_id:")?.trim().parse::<u64>().ok())
        })
        .collect();
    let output = std::process::Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .context("running bpftool (Debian's bpftool)")?;
    if !output.status.success() {
        bail!("bpftool prog show: {}", String::from_utf8_lossy(&output.stderr));
    }
    let all: Vec<serde_json::Value> =
        serde_json::from_slice(&output.stdout).context("reading bpftool's JSON")?;
    Ok(all
        .iter()
        .filter(|p| p["id"].as_u64().is_some_and(|id| mine.contains(&id)))
        .map(|p| {
            let name = p["name"].as_str().unwrap_or("?").to_string();
            (name, p["run_time_ns"].as_u64().unwrap_or(0), p["run_cnt"].as_u64().unwrap_or(0))
        })
        .collect())
}

/// `tcpstates` (Debian's libbpf-tools) started with its output discarded, once it has had
/// time to attach (it prints nothing we could wait for).
pub(super) fn start_tcpstates() -> anyhow::Result<Child> {
    let mut child = Command::new("tcpstates")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting tcpstates (Debian's libbpf-tools)")?;
    // libbpf loads in well under this.
    std::thread::sleep(std::time::Duration::from_secs(2));
    if child.try_wait()?.is_some() {
        bail!("tcpstates exited at start");
    }
    Ok(child)
}

/// A loopback port nobody uses right now.
pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
