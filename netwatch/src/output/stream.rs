//! How stream records look as text: one aligned line per record, under [`TEXT_HEADER`].
//! NDJSON is the records' own serialization ([`crate::record`]).
use std::net::IpAddr;

use chrono::{DateTime, Local, Utc};

use super::address::endpoint;
use crate::{
    record::{
        LossReason, LossRecord, Resent, RetransmitRecord, StreamRecord, TransitionRecord, millis,
    },
    state::table::{Ending, Failure},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// Column header of the text stream; address columns fit any IPv4 endpoint, and an IPv6
/// endpoint widens its line rather than being cut.
pub const TEXT_HEADER: &str = "TIME            PID     COMM             LOCAL                   REMOTE                  OLD          -> NEW          MS";

impl TransitionRecord {
    pub fn text(&self) -> String {
        let ms =
            self.duration_ns.map_or_else(|| "-".to_string(), |ns| format!("{:.3}", millis(ns)));
        let (local, remote) = ((self.laddr, self.lport), (self.raddr, self.rport));
        let mut line = format!(
            "{} {:<12} -> {:<12} {ms}",
            socket_columns(self.time, self.pid, self.comm.as_deref(), local, remote),
            self.old,
            self.new,
        );
        // Why it ended, as the JSON says: a failure, or what ended a socket no event ended.
        for why in
            [self.failure.map(Failure::name), self.ending.map(Ending::name)].into_iter().flatten()
        {
            line.push(' ');
            line.push_str(why);
        }
        line
    }
}

/// The TIME column: local wall-clock time to the microsecond.
fn clock(time: DateTime<Utc>) -> impl std::fmt::Display {
    time.with_timezone(&Local).format("%H:%M:%S%.6f")
}

/// The columns every socket line of the stream starts with: TIME, PID, COMM, LOCAL, REMOTE
/// (`-` for an owner not known), aligned under [`TEXT_HEADER`].
fn socket_columns(
    time: DateTime<Utc>,
    pid: Option<u32>,
    comm: Option<&str>,
    local: (IpAddr, u16),
    remote: (IpAddr, u16),
) -> String {
    let pid = pid.map_or_else(|| "-".to_string(), |pid| pid.to_string());
    let comm = comm.unwrap_or("-");
    format!(
        "{} {pid:<7} {comm:<16} {:<23} {:<23}",
        clock(time),
        endpoint(local, false, None, None),
        endpoint(remote, false, None, None)
    )
}

impl RetransmitRecord {
    /// A stream line in the transition columns: `RETRANSMIT` in the OLD column, the state
    /// after the arrow, and the socket's count last.
    pub fn text(&self) -> String {
        let what = match self.resent {
            Resent::Segment => "RETRANSMIT",
            Resent::Synack => "SYNACK-RETX",
        };
        let state = self.state.map_or_else(|| "-".to_string(), |s| s.to_string());
        let (local, remote) = ((self.laddr, self.lport), (self.raddr, self.rport));
        format!(
            "{} {what:<12} in {state:<12} #{}",
            socket_columns(self.time, self.pid, self.comm.as_deref(), local, remote),
            self.count,
        )
    }
}

impl LossRecord {
    pub fn text(&self) -> String {
        let why = match self.reason {
            LossReason::RingBufferFull => "ring buffer full: raise --ring-size",
            LossReason::Malformed => "malformed records",
            LossReason::Skipped => "the kernel skipped nested program runs",
            LossReason::ClientTooSlow => "this reader fell behind the agent",
        };
        format!(
            "{} LOST {} events ({why}; {} since start)",
            clock(self.time),
            self.count,
            self.total
        )
    }
}

impl StreamRecord {
    pub fn render(&self, format: Format) -> String {
        match (format, self) {
            (Format::Json, record) => record.json(),
            (Format::Text, StreamRecord::Transition(t)) => t.text(),
            (Format::Text, StreamRecord::Retransmit(r)) => r.text(),
            (Format::Text, StreamRecord::Lost(l)) => l.text(),
            (Format::Text, StreamRecord::LogFailed(l)) => format!(
                "{} LOG STOPPED: {} ({}); tracing goes on, records are no longer logged",
                clock(l.time),
                l.path.display(),
                l.error
            ),
        }
    }
}
