//! Helpers for the privileged integration tests: run the real `netwatch` binary, make real
//! sockets (in this process, in child processes, in network namespaces made here), and read
//! back what netwatch printed.
//!
//! The tracepoints are system-wide, so every test filters what it reads by its own ports.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// How long a test waits for netwatch to attach or for expected lines to appear.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The netwatch binary under test: `$NETWATCH_BIN` (set by `cargo xtask test`) or the
/// workspace's release build.
pub fn netwatch_bin() -> PathBuf {
    let path = std::env::var_os("NETWATCH_BIN").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/netwatch")
    });
    assert!(
        path.exists(),
        "netwatch binary not found at {}: run `cargo xtask test` (it builds it and sets NETWATCH_BIN)",
        path.display()
    );
    path
}

/// These tests load eBPF programs: without root they must fail, loudly, not skip.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "privileged integration test run without root: run `sudo -E cargo xtask test`"
    );
}

/// This process's name as the kernel (and `ss -p`) shows it: the test binary's, not a
/// test thread's.
pub fn own_comm() -> String {
    std::fs::read_to_string("/proc/self/comm").expect("read /proc/self/comm").trim().to_string()
}

/// A netwatch process whose stdout lines and stderr text are collected as they arrive.
struct Spawned {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    stdout_reader: thread::JoinHandle<()>,
}

/// Spawns netwatch with `args` and waits until a stderr line contains `ready`.
fn spawn_until_ready(args: &[&str], ready: &'static str) -> Spawned {
    require_root();
    let mut child = Command::new(netwatch_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn netwatch");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    let stdout_reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            sink.lock().expect("lines").push(line);
        }
    });
    let stderr_text = Arc::new(Mutex::new(String::new()));
    let (ready_tx, ready_rx) = mpsc::channel();
    let sink = Arc::clone(&stderr_text);
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            {
                let mut text = sink.lock().expect("stderr");
                text.push_str(&line);
                text.push('\n');
            }
            // After recording it, so that a caller woken by this sees the line.
            if line.contains(ready) {
                let _ = ready_tx.send(());
            }
        }
    });
    if ready_rx.recv_timeout(PATIENCE).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "netwatch {args:?} not ready within {PATIENCE:?}; stderr:\n{}",
            stderr_text.lock().expect("stderr")
        );
    }
    Spawned { child, lines, stderr: stderr_text, stdout_reader }
}

/// A running `netwatch agent` on its own socket; killed when dropped.
pub struct Agent {
    pub child: Child,
    pub socket: PathBuf,
    pub stderr: Arc<Mutex<String>>,
}

impl Agent {
    pub fn start(socket: &std::path::Path) -> Agent {
        Agent::start_with(socket, &[])
    }

    pub fn start_with(socket: &std::path::Path, extra: &[&str]) -> Agent {
        let socket_arg = socket.to_str().expect("utf-8 path");
        let args: Vec<&str> =
            ["agent", "--socket", socket_arg].into_iter().chain(extra.iter().copied()).collect();
        let Spawned { child, stderr, .. } = spawn_until_ready(&args, "serving");
        Agent { child, socket: socket.to_path_buf(), stderr }
    }

    /// The agent's socket, as a command-line argument.
    pub fn socket_arg(&self) -> &str {
        self.socket.to_str().expect("utf-8 path")
    }

