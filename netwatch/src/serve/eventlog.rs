//! The durable event log (`--log PATH`): every stream record appended as one NDJSON line, with
//! size-based rotation.
//!
//! Lines are whole or absent: each batch of records is formatted first and written with one
//! `write` on an `O_APPEND` file, and a write that fails half-way (disk full) is cut back to
//! the last complete line. A line left half-written by a crash is cut the same way when the
//! log is reopened, so every line in the file parses. Any failure to write stops the logging,
//! never the tracing: the caller is told once, and netwatch keeps going.
use std::{
    fs::{File, OpenOptions},
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use crate::record::{LogFailedRecord, StreamRecord, WallClock};

/// Version of the log's line format (the `v` field of every line).
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug)]
pub struct LogOptions {
    pub path: PathBuf,
    /// Rotate when the file would grow past this many bytes.
    pub max_size: u64,
    /// Rotated files kept (PATH.1 newest .. PATH.N oldest).
    pub keep: u32,
}

pub struct EventLog {
    options: LogOptions,
    file: File,
    size: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("event log {path}: {source}")]
pub struct LogError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl EventLog {
    /// Opens (appending to) the log, cutting a half-written last line left by a crash.
    pub fn open(options: LogOptions) -> Result<EventLog, LogError> {
        let fail = |source| LogError { path: options.path.clone(), source };
        let file = append_only(&options.path).map_err(fail)?;
        let size = complete_length(&file).map_err(fail)?;
        if size != file.metadata().map_err(fail)?.len() {
            tracing::warn!(
                "event log {}: cut a half-written last line left by a crash",
                options.path.display()
            );
            file.set_len(size).map_err(fail)?;
        }
        Ok(EventLog { options, file, size })
    }

    /// Appends `records`, one line each, rotating whenever the next line would not fit (a
    /// single line longer than the limit gets a file of its own).
    pub fn append(&mut self, records: &[StreamRecord]) -> Result<(), LogError> {
        self.append_with_table(records, &mut |_| Vec::new())
    }

    /// Appends `records` as [`EventLog::append`] does; each file a rotation begins starts
    /// with the lines `table` gives for the records still to be written after it.
    pub fn append_with_table(
        &mut self,
        records: &[StreamRecord],
        table: &mut dyn FnMut(&[StreamRecord]) -> Vec<String>,
    ) -> Result<(), LogError> {
        let mut chunk = String::new();
        for (at, record) in records.iter().enumerate() {
            let line = line(record) + "\n";
            let used = self.size + chunk.len() as u64;
            if used > 0 && used + line.len() as u64 > self.options.max_size {
                self.write(&chunk)?;
                chunk.clear();
                self.rotate().map_err(|source| self.error(source))?;
                chunk.push_str(&lines_text(table(&records[at..])));
            }
            chunk.push_str(&line);
        }
        self.write(&chunk)
    }

    /// Appends lines that belong together (a table) to one file, whole: after a rotation
    /// when they would not fit in what is left of this one.
    pub fn append_block(&mut self, lines: Vec<String>) -> Result<(), LogError> {
        let block = lines_text(lines);
        if self.size > 0 && self.size + block.len() as u64 > self.options.max_size {
            self.rotate().map_err(|source| self.error(source))?;
        }
        self.write(&block)
    }

    pub fn max_size(&self) -> u64 {
        self.options.max_size
    }

    /// One write of whole lines; on failure, cut back whatever part of it landed.
    fn write(&mut self, lines: &str) -> Result<(), LogError> {
        if lines.is_empty() {
            return Ok(());
        }
        if let Err(source) = self.file.write_all(lines.as_bytes()) {
            let _ = self.file.set_len(self.size);
            return Err(self.error(source));
        }
        self.size += lines.len() as u64;
        Ok(())
    }

    fn error(&self, source: io::Error) -> LogError {
        LogError { path: self.options.path.clone(), source }
    }

