//! `netwatch agent`: its API socket's lifecycle and permissions, and `netwatch watch`
//! attached to it showing what a watcher with programs of its own shows.
//! A failed unwrap is how a test reports a missing field.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, TcpListener},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use netwatch_tests::{
    Agent, Holder, NetNs, Watcher, client_roundtrip, listening_port, netwatch_bin,
    oracle::{settled_rows, ss_rows},
    parse_json, serve_one, sockpeer_in, veth_pair,
};
use serde_json::Value;

fn socket_arg(agent: &Agent) -> &str {
    agent.socket.to_str().unwrap()
}

/// (lport, rport, old, new, pid, comm) of every transition record.
fn transitions(records: &[Value]) -> Vec<(Value, Value, Value, Value, Value, Value)> {
    records
        .iter()
        .filter(|r| r["type"] == "transition")
        .map(|r| {
            let f = |k: &str| r[k].clone();
            (f("lport"), f("rport"), f("old"), f("new"), f("pid"), f("comm"))
        })
        .collect()
}

#[test]
fn watch_through_the_agent_shows_what_a_direct_watch_shows() {
    let agent = Agent::start(&Agent::test_socket("stream"));
    let mode = std::fs::metadata(&agent.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "root-only API socket");
    // Both watchers start before the listener exists, so both know its owner.
    let attached = Watcher::start(&["--json", "--socket", socket_arg(&agent)]);
    assert!(attached.stderr().contains("via the agent"), "{}", attached.stderr());
    let direct = Watcher::start(&["--json", "--socket", socket_arg(&agent), "--no-agent"]);
    assert!(direct.stderr().contains("tp_btf"), "{}", direct.stderr());

    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = thread::spawn(move || serve_one(&listener).unwrap());
    client_roundtrip((Ipv4Addr::LOCALHOST, port).into()).unwrap();
    server.join().unwrap();
    // CLOSE->LISTEN, five transitions a side, and the listener's LISTEN->CLOSE.
    let ours = move |records: &[Value]| -> Vec<Value> {
        records.iter().filter(|r| r["lport"] == port || r["rport"] == port).cloned().collect()
    };
    let count = move |lines: &[String]| {
        let records: Vec<Value> =
            lines.iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
        ours(&records).len()
    };
    attached.wait_until("12 transitions via the agent", |lines| count(lines) >= 12);
    direct.wait_until("12 transitions directly", |lines| count(lines) >= 12);
    let via_agent = ours(&parse_json(&attached.stop()));
    let own = ours(&parse_json(&direct.stop()));
    assert_eq!(via_agent.len(), 12, "{via_agent:#?}");
    assert_eq!(transitions(&via_agent), transitions(&own));
    assert!(via_agent.iter().all(|r| r["pid"] == std::process::id()));
    assert!(agent.stop().success(), "SIGTERM stops the agent cleanly");
}

