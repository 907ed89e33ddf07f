//! `netwatch stats` as text: remote endpoints, processes and listeners, each an aligned table.
use crate::state::stats::{Report, Summary};

/// `COMM[PID]`, or `-` when the owner is unknown.
fn process_key(comm: Option<&str>, pid: Option<u32>) -> String {
    match (comm, pid) {
        (Some(comm), Some(pid)) => format!("{comm}[{pid}]"),
        _ => "-".to_string(),
    }
}

/// A row's key, with a command's pids: `curl[4242]`, `nginx[10,11,12,+5]`.
fn label(row: &Summary) -> String {
    match row.pids.as_slice() {
        [] => row.key.clone(),
        pids => {
            let shown: Vec<String> = pids.iter().rev().take(3).map(u32::to_string).collect();
            let more = pids.len().saturating_sub(3);
            let more = if more > 0 { format!(",+{more}") } else { String::new() };
            format!("{}[{}{more}]", row.key, shown.join(","))
        }
    }
}

/// The report as aligned text tables: remote endpoints, processes, listeners.
pub fn text(report: &Report) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    let known = |v: Option<u32>| v.map_or("-".to_string(), |v| v.to_string());
    let mut out = String::new();
    for (title, rows) in [("REMOTE", &report.by_remote), ("PROCESS", &report.by_process)] {
        out.push_str(&format!(
            "{title:<40} {:>8} {:>10} {:>10} {:>10} {:>10} {:>8}  FAILED\n",
            "CONNECTS", "P50_MS", "P90_MS", "P99_MS", "MAX_MS", "RETRANS"
        ));
        for row in rows {
            let failed: Vec<String> =
                row.failed.iter().map(|(why, n)| format!("{why}={n}")).collect();
            out.push_str(&format!(
                "{:<40} {:>8} {:>10} {:>10} {:>10} {:>10} {:>8}  {}\n",
                label(row),
                row.connects,
                ms(row.p50_ms),
                ms(row.p90_ms),
                ms(row.p99_ms),
                ms(row.max_ms),
                row.retransmits,
                if failed.is_empty() { "-".to_string() } else { failed.join(" ") }
            ));
        }
        out.push('\n');
    }
    // None from an event log: the accept queues are counted by the agent alone.
    if report.listeners.is_empty() {
        return out.trim_end().to_string();
    }
    out.push_str(&format!(
        "{:<40} {:<24} {:>9} {:>9} {:>10} {:>10} {:>7} {:>9} {:>9} {:>11}\n",
        "LISTENER",
        "PROCESS",
        "ACCEPTQ",
        "BACKLOG",
        "HALF_OPEN",
        "HANDSHAKES",
        "ACCEPTED",
        "QUEUED",
        "PEAK_Q",
        "SYNACK_RETX"
    ));
    for l in &report.listeners {
        let process = process_key(l.comm.as_deref(), l.pid);
        out.push_str(&format!(
            "{:<40} {:<24} {:>9} {:>9} {:>10} {:>10} {:>7} {:>9} {:>9} {:>11}\n",
            super::address::endpoint((l.laddr, l.lport), false, None, None),
            process,
            known(l.accept_queue),
            known(l.backlog),
            known(l.half_open),
            l.handshakes,
            l.accepted,
            l.queued,
            l.peak_queued,
            l.synack_retransmits
        ));
    }
    out.trim_end().to_string()
}
