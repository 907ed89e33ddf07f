//! `netwatch check` and degraded modes: on the kernel the tests run on (the host, and each
//! kernel of the matrix), every hook attaches and verifies within half the verifier's limit;
//! with programs refused (NETWATCH_REFUSE_PROGRAMS, as if the kernel had rejected them),
//! netwatch says what is lost, in one line per cause, and goes on tracing.
//! A failed unwrap is how a test reports output it cannot read.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, TcpListener},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use netwatch_tests::{
    Agent, FEXIT_HOOK, client_roundtrip, ftrace_forbidden, netwatch_bin, require_root, serve_one,
};
use serde_json::Value;

/// The verifier gives up at a million instructions; a program past half of that on some
/// kernel is one change away from failing there.
const HALF_THE_VERIFIER_LIMIT: u64 = 500_000;

fn check(refuse: &str) -> (Option<i32>, Value) {
    let output = Command::new(netwatch_bin())
        .args(["check", "--json"])
        .env("NETWATCH_REFUSE_PROGRAMS", refuse)
        .output()
        .unwrap();
    let report = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
    (output.status.code(), report)
}

#[test]
fn every_hook_attaches_well_within_the_verifier_limit() {
    require_root();
    let (code, report) = check("");
    let hooks = report["hooks"].as_array().unwrap();
    let forbidden = ftrace_forbidden();
    for hook in hooks {
        if hook["program"] == "state_classic" {
            assert_eq!(hook["state"], "not_used", "the fallback is not needed: {hook}");
            continue;
        }
        if hook["state"] == "replaced" {
            // A tracepoint program whose work a trampoline program does here.
            assert!(hook["reason"].as_str().unwrap().contains("does its work"), "{hook}");
            continue;
        }
        if hook["attach"] == FEXIT_HOOK && forbidden {
            let reason = hook["reason"].as_str().unwrap_or_default();
            assert!(reason.contains("not permitted"), "ftrace is forbidden here: {hook}");
            continue;
        }
        assert_eq!(hook["state"], "attached", "{hook}");
        let insns = hook["verified_insns"].as_u64().unwrap();
        assert!(
            insns < HALF_THE_VERIFIER_LIMIT,
            "{} verified in {insns} instructions",
            hook["program"]
        );
    }
    assert_eq!(report["full_path"], !forbidden, "{report:#}");
    assert_eq!(code, Some(if forbidden { 1 } else { 0 }));
    assert_eq!(report["source"], "tp_btf/inet_sock_set_state");
    eprintln!("verified instructions on {}:", report["kernel"]);
    for hook in hooks {
        eprintln!("  {:<20} {}", hook["program"].as_str().unwrap(), hook["verified_insns"]);
    }
}

/// Runs `netwatch watch --no-agent --json` with `refuse`d programs around one round trip;
/// returns its stderr and its records.
fn watch_refusing(refuse: &str) -> (String, Vec<Value>) {
    let mut child = Command::new(netwatch_bin())
        .args(["watch", "--no-agent", "--json"])
        .env("NETWATCH_REFUSE_PROGRAMS", refuse)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    while !said.contains("netwatch: watching") {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "watch ended: {said}");
        said.push_str(&line);
    }
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let server = listener.local_addr().unwrap();
    let serving = std::thread::spawn(move || serve_one(&listener).unwrap());
    client_roundtrip(server).unwrap();
    serving.join().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "watch exits cleanly, degraded or not");
    let records = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["rport"] == server.port() || r["lport"] == server.port())
        .collect();
    (said, records)
}

/// The warning lines of `said`, less the fexit one on a machine that forbids ftrace.
fn warnings(said: &str) -> Vec<&str> {
    let forbidden = ftrace_forbidden();
    said.lines()
        .filter(|l| l.contains("WARN"))
        .filter(|l| !(forbidden && l.contains(FEXIT_HOOK)))
        .collect()
}

#[test]
fn a_refused_state_program_falls_back_to_the_classic_tracepoint() {
    require_root();
    let (code, report) = check("state_btf");
    assert_eq!((code, &report["full_path"]), (Some(1), &Value::Bool(false)), "{report:#}");
    assert_eq!(report["source"], "tracepoint sock:inet_sock_set_state");
    let (said, records) = watch_refusing("state_btf");
    let warnings = warnings(&said);
    assert!(
        warnings.iter().any(|w| w.contains("tp_btf/inet_sock_set_state not attached")),
        "says what failed: {said}"
    );
    // One line per cause: the refusal, and the programs the classic fallback cannot use.
    assert!(warnings.len() <= 3, "{said}");
    assert!(records.iter().any(|r| r["new"] == "ESTABLISHED"), "still traced: {records:#?}");
    assert!(records.iter().all(|r| r["source"] == "tracepoint"), "{records:#?}");
}

#[test]
fn a_refused_ownership_program_costs_only_what_it_gives() {
    require_root();
    let (code, report) = check("accept_exit,sock_create");
    assert_eq!(code, Some(1));
    let failed: Vec<&str> = report["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| !["attached", "replaced"].contains(&h["state"].as_str().unwrap()))
        .filter(|h| h["program"] != "state_classic")
        .filter(|h| !(h["attach"] == FEXIT_HOOK && ftrace_forbidden()))
        .map(|h| h["program"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["accept_exit", "sock_create"], "{report:#}");
    let (said, records) = watch_refusing("accept_exit,sock_create");
    let warnings = warnings(&said);
    assert_eq!(warnings.len(), 2, "one line each: {said}");
    assert!(warnings.iter().any(|w| w.contains("accepting process")), "{said}");
    assert!(records.iter().all(|r| r["source"] == "tp_btf"), "the full state path: {records:#?}");
    assert!(records.iter().any(|r| r["new"] == "ESTABLISHED"));
}

/// The agent makes its socket only once its programs are attached: a client that asks
/// meanwhile finds no agent and says so at once, rather than waiting on one not ready.
#[test]
fn a_client_never_waits_on_an_agent_that_is_not_ready() {
    require_root();
    let socket = Agent::test_socket("not-ready");
    let mut agent = Command::new(netwatch_bin())
        .args(["agent", "--socket", socket.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut answers = Vec::new();
    while started.elapsed() < Duration::from_secs(10) {
        let asked = Instant::now();
        let output = Command::new(netwatch_bin())
            .args(["stats", "--json", "--socket", socket.to_str().unwrap()])
            .output()
            .unwrap();
        let took = asked.elapsed();
        assert!(took < Duration::from_secs(2), "answered in {took:?}");
        let ready = output.status.success();
        answers.push(ready);
        if ready {
            break;
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains("no agent is running"), "{stderr}");
    }
    assert_eq!(answers.last(), Some(&true), "the agent answered once ready");
    let _ = agent.kill();
    let _ = agent.wait();
}
