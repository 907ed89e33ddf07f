//! Scenario `otlp`: what OTLP export costs the agent under the overhead scenario's load: its
//! CPU per million transitions and its memory, alone, exporting over HTTP to a receiver that
//! keeps up, and to one that never answers; rounds interleaved.
use std::{path::Path, process::Stdio, time::Duration};

use anyhow::Context as _;

use super::{overhead::LOAD_SECONDS, support::*, *};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Export {
    None,
    Receiver,
    Stalled,
}

impl Export {
    fn name(self) -> &'static str {
        match self {
            Export::None => "agent, no export",
            Export::Receiver => "--otlp, a receiver that keeps up",
            Export::Stalled => "--otlp, a receiver that never answers",
        }
    }
}

struct Run {
    round_trips_per_s: f64,
    cpu_s: f64,
    transitions: f64,
    exported: f64,
    dropped: f64,
    lost: f64,
    rss_kib: u64,
    peak_kib: u64,
}

const PROCESSES: usize = 4;
const ROUNDS: usize = 3;

/// The agent's peak resident memory (VmHWM), in KiB.
fn peak_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).context("no VmHWM")?;
    line.split_whitespace().nth(1).context("VmHWM")?.parse().context("VmHWM")
}

/// The tests' OTLP receiver (tests/support/otlp_receiver.py) in `mode`; its port.
fn receiver(root: &Path, mode: &str) -> anyhow::Result<(std::process::Child, u16)> {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(root.join("target/test-python/bin/python"))
        .arg(root.join("tests/support/otlp_receiver.py"))
        .args(["http", mode])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the OTLP receiver (cargo xtask test installs it)")?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().context("stdout")?).read_line(&mut line)?;
    let port = line.trim().strip_prefix("listening ").context("receiver port")?.parse()?;
    Ok((child, port))
}

impl Bench {
    fn otlp_run(&self, export: Export) -> anyhow::Result<Run> {
        let address = format!("127.0.0.1:{}", free_port()?);
        let mut receiver = match export {
            Export::None => None,
            Export::Receiver => Some(receiver(&self.root, "count")?),
            Export::Stalled => Some(receiver(&self.root, "stall")?),
        };
        let endpoint = receiver.as_ref().map(|(_, port)| format!("http://127.0.0.1:{port}"));
        let mut args = vec!["--metrics", address.as_str()];
        if let Some(endpoint) = &endpoint {
            args.extend(["--otlp", endpoint.as_str()]);
        }
        let agent = Agent::start(self, &args)?;
        std::thread::sleep(Duration::from_millis(500));
        let before = scrape(&address)?;
        let cpu = cpu_seconds(agent.child.id())?;
        let rate = self.load(PROCESSES, LOAD_SECONDS)?;
        // What was queued is sent (or dropped) before the counters are read.
        std::thread::sleep(Duration::from_millis(2500));
        let after = scrape(&address)?;
        let count = |name| metric_sum(&after, name) - metric_sum(&before, name);
        let run = Run {
            round_trips_per_s: rate,
            cpu_s: cpu_seconds(agent.child.id())? - cpu,
            transitions: count("netwatch_transitions_total"),
            exported: count("netwatch_otlp_exported_records_total"),
            dropped: count("netwatch_otlp_dropped_records_total"),
            lost: count("netwatch_lost_events_total"),
            rss_kib: agent.rss_kib()?,
            peak_kib: peak_kib(agent.child.id())?,
        };
        drop(agent);
        if let Some((child, _)) = &mut receiver {
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(run)
    }

    pub fn otlp(&self) -> anyhow::Result<()> {
        let exports = [Export::None, Export::Receiver, Export::Stalled];
        let mut runs: Vec<(Export, Run)> = Vec::new();
        for round in 0..ROUNDS {
            for export in exports {
                eprintln!("==> bench otlp: round {} of {ROUNDS}, {}", round + 1, export.name());
                runs.push((export, self.otlp_run(export)?));
            }
        }
        let of = |export| runs.iter().filter(move |(e, _)| *e == export).map(|(_, r)| r);
        let per_million = |export| {
            let cpu: f64 = of(export).map(|r| r.cpu_s).sum();
            let transitions: f64 = of(export).map(|r| r.transitions).sum();
            cpu / (transitions / 1e6).max(1e-9)
        };
        let alone = per_million(Export::None);
        let mut markdown = format!(
            "## OTLP export: the agent's CPU and memory\n\n\
             The overhead scenario's load ({PROCESSES} processes, {LOAD_SECONDS} s), {ROUNDS} \
             rounds, the three set-ups interleaved; OTLP/HTTP to the tests' receiver on \
             loopback. Medians, except CPU per million transitions (all rounds' CPU over all \
             their transitions).\n\n\
             | set-up | round trips/s | agent CPU per million transitions | vs no export | RSS after | peak RSS | records exported | dropped | events lost |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        );
        let mut json = Vec::new();
        for export in exports {
            let median = |f: &dyn Fn(&Run) -> f64| timing(of(export).map(f).collect()).median;
            let cpm = per_million(export);
            markdown.push_str(&format!(
                "| {} | {:.0} | {cpm:.2} s | {:.2} | {:.1} MiB | {:.1} MiB | {:.0} | {:.0} | {:.0} |\n",
                export.name(),
                median(&|r| r.round_trips_per_s),
                cpm / alone,
                median(&|r| r.rss_kib as f64) / 1024.0,
                median(&|r| r.peak_kib as f64) / 1024.0,
                median(&|r| r.exported),
                median(&|r| r.dropped),
                median(&|r| r.lost),
            ));
            json.push(format!(
                r#"{{"scenario":"otlp","setup":"{}","cpu_s_per_million_transitions":{cpm:.3},"ratio":{:.3},"rss_kib":{:.0},"peak_kib":{:.0},"exported":{:.0},"dropped":{:.0}}}"#,
                export.name(),
                cpm / alone,
                median(&|r| r.rss_kib as f64),
                median(&|r| r.peak_kib as f64),
                median(&|r| r.exported),
                median(&|r| r.dropped),
            ));
        }
        self.write_report("otlp", &markdown, &json)
    }
}
