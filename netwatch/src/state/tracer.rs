//! The kernel-to-records pipeline shared by `netwatch watch` (direct mode) and the agent:
//! attached programs, the ring buffer reader, the socket table, and loss accounting, turned
//! into [`StreamRecord`]s as the kernel delivers events.
use std::{collections::HashMap, time::Duration};

use anyhow::Context as _;

use crate::{
    host::snapshot::{DiagSocket, NetNamespace, Snapshot, network_namespaces, socket_fds},
    kernel::events::{Event, EventReader, StateChange},
    kernel::loader::{self, LoadOptions, Probes, RingCounters},
    record::{
        Listed, LossReason, LossRecord, OwnerChange, RetransmitRecord, StreamRecord,
        TransitionRecord, WallClock,
    },
    serve::metrics::Health,
    state::table::{Table, may_leave_timewait},
};

/// How often the kernel's loss counter is read; a loss is reported at most this late.
const LOSS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How often the ring buffer is drained without a wakeup: the kernel side wakes the agent
/// only when an eighth of the buffer is waiting, so this bounds a quiet host's latency.
const DRAIN_INTERVAL: Duration = Duration::from_millis(5);

/// Loss checks in a row that may find new losses before the table is rebuilt anyway.
const RESYNC_AT_LATEST: u32 = 5;

pub struct Tracer {
    /// Whether this tracer keeps the socket table's rows current (the agent does; a direct
    /// watch only needs owners and state times). Timewait lookups cost a netlink request.
    keep_rows: bool,
    /// Namespace inode -> a path to enter it, for targeted lookups and names.
    namespaces: HashMap<u32, NetNamespace>,
    probes: Option<Probes>,
    /// The start-up snapshot's rows, for whoever keeps more than the table (histories).
    initial_rows: Vec<crate::host::snapshot::SocketRow>,
    reader: EventReader,
    ring: RingCounters,
    table: Table,
    clock: WallClock,
    loss_timer: tokio::time::Interval,
    drain_timer: tokio::time::Interval,
    reported_ring_full: u64,
    reported_malformed: u64,
    reported_skipped: u64,
    /// Loss checks since events were first lost without a resync yet (None: table sound).
    resync_due: Option<u32>,
    /// sock_diag sockets for timewait lookups, one per namespace; opening one costs a thread,
    /// so they are kept, but only until the next loss check, since each pins its namespace.
    diag: DiagSockets,
    batch: Vec<Event>,
    ring_size: u32,
    /// When the table was last seeded from a snapshot (Unix time, seconds).
    snapshot_at: f64,
}

/// sock_diag sockets opened on first use, one per namespace, closed when dropped (an open one
/// keeps its namespace alive).
#[derive(Default)]
struct DiagSockets(HashMap<u32, DiagSocket>);

impl DiagSockets {
    fn get(&mut self, namespace: &NetNamespace) -> std::io::Result<&mut DiagSocket> {
        use std::collections::hash_map::Entry;
        match self.0.entry(namespace.inode) {
            Entry::Occupied(open) => Ok(open.into_mut()),
            Entry::Vacant(slot) => {
                Ok(slot.insert(DiagSocket::open(&namespace.path, namespace.inode)?))
            }
        }
    }
}

