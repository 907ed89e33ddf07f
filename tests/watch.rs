//! `netwatch watch` against the real kernel: exact transition sequences with their fields,
//! ownership by a separate process, network namespaces, JSON/text agreement, filters, loss
//! reporting, the classic-tracepoint fallback, and clean exits.
// A failed unwrap is how a test reports a missing field.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use netwatch_tests::{
    NetNs, PATIENCE, Watcher, client_roundtrip, netwatch_bin, own_comm, pairs, parse_json, path,
    require_root, serve_one, transitions_between, veth_pair,
};
use serde_json::Value;

const CLIENT_PATH: [(&str, &str); 5] = [
    ("CLOSE", "SYN_SENT"),
    ("SYN_SENT", "ESTABLISHED"),
    ("ESTABLISHED", "FIN_WAIT1"),
    ("FIN_WAIT1", "FIN_WAIT2"),
    // The full socket's CLOSE leaves a timewait socket, which the stream follows.
    ("FIN_WAIT2", "TIME_WAIT"),
];
const SERVER_PATH: [(&str, &str); 5] = [
    ("LISTEN", "SYN_RECV"),
    ("SYN_RECV", "ESTABLISHED"),
    ("ESTABLISHED", "CLOSE_WAIT"),
    ("CLOSE_WAIT", "LAST_ACK"),
    ("LAST_ACK", "CLOSE"),
];

fn sockpeer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sockpeer"))
}

/// One connection: a listener in this process, the client either here or in `client`.
struct Exchange {
    server_port: u16,
    client_port: u16,
}

fn exchange_in_process(listen_on: SocketAddr) -> Exchange {
    let listener = TcpListener::bind(listen_on).expect("bind");
    let server_addr = listener.local_addr().expect("local addr");
    let server = thread::spawn(move || serve_one(&listener).expect("serve"));
    let client = client_roundtrip(server_addr).expect("client round trip");
    server.join().expect("server thread");
    Exchange { server_port: server_addr.port(), client_port: client.port() }
}

fn is_done(lines: &[String], lport: u16, rport: u16, last: (&str, &str)) -> bool {
    let records: Vec<Value> = lines.iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
    transitions_between(&records, lport, rport)
        .iter()
        .any(|r| r["old"] == last.0 && r["new"] == last.1)
}

/// Waits for the client's last transition of `CLIENT_PATH` and the server's CLOSE, and
/// returns the records.
fn finish(watcher: Watcher, exchange: &Exchange) -> Vec<Value> {
    finish_with(watcher, exchange, CLIENT_PATH[CLIENT_PATH.len() - 1])
}

fn finish_with(watcher: Watcher, exchange: &Exchange, client_last: (&str, &str)) -> Vec<Value> {
    let (s, c) = (exchange.server_port, exchange.client_port);
    watcher.wait_until("the client's last transition and the server's CLOSE", |lines| {
        is_done(lines, c, s, client_last) && is_done(lines, s, c, ("LAST_ACK", "CLOSE"))
    });
    parse_json(&watcher.stop())
}

/// Durations are present where netwatch saw the old state begin, never negative, and each
/// is exactly the gap between consecutive transitions of the socket.
fn assert_durations_add_up(records: &[Value], first_has_duration: bool) {
    let first = &records[0];
    assert_eq!(!first["duration_ns"].is_null(), first_has_duration, "first transition: {first}");
    for pair in records.windows(2) {
        let gap = pair[1]["mono_ns"].as_u64().unwrap() - pair[0]["mono_ns"].as_u64().unwrap();
        assert_eq!(pair[1]["duration_ns"].as_u64(), Some(gap), "{}", pair[1]);
        let ms = pair[1]["duration_ms"].as_f64().unwrap();
        assert!((ms * 1e6 - gap as f64).abs() < 1.0, "{}", pair[1]);
    }
    let total: u64 = records[1..].iter().map(|r| r["duration_ns"].as_u64().unwrap()).sum();
    let span =
        records.last().unwrap()["mono_ns"].as_u64().unwrap() - first["mono_ns"].as_u64().unwrap();
    assert_eq!(total, span, "durations add up to the socket's lifespan after its first transition");
}

