//! How connections fail, as the stream reports it: a connect nobody answers (`timeout`,
//! `aborted`) and an abortive close (`reset_sent` on one end, `reset` on the other).
//! A failed unwrap is how a test reports a missing field.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, TcpListener, TcpStream};

use netwatch_tests::{Watcher, parse_json, require_root, veth_pair};

/// A connect nobody answers ends in `timeout` when the kernel gives up, and in `aborted` when
/// its owner closes it first. The SYNs go to a made-up neighbour (a permanent entry with a
/// MAC nobody has), so the peer namespace drops them and nothing comes back.
#[test]
fn unanswered_connects_are_classified() {
    require_root();
    let (ns, _peer) = veth_pair();
    let device = format!("nwa{}", std::process::id());
    ns.exec(&[
        "ip",
        "neigh",
        "add",
        "10.231.0.9",
        "lladdr",
        "02:00:00:00:00:09",
        "dev",
        &device,
        "nud",
        "permanent",
    ]);
    let closes =
        |lines: &[String]| lines.iter().filter(|l| l.contains("\"new\":\"CLOSE\"")).count();
    // The kernel skips a tracing program's run that interrupts another run of it on the same
    // CPU; netwatch then reports the loss (`skipped`). Only then is the attempt made again.
    let mut records = Vec::new();
    for attempt in 1..=2 {
        let watcher = Watcher::start(&["--json", "--no-agent", "--dport", "4999"]);
        for how in ["timeout", "abort"] {
            let status = ns
                .command(env!("CARGO_BIN_EXE_sockpeer"))
                .args(["connect-fail", "10.231.0.9:4999", how])
                .status()
                .expect("sockpeer connect-fail");
            assert!(status.success(), "{how}");
        }
        let skipped = |lines: &[String]| lines.iter().any(|l| l.contains("\"reason\":\"skipped\""));
        watcher.wait_until("two failed attempts, or a reported loss", |lines| {
            closes(lines) >= 2 || skipped(lines)
        });
        let lines = watcher.stop();
        if closes(&lines) >= 2 || attempt == 2 || !skipped(&lines) {
            records = parse_json(&lines);
            break;
        }
        eprintln!("events were skipped by the kernel (reported); trying again: {lines:#?}");
    }
    let failures: Vec<&str> = records
        .iter()
        .filter(|r| r["new"] == "CLOSE")
        .map(|r| r["failure"].as_str().unwrap_or("none"))
        .collect();
    assert_eq!(failures, ["timeout", "aborted"], "{records:#?}");
    let timeout = records.iter().find(|r| r["failure"] == "timeout").unwrap();
    assert_eq!(timeout["old"], "SYN_SENT");
    assert!(
        timeout["duration_ms"].as_f64().unwrap() > 2500.0,
        "one SYN retry takes about 3 s: {timeout}"
    );
}

/// A connection its owner closes with SO_LINGER 0 ends with a RST: `reset_sent` on the end
/// that sent it, `reset` on the end that received it.
#[test]
fn an_abortive_close_is_reset_sent_on_one_end_and_reset_on_the_other() {
    use std::os::fd::AsRawFd as _;
    require_root();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let watcher = Watcher::start(&["--json", "--no-agent", "--port", &port.to_string()]);
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let client_port = client.local_addr().unwrap().port();
    let (server, _) = listener.accept().unwrap();
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid fd and a pointer to a linger struct of the given size.
    let set = unsafe {
        libc::setsockopt(
            client.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0);
    drop(client);
    watcher.wait_until("both ends closed", |lines| {
        lines.iter().filter(|l| l.contains("\"new\":\"CLOSE\"")).count() >= 2
    });
    drop(server);
    let records = parse_json(&watcher.stop());
    let failure_of = |lport: u16| {
        records
            .iter()
            .find(|r| r["new"] == "CLOSE" && r["lport"] == lport)
            .map(|r| (r["old"].clone(), r["failure"].clone()))
            .unwrap_or_else(|| panic!("no CLOSE for :{lport}: {records:#?}"))
    };
    assert_eq!(failure_of(client_port), ("ESTABLISHED".into(), "reset_sent".into()));
    assert_eq!(failure_of(port), ("ESTABLISHED".into(), "reset".into()));
}
