//! The event log asked after the fact: a scripted scenario (python's http.server and curl,
//! a connection open before the agent, refusals, TIME_WAIT, a forced loss and its resync)
//! recorded across many rotated files; then `netwatch log`, `history --log`, `stats --log`
//! and `watch --replay` must say what the live commands said during it, and `log -f`
//! must have followed it as it was written.
//! A failed unwrap is how a test reports a missing field.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    thread,
};

use netwatch_tests::{Agent, NetNs, Watcher, http_server, netwatch_bin, parse_json, wait_for};
use serde_json::Value;

const PORT: u16 = 18191;
const CLOSED: u16 = 18192;
/// curl round trips before the forced loss, and after it.
const BEFORE: usize = 45;
const AFTER: usize = 5;
/// The ss filter for the scenario's sockets.
const FILTER: &[&str] =
    &["sport", "=", ":18191", "or", "dport", "=", ":18191", "or", "dport", "=", ":18192"];

/// A child process killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn netwatch(args: &[&str]) -> Output {
    Command::new(netwatch_bin()).args(args).output().unwrap()
}

/// `netwatch ARGS` succeeded; its stdout.
fn run(args: &[&str]) -> String {
    let output = netwatch(args);
    assert!(
        output.status.success(),
        "netwatch {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn lines(text: &str) -> Vec<String> {
    text.lines().map(str::to_string).collect()
}

/// Socket records (transitions, retransmits) with the scenario's ports, the format
/// version left out.
fn scenario(records: Vec<Value>) -> Vec<Value> {
    let ports = [PORT, CLOSED].map(u64::from);
    records
        .into_iter()
        .filter(|r| {
            let port = |key: &str| r[key].as_u64().is_some_and(|p| ports.contains(&p));
            port("lport") || port("rport")
        })
        .map(|mut r| {
            r.as_object_mut().unwrap().remove("v");
            r
        })
        .collect()
}

fn curl(ns: &NetNs, port: u16) -> bool {
    ns.command("curl")
        .args(["-s", "-o", "/dev/null", "--max-time", "5", &format!("http://127.0.0.1:{port}/")])
        .status()
        .unwrap()
        .success()
}

/// A client connected to the server until a line comes on its stdin.
fn held_client(ns: &NetNs) -> Running {
    let code = format!(
        "import socket,sys\ns=socket.create_connection(('127.0.0.1',{PORT}))\n\
         print('ready',flush=True)\nsys.stdin.readline()\ns.close()"
    );
    let mut child = ns
        .command("/usr/bin/python3")
        .args(["-c", &code])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    Running(child)
}

/// `netwatch log -f ARGS`, once it follows (from the log's end), its stdout lines collected
/// as they come.
fn follower(args: &[&str]) -> (Running, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(netwatch_bin())
        .args(["log", "-f"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    stderr.read_line(&mut said).unwrap();
    assert!(said.contains("following"), "{said}");
    // Later warnings go to the test's own stderr, to be seen in a failure.
    thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            eprintln!("netwatch log -f: {line}");
        }
    });
    let out = Arc::new(Mutex::new(Vec::new()));
    let sink = out.clone();
    let stdout = child.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    (Running(child), out)
}

/// The live agent's `history` (or `stats`) next to the log's, for the same arguments.
fn live_and_logged(agent: &Agent, log: &Path, command: &str, args: &[&str]) -> (Value, Value) {
    let log = log.to_str().unwrap();
    let live = run(&[&[command, "--json", "--socket", agent.socket_arg()], args].concat());
    let logged = run(&[&[command, "--json", "--log", log], args].concat());
    (serde_json::from_str(&live).unwrap(), serde_json::from_str(&logged).unwrap())
}

