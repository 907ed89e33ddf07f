//! TIME_WAIT through the whole state machine: a client that closes first goes
//! FIN_WAIT2 -> TIME_WAIT, and then TIME_WAIT -> CLOSE when its timewait socket expires, is
//! taken over by a new connection (`tcp_tw_reuse`), or its namespace goes; the FIN_WAIT2
//! substate of an orphan turns into TIME_WAIT when the peer's FIN comes, or expires after
//! `tcp_fin_timeout`. Each case in a namespace of its own, with `ss` as the oracle.
//! A failed unwrap is how a test reports a missing field.
#![allow(clippy::unwrap_used)]

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use netwatch_tests::{Agent, NetNs, Watcher, netwatch_bin, oracle::settled_rows, require_root};
use serde_json::Value;

/// A TCP socket with SO_REUSEADDR bound to `local`, connected to `server`: what a client
/// that reuses its port (and so may meet its own timewait socket) does.
fn connect_from(local: SocketAddr, server: SocketAddr) -> TcpStream {
    let addr = |a: SocketAddr| {
        let SocketAddr::V4(a) = a else { panic!("IPv4 only") };
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
            sin_zero: [0; 8],
        }
    };
    let size = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a new fd, with valid pointers and sizes; the fd is handed
    // to a TcpStream, which owns it from then on.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let set = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            std::mem::size_of_val(&one) as libc::socklen_t,
        );
        assert_eq!(set, 0, "SO_REUSEADDR");
        let local = addr(local);
        let bound = libc::bind(stream.as_raw_fd(), (&raw const local).cast(), size);
        assert_eq!(bound, 0, "bind: {}", std::io::Error::last_os_error());
        let server = addr(server);
        let connected = libc::connect(stream.as_raw_fd(), (&raw const server).cast(), size);
        assert_eq!(connected, 0, "connect: {}", std::io::Error::last_os_error());
        stream
    }
}

/// A server in `ns` that answers each connection's request and closes after the client
/// does, for as long as the test keeps the namespace.
fn echo_server(ns: &NetNs) -> SocketAddr {
    let listener = ns.run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap());
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut request = [0u8; 4];
            if stream.read_exact(&mut request).is_ok() {
                let _ = stream.write_all(&request);
                let _ = stream.read_to_end(&mut Vec::new());
            }
        }
    });
    addr
}

/// One round trip from `local` (port 0: any) that the client closes first, leaving it in
/// TIME_WAIT; returns the client's address.
fn round_trip(ns: &NetNs, local: SocketAddr, server: SocketAddr) -> SocketAddr {
    ns.run(move || {
        let mut client = connect_from(local, server);
        client.write_all(b"ping").unwrap();
        client.read_exact(&mut [0u8; 4]).unwrap();
        client.local_addr().unwrap()
    })
}

/// The agent's history of the connection from `client` (open or closed, newest last).
fn histories_of(agent: &Agent, client: SocketAddr, server: SocketAddr) -> Vec<Value> {
    let filter = ["sport", "=", &format!(":{}", client.port())];
    let all = agent.ask_json("history", &filter);
    all.as_array()
        .unwrap()
        .iter()
        .filter(|h| h["rport"] == server.port() && h["lport"] == client.port())
        .cloned()
        .collect()
}

