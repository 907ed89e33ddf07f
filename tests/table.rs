//! `netwatch table` against `ss` as the oracle: the same sockets, states, queues, addresses
//! and owners, in a network namespace made by the test and holding a mix of every state.
//! A failed unwrap is how a test reports a missing field.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use netwatch_tests::{Agent, Holder, NetNs, netwatch_bin};

/// Rows as (netid, state, recv-q, send-q, local, peer, process), sorted.
type Rows = Vec<Vec<String>>;

fn rows_of(text: &str, skip_header: bool) -> Rows {
    // ss leaves out the Netid column when one protocol was asked for; so must netwatch.
    let mut rows: Rows = text
        .lines()
        .skip(usize::from(skip_header))
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut fields: Vec<String> = line.split_whitespace().map(String::from).collect();
            fields.resize(7, String::new());
            fields
        })
        .collect();
    rows.sort();
    rows
}

fn ss(ns: &NetNs, args: &[&str]) -> Rows {
    let output = ns.command("ss").arg("-H").args(args).output().expect("run ss");
    assert!(output.status.success(), "ss {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    rows_of(&String::from_utf8_lossy(&output.stdout), false)
}

fn netwatch_table(ns: &NetNs, args: &[&str]) -> (Rows, String) {
    let output = Command::new(netwatch_bin())
        .args(["table", "--netns", &ns.name])
        .args(args)
        .output()
        .expect("run netwatch table");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "netwatch table {args:?}: {stderr}");
    (rows_of(&String::from_utf8_lossy(&output.stdout), true), stderr)
}