#[test]
fn second_agent_is_refused_and_a_stale_socket_is_replaced() {
    let socket = Agent::test_socket("lifecycle");
    let mut first = Agent::start(&socket);
    let second = Command::new(netwatch_bin())
        .args(["agent", "--socket", socket.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("already running"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    // SIGKILL leaves the socket file behind; the next agent replaces it.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    assert!(socket.exists(), "a killed agent cannot remove its socket");
    let third = Agent::start(&socket);
    assert!(third.stop().success());
    assert!(!socket.exists(), "a stopped agent removes its socket");
    // Connects on the host still work after all this (no hook left denying them).
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || serve_one(&listener).unwrap());
    client_roundtrip(addr).unwrap();
    server.join().unwrap();
}

#[test]
fn an_unusable_socket_path_is_a_clear_error() {
    let file = std::env::temp_dir().join(format!("netwatch-test-{}-file", std::process::id()));
    std::fs::write(&file, b"not a directory").unwrap();
    for path in [file.join("agent.sock"), file.clone()] {
        let output = Command::new(netwatch_bin())
            .args(["agent", "--socket", path.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.contains("cannot use the agent socket") && stderr.contains("--socket"),
            "{stderr}"
        );
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"not a directory", "nothing overwritten");
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn malformed_and_silent_clients_do_not_disturb_others() {
    let agent = Agent::start(&Agent::test_socket("clients"));
    // Connects and never sends.
    let silent = UnixStream::connect(&agent.socket).unwrap();
    let watcher = Watcher::start(&["--json", "--port", "1", "--socket", socket_arg(&agent)]);

    let mut bad = UnixStream::connect(&agent.socket).unwrap();
    bad.write_all(b"{\"v\":1,\"cmd\":\"rm -rf\"}\n").unwrap();
    let mut reply = String::new();
    BufReader::new(&bad).read_line(&mut reply).unwrap();
    let reply: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["type"], "error");
    assert!(reply["error"].as_str().unwrap().contains("malformed"), "{reply}");

    let mut huge = UnixStream::connect(&agent.socket).unwrap();
    let _ = huge.write_all(&vec![b'x'; 1 << 20]);
    let mut reply = String::new();
    let _ = BufReader::new(&huge).read_line(&mut reply);
    assert!(reply.contains("longer than") || reply.contains("malformed"), "{reply}");

    // The silent client is dropped after its grace period; the agent serves on.
    let started = Instant::now();
    let mut line = String::new();
    silent.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    BufReader::new(&silent).read_line(&mut line).unwrap();
    assert!(line.contains("no request"), "{line}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let lines = watcher.stop();
    assert!(lines.iter().all(|l| serde_json::from_str::<Value>(l).is_ok()));
    assert!(agent.stop().success());
}

type NetSpace = netwatch_tests::NetNs;

/// The agent's table, kept from events, equals ss for sockets that existed before it started
/// (seeded from its snapshot) and for sockets made after (events only), in every state the
/// mix covers, with the same holders (pid and fd).
#[test]
fn agent_table_equals_ss_for_sockets_from_before_and_after_it_started() {
    let ns = NetSpace::new("agt");
    let before = Holder::start(&ns, env!("CARGO_BIN_EXE_sockpeer"));
    let agent = Agent::start(&Agent::test_socket("table"));
    let after = Holder::start(&ns, env!("CARGO_BIN_EXE_sockpeer"));
    let (ours, records, stderr) = settled_rows(&agent, &ns);
    assert!(!stderr.contains("one-shot"), "asked the agent: {stderr}");
    let theirs = ss_rows(&ns);
    assert_eq!(ours, theirs, "agent table vs ss -tuanp");
    for holder in [&before, &after] {
        let held = records
            .iter()
            .filter(|r| r["owners"].as_array().unwrap().iter().any(|o| o["pid"] == holder.pid))
            .count();
        assert!(held >= 10, "pid {} holds its sockets: {held}", holder.pid);
    }
    // Sockets made after the agent started have a time in state; snapshot ones do not.
    let new_ports: Vec<u64> = after.ports.iter().map(|p| u64::from(*p)).collect();
    let new_listener = records
        .iter()
        .find(|r| r["state"] == "LISTEN" && new_ports.contains(&r["lport"].as_u64().unwrap()))
        .unwrap();
    assert!(new_listener["in_state_ms"].is_u64(), "{new_listener}");
    assert!(new_listener["recv_q"].is_null(), "queues are not kept from events: {new_listener}");

    // Sockets closing change the table without any further snapshot.
    drop(after);
    settled_rows(&agent, &ns);
    assert!(agent.stop().success());
}

/// A stalled agent with the smallest ring buffer loses events; it says so in the stream,
/// rebuilds its table from a new snapshot, and the table equals ss again.
#[test]
fn table_converges_to_ss_after_lost_events() {
    let ns = NetSpace::new("lost");
    let agent = Agent::start_with(&Agent::test_socket("lost"), &["--ring-size", "4096"]);
    let watcher = Watcher::start(&["--json", "--port", "1", "--socket", socket_arg(&agent)]);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGSTOP) };
    let holder = Holder::start(&ns, env!("CARGO_BIN_EXE_sockpeer"));
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    for _ in 0..100 {
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        drop(listener.accept().unwrap());
        drop(client);
    }
    // SAFETY: as above.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGCONT) };
    watcher.wait_until("a lost record from the agent", |lines| {
        lines.iter().any(|l| l.contains("ring_buffer_full"))
    });
    // The rebuild waits for a loss check that finds no new loss (about a second).
    let deadline = Instant::now() + netwatch_tests::PATIENCE;
    while !agent.stderr.lock().unwrap().contains("rebuilt from a new snapshot") {
        assert!(Instant::now() < deadline, "no rebuild after the loss");
        thread::sleep(Duration::from_millis(100));
    }
    settled_rows(&agent, &ns);
    drop(holder);
    drop(watcher);
    assert!(agent.stop().success());
}

/// Holders follow fork (the child inherits every fd) and exec (close-on-exec fds are gone,
/// the others stay under the new command name), as ss sees them.
#[test]
fn holders_follow_fork_and_exec() {
    let ns = NetSpace::new("fork");
    let agent = Agent::start(&Agent::test_socket("fork"));
    let (mut child, line) = sockpeer_in(&ns, env!("CARGO_BIN_EXE_sockpeer"), &["fork-exec"]);
    let pids: Vec<u64> = line.split_whitespace().skip(1).map(|p| p.parse().unwrap()).collect();
    let [parent, forked] = pids[..] else { panic!("{line}") };
    let (_, records, _) = settled_rows(&agent, &ns);
    let holders = |netid: &str| -> Vec<(u64, String)> {
        let row = records.iter().find(|r| r["netid"] == netid).unwrap();
        row["owners"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| (o["pid"].as_u64().unwrap(), o["comm"].as_str().unwrap().to_string()))
            .collect()
    };
    assert_eq!(
        holders("tcp"),
        [(parent, "sockpeer".to_string())],
        "close-on-exec listener left the child"
    );
    assert_eq!(holders("udp"), [(parent, "sockpeer".to_string()), (forked, "sleep".to_string())]);
    drop(child.stdin.take());
    child.wait().unwrap();
    assert!(agent.stop().success());
}

/// A socket passed over a unix socket with SCM_RIGHTS has both processes as holders.
#[test]
fn a_socket_passed_with_scm_rights_lists_both_holders() {
    let ns = NetSpace::new("scm");
    let agent = Agent::start(&Agent::test_socket("scm"));
    let (mut child, line) = sockpeer_in(&ns, env!("CARGO_BIN_EXE_sockpeer"), &["pass-fd"]);
    let numbers: Vec<i64> = line.split_whitespace().skip(1).map(|p| p.parse().unwrap()).collect();
    let [parent, receiver, fd] = numbers[..] else { panic!("{line}") };
    assert!(fd >= 0, "the child received an fd: {line}");
    let (_, records, _) = settled_rows(&agent, &ns);
    let udp = records.iter().find(|r| r["netid"] == "udp").unwrap();
    let holders: Vec<(i64, i64)> = udp["owners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["pid"].as_i64().unwrap(), o["fd"].as_i64().unwrap()))
        .collect();
    assert!(
        holders.contains(&(receiver, fd)),
        "the receiver holds it through fd {fd}: {holders:?}"
    );
    assert!(holders.iter().any(|(pid, _)| *pid == parent), "{holders:?}");
    assert_eq!(holders.len(), 2, "{holders:?}");
    drop(child.stdin.take());
    child.wait().unwrap();
    assert!(agent.stop().success());
}

/// Hundreds of connections opened and closed quickly by several processes: afterwards the
/// agent's table (hundreds of TIME_WAIT sockets, which no tracepoint reports) equals ss.
#[test]
fn churn_ends_with_the_table_equal_to_ss() {
    const CLIENTS: usize = 4;
    const EACH: usize = 100;
    let ns = NetSpace::new("churn");
    let agent = Agent::start(&Agent::test_socket("churn"));
    let total = (CLIENTS * EACH).to_string();
    let (mut server, line) =
        sockpeer_in(&ns, env!("CARGO_BIN_EXE_sockpeer"), &["serve-many", "127.0.0.1:0", &total]);
    let port = listening_port(&line).to_string();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            ns.command(env!("CARGO_BIN_EXE_sockpeer"))
                .args(["churn", &format!("127.0.0.1:{port}"), &EACH.to_string()])
                .spawn()
                .unwrap()
        })
        .collect();
    for mut client in clients {
        assert!(client.wait().unwrap().success());
    }
    assert!(server.wait().unwrap().success());

    let (ours, _, _) = settled_rows(&agent, &ns);
    let time_wait = ours.iter().filter(|r| r.1 == "TIME-WAIT").count();
    assert!(time_wait >= CLIENTS * EACH, "the churn leaves its TIME-WAIT sockets: {time_wait}");
    assert!(agent.stop().success());
}

/// A server process and a separate client process: the accepted socket is held by the
/// server, the client's by the client - in the agent's table as in ss.
#[test]
fn separate_server_and_client_each_hold_their_end() {
    let ns = NetSpace::new("pair");
    let agent = Agent::start(&Agent::test_socket("pair"));
    let sockpeer = env!("CARGO_BIN_EXE_sockpeer");
    let (mut server, line) = sockpeer_in(&ns, sockpeer, &["serve", "127.0.0.1:0"]);
    let port = listening_port(&line).to_string();
    let (mut client, _ready) =
        sockpeer_in(&ns, sockpeer, &["connect-hold", &format!("127.0.0.1:{port}")]);
    // The server accepts in its own time: until it has, ss shows no holder for its end.
    let (_, records, _) = settled_rows(&agent, &ns);
    let port: u64 = port.parse().unwrap();
    let holder_of = |lport_is_server: bool| -> u64 {
        let row = records
            .iter()
            .find(|r| r["state"] == "ESTABLISHED" && (r["lport"] == port) == lport_is_server)
            .unwrap();
        row["owners"][0]["pid"].as_u64().unwrap()
    };
    assert_eq!(holder_of(true), u64::from(server.id()), "the accepted socket is the server's");
    let accepted =
        records.iter().find(|r| r["state"] == "ESTABLISHED" && r["lport"] == port).unwrap();
    let history = accepted["owner_history"].as_array().unwrap();
    assert_eq!(
        history.last().unwrap()["pid"],
        server.id(),
        "owner history ends with the acceptor: {accepted}"
    );
    assert!(history.last().unwrap()["ago_ms"].is_u64(), "an event named it: {accepted}");
    assert_eq!(holder_of(false), u64::from(client.id()), "the connecting socket is the client's");
    let _ = server.kill();
    server.wait().unwrap();
    drop(client.stdin.take());
    client.wait().unwrap();
    assert!(agent.stop().success());
}

/// `netwatch stats`: the agent's connect latencies and failures per endpoint and process.
#[test]
fn stats_summarise_handshakes_and_failures() {
    let agent = Agent::start(&Agent::test_socket("stats"));
    // In a namespace of the test's own: nothing else can take the closed port meanwhile.
    let ns = NetNs::new("stats");
    let (addr, refused_addr) = ns.run(|| {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        for _ in 0..20 {
            let client = std::net::TcpStream::connect(addr).unwrap();
            drop(listener.accept().unwrap());
            drop(client);
        }
        let closed = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let refused_addr = closed.local_addr().unwrap();
        drop(closed);
        assert!(std::net::TcpStream::connect(refused_addr).is_err());
        (addr, refused_addr)
    });

    let output = Command::new(netwatch_bin())
        .args(["stats", "--json", "--socket", socket_arg(&agent)])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let remote = |key: String| {
        report["by_remote"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["key"] == key.as_str())
            .cloned()
            .unwrap()
    };
    let ok = remote(addr.to_string());
    assert_eq!(ok["connects"], 20, "{ok}");
    let (p50, p99, max) = (
        ok["p50_ms"].as_f64().unwrap(),
        ok["p99_ms"].as_f64().unwrap(),
        ok["max_ms"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max && max < 1000.0, "{ok}");
    assert_eq!(remote(refused_addr.to_string())["failed"]["refused"], 1);
    // Processes are grouped by command, with their pids.
    let me = netwatch_tests::own_comm();
    let process = report["by_process"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == me.as_str())
        .cloned()
        .unwrap();
    assert!(process["pids"].as_array().unwrap().contains(&Value::from(std::process::id())));
    assert_eq!(
        (process["connects"].as_u64(), process["failed"]["refused"].as_u64()),
        (Some(20), Some(1))
    );
    let text = Command::new(netwatch_bin())
        .args(["stats", "--socket", socket_arg(&agent)])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains(&addr.to_string()));
    assert!(agent.stop().success());

    let none = Command::new(netwatch_bin())
        .args(["stats", "--socket", "/nonexistent/agent.sock"])
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&none.stderr).contains("no agent is running"));
}

