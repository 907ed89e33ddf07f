//! `netwatch watch`: the live transition stream. It attaches to a running agent's stream when
//! there is one, and otherwise loads its own copy of the programs; either way it prints until
//! Ctrl-C / SIGTERM or until stdout goes away.
use std::io::{self, BufWriter, Write};

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
    signal::unix::{Signal, SignalKind, signal},
};

use crate::{
    cli::WatchArgs,
    output::{Format, TextLayout},
    query::{recorded::RecordSelection, stream::TransitionFilter},
    record::StreamRecord,
    recorded::{
        Entry,
        replay::{Played, Player},
    },
    serve::api::{self, Command, Request},
    serve::eventlog::Logging,
    state::tracer::Tracer,
};

/// Filters, logs and prints records.
struct Printer {
    out: BufWriter<io::Stdout>,
    format: Format,
    filter: TransitionFilter,
    log: Logging,
    /// The text columns' widths, and whether their header is shown (again when they grow).
    layout: TextLayout,
    header: bool,
}

impl Printer {
    fn shows(&self, record: &StreamRecord) -> bool {
        match record {
            StreamRecord::Transition(t) => self.filter.matches(t),
            StreamRecord::Retransmit(r) => self.filter.matches_retransmit(r),
            StreamRecord::Lost(_) | StreamRecord::LogFailed(_) | StreamRecord::ExportDropped(_) => {
                true
            }
        }
    }

    fn print(&mut self, records: &mut Vec<StreamRecord>) -> anyhow::Result<()> {
        records.retain(|record| self.shows(record));
        self.log.write(records);
        let mut written = Ok(());
        for record in records.drain(..) {
            if self.format == Format::Text && self.layout.fit(&record) && self.header {
                written = written.and_then(|()| writeln!(self.out, "{}", self.layout.header()));
            }
            let line = record.render_in(self.format, self.layout);
            written = written.and_then(|()| writeln!(self.out, "{line}"));
        }
        written.and_then(|()| self.out.flush()).map_err(stdout_error)
    }
}

pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    pub fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    pub async fn stop(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

pub async fn run(args: &WatchArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.replay.replay {
        refuse_logging_into(path, args.log.log.as_deref())?;
    }
    let mut signals = Signals::install()?;
    let mut printer = Printer {
        out: BufWriter::new(io::stdout()),
        format: args.format(),
        filter: args.filter(),
        log: Logging::start(args.log.options())?,
        layout: TextLayout::default(),
        header: args.format() == Format::Text && !args.no_header,
    };
    if let Some(path) = &args.replay.replay {
        let result = replay(path, args, &mut signals, &mut printer).await;
        return match result {
            Err(error) if error.downcast_ref::<ReaderGone>().is_some() => Ok(()),
            other => other,
        };
    }
    // Options that shape the kernel side need programs of our own.
    let own_programs = args.programs.own();
    let agent = if own_programs {
        None
    } else {
        api::connect(&args.programs.socket).await.with_context(|| {
            format!("attaching to the agent at {}", args.programs.socket.display())
        })?
    };
    let result = match agent {
        Some(stream) => attached(stream, args, &mut signals, &mut printer).await,
        None => direct(args, &mut signals, &mut printer).await,
    };
    match result {
        Err(error) if error.downcast_ref::<ReaderGone>().is_some() => Ok(()),
        other => other,
    }
}

/// A failed write to stdout, told apart from every other error when its reader is gone.
fn stdout_error(error: io::Error) -> anyhow::Error {
    if super::reader_gone(&error) { ReaderGone.into() } else { error.into() }
}

/// Stdout's reader went away (`netwatch | head`): the reader's choice, not an error.
#[derive(Debug, thiserror::Error)]
#[error("stdout's reader went away")]
struct ReaderGone;

fn header(printer: &mut Printer) -> anyhow::Result<()> {
    let mut written = Ok(());
    if printer.header {
        written = writeln!(printer.out, "{}", printer.layout.header());
    }
    written.and_then(|()| printer.out.flush()).map_err(stdout_error)
}

async fn direct(
    args: &WatchArgs,
    signals: &mut Signals,
    printer: &mut Printer,
) -> anyhow::Result<()> {
    let mut tracer = Tracer::start(&args.programs.load_options())?;
    eprintln!("netwatch: watching TCP state changes via {}; Ctrl-C to stop", tracer.describe());
    header(printer)?;
    let mut records = Vec::new();
    loop {
        tokio::select! {
            _ = signals.stop() => break,
            next = tracer.next(&mut records) => next?,
        }
        printer.print(&mut records)?;
    }
    // What the kernel delivered before the signal is still shown.
    tracer.finish(&mut records)?;
    printer.print(&mut records)?;
    Ok(())
}

async fn attached(
    stream: UnixStream,
    args: &WatchArgs,
    signals: &mut Signals,
    printer: &mut Printer,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut request = serde_json::to_string(&Request::new(Command::Watch))?;
    request.push('\n');
    write.write_all(request.as_bytes()).await.context("sending the watch request")?;
    eprintln!(
        "netwatch: watching TCP state changes via the agent at {}; Ctrl-C to stop",
        args.programs.socket.display()
    );
    header(printer)?;
    let mut lines = BufReader::new(read).lines();
    let mut records = Vec::new();
    loop {
        let line = tokio::select! {
            _ = signals.stop() => return Ok(()),
            line = lines.next_line() => line.context("reading the agent's stream")?,
        };
        let Some(line) = line else {
            anyhow::bail!("the agent at {} stopped", args.programs.socket.display());
        };
        match serde_json::from_str::<StreamRecord>(&line) {
            Ok(record) => records.push(record),
            Err(_) => anyhow::bail!("the agent said: {line}"),
        }
        printer.print(&mut records)?;
    }
}

/// Plays a recorded stretch of the log through the same filters and printer.
async fn replay(
    path: &std::path::Path,
    args: &WatchArgs,
    signals: &mut Signals,
    printer: &mut Printer,
) -> anyhow::Result<()> {
    let selection = RecordSelection { filter: args.filter(), ..RecordSelection::default() };
    let reader = super::log::open(path, args.replay.window(), false)?;
    let mut player = Player::new(reader, selection.prefilter(), args.replay.speed);
    let mut enter = args.replay.step.then(|| BufReader::new(tokio::io::stdin()).lines());
    if enter.is_some() {
        player.pace.pause();
    }
    let how = if enter.is_some() {
        "one record per Enter".to_string()
    } else {
        format!("at {}x", args.replay.speed)
    };
    eprintln!("netwatch: replaying {} {how}; Ctrl-C to stop", path.display());
    header(printer)?;
    loop {
        player.step();
        let played = tokio::select! {
            _ = signals.stop() => return Ok(()),
            played = player.next() => played?,
        };
        let record = match played {
            Played::Entry(Entry::Record(record)) if printer.shows(&record) => record,
            Played::End => return Ok(()),
            _ => continue,
        };
        printer.print(&mut vec![record])?;
        if let Some(lines) = &mut enter {
            tokio::select! {
                _ = signals.stop() => return Ok(()),
                line = lines.next_line() => if line?.is_none() { return Ok(()) },
            }
        }
    }
}

/// A replay must not log into the log it replays (it would read what it writes): checked
/// before the log is opened, which may cut a line the agent is writing.
fn refuse_logging_into(
    replayed: &std::path::Path,
    log: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let Some(log) = log else { return Ok(()) };
    let id = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let replayed = crate::recorded::files::rotations(replayed).unwrap_or_default();
    if id(log).is_some_and(|log| replayed.iter().any(|p| id(p) == Some(log))) {
        anyhow::bail!(
            "--log {} is a file of the log being replayed: the replay would read what it \
             writes; log to another file",
            log.display()
        );
    }
    Ok(())
}
