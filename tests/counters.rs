//! `netwatch counters` against `nstat` as the oracle, in namespaces the tests make: the same
//! changes over the same interval; and a listener that overflows named with its process.
//! A failed unwrap is how a test reports a missing field.
#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::UdpSocket,
    process::{Command, Stdio},
    time::Duration,
};

use netwatch_tests::{Agent, NetNs, netwatch_bin, round_trips_and_refusals};
use serde_json::Value;

/// Each test keeps netwatch's and nstat's last readings in files of its own.
struct Histories {
    dir: std::path::PathBuf,
}

impl Histories {
    fn new(name: &str) -> Histories {
        let dir = std::env::temp_dir().join(format!("nwt-counters-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Histories { dir }
    }

    /// `netwatch counters --netns NS --json ARGS`, parsed.
    fn netwatch(&self, ns: &NetNs, args: &[&str]) -> Value {
        let output = Command::new(netwatch_bin())
            .args(["counters", "--json", "--netns", &ns.name])
            .args(args)
            .env("NETWATCH_COUNTERS_HISTORY", &self.dir)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// `nstat ARGS` in the namespace, with this test's history file.
    fn nstat(&self, ns: &NetNs, args: &[&str]) -> String {
        let output =
            ns.command("nstat").args(args).env("NSTAT_HISTORY", self.dir.join("nstat")).output();
        let output = output.expect("run nstat (iproute2)");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for Histories {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// netwatch's changes by nstat's name (`TcpActiveOpens`), gauges left out as nstat leaves
/// them out.
fn deltas(report: &Value) -> BTreeMap<String, i64> {
    report["counters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| {
            let delta = c["delta"].as_i64()?;
            Some((format!("{}{}", c["group"].as_str()?, c["name"].as_str()?), delta))
        })
        .filter(|(_, delta)| *delta != 0)
        .collect()
}

fn counter<'a>(report: &'a Value, group: &str, name: &str) -> &'a Value {
    let counters = report["counters"].as_array().unwrap();
    counters.iter().find(|c| c["group"] == group && c["name"] == name).unwrap_or(&Value::Null)
}

const N: usize = 5;

#[test]
fn changes_equal_nstats_over_the_same_interval() {
    let ns = NetNs::new("cnt");
    let histories = Histories::new("nstat");
    // Both start counting now.
    let first = histories.netwatch(&ns, &["--no-agent"]);
    assert_eq!(first["netns"].as_u64(), Some(ns.inode()));
    histories.nstat(&ns, &["-n"]);
    ns.run(|| {
        round_trips_and_refusals(N);
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..N {
            udp.send_to(b"x", udp.local_addr().unwrap()).unwrap();
        }
    });
    // The last ACKs and ICMP errors are past; the namespace is quiet.
    std::thread::sleep(Duration::from_millis(500));
    let ours = histories.netwatch(&ns, &["--no-agent"]);
    let theirs: Value = serde_json::from_str(&histories.nstat(&ns, &["--json"])).unwrap();
    let theirs: BTreeMap<String, i64> = theirs["kernel"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, value)| (name.clone(), value.as_i64().unwrap()))
        .filter(|(_, delta)| *delta != 0)
        .collect();
    assert_eq!(deltas(&ours), theirs, "netwatch counters vs nstat, same interval and namespace");
    let n = N as i64;
    for (name, at_least) in [
        ("TcpActiveOpens", 2 * n),
        ("TcpPassiveOpens", n),
        ("TcpAttemptFails", n),
        ("UdpOutDatagrams", n),
    ] {
        assert!(theirs.get(name).is_some_and(|v| *v >= at_least), "{name}: {theirs:?}");
    }
    assert_eq!(ours["since"]["from"], "last_call", "{ours}");
    assert!(ours["interval_s"].as_f64().is_some_and(|s| s > 0.4), "{ours}");
    let rate = counter(&ours, "Tcp", "AttemptFails")["per_second"].as_f64().unwrap();
    assert!(rate > 0.0, "a rate per second: {rate}");
}

#[test]
fn a_user_reads_the_counters_of_their_own_namespace() {
    let history = std::env::temp_dir().join(format!("nwt-counters-{}-user", std::process::id()));
    // An agent whose socket only root may use: the user gets the counters without causes.
    let agent = Agent::start(&Agent::test_socket("counters-user"));
    let run = || {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(netwatch_bin())
            .args(["counters", "--json", "-a", "--socket", agent.socket_arg()])
            .env("NETWATCH_COUNTERS_HISTORY", &history)
            .output()
            .expect("run setpriv (util-linux)")
    };
    let first = run();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let second = run();
    let _ = std::fs::remove_dir_all(&history);
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    let reading: Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(reading["since"]["from"], "last_call", "kept between calls: {reading}");
    assert_eq!(reading["agent"], false, "{reading}");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.is_empty(), "{stderr}");
    assert!(agent.stop().success());
}

/// python3 in the namespace: a listener with a backlog of 1 that never accepts, hit by
/// `count` connects that never complete; prints `listening PORT PID`.
fn overflowing_listener(ns: &NetNs, count: usize) -> (std::process::Child, u16, u32) {
    let script = format!(
        "import socket,sys,os\n\
         s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(1)\n\
         port=s.getsockname()[1]\n\
         clients=[]\n\
         for _ in range({count}):\n\
         \x20   c=socket.socket(); c.setblocking(False); c.connect_ex(('127.0.0.1',port)); clients.append(c)\n\
         print('listening', port, os.getpid(), flush=True)\n\
         sys.stdin.read()\n"
    );
    let mut child = ns
        .command("python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run python3");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.first(), Some(&"listening"), "{line}");
    (child, fields[1].parse().unwrap(), fields[2].parse().unwrap())
}

