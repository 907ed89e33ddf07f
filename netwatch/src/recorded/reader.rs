//! Whole lines of a log's files, oldest first, within a time window, parsed into
//! [`Entry`]s. A line that cannot be read is reported once (file and line) and skipped, and
//! reading goes on; with `follow`, the newest file is read as it grows and across its
//! rotations, as `tail -F` does.
//!
//! Lines are compared with the window and the caller's cheap test on their bytes before
//! any is parsed: most of a large log is skipped without being parsed.
use std::{
    collections::{HashSet, VecDeque},
    io,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
};

use super::{
    Entry, FORMAT_VERSION, LineError,
    files::{self, LogFile, TIME_WIDTH},
    window::{self, SLACK, Window},
};

/// A test on a line's bytes, before it is parsed: false rules the line out.
pub type LineTest = Box<dyn FnMut(&[u8]) -> bool + Send>;

/// What a read gives.
#[derive(Debug)]
pub enum Next {
    Entry(Entry),
    /// Following: nothing new yet; ask again later.
    Pending,
    /// Every file was read (or the window's end was passed).
    End,
}

/// Bytes read from a file at a time.
const CHUNK: usize = 1 << 20;
/// A longer line is not a log line (a file of something else): it is skipped.
const LONGEST_LINE: usize = 64 << 20;
/// Bad lines reported per file; the rest are counted in one line at its end.
const SHOWN: u64 = 5;

pub struct Reader {
    files: VecDeque<LogFile>,
    current: Option<Cursor>,
    /// The live file, reopened when it is rotated, when following.
    follow: Option<PathBuf>,
    since: Option<[u8; TIME_WIDTH]>,
    until: Option<[u8; TIME_WIDTH]>,
    /// Past this time, nothing more is in the window.
    stop: Option<[u8; TIME_WIDTH]>,
    window: Window,
    /// Files that reach into the window are read from their start, lines before it too.
    whole: bool,
    /// Where in the first file to begin, when not at its start or the window's.
    start_at: Option<u64>,
    done: bool,
    /// Lines skipped as unreadable, over every file.
    pub skipped: u64,
}

/// Where reading is in one file.
struct Cursor {
    log: LogFile,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The file offset of `buf[0]`.
    base: u64,
    /// The number of the line at `start`, when known (not after a seek into the file).
    line: Option<u64>,
    /// A line too long to keep is being passed over.
    discarding: bool,
    /// The last offset whose line number was counted, and that number.
    counted: (u64, u64),
    reported: u64,
    /// Of those, shown on stderr.
    shown: u64,
    newer_reported: bool,
    types_reported: HashSet<String>,
}

impl Cursor {
    fn new(log: LogFile, offset: u64) -> Cursor {
        Cursor {
            log,
            buf: vec![0; CHUNK],
            start: 0,
            end: 0,
            base: offset,
            line: (offset == 0).then_some(1),
            discarding: false,
            counted: (0, 1),
            reported: 0,
            shown: 0,
            newer_reported: false,
            types_reported: HashSet::new(),
        }
    }

    /// Reads more of the file after what is buffered; 0 at its end.
    fn fill(&mut self) -> io::Result<usize> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.base += self.start as u64;
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            if self.buf.len() >= LONGEST_LINE {
                // Keep reading, dropping what is buffered, until the line ends.
                self.discarding = true;
                self.base += self.end as u64;
                self.end = 0;
            } else {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        let end = self.end;
        let read = loop {
            match self.log.file.read_at(&mut self.buf[end..], self.base + end as u64) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        self.end += read;
        Ok(read)
    }

    /// The number of the line beginning at `offset` (`known` when reading began at the
    /// file's start): counted when reading began mid-file.
    fn number(&mut self, offset: u64, known: Option<u64>) -> u64 {
        if let Some(line) = known {
            return line;
        }
        // Counted on from the last line counted, since lines are reported in order.
        let (mut at, mut count) = if self.counted.0 <= offset { self.counted } else { (0, 1) };
        let mut chunk = vec![0u8; CHUNK];
        while at < offset {
            let want = ((offset - at) as usize).min(CHUNK);
            match self.log.file.read_at(&mut chunk[..want], at) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    count += memchr::memchr_iter(b'\n', &chunk[..n]).count() as u64;
                    at += n as u64;
                }
            }
        }
        self.counted = (offset, count);
        count
    }

    /// Says why the line at `offset` was skipped: the first few of a file each, a newer
    /// format and an unknown type once each.
    fn report(&mut self, offset: u64, number: Option<u64>, error: &LineError) {
        let first_of_its_kind = match error {
            LineError::Newer(_) => !std::mem::replace(&mut self.newer_reported, true),
            LineError::UnknownType(kind) => self.types_reported.insert(kind.clone()),
            _ => false,
        };
        self.reported += 1;
        if self.reported <= SHOWN || first_of_its_kind {
            self.shown += 1;
            let line = self.number(offset, number);
            tracing::warn!("{}:{line}: {error}; skipped", self.log.path.display());
        }
    }

    /// Says how many bad lines went unreported.
    fn close(&self) {
        if self.reported > self.shown {
            tracing::warn!(
                "{}: {} more unreadable lines skipped",
                self.log.path.display(),
                self.reported - self.shown
            );
        }
    }
}

