//! The records netwatch emits, as data: the stream's lines (transition, retransmit, loss)
//! and the socket table's rows, with the wall clock that stamps them.
//!
//! [`StreamRecord`] is the one shape a stream line has: built from the table's output,
//! serialized as NDJSON, sent by the agent to `watch` clients, parsed back, filtered and
//! printed. Text is rendered from the record ([`crate::output`]), so every mode prints the
//! same thing.
use std::{net::IpAddr, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{
    host::{
        snapshot::{Holder, SocketRow},
        workload::Workload,
    },
    kernel::events::{Comm, Family, Retransmit, StateSource, TcpState},
    state::table::{Direction, Ending, Failure, RetransmitSeen, Transition},
};

/// Converts the kernel's CLOCK_MONOTONIC timestamps to wall time, with one offset taken at
/// start (so every line of a run uses the same conversion).
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    realtime_minus_monotonic_ns: i128,
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer; both clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

impl WallClock {
    pub fn now() -> Self {
        let monotonic = clock_ns(libc::CLOCK_MONOTONIC);
        let realtime = clock_ns(libc::CLOCK_REALTIME);
        Self { realtime_minus_monotonic_ns: realtime - monotonic }
    }

    /// For tests: a clock whose monotonic 0 is the given wall time.
    pub fn with_offset_ns(offset: i128) -> Self {
        Self { realtime_minus_monotonic_ns: offset }
    }

    /// Current CLOCK_MONOTONIC, the kernel timestamps' clock.
    pub fn monotonic_now_ns() -> u64 {
        clock_ns(libc::CLOCK_MONOTONIC) as u64
    }

    /// The CLOCK_MONOTONIC time of `wall` (0 for a time before boot).
    pub fn monotonic(&self, wall: DateTime<Utc>) -> u64 {
        let ns = i128::from(wall.timestamp_nanos_opt().unwrap_or(i64::MAX));
        (ns - self.realtime_minus_monotonic_ns).clamp(0, i128::from(u64::MAX)) as u64
    }

    pub fn wall(&self, monotonic_ns: u64) -> DateTime<Utc> {
        let ns = i128::from(monotonic_ns) + self.realtime_minus_monotonic_ns;
        DateTime::from_timestamp_nanos(ns.clamp(0, i128::from(i64::MAX)) as i64)
    }
}

/// One socket as the table shows it (and as the agent sends it to `netwatch table`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Listed {
    pub row: SocketRow,
    pub owners: Vec<Holder>,
    /// Time in the current state, when an agent saw the state begin.
    pub in_state: Option<Duration>,
    /// The `ip netns` name of the socket's namespace, if it has one.
    pub netns_name: Option<String>,
    /// False for rows kept by the agent from events: queue lengths change with every
    /// packet and no event reports them, so they are not shown rather than shown stale.
    pub queues_known: bool,
    /// The owners the socket had, oldest first (known only to an agent).
    #[serde(default)]
    pub owner_history: Vec<OwnerChange>,
    /// The owner's (or first holder's) cgroup and the container, pod or unit it names, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Arc<Workload>>,
}

/// What changed in the table since the previous change, for a view that mirrors it
/// (`netwatch top`); sent at most ten times a second, between the stream's records.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RowsChange {
    /// The table was rebuilt from a new snapshot (after lost events): `upsert` is every row.
    pub full: bool,
    /// Rows new or changed.
    pub upsert: Vec<Listed>,
    /// Cookies of the sockets the table no longer lists.
    pub gone: Vec<u64>,
}

/// A process that became a socket's owner: connecting, listening, accepting, closing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OwnerChange {
    #[serde(flatten)]
    pub owner: Owner,
    /// How long before the table was taken; None when the snapshot found it.
    pub ago: Option<Duration>,
}

/// A connection's two ends, (address, port) each: what the filters match and the statistics
/// count under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
}

/// A process that owns a socket (or held it, or took it over), by pid and command name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    pub comm: Comm,
    /// The cgroup v2 id the owner was in when it acted (0: not known).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cgroup_id: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl std::fmt::Display for Owner {
    /// `comm[pid]`, as `top` and the histories write a process.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.comm, self.pid)
    }
}

