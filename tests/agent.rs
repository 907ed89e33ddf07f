//! `netwatch agent`: its API socket's lifecycle and permissions, and `netwatch watch`
//! attached to it showing what a watcher with programs of its own shows.
//! A failed unwrap is how a test reports a missing field.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use netwatch_tests::{
    Agent, Holder, NetNs, Watcher, client_roundtrip, listening_port, netwatch_bin,
    oracle::{settled_rows, ss_rows, text_rows},
    parse_json, serve_one, sockpeer_in, veth_pair,
};
use serde_json::Value;

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
    let attached = Watcher::start(&["--json", "--socket", agent.socket_arg()]);
    assert!(attached.stderr().contains("via the agent"), "{}", attached.stderr());
    let direct = Watcher::start(&["--json", "--socket", agent.socket_arg(), "--no-agent"]);
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
    let watcher = Watcher::start(&["--json", "--port", "1", "--socket", agent.socket_arg()]);

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

/// The agent's table, kept from events, equals ss for sockets that existed before it started
/// (seeded from its snapshot) and for sockets made after (events only), in every state the
/// mix covers, with the same holders (pid and fd).
#[test]
fn agent_table_equals_ss_for_sockets_from_before_and_after_it_started() {
    let ns = NetNs::new("agt");
    let mut before = Holder::start(&ns, env!("CARGO_BIN_EXE_sockpeer"));
    let agent = Agent::start(&Agent::test_socket("table"));
    let mut after = Holder::start(&ns, env!("CARGO_BIN_EXE_sockpeer"));
    // Both act on their sockets again: UDP connects and sends, a UDP reconnect, an fd moved by
    // fcntl(F_DUPFD), a reset, and a fork.
    before.next_step();
    after.next_step();
    let (ours, records, stderr) = settled_rows(&agent, &ns);
    assert!(!stderr.contains("one-shot"), "asked the agent: {stderr}");
    let theirs = ss_rows(&ns);
    assert_eq!(ours, theirs, "agent table vs ss -tuanp");
    // The same as text, as an operator reads it, with and without the agent.
    let (ours, theirs) = text_rows(&ns, &["--socket", agent.socket_arg()]);
    assert_eq!(ours, theirs, "netwatch table -tuanp (agent) vs ss -tuanp");
    let (ours, theirs) = text_rows(&ns, &["--no-agent"]);
    assert_eq!(ours, theirs, "netwatch table -tuanp --no-agent vs ss -tuanp");
    for holder in [&before, &after] {
        let held = records
            .iter()
            .filter(|r| r["owners"].as_array().unwrap().iter().any(|o| o["pid"] == holder.pid))
            .count();
        assert!(held >= 10, "pid {} holds its sockets: {held}", holder.pid);
    }
    // Sockets made after the agent started have a time in state; snapshot ones do not.
    // (A port of `after`'s may be a UDP one that `before` uses for TCP: the owner decides.)
    let new_ports: Vec<u64> = after.ports.iter().map(|p| u64::from(*p)).collect();
    let new_listener = records
        .iter()
        .find(|r| {
            r["state"] == "LISTEN"
                && new_ports.contains(&r["lport"].as_u64().unwrap())
                && r["owners"].as_array().unwrap().iter().any(|o| o["pid"] == after.pid)
        })
        .unwrap();
    assert!(new_listener["in_state_ms"].is_u64(), "{new_listener}");
    // Queues and uid change or come with no event: the table asks the kernel when asked.
    assert!(
        new_listener["recv_q"].is_u64() && new_listener["uid"] == 0,
        "queues and uid from the kernel at the moment of asking: {new_listener}"
    );

    // Sockets closing change the table without any further snapshot.
    drop(after);
    settled_rows(&agent, &ns);
    assert!(agent.stop().success());
}