    /// PATH -> PATH.1 -> ... -> PATH.keep (the oldest falls off), then a new, empty PATH.
    fn rotate(&mut self) -> io::Result<()> {
        let rotated = |n: u32| {
            let mut name = self.options.path.clone().into_os_string();
            name.push(format!(".{n}"));
            PathBuf::from(name)
        };
        if self.options.keep == 0 {
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        match std::fs::remove_file(rotated(self.options.keep)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        for n in (1..self.options.keep).rev() {
            match std::fs::rename(rotated(n), rotated(n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.options.path, rotated(1))?;
        self.file = append_only(&self.options.path)?;
        self.size = 0;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.options.path
    }
}

/// Opens `path` for appending, creating it readable by its owner only: it holds every
/// connection of the host (an existing file keeps its mode).
fn append_only(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    OpenOptions::new().create(true).append(true).read(true).mode(0o600).open(path)
}

fn lines_text(lines: Vec<String>) -> String {
    lines.into_iter().map(|line| line + "\n").collect()
}

/// One log line: the stream record with the format version first.
pub fn line(record: &StreamRecord) -> String {
    let json = record.json();
    match json.strip_prefix('{') {
        Some(rest) => format!("{{\"v\":{FORMAT_VERSION},{rest}"),
        None => json,
    }
}

/// Length of the file up to and including its last newline.
pub(crate) fn complete_length(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::FileExt as _;
    let length = file.metadata()?.len();
    let mut end = length;
    let mut chunk = [0u8; 4096];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let size = (end - start) as usize;
        file.read_exact_at(&mut chunk[..size], start)?;
        if let Some(at) = chunk[..size].iter().rposition(|&b| b == b'\n') {
            return Ok(start + at as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// Parses sizes such as `100M`, `512K`, `1G` or plain bytes (binary units).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let (digits, unit) = match trimmed.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => trimmed.split_at(at),
        None => (trimmed, ""),
    };
    let number: u64 =
        digits.parse().map_err(|_| format!("'{text}' is not a size (e.g. 100M, 512K, 1G)"))?;
    let multiplier: u64 =
        match unit.to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
            "" => 1,
            "K" => 1 << 10,
            "M" => 1 << 20,
            "G" => 1 << 30,
            _ => return Err(format!("'{text}': unknown unit '{unit}' (use K, M or G)")),
        };
    let size = number.checked_mul(multiplier).ok_or_else(|| format!("'{text}' is too large"))?;
    if size < 4096 {
        return Err(format!("'{text}' is below the smallest log size, 4K"));
    }
    Ok(size)
}

/// An optional event log that turns itself off, once and loudly, when it cannot write.
pub struct Logging {
    log: Option<EventLog>,
    /// The clock of the records, which the table lines and a failure report are stamped
    /// with too (the tracer's: one offset for a whole run).
    clock: WallClock,
    /// A rotation's table was too large to repeat at the top of every file: said once.
    table_too_large: bool,
}

impl Logging {
    /// Opens the log, if one was asked for. A log that cannot be opened is an error: whoever
    /// asked for one would otherwise trace without it.
    pub fn start(options: Option<LogOptions>) -> Result<Logging, crate::Error> {
        let log = options.map(EventLog::open).transpose().map_err(|e| {
            crate::Error::io(
                format!(
                    "cannot open the event log {} (choose a writable path for --log)",
                    e.path.display()
                ),
                e.source,
            )
        })?;
        Ok(Logging { log, clock: WallClock::now(), table_too_large: false })
    }

    /// Stamps what the log writes of its own with the records' clock.
    pub fn set_clock(&mut self, clock: WallClock) {
        self.clock = clock;
    }

    /// Appends `records` to the log. A failure stops the logging, not the tracing, and is
    /// itself a record, appended to `records` for the stream and the metrics.
    pub fn write(&mut self, records: &mut Vec<StreamRecord>) {
        if let Some(log) = &mut self.log
            && let Err(error) = log.append(records)
        {
            records.push(self.stop(error));
        }
    }

    /// [`Logging::write`], and a new file that a rotation begins starts with the table
    /// (`rows()`, asked once), so that a reader of one file knows what was open. The rows
    /// are the table after the whole batch: those the rest of the batch, after the table,
    /// creates are left out of it. A table larger than a quarter of a file is not repeated
    /// (said once).
    pub fn write_with_table(
        &mut self,
        records: &mut Vec<StreamRecord>,
        rows: impl FnOnce() -> Vec<crate::record::Listed>,
    ) {
        let Some(log) = &mut self.log else { return };
        let (clock, max_size) = (self.clock, log.max_size());
        let mut rows = Some(rows);
        let mut listed: Vec<crate::record::Listed> = Vec::new();
        let mut too_large = false;
        let mut table = |rest: &[StreamRecord]| {
            if let Some(rows) = rows.take() {
                listed = rows();
            }
            let born: std::collections::HashSet<u64> = rest
                .iter()
                .filter_map(|r| match r {
                    StreamRecord::Transition(t)
                        if crate::state::history::is_birth(t.old, t.new) =>
                    {
                        t.cookie
                    }
                    _ => None,
                })
                .collect();
            let kept: Vec<crate::record::Listed> =
                listed.iter().filter(|l| !born.contains(&l.row.cookie)).cloned().collect();
            let mut size = 0u64;
            let mut lines = Vec::new();
            for line in table_lines(clock, crate::recorded::TableReason::Rotation, &kept) {
                size += line.len() as u64 + 1;
                if size > max_size / 4 {
                    too_large = true;
                    return Vec::new();
                }
                lines.push(line);
            }
            lines
        };
        let written = log.append_with_table(records, &mut table);
        if too_large && !std::mem::replace(&mut self.table_too_large, true) {
            tracing::warn!(
                "the table is larger than a quarter of --log-max-size: rotated files do not \
                 begin with it (raise --log-max-size for replays and histories of one file)"
            );
        }
        if let Err(error) = written {
            records.push(self.stop(error));
        }
    }

    /// Writes the table (`rows()`, asked only while logging), whole in one file: a `table`
    /// line and a `socket` line per row. A failure stops the logging as [`Logging::write`]'s
    /// does; its record is returned.
    pub fn write_table(
        &mut self,
        reason: crate::recorded::TableReason,
        rows: impl FnOnce() -> Vec<crate::record::Listed>,
    ) -> Option<StreamRecord> {
        let log = self.log.as_mut()?;
        let lines = table_lines(self.clock, reason, &rows()).collect();
        let error = log.append_block(lines).err()?;
        Some(self.stop(error))
    }

    fn stop(&mut self, error: LogError) -> StreamRecord {
        tracing::error!("{error}: stopped logging; tracing goes on");
        let time = self.clock.wall(WallClock::monotonic_now_ns());
        self.log = None;
        StreamRecord::LogFailed(LogFailedRecord {
            time,
            path: error.path.clone(),
            error: error.source.to_string(),
        })
    }
}

/// The table's lines, stamped now by `clock`, made as they are taken.
fn table_lines(
    clock: WallClock,
    reason: crate::recorded::TableReason,
    rows: &[crate::record::Listed],
) -> impl Iterator<Item = String> + '_ {
    let mono_ns = WallClock::monotonic_now_ns();
    let mark = crate::recorded::TableMark {
        time: clock.wall(mono_ns),
        mono_ns,
        reason,
        sockets: rows.len() as u64,
    };
    crate::recorded::table_lines(mark, rows)
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;

    use super::*;
    use crate::record::{LossReason, LossRecord};

    fn record(count: u64) -> StreamRecord {
        StreamRecord::Lost(LossRecord {
            time: DateTime::from_timestamp_nanos(0),
            reason: LossReason::RingBufferFull,
            count,
            total: count,
        })
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("netwatch-log-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("events.ndjson")
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect("every line parses"))
            .collect()
    }

    #[test]
    fn lines_are_versioned_records() {
        let line = line(&record(3));
        assert!(line.starts_with(r#"{"v":1,"type":"lost","#), "{line}");
    }

    #[test]
    fn appends_and_reopening_appends_and_cuts_a_half_line() {
        let path = temp("append");
        let options = LogOptions { path: path.clone(), max_size: 1 << 20, keep: 2 };
        let mut log = EventLog::open(options.clone()).unwrap();
        log.append(&[record(1), record(2)]).unwrap();
        drop(log);
        // A crash in the middle of a line.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"v\":1,\"ty")
            .unwrap();
        let mut log = EventLog::open(options).unwrap();
        log.append(&[record(3)]).unwrap();
        let counts: Vec<u64> = lines(&path).iter().map(|v| v["count"].as_u64().unwrap()).collect();
        assert_eq!(counts, [1, 2, 3]);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the owner's only");
    }

    #[test]
    fn rotates_at_the_size_and_keeps_n_files() {
        let path = temp("rotate");
        let one = line(&record(1)).len() as u64 + 1;
        let mut log =
            EventLog::open(LogOptions { path: path.clone(), max_size: 3 * one, keep: 2 }).unwrap();
        for n in 0..4 {
            log.append(&[record(n)]).unwrap();
        }
        // A batch larger than a file is spread over several.
        log.append(&(4..10).map(record).collect::<Vec<_>>()).unwrap();
        let read =
            |p: &Path| lines(p).iter().map(|v| v["count"].as_u64().unwrap()).collect::<Vec<_>>();
        assert_eq!(read(&path), [9]);
        assert_eq!(read(&PathBuf::from(format!("{}.1", path.display()))), [6, 7, 8]);
        assert_eq!(read(&PathBuf::from(format!("{}.2", path.display()))), [3, 4, 5]);
        assert!(!PathBuf::from(format!("{}.3", path.display())).exists(), "only 2 kept");
        assert!(std::fs::metadata(&path).unwrap().len() <= 3 * one);
    }

    #[test]
    fn a_file_a_rotation_begins_starts_with_the_table_and_a_block_stays_whole() {
        let path = temp("table");
        let one = line(&record(1)).len() as u64 + 1;
        let options = LogOptions { path: path.clone(), max_size: 4 * one, keep: 5 };
        let mut log = EventLog::open(options).unwrap();
        let mut rests = Vec::new();
        let mut table = |rest: &[StreamRecord]| {
            rests.push(rest.len());
            vec![r#"{"v":1,"type":"table"}"#.to_string()]
        };
        log.append_with_table(&(0..6).map(record).collect::<Vec<_>>(), &mut table).unwrap();
        assert_eq!(rests, [2], "asked at the rotation, with the records after it");
        let kinds = |p: &Path| -> Vec<String> {
            lines(p).iter().map(|v| v["type"].as_str().unwrap().to_string()).collect()
        };
        assert_eq!(kinds(&PathBuf::from(format!("{}.1", path.display()))), ["lost"; 4]);
        assert_eq!(kinds(&path), ["table", "lost", "lost"]);
        // A block that does not fit what is left goes whole into a new file.
        log.append_block(vec![line(&record(7)), line(&record(8))]).unwrap();
        assert_eq!(kinds(&path), ["lost", "lost"]);
        assert_eq!(
            kinds(&PathBuf::from(format!("{}.1", path.display()))),
            ["table", "lost", "lost"]
        );
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("8192"), Ok(8192));
        assert!(parse_size("10").unwrap_err().contains("smallest"));
        assert!(parse_size("12X").unwrap_err().contains("unknown unit"));
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn an_unwritable_path_is_an_error_naming_it() {
        let error = EventLog::open(LogOptions {
            path: "/proc/netwatch/x.log".into(),
            max_size: 1 << 20,
            keep: 1,
        })
        .err()
        .unwrap();
        assert!(error.to_string().starts_with("event log /proc/netwatch/x.log:"), "{error}");
    }
}