fn unix_now() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64 / 1e3
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
        let ring = probes.take_ring_counters()?;
        // The programs are attached: whatever changes from here on is queued in the ring
        // buffer and applied after the snapshot, so nothing falls between the two.
        let snapshot = Snapshot::take();
        for problem in &snapshot.problems {
            tracing::warn!("snapshot: {problem}");
        }
        tracing::info!("snapshot: {} sockets in {:.1?}", snapshot.rows.len(), snapshot.took);
        let mut table = Table::new();
        table.seed(&snapshot.rows, &snapshot.owners, WallClock::monotonic_now_ns());
        let namespaces = snapshot.namespaces.into_iter().map(|ns| (ns.inode, ns)).collect();
        Ok(Tracer {
            keep_rows: false,
            initial_rows: snapshot.rows,
            namespaces,
            probes: Some(probes),
            reader,
            ring,
            table,
            clock: WallClock::now(),
            loss_timer: tokio::time::interval(LOSS_CHECK_INTERVAL),
            drain_timer: {
                let mut timer = tokio::time::interval(DRAIN_INTERVAL);
                timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                timer
            },
            reported_ring_full: 0,
            reported_malformed: 0,
            reported_skipped: 0,
            resync_due: None,
            diag: DiagSockets::default(),
            batch: Vec::new(),
            ring_size: options.ring_size.unwrap_or(loader::DEFAULT_RING_SIZE),
            snapshot_at: unix_now(),
        })
    }

    /// After lost events the table may be wrong in ways no later event will fix: rebuild it
    /// from a fresh snapshot, exactly as at start (events still queued are newer and are
    /// applied after it). State times restart unknown; owners and rows are right again.
    fn resync(&mut self) {
        let snapshot = Snapshot::take();
        tracing::warn!(
            "events were lost: the table was rebuilt from a new snapshot ({} sockets in {:.1?})",
            snapshot.rows.len(),
            snapshot.took
        );
        let mut table = Table::new();
        table.seed(&snapshot.rows, &snapshot.owners, WallClock::monotonic_now_ns());
        table.keep_counts_of(&self.table);
        self.table = table;
        self.snapshot_at = unix_now();
        self.namespaces = snapshot.namespaces.into_iter().map(|ns| (ns.inode, ns)).collect();
    }

    /// The rows of the snapshot taken at start (once).
    pub fn take_initial_rows(&mut self) -> Vec<crate::host::snapshot::SocketRow> {
        std::mem::take(&mut self.initial_rows)
    }

    /// Keeps the table's rows exact (timewait sockets looked up as they appear).
    pub fn keeping_rows(mut self) -> Self {
        self.keep_rows = true;
        self
    }

    /// The socket table now, as `ss -tuanp` would list it.
    pub fn listed(&mut self) -> Vec<Listed> {
        self.forget_gone_namespaces();
        self.refresh_orphaned_fin_wait2();
        let now = WallClock::monotonic_now_ns();
        self.table.expire(now);
        self.table
            .rows(now)
            .into_iter()
            .map(|row| Listed {
                netns_name: self.namespaces.get(&row.row.netns).and_then(|ns| ns.name.clone()),
                in_state: row.in_state_ns.map(Duration::from_nanos),
                owners: row.owners,
                row: row.row,
                queues_known: false,
                owner_history: row
                    .owner_history
                    .iter()
                    .map(|(ago, owner)| OwnerChange {
                        pid: owner.pid,
                        comm: owner.comm.clone(),
                        ago: ago.map(Duration::from_nanos),
                    })
                    .collect(),
            })
            .collect()
    }

    /// Every listening socket with its accept-queue counts.
    pub fn listeners(&self) -> Vec<crate::state::table::Listener> {
        self.table.listeners()
    }

    /// The kernel's listeners and half-open connections now, in every namespace that has one
    /// of `listeners`; None if a namespace could not be read.
    pub fn passive_sockets(
        &mut self,
        listeners: &[crate::state::table::Listener],
    ) -> Option<Vec<crate::host::snapshot::SocketRow>> {
        if listeners.iter().any(|l| !self.namespaces.contains_key(&l.netns)) {
            self.namespaces.extend(network_namespaces().into_iter().map(|ns| (ns.inode, ns)));
        }
        let wanted: std::collections::BTreeSet<u32> = listeners.iter().map(|l| l.netns).collect();
        let mut rows = Vec::new();
        for netns in wanted {
            let namespace = self.namespaces.get(&netns)?;
            match self.diag.get(namespace).and_then(DiagSocket::passive_sockets) {
                Ok(found) => rows.extend(found),
                Err(error) => {
                    tracing::warn!("listener queues in netns {netns}: {error}");
                    return None;
                }
            }
        }
        Some(rows)
    }

    /// The agent's own state, for its metrics.
    pub fn health(&self) -> Health {
        Health {
            last_snapshot: self.snapshot_at,
            ring_peak_bytes: self.ring.peak_unread().unwrap_or(0),
            ring_size_bytes: u64::from(self.ring_size),
        }
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
            _ = self.drain_timer.tick() => {
                self.catch_up(out);
                Ok(())
            }
            read = self.reader.read_batch(&mut self.batch) => {
                read.context("reading the ring buffer")?;
                self.apply_batch(out);
                Ok(())
            }
        }
    }

    /// Turns whatever the kernel has queued into records now, without waiting for a wakeup.
    pub fn catch_up(&mut self, out: &mut Vec<StreamRecord>) {
        self.reader.read_available(&mut self.batch);
        self.apply_batch(out);
    }

    /// Detaches the programs, then turns what the kernel had already delivered into records.
    pub fn finish(&mut self, out: &mut Vec<StreamRecord>) -> anyhow::Result<()> {
        drop(self.probes.take());
        self.reader.read_available(&mut self.batch);
        self.apply_batch(out);
        self.report_losses(out)
    }

    fn apply_batch(&mut self, out: &mut Vec<StreamRecord>) {
        let mut closed = Vec::new();
        let mut execs = Vec::new();
        for event in self.batch.drain(..) {
            if let (true, Event::Exec(task)) = (self.keep_rows, &event) {
                execs.push(task.pid);
            }
            if let Event::Retransmit(retransmit) = &event {
                let seen = self.table.retransmit(retransmit);
                out.push(StreamRecord::Retransmit(Box::new(RetransmitRecord::new(
                    retransmit,
                    seen,
                    &self.clock,
                ))));
                continue;
            }
            if let Some(transition) = self.table.apply(event) {
                if self.keep_rows && may_leave_timewait(&transition.change) {
                    closed.push(transition.change.clone());
                }
                out.push(StreamRecord::Transition(Box::new(TransitionRecord::new(
                    &transition,
                    &self.clock,
                ))));
            }
        }
        self.look_up_timewait(&closed);
        for pid in execs {
            // A targeted look at one process's fds: exec closed its close-on-exec ones.
            self.table.keep_open_fds(pid, &socket_fds(pid));
        }
    }

    /// Full sockets closed from FIN_WAIT*/CLOSING: the kernel may keep a timewait socket for
    /// each 4-tuple, which no tracepoint reports. Ask sock_diag for those sockets, one exact
    /// lookup each, through the namespace's kept socket.
    fn look_up_timewait(&mut self, closed: &[StateChange]) {
        if closed.iter().any(|c| !self.namespaces.contains_key(&c.netns)) {
            self.namespaces.extend(network_namespaces().into_iter().map(|ns| (ns.inode, ns)));
        }
        for change in closed {
            // The timewait socket carries the full socket's cookie.
            if let Some(Some(row)) =
                self.look_up_tcp(change.netns, change.family, change.local, change.remote)
            {
                self.table.insert_row(&row, None, WallClock::monotonic_now_ns());
            }
        }
    }

    /// The socket sock_diag has for a TCP 4-tuple in a known namespace, through that
    /// namespace's kept socket; None when the namespace is unknown or the lookup failed.
    fn look_up_tcp(
        &mut self,
        netns: u32,
        family: crate::kernel::events::Family,
        local: (std::net::IpAddr, u16),
        remote: (std::net::IpAddr, u16),
    ) -> Option<Option<crate::host::snapshot::SocketRow>> {
        let namespace = self.namespaces.get(&netns)?;
        match self.diag.get(namespace).and_then(|d| d.lookup_tcp(family, local, remote)) {
            Ok(found) => Some(found),
            Err(error) => {
                tracing::debug!("timewait lookup in netns {netns}: {error}");
                None
            }
        }
    }

    /// A deleted network namespace takes its sockets with it, and no event says so. Before
    /// listing, check that each namespace the table has sockets in can still be reached (one
    /// stat of a known path each; a /proc scan only when one cannot) and forget the rest.
    fn forget_gone_namespaces(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        let reachable = |ns: &NetNamespace| {
            std::fs::metadata(&ns.path).is_ok_and(|m| m.ino() == u64::from(ns.inode))
        };
        let in_table = self.table.namespaces();
        let unsure: Vec<u32> = in_table
            .iter()
            .filter(|&&inode| inode != 0)
            .filter(|inode| self.namespaces.get(inode).is_none_or(|ns| !reachable(ns)))
            .copied()
            .collect();
        if unsure.is_empty() {
            return;
        }
        self.namespaces = network_namespaces().into_iter().map(|ns| (ns.inode, ns)).collect();
        for inode in unsure {
            if !self.namespaces.contains_key(&inode) {
                tracing::debug!("netns {inode} is gone: forgetting its sockets");
                self.table.forget_namespace(inode);
            }
        }
    }

    /// A timewait socket made from an orphaned FIN_WAIT2 socket turns into TIME_WAIT when the
    /// peer's FIN arrives, which no tracepoint reports: look such sockets up again.
    fn refresh_orphaned_fin_wait2(&mut self) {
        for row in self.table.timewait_in_fin_wait2() {
            match self.look_up_tcp(row.netns, row.family, row.local, row.remote) {
                Some(Some(now)) => self.table.insert_row(&now, None, WallClock::monotonic_now_ns()),
                Some(None) => self.table.forget(row.cookie),
                None => {}
            }
        }
    }

    /// A `lost` record per reason whose count grew since the previous report.
    fn report_losses(&mut self, out: &mut Vec<StreamRecord>) -> anyhow::Result<()> {
        // Let go of the namespaces the lookup sockets pin (a deleted one lives on until then).
        self.diag = DiagSockets::default();
        let ring_full = self.ring.lost().context("reading the lost-event counter")?;
        let time = self.clock.wall(WallClock::monotonic_now_ns());
        let skipped = loader::skipped_runs();
        let losing = ring_full > self.reported_ring_full
            || self.reader.malformed > self.reported_malformed
            || skipped > self.reported_skipped;
        // A snapshot costs more than the events it replaces: taken while events are still
        // being lost it would only deepen the loss. Rebuild once a check finds no new loss,
        // or after RESYNC_AT_LATEST checks of continuous loss.
        self.resync_due = match (self.resync_due, losing) {
            (None, false) => None,
            (Some(checks), true) if checks + 1 < RESYNC_AT_LATEST => Some(checks + 1),
            (None, true) => Some(0),
            (Some(_), _) => {
                self.resync();
                losing.then_some(0)
            }
        };
        for (reason, total, reported) in [
            (LossReason::RingBufferFull, ring_full, &mut self.reported_ring_full),
            (LossReason::Malformed, self.reader.malformed, &mut self.reported_malformed),
            (LossReason::Skipped, skipped, &mut self.reported_skipped),
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
