//! `netwatch counters`' output: one namespace's protocol counters over an interval, grouped
//! as `netstat -s` groups them, the ones that matter for troubleshooting first with their
//! meaning, and under each counter who caused its increase where that is known. Text, or
//! one JSON object per namespace and interval.
use std::{fmt::Write as _, net::SocketAddr};

use chrono::{DateTime, Local, Utc};
use serde::Serialize;

use crate::state::attribution::{CulpritCount, Evidence};

/// The counters worth a look when they grow, in the order they are shown, with what an
/// increase means.
pub const NOTABLE: [(&str, &str, &str); 21] = [
    (
        "TcpExt",
        "ListenOverflows",
        "a handshake completed but the listener's accept queue was full: it accepts too slowly or its backlog is too small",
    ),
    (
        "TcpExt",
        "ListenDrops",
        "SYNs and handshakes a listener dropped (ListenOverflows among them)",
    ),
    (
        "TcpExt",
        "TCPSynRetrans",
        "SYNs and SYN-ACKs sent again: a peer or a path that does not answer",
    ),
    (
        "TcpExt",
        "TCPTimeouts",
        "retransmission timers that fired: segments the peer did not acknowledge in time",
    ),
    ("Tcp", "RetransSegs", "segments sent again"),
    ("Tcp", "AttemptFails", "connects that failed: refused, or timed out"),
    ("Tcp", "OutRsts", "resets sent"),
    ("Tcp", "EstabResets", "established connections closed abruptly: reset, timed out or aborted"),
    (
        "TcpExt",
        "TCPAbortOnData",
        "connections reset by a close with SO_LINGER 0, or because data came after their owner closed them",
    ),
    (
        "TcpExt",
        "TCPAbortOnClose",
        "connections reset because their owner closed them with unread data",
    ),
    ("TcpExt", "TCPAbortOnMemory", "connections reset for lack of TCP memory"),
    (
        "TcpExt",
        "TCPAbortOnTimeout",
        "connections killed after retransmitting or probing for too long",
    ),
    (
        "TcpExt",
        "TCPAbortOnLinger",
        "connections reset in FIN_WAIT2 because their owner set TCP_LINGER2 below 0",
    ),
    (
        "TcpExt",
        "TCPBacklogDrop",
        "segments dropped because the socket's backlog was full while its owner held it",
    ),
    ("TcpExt", "TCPRcvQDrop", "segments dropped because a receive queue could not grow (memory)"),
    ("TcpExt", "TCPMemoryPressures", "times TCP entered memory pressure (net.ipv4.tcp_mem)"),
    (
        "TcpExt",
        "TCPTimeWaitOverflow",
        "TIME_WAIT sockets not made: net.ipv4.tcp_max_tw_buckets reached",
    ),
    ("Udp", "InErrors", "datagrams that could not be delivered (full buffer, bad checksum)"),
    ("Udp", "RcvbufErrors", "datagrams dropped: a receive buffer was full (a slow reader)"),
    ("Udp", "SndbufErrors", "datagrams not sent: a send buffer was full"),
    ("Udp6", "RcvbufErrors", "IPv6 datagrams dropped: a receive buffer was full (a slow reader)"),
];

/// Why a notable counter that no event accounts for has no culprit.
fn unattributable(group: &str, name: &str) -> Option<&'static str> {
    Some(match (group, name) {
        ("TcpExt", "TCPBacklogDrop" | "TCPRcvQDrop" | "TCPAbortOnMemory") => {
            "the kernel increments it with no tracepoint netwatch hooks: no socket to name"
        }
        ("TcpExt", "TCPAbortOnLinger") => {
            "its reset ends a FIN_WAIT2 socket like any other end of one: no event tells them apart"
        }
        ("TcpExt", "TCPMemoryPressures") => "a state of the whole namespace, not of one socket",
        ("TcpExt", "TCPTimeWaitOverflow") => {
            "the TIME_WAIT socket is never made, and no event says which close it was for"
        }
        ("Udp" | "Udp6", _) => "UDP drops have no tracepoint netwatch hooks: no socket to name",
        _ => return None,
    })
}

/// What the changes are counted from.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "from", rename_all = "snake_case")]
pub enum Since {
    /// The previous `netwatch counters` for this namespace (its history file).
    LastCall { time: DateTime<Utc> },
    /// The running agent's start.
    AgentStart { time: DateTime<Utc> },
    /// The previous line of `--interval`.
    Previous { time: DateTime<Utc> },
    /// Nothing: the values themselves, counted since boot (or the namespace's creation).
    Boot,
}

impl Since {
    /// When the earlier reading was taken; None for boot.
    pub fn time(&self) -> Option<DateTime<Utc>> {
        match self {
            Since::LastCall { time } | Since::AgentStart { time } | Since::Previous { time } => {
                Some(*time)
            }
            Since::Boot => None,
        }
    }
}

