//! Scenario `overhead`: the connection rate with nothing attached, with the agent and with
//! `tcpstates`, and the rate at which the agent first loses events.
use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::{support::*, *};

/// What traces the host during a load run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tracing {
    Nothing,
    Netwatch,
    Tcpstates,
}

impl Tracing {
    pub(super) fn name(self) -> &'static str {
        match self {
            Tracing::Nothing => "nothing attached",
            Tracing::Netwatch => "netwatch agent",
            Tracing::Tcpstates => "tcpstates > /dev/null",
        }
    }
}

/// One load run: its rate and what the tracer spent and saw.
#[derive(Debug, Clone, Copy)]
pub(super) struct LoadRun {
    round_trips_per_s: f64,
    tracer_cpu_s: f64,
    /// netwatch only: transitions it processed and events it lost during the run.
    transitions: f64,
    lost: f64,
}

pub(super) const LOAD_SECONDS: f64 = 3.0;
pub(super) const LOAD_PROCESSES: usize = 4;
pub(super) const LOAD_ROUNDS: usize = 3;

impl Bench {
    /// `processes` sockpeer `rate` processes in a namespace made for the run (so that their
    /// TIME_WAIT sockets go with it), started together; round trips per second in total.
    pub(super) fn load(&self, processes: usize, seconds: f64) -> anyhow::Result<f64> {
        self.paced_load(processes, seconds, None)
    }

    /// `load`, at most `per_second` round trips per second in total when given.
    pub(super) fn paced_load(
        &self,
        processes: usize,
        seconds: f64,
        per_second: Option<f64>,
    ) -> anyhow::Result<f64> {
        use std::io::Write as _;
        let namespace = Namespace::new()?;
        let mut children = Vec::new();
        let pace = per_second.map(|total| (total / processes as f64).to_string());
        for _ in 0..processes {
            let mut child = namespace
                .command(&self.bin("sockpeer"))
                .args(["rate", &seconds.to_string()])
                .args(pace.as_slice())
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
    pub(super) fn traced_load(
        &self,
        tracing: Tracing,
        processes: usize,
    ) -> anyhow::Result<LoadRun> {
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
                let mut peer = start_tcpstates()?;
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
        type Programs = Vec<(String, u64, u64)>;
        let kernel_side = (|| -> anyhow::Result<(f64, f64, f64, Programs, f64)> {
            let agent = Agent::start(self, &[])?;
            let (ns0, runs0) = bpf_run_time(agent.child.id())?;
            let programs0 = bpf_programs(agent.child.id())?;
            let rate = self.load(LOAD_PROCESSES, LOAD_SECONDS)?;
            let (ns1, runs1) = bpf_run_time(agent.child.id())?;
            let programs1 = bpf_programs(agent.child.id())?;
            let round_trips = rate * LOAD_SECONDS;
            let mut programs: Programs = programs1
                .into_iter()
                .map(|(name, ns, runs)| {
                    let (ns0, runs0) = programs0
                        .iter()
                        .find(|(n, ..)| *n == name)
                        .map_or((0, 0), |(_, ns, runs)| (*ns, *runs));
                    (name, ns.saturating_sub(ns0), runs.saturating_sub(runs0))
                })
                .filter(|(_, _, runs)| *runs > 0)
                .collect();
            programs.sort_by_key(|(_, ns, _)| std::cmp::Reverse(*ns));
            Ok((
                (ns1 - ns0) as f64 / 1e9,
                (runs1 - runs0) as f64 / round_trips,
                (ns1 - ns0) as f64 / round_trips,
                programs,
                round_trips,
            ))
        })();
        let _ = std::fs::write(stats_path, stats_before.trim());
        let (bpf_seconds, runs_per_round_trip, ns_per_round_trip, programs, round_trips) =
            kernel_side?;
        markdown.push_str(&format!(
            "\nKernel side (a separate run with `kernel.bpf_stats_enabled=1`): netwatch's programs \
             ran {runs_per_round_trip:.1} times per round trip, {ns_per_round_trip:.0} ns in all \
             ({bpf_seconds:.2} s of CPU in {LOAD_SECONDS} s).\n\n\
             | program | runs per round trip | ns per run | ns per round trip |\n|---|---:|---:|---:|\n"
        ));
        for (name, ns, runs) in &programs {
            markdown.push_str(&format!(
                "| {name} | {:.1} | {:.0} | {:.0} |\n",
                *runs as f64 / round_trips,
                *ns as f64 / *runs as f64,
                *ns as f64 / round_trips,
            ));
        }
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
}
