//! `cargo xtask bench`: measured figures next to their baselines from the same run.
//!
//! Scenario `snapshot`: with N open TCP sockets (held by several `sockpeer pairs`
//! processes, 10k sockets each), the wall time of a complete table from `netwatch table
//! --no-agent`, `ss -tanp` and `netstat -tanp`, each run ROUNDS times; and the agent's
//! resident memory with those sockets seeded, against an agent started with none. The
//! report (Markdown and JSON) goes to target/bench/.
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
        let socket =
            std::env::temp_dir().join(format!("netwatch-bench-{}.sock", std::process::id()));
        let mut agent = Command::new(self.bin("netwatch"))
            .args(["agent", "--socket"])
            .arg(&socket)
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the agent")?;
        let mut line = String::new();
        BufReader::new(agent.stderr.take().context("stderr")?).read_line(&mut line)?;
        std::thread::sleep(Duration::from_millis(500));
        let status = std::fs::read_to_string(format!("/proc/{}/status", agent.id()))?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
        agent.wait()?;
        if !line.contains("serving") {
            bail!("the agent did not start: {line}");
        }
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmRSS")
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
        let dir = self.root.join("target/bench");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("snapshot.md"), &markdown)?;
        std::fs::write(dir.join("snapshot.json"), format!("[{}]\n", json.join(",\n")))?;
        println!("{markdown}");
        eprintln!("==> report: {}", dir.join("snapshot.md").display());
        Ok(())
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
