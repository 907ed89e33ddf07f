//! Scenario `top`: what `netwatch top` costs. It runs in a pseudo-terminal of tmux's own,
//! attached to an agent of the bench's own. Its CPU while a paced load makes about 1,000
//! transitions a second, next to the agent's in the same run; then, with 100k sockets held,
//! how long it takes to show them, its resident memory, its CPU while they sit there, and
//! how long a key takes to show on the screen.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{support::*, *};

const LOAD_SECONDS: f64 = 10.0;
/// Loopback round trips a second: each makes about ten transitions, both ends counted.
const ROUND_TRIPS_PER_S: f64 = 100.0;
const MANY: usize = 100_000;
const IDLE_SECONDS: u64 = 5;
const KEYS: [&str; 6] = [">", ">", ">", "<", "<", "<"];

/// `netwatch top` in a tmux session of its own; the tmux server is killed when dropped.
struct TopScreen {
    socket: String,
    pid: u32,
}

impl TopScreen {
    fn start(bench: &Bench, agent: &Agent) -> anyhow::Result<TopScreen> {
        let socket = format!("nwbench-{}", std::process::id());
        let command = format!(
            "exec {} top --socket {} 2>/dev/null",
            bench.bin("netwatch").display(),
            agent.socket.display()
        );
        let mut screen = TopScreen { socket, pid: 0 };
        let status = screen
            .tmux()
            .args(["new-session", "-d", "-s", "top", "-x", "120", "-y", "40", &command])
            .status()
            .context("running tmux (cargo xtask bench installs it)")?;
        if !status.success() {
            bail!("tmux new-session failed: {status}");
        }
        let pid = screen.output(&["display-message", "-p", "-t", "top", "#{pane_pid}"])?;
        let pid = pid.trim().parse().with_context(|| format!("tmux gave no pid: {pid:?}"))?;
        screen.pid = pid;
        screen.wait_for("top's first frame", Duration::from_secs(60), |s| {
            s.contains("Connections:")
        })?;
        Ok(screen)
    }

    fn tmux(&self) -> Command {
        let mut command = Command::new("tmux");
        command.args(["-L", &self.socket, "-f", "/dev/null"]);
        command
    }