impl Reader {
    /// The log at `path` and its rotations, oldest first, within `window`; with `follow`,
    /// the live file is read as it grows. An error only when no file could be opened.
    pub fn open(path: &Path, window: Window, follow: bool) -> io::Result<Reader> {
        let mut files = VecDeque::new();
        let mut first_error = None;
        for name in files::rotations(path)? {
            match LogFile::open(&name) {
                Ok(file) if file.is_compressed() => tracing::warn!(
                    "{}: compressed (gzip); netwatch reads its logs uncompressed: \
                     `zcat {0} > FILE` first; skipped",
                    name.display()
                ),
                Ok(file) => files.push_back(file),
                Err(error) => {
                    tracing::warn!("{}: {error}; skipped", name.display());
                    first_error.get_or_insert(error);
                }
            }
        }
        if files.is_empty()
            && let Some(error) = first_error
        {
            return Err(error);
        }
        let (since, until) = window.keys();
        let stop = window.until.map(|u| window::key(u.checked_add_signed(SLACK).unwrap_or(u)));
        // Following with no --since begins at the end, as `tail -F` does.
        let mut start_at = None;
        if follow && window.since.is_none() {
            files.drain(..files.len().saturating_sub(1));
            start_at = files.back().map(LogFile::end_of_lines);
        }
        let follow = follow.then(|| path.to_path_buf());
        Ok(Reader {
            files,
            current: None,
            follow,
            since,
            until,
            stop,
            window,
            whole: false,
            start_at,
            done: false,
            skipped: 0,
        })
    }

    pub fn window(&self) -> Window {
        self.window
    }

    /// Reads each file that reaches into the window from its start (where the agent wrote
    /// its table), lines before the window included: for a replay's starting table, and
    /// for histories that began before it.
    pub fn whole_files(mut self) -> Reader {
        self.whole = true;
        self.since = None;
        self
    }

    /// The next entry that passes the window and `keep` (a test on the line's bytes that
    /// may only say no to lines that cannot match; any line the writer did not write in
    /// its own order is kept for parsing).
    pub fn next(&mut self, keep: &mut dyn FnMut(&[u8]) -> bool) -> io::Result<Next> {
        loop {
            if self.done {
                return Ok(Next::End);
            }
            let Some(cursor) = self.current.as_mut() else {
                if !self.open_next() {
                    return Ok(Next::End);
                }
                continue;
            };
            let Some(newline) = memchr::memchr(b'\n', &cursor.buf[cursor.start..cursor.end]) else {
                if cursor.fill()? > 0 {
                    continue;
                }
                match self.at_end()? {
                    Some(next) => return Ok(next),
                    None => continue,
                }
            };
            let (start, end) = (cursor.start, cursor.start + newline);
            cursor.start = end + 1;
            let offset = cursor.base + start as u64;
            let number = cursor.line;
            cursor.line = number.map(|n| n + 1);
            if std::mem::take(&mut cursor.discarding) {
                let error =
                    LineError::Garbled(format!("a line longer than {} MiB", LONGEST_LINE >> 20));
                cursor.report(offset, number, &error);
                self.skipped += 1;
                continue;
            }
            if let Some(entry) = self.take(start, end, (offset, number), keep)? {
                return Ok(Next::Entry(entry));
            }
        }
    }

    /// Tests and parses the line at `buf[start..end]`.
    fn take(
        &mut self,
        start: usize,
        end: usize,
        (offset, number): (u64, Option<u64>),
        keep: &mut dyn FnMut(&[u8]) -> bool,
    ) -> io::Result<Option<Entry>> {
        let (whole, window) = (self.whole, self.window);
        let Some(cursor) = self.current.as_mut() else { return Ok(None) };
        let line = &cursor.buf[start..end];
        if line.is_empty() {
            return Ok(None);
        }
        if let Some(time) = files::time_of(line) {
            if self.stop.is_some_and(|stop| time > stop) {
                self.done = true;
                return Ok(None);
            }
            if self.since.is_some_and(|s| time < s) || self.until.is_some_and(|u| time > u) {
                return Ok(None);
            }
        }
        // A newer format is said even of lines the caller's test would rule out.
        let newer = super::sniff(line).filter(|(v, _)| *v > u64::from(FORMAT_VERSION));
        let parsed = match newer {
            Some((version, _)) => Err(LineError::Newer(version)),
            None if !keep(line) => return Ok(None),
            None => super::parse(line),
        };
        match parsed {
            Ok(entry) if keeps(whole, window, entry.time()) => Ok(Some(entry)),
            Ok(_) => Ok(None),
            Err(error) => {
                cursor.report(offset, number, &error);
                self.skipped += 1;
                Ok(None)
            }
        }
    }

