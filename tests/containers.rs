//! Container and pod attribution: processes moved into cgroups laid out as each runtime lays
//! them out (containerd and CRI-O under a kubelet's kubepods, docker, podman), with the
//! kubelet's log directories naming the pod, connect, accept and exit; the table, the
//! stream, the histories and the log name their container and pod, also after they exited
//! and their cgroups were removed.
//! A failed unwrap is how a test reports a missing field.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use netwatch_tests::{Agent, NetNs, PATIENCE, Watcher, netwatch_bin, parse_json, require_root};
use serde_json::Value;

const CONTAINERD: &str = "c0ffee0000000000000000000000000000000000000000000000000000000001";
const DOCKER: &str = "d0c4e40000000000000000000000000000000000000000000000000000000002";
const CRIO: &str = "c410000000000000000000000000000000000000000000000000000000000003";
const PODMAN: &str = "9a1b0d0000000000000000000000000000000000000000000000000000000004";
const WEB_UID: &str = "11111111-2222-4333-8444-555555555555";
const JOB_UID: &str = "66666666-7777-4888-9999-aaaaaaaaaaaa";

/// The cgroup2 mount, as the agent finds it.
fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mounts
        .lines()
        .find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            after.starts_with("cgroup2 ").then(|| PathBuf::from(before.split(' ').nth(4).unwrap()))
        })
        .expect("a cgroup2 mount")
}

/// A tree of runtime-shaped cgroups under a directory of this test's own, removed (leaves
/// first) when dropped.
struct Cgroups {
    top: PathBuf,
}

impl Cgroups {
    fn new() -> Cgroups {
        let top = cgroup2_root().join(format!("netwatch-test-{}", std::process::id()));
        std::fs::create_dir_all(&top).unwrap();
        Cgroups { top }
    }

