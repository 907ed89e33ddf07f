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
//! Scenarios `tax`, `tax-vm`, `idle` and `soak` (see [`cost`]): what the agent costs system
//! calls with no TCP in them, on this kernel and inside each kernel of the matrix; a host
//! with no traffic; and the program runs the kernel skips under a mixed load.
//!
//! Scenario `log` (see [`log`]): `netwatch log`'s read speed on a 1 GiB log, next to `grep -c`.
//!
//! Scenario `top` (see [`top`]): `netwatch top`'s CPU at about 1,000 transitions a second,
//! and its memory and responsiveness with 100k sockets.
//!
//! Each scenario's report (Markdown and JSON) goes to target/bench/.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

mod cost;
mod latency;
mod log;
mod otlp;
mod overhead;
mod support;
mod top;

use support::*;

pub(super) const ROUNDS: usize = 5;
pub(super) const SOCKETS_PER_PROCESS: usize = 10_000;

pub struct Bench {
    root: PathBuf,
}

/// Processes holding `n` sockets until dropped.
pub(super) struct Holders(Vec<Child>);

impl Drop for Holders {
    fn drop(&mut self) {
        // Closing their stdin lets them reset their sockets (no TIME_WAIT left for the next
        // measurement); a kill would close them gracefully.
        for child in &mut self.0 {
            drop(child.stdin.take());
        }
        for child in &mut self.0 {
            let _ = child.wait();
        }
    }
}

/// Median and spread (min..max) of a set of timings, in ms.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timing {
    median: f64,
    min: f64,
    max: f64,
}

pub(super) fn timing(mut samples: Vec<f64>) -> Timing {
    samples.sort_by(f64::total_cmp);
    Timing { median: samples[samples.len() / 2], min: samples[0], max: samples[samples.len() - 1] }
}

impl Bench {
    pub fn new(root: &Path) -> Bench {
        Bench { root: root.to_path_buf() }
    }

    pub(super) fn bin(&self, name: &str) -> PathBuf {
        self.root.join("target/release").join(name)
    }

    pub(super) fn hold(&self, sockets: usize) -> anyhow::Result<Holders> {
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

    pub(super) fn time(&self, program: &Path, args: &[&str]) -> anyhow::Result<Timing> {
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

    /// Resident memory (KiB) and heap bytes allocated (the agent's
    /// `netwatch_heap_allocated_bytes`) of an agent started now, once it serves.
    pub(super) fn agent_memory(&self) -> anyhow::Result<(u64, u64)> {
        let address = format!("127.0.0.1:{}", free_port()?);
        let agent = Agent::start(self, &["--metrics", &address])?;
        std::thread::sleep(Duration::from_millis(500));
        let allocated = metric_sum(&scrape(&address)?, "netwatch_heap_allocated_bytes");
        Ok((agent.rss_kib()?, allocated as u64))
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

    pub(super) fn write_report(
        &self,
        name: &str,
        markdown: &str,
        json: &[String],
    ) -> anyhow::Result<()> {
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
             | sockets | netwatch table | ss -tanp | netstat -tanp | netwatch / ss | agent RSS | per socket (RSS) | per socket (allocated) |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        let mut json = Vec::new();
        let (baseline_rss, baseline_heap) = self.agent_memory()?;
        for &size in sizes {
            eprintln!("==> bench snapshot: {size} sockets");
            let _holders = self.hold(size)?;
            let ours = self.time(&self.bin("netwatch"), &["table", "-tan", "--no-agent"])?;
            let ss = self.time(Path::new("ss"), &["-tanp"])?;
            let net = match &netstat {
                Some(path) => Some(self.time(path, &["-tanp"])?),
                None => None,
            };
            let (rss, heap) = self.agent_memory()?;
            let per_socket = (rss.saturating_sub(baseline_rss) * 1024) as f64 / size as f64;
            let heap_per_socket = heap.saturating_sub(baseline_heap) as f64 / size as f64;
            let cell = |t: &Timing| format!("{:.0} ms ({:.0}-{:.0})", t.median, t.min, t.max);
            markdown.push_str(&format!(
                "| {size} | {} | {} | {} | {:.2} | {} KiB (idle {baseline_rss}) | {per_socket:.0} B | {heap_per_socket:.0} B |\n",
                cell(&ours),
                cell(&ss),
                net.as_ref().map_or("n/a".into(), cell),
                ours.median / ss.median,
                rss,
            ));
            json.push(serde_like(
                size,
                &ours,
                &ss,
                net.as_ref(),
                (rss, baseline_rss),
                (heap, baseline_heap),
            ));
        }
        markdown.push_str(&format!(
            "\nMedian of {ROUNDS} runs (min-max); sockets held by `sockpeer pairs` processes of \
             {SOCKETS_PER_PROCESS} sockets each. Per socket: (agent RSS with them seeded - idle \
             agent RSS) / sockets, and the same for the heap bytes the agent has allocated \
             (`netwatch_heap_allocated_bytes`, glibc's count), which does not depend on what \
             the allocator keeps free.\n"
        ));
        self.write_report("snapshot", &markdown, &json)
    }
}
