//! `netwatch log`: the event log's records, filtered as `watch` filters the live stream and
//! by an ss expression, within a stretch of time; as text or as the log's own lines; with
//! `--follow`, as the log grows. No agent is needed: the log alone is read.
use std::{
    io::{self, BufWriter, Write as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use chrono::{Local, NaiveDate};

use crate::{
    cli::LogQueryArgs,
    host::services::Services,
    output::{Format, TextLayout},
    query::{recorded::RecordSelection, ss},
    recorded::{
        Entry, TableReason,
        reader::{Next, Reader},
        window::Window,
    },
    serve::{
        api::{self, Command},
        eventlog,
    },
};

/// Where the packaged agent logs, when it is asked to.
pub const DEFAULT_LOG: &str = "/var/log/netwatch/events.ndjson";

pub async fn run(args: &LogQueryArgs) -> anyhow::Result<()> {
    let (path, words) = args.path_and_filter();
    let path = match path {
        Some(path) => path,
        None => agents_log(&args.socket).await?,
    };
    let selection = RecordSelection {
        filter: args.filters.filter(),
        query: ss::parse(words, &Services::load())?,
        failed: args.failed,
    };
    let mut reader = open(&path, args.window.window(), args.follow)?;
    if args.follow {
        eprintln!("netwatch: following {} as it grows; Ctrl-C to stop", path.display());
    }
    let mut keep = selection.prefilter();
    let mut out = Printer {
        out: BufWriter::with_capacity(1 << 16, io::stdout()),
        format: if args.json { Format::Json } else { Format::Text },
        layout: TextLayout::default(),
        header: !args.json && !args.no_header,
        started: false,
        day: None,
    };
    let result = loop {
        let next = match reader.next(&mut *keep) {
            Ok(next) => next,
            Err(error) => break Err(anyhow::Error::from(error).context("reading the log")),
        };
        let printed = match next {
            Next::Entry(Entry::Record(record)) if selection.matches(&record) => out.record(&record),
            Next::Entry(Entry::Table(mark)) if mark.reason != TableReason::Rotation => {
                let sockets = if mark.sockets == 1 { "socket" } else { "sockets" };
                let text = format!("{}: {} {sockets} open", mark.reason.name(), mark.sockets);
                out.note(mark.time, &text)
            }
            Next::Entry(_) => Ok(()),
            Next::Pending => {
                let flushed = out.out.flush();
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                flushed
            }
            Next::End => break out.out.flush().map_err(anyhow::Error::from),
        };
        if let Err(error) = printed {
            if super::reader_gone(&error) {
                return Ok(());
            }
            break Err(error.into());
        }
    };
    if reader.skipped > 0 {
        tracing::warn!("{}: {} unreadable lines skipped in all", path.display(), reader.skipped);
    }
    match result {
        Err(error) if error.downcast_ref::<io::Error>().is_some_and(super::reader_gone) => Ok(()),
        other => other,
    }
}

/// The log's reader, or one line on why there is none.
pub fn open(path: &Path, window: Window, follow: bool) -> anyhow::Result<Reader> {
    Reader::open(path, window, follow).with_context(|| {
        format!(
            "cannot read the event log {} (give the path of a file `netwatch agent --log` wrote)",
            path.display()
        )
    })
}

/// The running agent's log; else the packaged place, if a log is there.
pub async fn agents_log(socket: &Path) -> anyhow::Result<PathBuf> {
    let answer = match api::ask(socket, Command::Log).await {
        Ok(answer) => answer,
        Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
            anyhow::bail!("{error} (or give the log's path: netwatch log PATH)")
        }
        Err(error) => {
            tracing::debug!("asking the agent for its log: {error}");
            None
        }
    };
    #[derive(serde::Deserialize)]
    struct Answer {
        path: Option<PathBuf>,
    }
    if let Some(path) = answer.and_then(|a| serde_json::from_str::<Answer>(&a).ok()?.path) {
        return Ok(path);
    }
    let packaged = PathBuf::from(DEFAULT_LOG);
    if crate::recorded::files::holds_a_log(&packaged) {
        return Ok(packaged);
    }
    anyhow::bail!(
        "no event log given, and no agent at {} logs (nor is there one at {DEFAULT_LOG}): give \
         its path (netwatch log PATH), or start the agent with --log PATH",
        socket.display()
    )
}

/// Prints records as `watch` does, with a line for each new day in text.
struct Printer {
    out: BufWriter<io::Stdout>,
    format: Format,
    layout: TextLayout,
    header: bool,
    /// The header was printed once.
    started: bool,
    day: Option<NaiveDate>,
}

impl Printer {
    fn record(&mut self, record: &crate::record::StreamRecord) -> io::Result<()> {
        if self.format == Format::Json {
            return writeln!(self.out, "{}", eventlog::line(record));
        }
        self.new_day(crate::recorded::record_time(record))?;
        let grew = self.layout.fit(record);
        if self.header && (grew || !std::mem::replace(&mut self.started, true)) {
            writeln!(self.out, "{}", self.layout.header())?;
        }
        writeln!(self.out, "{}", record.render_in(Format::Text, self.layout))
    }

    /// A line about the log itself (text only).
    fn note(&mut self, time: chrono::DateTime<chrono::Utc>, text: &str) -> io::Result<()> {
        if self.format == Format::Json {
            return Ok(());
        }
        self.new_day(time)?;
        let clock = time.with_timezone(&Local).format("%H:%M:%S%.6f");
        writeln!(self.out, "{clock} -- {text}")
    }

    /// The TIME column has no date: each day's lines follow a line with it.
    fn new_day(&mut self, time: chrono::DateTime<chrono::Utc>) -> io::Result<()> {
        let day = time.with_timezone(&Local).date_naive();
        if self.day != Some(day) {
            self.day = Some(day);
            if self.header {
                writeln!(self.out, "-- {}", day.format("%A %Y-%m-%d"))?;
            }
        }
        Ok(())
    }
}