fn check_open_close(listen_on: SocketAddr, family: &str) {
    require_root();
    let watcher = Watcher::start(&["--json"]);
    let ns = NetNs::new(&format!("openclose{family}"));
    let exchange = ns.run(move || exchange_in_process(listen_on));
    let records = finish(watcher, &exchange);
    let (s, c) = (exchange.server_port, exchange.client_port);
    let ip = listen_on.ip().to_string();

    let client = transitions_between(&records, c, s);
    assert_eq!(path(&client), pairs(&CLIENT_PATH), "client transitions: {client:#?}");
    let server = transitions_between(&records, s, c);
    assert_eq!(path(&server), pairs(&SERVER_PATH), "server transitions: {server:#?}");

    let me = std::process::id();
    for record in client.iter().chain(&server) {
        assert_eq!(record["family"], family);
        assert_eq!((record["laddr"].as_str(), record["raddr"].as_str()), (Some(&*ip), Some(&*ip)));
        assert_eq!(record["source"], "tp_btf");
        assert!(record["cookie"].as_u64().is_some_and(|c| c != 0), "{record}");
        // Both ends live in this process: every transition is owned by it, never by the
        // task that happened to be on the CPU.
        assert_eq!(record["pid"], me, "{record}");
        assert_eq!(record["comm"], own_comm(), "the process name, not the thread's: {record}");
    }
    let cookie = client[0]["cookie"].clone();
    assert!(client.iter().all(|r| r["cookie"] == cookie), "one cookie for the client socket");
    // The first transition of an actively opened socket counts from its creation.
    assert_durations_add_up(&client, true);
    // The accepted socket is born in LISTEN->SYN_RECV: there is no earlier state of its own.
    assert_durations_add_up(&server, false);
}

#[test]
fn ipv4_loopback_open_and_close() {
    check_open_close((Ipv4Addr::LOCALHOST, 0).into(), "ipv4");
}

#[test]
fn ipv6_loopback_open_and_close() {
    check_open_close((Ipv6Addr::LOCALHOST, 0).into(), "ipv6");
}

#[test]
fn refused_connect_and_listener_lifecycle() {
    require_root();
    let watcher = Watcher::start(&["--json"]);
    // In a namespace of the test's own: nothing else can take the port once it is free.
    let ns = NetNs::new("refused");
    let port = ns.run(|| {
        // std's bind() also listens: CLOSE->LISTEN, then LISTEN->CLOSE when dropped.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let error = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect_err("nothing listens");
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
        port
    });
    watcher.wait_until("the refused connect", |lines| {
        lines
            .iter()
            .any(|l| l.contains(&format!("\"rport\":{port}")) && l.contains("\"new\":\"CLOSE\""))
    });
    let records = parse_json(&watcher.stop());

    let listens: Vec<_> =
        records.iter().filter(|r| r["lport"] == port && r["rport"] == 0).collect();
    assert_eq!(
        path(&listens.into_iter().cloned().collect::<Vec<_>>()),
        pairs(&[("CLOSE", "LISTEN"), ("LISTEN", "CLOSE")])
    );
    let attempt: Vec<Value> = records.iter().filter(|r| r["rport"] == port).cloned().collect();
    assert_eq!(path(&attempt), pairs(&[("CLOSE", "SYN_SENT"), ("SYN_SENT", "CLOSE")]));
    let client_port = attempt[0]["lport"].as_u64().unwrap();
    assert_ne!(client_port, 0, "SYN_SENT carries the local port the kernel picked");
    assert_eq!(attempt[1]["lport"].as_u64(), Some(client_port));
    assert_eq!(attempt[0]["pid"], std::process::id());
    assert_eq!(attempt[1]["pid"], std::process::id(), "the RST runs in softirq; owner is kept");
    assert_eq!(attempt[1]["failure"], "refused", "{}", attempt[1]);
    assert_durations_add_up(&attempt, true);
}