fn steps(history: &Value) -> Vec<(String, String)> {
    history["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["old"].as_str().unwrap().into(), s["new"].as_str().unwrap().into()))
        .collect()
}

fn step(old: &str, new: &str) -> (String, String) {
    (old.into(), new.into())
}

/// Asks `ask` until `done` holds of its answer or `limit` passes.
fn poll(
    limit: Duration,
    ask: impl Fn() -> Vec<Value>,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let found = ask();
        if done(&found) {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out; histories: {found:#?}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `history FILTER` for the connections in `ns` until `done` holds or PATIENCE
/// passes. Ports alone may match another namespace's socket: a CI run once failed on a
/// host TIME_WAIT socket, left by an earlier test, whose remote port was this test's
/// client port.
fn wait_for_history_where(
    agent: &Agent,
    ns: &NetNs,
    filter: &[&str],
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let netns = ns.inode();
    let ask = || {
        let all = agent.ask_json("history", filter);
        all.as_array()
            .unwrap()
            .iter()
            .filter(|h| h["netns"].as_u64() == Some(netns))
            .cloned()
            .collect()
    };
    poll(netwatch_tests::PATIENCE, ask, done)
}

/// Polls the history of the connection from `client` to `server` until `done` holds or
/// `limit` passes.
fn wait_for_history(
    agent: &Agent,
    client: SocketAddr,
    server: SocketAddr,
    limit: Duration,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    poll(limit, || histories_of(agent, client, server), done)
}

/// A reused TIME_WAIT: the client's timewait socket is listed as `ss` lists it; a new
/// connect from the same port to the same server (`tcp_tw_reuse`) takes it over, and the
/// old connection's TIME_WAIT -> CLOSE (`reused`) comes before the new one's first step.
#[test]
fn a_timewait_socket_taken_over_by_a_new_connection_ends_reused() {
    require_root();
    let agent = Agent::start(&Agent::test_socket("tw-reuse"));
    let ns = NetNs::new("twreuse");
    ns.run(|| std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1").unwrap());
    let server = echo_server(&ns);
    let watcher = Watcher::start(&["--json", "--socket", agent.socket.to_str().unwrap()]);
    let client = round_trip(&ns, (Ipv4Addr::LOCALHOST, 0).into(), server);

    let in_time_wait =
        |h: &[Value]| h.len() == 1 && steps(&h[0]).last() == Some(&step("FIN_WAIT2", "TIME_WAIT"));
    let [open] = wait_for_history(&agent, client, server, Duration::from_secs(5), in_time_wait)
        .try_into()
        .unwrap();
    let (_, records, _) = settled_rows(&agent, &ns);
    let tw = records.iter().find(|r| r["lport"] == client.port()).unwrap();
    assert_eq!(tw["state"], "TIME_WAIT", "{tw}");
    assert_eq!(open["closed"], false);

    // The kernel lets a timewait socket be reused once a second has passed since the last
    // timestamp it received.
    thread::sleep(Duration::from_millis(1100));
    let again = round_trip(&ns, client, server);
    assert_eq!(again, client, "the same 4-tuple");
    let both = wait_for_history(&agent, client, server, Duration::from_secs(10), |h| {
        h.len() == 2 && h.iter().all(|h| h["closed"] == false || h["ending"] == "reused")
    });
    let old = both.iter().find(|h| h["cookie"] == open["cookie"]).unwrap();
    assert_eq!((old["closed"].as_bool(), old["ending"].as_str()), (Some(true), Some("reused")));
    let last = old["steps"].as_array().unwrap().last().unwrap();
    assert_eq!(
        step(last["old"].as_str().unwrap(), last["new"].as_str().unwrap()),
        step("TIME_WAIT", "CLOSE")
    );
    let in_time_wait = last["duration_ns"].as_u64().unwrap();
    assert!(in_time_wait > 1_000_000_000, "in TIME_WAIT over a second: {last}");
    let spent: u64 =
        old["steps"].as_array().unwrap().iter().map(|s| s["duration_ns"].as_u64().unwrap()).sum();
    assert_eq!(old["lifespan_ns"].as_u64(), Some(spent), "durations add up: {old:#}");
    assert_eq!((old["bytes_sent"].as_u64(), old["bytes_received"].as_u64()), (Some(4), Some(4)));
    let new = both.iter().find(|h| h["cookie"] != open["cookie"]).unwrap();
    assert_eq!(steps(new)[0], step("CLOSE", "SYN_SENT"));

    // In the stream, the old connection ends before the new one starts.
    let lines = watcher.stop();
    let position = |cookie: &Value, new: &str| {
        lines.iter().position(|l| {
            let r: Value = serde_json::from_str(l).unwrap();
            r["cookie"] == *cookie && r["new"] == new
        })
    };
    let ended = position(&open["cookie"], "CLOSE").expect("TIME_WAIT -> CLOSE in the stream");
    let started = position(&new["cookie"], "SYN_SENT").expect("the new connect in the stream");
    assert!(ended < started, "the reused socket's end comes first");
    settled_rows(&agent, &ns);
    assert!(agent.stop().success());
}

/// An orphan whose peer has not closed waits in the FIN_WAIT2 substate of a timewait socket:
/// the stream shows no change at the full socket's close, then FIN_WAIT2 -> TIME_WAIT when
/// the peer's FIN comes; an orphan whose peer never closes expires after tcp_fin_timeout.
#[test]
fn the_fin_wait2_substate_turns_into_time_wait_or_expires() {
    require_root();
    let agent = Agent::start(&Agent::test_socket("tw-fin2"));
    let ns = NetNs::new("twfin2");
    ns.run(|| std::fs::write("/proc/sys/net/ipv4/tcp_fin_timeout", "3").unwrap());
    let listener = ns.run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap());
    let server = listener.local_addr().unwrap();
    // Two connections the clients close at once; the server holds its ends open.
    let (clients, accepted) = ns.run(move || {
        let clients: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(server).unwrap()).collect();
        let accepted: Vec<TcpStream> = (0..2).map(|_| listener.accept().unwrap().0).collect();
        let clients: Vec<SocketAddr> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
        (clients, accepted)
    });
    let (answered, never) = (clients[0], clients[1]);
    let in_fin_wait2 =
        |h: &[Value]| h.len() == 1 && steps(&h[0]).last() == Some(&step("FIN_WAIT1", "FIN_WAIT2"));
    for client in [answered, never] {
        wait_for_history(&agent, client, server, Duration::from_secs(5), in_fin_wait2);
    }
    settled_rows(&agent, &ns);

    // The server closes one of its ends: that client's timewait socket turns to TIME_WAIT.
    let mut accepted = accepted.into_iter();
    let answer = accepted.next().unwrap();
    assert_eq!(answer.peer_addr().unwrap(), answered);
    drop(answer);
    let turned = wait_for_history(&agent, answered, server, Duration::from_secs(5), |h| {
        h.len() == 1 && steps(&h[0]).last() == Some(&step("FIN_WAIT2", "TIME_WAIT"))
    });
    assert_eq!(turned[0]["closed"], false);
    // The other's peer never closes: its FIN_WAIT2 expires after tcp_fin_timeout (3 s).
    let expired = wait_for_history(&agent, never, server, Duration::from_secs(10), |h| {
        h.len() == 1 && h[0]["closed"] == true
    });
    let last = expired[0]["steps"].as_array().unwrap().last().unwrap();
    assert_eq!((last["old"].as_str(), last["new"].as_str()), (Some("FIN_WAIT2"), Some("CLOSE")));
    assert_eq!(expired[0]["ending"], "expired", "{expired:#?}");
    let in_fin_wait2_ns = last["duration_ns"].as_u64().unwrap();
    assert!((3_000_000_000..6_000_000_000).contains(&in_fin_wait2_ns), "{last}");
    settled_rows(&agent, &ns);
    drop(accepted);
    assert!(agent.stop().success());
}

/// A question that shows FIN_WAIT2 but not TIME_WAIT (`netwatch table`'s default, as ss's)
/// only has the kernel's FIN_WAIT2 sockets dumped: a timewait socket that turned to
/// TIME_WAIT a moment ago is left out at once, and `-a` shows it in TIME_WAIT.
#[test]
fn right_after_the_peers_fin_the_default_table_no_longer_shows_fin_wait2() {
    require_root();
    let agent = Agent::start(&Agent::test_socket("tw-fin2-table"));
    let ns = NetNs::new("twfin2tbl");
    let listener = ns.run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap());
    let server = listener.local_addr().unwrap();
    let (client, accepted) = ns.run(move || {
        let client = TcpStream::connect(server).unwrap();
        let accepted = listener.accept().unwrap().0;
        (client.local_addr().unwrap(), accepted)
    });
    let in_fin_wait2 =
        |h: &[Value]| h.len() == 1 && steps(&h[0]).last() == Some(&step("FIN_WAIT1", "FIN_WAIT2"));
    wait_for_history(&agent, client, server, Duration::from_secs(5), in_fin_wait2);
    let rows = |args: &[&str], ours: bool| -> Vec<(String, String, String)> {
        let output = if ours {
            Command::new(netwatch_bin())
                .args(["table", "--netns", &ns.name, "--socket", agent.socket_arg()])
                .args(args)
                .output()
                .unwrap()
        } else {
            ns.command("ss").arg("-H").args(args).output().unwrap()
        };
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let mut rows: Vec<_> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .skip(usize::from(ours))
            .map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                (f[0].to_string(), f[3].to_string(), f[4].to_string())
            })
            .collect();
        rows.sort();
        rows
    };
    let fin_wait2 = ("FIN-WAIT-2".to_string(), client.to_string(), server.to_string());
    assert!(rows(&["-tn"], true).contains(&fin_wait2), "the client's end in FIN_WAIT2");

    drop(accepted);
    let (ours, theirs) = (rows(&["-tn"], true), rows(&["-tn"], false));
    assert!(!theirs.contains(&fin_wait2), "the kernel's turn is done when close() returns");
    assert_eq!(ours, theirs, "the default table right after the peer's FIN");
    let time_wait = ("TIME-WAIT".to_string(), client.to_string(), server.to_string());
    let (ours, theirs) = (rows(&["-tan"], true), rows(&["-tan"], false));
    assert!(ours.contains(&time_wait), "{ours:?}");
    assert_eq!(ours, theirs, "-a right after the peer's FIN");
    assert!(agent.stop().success());
}

