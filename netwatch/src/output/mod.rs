//! How transitions and loss reports look: aligned text lines for people, NDJSON for tools.
//! The socket table's layout is in [`table`].
pub mod table;

use std::net::SocketAddr;

use chrono::{DateTime, Local, Utc};
use serde::Serialize;

use crate::{
    events::{Family, StateSource, TcpState},
    table::Transition,
};

/// Converts the kernel's CLOCK_MONOTONIC timestamps to wall time, with one offset taken at
/// start (so every line of a run uses the same conversion).
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    realtime_minus_monotonic_ns: i128,
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; both clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

impl WallClock {
    pub fn now() -> Self {
        let monotonic = clock_ns(libc::CLOCK_MONOTONIC);
        let realtime = clock_ns(libc::CLOCK_REALTIME);
        Self {
            realtime_minus_monotonic_ns: realtime - monotonic,
        }
    }

    /// For tests: a clock whose monotonic 0 is the given wall time.
    pub fn with_offset_ns(offset: i128) -> Self {
        Self {
            realtime_minus_monotonic_ns: offset,
        }
    }

    /// Current CLOCK_MONOTONIC, the kernel timestamps' clock.
    pub fn monotonic_now_ns() -> u64 {
        clock_ns(libc::CLOCK_MONOTONIC) as u64
    }

