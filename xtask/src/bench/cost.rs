//! Scenario `tax`: what tracing costs work with no TCP in it. `sockpeer syscalls` loops
//! (getppid; open, dup and two closes; a unix socket and its close) with nothing attached,
//! with the agent and with `tcpstates`, interleaved over rounds.
//!
//! Scenario `tax-vm`: the same loops inside each kernel of the matrix under qemu, where the
//! kernel may take the trampoline path this machine refuses.
//!
//! Scenario `soak`: a mixed load for SOAK_SECONDS (connections made and closed as fast as
//! they go, and refused connects, whose RSTs the kernel handles in softirq, interrupting
//! whatever program runs on that CPU): the program runs the kernel skipped
//! (`netwatch_lost_events_total{reason="skipped"}`), each one an event never made.
//!
//! Scenario `idle`: the agent on a host with no traffic: its CPU share and how often its
//! threads wake (context switches of all its threads, from /proc).
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::{overhead::Tracing, support::*, *};

const LOOPS: [&str; 3] = ["getppid", "file", "unix"];
const LOOP_SECONDS: &str = "1";
const TAX_ROUNDS: usize = 4;
const IDLE_SECONDS: u64 = 10;

/// A tracer running for as long as this lives.
enum Tracer {
    Nothing,
    Agent(#[allow(dead_code)] Agent),
    Tcpstates(std::process::Child),
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Tracer::Tcpstates(child) = self {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
    }
}

impl Bench {
    fn start_tracer(&self, tracing: Tracing) -> anyhow::Result<Tracer> {
        Ok(match tracing {
            Tracing::Nothing => Tracer::Nothing,
            Tracing::Netwatch => Tracer::Agent(Agent::start(self, &[])?),
            Tracing::Tcpstates => Tracer::Tcpstates(start_tcpstates()?),
        })
    }

    /// ns per iteration of one `sockpeer syscalls` loop.
    fn syscall_loop(&self, what: &str) -> anyhow::Result<f64> {
        let output = Command::new(self.bin("sockpeer"))
            .args(["syscalls", what, LOOP_SECONDS])
            .output()
            .context("starting sockpeer syscalls")?;
        let text = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!("sockpeer syscalls {what}: {}", String::from_utf8_lossy(&output.stderr));
        }
        text.trim().parse().with_context(|| format!("sockpeer syscalls {what}: {text:?}"))
    }

    pub fn tax(&self) -> anyhow::Result<()> {
        let configs = [Tracing::Nothing, Tracing::Netwatch, Tracing::Tcpstates];
        // (tracing, loop) -> ns per iteration, one sample per round.
        let mut samples: Vec<(Tracing, &str, f64)> = Vec::new();
        for round in 0..TAX_ROUNDS {
            for tracing in configs {
                eprintln!("==> bench tax: round {} of {TAX_ROUNDS}, {}", round + 1, tracing.name());
                let _tracer = self.start_tracer(tracing)?;
                for what in LOOPS {
                    samples.push((tracing, what, self.syscall_loop(what)?));
                }
            }
        }
        let of = |tracing: Tracing, what: &str| {
            timing(
                samples
                    .iter()
                    .filter(|(t, w, _)| *t == tracing && *w == what)
                    .map(|(_, _, ns)| *ns)
                    .collect(),
            )
        };
        let mut markdown = format!(
            "## Tax on work with no TCP in it: system-call loops\n\n\
             `sockpeer syscalls LOOP {LOOP_SECONDS}` under each set-up, {TAX_ROUNDS} rounds \
             interleaved; ns per iteration, median (min-max), and the speed against nothing \
             attached (untraced ns / traced ns; 1.0 is free).\n\n\
             | loop | nothing attached | netwatch agent | speed | tcpstates | speed |\n\
             |---|---:|---:|---:|---:|---:|\n"
        );
        let mut json = Vec::new();
        for what in LOOPS {
            let base = of(Tracing::Nothing, what);
            let ours = of(Tracing::Netwatch, what);
            let peer = of(Tracing::Tcpstates, what);
            let cell = |t: &Timing| format!("{:.0} ({:.0}-{:.0})", t.median, t.min, t.max);
            markdown.push_str(&format!(
                "| {what} | {} | {} | {:.3} | {} | {:.3} |\n",
                cell(&base),
                cell(&ours),
                base.median / ours.median,
                cell(&peer),
                base.median / peer.median,
            ));
            json.push(format!(
                r#"{{"scenario":"tax","loop":"{what}","untraced_ns":{:.1},"agent_ns":{:.1},"agent_speed":{:.4},"tcpstates_ns":{:.1},"tcpstates_speed":{:.4}}}"#,
                base.median,
                ours.median,
                base.median / ours.median,
                peer.median,
                base.median / peer.median,
            ));
        }
        self.write_report("tax", &markdown, &json)
    }