/// TIME_WAIT lasts the kernel's 60 s; then TIME_WAIT -> CLOSE (`expired`) closes the history,
/// and neither `ss` nor netwatch lists the socket any more.
#[test]
fn time_wait_expires_after_sixty_seconds() {
    require_root();
    let agent = Agent::start(&Agent::test_socket("tw-expiry"));
    let ns = NetNs::new("twexpiry");
    let server = echo_server(&ns);
    let client = round_trip(&ns, (Ipv4Addr::LOCALHOST, 0).into(), server);
    let (rows, _, _) = settled_rows(&agent, &ns);
    assert!(rows.iter().any(|r| r.1 == "TIME-WAIT"), "{rows:?}");
    let closed = wait_for_history(&agent, client, server, Duration::from_secs(80), |h| {
        h.len() == 1 && h[0]["closed"] == true
    });
    let h = &closed[0];
    assert_eq!(h["ending"], "expired", "{h:#}");
    let last = h["steps"].as_array().unwrap().last().unwrap();
    assert_eq!((last["old"].as_str(), last["new"].as_str()), (Some("TIME_WAIT"), Some("CLOSE")));
    let in_time_wait = last["duration_ns"].as_u64().unwrap() as f64 / 1e9;
    // The kernel's timer wheel fires a 60 s timer late by up to its level's granularity
    // (about 2 s at HZ=250, 4 s at HZ=1000, 5 s at HZ=100), and the agent notices within a
    // second.
    assert!((60.0..75.0).contains(&in_time_wait), "TIME_WAIT lasted {in_time_wait} s");
    let (rows, _, _) = settled_rows(&agent, &ns);
    assert!(rows.iter().all(|r| r.1 != "TIME-WAIT"), "{rows:?}");
    assert!(agent.stop().success());
}

