//! What the event log recorded, read back: `netwatch log`, `history --log`, `stats --log`
//! and the replays of `watch` and `top`, from the log alone, with no agent.
//!
//! The data's path: [`files`] (a log and its rotations, oldest first, and where in each a
//! time begins) -> [`reader`] (whole lines, numbered, the bad ones reported and skipped)
//! -> [`Entry`] (one parsed line) -> [`replay`] (the lines paced as they happened). The log
//! holds the stream's records and, besides them, the agent's table at its start, after a
//! resync and at the top of every rotated file ([`TableMark`] and its [`SocketLine`]s), so
//! that a reader of any file knows what was open when it began.
pub mod files;
pub mod reader;
pub mod rebuild;
pub mod replay;
pub mod window;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{
    record::{
        ExportDroppedRecord, Listed, LogFailedRecord, LossRecord, RetransmitRecord, StreamRecord,
        TransitionRecord, rfc3339_nanos,
    },
    serve::eventlog::FORMAT_VERSION,
};

/// Why the agent wrote its table into the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableReason {
    /// The agent started: its first snapshot.
    Start,
    /// Events were lost and the table was rebuilt from a new snapshot.
    Resync,
    /// The log rotated: every file begins with the table.
    Rotation,
}

impl TableReason {
    pub fn name(self) -> &'static str {
        match self {
            TableReason::Start => "agent start",
            TableReason::Resync => "resync after lost events",
            TableReason::Rotation => "log rotation",
        }
    }
}

/// A `table` line: the agent's table as it was at `time`; the next `sockets` lines are its
/// rows (`socket`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableMark {
    #[serde(with = "rfc3339_nanos")]
    pub time: DateTime<Utc>,
    /// CLOCK_MONOTONIC at `time`, the clock of the records' `mono_ns`.
    pub mono_ns: u64,
    pub reason: TableReason,
    pub sockets: u64,
}

/// A `socket` line: one row of the table above it, as `netwatch table --json` sends it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SocketLine {
    #[serde(with = "rfc3339_nanos")]
    pub time: DateTime<Utc>,
    #[serde(flatten)]
    pub listed: Listed,
}

/// One line of the log, parsed.
#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    Record(StreamRecord),
    Table(TableMark),
    Socket(Box<SocketLine>),
}

impl Entry {
    /// When it happened (a socket line: when its table was taken).
    pub fn time(&self) -> DateTime<Utc> {
        match self {
            Entry::Record(record) => record_time(record),
            Entry::Table(mark) => mark.time,
            Entry::Socket(socket) => socket.time,
        }
    }
}

pub fn record_time(record: &StreamRecord) -> DateTime<Utc> {
    match record {
        StreamRecord::Transition(t) => t.time,
        StreamRecord::Retransmit(r) => r.time,
        StreamRecord::Lost(l) => l.time,
        StreamRecord::LogFailed(l) => l.time,
        StreamRecord::ExportDropped(e) => e.time,
    }
}

/// Why a line was skipped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("not a netwatch log line ({0})")]
    Garbled(String),
    #[error("written by a newer netwatch (format v{0}; this one reads v{FORMAT_VERSION})")]
    Newer(u64),
    #[error("a record of type '{0}', which this netwatch does not know")]
    UnknownType(String),
    #[error("a '{kind}' line that does not parse ({error})")]
    Bad { kind: String, error: String },
}

/// The version and type of a line, read from the prefix the writer always puts first
/// (`{"v":1,"type":"transition",`) without parsing the rest; None for any other prefix.
pub fn sniff(line: &[u8]) -> Option<(u64, &[u8])> {
    let rest = line.strip_prefix(b"{\"v\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let version = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    let rest = rest[digits..].strip_prefix(b",\"type\":\"")?;
    let end = memchr::memchr(b'"', rest)?;
    Some((version, &rest[..end]))
}

/// Parses one line of the log.
pub fn parse(line: &[u8]) -> Result<Entry, LineError> {
    let (version, kind) = match sniff(line) {
        Some((version, kind)) => (version, kind.to_vec()),
        None => {
            // Not in the writer's order (edited by hand, another tool): read the two fields.
            #[derive(Deserialize)]
            struct Head {
                v: Option<u64>,
                #[serde(rename = "type")]
                kind: Option<String>,
            }
            let head: Head = serde_json::from_slice(line)
                .map_err(|e| LineError::Garbled(short(&e.to_string())))?;
            match (head.v, head.kind) {
                (Some(v), Some(kind)) => (v, kind.into_bytes()),
                _ => return Err(LineError::Garbled("no \"v\" and \"type\" fields".into())),
            }
        }
    };
    if version > u64::from(FORMAT_VERSION) {
        return Err(LineError::Newer(version));
    }
    let kind = String::from_utf8_lossy(&kind).into_owned();
    let bad = |error: serde_json::Error| LineError::Bad {
        kind: kind.clone(),
        error: short(&error.to_string()),
    };
    // Each type is parsed as its own struct (unknown fields, `v` and `type` among them, are
    // ignored), so that an unknown type is told apart from a malformed line of a known one.
    let record = match kind.as_str() {
        "transition" => StreamRecord::Transition(Box::new(
            serde_json::from_slice::<TransitionRecord>(line).map_err(bad)?,
        )),
        "retransmit" => StreamRecord::Retransmit(Box::new(
            serde_json::from_slice::<RetransmitRecord>(line).map_err(bad)?,
        )),
        "lost" => StreamRecord::Lost(serde_json::from_slice::<LossRecord>(line).map_err(bad)?),
        "log_failed" => {
            StreamRecord::LogFailed(serde_json::from_slice::<LogFailedRecord>(line).map_err(bad)?)
        }
        "export_dropped" => StreamRecord::ExportDropped(
            serde_json::from_slice::<ExportDroppedRecord>(line).map_err(bad)?,
        ),
        "table" => return Ok(Entry::Table(serde_json::from_slice(line).map_err(bad)?)),
        "socket" => return Ok(Entry::Socket(Box::new(serde_json::from_slice(line).map_err(bad)?))),
        _ => return Err(LineError::UnknownType(kind)),
    };
    Ok(Entry::Record(record))
}

/// serde_json's message up to its position note, which the caller's own (file:line) replaces.
fn short(message: &str) -> String {
    let cut = message.find(" at line ").unwrap_or(message.len());
    message[..cut].to_string()
}

/// The log lines of a table: its mark, then a socket line per row.
pub fn table_lines(mark: TableMark, rows: &[Listed]) -> impl Iterator<Item = String> + '_ {
    /// [`SocketLine`]'s shape over a borrowed row.
    #[derive(Serialize)]
    struct Borrowed<'a> {
        #[serde(with = "rfc3339_nanos")]
        time: DateTime<Utc>,
        #[serde(flatten)]
        listed: &'a Listed,
    }
    let sockets = rows.iter().map(move |listed| {
        versioned("socket", &serde_json::to_string(&Borrowed { time: mark.time, listed }))
    });
    std::iter::once(versioned("table", &serde_json::to_string(&mark))).chain(sockets)
}

/// `{"v":1,"type":KIND,` before the fields of `json` (an object).
fn versioned(kind: &str, json: &serde_json::Result<String>) -> String {
    let fields = match json {
        Ok(json) => json.strip_prefix('{').unwrap_or(json).to_string(),
        Err(error) => format!("\"error\":{:?}}}", error.to_string()),
    };
    let separator = if fields.starts_with('}') { "" } else { "," };
    format!("{{\"v\":{FORMAT_VERSION},\"type\":\"{kind}\"{separator}{fields}")
}

#[cfg(test)]
mod tests;