    pub fn idle(&self) -> anyhow::Result<()> {
        eprintln!("==> bench idle: an agent with no traffic for {IDLE_SECONDS} s");
        let agent = Agent::start(self, &[])?;
        std::thread::sleep(Duration::from_secs(2));
        let pid = agent.child.id();
        let (cpu0, switches0) = threads(pid)?;
        std::thread::sleep(Duration::from_secs(IDLE_SECONDS));
        let (cpu1, switches1) = threads(pid)?;
        let cpu_percent = (cpu1 - cpu0) as f64 / (IDLE_SECONDS as f64 * 1e9) * 100.0;
        let wakeups = (switches1 - switches0) as f64 / IDLE_SECONDS as f64;
        let rss = agent.rss_kib()?;
        let markdown = format!(
            "## Idle: the agent with no traffic\n\n\
             | CPU | wakeups/s (all threads) | RSS |\n|---:|---:|---:|\n\
             | {cpu_percent:.3}% | {wakeups:.1} | {rss} KiB |\n\n\
             Over {IDLE_SECONDS} s after a 2 s settle; wakeups are the voluntary and involuntary \
             context switches of every thread of the agent.\n"
        );
        let json = vec![format!(
            r#"{{"scenario":"idle","cpu_percent":{cpu_percent:.4},"wakeups_per_s":{wakeups:.2},"rss_kib":{rss}}}"#
        )];
        self.write_report("idle", &markdown, &json)
    }
}