/// A connection the server resets from FIN_WAIT2 (it shut its side down, then closed with
/// the client's data unread) leaves no timewait socket. The lookup for its 4-tuple then finds
/// the listener on the same port, which must not be taken for it: the listener keeps its
/// owner and its time in state, and the next connection is still attributed to it.
#[test]
fn a_reset_connection_leaves_its_listener_alone() {
    require_root();
    let agent = Agent::start(&Agent::test_socket("tw-listener"));
    let ns = NetNs::new("twlistener");
    let listener = ns.run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap());
    let server = listener.local_addr().unwrap();
    let listener = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.read_exact(&mut [0u8; 4]).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        // The client goes on sending: closing now, with its data unread, resets the
        // connection.
        thread::sleep(Duration::from_millis(100));
        drop(stream);
        listener
    });
    ns.run(move || {
        let mut client = TcpStream::connect(server).unwrap();
        let chunk = [1u8; 64 * 1024];
        while client.write_all(&chunk).is_ok() {}
    });
    let listener = listener.join().unwrap();
    // The server's end closed from FIN_WAIT2 with the client's data unread: it sent the reset.
    let filter = ["sport", "=", &format!(":{}", server.port())];
    let closed = wait_for_history_where(&agent, &ns, &filter, |h| {
        h.iter().any(|h| h["closed"] == true && h["rport"] != 0)
    });
    let ended = closed.iter().find(|h| h["closed"] == true && h["rport"] != 0).unwrap();
    assert_eq!(ended["failure"], "reset_sent", "{ended:#}");
    assert_eq!(steps(ended).last(), Some(&step("FIN_WAIT2", "CLOSE")), "{ended:#}");
    let me = u64::from(std::process::id());
    let (_, records, _) = settled_rows(&agent, &ns);
    let row = records.iter().find(|r| r["state"] == "LISTEN").unwrap();
    assert!(row["in_state_ms"].is_u64(), "the listener keeps its time in state: {row}");
    let stats = agent.ask_json("stats", &[]);
    let ours = stats["listeners"].as_array().unwrap().iter().find(|l| l["lport"] == server.port());
    assert_eq!(ours.unwrap()["pid"].as_u64(), Some(me), "{stats:#}");
    // The next connection is the listener's until accepted.
    let next = ns.run(move || TcpStream::connect(server).unwrap());
    let filter = ["dport", "=", &format!(":{}", next.local_addr().unwrap().port())];
    let born = wait_for_history_where(&agent, &ns, &filter, |h| h.len() == 1);
    assert_eq!(steps(&born[0])[0], step("LISTEN", "SYN_RECV"));
    assert_eq!(born[0]["steps"][0]["pid"].as_u64(), Some(me), "{born:#?}");
    drop((next, listener));
    assert!(agent.stop().success());
}