fn log_dir() -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("netwatch-test-{}-recorded-log", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_log_answers_as_the_live_commands_did() {
    let ns = NetNs::new("recorded");
    let dir = log_dir();
    let path = dir.join("events.ndjson");
    let log = path.to_str().unwrap();
    // Open before the agent: the listener and one connection to it.
    let _server = http_server(&ns, PORT);
    let mut held = held_client(&ns);
    let mut agent = Agent::start_with(
        &Agent::test_socket("recorded"),
        &["--log", log, "--log-max-size", "64K", "--log-keep", "100", "--ring-size", "65536"],
    );
    let (_follower, followed) = follower(&[log, "--json", "--port", &PORT.to_string()]);
    let watcher = Watcher::start(&["--json", "--socket", agent.socket_arg()]);

    // Enough to fill a few files before the burst.
    for _ in 0..BEFORE {
        assert!(curl(&ns, PORT));
    }
    for _ in 0..3 {
        assert!(!curl(&ns, CLOSED), "nothing listens on {CLOSED}");
    }
    // A forced loss: the agent stopped while a burst overflows its ring buffer.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGSTOP) };
    ns.run(|| {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        for _ in 0..200 {
            let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            drop(listener.accept().unwrap());
            drop(client);
        }
    });
    // SAFETY: as above.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGCONT) };
    watcher.wait_until("the loss", |l| l.iter().any(|l| l.contains("ring_buffer_full")));
    wait_for("the resync", || agent.stderr.lock().unwrap().contains("rebuilt from a new snapshot"));
    // The connection from before the agent ends; more round trips after the resync.
    held.0.stdin.as_mut().unwrap().write_all(b"close\n").unwrap();
    held.0.wait().unwrap();
    for _ in 0..AFTER {
        assert!(curl(&ns, PORT));
    }
    // Each connection (and the held one) ends with one end in TIME_WAIT (whichever closed
    // first) and the other CLOSEd.
    watcher.wait_until("every connection's last transitions", |l| {
        let ended = |r: &&Value| {
            (r["lport"] == PORT || r["rport"] == PORT)
                && (r["new"] == "TIME_WAIT" || r["new"] == "CLOSE")
        };
        parse_json(l).iter().filter(ended).count() >= 2 * (BEFORE + AFTER + 1)
    });
    let filter = FILTER.to_vec();
    let (live_history, logged_history) = live_and_logged(&agent, &path, "history", &filter);
    let (live_stats, logged_stats) = live_and_logged(&agent, &path, "stats", &[]);
    let watched = scenario(parse_json(&watcher.stop()));
    // SAFETY: as above.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) };
    assert!(agent.child.wait().unwrap().success());

    // The records: what the live stream sent, the log has, in order, across its files.
    let files = std::fs::read_dir(&dir).unwrap().count();
    assert!(files > 4, "the scenario spans several rotated files: {files}");
    // Every file begins with the agent's table (the oldest with the one of its start), but
    // when the table is larger than a quarter of a file (the host's sockets, the burst's
    // TIME_WAIT), which the agent says.
    let too_large = agent.stderr.lock().unwrap().contains("larger than a quarter");
    let mut tables = 0;
    for n in 0..files {
        let name = if n == 0 { path.clone() } else { dir.join(format!("events.ndjson.{n}")) };
        let text = std::fs::read_to_string(&name).unwrap();
        let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        if first["type"] != "table" {
            assert!(too_large && n < files - 1, "{}: {first}", name.display());
            continue;
        }
        tables += 1;
        let reason = if n == files - 1 { "start" } else { "rotation" };
        assert!(first["reason"] == reason || first["reason"] == "resync", "{first}");
    }
    assert!(too_large || tables == files, "{tables} files of {files} begin with a table");
    let logged = scenario(parse_json(&lines(&run(&[&["log", log, "--json"], FILTER].concat()))));
    assert!(watched.len() > 150, "{} records", watched.len());
    assert_eq!(logged, watched, "the log's records are the stream's");
    let on_port: Vec<Value> =
        watched.iter().filter(|r| r["lport"] == PORT || r["rport"] == PORT).cloned().collect();
    let port = PORT.to_string();
    let replayed = run(&["watch", "--replay", log, "--speed", "10000", "--json", "--port", &port]);
    assert_eq!(scenario(parse_json(&lines(&replayed))), on_port, "a replay is the stream again");
    wait_for("log -f to catch up", || followed.lock().unwrap().len() >= on_port.len());
    let followed = scenario(parse_json(&followed.lock().unwrap()));
    assert_eq!(followed, on_port, "log -f followed the log across its rotations");

    // What failed, and since when.
    let failed = parse_json(&lines(&run(&["log", log, "--json", "--failed"])));
    let refused: Vec<&Value> = failed.iter().filter(|r| r["type"] == "transition").collect();
    assert_eq!(refused.len(), 3, "{failed:?}");
    assert!(refused.iter().all(|r| r["failure"] == "refused" && r["rport"] == CLOSED));
    assert!(failed.iter().any(|r| r["type"] == "lost"), "the loss is shown with the failures");
    let since = refused[0]["time"].as_str().unwrap();
    let after = scenario(parse_json(&lines(&run(&["log", log, "--json", "--since", since]))));
    let expected: Vec<&Value> =
        watched.iter().filter(|r| r["time"].as_str().unwrap() >= since).collect();
    assert_eq!(after.iter().collect::<Vec<_>>(), expected);

    // Histories: the same connections, steps, owners and endings as the agent's.
    let key = |h: &Value| h["cookie"].as_u64().unwrap();
    let mut live: Vec<Value> = live_history.as_array().unwrap().clone();
    let mut rebuilt: Vec<Value> = logged_history.as_array().unwrap().clone();
    live.sort_by_key(key);
    rebuilt.sort_by_key(key);
    assert!(live.len() > 40, "{} histories", live.len());
    for (live, rebuilt) in live.iter().zip(&rebuilt) {
        for field in ["cookie", "steps", "closed", "failure", "first_seen", "snapshot_state"] {
            assert_eq!(live[field], rebuilt[field], "{field} of {live}\nrebuilt: {rebuilt}");
        }
    }
    assert_eq!(live.len(), rebuilt.len());
    // The server's end of the connection from before the agent: in its first table, and
    // ended in the log.
    let from_before = rebuilt
        .iter()
        .find(|h| h["first_seen"] == "snapshot" && h["lport"] == PORT && h["rport"] != 0);
    let from_before = from_before.expect("the held connection, from the agent's first table");
    assert_eq!(from_before["snapshot_state"], "ESTABLISHED");
    assert!(from_before["closed"] == true, "its end is in the log: {from_before}");

    // Statistics: the scenario's endpoints count the same.
    for (title, keys) in
        [("by_remote", [format!("127.0.0.1:{PORT}"), format!("127.0.0.1:{CLOSED}")])]
    {
        for key in keys {
            let find = |report: &Value| {
                report[title].as_array().unwrap().iter().find(|s| s["key"] == key.as_str()).cloned()
            };
            let (live, logged) = (find(&live_stats), find(&logged_stats));
            assert!(live.is_some(), "{key} in the live stats: {live_stats}");
            assert_eq!(live, logged, "{title} {key}");
        }
    }
}

#[test]
fn a_damaged_log_is_read_around_its_bad_lines() {
    let dir = log_dir();
    let path = dir.join("events.ndjson");
    let log = path.to_str().unwrap();
    let agent = Agent::start_with(&Agent::test_socket("recorded-bad"), &["--log", log]);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(TcpStream::connect(listener.local_addr().unwrap()).unwrap());
    wait_for("the connect in the log", || {
        std::fs::read_to_string(&path).unwrap().contains(&format!("\"rport\":{port},"))
    });
    assert!(agent.stop().success());
    let text = std::fs::read_to_string(&path).unwrap();
    let whole = text.lines().count();
    // Garbage in the middle, a line from a newer netwatch, and a last line cut short.
    let newer = r#"{"v":9,"type":"transition","time":"2030-01-01T00:00:00.000000000Z"}"#;
    let damaged = format!("{text}\u{0}\u{1}garbage\n{newer}\n{}", &text[..50]);
    std::fs::write(&path, damaged).unwrap();
    let output = netwatch(&["log", log, "--json", "--port", &port.to_string()]);
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let name = path.display();
    for expected in [
        format!("{name}:{}: not a netwatch log line", whole + 1),
        format!("{name}:{}: written by a newer netwatch (format v9", whole + 2),
        format!("{name}:{}: not a netwatch log line (the last line is incomplete", whole + 3),
    ] {
        assert!(stderr.contains(&expected), "{expected}\nin:\n{stderr}");
    }
    let records = parse_json(&lines(&String::from_utf8_lossy(&output.stdout)));
    assert!(records.iter().any(|r| r["rport"] == port), "read on after the bad lines");
    // No log at all: one line, and a failure.
    let output = netwatch(&["log", "/nonexistent/events.ndjson"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot read the event log /nonexistent/events.ndjson"), "{stderr}");
}