/// CPU time in ns (the scheduler's, finer than /proc/PID/stat's ticks) and context switches,
/// voluntary and not, summed over every thread of `pid`.
fn threads(pid: u32) -> anyhow::Result<(u64, u64)> {
    let (mut cpu_ns, mut switches) = (0, 0);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path();
        let schedstat = std::fs::read_to_string(path.join("schedstat"))?;
        cpu_ns +=
            schedstat.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        let status = std::fs::read_to_string(path.join("status"))?;
        switches += status
            .lines()
            .filter(|l| l.contains("ctxt_switches"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok((cpu_ns, switches))
}

/// Rounds of the `tax` loops inside each kernel of the matrix.
const VM_TAX_ROUNDS: usize = 3;

/// Guest shell: wait for the agent started just before to serve, or say it did not (the
/// host then refuses the figures rather than take loops without an agent for loops with).
const WAIT_FOR_AGENT: &str = "  for i in $(seq 300); do grep -q serving /tmp/agent.err && break; \
     sleep 0.2; done\n  grep -q serving /tmp/agent.err || { echo '=== tax-failed'; \
     cat /tmp/agent.err; }\n";

impl Bench {
    /// Scenario `tax-vm`: the `tax` loops inside each kernel of the matrix under qemu, with
    /// nothing attached and with the agent. There the kernel may allow the BPF trampolines
    /// this machine refuses, so this is the figure for the trampoline path. qemu emulates the
    /// CPU (TCG), so only the ratios mean anything, not the nanoseconds.
    pub fn tax_in_vm(&self) -> anyhow::Result<()> {
        let mut markdown = String::from(
            "## Tax inside the kernel matrix (qemu TCG): system-call loops\n\n\
             | kernel | close hooked by | loop | nothing attached | agent | speed | agent, trampolines refused | speed |\n\
             |---|---|---|---:|---:|---:|---:|---:|\n",
        );
        let mut json = Vec::new();
        for kernel in crate::vm::MATRIX {
            let release = crate::vm::kernel_release(kernel.package)?;
            eprintln!("==> bench tax-vm: {} ({release})", kernel.label);
            let guest = self.tax_guest();
            let (console, path) =
                crate::vm::run_guest(&self.root, &release, &guest, Duration::from_secs(900))?;
            if console.contains("=== tax-failed") {
                bail!("the agent did not start in the guest: see {}", path.display());
            }
            // `=== tax LOOP nothing|agent NS` lines, and the hook `netwatch check` reported.
            let samples: Vec<(&str, &str, f64)> = console
                .lines()
                .filter_map(|l| {
                    let mut words = l.strip_prefix("=== tax ")?.split_whitespace();
                    Some((words.next()?, words.next()?, words.next()?.parse().ok()?))
                })
                .collect();
            let hooks = console
                .lines()
                .find(|l| l.trim_start().starts_with("close_enter"))
                .and_then(|l| l.split_whitespace().nth(1))
                .unwrap_or("?")
                .to_string();
            for what in LOOPS {
                let of = |setup: &str| {
                    let list: Vec<f64> = samples
                        .iter()
                        .filter(|(w, s, _)| *w == what && *s == setup)
                        .map(|(_, _, ns)| *ns)
                        .collect();
                    (!list.is_empty()).then(|| timing(list))
                };
                let (Some(base), Some(ours), Some(old)) =
                    (of("nothing"), of("agent"), of("tracepoints"))
                else {
                    bail!("no {what} figures in {}", path.display());
                };
                markdown.push_str(&format!(
                    "| {} ({release}) | `{hooks}` | {what} | {:.0} | {:.0} | {:.3} | {:.0} | {:.3} |\n",
                    kernel.label,
                    base.median,
                    ours.median,
                    base.median / ours.median,
                    old.median,
                    base.median / old.median,
                ));
                json.push(format!(
                    r#"{{"scenario":"tax_vm","kernel":"{release}","loop":"{what}","untraced_ns":{:.1},"agent_ns":{:.1},"agent_speed":{:.4},"tracepoints_ns":{:.1},"tracepoints_speed":{:.4},"close_hook":"{hooks}"}}"#,
                    base.median,
                    ours.median,
                    base.median / ours.median,
                    old.median,
                    base.median / old.median,
                ));
            }
        }
        markdown.push_str(&format!(
            "\nMedian of {VM_TAX_ROUNDS} rounds, ns per iteration as the emulated CPU ran them; \
             the three set-ups interleaved in each round. The second agent is the same binary \
             with its trampoline programs refused (NETWATCH_REFUSE_PROGRAMS), as on a kernel \
             without BPF trampolines.\n"
        ));
        self.write_report("tax-vm", &markdown, &json)
    }

    /// The guest script: `netwatch check`, then rounds of the loops without and with an agent.
    fn tax_guest(&self) -> String {
        let sockpeer = self.bin("sockpeer").display().to_string();
        let netwatch = self.bin("netwatch").display().to_string();
        let mut script = String::from(
            "#!/bin/bash\nexport PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
        );
        script.push_str(&format!("'{netwatch}' check\n"));
        script.push_str(&format!("for round in $(seq {VM_TAX_ROUNDS}); do\n"));
        let loops = |setup: &str| {
            LOOPS
                .iter()
                .map(|what| {
                    format!(
                        "  echo \"=== tax {what} {setup} $('{sockpeer}' syscalls {what} {LOOP_SECONDS})\"\n"
                    )
                })
                .collect::<String>()
        };
        script.push_str(&loops("nothing"));
        script.push_str(&format!(
            "  '{netwatch}' agent --socket /tmp/bench.sock 2>/tmp/agent.err & agent=$!\n{WAIT_FOR_AGENT}"
        ));
        script.push_str(&loops("agent"));
        script.push_str("  kill $agent; wait $agent\n");
        // The same agent made to fall back to the syscalls tracepoints.
        let trampolines: Vec<&str> = netwatch_common::program::trampoline_programs().collect();
        script.push_str(&format!(
            "  NETWATCH_REFUSE_PROGRAMS={} '{netwatch}' agent --socket /tmp/bench.sock \
             2>/tmp/agent.err & agent=$!\n{WAIT_FOR_AGENT}",
            trampolines.join(",")
        ));
        script.push_str(&loops("tracepoints"));
        script.push_str("  kill $agent; wait $agent\ndone\n");
        script
    }
}

const SOAK_SECONDS: u64 = 30;

impl Bench {
    pub fn soak(&self) -> anyhow::Result<()> {
        eprintln!("==> bench soak: {SOAK_SECONDS} s of connections and refused connects");
        let address = format!("127.0.0.1:{}", free_port()?);
        let agent = Agent::start(self, &["--metrics", &address])?;
        let before = scrape(&address)?;
        let namespace = Namespace::new()?;
        let seconds = SOAK_SECONDS.to_string();
        let mut children = Vec::new();
        for _ in 0..2 {
            let mut child = namespace
                .command(&self.bin("sockpeer"))
                .args(["rate", &seconds])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .context("starting sockpeer rate")?;
            use std::io::Write as _;
            child.stdin.take().context("stdin")?.write_all(b"go\n")?;
            children.push(child);
        }
        children.push(
            namespace
                .command(&self.bin("sockpeer"))
                .args(["refused", &seconds])
                .stdout(Stdio::null())
                .spawn()
                .context("starting sockpeer refused")?,
        );
        for mut child in children {
            if !child.wait()?.success() {
                bail!("a soak process failed");
            }
        }
        std::thread::sleep(Duration::from_millis(1500));
        let after = scrape(&address)?;
        let count = |name: &str| metric_sum(&after, name) - metric_sum(&before, name);
        let skipped = {
            let line = |scrape: &str| {
                scrape
                    .lines()
                    .find(|l| l.starts_with("netwatch_lost_events_total{reason=\"skipped\"}"))
                    .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            line(&after) - line(&before)
        };
        let transitions = count("netwatch_transitions_total");
        let lost = count("netwatch_lost_events_total");
        drop(agent);
        let markdown = format!(
            "## Soak: runs the kernel skipped under a mixed load\n\n\
             | seconds | transitions | skipped runs | all lost events |\n|---:|---:|---:|---:|\n\
             | {SOAK_SECONDS} | {transitions:.0} | {skipped:.0} | {lost:.0} |\n\n\
             Two `sockpeer rate` processes and one `sockpeer refused` in a namespace made for \
             the run, against one agent; from its metrics.\n"
        );
        let json = vec![format!(
            r#"{{"scenario":"soak","seconds":{SOAK_SECONDS},"transitions":{transitions},"skipped":{skipped},"lost":{lost}}}"#
        )];
        self.write_report("soak", &markdown, &json)
    }
}
