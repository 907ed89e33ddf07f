//! OTLP export against a real receiver built from the official protobuf definitions
//! (`support/otlp_receiver.py`, the opentelemetry-proto package): over HTTP and gRPC the
//! events of known connections arrive as log records with their socket, process and node
//! attributes, the metrics as OTLP metrics, with the user's header; a receiver that stalls
//! costs dropped records, counted and reported, not agent memory or lost events.
//! A failed unwrap is how a test reports a missing field.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use netwatch_tests::{Agent, NetNs, PATIENCE, Watcher, parse_json, require_root};
use serde_json::Value;

/// A running receiver and the requests it printed.
struct Receiver {
    child: Child,
    port: u16,
    requests: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    fn start(protocol: &str, mode: &str) -> Receiver {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let python = root.join("target/test-python/bin/python");
        assert!(python.exists(), "{} missing: run `cargo xtask test`", python.display());
        let mut child = Command::new(python)
            .arg(root.join("tests/support/otlp_receiver.py"))
            .args([protocol, mode])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        let port = first.strip_prefix("listening ").unwrap().parse().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let collected = requests.clone();
        thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                collected.lock().unwrap().push(serde_json::from_str(&line).unwrap());
            }
        });
        Receiver { child, port, requests }
    }

    fn requests(&self, kind: &str) -> Vec<Value> {
        self.requests.lock().unwrap().iter().filter(|r| r["kind"] == kind).cloned().collect()
    }

    /// Every log record received, each with its resource's attributes.
    fn log_records(&self) -> Vec<(Value, Value)> {
        let mut records = Vec::new();
        for request in self.requests("logs") {
            for resource_logs in request["request"]["resourceLogs"].as_array().unwrap() {
                let resource = resource_logs["resource"]["attributes"].clone();
                for scope in resource_logs["scopeLogs"].as_array().unwrap() {
                    for record in scope["logRecords"].as_array().unwrap() {
                        records.push((resource.clone(), record.clone()));
                    }
                }
            }
        }
        records
    }

    fn wait_until(&self, what: &str, done: impl Fn(&Receiver) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An attribute's value in OTLP's JSON form (`{"stringValue": ...}`, `{"intValue": "5"}`).
fn attribute(attributes: &Value, key: &str) -> Option<String> {
    let kv = attributes.as_array()?.iter().find(|kv| kv["key"] == key)?;
    let value = &kv["value"];
    let text = value["stringValue"].as_str().or(value["intValue"].as_str())?;
    Some(text.to_string())
}

/// `n` round trips to a listener of this namespace; its port.
fn round_trips(n: usize) -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    for _ in 0..n {
        let client = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        drop(listener.accept().unwrap());
        drop(client);
    }
    port
}

fn exports_connections_and_metrics(protocol: &str) {
    require_root();
    let receiver = Receiver::start(protocol, "accept");
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let agent = Agent::start_with(
        &Agent::test_socket(&format!("otlp-{protocol}")),
        &[
            "--otlp",
            &endpoint,
            "--otlp-protocol",
            protocol,
            "--otlp-header",
            "authorization=Bearer fleet-token",
            "--otlp-metrics-interval",
            "1s",
        ],
    );
    let ns = NetNs::new(&format!("otlp-{protocol}"));
    let port = ns.run(|| round_trips(3));
    let pid = std::process::id().to_string();
    let connects = |receiver: &Receiver| {
        receiver
            .log_records()
            .into_iter()
            .filter(|(_, r)| {
                attribute(&r["attributes"], "network.peer.port") == Some(port.to_string())
                    && attribute(&r["attributes"], "netwatch.new_state").as_deref()
                        == Some("ESTABLISHED")
                    && attribute(&r["attributes"], "netwatch.old_state").as_deref()
                        == Some("SYN_SENT")
            })
            .collect::<Vec<_>>()
    };
    receiver.wait_until("the three connects as log records", |r| connects(r).len() == 3);
    for (resource, record) in connects(&receiver) {
        assert_eq!(record["eventName"], "netwatch.transition");
        assert_eq!(attribute(&record["attributes"], "process.pid"), Some(pid.clone()));
        assert_eq!(attribute(&record["attributes"], "network.peer.address").unwrap(), "127.0.0.1");
        assert_eq!(attribute(&resource, "service.name").unwrap(), "netwatch");
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(attribute(&resource, "host.name").unwrap(), host.trim());
        let body = record["body"]["stringValue"].as_str().unwrap();
        assert!(body.starts_with("SYN_SENT -> ESTABLISHED "), "{body}");
        assert!(body.ends_with(&format!(" -> 127.0.0.1:{port}")), "{body}");
    }
    receiver.wait_until("metrics with the transitions", |r| {
        r.requests("metrics").iter().any(|m| m.to_string().contains("netwatch_transitions"))
    });
    let request = receiver.requests("logs").pop().unwrap();
    assert_eq!(request["headers"]["authorization"], "Bearer fleet-token");
    assert!(agent.stop().success());
}

#[test]
fn http_exports_connections_and_metrics() {
    exports_connections_and_metrics("http");
}

#[test]
fn grpc_exports_connections_and_metrics() {
    exports_connections_and_metrics("grpc");
}

/// The agent's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The sum of the series whose line starts with `series`.
fn metric(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_stalled_receiver_costs_counted_drops_not_memory() {
    require_root();
    let receiver = Receiver::start("http", "stall");
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let agent = Agent::start_with(
        &Agent::test_socket("otlp-stall"),
        &["--otlp", &endpoint, "--metrics", "127.0.0.1:0"],
    );
    let watch = Watcher::start(&["--socket", agent.socket_arg(), "--json"]);
    let ns = NetNs::new("otlp-stall");
    ns.run(|| round_trips(10));
    thread::sleep(Duration::from_secs(2));
    let before = rss_kib(agent.child.id());
    // Far more records than the exporter may hold while its request hangs.
    ns.run(|| round_trips(6000));
    watch.wait_until("an export_dropped record", |lines| {
        parse_json(lines).iter().any(|r| r["type"] == "export_dropped")
    });
    let scrape = agent.scrape();
    let dropped = metric(&scrape, "netwatch_otlp_dropped_records_total{reason=\"queue_full\"}");
    assert!(dropped > 10_000.0, "{scrape}");
    assert_eq!(metric(&scrape, "netwatch_otlp_exported_records_total"), 0.0);
    assert_eq!(metric(&scrape, "netwatch_lost_events_total"), 0.0, "tracing lost nothing");
    let after = rss_kib(agent.child.id());
    assert!(after < before + 32 * 1024, "RSS grew from {before} KiB to {after} KiB");
    let reported: u64 = parse_json(&watch.stop())
        .iter()
        .filter(|r| r["type"] == "export_dropped")
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert!(reported > 0 && reported as f64 <= dropped, "{reported} of {dropped}");
    assert!(agent.stop().success());
}
