//! `netwatch top` in a real pseudo-terminal (tmux's), read back from the screen: a real
//! server (python's http.server) in a namespace of the test's own, a named client holding a
//! connection to it and another refused, then sorting, filtering, a detail, and a clean exit
//! that gives the terminal back as it was; and a recorded log replayed.
//! A failed unwrap is how a test reports a missing field.
#![allow(clippy::unwrap_used)]

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use netwatch_tests::{
    Agent, NetNs, PATIENCE, http_server, netwatch_bin, require_root, sockpeer_in,
};

const PORT: u16 = 18181;
const CLOSED_PORT: u16 = 18182;

/// A tmux server of the test's own (its own socket, no user configuration), with one
/// session running a command in a terminal of a given size; killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(command: &str, width: u16, height: u16) -> Tmux {
        let tmux = Tmux { socket: format!("nwtest-{}", std::process::id()) };
        let status = tmux
            .command()
            .args(["new-session", "-d", "-s", "top", "-x", &width.to_string()])
            .args(["-y", &height.to_string(), command])
            .status()
            .expect("tmux is missing: `cargo xtask test` installs it");
        assert!(status.success(), "tmux new-session failed: {status}");
        tmux
    }

    fn command(&self) -> Command {
        let mut command = Command::new("tmux");
        command.args(["-L", &self.socket, "-f", "/dev/null"]);
        command
    }

    fn output(&self, args: &[&str]) -> String {
        let output = self.command().args(args).output().unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.output(&["capture-pane", "-p", "-t", "top"])
    }

    fn keys(&self, keys: &[&str]) {
        let status = self.command().args(["send-keys", "-t", "top"]).args(keys).status();
        assert!(status.is_ok_and(|s| s.success()), "tmux send-keys {keys:?}");
    }

    /// Waits until the screen satisfies `done`; panics with the screen after PATIENCE.
    fn wait_for(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let screen = self.screen();
            if done(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "{what} not on the screen within {PATIENCE:?}:\n{screen}"
            );
            thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.command().arg("kill-server").status();
    }
}

/// The rows of the connections pane that mention `needle`.
fn rows_with<'s>(screen: &'s str, needle: &str) -> Vec<&'s str> {
    let pane = screen.split(" Transitions").next().unwrap_or_default();
    pane.lines().filter(|l| l.contains(needle)).collect()
}

fn top_command(args: &str, ns: &NetNs) -> String {
    // After top: its exit status, and whether the terminal is back in canonical mode with
    // echo (raw mode turns both off).
    format!(
        "{} top -n --netns {} {args}; echo TOP-EXIT=$?; stty -a | tr ' ' '\\n' | grep -x -e icanon -e echo | tr '\\n' ' '; echo MODES-SHOWN; sleep 60",
        netwatch_bin().display(),
        ns.name
    )
}