    fn output(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.tmux().args(args).output().context("running tmux")?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn screen(&self) -> anyhow::Result<String> {
        self.output(&["capture-pane", "-p", "-t", "top"])
    }

    fn wait_for(
        &self,
        what: &str,
        patience: Duration,
        done: impl Fn(&str) -> bool,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let screen = self.screen()?;
            if done(&screen) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > patience {
                bail!("{what} not on top's screen within {patience:?}:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmRSS")
    }
}

impl Drop for TopScreen {
    fn drop(&mut self) {
        let _ = self.tmux().arg("kill-server").status();
    }
}

/// The sockets the header counts: `| SHOWN/ALL sockets |`.
fn sockets_shown(screen: &str) -> Option<usize> {
    let before = screen.split(" sockets").next()?;
    before.rsplit(' ').next()?.split('/').nth(1)?.parse().ok()
}

/// The column the pane is sorted by, from its title.
fn sorted_by(screen: &str) -> Option<String> {
    let rest = screen.split("sorted by ").nth(1)?;
    Some(rest.split([',', ' ']).next()?.to_string())
}

impl Bench {
    pub fn top(&self) -> anyhow::Result<()> {
        eprintln!("==> bench top: netwatch top at ~1,000 transitions/s, then with {MANY} sockets");
        let address = format!("127.0.0.1:{}", free_port()?);
        let agent = Agent::start(self, &["--metrics", &address])?;
        let screen = TopScreen::start(self, &agent)?;
        std::thread::sleep(Duration::from_secs(2));
        let before = scrape(&address)?;
        let (top0, agent0) = (cpu_seconds(screen.pid)?, cpu_seconds(agent.child.id())?);
        let started = Instant::now();
        let round_trips = self.paced_load(1, LOAD_SECONDS, Some(ROUND_TRIPS_PER_S))?;
        let seconds = started.elapsed().as_secs_f64();
        let (top1, agent1) = (cpu_seconds(screen.pid)?, cpu_seconds(agent.child.id())?);
        let after = scrape(&address)?;
        let transitions = metric_sum(&after, "netwatch_transitions_total")
            - metric_sum(&before, "netwatch_transitions_total");
        let per_second = transitions / seconds;
        let top_cpu = (top1 - top0) / seconds * 100.0;
        let agent_cpu = (agent1 - agent0) / seconds * 100.0;
        let busy_rss = screen.rss_kib()?;
        drop(screen);

        let holders = self.hold(MANY)?;
        let started = Instant::now();
        let screen = TopScreen::start(self, &agent)?;
        screen.wait_for(&format!("{MANY} sockets"), Duration::from_secs(120), |s| {
            sockets_shown(s).is_some_and(|n| n >= MANY)
        })?;
        let shown_after = started.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_secs(1));
        let many_rss = screen.rss_kib()?;
        let idle0 = cpu_seconds(screen.pid)?;
        std::thread::sleep(Duration::from_secs(IDLE_SECONDS));
        let idle_cpu = (cpu_seconds(screen.pid)? - idle0) / IDLE_SECONDS as f64 * 100.0;
        let mut key_ms = Vec::new();
        for key in KEYS {
            let was = sorted_by(&screen.screen()?);
            let status = screen.tmux().args(["send-keys", "-t", "top", key]).status()?;
            if !status.success() {
                bail!("tmux send-keys failed");
            }
            let took = screen.wait_for("the new sort", Duration::from_secs(30), |s| {
                sorted_by(s).is_some_and(|now| Some(&now) != was.as_ref())
            })?;
            key_ms.push(took.as_secs_f64() * 1e3);
        }
        let keys = timing(key_ms);
        drop(screen);
        drop(holders);
        drop(agent);

        let markdown = format!(
            "## netwatch top: its cost\n\n\
             `netwatch top` in a 120x40 tmux pseudo-terminal, attached to an agent.\n\n\
             | load | transitions/s | top CPU (one core) | agent CPU, same run | top RSS |\n\
             |---|---:|---:|---:|---:|\n\
             | {ROUND_TRIPS_PER_S:.0} round trips/s for {LOAD_SECONDS:.0} s ({round_trips:.0}/s made) | \
             {per_second:.0} | {top_cpu:.2}% | {agent_cpu:.2}% | {busy_rss} KiB |\n\n\
             | sockets held | first frame to all shown | top RSS | top CPU, idle | key to screen, median (min-max) |\n\
             |---:|---:|---:|---:|---:|\n\
             | {MANY} | {shown_after:.2} s | {many_rss} KiB | {idle_cpu:.2}% | {:.0} ms ({:.0}-{:.0}) |\n\n\
             CPU from /proc/PID/stat over the load (target: at most 5% of one core at 1,000 \
             transitions/s). Key to screen: a sort key sent with `tmux send-keys` until the \
             pane's title shows the new column, polled every 5 ms; a frame is drawn at most \
             every 100 ms.\n",
            keys.median, keys.min, keys.max,
        );
        let json = vec![format!(
            r#"{{"scenario":"top","transitions_per_s":{per_second:.1},"top_cpu_percent":{top_cpu:.3},"agent_cpu_percent":{agent_cpu:.3},"busy_rss_kib":{busy_rss},"sockets":{MANY},"shown_after_s":{shown_after:.3},"rss_kib":{many_rss},"idle_cpu_percent":{idle_cpu:.3},"key_ms_median":{:.1},"key_ms_max":{:.1}}}"#,
            keys.median, keys.max
        )];
        self.write_report("top", &markdown, &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_and_title_are_read_back() {
        let screen = "netwatch top 18:42:40 | agent /x | 98/100012 sockets | lost 0\n \
                      Connections: 98 shown, sorted by IN STATE, filter: x ──";
        assert_eq!(sockets_shown(screen), Some(100_012));
        assert_eq!(sorted_by(screen).as_deref(), Some("IN"));
    }
}
