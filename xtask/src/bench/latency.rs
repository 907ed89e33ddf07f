//! Scenario `latency`: kernel timestamp to the printed line, and connect() to the table row.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    overhead::{LOAD_PROCESSES, LOAD_SECONDS},
    support::*,
    *,
};

impl Bench {
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
    pub(super) fn table_latency(
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
