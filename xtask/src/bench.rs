//! `cargo xtask bench`: measured figures next to their baselines from the same run.
//!
//! Scenario `snapshot`: with N open TCP sockets (held by several `sockpeer pairs`
//! processes, 10k sockets each), the wall time of a complete table from `netwatch table
//! --no-agent`, `ss -tanp` and `netstat -tanp`, each run ROUNDS times; and the agent's
//! resident memory with those sockets seeded, against an agent started with none.
//!
//! Scenario `retention`: an agent started with `--history-keep N` sees N loopback round trips
//! (2N closed connections, client and server side, so the retention fills); its resident
//! memory then, against the same agent before the traffic, divided by the histories it kept.
//!
//! Scenario `overhead`: the loopback TCP connection rate of `sockpeer rate` processes with
//! nothing attached, with the agent and with the peer `tcpstates` (Debian's libbpf-tools),
//! interleaved over rounds; the agent's lost events and both tracers' CPU time; then the
//! agent alone under more and more processes, for the rate of the first loss.
//!
//! Scenario `latency`: kernel timestamp to the line `netwatch watch` prints (through the
//! agent), and connect() to the row in the agent's table, at a low rate and under load.
//!
//! Each scenario's report (Markdown and JSON) goes to target/bench/.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

const ROUNDS: usize = 5;
const SOCKETS_PER_PROCESS: usize = 10_000;

pub struct Bench {
    root: PathBuf,
}

/// Processes holding `n` sockets until dropped.
struct Holders(Vec<Child>);

impl Drop for Holders {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Median and spread (min..max) of a set of timings, in ms.
#[derive(Debug, Clone, Copy)]
struct Timing {
    median: f64,
    min: f64,
    max: f64,
}

fn timing(mut samples: Vec<f64>) -> Timing {
    samples.sort_by(f64::total_cmp);
    Timing { median: samples[samples.len() / 2], min: samples[0], max: samples[samples.len() - 1] }
}

impl Bench {
    pub fn new(root: &Path) -> Bench {
        Bench { root: root.to_path_buf() }
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.root.join("target/release").join(name)
    }

