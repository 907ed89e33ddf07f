//! The Kubernetes deploy files: they validate offline against the Kubernetes schemas
//! (kubernetes-validate, strict), and the DaemonSet's capabilities are the measured minimum:
//! an agent holding only those sees what a root agent sees (another user's listener in
//! another namespace, with its owner, found by the start-up snapshot), and without any one
//! of them it does not.
//! A failed unwrap is how a test reports a missing field.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use netwatch_tests::{NetNs, PATIENCE, netwatch_bin, require_root};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn the_manifests_validate_against_the_kubernetes_schemas() {
    let validate = root().join("target/test-python/bin/kubernetes-validate");
    assert!(validate.exists(), "{} missing: run `cargo xtask test`", validate.display());
    // The oldest Kubernetes still supported by its vendors when written, and the newest.
    for version in ["1.28.0", "1.37.0"] {
        let output = Command::new(&validate)
            .args(["--strict", "--kubernetes-version", version])
            .args(manifests())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "Kubernetes {version}:\n{said}");
        let resources: usize = manifests()
            .iter()
            .map(|m| {
                std::fs::read_to_string(m)
                    .unwrap()
                    .lines()
                    .filter(|l| l.starts_with("kind:"))
                    .count()
            })
            .sum();
        assert_eq!(said.matches(" passed for resource ").count(), resources, "{said}");
    }
}

/// The capabilities the DaemonSet adds (`add: [A, B]`), as setpriv names them.
fn daemonset_capabilities() -> Vec<String> {
    let manifest =
        std::fs::read_to_string(root().join("deploy/kubernetes/daemonset.yaml")).unwrap();
    let line = manifest.lines().find(|l| l.trim_start().starts_with("add: [")).unwrap();
    let list = line.trim().trim_start_matches("add: [").trim_end_matches(']');
    list.split(',').map(|c| c.trim().to_lowercase()).collect()
}

/// What an agent holding `caps` (all of root's if None) said at start, and the rows of
/// `ns`'s listeners it gives `table`: None if it could not start.
fn agent_sees(caps: Option<&[String]>, ns: &NetNs, name: &str) -> (String, Option<Vec<Value>>) {
    let dir =
        std::env::temp_dir().join(format!("netwatch-test-{}-caps-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("agent.sock");
    let mut command = match caps {
        Some(caps) => {
            let bounding: String = caps.iter().map(|c| format!(",+{c}")).collect();
            let mut command = Command::new("setpriv");
            command.args(["--bounding-set", &format!("-all{bounding}"), "--inh-caps", "-all"]);
            command.arg(netwatch_bin());
            command
        }
        None => Command::new(netwatch_bin()),
    };
    let mut agent = command
        .args(["agent", "--socket", socket.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = Arc::new(Mutex::new(String::new()));
    let collected = stderr.clone();
    let lines = BufReader::new(agent.stderr.take().unwrap()).lines();
    thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            collected.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    let deadline = Instant::now() + PATIENCE;
    while !stderr.lock().unwrap().contains("serving") {
        assert!(Instant::now() < deadline, "agent with {caps:?}: {}", stderr.lock().unwrap());
        if agent.try_wait().unwrap().is_some() {
            thread::sleep(Duration::from_millis(100));
            let said = stderr.lock().unwrap().clone();
            return (said, None);
        }
        thread::sleep(Duration::from_millis(50));
    }
    let output = Command::new(netwatch_bin())
        .args(["table", "-tl", "--json", "--socket", socket.to_str().unwrap()])
        .args(["--netns", &ns.name])
        .output()
        .unwrap();
    let _ = agent.kill();
    let _ = agent.wait();
    let rows = serde_json::from_slice(&output.stdout).unwrap_or_default();
    let said = stderr.lock().unwrap().clone();
    let _ = std::fs::remove_dir_all(&dir);
    (said, Some(rows))
}

/// The owners the table gives the listener on `port`; None if it has no such row.
fn owners(rows: &[Value], port: u16) -> Option<Vec<String>> {
    let row = rows.iter().find(|r| r["lport"] == port)?;
    Some(row["owners"].as_array()?.iter().map(|o| o["comm"].as_str().unwrap().into()).collect())
}

/// Warning lines, without the ANSI colours.
fn warnings(said: &str) -> Vec<String> {
    said.lines()
        .filter(|l| l.contains("WARN"))
        .map(|l| l.replace("\u{1b}[33m", "").replace("\u{1b}[0m", ""))
        .collect()
}

#[test]
fn the_daemonsets_capabilities_are_the_measured_minimum() {
    require_root();
    let caps = daemonset_capabilities();
    assert_eq!(caps, ["sys_admin", "sys_ptrace", "dac_read_search", "sys_nice"]);
    // Another user's listener in another namespace, there before the agent: the snapshot
    // must enter the namespace (setns) and read the owner's /proc/PID/fd.
    let ns = NetNs::new("caps");
    let mut listener = ns
        .command("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "/usr/bin/python3", "-c"])
        .arg(
            "import socket, sys, time\n\
             s = socket.socket(); s.bind(('127.0.0.1', 7070)); s.listen()\n\
             print('ready', flush=True); time.sleep(120)",
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(listener.stdout.as_mut().unwrap()).read_line(&mut ready).unwrap();

    let (root_said, root_rows) = agent_sees(None, &ns, "root");
    let root_rows = root_rows.unwrap();
    assert_eq!(owners(&root_rows, 7070), Some(vec!["python3".to_string()]), "{root_rows:?}");
    let (said, rows) = agent_sees(Some(&caps), &ns, "daemonset");
    assert_eq!(owners(&rows.unwrap(), 7070), owners(&root_rows, 7070), "{said}");
    let root_warnings = warnings(&root_said);
    for warning in warnings(&said) {
        assert!(root_warnings.contains(&warning), "only with the DaemonSet's caps: {warning}");
    }

    // Each one is needed: without it the agent sees less, or says it runs worse.
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let (said, rows) = agent_sees(Some(&fewer), &ns, missing);
        if missing == "sys_admin" {
            // It stands for CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN too, which the kernel
            // accepts it for; without it nothing loads. CAP_SYS_ADMIN cannot be left out for
            // those three instead: entering another network namespace (setns) needs it.
            assert!(rows.is_none() && said.contains("Operation not permitted"), "{said}");
            continue;
        }
        let seen = owners(&rows.unwrap(), 7070);
        match missing.as_str() {
            // Another user's /proc/PID/fd: a ptrace check, and a directory only its owner
            // may read.
            "sys_ptrace" | "dac_read_search" => assert_eq!(seen, Some(vec![]), "{said}"),
            "sys_nice" => {
                assert!(said.contains("cannot set the agent's nice value"), "{said}");
                assert_eq!(seen, owners(&root_rows, 7070));
            }
            other => panic!("a capability this test does not know: {other}"),
        }
    }
    let _ = listener.kill();
    let _ = listener.wait();
}
