//! A log and its rotations on disk: which files, oldest first, and where in each a time
//! begins, found from the lines' own `time` fields (the writer puts it third on every line,
//! fixed-width, so that it sorts as text) without parsing them.
use std::{
    fs::File,
    io,
    os::unix::fs::{FileExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

/// Width of a `time` value: `2026-11-29T03:00:00.123456789Z`.
pub const TIME_WIDTH: usize = 30;
/// Bytes read at a time when looking for a line near an offset.
const PROBE: usize = 64 * 1024;

/// One file of the log, opened once: a rotation renaming it later changes nothing.
#[derive(Debug)]
pub struct LogFile {
    pub path: PathBuf,
    pub file: File,
    pub inode: u64,
}

impl LogFile {
    pub fn open(path: &Path) -> io::Result<LogFile> {
        let file = File::open(path)?;
        let metadata = file.metadata()?;
        if metadata.is_dir() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a directory, not a log"));
        }
        Ok(LogFile { path: path.to_path_buf(), file, inode: metadata.ino() })
    }

    pub fn size(&self) -> u64 {
        self.file.metadata().map_or(0, |m| m.len())
    }

    /// Whether it starts as a gzip stream does (a rotation someone compressed).
    pub fn is_compressed(&self) -> bool {
        let mut magic = [0u8; 2];
        self.file.read_exact_at(&mut magic, 0).is_ok() && magic == [0x1f, 0x8b]
    }

    /// The time of the first line that has one, reading forward from `offset` (a line that
    /// begins before it is skipped), and where that line begins.
    pub fn time_after(&self, offset: u64) -> Option<(u64, [u8; TIME_WIDTH])> {
        let mut buf = vec![0u8; PROBE];
        let read = read_at(&self.file, &mut buf, offset);
        let chunk = &buf[..read];
        let mut at = if offset == 0 { 0 } else { memchr::memchr(b'\n', chunk)? + 1 };
        while at < chunk.len() {
            let end = memchr::memchr(b'\n', &chunk[at..]).map_or(chunk.len(), |n| at + n);
            if end == chunk.len() && read == PROBE {
                return None;
            }
            if let Some(time) = time_of(&chunk[at..end]) {
                return Some((offset + at as u64, time));
            }
            at = end + 1;
        }
        None
    }

    /// Where the last whole line ends (0 when none does, or the file cannot be read).
    pub fn end_of_lines(&self) -> u64 {
        crate::serve::eventlog::complete_length(&self.file).unwrap_or(0)
    }

    /// The time of the last whole line that has one.
    pub fn last_time(&self) -> Option<[u8; TIME_WIDTH]> {
        let len = self.size();
        let start = len.saturating_sub(PROBE as u64);
        let mut buf = vec![0u8; (len - start) as usize];
        let read = read_at(&self.file, &mut buf, start);
        let chunk = &buf[..read];
        let mut lines: Vec<&[u8]> = chunk.split(|&b| b == b'\n').collect();
        lines.pop(); // after the last newline: empty, or a line cut short
        lines.into_iter().rev().find_map(time_of)
    }

    /// The start of a line at or before the first line whose time is `target` or later:
    /// a binary search over the file's bytes, for lines in time order give or take the
    /// caller's slack.
    pub fn seek_time(&self, target: &[u8; TIME_WIDTH]) -> u64 {
        let (mut low, mut high) = (0u64, self.size());
        while high - low > PROBE as u64 {
            let middle = low + (high - low) / 2;
            match self.time_after(middle) {
                Some((_, time)) if &time < target => low = middle,
                _ => high = middle,
            }
        }
        if low == 0 {
            return 0;
        }
        self.time_after(low).map_or(low, |(at, _)| at)
    }
}

/// Reads as much of `buf` as the file has at `offset`.
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    done
}

/// A line's `time` value, as bytes, if it has one where the writer puts it.
pub fn time_of(line: &[u8]) -> Option<[u8; TIME_WIDTH]> {
    const KEY: &[u8] = b"\"time\":\"";
    let head = &line[..line.len().min(64)];
    let at = memchr::memmem::find(head, KEY)? + KEY.len();
    let value = line.get(at..at + TIME_WIDTH)?;
    (value[TIME_WIDTH - 1] == b'Z' && value[4] == b'-').then(|| value.try_into().ok())?
}

/// Whether `path` is a log, or one whose rotations are left: a regular file among them (not
/// a directory, such as `src`, which is also a filter word).
pub fn holds_a_log(path: &Path) -> bool {
    rotations(path).is_ok_and(|files| files.iter().any(|f| f.is_file()))
}

/// PATH's rotations (PATH.N .. PATH.1), oldest first, then PATH itself; PATH alone when it
/// is itself a rotation or has none. An error when none of them exists.
pub fn rotations(path: &Path) -> io::Result<Vec<PathBuf>> {
    let mut rotated: Vec<(u64, PathBuf)> = Vec::new();
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if let (Some(name), Ok(entries)) = (name, std::fs::read_dir(&dir)) {
        let prefix = format!("{name}.");
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if let Some(n) = file.strip_prefix(&prefix).and_then(|n| n.parse::<u64>().ok()) {
                rotated.push((n, entry.path()));
            }
        }
    }
    rotated.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    let mut files: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    match std::fs::metadata(path) {
        Ok(_) => files.push(path.to_path_buf()),
        Err(error) if files.is_empty() => return Err(error),
        Err(_) => {}
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("netwatch-files-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn line(second: u32) -> String {
        format!(
            "{{\"v\":1,\"type\":\"lost\",\"time\":\"2026-11-29T03:{:02}:{:02}.000000000Z\",\"reason\":\"skipped\",\"count\":1,\"total\":1}}\n",
            second / 60,
            second % 60
        )
    }

    #[test]
    fn rotations_come_oldest_first_by_number() {
        let dir = dir("order");
        let path = dir.join("events.ndjson");
        for name in [
            "events.ndjson",
            "events.ndjson.1",
            "events.ndjson.10",
            "events.ndjson.2",
            "other.1",
            "events.ndjson.x",
        ] {
            std::fs::write(dir.join(name), "").unwrap();
        }
        let names: Vec<String> = rotations(&path)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["events.ndjson.10", "events.ndjson.2", "events.ndjson.1", "events.ndjson"]
        );
        // Only rotations left (the live file was removed): still read.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(rotations(&path).unwrap().len(), 3);
        assert!(rotations(&dir.join("absent")).is_err());
    }

    #[test]
    fn times_are_found_and_searched() {
        let dir = dir("seek");
        let path = dir.join("events.ndjson");
        let text: String = (0..3600).map(line).collect();
        std::fs::write(&path, format!("{text}{{\"v\":1,\"ty")).unwrap();
        let file = LogFile::open(&path).unwrap();
        assert_eq!(&file.time_after(0).unwrap().1, b"2026-11-29T03:00:00.000000000Z");
        assert_eq!(&file.last_time().unwrap(), b"2026-11-29T03:59:59.000000000Z");
        let target: [u8; TIME_WIDTH] = *b"2026-11-29T03:30:00.000000000Z";
        let at = file.seek_time(&target) as usize;
        assert!(at <= 1800 * line(0).len(), "at or before the target: {at}");
        assert!(at >= 1800 * line(0).len() - 2 * PROBE, "and near it: {at}");
        assert_eq!(text.as_bytes()[at - 1], b'\n', "at a line's start");
        assert_eq!(file.seek_time(b"2026-11-29T02:00:00.000000000Z"), 0);
        assert!(time_of(b"{\"v\":1,\"type\":\"lost\"}").is_none());
    }
}