#[test]
fn table_equals_ss_for_every_state_and_filter() {
    let ns = NetNs::new("tbl");
    let holder = Holder::start(&ns, env!("CARGO_BIN_EXE_sockpeer"));
    let [v4, v6, dual] = holder.ports[..] else { panic!("three ports") };
    let (v4, v6, dual) = (v4.to_string(), v6.to_string(), dual.to_string());

    let (all, stderr) = netwatch_table(&ns, &["-tuanp"]);
    assert!(stderr.contains("one-shot snapshot"), "says it did not ask an agent: {stderr}");
    let oracle = ss(&ns, &["-tuanp"]);
    assert_eq!(all, oracle, "netwatch table -tuanp vs ss -tuanp");
    // The mix really covers what the test means to cover.
    let states: Vec<&str> = all.iter().map(|r| r[1].as_str()).collect();
    for state in ["LISTEN", "ESTAB", "FIN-WAIT-2", "CLOSE-WAIT", "TIME-WAIT", "UNCONN"] {
        assert!(states.contains(&state), "no {state} row in {all:#?}");
    }
    assert!(all.iter().any(|r| r[4] == format!("*:{dual}")), "dual-stack listener as ss shows it");
    assert!(all.iter().any(|r| r[1] == "TIME-WAIT" && r[6].is_empty()), "TIME-WAIT has no owner");
    assert!(all.iter().any(|r| r[6].contains("\"sockpeer\",pid=")), "owners are shown");
    assert!(all.iter().any(|r| r[0] == "udp" && r[1] == "ESTAB"), "connected UDP");

    let v4_port = format!(":{v4}");
    let v4_addr = format!("127.0.0.1:{v4}");
    let quoted = format!("sport = :{v4} or dport = :{v4}");
    let filters: Vec<Vec<&str>> = vec![
        vec!["-tun"],
        vec!["-tuln"],
        vec!["-un"],
        vec!["-4tuan"],
        vec!["-6tuan"],
        vec!["-tuan", "state", "established"],
        vec!["-tuan", "state", "time-wait", "state", "close-wait"],
        vec!["-tuan", "state", "connected"],
        vec!["-tuan", "state", "synchronized"],
        vec!["-tan", "sport", "=", &v4_port],
        vec!["-tan", "dport", "=", &v4_port],
        vec!["-tan", "(", "sport", "=", &v4_port, "or", "dport", "=", &v4_port, ")"],
        vec!["-tuan", "dst", "[::1]"],
        vec!["-tuan", "src", "127.0.0.0/8", "and", "not", "sport", "=", &v4_port],
        vec!["-tan", "sport", ">", &v6],
        vec!["-tan", "sport", "<=", &dual],
        // ss's own forms and its left-to-right `and`/`or`.
        vec![
            "-tan",
            "sport",
            "=",
            &v4_port,
            "or",
            "dport",
            "=",
            &v4_port,
            "and",
            "src",
            "127.0.0.1",
        ],
        vec!["-tuan", "src", "::/0"],
        vec!["-tuan", "src", "[::ffff:127.0.0.1]"],
        vec!["-tuan", "src", "::ffff:127.0.0.0/104"],
        vec!["-tuan", "src", "127/8"],
        vec!["-tuan", "dst", &v4_addr],
        vec!["-tuan", "src", "*:9000"],
        vec!["-tuan", "exclude", "time-wait", "exclude", "listening"],
        // One quoted argument, and options after the filter.
        vec!["-ta", &quoted, "-n"],
    ];
    for filter in &filters {
        let (ours, _) = netwatch_table(&ns, filter);
        let theirs = ss(&ns, &[&["-p"], &filter[..]].concat());
        assert_eq!(ours, theirs, "filter {filter:?}");
    }

    // Through an agent, which applies the filter before it sends the rows. Its rows have no
    // queues (shown as `-`): those columns are left out of the comparison.
    let agent = Agent::start(&Agent::test_socket("table-filters"));
    let without_queues = |rows: Rows| -> Rows {
        let mut rows: Rows = rows
            .into_iter()
            .map(|mut row| {
                // Netid and State come first when shown; the queues are the next two.
                let queue = |f: &String| f == "-" || f.bytes().all(|b| b.is_ascii_digit());
                let at = row.iter().position(queue).unwrap();
                row.drain(at..at + 2);
                row
            })
            .collect();
        rows.sort();
        rows
    };
    for filter in &filters {
        let asked = [&["--socket", agent.socket_arg()], &filter[..]].concat();
        let (ours, stderr) = netwatch_table(&ns, &asked);
        assert!(!stderr.contains("one-shot"), "asked the agent: {stderr}");
        let theirs = ss(&ns, &[&["-p"], &filter[..]].concat());
        assert_eq!(without_queues(ours), without_queues(theirs), "through the agent: {filter:?}");
    }
    // A selection longer than a request may be: the agent refuses it, and the client asks
    // for every row and filters them itself.
    let mut long = vec!["-tan", "sport", "=", &v4_port];
    for _ in 0..400 {
        long.extend(["or", "sport", "=", ":1"]);
    }
    let (ours, stderr) =
        netwatch_table(&ns, &[&["--socket", agent.socket_arg()], &long[..]].concat());
    assert!(!stderr.contains("one-shot"), "asked the agent: {stderr}");
    let theirs = ss(&ns, &["-p", "-tan", "sport", "=", &v4_port]);
    assert_eq!(without_queues(ours), without_queues(theirs), "a selection too long to send");

    // The agent itself leaves out what the selection does not keep.
    let ask = |request: &str| {
        use std::io::{Read as _, Write as _};
        let mut api = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
        api.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        api.read_to_string(&mut answer).unwrap();
        serde_json::from_str::<Vec<serde_json::Value>>(&answer).unwrap()
    };
    let everything = ask("{\"v\":1,\"cmd\":\"table\"}\n");
    let selected = ask(&format!(
        "{{\"v\":1,\"cmd\":\"table\",\"select\":{{\"tcp\":true,\"listening\":true,\
         \"netns\":\"{}\",\"filter\":[\"sport\",\"=\",\":{v4}\"]}}}}\n",
        ns.name
    ));
    assert_eq!(selected.len(), 1, "one listener on :{v4}: {selected:#?}");
    assert!(everything.len() > selected.len());
    assert!(agent.stop().success());
}

