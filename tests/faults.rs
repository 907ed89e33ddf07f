//! The fault suite: netwatch under the failures an operator's host produces. A killed agent
//! leaves nothing attached, hooks never deny a connect or send, namespaces and processes come
//! and go faster than anyone could poll, and users without root get a sentence, not a trace.
//! (Lost events are in agent.rs: `table_converges_to_ss_after_lost_events`.)
//! A failed unwrap is how a test reports a missing field.
#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, TcpListener, UdpSocket},
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use netwatch_common::program;
use netwatch_tests::{
    Agent, Holder, NetNs, listening_port, netwatch_bin,
    oracle::{netwatch_rows, settled_rows},
    require_root, sockpeer_in,
};
use serde_json::Value;

/// Ids of the loaded BPF programs that carry one of netwatch's names.
fn netwatch_programs() -> BTreeSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| {
            p.name_as_str().is_some_and(|name| {
                !name.is_empty()
                    && program::ALL
                        .into_iter()
                        .chain(program::trampoline_programs())
                        .any(|ours| ours.get(..15).unwrap_or(ours) == name)
            })
        })
        .map(|p| p.id())
        .collect()
}

/// SIGKILL gives the agent no chance to clean up: its programs and links must still go with
/// its fds, connects must keep working, and a new agent must rebuild the same table.
#[test]
fn a_killed_agent_leaves_nothing_attached_and_a_new_one_rebuilds_the_table() {
    require_root();
    // The previous test's agent may have exited a moment ago: the kernel frees programs
    // after their last fd closes, not always at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !netwatch_programs().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(netwatch_programs().is_empty(), "no netwatch programs before the test");
    let ns = NetNs::new("kill");
    let holder = Holder::start(&ns, env!("CARGO_BIN_EXE_sockpeer"));
    let socket = Agent::test_socket("killed");
    let agent = Agent::start(&socket);
    let ours = netwatch_programs();
    assert!(ours.len() >= 15, "the agent's programs are loaded: {ours:?}");
    let pid = agent.child.id();
    drop(agent); // SIGKILL, then reaped

    let deadline = Instant::now() + Duration::from_secs(5);
    while !netwatch_programs().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(netwatch_programs().is_empty(), "programs left after SIGKILL of {pid}");
    let links: Vec<u32> = aya::programs::loaded_links()
        .filter_map(Result::ok)
        .map(|l| l.program_id())
        .filter(|id| ours.contains(id))
        .collect();
    assert!(links.is_empty(), "links left to the killed agent's programs: {links:?}");

    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let receiver = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .send_to(b"x", receiver.local_addr().unwrap())
        .unwrap();

    let agent = Agent::start(&socket);
    let (_, _, stderr) = settled_rows(&agent, &ns);
    assert!(!stderr.contains("one-shot"), "the new agent answered: {stderr}");
    drop(holder);
    assert!(agent.stop().success());
}