    fn hold(&self, sockets: usize) -> anyhow::Result<Holders> {
        let mut holders = Holders(Vec::new());
        let mut left = sockets;
        while left > 0 {
            let here = left.min(SOCKETS_PER_PROCESS);
            let mut child = Command::new(self.bin("sockpeer"))
                .args(["pairs", &here.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting sockpeer")?;
            let mut line = String::new();
            BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
            if line.trim() != "ready" {
                bail!("sockpeer pairs {here} failed (see its error above)");
            }
            holders.0.push(child);
            left -= here;
        }
        Ok(holders)
    }

    fn time(&self, program: &Path, args: &[&str]) -> anyhow::Result<Timing> {
        let mut samples = Vec::new();
        for _ in 0..ROUNDS {
            let started = Instant::now();
            let status = Command::new(program)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .with_context(|| format!("running {}", program.display()))?;
            if !status.success() {
                bail!("{} {args:?} failed: {status}", program.display());
            }
            samples.push(started.elapsed().as_secs_f64() * 1e3);
        }
        Ok(timing(samples))
    }

    /// Resident memory (KiB) of an agent started now, once it serves.
    fn agent_rss(&self) -> anyhow::Result<u64> {
        let agent = Agent::start(self, &[])?;
        std::thread::sleep(Duration::from_millis(500));
        agent.rss_kib()
    }

    /// For each N in `sizes`: the agent's memory with its closed-connection retention full.
    pub fn retention(&self, sizes: &[usize]) -> anyhow::Result<()> {
        let mut markdown = String::from(
            "## Retention: agent memory with the closed-connection histories full\n\n\
             | --history-keep | closed connections | histories kept | agent RSS before | with retention full | per closed connection | loss reports |\n\
             |---:|---:|---:|---:|---:|---:|---:|\n",
        );
        let mut json = Vec::new();
        let mut measured: Vec<(usize, u64)> = Vec::new();
        for &size in sizes {
            eprintln!("==> bench retention: --history-keep {size}");
            let agent = Agent::start(self, &["--history-keep", &size.to_string()])?;
            std::thread::sleep(Duration::from_millis(500));
            let before = agent.rss_kib()?;
            let round_trips = size.to_string();
            // In a namespace of its own, so that its TIME_WAIT sockets go with it.
            let namespace = Namespace::new()?;
            let mut server = namespace
                .command(&self.bin("sockpeer"))
                .args(["serve-many", "127.0.0.1:0", &round_trips])
                .stdout(Stdio::piped())
                .spawn()
                .context("starting sockpeer serve-many")?;
            let mut line = String::new();
            BufReader::new(server.stdout.take().context("stdout")?).read_line(&mut line)?;
            let port = line.trim().strip_prefix("listening ").context("sockpeer did not listen")?;
            let churn = namespace
                .command(&self.bin("sockpeer"))
                .args(["churn", &format!("127.0.0.1:{port}"), &round_trips])
                .status()?;
            if !churn.success() || !server.wait()?.success() {
                bail!("sockpeer churn {size} failed");
            }
            std::thread::sleep(Duration::from_secs(1));
            let full = agent.rss_kib()?;
            let kept = agent.closed_histories()?;
            let per = (full.saturating_sub(before) * 1024) as f64 / kept.max(1) as f64;
            let losses = agent.loss_reports();
            measured.push((kept, full));
            markdown.push_str(&format!(
                "| {size} | {} | {kept} | {before} KiB | {full} KiB | {per:.0} B | {losses} |\n",
                2 * size
            ));
            json.push(format!(
                r#"{{"history_keep":{size},"closed":{},"kept":{kept},"rss_before_kib":{before},"rss_full_kib":{full},"loss_reports":{losses}}}"#,
                2 * size
            ));
        }
        if let ([.., (small, small_rss)], Some(&(large, large_rss))) =
            (&measured[..measured.len().saturating_sub(1)], measured.last())
        {
            let marginal = (large_rss.saturating_sub(*small_rss) * 1024) as f64
                / large.saturating_sub(*small).max(1) as f64;
            markdown.push_str(&format!(
                "\nMarginal cost between {small} and {large} kept: {marginal:.0} B per closed \
                 connection, so the default 10 000 take about {:.1} MiB.\n",
                marginal * 10_000.0 / (1024.0 * 1024.0)
            ));
        }
        markdown.push_str(
            "\nEach round trip closes two connections (client and server side), in a network \
             namespace made for the run. The growth also holds what else the agent keeps for \
             recent connections (TIME_WAIT rows, connect latency samples), so it is an upper \
             bound of a history's cost; at the smallest size the agent reuses memory its start-up \
             freed (BTF parsing), which is why the marginal cost is the figure to use.\n",
        );
        self.write_report("retention", &markdown, &json)
    }

    fn write_report(&self, name: &str, markdown: &str, json: &[String]) -> anyhow::Result<()> {
        let dir = self.root.join("target/bench");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("{name}.md")), markdown)?;
        std::fs::write(dir.join(format!("{name}.json")), format!("[{}]\n", json.join(",\n")))?;
        println!("{markdown}");
        eprintln!("==> report: {}", dir.join(format!("{name}.md")).display());
        Ok(())
    }