/// Timewait sockets the agent found at start end in `history` too: here when their
/// namespace is deleted.
#[test]
fn timewait_sockets_from_the_snapshot_close_in_history() {
    require_root();
    let ns = NetNs::new("twseeded");
    let server = echo_server(&ns);
    let client = round_trip(&ns, (Ipv4Addr::LOCALHOST, 0).into(), server);
    let agent = Agent::start(&Agent::test_socket("tw-seeded"));
    let [seeded] = histories_of(&agent, client, server).try_into().unwrap();
    assert_eq!(
        (seeded["first_seen"].as_str(), seeded["snapshot_state"].as_str()),
        (Some("snapshot"), Some("TIME_WAIT"))
    );
    assert_eq!(seeded["closed"], false);
    drop(ns);
    let [ended] = histories_of(&agent, client, server).try_into().unwrap();
    assert_eq!(
        (ended["closed"].as_bool(), ended["ending"].as_str()),
        (Some(true), Some("netns_deleted"))
    );
    assert_eq!(steps(&ended), [step("TIME_WAIT", "CLOSE")]);
    assert!(agent.stop().success());
}

/// A connection older than the agent has, in `history`, the owner the table gives it: the
/// process the snapshot found holding it.
#[test]
fn sockets_from_the_snapshot_have_their_owner_in_history() {
    require_root();
    let ns = NetNs::new("seededowner");
    let listener = ns.run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap());
    let port = listener.local_addr().unwrap().port();
    let agent = Agent::start(&Agent::test_socket("seeded-owner"));
    let filter = ["sport", "=", &format!(":{port}")];
    let found = agent.ask_json("history", &filter);
    let listening = found.as_array().unwrap().iter().find(|h| h["snapshot_state"] == "LISTEN");
    let listening = listening.unwrap_or_else(|| panic!("{found:#}"));
    assert_eq!(listening["snapshot_owner"]["pid"].as_u64(), Some(u64::from(std::process::id())));
    let text = Command::new(netwatch_bin())
        .args(["history", "--socket", agent.socket.to_str().unwrap()])
        .args(filter)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("[{}]", std::process::id())), "the owner in text: {text}");
    drop(listener);
    assert!(agent.stop().success());
}

