//! Scenario `latency`: kernel timestamp to the printed line, and connect() to the table row.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{overhead::LOAD_PROCESSES, support::*, *};

/// How long each load runs: the table, asked at 10 Hz for all but its first 0.5 s and last
/// 1 s, gets 45 samples.
const LATENCY_LOAD_SECONDS: f64 = 6.0;

/// The rate the issue's latency targets are set at, in round trips per second.
const PACED_ROUND_TRIPS: f64 = 10_000.0;

fn pace_label(pace: Option<f64>) -> String {
    match pace {
        Some(rate) => format!("paced at {rate:.0}/s"),
        None => "saturated".into(),
    }
}

/// The figures of one load.
struct Loaded {
    pace: Option<f64>,
    /// Round trips per second the load made.
    rate: f64,
    /// `watch` lines with nothing else asked of the agent.
    watch_alone: Latency,
    /// How often the table was asked, then the `watch` lines and the table rows meanwhile.
    asked: Vec<(&'static str, Latency, Latency)>,
    /// The whole table: ms to get it, and its rows.
    whole: (f64, usize),
}

impl Loaded {
    fn label(&self) -> String {
        format!("{} ({:.0} round trips/s)", pace_label(self.pace), self.rate)
    }

    fn rate_key(&self) -> &'static str {
        if self.pace.is_some() { "paced" } else { "load" }
    }
}

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
                // Ends learned from sock_diag (a namespace deleted, a timewait socket gone)
                // carry the agent's time of learning them, not a kernel transition's.
                if line.contains(r#""source":"sock_diag""#) {
                    continue;
                }
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

        let mut loaded = Vec::new();
        for pace in [Some(PACED_ROUND_TRIPS), None] {
            eprintln!("==> bench latency: under load ({}), watch alone", pace_label(pace));
            take(&seen);
            let rate = self.paced_load(LOAD_PROCESSES, LATENCY_LOAD_SECONDS, pace)?;
            std::thread::sleep(Duration::from_millis(1000));
            let watch_alone = latency(take(&seen));

            let mut asked = Vec::new();
            let mut whole = (0.0, 0);
            for every in [Some(Duration::from_millis(100)), None] {
                let how = every.map_or("back to back", |_| "10 times a second");
                eprintln!(
                    "==> bench latency: under load ({}), table asked {how}",
                    pace_label(pace)
                );
                let load = {
                    let bench = Bench::new(&self.root);
                    std::thread::spawn(move || {
                        bench.paced_load(LOAD_PROCESSES, LATENCY_LOAD_SECONDS, pace)
                    })
                };
                std::thread::sleep(Duration::from_millis(500));
                let mut table = Vec::new();
                let started = Instant::now();
                while started.elapsed() < Duration::from_secs_f64(LATENCY_LOAD_SECONDS - 1.5) {
                    table.push(self.table_latency(&agent, &listener)?);
                    if let Some(every) = every {
                        std::thread::sleep(every);
                    }
                }
                // In the stress phase: five whole tables would weigh on the 10 Hz figures.
                if every.is_none() {
                    whole = whole_table(&agent)?;
                }
                load.join().map_err(|_| anyhow::anyhow!("load thread panicked"))??;
                std::thread::sleep(Duration::from_millis(1000));
                asked.push((how, latency(take(&seen)), latency(table)));
            }
            loaded.push(Loaded { pace, rate, watch_alone, asked, whole });
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(watch.id() as i32, libc::SIGTERM) };
        watch.wait()?;

        let row = |what: &str, rate: &str, l: &Latency| {
            format!(
                "| {what} | {rate} | {} | {:.3} | {:.3} | {:.3} |\n",
                l.samples, l.p50, l.p99, l.max
            )
        };
        let mut markdown = String::from(
            "## Latency: kernel transition to what the user sees\n\n\
             | to | rate | samples | p50 ms | p99 ms | max ms |\n|---|---|---:|---:|---:|---:|\n",
        );
        let low = "low (50 connects/s)";
        let what = "`netwatch watch` line (via the agent)";
        markdown.push_str(&row(what, low, &watch_low));
        for l in &loaded {
            markdown.push_str(&row(what, &l.label(), &l.watch_alone));
            for (how, watch, _) in &l.asked {
                markdown.push_str(&row(what, &format!("{}, table asked {how}", l.label()), watch));
            }
        }
        markdown.push_str(&row("row in the agent's table", low, &table_low));
        for l in &loaded {
            for (how, _, table) in &l.asked {
                let rate = format!("{}, asked {how}", l.label());
                markdown.push_str(&row("row in the agent's table", &rate, table));
            }
        }
        markdown.push_str(
            "\nWatch: the line's `mono_ns` (the kernel's timestamp) against CLOCK_MONOTONIC when \
             the bench read the line, for every line of a kernel event (not the ends learned \
             from sock_diag, such as the load's namespace being deleted at its end, which \
             carry no kernel time). Load: 4 processes, paced in total or as fast as they go; \
             each load runs three times: with only the watch reading, then with the table also \
             asked 10 times a second (as a screen refreshing at 10 Hz would), then back to back \
             (a stress: on 2 cores, that asker and the agent's answers take the CPU the stream \
             needs). \
             Table: from just before connect() to the first answer that lists the new \
             connection, asked at once and again until it does, as `netwatch table sport = :PORT` asks (the agent \
             sends only the rows the filter keeps). The whole table's time, which grows with \
             its size, is the second table.\n",
        );
        let mut figures =
            vec![("watch", "low".to_string(), watch_low), ("table", "low".into(), table_low)];
        for l in &loaded {
            let rate = l.rate_key();
            figures.push(("watch", rate.into(), l.watch_alone));
            for (how, watch, table) in &l.asked {
                let rate = format!("{rate}, asked {how}");
                figures.push(("watch", rate.clone(), *watch));
                figures.push(("table", rate, *table));
            }
        }
        let mut json = figures
            .iter()
            .map(|(to, rate, l)| {
                format!(
                    r#"{{"scenario":"latency","to":"{to}","rate":"{rate}","samples":{},"p50_ms":{:.3},"p99_ms":{:.3},"max_ms":{:.3}}}"#,
                    l.samples, l.p50, l.p99, l.max
                )
            })
            .collect::<Vec<_>>();
        markdown.push_str(
            "\n| whole table, asked under load | rows | median of 5 asks, ms |\n|---|---:|---:|\n",
        );
        for l in &loaded {
            let (ms, rows) = l.whole;
            markdown.push_str(&format!("| {} | {rows} | {ms:.1} |\n", l.label()));
            let rate = l.rate_key();
            json.push(format!(
                r#"{{"scenario":"latency","to":"whole_table","rate":"{rate}","rows":{rows},"median_ms":{ms:.3}}}"#
            ));
        }
        self.write_report("latency", &markdown, &json)
    }

    /// Connects to `listener` and asks the agent for its table until the connection is in it;
    /// ns from just before the connect. It asks as `netwatch table sport = :PORT` does: the
    /// agent sends the rows the filter keeps.
    pub(super) fn table_latency(
        &self,
        agent: &Agent,
        listener: &std::net::TcpListener,
    ) -> anyhow::Result<u64> {
        let started = monotonic_ns();
        let client = std::net::TcpStream::connect(listener.local_addr()?)?;
        let (server, _) = listener.accept()?;
        // Reset at the end rather than closed: the host keeps no TIME_WAIT from the bench.
        reset_on_close(&client)?;
        reset_on_close(&server)?;
        let port = client.local_addr()?.port();
        let request =
            format!(r#"{{"v":1,"cmd":"table","select":{{"filter":["sport","=",":{port}"]}}}}"#);
        // The API's rows carry `"local":["ADDR",PORT]`.
        let wanted = format!("\"local\":[\"127.0.0.1\",{port}]");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if ask(agent, &request)?.contains(&wanted) {
                return Ok(monotonic_ns() - started);
            }
        }
        bail!("the agent's table never listed {wanted}")
    }
}

/// SO_LINGER with a zero timeout: close(2) sends a RST and leaves no TIME_WAIT.
fn reset_on_close(stream: &std::net::TcpStream) -> std::io::Result<()> {
    socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO))
}

/// The agent's one-line answer to `request`.
fn ask(agent: &Agent, request: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut api = std::os::unix::net::UnixStream::connect(&agent.socket)?;
    api.write_all(request.as_bytes())?;
    api.write_all(b"\n")?;
    let mut answer = String::new();
    api.read_to_string(&mut answer)?;
    Ok(answer)
}

/// How long the whole table takes to come (ms, median of 5 asks), and how many rows it has.
fn whole_table(agent: &Agent) -> anyhow::Result<(f64, usize)> {
    let mut times = Vec::new();
    let mut rows = 0;
    for _ in 0..5 {
        let started = Instant::now();
        let answer = ask(agent, r#"{"v":1,"cmd":"table"}"#)?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
        rows = answer.matches(r#""cookie":"#).count();
    }
    times.sort_by(f64::total_cmp);
    Ok((times[2], rows))
}