#[test]
fn top_shows_owners_failures_sorts_filters_and_gives_the_terminal_back() {
    require_root();
    let ns = NetNs::new("top");
    let _server = http_server(&ns, PORT);
    let socket = Agent::test_socket("top");
    let agent = Agent::start(&socket);
    let tmux = Tmux::start(&top_command(&format!("--socket {}", agent.socket_arg()), &ns), 100, 30);
    tmux.wait_for("the server's listener and owner", |s| {
        rows_with(s, "LISTEN")
            .iter()
            .any(|r| r.contains(&format!("127.0.0.1:{PORT}")) && r.contains("python3["))
    });

    // A named client holds a connection; another connect is refused.
    let sockpeer = env!("CARGO_BIN_EXE_sockpeer");
    let (mut client, ready) =
        sockpeer_in(&ns, sockpeer, &["connect-hold", &format!("127.0.0.1:{PORT}")]);
    let client_port: u16 =
        ready.trim().strip_prefix("ready ").and_then(|p| p.parse().ok()).unwrap();
    let refused = ns
        .command(sockpeer)
        .args(["connect", &format!("127.0.0.1:{CLOSED_PORT}")])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "nothing listens on {CLOSED_PORT}");
    let client_end = format!("127.0.0.1:{client_port}");
    let screen = tmux.wait_for("the client's row, its owner, and the refusal", |s| {
        let row = rows_with(s, &client_end)
            .into_iter()
            .find(|r| r.starts_with("ESTAB") && r.contains("sockpeer["));
        row.is_some() && s.contains("SYN-SENT>CLOSE REFUSED")
    });
    let pid = client.id();
    let row = rows_with(&screen, &client_end)
        .into_iter()
        .find(|r| r.split_whitespace().nth(1) == Some(client_end.as_str()))
        .unwrap();
    let fields: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        fields[..4],
        ["ESTAB", client_end.as_str(), &format!("127.0.0.1:{PORT}"), &format!("sockpeer[{pid}]")],
        "{screen}"
    );
    let accepted = rows_with(&screen, &format!("127.0.0.1:{PORT}"))
        .into_iter()
        .find(|r| r.starts_with("ESTAB") && r.contains(&client_end))
        .unwrap_or_else(|| panic!("the server's end of the connection: {screen}"));
    assert!(accepted.contains("python3["), "owned by the server that accepted it: {accepted}");
    let refusal = screen.lines().find(|l| l.contains("REFUSED")).unwrap();
    assert!(
        refusal.contains(&format!(":{CLOSED_PORT}")) && refusal.contains("sockpeer["),
        "{refusal}"
    );

    // Sort by process (one column left of the default), then reversed.
    tmux.keys(&["<"]);
    let screen = tmux.wait_for("sorted by process", |s| s.contains("sorted by PROCESS"));
    let order = |screen: &str| {
        rows_with(screen, "127.0.0.1:")
            .iter()
            .map(|r| {
                if r.contains("python3[") {
                    'p'
                } else if r.contains("sockpeer[") {
                    's'
                } else {
                    '-'
                }
            })
            .filter(|c| *c != '-')
            .collect::<String>()
    };
    assert_eq!(order(&screen), "pps", "python3 before sockpeer:\n{screen}");
    tmux.keys(&["r"]);
    let screen = tmux.wait_for("sorted by process, reversed", |s| s.contains("PROCESS (reversed)"));
    assert_eq!(order(&screen), "spp", "reversed:\n{screen}");

    // Filter by the client's port, typed into the filter bar.
    tmux.keys(&["/"]);
    tmux.keys(&["-l", &format!("sport = :{client_port}")]);
    tmux.keys(&["Enter"]);
    let screen = tmux.wait_for("filtered to the client's end", |s| s.contains("1 shown"));
    assert_eq!(rows_with(&screen, "127.0.0.1:").len(), 1, "{screen}");
    assert!(rows_with(&screen, &client_end)[0].starts_with("ESTAB"), "{screen}");

    // Its detail: the history the agent kept.
    tmux.keys(&["Enter"]);
    let screen = tmux.wait_for("the connection's history", |s| {
        s.contains("History") && s.contains("ESTABLISHED")
    });
    assert!(
        screen.contains(&format!("sockpeer[{pid}]")) && screen.contains("SYN_SENT"),
        "{screen}"
    );
    tmux.keys(&["Escape"]);

    // q quits, and the terminal is as it was: off the alternate screen, canonical, echoing.
    tmux.keys(&["q"]);
    let screen = tmux.wait_for("top's exit", |s| s.contains("MODES-SHOWN"));
    assert!(screen.contains("TOP-EXIT=0"), "{screen}");
    assert!(screen.contains("icanon echo"), "terminal modes restored:\n{screen}");
    assert!(!screen.contains("Connections:"), "the alternate screen is gone:\n{screen}");

    drop(client.stdin.take());
    let _ = client.wait();
}

/// Without an agent, top loads its own programs; a listener's detail shows its queues;
/// `NO_COLOR` takes the colours away; SIGTERM ends it as `q` does.
#[test]
fn top_without_an_agent_and_sigterm() {
    require_root();
    let ns = NetNs::new("topd");
    let _server = http_server(&ns, PORT);
    let tmux = Tmux::start(&format!("NO_COLOR=1 {}", top_command("--no-agent", &ns)), 80, 24);
    let screen = tmux.wait_for("the listener", |s| {
        rows_with(s, "LISTEN")
            .iter()
            .any(|r| r.contains(&format!("127.0.0.1:{PORT}")) && r.contains("python3["))
    });
    assert!(screen.contains("own programs"), "{screen}");
    let escapes = tmux.output(&["capture-pane", "-e", "-p", "-t", "top"]);
    let coloured = (30..=37)
        .chain(90..=97)
        .any(|c| escapes.contains(&format!("\x1b[{c}m")) || escapes.contains(&format!(";{c}m")));
    assert!(!coloured, "NO_COLOR: no colours: {escapes:?}");
    // The listener (the state key's second stop) and its detail: the kernel's queues.
    tmux.keys(&["s", "s", "Enter"]);
    let screen = tmux.wait_for("the listener's queues", |s| s.contains("accept queue 0/"));
    assert!(screen.contains("Listener") && screen.contains("half-open 0"), "{screen}");
    tmux.keys(&["Escape"]);
    let pid = Command::new("pgrep")
        .args(["-f", "-n", &format!("top -n --netns {}", ns.name)])
        .output()
        .unwrap();
    let pid = String::from_utf8_lossy(&pid.stdout).trim().to_string();
    assert!(!pid.is_empty(), "top's pid");
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let screen = tmux.wait_for("top's exit", |s| s.contains("MODES-SHOWN"));
    assert!(screen.contains("TOP-EXIT=0") && screen.contains("icanon echo"), "{screen}");
}