/// A listener whose accept queue is at its backlog, or past it (full: the kernel drops).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FullListener {
    pub local: SocketAddr,
    pub queue: u32,
    pub backlog: u32,
    /// `comm[pid]` of each holder.
    pub owners: Vec<String>,
}

/// Who caused one counter's increase.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Cause {
    /// Counted from the agent's events over the interval.
    Events {
        evidence: Evidence,
        events: String,
        culprits: Vec<CulpritCount>,
        others: u64,
        /// The agent counts in whole seconds: from the start of the second the interval
        /// began in.
        counted_from: Option<DateTime<Utc>>,
        /// False when the interval reaches back before the agent started, or before what it
        /// keeps (a quarter of an hour).
        complete: bool,
    },
    /// The listeners whose accept queue is at or past its backlog at the moment of asking.
    AcceptQueues { listeners: Vec<FullListener> },
    /// Why no socket can be named.
    Unknown { why: String },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Line {
    pub group: String,
    pub name: String,
    pub value: i64,
    /// The increase over the interval; null for a gauge (a setting or level).
    pub delta: Option<i64>,
    pub per_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meaning: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
}

impl Line {
    fn notable_rank(&self) -> Option<usize> {
        NOTABLE.iter().position(|(g, n, _)| *g == self.group && *n == self.name)
    }
}

/// One namespace's counters over one interval.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reading {
    pub time: DateTime<Utc>,
    pub netns: u32,
    pub netns_name: Option<String>,
    pub since: Since,
    pub interval_s: Option<f64>,
    /// Whether an agent's events were asked who caused what.
    pub agent: bool,
    pub counters: Vec<Line>,
}

/// The meaning of a notable counter.
pub fn meaning(group: &str, name: &str) -> Option<&'static str> {
    NOTABLE.iter().find(|(g, n, _)| *g == group && *n == name).map(|(_, _, m)| *m)
}

/// Why nothing is named for a notable counter without a cause; `no_agent` says why no agent
/// was asked, for a counter one could account for.
pub fn unknown_cause(group: &str, name: &str, no_agent: Option<&str>) -> Option<Cause> {
    let why = match (unattributable(group, name), no_agent) {
        (Some(why), _) => why.to_string(),
        (None, Some(why)) => why.to_string(),
        (None, None) => return None,
    };
    Some(Cause::Unknown { why })
}

fn rate(per_second: Option<f64>) -> String {
    match per_second {
        Some(r) if r >= 10.0 => format!("{r:.0}/s"),
        Some(r) => format!("{r:.2}/s"),
        None => String::new(),
    }
}

fn culprit_text(c: &CulpritCount) -> String {
    let who = match (&c.culprit.comm, c.culprit.pid) {
        (Some(comm), Some(pid)) => format!("{comm}[{pid}]"),
        _ => "(owner unknown)".into(),
    };
    let arrow = if c.culprit.local { "on" } else { "->" };
    format!("{:>6}  {who} {arrow} {}", c.count, c.culprit.endpoint)
}

fn cause_lines(cause: &Cause, out: &mut String) {
    match cause {
        Cause::Events { evidence, events, culprits, others, complete, .. } => {
            let kind = match evidence {
                Evidence::Exact => "",
                Evidence::Candidates => "candidates, ",
            };
            let partial =
                if *complete { "" } else { "; the agent's record does not reach back that far" };
            let _ = writeln!(out, "      ({kind}from {events}{partial})");
            for culprit in culprits {
                let _ = writeln!(out, "    {}", culprit_text(culprit));
            }
            if *others > 0 {
                let _ = writeln!(out, "    {others:>6}  others");
            }
        }
        Cause::AcceptQueues { listeners } if listeners.is_empty() => {
            let _ = writeln!(
                out,
                "      (no listener's accept queue is at its backlog now; the kernel names no socket \
                 for this counter)"
            );
        }
        Cause::AcceptQueues { listeners } => {
            let _ = writeln!(out, "      (listeners whose accept queue is at its backlog now)");
            for l in listeners {
                let full = if l.queue > l.backlog { "full" } else { "at backlog" };
                let owners = if l.owners.is_empty() { "-".into() } else { l.owners.join(",") };
                let _ = writeln!(
                    out,
                    "    {} {owners} accept queue {}/{} ({full})",
                    l.local, l.queue, l.backlog
                );
            }
        }
        Cause::Unknown { why } => {
            let _ = writeln!(out, "      ({why})");
        }
    }
}

fn counter_line(line: &Line, out: &mut String) {
    let value = match line.delta {
        Some(delta) => format!("{delta:+}"),
        None => format!("={}", line.value),
    };
    let _ = writeln!(out, "  {:<28} {value:>12} {:>10}", line.name, rate(line.per_second));
}

