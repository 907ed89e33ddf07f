//! `ss` as the oracle: its rows and the agent's, reduced to the fields both show.
//! A failed unwrap is how a test reports output it cannot read.
#![allow(clippy::unwrap_used)]
use std::process::Command;

use serde_json::Value;

use crate::{Agent, NetNs, netwatch_bin};

/// One `ss -H` line or one netwatch JSON row, as comparable fields: netid, ss state, local
/// and peer (address, port), and the sorted holders.
pub type Comparable = (String, String, (String, u16), (String, u16), Vec<String>);

/// `127.0.0.1:80`, `[::1]:80`, `*:80`, `0.0.0.0:*` -> (address, port); `*` is the dual-stack
/// wildcard, which netwatch's JSON spells `::`.
fn ss_endpoint(text: &str) -> (String, u16) {
    let (host, port) = text.rsplit_once(':').unwrap();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = if host == "*" { "::" } else { host };
    (host.to_string(), if port == "*" { 0 } else { port.parse().unwrap() })
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
            (
                r["netid"].as_str().unwrap().into(),
                ss_state(r["state"].as_str().unwrap()).into(),
                (r["laddr"].as_str().unwrap().into(), r["lport"].as_u64().unwrap() as u16),
                (r["raddr"].as_str().unwrap().into(), r["rport"].as_u64().unwrap() as u16),
                users,
            )
        })
        .collect();
    rows.sort();
    (rows, records, String::from_utf8_lossy(&output.stderr).into_owned())
}
