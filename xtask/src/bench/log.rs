//! Scenario `log`: how fast `netwatch log` reads a 1 GiB event log. An agent records a few
//! seconds of the overhead scenario's load; copies of that recording, each shifted later in
//! time, make ten rotated files of about 100 MiB (as `--log-max-size 100M` leaves them).
//! Each query is timed next to `grep -c` over the same files in the same run, the speed of
//! reading the bytes at all; figures are the log's size over the wall time.
use std::{
    io::{BufRead as _, BufReader, BufWriter, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};
use chrono::{DateTime, SecondsFormat, Utc};

use super::{support::*, *};

const TOTAL: u64 = 1 << 30;
const FILES: u64 = 10;
const ROUNDS: usize = 3;

impl Bench {
    pub fn log(&self) -> anyhow::Result<()> {
        let dir = self.root.join("target/bench-log");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        eprintln!("==> bench log: recording the overhead load with an agent");
        let recording = dir.join("recorded.ndjson");
        {
            let log = recording.to_string_lossy().into_owned();
            let _agent = Agent::start(self, &["--log", &log, "--log-max-size", "1G"])?;
            self.load(2, 2.0)?;
            std::thread::sleep(std::time::Duration::from_millis(1500));
        }
        let base = dir.join("events.ndjson");
        let (span, sample) = expand(&recording, &base)?;
        let size: u64 = (0..FILES)
            .map(|n| rotated(&base, n))
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        let mb = size as f64 / 1e6;
        let seconds = (span.1 - span.0).num_seconds();
        eprintln!("==> bench log: {mb:.0} MB in {FILES} files, {seconds} s of recorded time");
        let files: Vec<PathBuf> = (0..FILES).rev().map(|n| rotated(&base, n)).collect();
        let path = base.to_string_lossy().into_owned();
        // A tenth of the log's time, in its middle.
        let (start, end) =
            (span.0 + (span.1 - span.0) * 45 / 100, span.0 + (span.1 - span.0) * 55 / 100);
        let since = start.to_rfc3339_opts(SecondsFormat::Nanos, true);
        let until = end.to_rfc3339_opts(SecondsFormat::Nanos, true);
        let pid = sample.pid.to_string();
        let dport = format!("dport = :{}", sample.rport);
        let queries: Vec<(&str, Vec<&str>)> = vec![
            (
                "--pid P --transition SYN_SENT:ESTABLISHED",
                vec!["--pid", &pid, "--transition", "SYN_SENT:ESTABLISHED"],
            ),
            ("--failed", vec!["--failed"]),
            ("--since/--until, a tenth of the time", vec!["--since", &since, "--until", &until]),
            (
                "--since/--until and dport = :PORT",
                vec!["--since", &since, "--until", &until, &dport],
            ),
            ("dst 10.0.0.0/8 (every line parsed)", vec!["dst", "10.0.0.0/8"]),
            ("no filter, text", vec![]),
            ("no filter, --json", vec!["--json"]),
        ];
        let grep = |needle: &str| -> anyhow::Result<f64> {
            let started = Instant::now();
            // Not to /dev/null: GNU grep stops at the first match when its output is discarded.
            let output = Command::new("grep").args(["-c", "-F", needle]).args(&files).output()?;
            let status = output.status;
            if status.code() == Some(2) {
                bail!("grep failed: {status}");
            }
            Ok(started.elapsed().as_secs_f64())
        };
        let netwatch = self.bin("netwatch");
        let run = |args: &[&str]| -> anyhow::Result<(f64, u64)> {
            let started = Instant::now();
            let mut child = Command::new(&netwatch)
                .arg("log")
                .arg(&path)
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()?;
            let mut lines = 0u64;
            let mut out = BufReader::new(child.stdout.take().context("stdout")?);
            let mut line = Vec::new();
            while out.read_until(b'\n', &mut line)? > 0 {
                lines += 1;
                line.clear();
            }
            let status = child.wait()?;
            if !status.success() {
                bail!("netwatch log {args:?} failed: {status}");
            }
            Ok((started.elapsed().as_secs_f64(), lines))
        };
        let mut markdown = format!(
            "## Reading the log: netwatch log on a 1 GiB log\n\n\
             {mb:.0} MB in {FILES} rotated files of real records (the overhead load recorded by \
             an agent, repeated later and later), {seconds} s of recorded time. Each \
             query's wall time, stdout read by the bench, next to `grep -c -F` over the same \
             files in the same run (the speed of reading the bytes at all); medians of \
             {ROUNDS}. MB/s is the log's size over the wall time.\n\n\
             | query | lines printed | netwatch log | grep -c | netwatch / grep |\n\
             |---|---:|---:|---:|---:|\n"
        );
        let mut json = Vec::new();
        for (name, args) in &queries {
            let mut ours = Vec::new();
            let mut baseline = Vec::new();
            let mut printed = 0;
            for _ in 0..ROUNDS {
                baseline.push(grep(&format!("\"pid\":{pid},"))?);
                let (seconds, lines) = run(args)?;
                ours.push(seconds);
                printed = lines;
            }
            let (ours, baseline) = (median(ours), median(baseline));
            markdown.push_str(&format!(
                "| `{name}` | {printed} | {:.0} MB/s | {:.0} MB/s | {:.2} |\n",
                mb / ours,
                mb / baseline,
                baseline / ours
            ));
            json.push(
                serde_json::json!({
                    "scenario": "log", "query": name, "log_mb": mb, "lines_printed": printed,
                    "netwatch_s": ours, "grep_s": baseline,
                    "netwatch_mb_per_s": mb / ours, "grep_mb_per_s": mb / baseline,
                    "ratio_to_grep": baseline / ours,
                })
                .to_string(),
            );
        }
        std::fs::remove_dir_all(&dir)?;
        self.write_report("log", &markdown, &json)
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// PATH for 0, PATH.N otherwise.
fn rotated(base: &Path, n: u64) -> PathBuf {
    if n == 0 { base.to_path_buf() } else { PathBuf::from(format!("{}.{n}", base.display())) }
}

/// The first and last time recorded.
type Span = (DateTime<Utc>, DateTime<Utc>);

/// A transition the queries look for.
struct Sample {
    pid: u64,
    rport: u64,
}

/// Writes copies of the recording, each later than the one before, into FILES files of
/// TOTAL / FILES bytes, oldest first; the recorded span (first and last time) and a client.
fn expand(recording: &Path, base: &Path) -> anyhow::Result<(Span, Sample)> {
    let text = std::fs::read_to_string(recording).context("reading the recording")?;
    let lines: Vec<&str> = text.lines().collect();
    let time = |line: &str| -> Option<DateTime<Utc>> {
        let at = line.find("\"time\":\"")? + 8;
        line.get(at..at + 30)?.parse().ok()
    };
    let first = lines.iter().find_map(|l| time(l)).context("the recording has no times")?;
    let last = lines.iter().rev().find_map(|l| time(l)).context("the recording has no times")?;
    let sample = lines
        .iter()
        .filter(|l| l.contains("\"old\":\"SYN_SENT\""))
        .find_map(|l| Some(Sample { pid: json_number(l, "pid")?, rport: json_number(l, "rport")? }))
        .context("the recording has no connect")?;
    let period = (last - first) + chrono::Duration::seconds(1);
    let per_file = TOTAL / FILES;
    let mut end = first;
    let mut copies = (0..).flat_map(|copy| lines.iter().map(move |line| (copy, line)));
    for n in (0..FILES).rev() {
        let mut out = BufWriter::new(std::fs::File::create(rotated(base, n))?);
        let mut written = 0u64;
        while written < per_file {
            let Some((copy, line)) = copies.next() else { break };
            let line = match (line.find("\"time\":\"").map(|at| at + 8), time(line)) {
                (Some(at), Some(t)) => {
                    end = t + period * copy;
                    let stamp = end.to_rfc3339_opts(SecondsFormat::Nanos, true);
                    format!("{}{stamp}{}", &line[..at], &line[at + 30..])
                }
                _ => line.to_string(),
            };
            out.write_all(line.as_bytes())?;
            out.write_all(b"\n")?;
            written += line.len() as u64 + 1;
        }
        out.flush()?;
    }
    Ok(((first, end), sample))
}