fn heading(report: &Reading) -> String {
    let netns = match &report.netns_name {
        Some(name) => format!("netns {name} ({})", report.netns),
        None => format!("netns {}", report.netns),
    };
    let local = |t: &DateTime<Utc>| t.with_timezone(&Local).format("%H:%M:%S").to_string();
    let interval = report.interval_s.map(|s| format!("{s:.1} s")).unwrap_or_default();
    let since = match &report.since {
        Since::LastCall { time } => format!("{interval} since the last call ({})", local(time)),
        Since::AgentStart { time } => {
            format!("{interval} since the agent started ({})", local(time))
        }
        Since::Previous { time } => format!("{interval} since {}", local(time)),
        Since::Boot => "since boot (the values themselves)".into(),
    };
    format!("{} {netns}: {since}", local(&report.time))
}

/// The text: the notable counters that grew first, each with its meaning and cause, then
/// every other shown counter under its group.
pub fn text(report: &Reading) -> String {
    let mut out = heading(report);
    out.push('\n');
    let mut notable: Vec<&Line> = report
        .counters
        .iter()
        .filter(|l| l.notable_rank().is_some() && l.delta > Some(0))
        .collect();
    notable.sort_by_key(|l| l.notable_rank());
    if !notable.is_empty() {
        out.push_str("Worth a look:\n");
        for line in &notable {
            let name = format!("{} {}", line.group, line.name);
            let delta = line.delta.map(|d| format!("{d:+}")).unwrap_or_default();
            let _ = writeln!(out, "  {name:<28} {delta:>12} {:>10}", rate(line.per_second));
            if let Some(meaning) = line.meaning {
                let _ = writeln!(out, "      {meaning}");
            }
            if let Some(cause) = &line.cause {
                cause_lines(cause, &mut out);
            }
        }
    }
    let mut group: Option<&str> = None;
    for line in &report.counters {
        if notable.iter().any(|n| std::ptr::eq(*n, line)) {
            continue;
        }
        if group != Some(line.group.as_str()) {
            let _ = writeln!(out, "{}:", line.group);
            group = Some(&line.group);
        }
        counter_line(line, &mut out);
        if let Some(cause) = &line.cause {
            cause_lines(cause, &mut out);
        }
    }
    if report.counters.is_empty() {
        out.push_str("  no counter changed (-a shows every counter)\n");
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::state::attribution::Culprit;

    fn line(group: &str, name: &str, delta: Option<i64>, cause: Option<Cause>) -> Line {
        Line {
            group: group.into(),
            name: name.into(),
            value: 100,
            delta,
            per_second: delta.map(|d| d as f64 / 4.0),
            meaning: meaning(group, name),
            cause,
        }
    }

    #[test]
    fn notable_counters_come_first_with_meaning_and_cause() {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let culprit = Culprit {
            netns: 1,
            pid: Some(42),
            comm: Some("curl".into()),
            endpoint: SocketAddr::from((lo, 9)),
            local: false,
        };
        let report = Reading {
            time: DateTime::from_timestamp_nanos(0),
            netns: 1,
            netns_name: Some("blue".into()),
            since: Since::Previous { time: DateTime::from_timestamp_nanos(0) },
            interval_s: Some(4.0),
            agent: true,
            counters: vec![
                line("Tcp", "ActiveOpens", Some(3), None),
                line(
                    "Tcp",
                    "AttemptFails",
                    Some(3),
                    Some(Cause::Events {
                        evidence: Evidence::Exact,
                        events: "connects refused or timed out".into(),
                        culprits: vec![CulpritCount { culprit, count: 3 }],
                        others: 0,
                        counted_from: None,
                        complete: true,
                    }),
                ),
                line(
                    "TcpExt",
                    "ListenOverflows",
                    Some(12),
                    Some(Cause::AcceptQueues {
                        listeners: vec![FullListener {
                            local: SocketAddr::from((lo, 8080)),
                            queue: 2,
                            backlog: 1,
                            owners: vec!["python3[7]".into()],
                        }],
                    }),
                ),
            ],
        };
        let text = text(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("netns blue (1): 4.0 s since"), "{text}");
        assert_eq!(lines[1], "Worth a look:");
        assert!(
            lines[2].starts_with("  TcpExt ListenOverflows") && lines[2].contains("+12"),
            "{text}"
        );
        assert!(text.contains("127.0.0.1:8080 python3[7] accept queue 2/1 (full)"), "{text}");
        assert!(text.contains("3  curl[42] -> 127.0.0.1:9"), "{text}");
        let tcp = lines.iter().position(|l| *l == "Tcp:").unwrap();
        assert!(
            lines[tcp + 1].contains("ActiveOpens") && lines[tcp + 1].contains("0.75/s"),
            "{text}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["counters"][2]["cause"]["by"], "accept_queues");
        assert_eq!(json["counters"][1]["cause"]["culprits"][0]["comm"], "curl");
    }
}
