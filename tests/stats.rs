//! What the agent keeps from the stream, asked after the fact: `netwatch stats` (handshake
//! latency, failures, listeners' queues), `--metrics`, and `netwatch history`, each against
//! traffic the test makes in namespaces of its own.
//! A failed unwrap is how a test reports a missing field.
#![allow(clippy::unwrap_used)]

use std::{
    net::{Ipv4Addr, TcpListener, TcpStream},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use netwatch_tests::{
    Agent, NetNs, client_roundtrip, ftrace_forbidden, listening_port, netwatch_bin,
    oracle::settled_rows, serve_one, sockpeer_in, veth_pair,
};
use serde_json::Value;

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
        .args(["stats", "--json", "--socket", agent.socket_arg()])
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
        .args(["stats", "--socket", agent.socket_arg()])
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
            .args(["history", "--json", "--socket", agent.socket_arg()])
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
        .args(["history", "--socket", agent.socket_arg(), "--cookie", &h["cookie"].to_string()])
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
    // The handshake's completion runs in softirq; if it interrupts a run of the same program
    // on its CPU the kernel skips it, and netwatch reports the loss. Only then is the round
    // trip made once more.
    let (agent, client_netns, server_ns, port, stats) = (1..=2)
        .find_map(|attempt| {
            let agent = Agent::start(&Agent::test_socket("latency"));
            let (client_netns, server_ns, port) = round_trip_dropping_first("syn");
            let stats = agent.ask_json("stats", &[]);
            let counted = stats["by_remote"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["key"] == format!("10.231.0.2:{port}").as_str());
            let lost = agent.stderr.lock().unwrap().contains("events were lost");
            if !counted && lost && attempt == 1 {
                eprintln!("the kernel lost events (reported); trying again");
                return None;
            }
            Some((agent, client_netns, server_ns, port, stats))
        })
        .unwrap();
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
        .args(["stats", "--socket", agent.socket_arg()])
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

/// Two processes listening on one address with SO_REUSEPORT: the kernel spreads new
/// connections between them, and stats counts each listener's own, as ss shows their queues.
#[test]
fn reuseport_listeners_are_counted_apart() {
    let agent = Agent::start(&Agent::test_socket("reuseport"));
    let ns = NetNs::new("reuse");
    let sockpeer = env!("CARGO_BIN_EXE_sockpeer");
    let (mut first, _) = sockpeer_in(&ns, sockpeer, &["listen-shared", "127.0.0.1:7008"]);
    let (mut second, _) = sockpeer_in(&ns, sockpeer, &["listen-shared", "127.0.0.1:7008"]);
    // Connections from many ports, so that both listeners get some (the kernel hashes the
    // 4-tuple); none is accepted.
    let clients: Vec<TcpStream> =
        ns.run(|| (0..6).map(|_| TcpStream::connect(("127.0.0.1", 7008)).unwrap()).collect());
    settled_rows(&agent, &ns);
    // ss: each listener's accept queue (Recv-Q).
    let ss = ns.command("ss").args(["-Hltn", "sport", "=", ":7008"]).output().unwrap();
    let mut kernel_queues: Vec<u64> = String::from_utf8_lossy(&ss.stdout)
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(kernel_queues.len(), 2, "two listeners: {kernel_queues:?}");
    let stats = agent.ask_json("stats", &[]);
    let ours: Vec<&Value> =
        stats["listeners"].as_array().unwrap().iter().filter(|l| l["lport"] == 7008).collect();
    assert_eq!(ours.len(), 2, "one row per listener: {stats:#}");
    // Each listener's own queue, as the kernel reports it, whichever way the events went.
    let mut queues: Vec<u64> = ours.iter().map(|l| l["accept_queue"].as_u64().unwrap()).collect();
    queues.sort_unstable();
    kernel_queues.sort_unstable();
    assert_eq!(queues, kernel_queues, "{stats:#}");
    let mut pids: Vec<u64> = ours.iter().map(|l| l["pid"].as_u64().unwrap()).collect();
    pids.sort_unstable();
    let mut expected = vec![u64::from(first.id()), u64::from(second.id())];
    expected.sort_unstable();
    assert_eq!(pids, expected, "each listener's own process");
    let queued: u64 = ours.iter().map(|l| l["queued"].as_u64().unwrap()).sum();
    assert_eq!(queued, 6, "{stats:#}");
    // Which listener took each connection comes from fexit/inet_csk_clone_lock, which a
    // machine that forbids ftrace refuses (netwatch check says so); the matrix's kernels
    // allow it.
    if !ftrace_forbidden() {
        for listener in &ours {
            // What netwatch counted from events is what the kernel's queue holds.
            assert_eq!(listener["queued"], listener["accept_queue"], "{listener}");
            assert!(listener["peak_queued"].as_u64() <= listener["backlog"].as_u64());
        }
    }
    drop(clients);
    for child in [&mut first, &mut second] {
        drop(child.stdin.take());
        child.wait().unwrap();
    }
    assert!(agent.stop().success());
}