/// Connections still in their listener's accept queue when it closes are reset by this
/// host: `listener_closed`, counted under the peer's address and the listener's port (never
/// one key per ephemeral port), while the clients see `reset` under the endpoint they
/// connected to.
#[test]
fn unaccepted_connections_fail_with_their_listener() {
    let agent = Agent::start(&Agent::test_socket("unaccepted"));
    let ns = NetNs::new("unaccepted");
    let (port, client_ports) = ns.run(|| {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let clients: Vec<std::net::TcpStream> =
            (0..3).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        let ports: Vec<u16> = clients.iter().map(|c| c.local_addr().unwrap().port()).collect();
        // Each client's handshake completes in the kernel; nobody accepts.
        thread::sleep(Duration::from_millis(50));
        drop(listener);
        drop(clients);
        (addr.port(), ports)
    });
    let stats = agent.ask_json("stats", &[]);
    let by_remote = stats["by_remote"].as_array().unwrap();
    let inbound = format!("127.0.0.1 -> :{port}");
    let server_side = by_remote.iter().find(|r| r["key"] == inbound.as_str());
    let server_side = server_side.unwrap_or_else(|| panic!("no {inbound}: {stats:#}"));
    assert_eq!(server_side["failed"]["listener_closed"], 3, "{server_side}");
    let outbound = format!("127.0.0.1:{port}");
    let client_side = by_remote.iter().find(|r| r["key"] == outbound.as_str()).unwrap();
    assert_eq!(client_side["failed"]["reset"], 3, "{client_side}");
    assert_eq!(client_side["connects"], 3, "{client_side}");
    for client in client_ports {
        let per_port = format!("127.0.0.1:{client}");
        assert!(
            by_remote.iter().all(|r| r["key"] != per_port.as_str()),
            "no key per ephemeral port: {stats:#}"
        );
    }
    let failed = agent.ask_json("history", &["--failed", "sport", "=", &format!(":{port}")]);
    let reasons: Vec<&str> =
        failed.as_array().unwrap().iter().map(|h| h["failure"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["listener_closed"; 3], "{failed:#}");
    assert!(agent.stop().success());
}

/// `--metrics`: Prometheus text that a real parser reads, with counters that follow the
/// test's traffic; a port already in use is a clear error.
#[test]
fn metrics_parse_and_count_the_traffic() {
    let agent = Agent::start_with(
        &Agent::test_socket("metrics"),
        &["--metrics", "127.0.0.1:0", "--metrics-remotes", "3"],
    );
    let address = agent.metrics_address().to_string();
    let scrape = || -> prometheus_parse::Scrape {
        let body = agent.scrape();
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
    };
    let value = |scrape: &prometheus_parse::Scrape,
                 name: &str,
                 label: Option<(&str, &str)>|
     -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    let before = scrape();
    let established = |s: &prometheus_parse::Scrape| {
        s.samples
            .iter()
            .filter(|x| {
                x.metric == "netwatch_transitions_total"
                    && x.labels.get("old") == Some("SYN_SENT")
                    && x.labels.get("new") == Some("ESTABLISHED")
            })
            .map(|x| match x.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum::<f64>()
    };
    let ns = NetNs::new("metrics");
    let listener = ns.run(|| {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        for _ in 0..10 {
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            drop(listener.accept().unwrap());
            drop(client);
        }
        let gone = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap();
        assert!(std::net::TcpStream::connect(gone).is_err());
        listener
    });
    let after = scrape();
    assert!(established(&after) - established(&before) >= 10.0, "ten handshakes counted");
    let refused = |s: &prometheus_parse::Scrape| {
        value(s, "netwatch_connect_failures_total", Some(("reason", "refused")))
    };
    assert!(refused(&after) - refused(&before) >= 1.0);
    assert!(
        value(&after, "netwatch_sockets", Some(("state", "LISTEN"))) >= 1.0,
        "the listener is in the table"
    );
    assert_eq!(value(&after, "netwatch_lost_events_total", None), 0.0);
    assert_eq!(value(&after, "netwatch_ring_buffer_size_bytes", None), 8388608.0);
    assert!(value(&after, "netwatch_ring_buffer_peak_bytes", None) > 0.0);
    let endpoint = listener.local_addr().unwrap().to_string();
    assert!(
        value(&after, "netwatch_remote_connects_total", Some(("remote", &endpoint))) >= 10.0,
        "--metrics-remotes labels the first endpoints"
    );
    let remotes: std::collections::BTreeSet<&str> = after
        .samples
        .iter()
        .filter(|s| s.metric.starts_with("netwatch_remote_"))
        .filter_map(|s| s.labels.get("remote"))
        .filter(|r| *r != "other")
        .collect();
    assert!(remotes.len() <= 3, "at most 3 endpoints get labels: {remotes:?}");

    let second = Command::new(netwatch_bin())
        .args([
            "agent",
            "--socket",
            Agent::test_socket("metrics2").to_str().unwrap(),
            "--metrics",
            &address,
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot serve metrics on {address}")) && stderr.contains("in use"),
        "{stderr}"
    );
    assert!(agent.stop().success());
}

/// `netwatch history`: a connection's path in order, through TIME_WAIT to its end (here its
/// namespace's deletion), with durations that add up to its lifespan; filters by port,
/// `--closed`, `--failed` and `--cookie`.
#[test]
fn history_shows_each_connections_path() {
    let agent = Agent::start(&Agent::test_socket("history"));
    let ns = NetNs::new("history");
    let (port, client, gone) = ns.run(|| {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = thread::spawn(move || serve_one(&listener).unwrap());
        let client = client_roundtrip((Ipv4Addr::LOCALHOST, port).into()).unwrap();
        server.join().unwrap();
        let gone = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap();
        assert!(std::net::TcpStream::connect(gone).is_err());
        (port, client, gone)
    });
    let open = agent.ask_json("history", &["dport", "=", &format!(":{port}")]);
    let last = &open[0]["steps"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["old"].as_str(), last["new"].as_str()),
        (Some("FIN_WAIT2"), Some("TIME_WAIT"))
    );
    assert_eq!(open[0]["closed"], false, "open while in TIME_WAIT: {open:#}");
    drop(ns);

    let history = |args: &[&str]| -> Vec<Value> {
        let output = Command::new(netwatch_bin())
            .args(["history", "--json", "--socket", socket_arg(&agent)])
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let dport = format!(":{port}");
    let clients = history(&["--closed", "dport", "=", &dport]);
    let mine: Vec<&Value> = clients.iter().filter(|h| h["lport"] == client.port()).collect();
    assert_eq!(mine.len(), 1, "{clients:#?}");
    let h = mine[0];
    let states: Vec<(&str, &str)> = h["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["old"].as_str().unwrap(), s["new"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [
            ("CLOSE", "SYN_SENT"),
            ("SYN_SENT", "ESTABLISHED"),
            ("ESTABLISHED", "FIN_WAIT1"),
            ("FIN_WAIT1", "FIN_WAIT2"),
            ("FIN_WAIT2", "TIME_WAIT"),
            ("TIME_WAIT", "CLOSE")
        ]
    );
    assert_eq!(h["ending"], "netns_deleted");
    assert_eq!(h["first_seen"], "event");
    let spent: u64 =
        h["steps"].as_array().unwrap().iter().map(|s| s["duration_ns"].as_u64().unwrap()).sum();
    assert_eq!(h["lifespan_ns"].as_u64(), Some(spent), "durations add up to the lifespan");
    assert_eq!((h["bytes_sent"].as_u64(), h["bytes_received"].as_u64()), (Some(4), Some(4)));

    let failed = history(&["--failed"]);
    assert!(
        failed.iter().any(|h| h["rport"] == gone.port() && h["failure"] == "refused"),
        "{failed:#?}"
    );
    assert!(failed.iter().all(|h| !h["failure"].is_null()));
    let one = history(&["--cookie", &h["cookie"].to_string()]);
    assert_eq!(one.len(), 1);
    let text = Command::new(netwatch_bin())
        .args(["history", "--socket", socket_arg(&agent), "--cookie", &h["cookie"].to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("SYN_SENT") && text.contains("-> ESTABLISHED") && text.contains("sent=4B"),
        "{text}"
    );
    assert!(agent.stop().success());
}

/// One round trip from a test namespace to a sockpeer server in another, whose namespace
/// drops the first packet carrying TCP flag `flag` (`syn`, `psh`) that the client sends, so
/// that the client retransmits it. The client's namespace is then deleted, which ends its
/// socket's TIME_WAIT. Returns that namespace's inode, the server's namespace (alive for as
/// long as the caller keeps it) and the server's port.
fn round_trip_dropping_first(flag: &str) -> (u64, NetNs, u16) {
    let (client_ns, server_ns) = veth_pair();
    let sockpeer = env!("CARGO_BIN_EXE_sockpeer");
    let (mut server, line) = sockpeer_in(&server_ns, sockpeer, &["serve", "10.231.0.2:0"]);
    let port = listening_port(&line);
    server_ns.drop_first(port, flag);
    let (mut client, line) =
        sockpeer_in(&client_ns, sockpeer, &["connect", &format!("10.231.0.2:{port}")]);
    assert!(line.starts_with("local 10.231.0.1:"), "{line}");
    assert!(client.wait().unwrap().success() && server.wait().unwrap().success());
    let client_netns = client_ns.inode();
    drop(client_ns);
    (client_netns, server_ns, port)
}

/// A connect between two test namespaces whose first SYN is dropped (nftables in the server's
/// namespace) is retransmitted after the initial RTO of one second: `stats` and `history`
/// measure a handshake of about that long, and both ends' histories add up.
#[test]
fn connect_latency_counts_a_retransmitted_syn() {
    let agent = Agent::start(&Agent::test_socket("latency"));
    let (client_netns, server_ns, port) = round_trip_dropping_first("syn");

    let stats = agent.ask_json("stats", &[]);
    let remote = format!("10.231.0.2:{port}");
    let summary = stats["by_remote"].as_array().unwrap().iter().find(|r| r["key"] == *remote);
    let summary = summary.unwrap_or_else(|| {
        panic!("no summary for {remote}: {stats:#}\nagent: {}", agent.stderr.lock().unwrap())
    });
    assert_eq!(summary["connects"], 1, "{summary}");
    let max_ms = summary["max_ms"].as_f64().unwrap();
    assert!((950.0..2000.0).contains(&max_ms), "one SYN retransmission takes ~1 s: {summary}");

    let dport = format!(":{port}");
    let clients = agent.ask_json("history", &["--closed", "dport", "=", &dport]);
    let [client_history] = clients.as_array().unwrap().as_slice() else {
        panic!("one client connection to {port}: {clients:#}")
    };
    let steps = client_history["steps"].as_array().unwrap();
    assert_eq!(
        (steps[0]["old"].as_str(), steps[0]["new"].as_str()),
        (Some("CLOSE"), Some("SYN_SENT"))
    );
    let handshake = &steps[1];
    assert_eq!(
        (handshake["old"].as_str(), handshake["new"].as_str()),
        (Some("SYN_SENT"), Some("ESTABLISHED"))
    );
    let syn_sent_ms = handshake["duration_ns"].as_f64().unwrap() / 1e6;
    assert!((950.0..2000.0).contains(&syn_sent_ms), "{client_history:#}");
    assert_eq!(steps.last().unwrap()["new"], "CLOSE");
    let spent: u64 = steps.iter().map(|s| s["duration_ns"].as_u64().unwrap()).sum();
    assert_eq!(client_history["lifespan_ns"].as_u64(), Some(spent), "{client_history:#}");
    assert_eq!(client_history["netns"].as_u64(), Some(client_netns), "{client_history:#}");

    let sport = format!(":{port}");
    let servers = agent.ask_json("history", &["--closed", "sport", "=", &sport]);
    let served: Vec<&Value> = servers
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["netns"].as_u64() == Some(server_ns.inode()))
        .collect();
    assert!(
        served
            .iter()
            .any(|h| h["steps"][0]["old"] == "LISTEN" && h["steps"][0]["new"] == "SYN_RECV"),
        "the accepted end's history starts at its listener: {servers:#}"
    );
    assert!(agent.stop().success());
}

/// A data segment dropped once (nftables in the server's namespace) is sent again: the
/// retransmission is counted live for the connection (`tcp_retransmit_skb`), in its history
/// and per remote endpoint, and agrees with the kernel's count at close.
#[test]
fn a_dropped_segment_is_counted_as_a_retransmit() {
    let agent = Agent::start(&Agent::test_socket("retransmit"));
    let (_, _server_ns, port) = round_trip_dropping_first("psh");

    let dport = format!(":{port}");
    let clients = agent.ask_json("history", &["--closed", "dport", "=", &dport]);
    let [h] = clients.as_array().unwrap().as_slice() else {
        panic!("one client connection to {port}: {clients:#}")
    };
    let seen = h["retransmits_seen"].as_u64().unwrap();
    assert!(seen >= 1, "{h:#}");
    assert_eq!(h["retransmits"].as_u64(), Some(seen), "the kernel's count at close: {h:#}");
    assert_eq!((h["bytes_sent"].as_u64(), h["bytes_received"].as_u64()), (Some(4), Some(4)));

    let stats = agent.ask_json("stats", &[]);
    let remote = format!("10.231.0.2:{port}");
    let summary = stats["by_remote"].as_array().unwrap().iter().find(|r| r["key"] == *remote);
    assert_eq!(summary.unwrap()["retransmits"].as_u64(), Some(seen), "{stats:#}");
    assert!(agent.stop().success());
}

/// `netwatch stats` shows each listener's accept queue as counted from events, next to the
/// kernel's (ss's Recv-Q), and its half-open connections when the handshake's last ACK is
/// lost: the server retransmits its SYN-ACK.
#[test]
fn listeners_show_their_accept_queue_and_half_open_connections() {
    let agent = Agent::start(&Agent::test_socket("listeners"));
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let clients: Vec<std::net::TcpStream> =
        (0..3).map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    thread::sleep(Duration::from_millis(100));
    let (_accepted, _) = listener.accept().unwrap();

    let (client_ns, server_ns) = veth_pair();
    let sockpeer = env!("CARGO_BIN_EXE_sockpeer");
    let (mut server, line) = sockpeer_in(&server_ns, sockpeer, &["serve", "10.231.0.2:0"]);
    let half_open_port = listening_port(&line);
    server_ns.drop_bare_acks(half_open_port);
    let (mut client, line) = sockpeer_in(
        &client_ns,
        sockpeer,
        &["connect-hold", &format!("10.231.0.2:{half_open_port}")],
    );
    assert!(line.starts_with("ready "), "{line}");
    // The server's first SYN-ACK retransmission comes after its initial RTO of one second.
    let deadline = Instant::now() + netwatch_tests::PATIENCE;
    let stats = loop {
        let stats = agent.ask_json("stats", &[]);
        let retransmitted = stats["listeners"].as_array().unwrap().iter().any(|l| {
            l["lport"] == half_open_port && l["synack_retransmits"].as_u64().unwrap() >= 1
        });
        if retransmitted || Instant::now() > deadline {
            break stats;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let find = |port: u16| {
        stats["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["lport"] == port)
            .cloned()
            .unwrap_or_else(|| panic!("no listener on {port}: {stats:#}"))
    };
    let local = find(port);
    let ss = Command::new("ss").args(["-Hltn", &format!("sport = :{port}")]).output().unwrap();
    let ss = String::from_utf8_lossy(&ss.stdout);
    let ss_recv_q: u64 = ss.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(ss_recv_q, 2, "{ss}");
    assert_eq!(local["accept_queue"].as_u64(), Some(ss_recv_q), "{local:#}");
    assert_eq!(local["queued"].as_u64(), Some(ss_recv_q), "counted from events: {local:#}");
    assert_eq!(
        (local["handshakes"].as_u64(), local["accepted"].as_u64(), local["peak_queued"].as_u64()),
        (Some(3), Some(1), Some(3)),
        "{local:#}"
    );
    assert_eq!(local["pid"].as_u64(), Some(u64::from(std::process::id())));

    let half = find(half_open_port);
    assert_eq!(half["netns"].as_u64(), Some(server_ns.inode()), "{half:#}");
    assert_eq!(half["half_open"].as_u64(), Some(1), "{half:#}");
    assert!(half["synack_retransmits"].as_u64().unwrap() >= 1, "{half:#}");
    assert_eq!(half["handshakes"].as_u64(), Some(0), "{half:#}");
    let text = Command::new(netwatch_bin())
        .args(["stats", "--socket", socket_arg(&agent)])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("HALF_OPEN"));

    drop(clients);
    drop(client.stdin.take());
    let _ = client.kill();
    let _ = server.kill();
    let _ = (client.wait(), server.wait());
    assert!(agent.stop().success());
}