/// One line of the stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamRecord {
    /// Boxed: a transition is much larger than a loss report.
    Transition(Box<TransitionRecord>),
    Retransmit(Box<RetransmitRecord>),
    Lost(LossRecord),
    LogFailed(LogFailedRecord),
    ExportDropped(ExportDroppedRecord),
}

/// RFC 3339 in UTC with exactly nine fractional digits, so that every record's `time` has
/// the same width and sorts as text.
pub(crate) mod rfc3339_nanos {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        time: &DateTime<Utc>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&time.to_rfc3339_opts(SecondsFormat::Nanos, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<DateTime<Utc>, D::Error> {
        DateTime::<Utc>::deserialize(deserializer)
    }
}

/// A `transition` record: every field of the event, addresses as strings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransitionRecord {
    /// RFC 3339 wall time (UTC, nanoseconds).
    #[serde(with = "rfc3339_nanos")]
    pub time: DateTime<Utc>,
    /// The kernel's CLOCK_MONOTONIC timestamp.
    pub mono_ns: u64,
    pub old: TcpState,
    pub new: TcpState,
    /// Time in `old`, or since creation for a first transition; null when not seen.
    pub duration_ns: Option<u64>,
    pub duration_ms: Option<f64>,
    /// The socket's owner; null when not known yet.
    pub pid: Option<u32>,
    pub comm: Option<Comm>,
    pub family: Family,
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
    pub cookie: Option<u64>,
    pub netns: u32,
    pub skaddr: String,
    /// The task that was on the CPU when the kernel made the change.
    pub task_pid: u32,
    pub task_tid: u32,
    pub task_comm: Comm,
    pub source: StateSource,
    /// On a CLOSE transition only: how long the socket lived (when netwatch saw it born),
    /// and what it carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifespan_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_received: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retransmits: Option<u32>,
    /// On a CLOSE transition that ended a failed connection: refused, timeout, aborted,
    /// reset, reset_sent, listener_closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// On a CLOSE that no tracepoint reported (`source` is `sock_diag`): what ended the
    /// socket (expired, reused, vanished, netns_deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ending: Option<Ending>,
    /// Who opened the connection (outbound, inbound), when netwatch knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    /// An IPv6 socket that takes no IPv4 (IPV6_V6ONLY); present only when true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub v6only: bool,
    /// The owner's cgroup and the container, pod or unit it names, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Arc<Workload>>,
}

pub(crate) fn millis(ns: u64) -> f64 {
    ns as f64 / 1e6
}

impl TransitionRecord {
    pub fn endpoints(&self) -> Endpoints {
        Endpoints { local: (self.laddr, self.lport), remote: (self.raddr, self.rport) }
    }

    pub fn new(t: &Transition, clock: &WallClock) -> Self {
        let c = &t.change;
        TransitionRecord {
            time: clock.wall(c.ts_ns),
            mono_ns: c.ts_ns,
            old: c.old,
            new: c.new,
            duration_ns: t.in_old_state_ns,
            duration_ms: t.in_old_state_ns.map(millis),
            pid: t.owner.as_ref().map(|o| o.pid),
            comm: t.owner.as_ref().map(|o| o.comm.clone()),
            family: c.family,
            laddr: c.local.0,
            lport: c.local.1,
            raddr: c.remote.0,
            rport: c.remote.1,
            cookie: c.cookie,
            netns: c.netns,
            skaddr: format!("{:#x}", c.skaddr),
            task_pid: c.task.pid,
            task_tid: c.task.tid,
            task_comm: c.task.comm.clone(),
            source: c.source,
            lifespan_ns: t.lifespan_ns,
            bytes_sent: c.totals.map(|t| t.bytes_sent),
            bytes_received: c.totals.map(|t| t.bytes_received),
            retransmits: c.totals.map(|t| t.retransmits),
            failure: t.failure,
            ending: t.ending,
            direction: t.direction,
            v6only: t.v6only,
            workload: None,
        }
    }
}

/// What was sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resent {
    /// A segment of a connection (`tcp:tcp_retransmit_skb`).
    Segment,
    /// A listener's SYN-ACK to a half-open connection (`tcp:tcp_retransmit_synack`).
    Synack,
}

