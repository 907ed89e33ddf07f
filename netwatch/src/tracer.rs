//! The kernel-to-records pipeline shared by `netwatch watch` (direct mode) and the agent:
//! attached programs, the ring buffer reader, the socket table, and loss accounting, turned
//! into [`StreamRecord`]s as the kernel delivers events.
use std::time::Duration;

use anyhow::Context as _;

use crate::{
    events::{Event, EventReader},
    loader::{self, LoadOptions, LostCounter, Probes},
    output::{LossReason, LossRecord, StreamRecord, TransitionRecord, WallClock},
    snapshot::Snapshot,
    table::Table,
};

/// How often the kernel's loss counter is read; a loss is reported at most this late.
const LOSS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

pub struct Tracer {
    probes: Option<Probes>,
    reader: EventReader,
    lost: LostCounter,
    table: Table,
    clock: WallClock,
    loss_timer: tokio::time::Interval,
    reported_ring_full: u64,
    reported_malformed: u64,
    batch: Vec<Event>,
}

impl Tracer {
    /// Loads and attaches the programs, then seeds the table from a snapshot of every socket
    /// so that sockets older than netwatch have their owners; warnings go to the log.
    pub fn start(options: &LoadOptions) -> anyhow::Result<Tracer> {
        let mut probes = loader::load(options)?;
        for warning in &probes.warnings {
            tracing::warn!("{warning}");
        }
        let reader =
            EventReader::new(probes.take_ring()?).context("registering the ring buffer")?;
        let lost = probes.take_lost_counter()?;
        // The programs are attached: whatever changes from here on is queued in the ring
        // buffer and applied after the snapshot, so nothing falls between the two.
        let snapshot = Snapshot::take();
        for problem in &snapshot.problems {
            tracing::warn!("snapshot: {problem}");
        }
        tracing::info!(
            "snapshot: {} sockets in {:.1?}",
            snapshot.rows.len(),
            snapshot.took
        );
        let mut table = Table::new();
        table.seed(
            &snapshot.rows,
            &snapshot.owners,
            WallClock::monotonic_now_ns(),
        );
        Ok(Tracer {
            probes: Some(probes),
            reader,
            lost,
            table,
            clock: WallClock::now(),
            loss_timer: tokio::time::interval(LOSS_CHECK_INTERVAL),
            reported_ring_full: 0,
            reported_malformed: 0,
            batch: Vec::new(),
        })
    }

    /// One line for the user: which source, how long loading took.
    pub fn describe(&self) -> String {
        match &self.probes {
            Some(p) => format!("{} (attached in {:.1?})", p.source, p.load_time),
            None => "detached".into(),
        }
    }

    /// Waits for the kernel to deliver events (or for the loss check to come round) and
    /// appends the resulting records to `out`.
    pub async fn next(&mut self, out: &mut Vec<StreamRecord>) -> anyhow::Result<()> {
        tokio::select! {
            _ = self.loss_timer.tick() => self.report_losses(out),
            read = self.reader.read_batch(&mut self.batch) => {
                read.context("reading the ring buffer")?;
                self.apply_batch(out);
                Ok(())
            }
        }
    }

    /// Detaches the programs, then turns what the kernel had already delivered into records.
    pub fn finish(&mut self, out: &mut Vec<StreamRecord>) -> anyhow::Result<()> {
        drop(self.probes.take());
        self.reader.read_available(&mut self.batch);
        self.apply_batch(out);
        self.report_losses(out)
    }

    fn apply_batch(&mut self, out: &mut Vec<StreamRecord>) {
        for event in self.batch.drain(..) {
            if let Some(transition) = self.table.apply(event) {
                out.push(StreamRecord::Transition(TransitionRecord::new(
                    &transition,
                    &self.clock,
                )));
            }
        }
    }

    /// A `lost` record per reason whose count grew since the previous report.
    fn report_losses(&mut self, out: &mut Vec<StreamRecord>) -> anyhow::Result<()> {
        let ring_full = self
            .lost
            .total()
            .context("reading the lost-event counter")?;
        let time = self.clock.wall(WallClock::monotonic_now_ns());
        for (reason, total, reported) in [
            (
                LossReason::RingBufferFull,
                ring_full,
                &mut self.reported_ring_full,
            ),
            (
                LossReason::Malformed,
                self.reader.malformed,
                &mut self.reported_malformed,
            ),
        ] {
            if total > *reported {
                out.push(StreamRecord::Lost(LossRecord {
                    time,
                    reason,
                    count: total - *reported,
                    total,
                }));
                *reported = total;
            }
        }
        Ok(())
    }
}