#[test]
fn the_proc_net_fallback_lists_the_same_rows() {
    let ns = NetNs::new("proc");
    let _holder = Holder::start(&ns, env!("CARGO_BIN_EXE_sockpeer"));
    let (ours, _) = netwatch_table(&ns, &["-tuanp", "--from-proc"]);
    // /proc/net has no listener backlog (netstat shows 0 there too); ss shows it as Send-Q.
    // Nor does it say which interface a socket is bound to, or whether an IPv6 wildcard
    // listener is IPV6_V6ONLY: netwatch shows it as the sysctl default has it (dual-stack).
    let mut theirs = ss(&ns, &["-tuanp"]);
    for row in theirs.iter_mut().filter(|r| r[1] == "LISTEN") {
        row[3] = "0".into();
        if let Some(port) = row[4].strip_prefix("[::]:") {
            (row[4], row[5]) = (format!("*:{port}"), "*:*".into());
        }
    }
    for row in &mut theirs {
        row[4] = row[4].replace("%lo", "");
    }
    theirs.sort();
    assert_eq!(ours, theirs);
    assert!(ours.len() >= 15, "the mix: {ours:#?}");
}

#[test]
fn json_lists_the_same_sockets_with_identity() {
    let ns = NetNs::new("json");
    let _holder = Holder::start(&ns, env!("CARGO_BIN_EXE_sockpeer"));
    let output = Command::new(netwatch_bin())
        .args(["table", "-tuan", "--json", "--netns", &ns.name])
        .output()
        .expect("run");
    assert!(output.status.success());
    let records: Vec<serde_json::Value> =
        serde_json::from_slice(&output.stdout).expect("one JSON array");
    assert_eq!(records.len(), ss(&ns, &["-tuan"]).len());
    for record in &records {
        assert_eq!(record["netns"], ns.inode(), "{record}");
        assert!(record["cookie"].as_u64().is_some_and(|c| c != 0), "{record}");
        if record["owners"].as_array().is_some_and(|o| !o.is_empty()) {
            assert!(record["inode"].as_u64().is_some_and(|i| i != 0), "{record}");
        }
        if record["state"] == "TIME_WAIT" {
            assert_eq!(record["timer"]["kind"], "timewait", "{record}");
            let left = record["timer"]["remaining_ms"].as_u64().unwrap();
            assert!(left > 50_000 && left <= 60_000, "TIME_WAIT lasts 60 s: {left} ms left");
        }
    }
    let ndjson = Command::new(netwatch_bin())
        .args(["table", "-tuan", "--ndjson", "--netns", &ns.name])
        .output()
        .expect("run");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&ndjson.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
        .collect();
    assert_eq!(lines.len(), records.len());
}

#[test]
fn bad_filters_fail_pointing_at_the_token() {
    for (args, needle) in [
        (&["table", "sport", "~", "80"][..], "token 2 '~'"),
        (&["table", "state", "bogus"][..], "token 2 'bogus'"),
        (&["ls", "dst", "10.0.0.0/99"][..], "token 2 '10.0.0.0/99'"),
        (&["ls", "(", "sport", "=", "1"][..], "token 5 '<end>'"),
    ] {
        let output = Command::new(netwatch_bin()).args(args).output().expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let output = Command::new(netwatch_bin()).args(["table", "-l", "-a"]).output().expect("run");
    assert_eq!(output.status.code(), Some(2), "conflicting flags are a usage error");
}

/// Per socket cookie: ss -e's identity (`ino`, `uid`) and ss -i's `key:value` fields.
type Details = std::collections::BTreeMap<u64, std::collections::BTreeMap<String, String>>;

/// The tcp_info fields both ss -i and netwatch -i print that hold still on an idle socket.
const STILL: [&str; 17] = [
    "wscale",
    "rto",
    "rtt",
    "mss",
    "pmtu",
    "rcvmss",
    "advmss",
    "cwnd",
    "ssthresh",
    "bytes_sent",
    "bytes_acked",
    "bytes_received",
    "segs_out",
    "segs_in",
    "retrans",
    "rcv_space",
    "snd_wnd",
];

/// `ss -tanpei` in the namespace: `sk:` (the cookie, in hex) names each socket.
fn ss_details(ns: &NetNs) -> Details {
    let output = ns.command("ss").args(["-H", "-tanpei"]).output().expect("run ss");
    let mut details = Details::new();
    let mut current = None;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let fields = line.split_whitespace().filter_map(|f| f.split_once(':'));
        if !line.starts_with(char::is_whitespace) {
            let fields: Vec<(&str, &str)> = fields.collect();
            let cookie = fields.iter().find(|(k, _)| *k == "sk").unwrap().1;
            let cookie = u64::from_str_radix(cookie, 16).unwrap();
            let mut identity = std::collections::BTreeMap::new();
            for (key, value) in fields.iter().filter(|(k, _)| ["ino", "uid"].contains(k)) {
                identity.insert(key.to_string(), value.to_string());
            }
            details.insert(cookie, identity);
            current = Some(cookie);
        } else if let Some(cookie) = current {
            let entry = details.get_mut(&cookie).unwrap();
            entry.extend(fields.map(|(k, v)| (k.to_string(), v.to_string())));
        }
    }
    details
}