#[test]
fn client_in_a_separate_process_owns_its_socket() {
    let watcher = Watcher::start(&["--json"]);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let server_addr = listener.local_addr().expect("addr");
    let server = thread::spawn(move || serve_one(&listener).expect("serve"));
    let child =
        sockpeer().args(["connect", &server_addr.to_string()]).output().expect("run sockpeer");
    assert!(child.status.success(), "sockpeer: {}", String::from_utf8_lossy(&child.stderr));
    let client_addr: SocketAddr = String::from_utf8_lossy(&child.stdout)
        .trim()
        .strip_prefix("local ")
        .and_then(|a| a.parse().ok())
        .expect("sockpeer prints its local address");
    server.join().expect("server");
    let exchange = Exchange { server_port: server_addr.port(), client_port: client_addr.port() };
    let records = finish(watcher, &exchange);

    let client = transitions_between(&records, exchange.client_port, exchange.server_port);
    assert_eq!(path(&client), pairs(&CLIENT_PATH));
    let syn_sent = &client[0];
    let child_pid = syn_sent["pid"].as_u64().expect("owner pid");
    assert_ne!(child_pid, u64::from(std::process::id()), "the client is another process");
    assert_eq!(syn_sent["comm"], "sockpeer");
    assert_eq!(syn_sent["task_pid"], child_pid, "connect() runs in the client's own task");
    for record in &client {
        assert_eq!(
            (record["pid"].as_u64(), record["comm"].as_str()),
            (Some(child_pid), Some("sockpeer"))
        );
    }
    // The server side belongs to this process throughout, even on transitions that ran
    // while the client was on the CPU (loopback delivers in the sender's context).
    let server = transitions_between(&records, exchange.server_port, exchange.client_port);
    assert_eq!(path(&server), pairs(&SERVER_PATH));
    for record in &server {
        assert_eq!(record["pid"], std::process::id(), "{record}");
        assert_ne!(record["comm"], "sockpeer");
    }
}