impl Resent {
    pub const ALL: [Resent; 2] = [Resent::Segment, Resent::Synack];

    /// The name in JSON and in metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Resent::Segment => "segment",
            Resent::Synack => "synack",
        }
    }
}

/// A `retransmit` record: a connection sent a segment again, or a listener a SYN-ACK.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetransmitRecord {
    #[serde(with = "rfc3339_nanos")]
    pub time: DateTime<Utc>,
    pub mono_ns: u64,
    pub resent: Resent,
    /// The connection's state as netwatch knows it (LISTEN for a SYN-ACK); null if unknown.
    pub state: Option<TcpState>,
    /// The socket's owner (the listener's for a SYN-ACK); null when not known.
    pub pid: Option<u32>,
    pub comm: Option<Comm>,
    pub family: Family,
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
    /// The connection's cookie; for a SYN-ACK, the listener's.
    pub cookie: u64,
    pub netns: u32,
    /// Retransmissions of this socket seen so far, this one included.
    pub count: u64,
    /// Who opened the connection (outbound, inbound), when netwatch knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    /// The owner's cgroup and the container, pod or unit it names, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Arc<Workload>>,
}

impl RetransmitRecord {
    pub fn endpoints(&self) -> Endpoints {
        Endpoints { local: (self.laddr, self.lport), remote: (self.raddr, self.rport) }
    }

    pub fn new(r: &Retransmit, seen: RetransmitSeen, clock: &WallClock) -> Self {
        RetransmitRecord {
            time: clock.wall(r.ts_ns),
            mono_ns: r.ts_ns,
            resent: if r.synack { Resent::Synack } else { Resent::Segment },
            state: seen.state,
            pid: seen.owner.as_ref().map(|o| o.pid),
            comm: seen.owner.map(|o| o.comm),
            family: r.family,
            laddr: r.local.0,
            lport: r.local.1,
            raddr: r.remote.0,
            rport: r.remote.1,
            cookie: r.cookie,
            netns: r.netns,
            count: seen.count,
            direction: seen.direction,
            workload: None,
        }
    }
}

/// Why events were lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossReason {
    /// The kernel could not reserve space in the ring buffer.
    RingBufferFull,
    /// A record arrived that netwatch could not decode.
    Malformed,
    /// The kernel skipped a run of one of netwatch's tracing programs because another run of
    /// it was in progress on the same CPU (an interrupt came in the middle): its event was
    /// never made. The kernel counts these as the program's `recursion_misses`.
    Skipped,
    /// This client read the agent's stream too slowly and missed records.
    ClientTooSlow,
}

impl LossReason {
    pub const ALL: [LossReason; 4] = [
        LossReason::RingBufferFull,
        LossReason::Malformed,
        LossReason::Skipped,
        LossReason::ClientTooSlow,
    ];

    /// The name in JSON and in metric labels.
    pub fn name(self) -> &'static str {
        match self {
            LossReason::RingBufferFull => "ring_buffer_full",
            LossReason::Malformed => "malformed",
            LossReason::Skipped => "skipped",
            LossReason::ClientTooSlow => "client_too_slow",
        }
    }
}

/// A `log_failed` record: the event log could not be written, and logging stopped; tracing
/// goes on. Records from here on are not in the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogFailedRecord {
    #[serde(with = "rfc3339_nanos")]
    pub time: DateTime<Utc>,
    pub path: std::path::PathBuf,
    pub error: String,
}

/// An `export_dropped` record: an exporter (`otlp`) dropped `count` records since the
/// previous report, `total` since start, because its destination was slow, absent or
/// refused them. Nothing was lost for the stream, the log or the table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExportDroppedRecord {
    #[serde(with = "rfc3339_nanos")]
    pub time: DateTime<Utc>,
    pub destination: String,
    pub count: u64,
    pub total: u64,
}

/// A `lost` record: `count` new losses since the previous report, `total` since start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossRecord {
    #[serde(with = "rfc3339_nanos")]
    pub time: DateTime<Utc>,
    pub reason: LossReason,
    pub count: u64,
    pub total: u64,
}