/// A stalled agent with the smallest ring buffer loses events; it says so in the stream,
/// rebuilds its table from a new snapshot, and the table equals ss again.
#[test]
fn table_converges_to_ss_after_lost_events() {
    let ns = NetNs::new("lost");
    let agent = Agent::start_with(&Agent::test_socket("lost"), &["--ring-size", "4096"]);
    let watcher = Watcher::start(&["--json", "--port", "1", "--socket", agent.socket_arg()]);
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
    let ns = NetNs::new("fork");
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
    let ns = NetNs::new("scm");
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
    let ns = NetNs::new("churn");
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
    let ns = NetNs::new("pair");
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

/// An IPv6 wildcard listener with IPV6_V6ONLY takes no IPv4: ss lists it as `[::]:PORT`
/// next to `0.0.0.0:PORT`, and so must the agent for a listener it learned from events, in
/// its table and in the stream.
#[test]
fn a_v6only_listener_is_listed_as_ss_lists_it() {
    use std::os::fd::FromRawFd as _;
    let agent = Agent::start(&Agent::test_socket("v6only"));
    let watcher = Watcher::start(&["--transition", "CLOSE:LISTEN", "--socket", agent.socket_arg()]);
    let ns = NetNs::new("v6only");
    let (v6, v4, port) = ns.run(|| {
        // SAFETY: plain socket calls on a new fd, which the TcpListener then owns.
        let v6 = unsafe {
            let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            let listener = TcpListener::from_raw_fd(fd);
            let one: libc::c_int = 1;
            let size = std::mem::size_of_val(&one) as libc::socklen_t;
            let set = libc::setsockopt(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&raw const one).cast(),
                size,
            );
            assert_eq!(set, 0, "IPV6_V6ONLY");
            let any: libc::sockaddr_in6 = std::mem::zeroed();
            let any = libc::sockaddr_in6 { sin6_family: libc::AF_INET6 as u16, ..any };
            let size = std::mem::size_of_val(&any) as libc::socklen_t;
            assert_eq!(libc::bind(fd, (&raw const any).cast(), size), 0, "bind [::]:0");
            assert_eq!(libc::listen(fd, 8), 0, "listen");
            listener
        };
        let port = v6.local_addr().unwrap().port();
        let v4 = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap();
        (v6, v4, port)
    });
    let listed = |output: std::process::Output| -> Vec<String> {
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let mut local: Vec<String> = text
            .lines()
            .filter_map(|l| l.split_whitespace().find(|f| f.ends_with(&format!(":{port}"))))
            .map(String::from)
            .collect();
        local.sort();
        local
    };
    let ours = listed(
        Command::new(netwatch_bin())
            .args(["table", "-tln", "--netns", &ns.name, "--socket", agent.socket_arg()])
            .output()
            .unwrap(),
    );
    let theirs = listed(ns.command("ss").args(["-tln"]).output().unwrap());
    assert_eq!(theirs, [format!("0.0.0.0:{port}"), format!("[::]:{port}")]);
    assert_eq!(ours, theirs, "the agent's table vs ss -tln");
    let ends = |l: &String| l.split_whitespace().skip(3).take(2).collect::<Vec<_>>().join(" ");
    let wanted = [format!("0.0.0.0:{port} 0.0.0.0:*"), format!("[::]:{port} [::]:*")];
    watcher.wait_until("both listeners' lines", |lines| {
        wanted.iter().all(|w| lines.iter().any(|l| ends(l) == *w))
    });
    watcher.stop();
    drop((v6, v4));
    assert!(agent.stop().success());
}

/// A half-open connection (the handshake's last ACK dropped) is a request socket in its
/// listener's SYN queue, which no tracepoint reports: the agent's table lists it as ss does.
#[test]
fn half_open_connections_are_listed_as_ss_lists_them() {
    let agent = Agent::start(&Agent::test_socket("half-open"));
    let (client_ns, server_ns) = veth_pair();
    let sockpeer = env!("CARGO_BIN_EXE_sockpeer");
    let (mut server, line) = sockpeer_in(&server_ns, sockpeer, &["serve", "10.231.0.2:0"]);
    let port = listening_port(&line);
    server_ns.drop_bare_acks(port);
    let (mut client, line) =
        sockpeer_in(&client_ns, sockpeer, &["connect-hold", &format!("10.231.0.2:{port}")]);
    assert!(line.starts_with("ready "), "{line}");
    let (rows, _, _) = settled_rows(&agent, &server_ns);
    assert!(rows.iter().any(|r| r.1 == "SYN-RECV"), "the half-open connection: {rows:?}");
    drop(client.stdin.take());
    let _ = (client.kill(), server.kill());
    let _ = (client.wait(), server.wait());
    assert!(agent.stop().success());
}

/// A pre-forked server whose child was already blocked in accept(2) when the agent started:
/// where the ownership hooks are trampolines, the child's accept returns past the fexit, so
/// the agent learns it from the graft and finds the fd in /proc. Its table equals ss, the
/// child holding the accepted connection.
#[test]
fn an_accept_already_waiting_at_start_is_held_by_the_acceptor() {
    let ns = NetNs::new("inflight");
    let mut server = ns
        .command(env!("CARGO_BIN_EXE_sockpeer"))
        .args(["serve-forked", "127.0.0.1:0", "hold"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut ready).unwrap();
    let words: Vec<&str> = ready.split_whitespace().collect();
    let ["listening", port, "parent", _, "child", child] = words[..] else { panic!("{ready}") };
    let (port, child): (u16, u64) = (port.parse().unwrap(), child.parse().unwrap());
    // The child is in accept(2) well before the agent attaches anything.
    thread::sleep(Duration::from_millis(300));
    let agent = Agent::start(&Agent::test_socket("inflight"));
    let client = ns.run(move || TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap());
    let (_, records, _) = settled_rows(&agent, &ns);
    let accepted = records
        .iter()
        .find(|r| r["state"] == "ESTABLISHED" && r["lport"] == port)
        .unwrap_or_else(|| panic!("no accepted connection: {records:#?}"));
    let owners = accepted["owners"].as_array().unwrap();
    assert!(owners.iter().any(|o| o["pid"] == child), "{accepted}");
    drop(client);
    drop(server.stdin.take());
    assert!(server.wait().unwrap().success());
    assert!(agent.stop().success());
}
