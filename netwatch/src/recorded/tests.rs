//! The log read back as the agent wrote it: every record, its rotations in order, the
//! tables, and the bad lines a copied or damaged log has.
use std::{io::Write as _, path::PathBuf};

use chrono::{DateTime, Utc};

use super::{
    reader::{Next, Reader},
    rebuild::{self, Assembled, Assembler},
    window::Window,
    *,
};
use crate::{
    kernel::events::TcpState,
    query::stream::tests::transition,
    record::{LossReason, LossRecord},
    serve::eventlog::{EventLog, LogOptions},
    state::history::FirstSeen,
};

fn dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("netwatch-recorded-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn at(second: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_764_385_200 + second, 0).unwrap()
}

/// A connect of `cookie` at `second`: SYN_SENT -> ESTABLISHED, or a refusal.
fn connect(cookie: u64, second: i64, old: TcpState, new: TcpState) -> StreamRecord {
    let mut t = transition(40000 + cookie as u16, 5432, old, new);
    t.cookie = Some(cookie);
    t.time = at(second);
    t.mono_ns = second as u64 * 1_000_000_000;
    StreamRecord::Transition(Box::new(t))
}

fn loss(second: i64) -> StreamRecord {
    StreamRecord::Lost(LossRecord {
        time: at(second),
        reason: LossReason::RingBufferFull,
        count: 3,
        total: 3,
    })
}

/// Every entry `reader` gives, to the end.
fn read_all(reader: &mut Reader) -> Vec<Entry> {
    let mut entries = Vec::new();
    loop {
        match reader.next(&mut |_| true).unwrap() {
            Next::Entry(entry) => entries.push(entry),
            Next::Pending | Next::End => return entries,
        }
    }
}

fn seconds(entries: &[Entry]) -> Vec<i64> {
    entries.iter().map(|e| e.time().timestamp() - at(0).timestamp()).collect()
}

#[test]
fn every_record_type_reads_back_as_written() {
    let records = vec![
        connect(1, 0, TcpState::Close, TcpState::SynSent),
        loss(1),
        StreamRecord::LogFailed(crate::record::LogFailedRecord {
            time: at(2),
            path: "/x".into(),
            error: "disk full".into(),
        }),
        StreamRecord::ExportDropped(crate::record::ExportDroppedRecord {
            time: at(3),
            destination: "otlp".into(),
            count: 1,
            total: 1,
        }),
    ];
    for record in &records {
        let line = crate::serve::eventlog::line(record);
        assert_eq!(parse(line.as_bytes()), Ok(Entry::Record(record.clone())), "{line}");
    }
    let mark = TableMark { time: at(4), mono_ns: 4, reason: TableReason::Start, sockets: 0 };
    let lines: Vec<String> = table_lines(mark, &[]).collect();
    assert_eq!(
        lines,
        [
            r#"{"v":1,"type":"table","time":"2025-11-29T03:00:04.000000000Z","mono_ns":4,"reason":"start","sockets":0}"#
        ]
    );
    assert_eq!(parse(lines[0].as_bytes()), Ok(Entry::Table(mark)));
}

