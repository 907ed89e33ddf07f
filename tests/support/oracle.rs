//! `ss` as the oracle: its rows and the agent's, reduced to the fields both show.
//! A failed unwrap is how a test reports output it cannot read.
#![allow(clippy::unwrap_used)]
use std::process::Command;

use serde_json::Value;

use crate::{Agent, NetNs, netwatch_bin};

/// One `ss -H` line or one netwatch JSON row, as comparable fields: netid, ss state, local
/// and peer (address, port), and the sorted holders.
pub type Comparable = (String, String, (String, u16), (String, u16), Vec<String>);

/// `127.0.0.1:80`, `[::1]:80`, `*:80`, `0.0.0.0:*`, `[fe80::1]%lo:22` -> (address, port),
/// the address with its `%interface`; `*` is the dual-stack wildcard, which netwatch's JSON
/// spells `::`.
fn ss_endpoint(text: &str) -> (String, u16) {
    let (host, port) = text.rsplit_once(':').unwrap();
    let (host, scope) = host.split_once('%').map_or((host, None), |(h, s)| (h, Some(s)));
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = if host == "*" { "::" } else { host };
    let host = scope.map_or(host.to_string(), |scope| format!("{host}%{scope}"));
    (host, if port == "*" { 0 } else { port.parse().unwrap() })
}

fn ss_users(text: &str) -> Vec<String> {
    let inner = text.strip_prefix("users:(").and_then(|t| t.strip_suffix(')')).unwrap_or("");
    let mut users: Vec<String> = inner
        .split("),(")
        .filter(|u| !u.is_empty())
        .map(|u| u.trim_matches(|c| c == '(' || c == ')').to_string())
        .collect();
    users.sort();
    users
}

pub fn ss_rows(ns: &NetNs) -> Vec<Comparable> {
    let output = ns.command("ss").args(["-H", "-tuanp"]).output().unwrap();
    let mut rows: Vec<Comparable> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (
                f[0].into(),
                f[1].into(),
                ss_endpoint(f[4]),
                ss_endpoint(f[5]),
                ss_users(f.get(6).copied().unwrap_or("")),
            )
        })
        .collect();
    rows.sort();
    rows
}

fn ss_state(kernel: &str) -> &'static str {
    match kernel {
        "ESTABLISHED" => "ESTAB",
        "CLOSE" => "UNCONN",
        "SYN_SENT" => "SYN-SENT",
        "SYN_RECV" => "SYN-RECV",
        "FIN_WAIT1" => "FIN-WAIT-1",
        "FIN_WAIT2" => "FIN-WAIT-2",
        "TIME_WAIT" => "TIME-WAIT",
        "CLOSE_WAIT" => "CLOSE-WAIT",
        "LAST_ACK" => "LAST-ACK",
        "LISTEN" => "LISTEN",
        "CLOSING" => "CLOSING",
        other => panic!("state {other}"),
    }
}

/// The agent's table for `ns` once it equals ss's: the kernel's own timers (a delayed
/// ACK, a FIN's retransmission) can still be moving sockets a moment after a test's last
/// action, and the agent's answers include every event up to the question, so the two
/// are compared until they agree, and asserted equal after PATIENCE.
pub fn settled_rows(agent: &Agent, ns: &NetNs) -> (Vec<Comparable>, Vec<Value>, String) {
    let deadline = std::time::Instant::now() + crate::PATIENCE;
    loop {
        let (ours, records, stderr) = netwatch_rows(agent, ns);
        let theirs = ss_rows(ns);
        if ours == theirs || std::time::Instant::now() > deadline {
            assert_eq!(ours, theirs, "the agent's table vs ss -tuanp in {}", ns.name);
            return (ours, records, stderr);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The agent's table for `ns`, as comparable rows, the JSON records, and netwatch's stderr.
pub fn netwatch_rows(agent: &Agent, ns: &NetNs) -> (Vec<Comparable>, Vec<Value>, String) {
    let output = Command::new(netwatch_bin())
        .args([
            "table",
            "-tuan",
            "--json",
            "--netns",
            &ns.name,
            "--socket",
            agent.socket.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let records: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    let mut rows: Vec<Comparable> = records
        .iter()
        .map(|r| {
            let mut users: Vec<String> = r["owners"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| {
                    format!("\"{}\",pid={},fd={}", o["comm"].as_str().unwrap(), o["pid"], o["fd"])
                })
                .collect();
            users.sort();
            let laddr = r["laddr"].as_str().unwrap();
            let laddr = r["scope"].as_str().map_or(laddr.into(), |s| format!("{laddr}%{s}"));
            (
                r["netid"].as_str().unwrap().into(),
                ss_state(r["state"].as_str().unwrap()).into(),
                (laddr, r["lport"].as_u64().unwrap() as u16),
                (r["raddr"].as_str().unwrap().into(), r["rport"].as_u64().unwrap() as u16),
                users,
            )
        })
        .collect();
    rows.sort();
    (rows, records, String::from_utf8_lossy(&output.stderr).into_owned())
}

/// `netwatch table -tuanp` and `ss -tuanp` as text, row for row: netid, state, local, peer
/// and process columns (queue lengths move with every packet between the two reads), sorted, with each
/// row's holders sorted (ss lists them in the order of its own hash table).
pub fn text_rows(ns: &NetNs, netwatch_args: &[&str]) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    let columns = |line: &str| -> Vec<String> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let mut users: Vec<&str> = f
            .get(6)
            .and_then(|u| u.strip_prefix("users:(")?.strip_suffix(')'))
            .map_or(Vec::new(), |u| u.split("),(").map(|u| u.trim_matches(['(', ')'])).collect());
        users.sort();
        let row = [0, 1, 4, 5].iter().map(|&i| f.get(i).copied().unwrap_or("").to_string());
        row.chain(std::iter::once(users.join(","))).collect()
    };
    let ours = Command::new(netwatch_bin())
        .args(["table", "-tuanp", "--netns", &ns.name])
        .args(netwatch_args)
        .output()
        .unwrap();
    assert!(ours.status.success(), "{}", String::from_utf8_lossy(&ours.stderr));
    let text = String::from_utf8_lossy(&ours.stdout);
    let mut lines = text.lines();
    // Columns after Process (In-State) are cut where the header has them.
    let header = lines.next().unwrap_or("");
    let end = header.find("In-State").unwrap_or(usize::MAX);
    let mut ours: Vec<Vec<String>> = lines.map(|l| columns(l.get(..end).unwrap_or(l))).collect();
    ours.sort();
    let theirs = ns.command("ss").args(["-H", "-tuanp"]).output().unwrap();
    let mut theirs: Vec<Vec<String>> =
        String::from_utf8_lossy(&theirs.stdout).lines().map(columns).collect();
    theirs.sort();
    (ours, theirs)
}