    /// Makes `path` (relative) and returns its directory.
    fn make(&self, path: &str) -> PathBuf {
        let dir = self.top.join(path);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn remove(&self) {
        let mut dirs = vec![];
        let mut pending = vec![self.top.clone()];
        while let Some(dir) = pending.pop() {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                pending.extend(
                    entries.flatten().filter(|e| e.file_type().unwrap().is_dir()).map(|e| e.path()),
                );
            }
            dirs.push(dir);
        }
        for dir in dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A child killed when dropped, so that a failing test leaves no process in its cgroups.
struct Python(Child);

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// python3 running `script` in `cgroup` and in network namespace `ns`: it joins the cgroup
/// before `ip netns exec`, which mounts a sysfs of its own over the cgroup mount.
fn python_in(cgroup: &Path, ns: &NetNs, script: &str) -> Python {
    let child = Command::new("sh")
        .args([
            "-c",
            r#"echo $$ > "$1/cgroup.procs" && exec ip netns exec "$2" python3 -c "$3""#,
            "sh",
            cgroup.to_str().unwrap(),
            &ns.name,
            script,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    Python(child)
}

/// Waits for the child's first line (the script's `ready`).
fn first_line(child: &mut Python) -> String {
    let mut line = String::new();
    BufReader::new(child.0.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    line
}

const SERVER: &str = r#"
import socket
s = socket.socket()
s.bind(("127.0.0.1", 8080))
s.listen()
print("ready", flush=True)
for _ in range(2):
    c, _ = s.accept()
    c.recv(1)
    c.close()  # the server closes first: its end goes to TIME_WAIT
"#;

/// It closes a moment after the server did: the server's end is then an orphan in
/// FIN_WAIT2, made a timewait socket by the kernel, whose turn to TIME_WAIT only sock_diag
/// shows (the agent's records of it must carry the workload too).
const CLIENT: &str = r#"
import socket, time
c = socket.create_connection(("127.0.0.1", 8080))
c.sendall(b"x")
c.recv(1)
time.sleep(0.3)
c.close()
"#;

const REFUSED: &str = r#"
import socket
try:
    socket.create_connection(("127.0.0.1", 9))
except ConnectionRefusedError:
    pass
"#;

fn wait(child: &mut Python) {
    assert!(child.0.wait().unwrap().success());
}

fn netwatch(args: &[&str]) -> String {
    let output = Command::new(netwatch_bin()).args(args).output().unwrap();
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

fn transitions(records: &[Value], lport: u64) -> Vec<&Value> {
    records.iter().filter(|r| r["type"] == "transition" && r["lport"] == lport).collect()
}

#[test]
fn connections_are_attributed_to_their_container_and_pod() {
    require_root();
    let cgroups = Cgroups::new();
    let web = cgroups.make(&format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CONTAINERD}.scope",
        WEB_UID.replace('-', "_")
    ));
    let docker = cgroups.make(&format!("system.slice/docker-{DOCKER}.scope"));
    // CRI-O with the cgroupfs driver: no `.scope`.
    let crio = cgroups.make(&format!("kubepods/besteffort/pod{JOB_UID}/crio-{CRIO}"));
    let podman = cgroups.make(&format!("machine.slice/libpod-{PODMAN}.scope/container"));
    let kubelet =
        std::env::temp_dir().join(format!("netwatch-test-{}-kubelet", std::process::id()));
    let _ = std::fs::remove_dir_all(&kubelet);
    std::fs::create_dir_all(kubelet.join(format!("pods/shop_web-0_{WEB_UID}/nginx"))).unwrap();
    std::fs::create_dir_all(kubelet.join(format!("pods/batch_job-7_{JOB_UID}/curl"))).unwrap();
    std::fs::create_dir_all(kubelet.join("containers")).unwrap();
    let log_dir =
        std::env::temp_dir().join(format!("netwatch-test-{}-ctr-log", std::process::id()));
    let _ = std::fs::remove_dir_all(&log_dir);
    std::fs::create_dir_all(&log_dir).unwrap();
    let log = log_dir.join("events.ndjson");

    let ns = NetNs::new("ctr");
    let agent = Agent::start_with(
        &Agent::test_socket("containers"),
        &[
            "--kubelet-logs",
            kubelet.to_str().unwrap(),
            "--log",
            log.to_str().unwrap(),
            "--metrics",
            "127.0.0.1:0",
            "--metrics-workloads",
            "8",
        ],
    );
    let socket = agent.socket_arg();
    let watch_pod = Watcher::start(&["--socket", socket, "--json", "--pod", "shop/web-0"]);
    let watch_docker =
        Watcher::start(&["--socket", socket, "--json", "--container", &DOCKER[..12]]);

    let mut server = python_in(&web, &ns, SERVER);
    assert_eq!(first_line(&mut server), "ready\n");
    // The kubelet links a container's log only once it started: after its first socket.
    std::fs::write(kubelet.join(format!("containers/web-0_shop_nginx-{CONTAINERD}.log")), "")
        .unwrap();

    // The listener, live: the table names its pod and, once the link is there, its container,
    // in JSON and in text.
    let deadline = Instant::now() + PATIENCE;
    let listeners = loop {
        let rows = netwatch(&["table", "-tl", "--json", "--socket", socket, "--pod", "web-0"]);
        let rows: Vec<Value> = serde_json::from_str(&rows).unwrap();
        if rows.len() == 1 && rows[0]["workload"]["container_name"] == "nginx" {
            break rows;
        }
        assert!(Instant::now() < deadline, "the container's name never came: {rows:?}");
        thread::sleep(Duration::from_millis(200));
    };
    let workload = &listeners[0]["workload"];
    assert_eq!(workload["runtime"], "containerd");
    assert_eq!(workload["container_id"], CONTAINERD);
    assert_eq!(workload["container_name"], "nginx");
    assert_eq!(workload["pod_uid"], WEB_UID);
    assert_eq!(workload["pod_qos"], "burstable");
    assert_eq!(
        (&workload["pod_namespace"], &workload["pod_name"]),
        (&"shop".into(), &"web-0".into())
    );
    let text = netwatch(&["table", "-tl", "--socket", socket, "--netns", &ns.name]);
    assert!(text.lines().next().unwrap().contains("Container"), "{text}");
    assert!(text.contains("shop/web-0/nginx"), "{text}");

    let mut client = python_in(&docker, &ns, CLIENT);
    wait(&mut client);
    let mut job = python_in(&crio, &ns, CLIENT);
    wait(&mut job);
    wait(&mut server);
    let mut refused = python_in(&podman, &ns, REFUSED);
    wait(&mut refused);
    // Every process has exited; their cgroups go too.
    cgroups.remove();

    // The server's ends wait in TIME_WAIT: the table still names the pod that owned them.
    let deadline = Instant::now() + PATIENCE;
    let timewait = loop {
        let rows = netwatch(&[
            "table",
            "-t",
            "--json",
            "--socket",
            socket,
            "--netns",
            &ns.name,
            "state",
            "time-wait",
        ]);
        let rows: Vec<Value> = serde_json::from_str(&rows).unwrap();
        let server_side: Vec<Value> = rows.into_iter().filter(|r| r["lport"] == 8080).collect();
        if server_side.len() == 2 || Instant::now() > deadline {
            break server_side;
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(timewait.len(), 2, "{timewait:?}");
    for row in &timewait {
        assert_eq!(row["workload"]["pod_name"], "web-0", "{row}");
    }

    // The histories: the pod's listener and its two accepted connections, the docker
    // client's connection, the CRI-O job's, the podman refusal.
    let histories = agent.ask_json("history", &["--pod", "shop/web-0"]);
    let histories = histories.as_array().unwrap();
    assert_eq!(histories.len(), 3, "{histories:?}");
    assert!(
        histories.iter().all(|h| h["lport"] == 8080 && h["workload"]["container_name"] == "nginx")
    );
    let docker_history = agent.ask_json("history", &["--container", &DOCKER[..12]]);
    assert_eq!(docker_history.as_array().unwrap().len(), 1, "{docker_history}");
    assert_eq!(docker_history[0]["rport"], 8080);
    assert_eq!(docker_history[0]["workload"]["runtime"], "docker");
    let job_history = agent.ask_json("history", &["--pod", JOB_UID]);
    assert_eq!(job_history[0]["workload"]["runtime"], "cri-o", "{job_history}");
    assert_eq!(job_history[0]["workload"]["pod_name"], "job-7");
    assert_eq!(job_history[0]["workload"]["pod_qos"], "besteffort");
    let refusal = agent.ask_json("history", &["--failed", "--container", PODMAN]);
    assert_eq!(refusal[0]["failure"], "refused", "{refusal}");
    assert_eq!(refusal[0]["workload"]["runtime"], "podman");
    let text = netwatch(&["history", "--socket", socket, "--pod", "web-0"]);
    assert!(text.lines().all(|l| l.contains("container=shop/web-0/nginx")), "{text}");

    // The stream, filtered by pod and by container, and the log.
    watch_pod.wait_until("the pod's server ends in TIME_WAIT", |lines| {
        parse_json(lines).iter().filter(|r| r["new"] == "TIME_WAIT").count() >= 2
    });
    let pod_records = parse_json(&watch_pod.stop());
    assert!(!pod_records.is_empty());
    for record in &pod_records {
        assert_eq!(record["workload"]["pod_name"], "web-0", "{record}");
        assert_eq!(record["lport"], 8080, "only the server's ends: {record}");
    }
    watch_docker.wait_until("the docker client's close", |lines| {
        parse_json(lines).iter().any(|r| r["new"] == "CLOSE")
    });
    for record in parse_json(&watch_docker.stop()) {
        assert_eq!(record["workload"]["container_id"], DOCKER, "{record}");
    }
    // Per-workload metrics: bounded labels, named as the table names them.
    let scrape = agent.scrape();
    for series in [
        r#"netwatch_workload_connects_total{namespace="",pod="",container="docker:d0c4e4000000"} 1"#,
        r#"netwatch_workload_connects_total{namespace="batch",pod="job-7",container="cri-o:c41000000000"} 1"#,
        r#"netwatch_workload_connect_failures_total{namespace="",pod="",container="podman:9a1b0d000000",reason="refused"} 1"#,
    ] {
        assert!(scrape.lines().any(|l| l == series), "{series} in\n{scrape}");
    }
    assert!(agent.stop().success());
    let logged: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let server_ends = transitions(&logged, 8080);
    assert!(server_ends.len() >= 6, "{server_ends:?}");
    for record in server_ends {
        assert_eq!(record["workload"]["pod_name"], "web-0", "{record}");
    }
    let connects: Vec<&Value> = logged
        .iter()
        .filter(|r| r["type"] == "transition" && r["rport"] == 8080 && r["old"] == "SYN_SENT")
        .collect();
    let runtimes: Vec<&Value> = connects.iter().map(|r| &r["workload"]["runtime"]).collect();
    assert_eq!(runtimes, [&Value::from("docker"), &Value::from("cri-o")], "{connects:?}");
    std::fs::remove_dir_all(&kubelet).unwrap();
    std::fs::remove_dir_all(&log_dir).unwrap();
}

const CART: &str = "ca47000000000000000000000000000000000000000000000000000000000005";
const CART_UID: &str = "77777777-8888-4999-aaaa-bbbbbbbbbbbb";

/// `--kube`: with no kubelet directories, the API's list of the node's pods names the pod,
/// its controller and `app` label, and the container, asked with the node's field selector
/// and the service account's token. The API server is a stand-in (support/kube_api.py):
/// none installs from Debian 12.
#[test]
fn the_api_names_pods_with_kube() {
    require_root();
    let cgroups = Cgroups::new();
    let cart = cgroups.make(&format!("kubepods/pod{CART_UID}/{CART}"));
    let dir = std::env::temp_dir().join(format!("netwatch-test-{}-kube-api", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pod_list = serde_json::json!({"kind": "PodList", "metadata": {}, "items": [{
        "metadata": {"uid": CART_UID, "namespace": "shop", "name": "cart-5f6d-abcde",
                     "labels": {"app.kubernetes.io/name": "cart"},
                     "ownerReferences": [{"kind": "ReplicaSet", "name": "cart-5f6d", "controller": true}]},
        "status": {"containerStatuses": [{"name": "cart", "containerID": format!("containerd://{CART}")}]}
    }]});
    std::fs::write(dir.join("pods.json"), pod_list.to_string()).unwrap();
    std::fs::write(dir.join("token"), "kube-token\n").unwrap();
    let mut api = Command::new("/usr/bin/python3")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("support/kube_api.py"))
        .arg(dir.join("pods.json"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut api_out = BufReader::new(api.stdout.take().unwrap());
    let mut line = String::new();
    api_out.read_line(&mut line).unwrap();
    let port: u16 = line.trim().strip_prefix("listening ").unwrap().parse().unwrap();

    let ns = NetNs::new("kube");
    let agent = Agent::start_with(
        &Agent::test_socket("kube"),
        &[
            "--kube",
            "--kube-api",
            &format!("http://127.0.0.1:{port}"),
            "--kube-node",
            "node-7",
            "--kube-token-file",
            dir.join("token").to_str().unwrap(),
            "--kubelet-logs",
            dir.join("no-kubelet-here").to_str().unwrap(),
        ],
    );
    let mut server = python_in(&cart, &ns, SERVER);
    assert_eq!(first_line(&mut server), "ready\n");
    let socket = agent.socket_arg();
    let deadline = Instant::now() + PATIENCE;
    let row = loop {
        let rows = netwatch(&[
            "table",
            "-tl",
            "--json",
            "--socket",
            socket,
            "--pod",
            "shop/cart-5f6d-abcde",
        ]);
        let rows: Vec<Value> = serde_json::from_str(&rows).unwrap();
        if let Some(row) = rows.into_iter().next() {
            break row;
        }
        assert!(Instant::now() < deadline, "the pod was never named");
        thread::sleep(Duration::from_millis(200));
    };
    let workload = &row["workload"];
    assert_eq!(workload["container_name"], "cart", "{row}");
    assert_eq!(workload["pod_app"], "cart");
    assert_eq!(workload["pod_controller_kind"], "ReplicaSet");
    assert_eq!(workload["pod_controller_name"], "cart-5f6d");
    assert_eq!(workload["pod_qos"], "guaranteed");
    let text = netwatch(&["table", "-tl", "--socket", socket, "--netns", &ns.name]);
    assert!(text.contains("shop/cart-5f6d-abcde/cart"), "{text}");
    drop(server);
    assert!(agent.stop().success());
    let _ = api.kill();
    let _ = api.wait();
    line.clear();
    api_out.read_line(&mut line).unwrap();
    assert!(line.starts_with("/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-7"), "{line}");
    assert!(line.trim_end().ends_with("\tBearer kube-token"), "{line}");
    std::fs::remove_dir_all(&dir).unwrap();
}