#[test]
fn bad_lines_say_why() {
    assert!(matches!(parse(b"\x00\x01garbage"), Err(LineError::Garbled(_))));
    assert_eq!(
        parse(br#"{"v":2,"type":"transition","time":"2026-01-01T00:00:00.000000000Z"}"#),
        Err(LineError::Newer(2))
    );
    assert_eq!(
        parse(br#"{"v":1,"type":"hologram","time":"2026-01-01T00:00:00.000000000Z"}"#),
        Err(LineError::UnknownType("hologram".into()))
    );
    let error = parse(br#"{"v":1,"type":"transition","time":"2026-01-01T00:00:00.000000000Z"}"#);
    assert!(
        matches!(&error, Err(LineError::Bad { kind, error }) if kind == "transition" && error.contains("missing field")),
        "{error:?}"
    );
    // Fields in another order (another tool wrote it) still read.
    let line = crate::serve::eventlog::line(&loss(0));
    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    let reordered = format!(
        r#"{{"count":3,"total":3,"reason":"ring_buffer_full","time":{},"type":"lost","v":1}}"#,
        value["time"]
    );
    assert_eq!(parse(reordered.as_bytes()), Ok(Entry::Record(loss(0))));
}

#[test]
fn rotations_read_in_order_and_a_window_skips_what_it_excludes() {
    let dir = dir("rotations");
    let path = dir.join("events.ndjson");
    let one = crate::serve::eventlog::line(&connect(1, 0, TcpState::Close, TcpState::SynSent));
    let mut log = EventLog::open(LogOptions {
        path: path.clone(),
        max_size: 10 * (one.len() as u64 + 1),
        keep: 50,
    })
    .unwrap();
    let records: Vec<StreamRecord> =
        (0..300).map(|s| connect(s as u64, s, TcpState::Close, TcpState::SynSent)).collect();
    for batch in records.chunks(7) {
        log.append(batch).unwrap();
    }
    assert!(dir.join("events.ndjson.29").exists(), "rotated into 30 files");
    let mut reader = Reader::open(&path, Window::default(), false).unwrap();
    assert_eq!(seconds(&read_all(&mut reader)), (0..300).collect::<Vec<_>>());
    let window = Window { since: Some(at(95)), until: Some(at(104)) };
    let mut reader = Reader::open(&path, window, false).unwrap();
    assert_eq!(seconds(&read_all(&mut reader)), (95..=104).collect::<Vec<_>>());
    // Whole files: from the start of the first file that reaches the window.
    let mut reader = Reader::open(&path, window, false).unwrap().whole_files();
    let whole = seconds(&read_all(&mut reader));
    assert_eq!(whole.last(), Some(&104));
    // The window's start less the slack (60 s) is 35: its file began a few lines before.
    assert!((20..=35).contains(&whole[0]), "a file's first line: {whole:?}");
    assert_eq!(whole, (whole[0]..=104).collect::<Vec<_>>());
    // A rotation given alone is read alone.
    let mut reader = Reader::open(&dir.join("events.ndjson.29"), Window::default(), false).unwrap();
    let alone = seconds(&read_all(&mut reader));
    assert!(alone.len() < 15 && alone[0] > 0, "{alone:?}");
    assert_eq!(alone, (alone[0]..alone[0] + alone.len() as i64).collect::<Vec<_>>());
    assert_eq!(reader.skipped, 0);
}

#[test]
fn a_cut_last_line_a_newer_line_and_garbage_are_skipped_and_reading_goes_on() {
    let dir = dir("damaged");
    let path = dir.join("events.ndjson");
    let line =
        |s| crate::serve::eventlog::line(&connect(s, s as i64, TcpState::Close, TcpState::SynSent));
    std::fs::write(
        dir.join("events.ndjson.1"),
        format!("{}\n\u{0}\u{7f}binary\n{}\n{}", line(0), line(1), &line(2)[..40]),
    )
    .unwrap();
    let newer =
        r#"{"v":7,"type":"transition","time":"2025-11-29T03:00:03.000000000Z","hologram":1}"#;
    std::fs::write(&path, format!("{newer}\n{}\n", line(4))).unwrap();
    let mut reader = Reader::open(&path, Window::default(), false).unwrap();
    assert_eq!(seconds(&read_all(&mut reader)), [0, 1, 4]);
    assert_eq!(reader.skipped, 3, "garbage, a cut line, a newer line");
}

#[test]
fn following_reads_across_a_rotation() {
    let dir = dir("follow");
    let path = dir.join("events.ndjson");
    let options = LogOptions { path: path.clone(), max_size: 1 << 20, keep: 3 };
    let mut log = EventLog::open(options.clone()).unwrap();
    log.append(&[connect(1, 1, TcpState::Close, TcpState::SynSent)]).unwrap();
    let mut reader = Reader::open(&path, Window::default(), true).unwrap();
    let mut next = || match reader.next(&mut |_| true).unwrap() {
        Next::Entry(entry) => Some(entry.time().timestamp() - at(0).timestamp()),
        Next::Pending => None,
        Next::End => panic!("following never ends"),
    };
    assert_eq!(next(), None, "from the end, as tail -F: nothing new yet");
    // Half a line written: not reported, not read, until the rest comes.
    let two = crate::serve::eventlog::line(&connect(2, 2, TcpState::Close, TcpState::SynSent));
    let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    file.write_all(&two.as_bytes()[..30]).unwrap();
    assert_eq!(next(), None);
    file.write_all(format!("{}\n", &two[30..]).as_bytes()).unwrap();
    assert_eq!(next(), Some(2));
    // The log rotates, with a last line written to the old file just before.
    log.append(&[connect(3, 3, TcpState::Close, TcpState::SynSent)]).unwrap();
    drop(log);
    std::fs::rename(&path, dir.join("events.ndjson.1")).unwrap();
    let mut log = EventLog::open(options).unwrap();
    log.append(&[connect(4, 4, TcpState::Close, TcpState::SynSent)]).unwrap();
    assert_eq!(next(), Some(3));
    assert_eq!(next(), Some(4));
    assert_eq!(next(), None);
    // Two rotations between two reads: the file in the middle is read too.
    let mut log =
        EventLog::open(LogOptions { path: path.clone(), max_size: 300, keep: 3 }).unwrap();
    for second in 5..8 {
        log.append(&[connect(second as u64, second, TcpState::Close, TcpState::SynSent)]).unwrap();
    }
    assert!(dir.join("events.ndjson.2").exists());
    assert_eq!((next(), next(), next(), next()), (Some(5), Some(6), Some(7), None));
}

/// A table row of `cookie`, held by psql[42].
fn row(cookie: u64, state: TcpState) -> crate::record::Listed {
    let mut listed: crate::record::Listed = serde_json::from_value(serde_json::json!({
        "row": {"netns": 1, "protocol": "tcp", "family": "ipv4", "state": "ESTABLISHED",
                "local": ["127.0.0.1", 40000], "remote": ["127.0.0.1", 5432],
                "cookie": cookie, "inode": cookie, "uid": 0, "recv_q": 0, "send_q": 0,
                "timer": null, "v6only": false},
        "owners": [{"pid": 42, "comm": "psql", "fd": 3, "uid": 0}],
        "in_state": null, "netns_name": null, "queues_known": false
    }))
    .unwrap();
    listed.row.state = state;
    listed
}

#[test]
fn a_rotation_table_leaves_out_what_the_records_after_it_create() {
    let dir = dir("rotation-table");
    let path = dir.join("events.ndjson");
    let options = LogOptions { path: path.clone(), max_size: 4096, keep: 3 };
    let mut logging = crate::serve::eventlog::Logging::start(Some(options)).unwrap();
    // 7 was open before; 8 is created by a record written after the rotation, which the
    // losses' lines bring about.
    let mut records = vec![
        connect(7, 0, TcpState::Established, TcpState::FinWait1),
        connect(7, 1, TcpState::FinWait1, TcpState::FinWait2),
        connect(7, 2, TcpState::FinWait2, TcpState::TimeWait),
    ];
    records.extend((0..40).map(|_| loss(3)));
    records.push(connect(8, 4, TcpState::Close, TcpState::SynSent));
    let count = records.len();
    logging.write_with_table(&mut records, || {
        vec![row(7, TcpState::TimeWait), row(8, TcpState::SynSent)]
    });
    assert_eq!(records.len(), count, "no failure");
    let mut reader = Reader::open(&path, Window::default(), false).unwrap();
    let entries = read_all(&mut reader);
    let cookies: Vec<Option<u64>> = entries
        .iter()
        .map(|e| match e {
            Entry::Table(_) => None,
            Entry::Socket(s) => Some(s.listed.row.cookie),
            Entry::Record(StreamRecord::Transition(t)) => t.cookie,
            Entry::Record(_) => None,
        })
        .collect();
    // The new file: the table with 7's row alone, then the rest of the batch.
    let table = entries.iter().position(|e| matches!(e, Entry::Table(_))).unwrap();
    assert!(matches!(
        entries[table],
        Entry::Table(m) if m.sockets == 1 && m.reason == TableReason::Rotation
    ));
    assert_eq!(cookies[table + 1], Some(7), "7's row");
    assert_eq!(
        cookies[table..].iter().flatten().collect::<Vec<_>>(),
        [&7, &8],
        "and then 8's connect, not a row of 8"
    );
    let mut reader = Reader::open(&path, Window::default(), false).unwrap();
    let all = rebuild::histories(&mut reader).unwrap().all();
    let eight = all.iter().find(|h| h.cookie == 8).unwrap();
    assert_eq!(eight.first_seen, FirstSeen::Event, "begun by its record, not the table");
}

#[test]
fn tables_are_put_back_together_and_seed_histories() {
    let mark = TableMark { time: at(0), mono_ns: 0, reason: TableReason::Start, sockets: 2 };
    let rows = [row(7, TcpState::Established), row(8, TcpState::Listen)];
    let lines: Vec<String> = table_lines(mark, &rows).collect();
    let mut assembler = Assembler::default();
    let mut out = Vec::new();
    for line in &lines {
        assembler.feed(parse(line.as_bytes()).unwrap(), &mut out);
    }
    assert!(matches!(&out[..], [Assembled::Table(m, r)] if *m == mark && r[..] == rows[..]));

    let dir = dir("tables");
    let path = dir.join("events.ndjson");
    let mut text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    for record in [
        // 7 was open before the log: its close ends the seeded history.
        connect(7, 1, TcpState::Established, TcpState::FinWait1),
        // 9's beginning is not in the log.
        connect(9, 2, TcpState::Established, TcpState::CloseWait),
        connect(10, 3, TcpState::Close, TcpState::SynSent),
    ] {
        text.push_str(&crate::serve::eventlog::line(&record));
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    let mut reader = Reader::open(&path, Window::default(), false).unwrap();
    let all = rebuild::histories(&mut reader).unwrap().all();
    let first_seen = |cookie| all.iter().find(|h| h.cookie == cookie).map(|h| h.first_seen.clone());
    assert_eq!(first_seen(7), Some(FirstSeen::Snapshot));
    assert_eq!(first_seen(8), Some(FirstSeen::Snapshot));
    assert_eq!(first_seen(9), Some(FirstSeen::Midway));
    assert_eq!(first_seen(10), Some(FirstSeen::Event));
    let seven = all.iter().find(|h| h.cookie == 7).unwrap();
    assert_eq!(seven.snapshot_owner.as_ref().map(|o| o.pid), Some(42));
    assert_eq!(seven.steps.len(), 1);
}
