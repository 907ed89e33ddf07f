//! The command line as a user meets it: every command survives a reader that goes away
//! (`netwatch ... | head`), and a mistake in the arguments gets one line and exit status 2.
//! A failed unwrap is how a test reports a missing field.
#![allow(clippy::unwrap_used)]

use std::{
    net::{Ipv4Addr, TcpListener, TcpStream},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use netwatch_tests::{Agent, NetNs, PATIENCE, netwatch_bin, require_root};

/// Runs netwatch with `args` and its stdout's reader gone before anything is written; `poke`
/// runs until it exits (a stream writes only when there is something to write).
fn with_closed_stdout(args: &[&str], poke: impl Fn()) -> (Option<i32>, String) {
    let mut child = Command::new(netwatch_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "{args:?} did not end when its reader went away");
        poke();
        thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn every_command_survives_a_closed_stdout() {
    require_root();
    let agent = Agent::start(&Agent::test_socket("pipe"));
    let socket = agent.socket.to_str().unwrap();
    // Something for every command to print: a listener and connections to it, in a
    // namespace of this test's own.
    let ns = NetNs::new("pipe");
    let listener = ns.run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap());
    let address = listener.local_addr().unwrap();
    let connect = || {
        ns.run(move || drop(TcpStream::connect(address).unwrap()));
    };
    connect();
    for args in [
        vec!["table", "--socket", socket],
        vec!["table", "--socket", socket, "--json"],
        vec!["table", "--no-agent", "-a"],
        vec!["table", "--socket", socket, "-tanpei"],
        vec!["table", "--no-agent", "-c", "0.2"],
        vec!["counters", "--socket", socket, "-a", "--no-update"],
        vec!["counters", "--no-agent", "-a", "--json", "--no-update"],
        vec!["-s", "--socket", socket, "-a", "--no-update", "-c", "0.2"],
        vec!["history", "--socket", socket],
        vec!["history", "--socket", socket, "--json"],
        vec!["stats", "--socket", socket],
        vec!["stats", "--socket", socket, "--json"],
        vec!["watch", "--socket", socket],
        vec!["watch", "--socket", socket, "--json"],
        vec!["watch", "--no-agent"],
        // No command: the stream, since stdout is not a terminal.
        vec!["--socket", socket],
        vec!["--help"],
    ] {
        let (code, stderr) = with_closed_stdout(&args, connect);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{stderr}");
    }
    drop(listener);
    assert!(agent.stop().success());
}

/// `--netns` names a namespace that exists, or netwatch says which one it could not find.
#[test]
fn an_unknown_namespace_is_a_usage_error() {
    require_root();
    for (command, wanted) in
        [("table", "nosuch"), ("table", "4026531"), ("table", "-"), ("counters", "nosuch")]
    {
        let output =
            Command::new(netwatch_bin()).args([command, "--netns", wanted]).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{wanted}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(&format!("no network namespace '{wanted}'")), "{stderr}");
    }
    let ns = NetNs::new("named");
    for known in [ns.name.clone(), ns.inode().to_string()] {
        let output = Command::new(netwatch_bin())
            .args(["table", "--no-agent", "--netns", &known])
            .output()
            .unwrap();
        assert!(output.status.success(), "{known}: {}", String::from_utf8_lossy(&output.stderr));
    }
}

#[test]
fn bad_arguments_exit_2_with_one_line_naming_the_value() {
    for (args, needle) in [
        (&["--state", "SYN_SEND"][..], "'SYN_SEND'"),
        (&["watch", "--port", "70000"][..], "70000"),
        (&["watch", "--transition", "SYN_SENT-ESTABLISHED"][..], "OLD:NEW"),
        (&["-4", "-6"][..], "cannot be used with"),
        (&["table", "-c", "0"][..], "out of range"),
        (&["counters", "--interval", "soon"][..], "'soon'"),
        (&["-tx"][..], "unexpected argument"),
    ] {
        let output = Command::new(netwatch_bin()).args(args).output().expect("run netwatch");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.lines().next().is_some_and(|l| l.contains(needle)), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty());
    }
    let output = Command::new(netwatch_bin()).args(["--state", "nope"]).output().expect("run");
    assert!(String::from_utf8_lossy(&output.stderr).contains("ESTABLISHED, SYN_SENT, SYN_RECV"));
}

#[test]
fn non_root_gets_a_clear_message() {
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(netwatch_bin())
        .output()
        .expect("run setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    // "must run as root", or, where an agent's root-only directory exists, that its socket
    // is root's.
    assert!(stderr.contains("run as root"), "{stderr}");
}

/// Asking for one connection the agent does not know is an error that says so, and a
/// snapshot asked for is not reported as a missing agent.
#[test]
fn questions_get_answers_that_say_what_is_true() {
    require_root();
    let agent = Agent::start(&Agent::test_socket("answers"));
    let socket = agent.socket.to_str().unwrap();
    let output = Command::new(netwatch_bin())
        .args(["history", "--socket", socket, "--cookie", "18446744073709551615"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no connection with cookie 18446744073709551615"), "{stderr}");
    for asked in ["--no-agent", "--from-proc"] {
        let output = Command::new(netwatch_bin())
            .args(["table", asked, "--socket", socket])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{asked}: {stderr}");
        assert!(!stderr.contains("no agent"), "an agent runs; {asked} asked for this: {stderr}");
    }
    assert!(agent.stop().success());
}