/// A pre-forking server that was listening before netwatch started: the snapshot at start
/// names both processes holding the listener, and a new connection belongs to the first
/// (the parent) until the child's accept(2) takes it - from then on, including softirq
/// transitions such as the client's FIN making it CLOSE_WAIT, it shows the child.
#[test]
fn accepting_process_owns_the_accepted_socket() {
    let mut server = sockpeer()
        .args(["serve-forked", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("sockpeer serve-forked");
    let mut ready = String::new();
    BufReader::new(server.stdout.take().expect("stdout")).read_line(&mut ready).expect("ready");
    let words: Vec<&str> = ready.split_whitespace().collect();
    let ["listening", port, "parent", parent, "child", child] = words[..] else {
        panic!("unexpected: {ready}")
    };
    let (port, parent, child): (u16, u64, u64) =
        (port.parse().unwrap(), parent.parse().unwrap(), child.parse().unwrap());
    assert!(parent < child, "pids in creation order (the first holder is the parent)");
    let watcher = Watcher::start(&["--json", "--port", &port.to_string()]);
    let client = client_roundtrip((Ipv4Addr::LOCALHOST, port).into()).expect("client");
    assert!(server.wait().expect("server").success());
    let records = finish(watcher, &Exchange { server_port: port, client_port: client.port() });

    let accepted = transitions_between(&records, port, client.port());
    assert_eq!(path(&accepted), pairs(&SERVER_PATH));
    // Before accept(): the listener's first holder, never the client that was on the CPU.
    for early in &accepted[..2] {
        assert_eq!(
            (early["pid"].as_u64(), early["comm"].as_str()),
            (Some(parent), Some("sockpeer")),
            "{early}"
        );
    }
    for later in &accepted[2..] {
        assert_eq!(
            (later["pid"].as_u64(), later["comm"].as_str()),
            (Some(child), Some("sockpeer")),
            "{later}"
        );
    }
    assert_eq!(accepted[2]["old"], "ESTABLISHED");
    assert_eq!(
        accepted[2]["task_pid"],
        std::process::id(),
        "CLOSE_WAIT ran while the client was on the CPU"
    );
}

#[test]
fn connection_between_network_namespaces() {
    require_root();
    let (a, b): (NetNs, NetNs) = veth_pair();
    let watcher = Watcher::start(&["--json", "--port", "7411"]);
    let mut server = a
        .command(env!("CARGO_BIN_EXE_sockpeer"))
        .args(["serve", "10.231.0.1:7411"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("server in netns a");
    let mut ready = String::new();
    BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut ready)
        .expect("server ready");
    assert_eq!(ready.trim(), "listening 7411");
    let client = b
        .command(env!("CARGO_BIN_EXE_sockpeer"))
        .args(["connect", "10.231.0.1:7411"])
        .output()
        .expect("client in netns b");
    assert!(client.status.success(), "client: {}", String::from_utf8_lossy(&client.stderr));
    assert!(server.wait().expect("server").success());
    let client_port: u16 = String::from_utf8_lossy(&client.stdout)
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("client port");
    let records = finish(watcher, &Exchange { server_port: 7411, client_port });

    let client = transitions_between(&records, client_port, 7411);
    assert_eq!(path(&client), pairs(&CLIENT_PATH));
    let server = transitions_between(&records, 7411, client_port);
    assert_eq!(path(&server), pairs(&SERVER_PATH));
    for r in &client {
        assert_eq!(
            (r["laddr"].as_str(), r["raddr"].as_str()),
            (Some("10.231.0.2"), Some("10.231.0.1"))
        );
        assert_eq!(r["netns"], b.inode(), "client socket lives in namespace b");
        assert_eq!(r["comm"], "sockpeer");
    }
    for r in &server {
        assert_eq!(r["netns"], a.inode(), "server socket lives in namespace a");
        assert_eq!(r["comm"], "sockpeer");
    }
    let listen: Vec<Value> =
        records.iter().filter(|r| r["lport"] == 7411 && r["rport"] == 0).cloned().collect();
    assert_eq!(path(&listen), pairs(&[("CLOSE", "LISTEN"), ("LISTEN", "CLOSE")]));
    assert_ne!(server[0]["pid"], client[0]["pid"], "two processes, two owners");
    assert_eq!(
        server[0]["pid"], listen[0]["pid"],
        "the accepted socket belongs to the listener's owner"
    );
}

/// Text and JSON are two renderings of the same transitions.
#[test]
fn text_and_json_show_the_same_transitions() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let port = listener.local_addr().expect("addr").port().to_string();
    let text = Watcher::start(&["--port", &port]);
    let json = Watcher::start(&["--port", &port, "--json"]);
    let server = thread::spawn(move || serve_one(&listener).expect("serve"));
    let client =
        client_roundtrip(format!("127.0.0.1:{port}").parse().expect("addr")).expect("client");
    server.join().expect("server");
    // Header, five transitions a side, and LISTEN->CLOSE when the server thread drops the
    // listener (it started listening before netwatch did).
    let expected_lines = 1 + 10 + 1;
    text.wait_until("eleven transitions as text", |lines| lines.len() >= expected_lines);
    json.wait_until("eleven transitions as JSON", |lines| lines.len() >= expected_lines - 1);
    let text_lines = text.stop();
    let records = parse_json(&json.stop());

    assert!(
        text_lines[0].starts_with("TIME") && text_lines[0].contains("OLD"),
        "header: {}",
        text_lines[0]
    );
    assert_eq!(text_lines.len(), expected_lines, "{text_lines:#?}");
    assert_eq!(records.len(), expected_lines - 1);
    // Two instances each stamp events with their own program run, microseconds apart natively
    // (about a millisecond under the matrix's emulated CPUs): the fields must agree exactly,
    // the durations to a few milliseconds.
    // IPv4 ends, as ss writes them: port 0 is `*`.
    let end = |addr: &Value, port: &Value| match port.as_u64() {
        Some(0) => format!("{}:*", addr.as_str().unwrap()),
        _ => format!("{}:{port}", addr.as_str().unwrap()),
    };
    for (line, record) in text_lines[1..].iter().zip(&records) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let expected = [
            record["pid"].as_u64().map_or("-".into(), |pid| pid.to_string()),
            record["comm"].as_str().unwrap_or("-").to_string(),
            end(&record["laddr"], &record["lport"]),
            end(&record["raddr"], &record["rport"]),
            record["old"].as_str().unwrap().to_string(),
            "->".to_string(),
            record["new"].as_str().unwrap().to_string(),
        ];
        assert_eq!(fields[1..8], expected, "text line {line} vs {record}");
        match (fields[8], record["duration_ms"].as_f64()) {
            ("-", None) => {}
            (text_ms, Some(json_ms)) => {
                let text_ms: f64 = text_ms.parse().expect("ms is a number");
                assert!((text_ms - json_ms).abs() < 5.0, "text line {line} vs {record}");
            }
            (text_ms, None) => panic!("text has {text_ms} ms where JSON has null: {line}"),
        }
        let time = record["time"].as_str().unwrap();
        assert!(
            time.ends_with('Z') && time.len() == "2026-01-01T00:00:00.000000000Z".len(),
            "{time}"
        );
    }
    assert!(records.iter().any(|r| r["lport"] == client.port()));
}

#[test]
fn filters_select_exactly_the_expected_lines() {
    require_root();
    // A namespace of the test's own: only its traffic uses the port, in either family.
    let ns = NetNs::new("filters");
    let (v4, v6, port) = ns.run(|| {
        let v4 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind v4");
        let port = v4.local_addr().expect("addr").port();
        let v6 = TcpListener::bind((Ipv6Addr::LOCALHOST, port)).expect("bind v6 on the same port");
        (v4, v6, port)
    });
    let p = port.to_string();
    let me = std::process::id().to_string();
    let all = Watcher::start(&["--json", "--port", &p]);
    let filtered: Vec<(Vec<&str>, Watcher)> = [
        vec!["--transition", "SYN_SENT:ESTABLISHED"],
        vec!["--state", "close_wait"],
        vec!["--sport", &p],
        vec!["--dport", &p],
        vec!["-6"],
        vec!["-4", "--state", "FIN_WAIT2"],
        vec!["--comm", "sockpeer"],
        vec!["--pid", &me],
    ]
    .into_iter()
    .map(|extra| {
        let mut args = vec!["--json", "--port", &p];
        args.extend(&extra);
        (extra, Watcher::start(&args))
    })
    .collect();

    let v4_server = thread::spawn(move || serve_one(&v4).expect("serve v4"));
    let child = ns
        .command(env!("CARGO_BIN_EXE_sockpeer"))
        .args(["connect", &format!("127.0.0.1:{port}")])
        .output()
        .expect("sockpeer");
    assert!(child.status.success());
    v4_server.join().expect("v4 server");
    let v6_server = thread::spawn(move || serve_one(&v6).expect("serve v6"));
    let v6_client = format!("[::1]:{port}").parse().expect("addr");
    ns.run(move || client_roundtrip(v6_client).expect("v6 client"));
    v6_server.join().expect("v6 server");

    all.wait_until("22 transitions", |lines| lines.len() >= 22);
    let everything = parse_json(&all.stop());
    assert_eq!(everything.len(), 22, "two connections of ten transitions, two listeners closed");
    let pick = |keep: &dyn Fn(&Value) -> bool| -> Vec<Value> {
        everything.iter().filter(|r| keep(r)).cloned().collect()
    };
    let is = |r: &Value, field: &str, value: &str| r[field].as_str() == Some(value);
    let expected: Vec<Vec<Value>> = vec![
        pick(&|r| is(r, "old", "SYN_SENT") && is(r, "new", "ESTABLISHED")),
        pick(&|r| is(r, "old", "CLOSE_WAIT") || is(r, "new", "CLOSE_WAIT")),
        pick(&|r| r["lport"] == port),
        pick(&|r| r["rport"] == port),
        pick(&|r| is(r, "family", "ipv6")),
        pick(&|r| {
            is(r, "family", "ipv4") && (is(r, "old", "FIN_WAIT2") || is(r, "new", "FIN_WAIT2"))
        }),
        pick(&|r| is(r, "comm", "sockpeer")),
        pick(&|r| r["pid"].as_u64() == Some(u64::from(std::process::id()))),
    ];
    for ((args, watcher), expected) in filtered.into_iter().zip(expected) {
        assert!(!expected.is_empty(), "{args:?} must select something to be a real check");
        let got = parse_json(&watcher.stop());
        let key = |r: &Value| (r["cookie"].clone(), r["old"].clone(), r["new"].clone());
        assert_eq!(
            got.iter().map(key).collect::<Vec<_>>(),
            expected.iter().map(key).collect::<Vec<_>>(),
            "filter {args:?}"
        );
    }
}

#[test]
fn classic_tracepoint_fallback_keys_by_address() {
    let watcher = Watcher::start(&["--json", "--source", "classic"]);
    assert!(
        watcher.stderr().contains("tracepoint sock:inet_sock_set_state"),
        "says which source: {}",
        watcher.stderr()
    );
    let ns = NetNs::new("classic");
    let exchange = ns.run(|| exchange_in_process((Ipv4Addr::LOCALHOST, 0).into()));
    // Without a cookie a timewait socket cannot be told for the closed one: the stream says
    // what the kernel reported.
    let records = finish_with(watcher, &exchange, ("FIN_WAIT2", "CLOSE"));
    let (s, c) = (exchange.server_port, exchange.client_port);
    // The classic record's sport is read before the kernel picks the port: SYN_SENT has 0.
    let mut client = transitions_between(&records, c, s);
    let syn_sent: Vec<Value> = transitions_between(&records, 0, s);
    assert_eq!(path(&syn_sent), pairs(&[("CLOSE", "SYN_SENT")]));
    client.insert(0, syn_sent[0].clone());
    let mut classic_path = CLIENT_PATH;
    classic_path[4] = ("FIN_WAIT2", "CLOSE");
    assert_eq!(path(&client), pairs(&classic_path));
    let server = transitions_between(&records, s, c);
    assert_eq!(path(&server), pairs(&SERVER_PATH));
    for r in client.iter().chain(&server) {
        assert_eq!(r["source"], "tracepoint");
        assert!(r["cookie"].is_null(), "no cookie without BTF: {r}");
    }
    assert!(client.iter().all(|r| r["skaddr"] == client[0]["skaddr"]), "one socket address");
    assert_durations_add_up(&client[1..], true);
    assert_durations_add_up(&server, false);
}

#[test]
fn lost_events_are_reported_in_the_stream() {
    // The smallest ring (one page) and a stopped reader: the kernel must drop and count.
    let watcher = Watcher::start(&["--json", "--ring-size", "4096", "--port", "1"]);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(watcher.pid() as i32, libc::SIGSTOP) };
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let addr = listener.local_addr().expect("addr");
    for _ in 0..100 {
        let client = TcpStream::connect(addr).expect("connect while netwatch is stopped");
        let (server, _) = listener.accept().expect("accept");
        drop(client);
        drop(server);
    }
    // SAFETY: as above.
    unsafe { libc::kill(watcher.pid() as i32, libc::SIGCONT) };
    watcher
        .wait_until("a lost record", |lines| lines.iter().any(|l| l.contains("\"type\":\"lost\"")));
    let records = parse_json(&watcher.stop());
    let lost: Vec<&Value> = records.iter().filter(|r| r["type"] == "lost").collect();
    assert_eq!(lost[0]["reason"], "ring_buffer_full");
    let counted: u64 = lost
        .iter()
        .filter(|r| r["reason"] == "ring_buffer_full")
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    let last_total =
        lost.iter().rev().find(|r| r["reason"] == "ring_buffer_full").unwrap()["total"]
            .as_u64()
            .unwrap();
    assert!(counted > 0);
    assert_eq!(counted, last_total, "each report counts what is new since the previous one");
    // 100 connections make well over 1000 records; a 4 KiB ring holds about 40.
    assert!(counted > 500, "lost {counted}");
}