#[test]
fn listen_overflows_name_the_listener_and_its_process() {
    let ns = NetNs::new("ovf");
    let histories = Histories::new("overflow");
    let agent = Agent::start_with(
        &Agent::test_socket("counters"),
        // Enough pairs that whatever else runs on the host leaves this test's its own labels.
        &["--metrics", "127.0.0.1:0", "--metrics-causes", "100000"],
    );
    let socket = ["--socket", agent.socket_arg()];
    histories.netwatch(&ns, &socket);
    let (mut python, port, pid) = overflowing_listener(&ns, 8);
    // The clients' SYNs are dropped while the queue is full, and sent again after 1 s.
    std::thread::sleep(Duration::from_millis(2500));
    let report = histories.netwatch(&ns, &socket);
    let listener = format!("127.0.0.1:{port}");
    let owner = format!("python3[{pid}]");
    for name in ["ListenOverflows", "ListenDrops"] {
        let line = counter(&report, "TcpExt", name);
        assert!(line["delta"].as_i64().is_some_and(|d| d > 0), "{name} grew: {report:#}");
        assert_eq!(line["cause"]["by"], "accept_queues", "{line:#}");
        let full = &line["cause"]["listeners"][0];
        assert_eq!(full["local"], listener.as_str(), "{line:#}");
        assert_eq!(full["owners"][0], owner.as_str(), "{line:#}");
        assert!(full["queue"].as_u64() > full["backlog"].as_u64(), "full: {full}");
        assert!(line["meaning"].as_str().is_some(), "{line:#}");
    }
    // The agent's events name the connects and the SYNs sent again.
    for (group, name) in [("Tcp", "ActiveOpens"), ("TcpExt", "TCPSynRetrans")] {
        let line = counter(&report, group, name);
        let culprits = line["cause"]["culprits"].as_array().unwrap();
        let ours = culprits.iter().find(|c| c["endpoint"] == listener.as_str()).unwrap();
        assert_eq!(
            (ours["comm"].as_str(), ours["pid"].as_u64()),
            (Some("python3"), Some(pid.into()))
        );
        assert!(ours["count"].as_u64().unwrap() > 0, "{line:#}");
    }
    // Without an agent, the listener is still named, its owner found in /proc.
    let alone = histories.netwatch(&ns, &["--no-agent", "--since-boot"]);
    let line = counter(&alone, "TcpExt", "ListenOverflows");
    assert_eq!(line["cause"]["listeners"][0]["owners"][0], owner.as_str(), "{line:#}");
    let retransmits = &counter(&alone, "TcpExt", "TCPSynRetrans")["cause"];
    assert_eq!(retransmits["by"], "unknown", "{alone:#}");
    assert!(retransmits["why"].as_str().unwrap().contains("--no-agent"), "{retransmits}");
    // The text says the same, first.
    let text = Command::new(netwatch_bin())
        .args(["-s", "--netns", &ns.name, "--since-boot", "--socket", agent.socket_arg()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[1], "Worth a look:", "{text}");
    assert!(lines[2].contains("TcpExt ListenOverflows"), "{text}");
    assert!(text.contains(&format!("{listener} {owner} accept queue")), "{text}");
    // The metrics: node_exporter's names, and the increments by process and endpoint.
    let metrics = agent.scrape();
    assert!(metrics.contains("\nnode_netstat_TcpExt_ListenOverflows "), "{metrics}");
    let opens = format!(
        "netwatch_counter_causes_total{{counter=\"Tcp_ActiveOpens\",comm=\"python3\",endpoint=\"{listener}\"}} 8"
    );
    assert!(metrics.contains(&opens), "{opens} in {metrics}");
    drop(python.stdin.take());
    let _ = python.wait();
    assert!(agent.stop().success());
}
