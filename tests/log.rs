//! The durable event log: whole lines only (even across SIGKILL), appending on restart,
//! size-based rotation keeping N files, and tracing that goes on when the log cannot be
//! written.
//! A failed unwrap is how a test reports a missing field.
#![allow(clippy::unwrap_used)]

use std::{
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Instant,
};

use netwatch_tests::{Agent, PATIENCE, Watcher, netwatch_bin, require_root, wait_for};
use serde_json::Value;

fn log_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("netwatch-test-{}-log-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("events.ndjson")
}

/// `n` loopback connections, opened and closed.
fn connections(n: usize) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    for _ in 0..n {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        drop(listener.accept().unwrap());
        drop(client);
    }
}

/// Every complete line parses and is a version-1 record. A last line without its newline is
/// left out: a reader may look while a write is under way, and SIGKILL may cut a write short
/// at a page boundary (the agent cuts such a line when it reopens the log).
fn records(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert_eq!(value["v"], 1, "{line}");
            value
        })
        .collect()
}

#[test]
fn the_log_survives_sigkill_and_a_restart_appends() {
    let path = log_path("kill");
    let log = path.to_str().unwrap();
    let mut agent = Agent::start_with(&Agent::test_socket("log-kill"), &["--log", log]);
    let busy = thread::spawn(|| connections(300));
    // Past the agent's table, which the log begins with: transitions, being written.
    wait_for("transitions in the log", || {
        records(&path).iter().filter(|r| r["type"] == "transition").count() > 20
    });
    agent.child.kill().unwrap(); // SIGKILL, mid-stream
    agent.child.wait().unwrap();
    busy.join().unwrap();
    let before = records(&path);
    assert!(before.iter().any(|r| r["type"] == "transition"));

    let again = Agent::start_with(&Agent::test_socket("log-kill2"), &["--log", log]);
    connections(5);
    wait_for("new lines", || records(&path).len() > before.len());
    assert!(again.stop().success());
    let after = records(&path);
    assert_eq!(after[..before.len()], before[..], "earlier lines are kept as they were");
    assert_whole_lines(&path);
}

#[test]
fn the_log_rotates_at_its_size_and_keeps_n_files() {
    let path = log_path("rotate");
    let agent = Agent::start_with(
        &Agent::test_socket("log-rotate"),
        &["--log", path.to_str().unwrap(), "--log-max-size", "8K", "--log-keep", "2"],
    );
    let rotated = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
    let deadline = Instant::now() + PATIENCE;
    while !rotated(2).exists() {
        assert!(Instant::now() < deadline, "no second rotation");
        connections(20);
    }
    connections(20);
    assert!(agent.stop().success());
    assert!(!rotated(3).exists(), "only two rotated files are kept");
    for file in [path.clone(), rotated(1), rotated(2)] {
        assert!(std::fs::metadata(&file).unwrap().len() <= 8192, "{} is over 8K", file.display());
        assert!(!records(&file).is_empty() || file == path);
    }
}

#[test]
fn watch_logs_what_it_shows() {
    let path = log_path("watch");
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let logged =
        Watcher::start(&["--json", "--no-agent", "--port", &port, "--log", path.to_str().unwrap()]);
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    drop(listener.accept().unwrap());
    drop(client);
    drop(listener);
    logged.wait_until("the connection's transitions", |lines| lines.len() >= 11);
    let shown = logged.stop();
    let in_log = records(&path);
    assert_eq!(in_log.len(), shown.len());
    for (line, record) in shown.iter().zip(&in_log) {
        let mut shown: Value = serde_json::from_str(line).unwrap();
        shown["v"] = Value::from(1);
        assert_eq!(&shown, record);
    }
}

/// Whoever asks for a log gets one or an error: a log that cannot be opened stops `watch`
/// and the agent at start, with one line and exit status 1, before any program is loaded.
#[test]
fn a_log_that_cannot_be_opened_stops_the_start() {
    for args in [
        vec!["watch", "--no-agent", "--log", "/proc/no/such/dir.ndjson"],
        vec!["agent", "--socket", "/tmp/netwatch-nolog.sock", "--log", "/proc/no/such/dir.ndjson"],
    ] {
        let output = Command::new(netwatch_bin()).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains("cannot open the event log /proc/no/such/dir.ndjson"), "{stderr}");
    }
}

/// Writes `path` until its file system is full.
fn fill(path: &Path) {
    use std::io::Write as _;
    let mut filler = std::fs::File::create(path).unwrap();
    let block = [0u8; 4096];
    while filler.write_all(&block).is_ok() {}
}

/// A tmpfs of this test's own, unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn new(name: &str, size: &str) -> SmallDisk {
        let dir = log_path(name).parent().unwrap().join("disk");
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", dir.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(status.success(), "mount a tmpfs on {}", dir.display());
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The disk fills up under a running agent: logging stops, tracing goes on, and the failure
/// is a record in the stream and a count in the metrics. The log keeps whole lines.
#[test]
fn a_full_disk_stops_the_log_not_the_agent() {
    require_root();
    let disk = SmallDisk::new("full", "1m");
    let log = disk.0.join("events.ndjson");
    let socket = Agent::test_socket("log-full");
    let agent =
        Agent::start_with(&socket, &["--log", log.to_str().unwrap(), "--metrics", "127.0.0.1:0"]);
    // Port 1 sees no traffic: the stream shows only what is not a connection's (losses,
    // log failures), so the client never falls behind the test's own traffic.
    let watcher = Watcher::start(&["--json", "--socket", socket.to_str().unwrap(), "--port", "1"]);
    // The disk fills up only now, with the watcher attached.
    fill(&disk.0.join("filler"));
    connections(5);
    watcher.wait_until("a log_failed record", |lines| {
        lines.iter().any(|l| l.contains(r#""type":"log_failed""#))
    });
    let failed: Value = watcher
        .lines()
        .iter()
        .find(|l| l.contains(r#""type":"log_failed""#))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap();
    assert_eq!(failed["path"], log.to_str().unwrap());
    assert!(failed["error"].as_str().unwrap().contains("No space left"), "{failed}");
    // Tracing goes on: the agent still sees new connections.
    let before = agent.ask_json("stats", &[]);
    connections(3);
    let after = agent.ask_json("stats", &[]);
    assert_ne!(before, after, "the agent still counts connections");
    let scrape = agent.scrape();
    assert!(scrape.contains("netwatch_log_failures_total 1"), "{scrape}");
    drop(watcher);
    assert!(agent.stop().success());
    assert_whole_lines(&log);
}

/// The file, written by an agent that has stopped, holds only whole lines that parse.
fn assert_whole_lines(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'), "{} ends mid-line", path.display());
    records(path);
}
