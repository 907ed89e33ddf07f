//! `netwatch watch`: load and attach, then turn ring buffer wakeups into output lines until
//! Ctrl-C / SIGTERM or until stdout goes away.
use std::{
    io::{self, BufWriter, Write},
    time::Duration,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::WatchArgs,
    events::{Event, EventReader},
    filter::TransitionFilter,
    loader::{self, LostCounter},
    output::{self, Format, Loss, LossReason, WallClock},
    table::Table,
};

/// How often the kernel's loss counter is read; a loss is reported at most this late.
const LOSS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Writes lines, remembering whether the reader went away (a closed pipe is a normal end).
struct Sink {
    out: BufWriter<io::Stdout>,
    format: Format,
    clock: WallClock,
}

impl Sink {
    fn line(&mut self, line: &str) -> io::Result<()> {
        self.out.write_all(line.as_bytes())?;
        self.out.write_all(b"\n")
    }

    fn loss(&mut self, loss: Loss) -> io::Result<()> {
        let now = self.clock.wall(WallClock::monotonic_now_ns());
        let line = match self.format {
            Format::Text => output::lost_text(&loss, now),
            Format::Json => output::lost_json(&loss, now),
        };
        self.line(&line)
    }
}

/// Loss counters as last reported, so each report carries the count since the previous one.
#[derive(Default)]
struct LossReports {
    ring_full: u64,
    malformed: u64,
}

impl LossReports {
    fn report(
        &mut self,
        sink: &mut Sink,
        lost: &LostCounter,
        reader: &EventReader,
    ) -> anyhow::Result<()> {
        let ring_full = lost.total().context("reading the lost-event counter")?;
        for (reason, total, reported) in [
            (LossReason::RingBufferFull, ring_full, &mut self.ring_full),
            (LossReason::Malformed, reader.malformed, &mut self.malformed),
        ] {
            if total > *reported {
                sink.loss(Loss {
                    reason,
                    count: total - *reported,
                    total,
                })?;
                *reported = total;
            }
        }
        Ok(())
    }
}

pub async fn run(args: &WatchArgs) -> anyhow::Result<()> {
    let mut probes = loader::load(&args.load_options())?;
    for warning in &probes.warnings {
        tracing::warn!("{warning}");
    }
    let mut reader =
        EventReader::new(probes.take_ring()?).context("registering the ring buffer")?;
    let lost = probes.take_lost_counter()?;

    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut loss_timer = tokio::time::interval(LOSS_CHECK_INTERVAL);

    let filter = args.filter();
    let mut table = Table::new();
    let mut sink = Sink {
        out: BufWriter::new(io::stdout()),
        format: args.format(),
        clock: WallClock::now(),
    };
    let mut losses = LossReports::default();
    let mut batch = Vec::new();

    eprintln!(
        "netwatch: watching TCP state changes via {} (attached in {:.1?}); Ctrl-C to stop",
        probes.source, probes.load_time
    );
    let result: anyhow::Result<()> = async {
        if sink.format == Format::Text && !args.no_header {
            sink.line(output::TEXT_HEADER)?;
            sink.out.flush()?;
        }
        loop {
            tokio::select! {
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = loss_timer.tick() => losses.report(&mut sink, &lost, &reader)?,
                read = reader.read_batch(&mut batch) => {
                    read.context("reading the ring buffer")?;
                    emit(&mut sink, &mut table, &filter, &mut batch)?;
                }
            }
            sink.out.flush()?;
        }
        // What the kernel delivered before the signal is still shown.
        reader.read_available(&mut batch);
        emit(&mut sink, &mut table, &filter, &mut batch)?;
        // Detach first so nothing new arrives, then report what the kernel could not deliver.
        drop(probes);
        losses.report(&mut sink, &lost, &reader)?;
        sink.out.flush()?;
        Ok(())
    }
    .await;
    match result {
        Err(error) if is_broken_pipe(&error) => Ok(()),
        other => other,
    }
}

/// Applies a batch of events to the table and prints the transitions the filter keeps.
fn emit(
    sink: &mut Sink,
    table: &mut Table,
    filter: &TransitionFilter,
    batch: &mut Vec<Event>,
) -> io::Result<()> {
    for event in batch.drain(..) {
        let Some(transition) = table.apply(event) else {
            continue;
        };
        if !filter.matches(&transition) {
            continue;
        }
        let line = match sink.format {
            Format::Text => output::text_line(&transition, &sink.clock),
            Format::Json => output::json_line(&transition, &sink.clock),
        };
        sink.line(&line)?;
    }
    Ok(())
}

/// Output piped into `head` ends with EPIPE: that is the reader's choice, not an error.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}