    /// A socket path of this test's own, in a fresh directory.
    pub fn test_socket(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("netwatch-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("agent.sock")
    }

    /// `netwatch COMMAND --json --socket AGENT ARGS...`, parsed; asserts it succeeded.
    pub fn ask_json(&self, command: &str, args: &[&str]) -> Value {
        let output = Command::new(netwatch_bin())
            .args([command, "--json", "--socket", self.socket.to_str().expect("utf-8 path")])
            .args(args)
            .output()
            .expect("run netwatch");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice(&output.stdout).expect("netwatch printed JSON")
    }

    /// The metrics endpoint's address, as the agent announced it (`--metrics 127.0.0.1:0`
    /// lets the kernel pick the port, so no test picks one and releases it first).
    pub fn metrics_address(&self) -> std::net::SocketAddr {
        let stderr = self.stderr.lock().expect("stderr").clone();
        let (_, after) = stderr.split_once("metrics on http").expect("agent with --metrics");
        let after = after.trim_start_matches('s').trim_start_matches("://");
        let (address, _) = after.split_once("/metrics").expect("metrics URL");
        address.parse().expect("metrics address")
    }

    /// One scrape of the metrics endpoint: the HTTP response's body; asserts a 200.
    pub fn scrape(&self) -> String {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(self.metrics_address()).expect("connect");
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_string()
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(mut self) -> ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        self.child.wait().expect("wait for agent")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `netwatch watch` whose stdout lines are collected as they arrive.
pub struct Watcher {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stdout_reader: Option<thread::JoinHandle<()>>,
    pub stderr: Arc<Mutex<String>>,
}

impl Watcher {
    /// Starts `netwatch watch ARGS` and waits until it says it is attached. Without a
    /// `--socket` of the test's own agent it loads programs of its own (`--no-agent`), so an
    /// agent running on the host cannot answer in its place.
    pub fn start(args: &[&str]) -> Watcher {
        let own = if args.contains(&"--socket") || args.contains(&"--no-agent") {
            None
        } else {
            Some("--no-agent")
        };
        let args: Vec<&str> =
            std::iter::once("watch").chain(args.iter().copied()).chain(own).collect();
        let Spawned { child, lines, stderr, stdout_reader } =
            spawn_until_ready(&args, "netwatch: watching");
        // Attached to an agent, the watch says so once connected, which can be a moment
        // before the agent has accepted it and subscribed it to the stream. The agent accepts
        // in order: once it has answered a later connection, the watch is subscribed.
        if let Some(at) = args.iter().position(|a| *a == "--socket") {
            let output = Command::new(netwatch_bin())
                .args(["stats", "--json", "--socket", args[at + 1]])
                .output()
                .expect("run netwatch stats");
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        }
        Watcher { child, lines, stdout_reader: Some(stdout_reader), stderr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr").clone()
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// Waits until `done` holds for the lines so far; panics with the output after PATIENCE.
    pub fn wait_until(&self, what: &str, done: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if done(&self.lines()) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "timed out waiting for {what}; output:\n{}\nstderr:\n{}",
            self.lines().join("\n"),
            self.stderr()
        );
    }

    /// Sends `signal`, waits for exit, and returns the exit status with every stdout line.
    pub fn stop_with(mut self, signal: libc::c_int) -> (ExitStatus, Vec<String>) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("netwatch did not exit after signal {signal}");
            }
            thread::sleep(Duration::from_millis(10));
        };
        if let Some(reader) = self.stdout_reader.take() {
            reader.join().expect("stdout reader");
        }
        (status, self.lines())
    }

    /// SIGTERM; asserts a clean exit (code 0) and returns the stdout lines.
    pub fn stop(self) -> Vec<String> {
        let stderr = Arc::clone(&self.stderr);
        let (status, lines) = self.stop_with(libc::SIGTERM);
        assert!(
            status.success(),
            "netwatch exited with {status}; stderr:\n{}",
            stderr.lock().expect("stderr")
        );
        lines
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses NDJSON lines, failing the test on any line that is not a JSON object.
pub fn parse_json(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|line| {
            let value: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(value.is_object(), "not a JSON object: {line}");
            value
        })
        .collect()
}

/// Transition records whose local and remote ports are exactly these.
pub fn transitions_between(records: &[Value], lport: u16, rport: u16) -> Vec<Value> {
    records
        .iter()
        .filter(|r| r["type"] == "transition" && r["lport"] == lport && r["rport"] == rport)
        .cloned()
        .collect()
}

/// `[(old, new)]` of a list of transition records.
pub fn path(records: &[Value]) -> Vec<(String, String)> {
    records
        .iter()
        .map(|r| {
            (
                r["old"].as_str().unwrap_or("?").to_string(),
                r["new"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

pub fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

/// The client side of the test protocol: connect, send "ping", read "pong", close first.
/// Returns the local address the kernel chose.
pub fn client_roundtrip(server: SocketAddr) -> std::io::Result<SocketAddr> {
    let mut stream = TcpStream::connect(server)?;
    let local = stream.local_addr()?;
    stream.write_all(b"ping")?;
    let mut reply = [0u8; 4];
    stream.read_exact(&mut reply)?;
    // Let the server reach its read of EOF after our FIN, so the close order is fixed.
    drop(stream);
    Ok(local)
}

/// The server side: accept one connection, answer "pong", wait for the client's close, close.
pub fn serve_one(listener: &TcpListener) -> std::io::Result<SocketAddr> {
    let (mut stream, peer) = listener.accept()?;
    let mut request = [0u8; 4];
    stream.read_exact(&mut request)?;
    stream.write_all(b"pong")?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?; // returns at the client's FIN
    drop(stream);
    Ok(peer)
}

/// On the calling thread's loopback: `n` round trips to a listener of its own, then `n`
/// connects refused by a port nobody listens on (a listener's, bound and closed). Returns
/// the listener's address and the refusing one.
pub fn round_trips_and_refusals(n: usize) -> (SocketAddr, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("listener address");
    let server = thread::spawn(move || {
        for _ in 0..n {
            serve_one(&listener).expect("serve");
        }
    });
    for _ in 0..n {
        client_roundtrip(address).expect("round trip");
    }
    server.join().expect("server thread");
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address");
    for _ in 0..n {
        assert!(TcpStream::connect(closed).is_err(), "a connect to {closed} was refused");
    }
    (address, closed)
}

/// A named network namespace, deleted (with its veth end) when dropped.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(suffix: &str) -> NetNs {
        let name = format!("nwt-{}-{suffix}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace and asserts it succeeded.
    pub fn exec(&self, command: &[&str]) {
        let status = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(command)
            .status()
            .expect("ip netns exec");
        assert!(status.success(), "{command:?} in {} failed: {status}", self.name);
    }

    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Drops the first TCP packet carrying `flag` (an nft flag name: `syn`, `psh`) that each
    /// client socket sends to `port` in this namespace, so that the sender retransmits it (a
    /// SYN after the initial RTO of one second, data after the minimum RTO of 200 ms).
    pub fn drop_first(&self, port: u16, flag: &str) {
        let matches = format!("tcp dport {port} tcp flags & {flag} == {flag}");
        let rules = format!(
            "table inet netwatch_test {{
               set seen_{flag} {{ type ipv4_addr . inet_service; flags dynamic; timeout 5m; }}
               chain drop_first_{flag} {{
                 type filter hook input priority 0; policy accept;
                 {matches} ip saddr . tcp sport @seen_{flag} accept
                 {matches} add @seen_{flag} {{ ip saddr . tcp sport }} drop
               }}
             }}"
        );
        self.nft(&rules);
    }

    /// Drops every bare ACK (no data, SYN, FIN or RST) sent to `port` in this namespace: a
    /// handshake's last packet never arrives, and the server's side stays half-open.
    pub fn drop_bare_acks(&self, port: u16) {
        self.nft(&format!(
            "table inet netwatch_test {{
               chain drop_acks {{
                 type filter hook input priority 0; policy accept;
                 tcp dport {port} tcp flags & (syn | ack | fin | rst | psh) == ack drop
               }}
             }}"
        ));
    }

    /// Loads nftables `rules` in this namespace.
    pub fn nft(&self, rules: &str) {
        let mut nft = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("run nft (nftables, installed by `cargo xtask setup`)");
        nft.stdin.take().expect("stdin").write_all(rules.as_bytes()).expect("write nft rules");
        let status = nft.wait().expect("wait for nft");
        assert!(status.success(), "nft rules in {} failed: {status}", self.name);
    }

    /// Runs `work` on a thread of its own that has joined this namespace: the sockets it
    /// makes, and those of the threads it starts, are this namespace's.
    pub fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        use std::os::fd::AsRawFd as _;
        let file = std::fs::File::open(format!("/run/netns/{}", self.name)).expect("netns file");
        thread::spawn(move || {
            // SAFETY: setns on this thread only, with a namespace fd that stays open.
            let joined = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(joined, 0, "setns: {}", std::io::Error::last_os_error());
            work()
        })
        .join()
        .expect("work in the namespace")
    }

    /// The namespace's inode number, as netwatch reports it.
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(format!("/run/netns/{}", self.name)).expect("netns file").ino()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Runs `ip ARGS` and asserts it succeeded.
pub fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip (iproute2)");
    assert!(status.success(), "ip {args:?} failed: {status}");
}

/// Two namespaces joined by a veth pair, `a` at 10.231.0.1/24 and `b` at 10.231.0.2/24
/// (test-made hosts: no traffic leaves this machine).
pub fn veth_pair() -> (NetNs, NetNs) {
    let a = NetNs::new("a");
    let b = NetNs::new("b");
    let (va, vb) = (format!("nwa{}", std::process::id()), format!("nwb{}", std::process::id()));
    ip(&[
        "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns", &b.name,
    ]);
    a.exec(&["ip", "addr", "add", "10.231.0.1/24", "dev", &va]);
    b.exec(&["ip", "addr", "add", "10.231.0.2/24", "dev", &vb]);
    a.exec(&["ip", "link", "set", &va, "up"]);
    b.exec(&["ip", "link", "set", &vb, "up"]);
    (a, b)
}

/// A `sockpeer hold` running inside `ns`, holding a mix of sockets in every state and shape
/// `ss` lists until dropped. `ports` are its three listeners' (IPv4, IPv6, dual-stack).
pub struct Holder {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: BufReader<std::process::ChildStdout>,
    pub pid: u32,
    pub ports: Vec<u16>,
}

impl Holder {
    /// `sockpeer` is the test binary's path (`env!("CARGO_BIN_EXE_sockpeer")` in a test).
    /// Gives `ns` what the mix needs first: fe80::1 on lo, and bare ACKs to the half-open
    /// port dropped.
    pub fn start(ns: &NetNs, sockpeer: &str) -> Holder {
        require_root();
        let has_link_local = ns
            .command("ip")
            .args(["-6", "addr", "show", "dev", "lo"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("fe80::1/64"));
        if !has_link_local {
            ns.exec(&["ip", "addr", "add", "fe80::1/64", "dev", "lo", "nodad"]);
            ns.drop_bare_acks(HALF_OPEN_PORT);
        }
        let mut child = ns
            .command(sockpeer)
            .arg("hold")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("sockpeer hold: {e}"));
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("sockpeer hold's first line");
        let ports = line
            .trim()
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("sockpeer hold did not get ready: {line:?}"))
            .split_whitespace()
            .map(|p| p.parse().expect("port"))
            .collect();
        Holder { pid: child.id(), child, stdin, stdout, ports }
    }

    /// Runs the holder's second step (see sockpeer's `hold`) and waits until it is done.
    pub fn next_step(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin.write_all(b"next\n").and_then(|()| stdin.flush()).expect("write to sockpeer");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("sockpeer hold's answer");
        assert_eq!(line.trim(), "done", "sockpeer hold's second step");
    }
}

/// The port of the holder's half-open connection (its namespace drops bare ACKs to it).
pub const HALF_OPEN_PORT: u16 = 9000;

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port in a sockpeer `listening PORT` line.
pub fn listening_port(line: &str) -> u16 {
    line.trim()
        .strip_prefix("listening ")
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("not a `listening PORT` line: {line:?}"))
}

