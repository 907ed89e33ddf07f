//! The durable event log: whole lines only (even across SIGKILL), appending on restart,
//! size-based rotation keeping N files, and tracing that goes on when the log cannot be
//! written.
//! A failed unwrap is how a test reports a missing field.
#![allow(clippy::unwrap_used)]

use std::{
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use netwatch_tests::{Agent, PATIENCE, Watcher};
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

/// Every line parses and is a version-1 record.
fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert_eq!(value["v"], 1, "{line}");
            value
        })
        .collect()
}

fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_log_survives_sigkill_and_a_restart_appends() {
    let path = log_path("kill");
    let log = path.to_str().unwrap();
    let mut agent = Agent::start_with(&Agent::test_socket("log-kill"), &["--log", log]);
    let busy = thread::spawn(|| connections(300));
    wait_for("transitions in the log", || std::fs::metadata(&path).is_ok_and(|m| m.len() > 10_000));
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
fn watch_logs_what_it_shows_and_goes_on_when_the_log_fails() {
    let path = log_path("watch");
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let logged =
        Watcher::start(&["--json", "--no-agent", "--port", &port, "--log", path.to_str().unwrap()]);
    let unlogged = Watcher::start(&[
        "--json",
        "--no-agent",
        "--port",
        &port,
        "--log",
        "/proc/no/such/dir.ndjson",
    ]);
    assert!(unlogged.stderr().contains("not logging; tracing goes on"), "{}", unlogged.stderr());
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    drop(listener.accept().unwrap());
    drop(client);
    drop(listener);
    logged.wait_until("the connection's transitions", |lines| lines.len() >= 11);
    unlogged.wait_until("the stream despite the log", |lines| lines.len() >= 11);
    let shown = logged.stop();
    assert!(!unlogged.stop().is_empty());
    let in_log = records(&path);
    assert_eq!(in_log.len(), shown.len());
    for (line, record) in shown.iter().zip(&in_log) {
        let mut shown: Value = serde_json::from_str(line).unwrap();
        shown["v"] = Value::from(1);
        assert_eq!(&shown, record);
    }
}