    pub fn snapshot(&self, sizes: &[usize]) -> anyhow::Result<()> {
        let netstat = which("netstat");
        let mut markdown = String::from(
            "## Snapshot: time to a complete table, and agent memory\n\n\
             | sockets | netwatch table | ss -tanp | netstat -tanp | netwatch / ss | agent RSS | per socket |\n\
             |---:|---:|---:|---:|---:|---:|---:|\n",
        );
        let mut json = Vec::new();
        let baseline_rss = self.agent_rss()?;
        for &size in sizes {
            eprintln!("==> bench snapshot: {size} sockets");
            let _holders = self.hold(size)?;
            let ours = self.time(&self.bin("netwatch"), &["table", "-tan", "--no-agent"])?;
            let ss = self.time(Path::new("ss"), &["-tanp"])?;
            let net = match &netstat {
                Some(path) => Some(self.time(path, &["-tanp"])?),
                None => None,
            };
            let rss = self.agent_rss()?;
            let per_socket = (rss.saturating_sub(baseline_rss) * 1024) as f64 / size as f64;
            let cell = |t: &Timing| format!("{:.0} ms ({:.0}-{:.0})", t.median, t.min, t.max);
            markdown.push_str(&format!(
                "| {size} | {} | {} | {} | {:.2} | {} KiB (idle {baseline_rss}) | {per_socket:.0} B |\n",
                cell(&ours),
                cell(&ss),
                net.as_ref().map_or("n/a".into(), cell),
                ours.median / ss.median,
                rss,
            ));
            json.push(serde_like(size, &ours, &ss, net.as_ref(), rss, baseline_rss));
        }
        markdown.push_str(&format!(
            "\nMedian of {ROUNDS} runs (min-max); sockets held by `sockpeer pairs` processes of \
             {SOCKETS_PER_PROCESS} sockets each. Per socket: (agent RSS with them seeded - idle \
             agent RSS) / sockets.\n"
        ));
        self.write_report("snapshot", &markdown, &json)
    }
}

/// A network namespace made for one scenario, deleted with everything in it when dropped.
struct Namespace(String);

impl Namespace {
    fn new() -> anyhow::Result<Namespace> {
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

    fn command(&self, program: &Path) -> Command {
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
struct Agent {
    child: Child,
    socket: PathBuf,
    netwatch: PathBuf,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Agent {
    fn start(bench: &Bench, args: &[&str]) -> anyhow::Result<Agent> {
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
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(line.clone()));
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
            bail!("the agent did not start: {line}");
        }
        Ok(agent)
    }

    /// How many times the agent said it lost events (and rebuilt its table).
    fn loss_reports(&self) -> usize {
        self.stderr.lock().map_or(0, |text| text.matches("events were lost").count())
    }

    fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmRSS")
    }

    /// How many closed connections `netwatch history --closed` lists.
    fn closed_histories(&self) -> anyhow::Result<usize> {
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

/// One JSON object; written by hand to keep xtask free of a JSON dependency for five fields.
fn serde_like(
    size: usize,
    ours: &Timing,
    ss: &Timing,
    net: Option<&Timing>,
    rss: u64,
    idle: u64,
) -> String {
    let t = |t: &Timing| {
        format!(r#"{{"median_ms":{:.3},"min_ms":{:.3},"max_ms":{:.3}}}"#, t.median, t.min, t.max)
    };
    format!(
        r#"{{"sockets":{size},"netwatch_table":{},"ss_tanp":{},"netstat_tanp":{},"agent_rss_kib":{rss},"idle_agent_rss_kib":{idle}}}"#,
        t(ours),
        t(ss),
        net.map_or("null".into(), t)
    )
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.exists())
}

/// CLOCK_MONOTONIC in ns: the clock of the kernel's event timestamps.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// User plus system CPU time a process has used, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
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
struct Latency {
    samples: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

fn latency(mut ns: Vec<u64>) -> Latency {
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
fn json_number(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = line[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// One metric's value summed over its label sets, from a Prometheus text scrape.
fn metric_sum(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `GET /metrics` from the agent.
fn scrape(address: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default())
}

/// Total run time (ns) and runs of the BPF programs process `pid` holds, from its fds'
/// fdinfo (counted while `kernel.bpf_stats_enabled` is 1).
fn bpf_run_time(pid: u32) -> anyhow::Result<(u64, u64)> {
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

/// A loopback port nobody uses right now.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// What traces the host during a load run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tracing {
    Nothing,
    Netwatch,
    Tcpstates,
}

impl Tracing {
    fn name(self) -> &'static str {
        match self {
            Tracing::Nothing => "nothing attached",
            Tracing::Netwatch => "netwatch agent",
            Tracing::Tcpstates => "tcpstates > /dev/null",
        }
    }
}

/// One load run: its rate and what the tracer spent and saw.
#[derive(Debug, Clone, Copy)]
struct LoadRun {
    round_trips_per_s: f64,
    tracer_cpu_s: f64,
    /// netwatch only: transitions it processed and events it lost during the run.
    transitions: f64,
    lost: f64,
}

const LOAD_SECONDS: f64 = 3.0;
const LOAD_PROCESSES: usize = 4;
const LOAD_ROUNDS: usize = 3;

impl Bench {
    /// `processes` sockpeer `rate` processes in a namespace made for the run (so that their
    /// TIME_WAIT sockets go with it), started together; round trips per second in total.
    fn load(&self, processes: usize, seconds: f64) -> anyhow::Result<f64> {
        use std::io::Write as _;
        let namespace = Namespace::new()?;
        let mut children = Vec::new();
        for _ in 0..processes {
            let mut child = namespace
                .command(&self.bin("sockpeer"))
                .args(["rate", &seconds.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting sockpeer rate")?;
            let mut out = BufReader::new(child.stdout.take().context("stdout")?);
            let mut line = String::new();
            out.read_line(&mut line)?;
            if line.trim() != "ready" {
                bail!("sockpeer rate did not get ready: {line:?}");
            }
            children.push((child, out));
        }
        for (child, _) in &mut children {
            child.stdin.as_mut().context("stdin")?.write_all(b"go\n")?;
        }
        let mut total = 0u64;
        for (mut child, mut out) in children {
            let mut line = String::new();
            out.read_line(&mut line)?;
            total +=
                line.trim().parse::<u64>().with_context(|| format!("sockpeer rate: {line:?}"))?;
            child.wait()?;
        }
        Ok(total as f64 / seconds)
    }

    /// One load run under `tracing`.
    fn traced_load(&self, tracing: Tracing, processes: usize) -> anyhow::Result<LoadRun> {
        match tracing {
            Tracing::Nothing => Ok(LoadRun {
                round_trips_per_s: self.load(processes, LOAD_SECONDS)?,
                tracer_cpu_s: 0.0,
                transitions: 0.0,
                lost: 0.0,
            }),
            Tracing::Netwatch => {
                let address = format!("127.0.0.1:{}", free_port()?);
                let agent = Agent::start(self, &["--metrics", &address])?;
                let before = scrape(&address)?;
                let cpu = cpu_seconds(agent.child.id())?;
                let rate = self.load(processes, LOAD_SECONDS)?;
                // Let the agent drain what is queued before reading its counters.
                std::thread::sleep(Duration::from_millis(1500));
                let after = scrape(&address)?;
                let count = |name| metric_sum(&after, name) - metric_sum(&before, name);
                Ok(LoadRun {
                    round_trips_per_s: rate,
                    tracer_cpu_s: cpu_seconds(agent.child.id())? - cpu,
                    transitions: count("netwatch_transitions_total"),
                    lost: count("netwatch_lost_events_total"),
                })
            }
            Tracing::Tcpstates => {
                let mut peer = Command::new("tcpstates")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting tcpstates (Debian's libbpf-tools)")?;
                // It prints nothing we can see once attached; libbpf loads in well under this.
                std::thread::sleep(Duration::from_secs(2));
                if peer.try_wait()?.is_some() {
                    bail!("tcpstates exited at start");
                }
                let cpu = cpu_seconds(peer.id())?;
                let rate = self.load(processes, LOAD_SECONDS);
                let spent = cpu_seconds(peer.id()).map(|now| now - cpu);
                // SAFETY: signalling our own child.
                unsafe { libc::kill(peer.id() as i32, libc::SIGINT) };
                peer.wait()?;
                Ok(LoadRun {
                    round_trips_per_s: rate?,
                    tracer_cpu_s: spent?,
                    transitions: 0.0,
                    lost: 0.0,
                })
            }
        }
    }

    /// Scenarios 1 and 2: the loopback connection rate with nothing attached, with the agent
    /// and with tcpstates, rounds interleaved; netwatch's losses at that rate and the tracers'
    /// CPU time per million transitions; then the agent alone under more and more processes.
    pub fn overhead(&self) -> anyhow::Result<()> {
        let configs = [Tracing::Nothing, Tracing::Netwatch, Tracing::Tcpstates];
        let mut runs: Vec<(Tracing, LoadRun)> = Vec::new();
        for round in 0..LOAD_ROUNDS {
            for tracing in configs {
                eprintln!(
                    "==> bench overhead: round {} of {LOAD_ROUNDS}, {}",
                    round + 1,
                    tracing.name()
                );
                runs.push((tracing, self.traced_load(tracing, LOAD_PROCESSES)?));
            }
        }
        let of = |tracing: Tracing| -> Vec<LoadRun> {
            runs.iter().filter(|(t, _)| *t == tracing).map(|(_, r)| *r).collect()
        };
        let rate = |tracing| timing(of(tracing).iter().map(|r| r.round_trips_per_s).collect());
        let baseline = rate(Tracing::Nothing);
        // Transitions per round trip, as netwatch counted them: the same for the peer's load.
        let per_round_trip = {
            let ours = of(Tracing::Netwatch);
            let transitions: f64 = ours.iter().map(|r| r.transitions).sum();
            let round_trips: f64 = ours.iter().map(|r| r.round_trips_per_s * LOAD_SECONDS).sum();
            transitions / round_trips.max(1.0)
        };
        let mut markdown = format!(
            "## Tracing overhead and loss: loopback TCP connection rate\n\n\
             {LOAD_PROCESSES} processes, each connecting to itself, writing and reading 4 bytes \
             each way and closing, for {LOAD_SECONDS} s; {LOAD_ROUNDS} rounds, the three set-ups \
             interleaved. Median (min-max).\n\n\
             | traced by | round trips/s | vs nothing attached | tracer CPU per run | CPU per million transitions | events lost |\n\
             |---|---:|---:|---:|---:|---:|\n"
        );
        let mut json = Vec::new();
        for tracing in configs {
            let r = rate(tracing);
            let list = of(tracing);
            let cpu = timing(list.iter().map(|r| r.tracer_cpu_s).collect());
            let transitions: f64 =
                list.iter().map(|r| r.round_trips_per_s * LOAD_SECONDS).sum::<f64>()
                    * per_round_trip;
            let cpu_per_million =
                list.iter().map(|r| r.tracer_cpu_s).sum::<f64>() / (transitions / 1e6).max(1e-9);
            let lost: f64 = list.iter().map(|r| r.lost).sum();
            let (cpu_cell, per_million, lost_cell) = match tracing {
                Tracing::Nothing => ("-".to_string(), "-".to_string(), "-".to_string()),
                Tracing::Netwatch => (
                    format!("{:.2} s", cpu.median),
                    format!("{cpu_per_million:.2} s"),
                    format!("{lost:.0}"),
                ),
                Tracing::Tcpstates => (
                    format!("{:.2} s", cpu.median),
                    format!("{cpu_per_million:.2} s"),
                    "not reported".into(),
                ),
            };
            markdown.push_str(&format!(
                "| {} | {:.0} ({:.0}-{:.0}) | {:.3} | {cpu_cell} | {per_million} | {lost_cell} |\n",
                tracing.name(),
                r.median,
                r.min,
                r.max,
                r.median / baseline.median,
            ));
            json.push(format!(
                r#"{{"scenario":"overhead","tracing":"{}","round_trips_per_s":{{"median":{:.1},"min":{:.1},"max":{:.1}}},"ratio":{:.4},"tracer_cpu_s_median":{:.3},"cpu_s_per_million_transitions":{:.3},"lost":{lost}}}"#,
                tracing.name(),
                r.median,
                r.min,
                r.max,
                r.median / baseline.median,
                cpu.median,
                cpu_per_million,
            ));
        }
        // The kernel side's share: BPF run time, counted only in a run of its own because the
        // counting (kernel.bpf_stats_enabled) has a cost of its own.
        eprintln!("==> bench overhead: kernel-side cost (bpf_stats)");
        let stats_path = "/proc/sys/kernel/bpf_stats_enabled";
        let stats_before = std::fs::read_to_string(stats_path).unwrap_or_else(|_| "0".into());
        std::fs::write(stats_path, "1").context("enabling kernel.bpf_stats_enabled")?;
        let kernel_side = (|| -> anyhow::Result<(f64, f64, f64)> {
            let agent = Agent::start(self, &[])?;
            let (ns0, runs0) = bpf_run_time(agent.child.id())?;
            let rate = self.load(LOAD_PROCESSES, LOAD_SECONDS)?;
            let (ns1, runs1) = bpf_run_time(agent.child.id())?;
            let round_trips = rate * LOAD_SECONDS;
            Ok((
                (ns1 - ns0) as f64 / 1e9,
                (runs1 - runs0) as f64 / round_trips,
                (ns1 - ns0) as f64 / round_trips,
            ))
        })();
        let _ = std::fs::write(stats_path, stats_before.trim());
        let (bpf_seconds, runs_per_round_trip, ns_per_round_trip) = kernel_side?;
        markdown.push_str(&format!(
            "\nKernel side (a separate run with `kernel.bpf_stats_enabled=1`): netwatch's programs \
             ran {runs_per_round_trip:.1} times per round trip, {ns_per_round_trip:.0} ns in all \
             ({bpf_seconds:.2} s of CPU in {LOAD_SECONDS} s).\n"
        ));
        json.push(format!(
            r#"{{"scenario":"kernel_side","bpf_cpu_s":{bpf_seconds:.3},"runs_per_round_trip":{runs_per_round_trip:.2},"ns_per_round_trip":{ns_per_round_trip:.0}}}"#
        ));
        markdown.push_str(&format!(
            "\n{per_round_trip:.1} state transitions per round trip (both ends), as netwatch \
             counted them; the peer's CPU per million uses the same count (it reports none). \
             netwatch's CPU includes everything the agent does besides transitions (ownership \
             events, TIME_WAIT lookups, histories).\n\n\
             ### First loss: the agent alone, more and more processes\n\n\
             | processes | round trips/s | transitions/s | events lost |\n|---:|---:|---:|---:|\n"
        ));
        for processes in [1, 2, 4, 8, 16] {
            eprintln!("==> bench loss: {processes} processes");
            let run = self.traced_load(Tracing::Netwatch, processes)?;
            markdown.push_str(&format!(
                "| {processes} | {:.0} | {:.0} | {:.0} |\n",
                run.round_trips_per_s,
                run.transitions / LOAD_SECONDS,
                run.lost
            ));
            json.push(format!(
                r#"{{"scenario":"loss","processes":{processes},"round_trips_per_s":{:.1},"transitions_per_s":{:.1},"lost":{}}}"#,
                run.round_trips_per_s,
                run.transitions / LOAD_SECONDS,
                run.lost
            ));
        }
        self.write_report("overhead", &markdown, &json)
    }

    /// Scenario 5: from a transition in the kernel to its line in `netwatch watch` (through
    /// the agent) and to its row in the agent's table, at a low rate and under load.
    pub fn latency(&self) -> anyhow::Result<()> {
        let agent = Agent::start(self, &[])?;
        let mut watch = Command::new(self.bin("netwatch"))
            .args(["watch", "--json", "--socket"])
            .arg(&agent.socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting netwatch watch")?;
        let stdout = watch.stdout.take().context("stdout")?;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
        let sink = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let now = monotonic_ns();
                if let Some(at) = json_number(&line, "mono_ns")
                    && let Ok(mut seen) = sink.lock()
                {
                    seen.push(now.saturating_sub(at));
                }
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        let take = |seen: &std::sync::Mutex<Vec<u64>>| {
            seen.lock().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default()
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;

        eprintln!("==> bench latency: low rate");
        take(&seen);
        let mut table_low = Vec::new();
        for _ in 0..50 {
            table_low.push(self.table_latency(&agent, &listener)?);
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        let watch_low = latency(take(&seen));
        let table_low = latency(table_low);

        eprintln!("==> bench latency: under load");
        let load = {
            let bench = Bench::new(&self.root);
            std::thread::spawn(move || bench.load(LOAD_PROCESSES, LOAD_SECONDS))
        };
        std::thread::sleep(Duration::from_millis(500));
        let mut table_high = Vec::new();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs_f64(LOAD_SECONDS - 1.0) {
            table_high.push(self.table_latency(&agent, &listener)?);
        }
        let load_rate = load.join().map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        std::thread::sleep(Duration::from_millis(1000));
        let watch_high = latency(take(&seen));
        let table_high = latency(table_high);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(watch.id() as i32, libc::SIGTERM) };
        watch.wait()?;

        let row = |what: &str, rate: &str, l: &Latency| {
            format!(
                "| {what} | {rate} | {} | {:.3} | {:.3} | {:.3} |\n",
                l.samples, l.p50, l.p99, l.max
            )
        };
        let load_label = format!("under load ({load_rate:.0} round trips/s)");
        let mut markdown = String::from(
            "## Latency: kernel transition to what the user sees\n\n\
             | to | rate | samples | p50 ms | p99 ms | max ms |\n|---|---|---:|---:|---:|---:|\n",
        );
        markdown.push_str(&row(
            "`netwatch watch` line (via the agent)",
            "low (50 connects/s)",
            &watch_low,
        ));
        markdown.push_str(&row("`netwatch watch` line (via the agent)", &load_label, &watch_high));
        markdown.push_str(&row("row in the agent's table", "low (50 connects/s)", &table_low));
        markdown.push_str(&row("row in the agent's table", &load_label, &table_high));
        markdown.push_str(
            "\nWatch: the line's `mono_ns` (the kernel's timestamp) against CLOCK_MONOTONIC when \
             the bench read the line. Table: from just before connect() to the first table \
             answer (asked back to back) that lists the new connection; the whole table is \
             built and sent each time, so under load this includes the table's size.\n",
        );
        let json = [
            ("watch", "low", watch_low),
            ("watch", "load", watch_high),
            ("table", "low", table_low),
            ("table", "load", table_high),
        ]
        .iter()
        .map(|(to, rate, l)| {
            format!(
                r#"{{"scenario":"latency","to":"{to}","rate":"{rate}","samples":{},"p50_ms":{:.3},"p99_ms":{:.3},"max_ms":{:.3}}}"#,
                l.samples, l.p50, l.p99, l.max
            )
        })
        .collect::<Vec<_>>();
        self.write_report("latency", &markdown, &json)
    }

    /// Connects to `listener` and asks the agent for its table until the connection is in it;
    /// ns from just before the connect.
    fn table_latency(
        &self,
        agent: &Agent,
        listener: &std::net::TcpListener,
    ) -> anyhow::Result<u64> {
        use std::io::{Read as _, Write as _};
        let started = monotonic_ns();
        let client = std::net::TcpStream::connect(listener.local_addr()?)?;
        let (_server, _) = listener.accept()?;
        // The API's rows carry `"local":["ADDR",PORT]`.
        let wanted = format!("\"local\":[\"127.0.0.1\",{}]", client.local_addr()?.port());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let mut api = std::os::unix::net::UnixStream::connect(&agent.socket)?;
            api.write_all(b"{\"v\":1,\"cmd\":\"table\"}\n")?;
            let mut answer = String::new();
            api.read_to_string(&mut answer)?;
            if answer.contains(&wanted) {
                return Ok(monotonic_ns() - started);
            }
        }
        bail!("the agent's table never listed {wanted}")
    }
}