impl StreamRecord {
    pub fn json(&self) -> String {
        serde_json::to_string(self)
            .unwrap_or_else(|e| format!(r#"{{"type":"error","error":"{e}"}}"#))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;
    use crate::output::Format;
    use crate::{
        kernel::events::{SockKey, StateChange, Task},
        state::table::Owner,
    };

    fn transition(owner: Option<Owner>, in_old_state_ns: Option<u64>) -> Transition {
        Transition {
            change: StateChange {
                ts_ns: 1_500_000_000,
                source: StateSource::TpBtf,
                key: SockKey::Cookie(77),
                cookie: Some(77),
                skaddr: 0xffff_8880_0000_1000,
                inode: 0,
                netns: 4026531840,
                family: Family::Ipv6,
                local: (IpAddr::V6(Ipv6Addr::LOCALHOST), 40000),
                remote: (IpAddr::V6(Ipv6Addr::LOCALHOST), 8080),
                old: TcpState::SynSent,
                new: TcpState::Established,
                task: Task { pid: 0, tid: 0, comm: "swapper/1".into(), cgroup: 0 },
                deferred_connect: false,
                timewait: None,
                listener: None,
                totals: None,
            },
            owner,
            in_old_state_ns,
            lifespan_ns: None,
            failure: None,
            ending: None,
            direction: None,
            v6only: false,
        }
    }

    fn curl() -> Option<Owner> {
        Some(Owner { pid: 4242, comm: "curl".into(), cgroup_id: 0 })
    }

    #[test]
    fn text_shows_owner_ports_states_and_millis() {
        let record = TransitionRecord::new(
            &transition(curl(), Some(412_345)),
            &WallClock::with_offset_ns(0),
        );
        let line = record.text();
        let fields: Vec<_> = line.split_whitespace().collect();
        assert_eq!(
            fields[1..],
            ["4242", "curl", "[::1]:40000", "[::1]:8080", "SYN_SENT", "->", "ESTABLISHED", "0.412"]
        );
    }

    #[test]
    fn text_marks_unknowns_with_a_dash() {
        let line =
            TransitionRecord::new(&transition(None, None), &WallClock::with_offset_ns(0)).text();
        let fields: Vec<_> = line.split_whitespace().collect();
        assert_eq!(fields[1..3], ["-", "-"]);
        assert_eq!(fields.last(), Some(&"-"));
        assert!(!line.contains("swapper"), "the on-CPU task is never shown as owner: {line}");
    }

    #[test]
    fn json_carries_every_field() {
        let clock = WallClock::with_offset_ns(1_700_000_000_000_000_000);
        let record = StreamRecord::Transition(Box::new(TransitionRecord::new(
            &transition(curl(), Some(1_250_000)),
            &clock,
        )));
        let line = record.json();
        assert!(line.starts_with(r#"{"type":"transition","#), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["time"], "2023-11-14T22:13:21.500000000Z");
        assert_eq!(v["mono_ns"], 1_500_000_000u64);
        assert_eq!((v["old"].as_str(), v["new"].as_str()), (Some("SYN_SENT"), Some("ESTABLISHED")));
        assert_eq!(
            (v["duration_ns"].as_u64(), v["duration_ms"].as_f64()),
            (Some(1_250_000), Some(1.25))
        );
        assert_eq!((v["pid"].as_u64(), v["comm"].as_str()), (Some(4242), Some("curl")));
        assert_eq!(v["family"], "ipv6");
        assert_eq!((v["laddr"].as_str(), v["lport"].as_u64()), (Some("::1"), Some(40000)));
        assert_eq!((v["raddr"].as_str(), v["rport"].as_u64()), (Some("::1"), Some(8080)));
        assert_eq!((v["cookie"].as_u64(), v["netns"].as_u64()), (Some(77), Some(4026531840)));
        assert_eq!(v["skaddr"], "0xffff888000001000");
        assert_eq!(
            (v["task_comm"].as_str(), v["source"].as_str()),
            (Some("swapper/1"), Some("tp_btf"))
        );
        // What the agent sends, a client reads back unchanged.
        assert_eq!(serde_json::from_str::<StreamRecord>(&line).unwrap(), record);
    }

    #[test]
    fn json_unknowns_are_null() {
        let record = StreamRecord::Transition(Box::new(TransitionRecord::new(
            &transition(None, None),
            &WallClock::with_offset_ns(0),
        )));
        let v: serde_json::Value = serde_json::from_str(&record.json()).unwrap();
        assert!(v["pid"].is_null() && v["comm"].is_null() && v["duration_ms"].is_null());
    }

    #[test]
    fn loss_reports_in_both_formats() {
        let record = StreamRecord::Lost(LossRecord {
            time: DateTime::from_timestamp_nanos(0),
            reason: LossReason::RingBufferFull,
            count: 12,
            total: 40,
        });
        assert!(record.render(Format::Text).contains("LOST 12 events (ring buffer full"));
        let line = record.render(Format::Json);
        assert!(line.starts_with(r#"{"type":"lost","#), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!((v["count"].as_u64(), v["total"].as_u64()), (Some(12), Some(40)));
        assert_eq!(v["reason"], "ring_buffer_full");
        assert_eq!(serde_json::from_str::<StreamRecord>(&line).unwrap(), record);
    }

    #[test]
    fn retransmit_records_round_trip_and_read_as_stream_lines() {
        let retransmit = Retransmit {
            ts_ns: 2_000_000_000,
            cookie: 9,
            synack: false,
            netns: 4026531833,
            family: Family::Ipv4,
            local: (IpAddr::from([10, 0, 0, 1]), 40000),
            remote: (IpAddr::from([10, 0, 0, 5]), 5432),
        };
        let seen = RetransmitSeen {
            owner: curl(),
            state: Some(TcpState::Established),
            direction: None,
            count: 3,
        };
        let record = StreamRecord::Retransmit(Box::new(RetransmitRecord::new(
            &retransmit,
            seen,
            &WallClock::with_offset_ns(0),
        )));
        let json = record.json();
        assert!(json.starts_with(r#"{"type":"retransmit","#), "{json}");
        assert!(json.contains(r#""resent":"segment""#) && json.contains(r#""count":3"#), "{json}");
        assert_eq!(serde_json::from_str::<StreamRecord>(&json).unwrap(), record);
        let text = record.render(Format::Text);
        assert!(text.contains("10.0.0.1:40000") && text.contains("10.0.0.5:5432"), "{text}");
        assert!(
            text.contains("RETRANSMIT") && text.contains("ESTABLISHED") && text.ends_with("#3")
        );
    }
    #[test]
    fn a_listeners_line_writes_its_ends_as_the_table_does() {
        let mut record =
            TransitionRecord::new(&transition(curl(), None), &WallClock::with_offset_ns(0));
        (record.laddr, record.lport) = ("::".parse().unwrap(), 8000);
        (record.raddr, record.rport) = ("::".parse().unwrap(), 0);
        let text = record.text();
        assert!(text.contains(" *:8000 ") && text.contains(" *:* "), "{text}");
        (record.raddr, record.rport) = ("0.0.0.0".parse().unwrap(), 0);
        assert!(record.text().contains(" 0.0.0.0:* "), "{}", record.text());
    }

    #[test]
    fn wide_endpoints_widen_their_columns_and_lines_stay_under_the_header() {
        use crate::output::TextLayout;
        let mut layout = TextLayout::default();
        let mut record =
            TransitionRecord::new(&transition(curl(), None), &WallClock::with_offset_ns(0));
        let narrow = StreamRecord::Transition(Box::new(record.clone()));
        assert!(!layout.fit(&narrow), "an IPv4 line fits the first columns");
        (record.laddr, record.raddr) = (
            "::ffff:192.168.100.200".parse().unwrap(),
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap(),
        );
        let wide = StreamRecord::Transition(Box::new(record));
        assert!(layout.fit(&wide), "wider endpoints grow the columns");
        assert!(!layout.fit(&wide) && !layout.fit(&narrow), "and they stay grown");
        let header = layout.header();
        for line in [narrow.render_in(Format::Text, layout), wide.render_in(Format::Text, layout)] {
            let state = line.find("SYN_SENT").or_else(|| line.find("ESTABLISHED")).unwrap();
            assert_eq!(state, header.find("OLD").unwrap(), "{header}\n{line}");
        }
    }
}
