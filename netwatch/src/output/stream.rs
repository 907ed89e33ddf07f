//! How stream records look as text: one aligned line per record, under the header of its
//! [`TextLayout`].
//! NDJSON is the records' own serialization ([`crate::record`]).
use std::net::IpAddr;

use chrono::{DateTime, Local, Utc};

use super::address::endpoint;
use crate::{
    host::workload::Workload,
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

/// The widths of the text stream's LOCAL and REMOTE columns. They start at an IPv4
/// endpoint's (`255.255.255.255:65535` and a space); a wider endpoint (IPv4-mapped, IPv6, a
/// scope) widens its column for the rest of the stream, and the header is printed again, so
/// that every line stays aligned under the header above it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextLayout {
    local: usize,
    remote: usize,
}

impl Default for TextLayout {
    fn default() -> Self {
        TextLayout { local: 23, remote: 23 }
    }
}

/// A full IPv6 endpoint, `[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535`: a column that
/// must grow grows to this at least, so that it grows once.
const IPV6_WIDTH: usize = 47;

impl TextLayout {
    pub fn header(&self) -> String {
        format!(
            "TIME            PID     COMM             {:<local$} {:<remote$} OLD          -> NEW          MS",
            "LOCAL",
            "REMOTE",
            local = self.local,
            remote = self.remote
        )
    }

    /// Widens the columns to fit `record`'s endpoints; true if they grew.
    pub fn fit(&mut self, record: &StreamRecord) -> bool {
        let (ends, v6only) = match record {
            StreamRecord::Transition(t) => (((t.laddr, t.lport), (t.raddr, t.rport)), t.v6only),
            StreamRecord::Retransmit(r) => (((r.laddr, r.lport), (r.raddr, r.rport)), false),
            StreamRecord::Lost(_) | StreamRecord::LogFailed(_) | StreamRecord::ExportDropped(_) => {
                return false;
            }
        };
        let grown = |width: usize, end: (IpAddr, u16)| {
            let needed = endpoint(end, v6only, None, None).len();
            if needed > width { needed.max(IPV6_WIDTH) } else { width }
        };
        let before = *self;
        (self.local, self.remote) = (grown(self.local, ends.0), grown(self.remote, ends.1));
        *self != before
    }
}

impl TransitionRecord {
    pub fn text(&self) -> String {
        self.text_in(TextLayout::default())
    }

    pub fn text_in(&self, layout: TextLayout) -> String {
        let ms =
            self.duration_ns.map_or_else(|| "-".to_string(), |ns| format!("{:.3}", millis(ns)));
        let (local, remote) = ((self.laddr, self.lport), (self.raddr, self.rport));
        let columns = Columns {
            time: self.time,
            pid: self.pid,
            comm: self.comm.as_deref(),
            v6only: self.v6only,
        };
        let mut line = format!(
            "{} {:<12} -> {:<12} {ms}",
            columns.text((local, remote), layout),
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
        push_container(&mut line, self.workload.as_deref());
        line
    }
}

/// The TIME column: local wall-clock time to the microsecond.
fn clock(time: DateTime<Utc>) -> impl std::fmt::Display {
    time.with_timezone(&Local).format("%H:%M:%S%.6f")
}

/// The columns every socket line of the stream starts with: TIME, PID, COMM, LOCAL, REMOTE
/// (`-` for an owner not known).
struct Columns<'a> {
    time: DateTime<Utc>,
    pid: Option<u32>,
    comm: Option<&'a str>,
    v6only: bool,
}

impl Columns<'_> {
    /// The columns for these ends, aligned under `layout`'s header.
    fn text(&self, (local, remote): ((IpAddr, u16), (IpAddr, u16)), layout: TextLayout) -> String {
        let pid = self.pid.map_or_else(|| "-".to_string(), |pid| pid.to_string());
        let comm = self.comm.unwrap_or("-");
        format!(
            "{} {pid:<7} {comm:<16} {:<local$} {:<remote$}",
            clock(self.time),
            endpoint(local, self.v6only, None, None),
            endpoint(remote, self.v6only, None, None),
            local = layout.local,
            remote = layout.remote,
        )
    }
}

impl RetransmitRecord {
    /// A stream line in the transition columns: `RETRANSMIT` in the OLD column, the state
    /// after the arrow, and the socket's count last.
    pub fn text_in(&self, layout: TextLayout) -> String {
        let what = match self.resent {
            Resent::Segment => "RETRANSMIT",
            Resent::Synack => "SYNACK-RETX",
        };
        let state = self.state.map_or_else(|| "-".to_string(), |s| s.to_string());
        let (local, remote) = ((self.laddr, self.lport), (self.raddr, self.rport));
        let mut line = format!(
            "{} {what:<12} in {state:<12} #{}",
            Columns { time: self.time, pid: self.pid, comm: self.comm.as_deref(), v6only: false }
                .text((local, remote), layout),
            self.count,
        );
        push_container(&mut line, self.workload.as_deref());
        line
    }
}

/// The owner's container or pod at the end of a line, `container=LABEL`; a systemd unit
/// only in JSON, or every line of a plain host would carry one.
fn push_container(line: &mut String, workload: Option<&Workload>) {
    if let Some(workload) = workload.filter(|w| w.is_container()) {
        line.push_str(" container=");
        line.push_str(&workload.label());
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
        self.render_in(format, TextLayout::default())
    }

    /// The record as a line: JSON, or text in `layout`'s columns.
    pub fn render_in(&self, format: Format, layout: TextLayout) -> String {
        match (format, self) {
            (Format::Json, record) => record.json(),
            (Format::Text, StreamRecord::Transition(t)) => t.text_in(layout),
            (Format::Text, StreamRecord::Retransmit(r)) => r.text_in(layout),
            (Format::Text, StreamRecord::Lost(l)) => l.text(),
            (Format::Text, StreamRecord::LogFailed(l)) => format!(
                "{} LOG STOPPED: {} ({}); tracing goes on, records are no longer logged",
                clock(l.time),
                l.path.display(),
                l.error
            ),
            (Format::Text, StreamRecord::ExportDropped(d)) => format!(
                "{} {} DROPPED {} records (the collector is slow, absent or refused them; {} \
                 since start); the stream, the log and the table are complete",
                clock(d.time),
                d.destination.to_uppercase(),
                d.count,
                d.total
            ),
        }
    }
}