/// Starts `sockpeer ARGS` inside `ns` with its stdin piped (the modes that hold sockets keep
/// them until it closes) and returns it with the first line it printed.
pub fn sockpeer_in(ns: &NetNs, sockpeer: &str, args: &[&str]) -> (Child, String) {
    let mut child = ns
        .command(sockpeer)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("sockpeer {args:?}: {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("sockpeer {args:?} printed nothing: {e}"));
    (child, line)
}

/// Whether this machine forbids ftrace (a sandboxed kernel: `available_filter_functions`
/// refuses even root), and with it the trampolines fentry/fexit programs need. The kernels of
/// the matrix allow them.
pub fn ftrace_forbidden() -> bool {
    std::fs::read_to_string("/sys/kernel/tracing/available_filter_functions")
        .is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
}

/// The `fexit` program netwatch has, which [`ftrace_forbidden`] machines refuse.
pub const FEXIT_HOOK: &str = "fexit/inet_csk_clone_lock";

pub mod oracle;

/// Waits until `done` holds; panics naming `what` after PATIENCE.
pub fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// python3's http.server in `ns` on 127.0.0.1:`port`, once it listens; stopped when dropped.
pub struct HttpServer(Child);

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn http_server(ns: &NetNs, port: u16) -> HttpServer {
    let server = HttpServer(
        ns.command("/usr/bin/python3")
            .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 is missing: `cargo xtask test` installs it"),
    );
    wait_for("http.server to listen", || {
        let ss = ns.command("ss").args(["-Htln", &format!("sport = :{port}")]).output();
        ss.is_ok_and(|ss| !ss.stdout.is_empty())
    });
    server
}