/// A burst of short connections from a narrow port range to a server that closes first, as
/// an HTTP/1.0 server does: a new connection from a reused client port may take over the
/// server's timewait socket for its 4-tuple, and a small `tcp_max_tw_buckets` makes the
/// kernel skip others (TcpExtTCPTimeWaitOverflow), neither with an event. Right after the
/// burst, the agent's table equals ss: not 60 s later.
#[test]
fn the_table_equals_ss_right_after_a_burst_that_reuses_timewait_sockets() {
    require_root();
    let agent = Agent::start(&Agent::test_socket("tw-burst"));
    let ns = NetNs::new("twburst");
    ns.exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40007"]);
    ns.exec(&["sysctl", "-qw", "net.ipv4.tcp_max_tw_buckets=2"]);
    let sockpeer = env!("CARGO_BIN_EXE_sockpeer");
    let serve = ["serve-many", "127.0.0.1:0", "300", "server-first"];
    let (mut server, line) = netwatch_tests::sockpeer_in(&ns, sockpeer, &serve);
    let port = netwatch_tests::listening_port(&line);
    let target = format!("127.0.0.1:{port}");
    let churn = ns.command(sockpeer).args(["churn", &target, "300", "server-first"]).status();
    assert!(churn.unwrap().success(), "300 round trips from 8 ports");
    assert!(server.wait().unwrap().success());
    assert!(nstat(&ns, "TcpExtTCPTimeWaitOverflow") > 0, "the timewait buckets overflowed");
    // One question, one answer: nothing in the namespace changes for a minute now.
    let started = Instant::now();
    let (ours, _, _) = netwatch_tests::oracle::netwatch_rows(&agent, &ns);
    let theirs = netwatch_tests::oracle::ss_rows(&ns);
    assert!(started.elapsed() < Duration::from_secs(5));
    let timewaits = theirs.iter().filter(|r| r.1 == "TIME-WAIT").count();
    assert!((1..=2).contains(&timewaits), "ss shows the kernel's few: {timewaits}");
    assert_eq!(ours, theirs, "the agent's table right after the burst");
    // Whether a SYN takes over a timewait socket depends on its sequence number and
    // timestamp (tcp_timewait_state_process), so takeovers here are likely, not certain; the
    // takeover itself is tested on its own above.
    assert!(agent.stop().success());
}

/// A kernel counter of `ns`, as `nstat -az` reads it.
fn nstat(ns: &NetNs, name: &str) -> u64 {
    let output = ns.command("nstat").args(["-az", name]).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|l| l.split_whitespace().nth(1).filter(|_| l.starts_with(name))?.parse().ok())
        .unwrap_or(0)
}