/// With the agent running and busy, every connect and every first UDP send (the cgroup hooks
/// run in both) succeeds: the hooks observe, they never deny.
#[test]
fn connects_and_sends_keep_working_under_load() {
    require_root();
    let agent = Agent::start(&Agent::test_socket("load"));
    let sockpeer = env!("CARGO_BIN_EXE_sockpeer");
    const CLIENTS: usize = 4;
    const ROUND_TRIPS: usize = 500;
    let mut pairs = Vec::new();
    for _ in 0..CLIENTS {
        let mut server = Command::new(sockpeer)
            .args(["serve-many", "127.0.0.1:0", &ROUND_TRIPS.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = listening_port(&line).to_string();
        let client = Command::new(sockpeer)
            .args(["churn", &format!("127.0.0.1:{port}"), &ROUND_TRIPS.to_string()])
            .spawn()
            .unwrap();
        pairs.push((server, client));
    }
    let receiver = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    receiver.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Room for every datagram, so that a slow reader cannot be mistaken for a lost send.
    let room: libc::c_int = 8 << 20;
    // SAFETY: a valid fd and a pointer to an int of the given size.
    unsafe {
        use std::os::fd::AsRawFd as _;
        libc::setsockopt(
            receiver.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const room).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    let target = receiver.local_addr().unwrap().to_string();
    let sender =
        Command::new(sockpeer).args(["udp-sends", &target, &ROUND_TRIPS.to_string()]).spawn();
    let mut sender = sender.unwrap();
    let mut received = 0;
    let mut buffer = [0u8; 16];
    while received < ROUND_TRIPS && receiver.recv(&mut buffer).is_ok() {
        received += 1;
    }
    assert!(sender.wait().unwrap().success(), "every UDP send succeeded");
    assert_eq!(received, ROUND_TRIPS, "every datagram arrived");
    for (mut server, mut client) in pairs {
        assert!(client.wait().unwrap().success(), "every connect and round trip succeeded");
        assert!(server.wait().unwrap().success());
    }
    let stats = agent.ask_json("stats", &[]);
    let connects: u64 = stats["by_process"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["connects"].as_u64().unwrap())
        .sum();
    assert!(connects >= (CLIENTS * ROUND_TRIPS) as u64, "the agent saw them: {connects}");
    assert!(agent.stop().success());
}

/// Namespaces made and deleted while the agent runs: each one's sockets appear (equal to ss
/// inside it) and leave with it, TIME_WAIT and never-accepted ones included, though the
/// kernel reports none of those going.
#[test]
fn namespaces_come_and_go_with_their_sockets() {
    require_root();
    let agent = Agent::start(&Agent::test_socket("nschurn"));
    let sockpeer = env!("CARGO_BIN_EXE_sockpeer");
    for round in 0..3 {
        let ns = NetNs::new(&format!("churn{round}"));
        let inode = ns.inode();
        let holder = Holder::start(&ns, sockpeer);
        let (_, records, _) = settled_rows(&agent, &ns);
        assert!(records.iter().any(|r| r["state"] == "TIME_WAIT"), "round {round}");
        drop(holder);
        drop(ns);
        let all = agent.ask_json("table", &["-tuan"]);
        let left: Vec<&Value> =
            all.as_array().unwrap().iter().filter(|r| r["netns"].as_u64() == Some(inode)).collect();
        assert!(left.is_empty(), "round {round}: rows of the deleted namespace: {left:#?}");
    }
    assert!(agent.stop().success());
}

/// Many short-lived processes connect and exit at once: each connection is attributed to its
/// own process (pid and comm) in the table while it lives, and in history and the log after.
#[test]
fn short_lived_processes_are_attributed_in_table_history_and_log() {
    require_root();
    let dir = std::env::temp_dir().join(format!("netwatch-churn-log-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("events.ndjson");
    let agent = Agent::start_with(&Agent::test_socket("procs"), &["--log", log.to_str().unwrap()]);
    let ns = NetNs::new("procs");
    let sockpeer = env!("CARGO_BIN_EXE_sockpeer");
    // 40 that connect and wait (checked in the live table), then 40 that connect and exit.
    let (mut listener, line) = sockpeer_in(&ns, sockpeer, &["listen", "127.0.0.1:0"]);
    let port = listening_port(&line);
    let target = format!("127.0.0.1:{port}");
    let holding: Vec<(std::process::Child, String)> =
        (0..40).map(|_| sockpeer_in(&ns, sockpeer, &["connect-hold", &target])).collect();
    // By (local port, server port): the kernel may give two clients the same ephemeral port
    // when they connect to different servers, as the two groups here do.
    let mut expected: BTreeMap<(u16, u16), u32> = BTreeMap::new();
    for (child, line) in &holding {
        let lport: u16 = line.trim().strip_prefix("ready ").unwrap().parse().unwrap();
        // `ip netns exec` execs the program: the child's pid is sockpeer's.
        expected.insert((lport, port), child.id());
    }
    let (_, records, _) = netwatch_rows(&agent, &ns);
    for (&(lport, _), pid) in &expected {
        let row = records
            .iter()
            .find(|r| r["lport"] == lport && r["rport"] == port)
            .unwrap_or_else(|| panic!("no row for :{lport}"));
        let owners: Vec<(u64, &str)> = row["owners"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| (o["pid"].as_u64().unwrap(), o["comm"].as_str().unwrap()))
            .collect();
        assert_eq!(owners, [(u64::from(*pid), "sockpeer")], ":{lport}");
    }
    for (mut child, _) in holding {
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
    }
    drop(listener.stdin.take());
    assert!(listener.wait().unwrap().success());
    let (mut server, line) = sockpeer_in(&ns, sockpeer, &["serve-many", "127.0.0.1:0", "40"]);
    let quick_port = listening_port(&line);
    let quick_target = format!("127.0.0.1:{quick_port}");
    let quick: Vec<std::process::Child> = (0..40)
        .map(|_| {
            ns.command(sockpeer)
                .args(["connect", &quick_target])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in quick {
        let pid = child.id();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success());
        let text = String::from_utf8_lossy(&output.stdout);
        let local = text.trim().strip_prefix("local 127.0.0.1:").unwrap();
        expected.insert((local.parse().unwrap(), quick_port), pid);
    }
    assert!(server.wait().unwrap().success());
    // The clients closed first: their connections live on in TIME_WAIT until the namespace
    // goes. The agent answers with everything that happened before the question.
    let netns = ns.inode();
    drop(ns);

    let ports = format!("( dport = :{port} or dport = :{quick_port} )");
    let words: Vec<&str> = ports.split_whitespace().collect();
    let mut args = vec!["--closed"];
    args.extend(&words);
    let histories = agent.ask_json("history", &args);
    let mut seen = 0;
    let mut incomplete = 0;
    for h in histories.as_array().unwrap().iter().filter(|h| h["netns"].as_u64() == Some(netns)) {
        seen += 1;
        if h["lost_events"] == true {
            // The kernel lost events while it was open (reported in-stream, checked below):
            // its steps may be incomplete.
            incomplete += 1;
            continue;
        }
        let key = |field: &str| h[field].as_u64().unwrap() as u16;
        let pid = expected[&(key("lport"), key("rport"))];
        let connect = &h["steps"][0];
        assert_eq!(
            (connect["old"].as_str(), connect["new"].as_str()),
            (Some("CLOSE"), Some("SYN_SENT"))
        );
        assert_eq!(
            (connect["pid"].as_u64(), connect["comm"].as_str()),
            (Some(u64::from(pid)), Some("sockpeer")),
            "{h:#}"
        );
    }
    assert_eq!(seen, expected.len(), "every client connection has a history");
    assert!(agent.stop().success());

    let text = std::fs::read_to_string(&log).unwrap();
    let losses = text.lines().filter(|l| l.contains(r#""type":"lost""#)).count();
    assert!(incomplete == 0 || losses > 0, "{incomplete} histories lost events, never silently");
    let mut logged = 0;
    for line in text.lines() {
        let record: Value = serde_json::from_str(line).unwrap();
        let to_ours = record["rport"] == port || record["rport"] == quick_port;
        if record["type"] == "transition" && record["new"] == "SYN_SENT" && to_ours {
            let key = |field: &str| record[field].as_u64().unwrap() as u16;
            let pid = expected[&(key("lport"), key("rport"))];
            assert_eq!(record["pid"].as_u64(), Some(u64::from(pid)), "{record}");
            assert_eq!(record["comm"], "sockpeer");
            logged += 1;
        }
    }
    assert!(losses > 0 || logged == expected.len(), "every connect is in the log: {logged}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The agent's socket is root's alone, and a user without root gets one line saying so
/// (and what to do) from every command that needs it, with exit status 1.
#[test]
fn users_without_root_get_one_line_saying_so() {
    require_root();
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let agent = Agent::start(&Agent::test_socket("perm"));
    let meta = std::fs::metadata(&agent.socket).unwrap();
    assert_eq!((meta.uid(), meta.permissions().mode() & 0o777), (0, 0o600));
    let socket = agent.socket.to_str().unwrap();
    for args in [
        vec!["table", "--socket", socket],
        vec!["stats", "--socket", socket],
        vec!["history", "--socket", socket],
        vec!["watch", "--socket", socket],
        vec!["agent", "--socket", "/tmp/netwatch-nobody.sock"],
    ] {
        let output =
            Command::new(netwatch_bin()).args(&args).uid(65534).gid(65534).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains("root") && !stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    assert!(agent.stop().success());
}