/// The agent's `live` answer, which top is built on: the table, then rows as they change
/// (a UDP socket has no state transitions: only the rows tell of it) and the stream.
#[test]
fn the_agent_sends_the_table_then_its_changes() {
    use std::io::{BufRead as _, BufReader, Write as _};
    require_root();
    let ns = NetNs::new("live");
    let socket = Agent::test_socket("live");
    let agent = Agent::start(&socket);
    let sockpeer = env!("CARGO_BIN_EXE_sockpeer");
    let (mut listener, listening) = sockpeer_in(&ns, sockpeer, &["listen", "127.0.0.1:0"]);
    let port = netwatch_tests::listening_port(&listening);
    let mut stream = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    stream.write_all(b"{\"v\":1,\"cmd\":\"live\"}\n").unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut lines = BufReader::new(stream).lines();
    let table: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let listed = table.as_array().unwrap().iter().any(|l| {
        l["row"]["local"][1].as_u64() == Some(u64::from(port)) && l["row"]["state"] == "LISTEN"
    });
    assert!(listed, "the table comes first, with the listener: {table}");
    drop(listener.stdin.take());
    let _ = listener.wait();
    let (mut holder, ready) = sockpeer_in(&ns, sockpeer, &["fork-exec"]);
    assert!(ready.starts_with("ready "), "{ready}");
    let netns = ns.inode();
    let udp_row = |update: &serde_json::Value| {
        update["upsert"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["row"]["protocol"] == "udp" && l["row"]["netns"].as_u64() == Some(netns))
            .cloned()
    };
    let mut row = None;
    for line in lines.by_ref() {
        let update: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if update["type"] == "rows"
            && let Some(found) = udp_row(&update)
        {
            row = Some(found);
            break;
        }
    }
    let row = row.expect("a rows update with the UDP socket");
    let holder_pid = u64::from(holder.id());
    assert!(
        row["owners"].as_array().unwrap().iter().any(|o| o["pid"].as_u64() == Some(holder_pid)),
        "with its holder: {row}"
    );
    let cookie = row["row"]["cookie"].as_u64().unwrap();
    drop(holder.stdin.take());
    let _ = holder.wait();
    for line in lines.by_ref() {
        let update: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        let gone =
            update["gone"].as_array().into_iter().flatten().any(|c| c.as_u64() == Some(cookie));
        if update["type"] == "rows" && gone {
            return;
        }
    }
    panic!("the closed UDP socket was never reported gone");
}

/// `top --replay`: a log recorded by an agent played back stepwise, then to its end, with
/// the recording's table and owners, and a clean exit.
#[test]
fn top_replays_a_recorded_log() {
    require_root();
    let ns = NetNs::new("topr");
    let dir = std::env::temp_dir().join(format!("netwatch-test-{}-top-replay", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("events.ndjson");
    // The listener comes before the agent: the replay knows it from the log's first table.
    let server = http_server(&ns, PORT);
    let agent =
        Agent::start_with(&Agent::test_socket("top-replay"), &["--log", log.to_str().unwrap()]);
    for _ in 0..3 {
        let status = ns
            .command("curl")
            .args(["-s", "-o", "/dev/null", &format!("http://127.0.0.1:{PORT}/")])
            .status()
            .unwrap();
        assert!(status.success());
    }
    thread::sleep(Duration::from_millis(500));
    assert!(agent.stop().success());
    drop(server);
    let args = format!("--replay {} --step", log.display());
    let tmux = Tmux::start(&format!("NO_COLOR=1 {}", top_command(&args, &ns)), 120, 30);
    tmux.wait_for("a paused replay", |s| s.contains("(paused: space plays"));
    // One step: the agent's first table, with the listener and its owner.
    tmux.keys(&["."]);
    tmux.wait_for("the recorded listener", |s| {
        rows_with(s, "LISTEN")
            .iter()
            .any(|r| r.contains(&format!("127.0.0.1:{PORT}")) && r.contains("python3["))
    });
    // Space plays the rest at the recorded pace: the round trips, to the end.
    tmux.keys(&["Space"]);
    let screen = tmux.wait_for("the end of the replay", |s| s.contains("(ended)"));
    let pane = screen.split(" Transitions").nth(1).unwrap_or_default();
    assert!(pane.contains("TIME-WAIT") && pane.contains(&format!(":{PORT}")), "{screen}");
    assert!(pane.contains("curl["), "the clients, as recorded: {screen}");
    tmux.keys(&["q"]);
    let screen = tmux.wait_for("top's exit", |s| s.contains("MODES-SHOWN"));
    assert!(screen.contains("TOP-EXIT=0") && screen.contains("icanon echo"), "{screen}");
}