    pub fn wall(&self, monotonic_ns: u64) -> DateTime<Utc> {
        let ns = i128::from(monotonic_ns) + self.realtime_minus_monotonic_ns;
        DateTime::from_timestamp_nanos(ns.clamp(0, i128::from(i64::MAX)) as i64)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// Column header of the text stream; address columns fit any IPv4 endpoint, and an IPv6
/// endpoint widens its line rather than being cut.
pub const TEXT_HEADER: &str = "TIME            PID     COMM             LOCAL                   REMOTE                  OLD          -> NEW          MS";

fn endpoint(addr: (std::net::IpAddr, u16)) -> String {
    SocketAddr::from(addr).to_string()
}

fn millis(ns: u64) -> f64 {
    ns as f64 / 1e6
}

pub fn text_line(t: &Transition, clock: &WallClock) -> String {
    let c = &t.change;
    let time = clock
        .wall(c.ts_ns)
        .with_timezone(&Local)
        .format("%H:%M:%S%.6f");
    let (pid, comm) = match &t.owner {
        Some(owner) => (owner.pid.to_string(), owner.comm.as_str()),
        None => ("-".to_string(), "-"),
    };
    let ms = t
        .in_old_state_ns
        .map_or_else(|| "-".to_string(), |ns| format!("{:.3}", millis(ns)));
    format!(
        "{time} {pid:<7} {comm:<16} {:<23} {:<23} {:<12} -> {:<12} {ms}",
        endpoint(c.local),
        endpoint(c.remote),
        c.old,
        c.new,
    )
}

/// One NDJSON `transition` record; every field of the event, addresses as strings.
#[derive(Serialize)]
struct TransitionRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    time: String,
    mono_ns: u64,
    old: TcpState,
    new: TcpState,
    /// Time in `old`, or since creation for a first transition; null when not seen.
    duration_ns: Option<u64>,
    duration_ms: Option<f64>,
    pid: Option<u32>,
    comm: Option<&'a str>,
    family: Family,
    laddr: String,
    lport: u16,
    raddr: String,
    rport: u16,
    cookie: Option<u64>,
    netns: u32,
    skaddr: String,
    /// The task that was on the CPU when the kernel made the change.
    task_pid: u32,
    task_tid: u32,
    task_comm: &'a str,
    source: StateSource,
}

pub fn json_line(t: &Transition, clock: &WallClock) -> String {
    let c = &t.change;
    let record = TransitionRecord {
        kind: "transition",
        time: rfc3339(clock.wall(c.ts_ns)),
        mono_ns: c.ts_ns,
        old: c.old,
        new: c.new,
        duration_ns: t.in_old_state_ns,
        duration_ms: t.in_old_state_ns.map(millis),
        pid: t.owner.as_ref().map(|o| o.pid),
        comm: t.owner.as_ref().map(|o| o.comm.as_str()),
        family: c.family,
        laddr: c.local.0.to_string(),
        lport: c.local.1,
        raddr: c.remote.0.to_string(),
        rport: c.remote.1,
        cookie: c.cookie,
        netns: c.netns,
        skaddr: format!("{:#x}", c.skaddr),
        task_pid: c.task.pid,
        task_tid: c.task.tid,
        task_comm: &c.task.comm,
        source: c.source,
    };
    serde_json::to_string(&record)
        .unwrap_or_else(|e| format!(r#"{{"type":"error","error":"{e}"}}"#))
}

fn rfc3339(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// Why events were lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossReason {
    /// The kernel could not reserve space in the ring buffer.
    RingBufferFull,
    /// A record arrived that netwatch could not decode.
    Malformed,
}

/// A loss report: `count` new losses since the previous report, `total` since start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loss {
    pub reason: LossReason,
    pub count: u64,
    pub total: u64,
}

pub fn lost_text(loss: &Loss, now: DateTime<Utc>) -> String {
    let why = match loss.reason {
        LossReason::RingBufferFull => "ring buffer full: raise --ring-size",
        LossReason::Malformed => "malformed records",
    };
    format!(
        "{} LOST {} events ({why}; {} since start)",
        now.with_timezone(&Local).format("%H:%M:%S%.6f"),
        loss.count,
        loss.total
    )
}

/// One NDJSON `lost` record.
#[derive(Serialize)]
struct LossRecord {
    #[serde(rename = "type")]
    kind: &'static str,
    time: String,
    reason: LossReason,
    count: u64,
    total: u64,
}

pub fn lost_json(loss: &Loss, now: DateTime<Utc>) -> String {
    let record = LossRecord {
        kind: "lost",
        time: rfc3339(now),
        reason: loss.reason,
        count: loss.count,
        total: loss.total,
    };
    serde_json::to_string(&record)
        .unwrap_or_else(|e| format!(r#"{{"type":"error","error":"{e}"}}"#))
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr};

    use super::*;
    use crate::{
        events::{SockKey, StateChange, Task},
        table::Owner,
    };

    fn transition(owner: Option<Owner>, in_old_state_ns: Option<u64>) -> Transition {
        Transition {
            change: StateChange {
                ts_ns: 1_500_000_000,
                source: StateSource::TpBtf,
                key: SockKey::Cookie(77),
                cookie: Some(77),
                skaddr: 0xffff_8880_0000_1000,
                netns: 4026531840,
                family: Family::Ipv6,
                local: (IpAddr::V6(Ipv6Addr::LOCALHOST), 40000),
                remote: (IpAddr::V6(Ipv6Addr::LOCALHOST), 8080),
                old: TcpState::SynSent,
                new: TcpState::Established,
                task: Task {
                    pid: 0,
                    tid: 0,
                    comm: "swapper/1".into(),
                },
                deferred_connect: false,
            },
            owner,
            in_old_state_ns,
        }
    }

    #[test]
    fn text_shows_owner_ports_states_and_millis() {
        let clock = WallClock::with_offset_ns(0);
        let owner = Some(Owner {
            pid: 4242,
            comm: "curl".into(),
        });
        let line = text_line(&transition(owner, Some(412_345)), &clock);
        let fields: Vec<_> = line.split_whitespace().collect();
        assert_eq!(
            fields[1..],
            [
                "4242",
                "curl",
                "[::1]:40000",
                "[::1]:8080",
                "SYN_SENT",
                "->",
                "ESTABLISHED",
                "0.412"
            ]
        );
    }

    #[test]
    fn text_marks_unknowns_with_a_dash() {
        let line = text_line(&transition(None, None), &WallClock::with_offset_ns(0));
        let fields: Vec<_> = line.split_whitespace().collect();
        assert_eq!(fields[1..3], ["-", "-"]);
        assert_eq!(fields.last(), Some(&"-"));
        assert!(
            !line.contains("swapper"),
            "the on-CPU task is never shown as owner: {line}"
        );
    }

    #[test]
    fn json_carries_every_field() {
        let clock = WallClock::with_offset_ns(1_700_000_000_000_000_000);
        let owner = Some(Owner {
            pid: 4242,
            comm: "curl".into(),
        });
        let line = json_line(&transition(owner, Some(1_250_000)), &clock);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["type"], "transition");
        assert_eq!(v["time"], "2023-11-14T22:13:21.500000000Z");
        assert_eq!(v["mono_ns"], 1_500_000_000u64);
        assert_eq!(v["old"], "SYN_SENT");
        assert_eq!(v["new"], "ESTABLISHED");
        assert_eq!(v["duration_ns"], 1_250_000);
        assert_eq!(v["duration_ms"], 1.25);
        assert_eq!(v["pid"], 4242);
        assert_eq!(v["comm"], "curl");
        assert_eq!(v["family"], "ipv6");
        assert_eq!(v["laddr"], "::1");
        assert_eq!(v["lport"], 40000);
        assert_eq!(v["raddr"], "::1");
        assert_eq!(v["rport"], 8080);
        assert_eq!(v["cookie"], 77);
        assert_eq!(v["netns"], 4026531840u64);
        assert_eq!(v["skaddr"], "0xffff888000001000");
        assert_eq!(v["task_comm"], "swapper/1");
        assert_eq!(v["source"], "tp_btf");
    }

    #[test]
    fn json_unknowns_are_null() {
        let line = json_line(&transition(None, None), &WallClock::with_offset_ns(0));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(v["pid"].is_null() && v["comm"].is_null() && v["duration_ms"].is_null());
    }

    #[test]
    fn loss_reports_in_both_formats() {
        let loss = Loss {
            reason: LossReason::RingBufferFull,
            count: 12,
            total: 40,
        };
        let now = DateTime::from_timestamp_nanos(0);
        assert!(lost_text(&loss, now).contains("LOST 12 events (ring buffer full"));
        let v: serde_json::Value = serde_json::from_str(&lost_json(&loss, now)).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["count"].as_u64()),
            (Some("lost"), Some(12))
        );
        assert_eq!(
            (v["reason"].as_str(), v["total"].as_u64()),
            (Some("ring_buffer_full"), Some(40))
        );
    }
}