/// `netwatch table -tanpei`: User, Inode and Cookie are its last columns, each tcp_info line
/// under its socket's. Written as ss writes them: `ino`, and `uid` when there is one but 0.
fn netwatch_details(ns: &NetNs, extra: &[&str]) -> Details {
    let output = Command::new(netwatch_bin())
        .args(["table", "-tanpei", "--netns", &ns.name])
        .args(extra)
        .output()
        .expect("run netwatch table");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let mut details = Details::new();
    let mut current = None;
    for line in String::from_utf8_lossy(&output.stdout).lines().skip(1) {
        if let Some(info) = line.strip_prefix('\t') {
            let entry = details.get_mut(&current.unwrap()).unwrap();
            let fields = info.split_whitespace().filter_map(|f| f.split_once(':'));
            entry.extend(fields.map(|(k, v)| (k.to_string(), v.to_string())));
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [user, inode, cookie] = fields[fields.len() - 3..] else { panic!("{line}") };
        let cookie: u64 = cookie.parse().unwrap();
        let mut identity = std::collections::BTreeMap::new();
        identity.insert("ino".to_string(), inode.to_string());
        if user != "-" {
            let uid = Command::new("id").args(["-u", user]).output().unwrap();
            let uid = String::from_utf8_lossy(&uid.stdout).trim().to_string();
            if uid != "0" {
                identity.insert("uid".to_string(), uid);
            }
        }
        details.insert(cookie, identity);
        current = Some(cookie);
    }
    details
}

/// Only what both print, of the fields that hold still.
fn comparable(mut details: Details, other: &Details) -> Details {
    for (cookie, fields) in &mut details {
        let theirs = other.get(cookie);
        fields.retain(|key, _| {
            (["ino", "uid"].contains(&key.as_str()) || STILL.contains(&key.as_str()))
                && theirs
                    .is_some_and(|t| t.contains_key(key) || ["ino", "uid"].contains(&key.as_str()))
        });
    }
    details
}

#[test]
fn extended_and_tcp_info_columns_equal_ss() {
    let ns = NetNs::new("ext");
    let _holder = Holder::start(&ns, env!("CARGO_BIN_EXE_sockpeer"));
    let agent = Agent::start(&Agent::test_socket("table-extended"));
    // A listener of another user, made after the agent started (so known to it from events).
    let mut nobody = ns
        .command("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c"])
        .arg(
            "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(); \
              print('listening', s.getsockname()[1], flush=True); sys.stdin.read()",
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run python3 as nobody (setpriv, util-linux)");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(nobody.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("listening"), "{line}");
    for extra in [&["--no-agent"][..], &["--socket", agent.socket_arg()]] {
        // A socket's counters may move between the two reads (a timer, a late ACK): the
        // comparison is taken again then, a few times.
        let mut last = None;
        for _ in 0..5 {
            let theirs = ss_details(&ns);
            let ours = netwatch_details(&ns, extra);
            let (ours, theirs) = (comparable(ours.clone(), &theirs), comparable(theirs, &ours));
            if ours == theirs {
                last = None;
                break;
            }
            last = Some((ours, theirs));
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        if let Some((ours, theirs)) = last {
            assert_eq!(ours, theirs, "netwatch table -tanpei {extra:?} vs ss -tanpei");
        }
        let ours = netwatch_details(&ns, extra);
        assert!(ours.len() >= 8, "the mix's TCP sockets: {ours:#?}");
        assert!(ours.values().filter(|f| f.contains_key("ino")).count() >= 5, "{ours:#?}");
        assert!(ours.values().filter(|f| f.contains_key("cwnd")).count() >= 4, "{ours:#?}");
        assert!(ours.values().any(|f| f.get("uid").is_some_and(|u| u == "65534")), "{ours:#?}");
    }
    // JSON carries every tcp_info field, and the queues through the agent.
    let output = Command::new(netwatch_bin())
        .args(["table", "-tani", "--json", "--netns", &ns.name, "--socket", agent.socket_arg()])
        .output()
        .expect("run");
    let records: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    let established = records.iter().find(|r| r["state"] == "ESTABLISHED").unwrap();
    for field in ["rtt_us", "snd_cwnd", "bytes_acked", "delivery_rate", "last_data_recv_ms"] {
        assert!(established["tcp_info"][field].is_u64(), "{field}: {established}");
    }
    assert!(established["recv_q"].is_u64() && established["user"] == "root", "{established}");
    assert!(agent.stop().success());
    drop(nobody.stdin.take());
    let _ = nobody.wait();
}

/// `netwatch table ARGS` running on: its stdout lines as they come; killed when dropped.
struct Running {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Running {
    fn start(args: &[&str]) -> Running {
        let mut child = Command::new(netwatch_bin())
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        Running { child, lines }
    }

    /// The tables printed so far, each as its lines.
    fn tables(&self) -> Vec<Vec<String>> {
        let mut tables: Vec<Vec<String>> = Vec::new();
        for line in self.lines.lock().unwrap().iter() {
            if line.starts_with("--- ") {
                tables.push(Vec::new());
            } else if let Some(table) = tables.last_mut() {
                table.push(line.clone());
            }
        }
        tables
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `done` for up to ten seconds.
fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn continuous_prints_again_when_the_table_changed() {
    let ns = NetNs::new("cont");
    let listener = ns.run(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let port = listener.local_addr().unwrap().port();
    let filter = format!("sport = :{port} or dport = :{port}");
    let agent = Agent::start(&Agent::test_socket("table-continuous"));
    let running = Running::start(&[
        "table",
        "-tan",
        "-c",
        "0.3",
        "--netns",
        &ns.name,
        "--socket",
        agent.socket_arg(),
        &filter,
    ]);
    eventually("the first table", || !running.tables().is_empty());
    // Several intervals with nothing changed in these rows print nothing more.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let tables = running.tables();
    assert_eq!(tables.len(), 1, "nothing changed, nothing printed again: {tables:#?}");
    assert!(tables[0].iter().any(|l| l.starts_with("LISTEN")), "{tables:#?}");
    let client = ns.run(move || std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
    let both_ends =
        |table: &Vec<String>| table.iter().filter(|l| l.starts_with("ESTAB")).count() == 2;
    eventually("the connection printed", || running.tables().last().is_some_and(both_ends));
    let printed = running.tables().len();
    std::thread::sleep(std::time::Duration::from_millis(1200));
    assert_eq!(running.tables().len(), printed, "then nothing more: {:#?}", running.tables());
    drop(running);
    // Without an agent, every interval prints.
    let alone = Running::start(&["table", "-tan", "-c", "0.2", "--netns", &ns.name, "--no-agent"]);
    eventually("a table each interval", || alone.tables().len() >= 3);
    drop((client, listener));
    assert!(agent.stop().success());
}