    /// The current file has no more whole lines: its last line, if cut short, is reported;
    /// the next file is taken, or, when following, the live file waited for. None: go on.
    fn at_end(&mut self) -> io::Result<Option<Next>> {
        let following_this = self.files.is_empty() && self.follow.is_some();
        if following_this {
            let Some(cursor) = self.current.as_mut() else { return Ok(None) };
            let path = self.follow.clone().unwrap_or_default();
            match LogFile::open(&path) {
                // Rotated: the old file may have had a last write before the rename.
                Ok(new) if new.inode != cursor.log.inode => {
                    if cursor.fill()? > 0 {
                        return Ok(None);
                    }
                    let inode = cursor.log.inode;
                    let entry = self.finish_file();
                    self.current = None;
                    self.files = after_rotation(&path, inode);
                    return Ok(entry.map(Next::Entry));
                }
                // Cut back to nothing (`--log-keep 0`): read it again from its start.
                Ok(same) if same.size() < cursor.base + cursor.end as u64 => {
                    self.current = Some(Cursor::new(same, 0));
                    return Ok(None);
                }
                _ => return Ok(Some(Next::Pending)),
            }
        }
        let entry = self.finish_file();
        self.current = None;
        Ok(entry.map(Next::Entry))
    }

    /// Ends the current file: a last line without its newline is parsed if it is whole (a
    /// file edited by hand) and reported as cut short otherwise.
    fn finish_file(&mut self) -> Option<Entry> {
        let (whole, window) = (self.whole, self.window);
        let cursor = self.current.as_mut()?;
        let mut entry = None;
        if cursor.start < cursor.end && !cursor.discarding {
            let offset = cursor.base + cursor.start as u64;
            let line = &cursor.buf[cursor.start..cursor.end];
            match super::parse(line) {
                Ok(parsed) if keeps(whole, window, parsed.time()) => entry = Some(parsed),
                Ok(_) => {}
                Err(_) => {
                    let error = LineError::Garbled(
                        "the last line is incomplete: cut short, or still being written".into(),
                    );
                    cursor.report(offset, cursor.line, &error);
                    self.skipped += 1;
                }
            }
            cursor.start = cursor.end;
        } else if cursor.discarding {
            let offset = cursor.base;
            let error =
                LineError::Garbled(format!("a line longer than {} MiB", LONGEST_LINE >> 20));
            cursor.report(offset, cursor.line, &error);
            self.skipped += 1;
        }
        cursor.close();
        entry
    }

    /// Opens the next file, skipping those the window excludes; false when none is left.
    fn open_next(&mut self) -> bool {
        while let Some(log) = self.files.pop_front() {
            let last_file = self.files.is_empty();
            let mut offset = 0;
            if let Some(since) = self.window.since {
                let early = Some(window::key(earlier(since)));
                let ends_before =
                    log.last_time().zip(early).is_some_and(|(last, early)| last < early);
                if ends_before && !(last_file && self.follow.is_some()) {
                    continue;
                }
                if !self.whole {
                    offset = log.seek_time(&window::key(earlier(since)));
                }
            }
            if let Some(stop) = &self.stop
                && log.time_after(0).is_some_and(|(_, first)| &first > stop)
            {
                self.files.clear();
                return false;
            }
            let offset = self.start_at.take().unwrap_or(offset);
            self.current = Some(Cursor::new(log, offset));
            return true;
        }
        false
    }
}

/// Where reading for a window from `since` starts: SLACK before it.
fn earlier(since: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
    since.checked_sub_signed(SLACK).unwrap_or(since)
}

/// Whether an entry of `time` is handed over: in the window, or, reading whole files, not
/// after it.
fn keeps(whole: bool, window: Window, time: chrono::DateTime<chrono::Utc>) -> bool {
    if whole { window.until.is_none_or(|u| time <= u) } else { window.contains(time) }
}

/// The files written after the one with `inode`, once the log at `path` rotated: it may
/// have rotated more than once since it was last read.
fn after_rotation(path: &Path, inode: u64) -> VecDeque<LogFile> {
    let names = files::rotations(path).unwrap_or_default();
    let opened: Vec<LogFile> = names.iter().filter_map(|name| LogFile::open(name).ok()).collect();
    match opened.iter().position(|file| file.inode == inode) {
        Some(at) => opened.into_iter().skip(at + 1).collect(),
        None => {
            tracing::warn!(
                "{}: rotated past its last kept file (--log-keep) since it was last read: \
                 what the removed files held is not shown",
                path.display()
            );
            opened.into_iter().collect()
        }
    }
}