#[test]
fn sigint_and_broken_pipe_end_cleanly() {
    let watcher = Watcher::start(&["--port", "9"]);
    let (status, lines) = watcher.stop_with(libc::SIGINT);
    assert!(status.success(), "Ctrl-C exits 0: {status}");
    assert_eq!(lines.len(), 1, "just the header: {lines:?}");

    // `netwatch | head -1`: once the reader is gone the next write fails with EPIPE.
    require_root();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut child = Command::new(netwatch_bin())
        .args(["--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 4];
    stdout.read_exact(&mut first).expect("header");
    drop(stdout);
    let deadline = std::time::Instant::now() + PATIENCE;
    let status = loop {
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        drop(listener.accept().expect("accept"));
        drop(client);
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "netwatch kept running with no reader");
        thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("stderr");
    assert!(status.success(), "broken pipe is not an error: {status}, stderr: {stderr}");
}

/// A connection's CLOSE transition carries its lifespan and payload totals, read from the
/// socket as it closed: what each side wrote and read, not counting SYN, FIN or
/// retransmissions twice. The client, which closes first, carries them through TIME_WAIT
/// to its end, here the deletion of its namespace.
#[test]
fn close_carries_lifespan_and_byte_totals() {
    use std::io::{Read as _, Write as _};
    require_root();
    let ns = NetNs::new("totals");
    let listener = ns.run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind"));
    let port = listener.local_addr().expect("addr").port();
    let watcher = Watcher::start(&["--json", "--no-agent", "--port", &port.to_string()]);
    let client_port = ns.run(move || {
        let server = thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut request = vec![0u8; 10_000];
            stream.read_exact(&mut request).expect("read 10000");
            stream.write_all(&[7u8; 2_500]).expect("write 2500");
            stream.read_to_end(&mut Vec::new()).expect("read to EOF");
        });
        let mut client = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect");
        let client_port = client.local_addr().expect("addr").port();
        client.write_all(&[1u8; 10_000]).expect("write 10000");
        let mut reply = vec![0u8; 2_500];
        client.read_exact(&mut reply).expect("read 2500");
        drop(client);
        server.join().expect("server");
        client_port
    });
    let exchange = Exchange { server_port: port, client_port };
    watcher.wait_until("the client in TIME_WAIT", |lines| {
        is_done(lines, client_port, port, ("FIN_WAIT2", "TIME_WAIT"))
    });
    drop(ns);
    let records = finish_with(watcher, &exchange, ("TIME_WAIT", "CLOSE"));

    for (lport, rport, sent, received) in
        [(client_port, port, 10_000, 2_500), (port, client_port, 2_500, 10_000)]
    {
        let transitions = transitions_between(&records, lport, rport);
        let close = transitions.last().unwrap();
        assert_eq!(close["new"], "CLOSE");
        assert_eq!(
            (close["bytes_sent"].as_u64(), close["bytes_received"].as_u64()),
            (Some(sent), Some(received)),
            "{close}"
        );
        assert_eq!(close["retransmits"], 0, "loopback does not retransmit: {close}");
        let lifespan = close["lifespan_ns"].as_u64().expect("born while watched");
        let spent: u64 = transitions.iter().filter_map(|r| r["duration_ns"].as_u64()).sum();
        if lport == client_port {
            assert_eq!(lifespan, spent, "creation to CLOSE is the sum of the times in each state");
            assert_eq!(
                (close["old"].as_str(), close["ending"].as_str(), close["source"].as_str()),
                (Some("TIME_WAIT"), Some("netns_deleted"), Some("sock_diag")),
                "{close}"
            );
        } else {
            assert!(lifespan >= spent && lifespan > 0, "{lifespan} vs {spent}");
        }
        for other in &transitions[..transitions.len() - 1] {
            assert!(other.get("bytes_sent").is_none(), "totals only at CLOSE: {other}");
        }
    }
}
