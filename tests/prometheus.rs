//! netwatch's metrics as Prometheus sees them: the alert rules of `deploy/prometheus/` pass
//! `promtool check rules` and their own unit tests (`promtool test rules`), and a real
//! Prometheus server (Debian's, installed by the set-up) scrapes a test agent, loads those
//! rules, and answers queries with the connections the test made in a namespace of its own.
//! A failed unwrap is how a test reports a missing field.
#![allow(clippy::unwrap_used)]

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use netwatch_tests::{Agent, NetNs, round_trips_and_refusals};
use serde_json::Value;

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

fn promtool(args: &[&str]) {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(deploy())
        .output()
        .expect("run promtool (Debian's prometheus package, installed by `cargo xtask test`)");
    let said = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "promtool {args:?}:\n{said}");
    assert!(said.contains("SUCCESS"), "{said}");
}

#[test]
fn the_alert_rules_pass_promtools_checks_and_their_unit_tests() {
    promtool(&["check", "rules", "netwatch.rules.yml"]);
    promtool(&["test", "rules", "netwatch.rules.test.yml"]);
}

/// A Prometheus server of the test's own: its storage in a fresh directory, listening on a
/// port the kernel picks; killed when dropped.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    address: SocketAddr,
}

impl Prometheus {
    fn start(scrape: SocketAddr) -> Prometheus {
        Prometheus::with_jobs(&format!(
            "  - job_name: netwatch\n    static_configs:\n      - targets: ['{scrape}']\n"
        ))
    }

    /// A server with these `scrape_configs` entries.
    fn with_jobs(jobs: &str) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("nwt-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let rules = deploy().join("netwatch.rules.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n{jobs}",
            rules.display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg("--web.listen-address=127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run prometheus (Debian's package, installed by `cargo xtask test`)");
        // It logs the address it was given, not the port it got: the kernel's table says.
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(60);
        let address = loop {
            let ss = Command::new("ss").args(["-Hltnp"]).output().unwrap();
            let ss = String::from_utf8_lossy(&ss.stdout);
            let found = ss
                .lines()
                .find(|l| l.contains(&format!("pid={pid},")))
                .and_then(|line| line.split_whitespace().nth(3)?.parse::<SocketAddr>().ok());
            if let Some(address) = found {
                break address;
            }
            assert!(Instant::now() < deadline, "prometheus did not listen within 60 s");
            std::thread::sleep(Duration::from_millis(200));
        };
        Prometheus { child, dir, address }
    }

    /// GET `path`: the body of the answer (HTTP/1.0, so never chunked).
    fn get(&self, path: &str) -> String {
        let mut stream = TcpStream::connect(self.address).unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: prometheus\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
    }

    /// The value of an instant query's single series; None while there is none.
    fn value(&self, query: &str) -> Option<f64> {
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => char::from(b).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let answer: Value =
            serde_json::from_str(&self.get(&format!("/api/v1/query?query={encoded}"))).ok()?;
        answer["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Waits until `query` has the value `done` wants; returns it.
    fn wait_for(&self, query: &str, done: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(value) = self.value(query).filter(|v| done(*v)) {
                return value;
            }
            assert!(Instant::now() < deadline, "{query}: {:?} after 90 s", self.value(query));
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const N: usize = 5;

#[test]
fn a_real_prometheus_scrapes_the_agent_and_loads_the_rules() {
    let agent = Agent::start_with(
        &Agent::test_socket("prometheus"),
        &["--metrics", "127.0.0.1:0", "--metrics-remotes", "100000"],
    );
    let prometheus = Prometheus::start(agent.metrics_address());
    prometheus.wait_for("up{job=\"netwatch\"}", |up| up == 1.0);
    let ns = NetNs::new("prom");
    let (served, refused) = ns.run(|| round_trips_and_refusals(N));
    let connects = format!("netwatch_remote_connects_total{{remote=\"{served}\"}}");
    assert_eq!(prometheus.wait_for(&connects, |v| v >= N as f64), N as f64, "{connects}");
    let failures = format!(
        "netwatch_remote_connect_failures_total{{remote=\"{refused}\",reason=\"refused\"}}"
    );
    assert_eq!(prometheus.wait_for(&failures, |v| v >= N as f64), N as f64, "{failures}");
    // The kernel's counters, under node_exporter's names.
    prometheus.wait_for("node_netstat_Tcp_ActiveOpens", |v| v > 0.0);
    // The rules are loaded and evaluated by the server.
    let rules: Value = serde_json::from_str(&prometheus.get("/api/v1/rules")).unwrap();
    let names: Vec<&str> = rules["data"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "NetwatchEventsLost",
            "NetwatchListenOverflows",
            "NetwatchConnectFailureRatio",
            "NetwatchRetransmitRate"
        ]
    );
    assert!(
        rules["data"]["groups"][0]["rules"].as_array().unwrap().iter().all(|r| r["health"] == "ok"),
        "{rules}"
    );
    drop(prometheus);
    assert!(agent.stop().success());
}

/// A self-signed certificate for 127.0.0.1 and its key, made with openssl in `dir`.
fn certificate(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
        .args(["-nodes", "-days", "2", "-subj", "/CN=netwatch-test"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("run openssl");
    assert!(status.success());
    (cert, key)
}

/// Metrics that leave the host: Prometheus scrapes over TLS with the bearer token; a job
/// without the token is refused.
#[test]
fn prometheus_scrapes_over_tls_with_a_bearer_token() {
    let dir = std::env::temp_dir().join(format!("nwt-metrics-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = certificate(&dir);
    let token = dir.join("token");
    std::fs::write(&token, "fleet-secret\n").unwrap();
    let agent = Agent::start_with(
        &Agent::test_socket("prometheus-tls"),
        &[
            "--metrics",
            "127.0.0.1:0",
            "--metrics-tls-cert",
            cert.to_str().unwrap(),
            "--metrics-tls-key",
            key.to_str().unwrap(),
            "--metrics-token-file",
            token.to_str().unwrap(),
        ],
    );
    let target = agent.metrics_address();
    let prometheus = Prometheus::with_jobs(&format!(
        "  - job_name: netwatch\n    scheme: https\n    tls_config:\n      ca_file: {cert}\n\
         \x20   authorization:\n      credentials_file: {token}\n\
         \x20   static_configs:\n      - targets: ['{target}']\n\
         \x20 - job_name: intruder\n    scheme: https\n    tls_config:\n      ca_file: {cert}\n\
         \x20   static_configs:\n      - targets: ['{target}']\n",
        cert = cert.display(),
        token = token.display(),
    ));
    prometheus.wait_for("up{job=\"netwatch\"}", |up| up == 1.0);
    prometheus.wait_for("netwatch_records_total{job=\"netwatch\"}", |v| v >= 0.0);
    prometheus.wait_for("up{job=\"intruder\"}", |up| up == 0.0);
    assert!(prometheus.value("netwatch_records_total{job=\"intruder\"}").is_none());
    drop(prometheus);
    assert!(agent.stop().success());
    std::fs::remove_dir_all(&dir).unwrap();
}
