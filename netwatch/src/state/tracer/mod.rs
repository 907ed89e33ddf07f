//! The kernel-to-records pipeline shared by `netwatch watch` (direct mode) and the agent:
//! attached programs, the ring buffer reader, the socket table, and loss accounting, turned
//! into [`StreamRecord`]s as the kernel delivers events.
mod ask;

pub use ask::Scope;

use std::{collections::HashMap, time::Duration};

use anyhow::Context as _;

use crate::{
    host::{
        procfs::socket_fds,
        snapshot::{NetNamespace, Snapshot, SocketRow, is_link_local, network_namespaces},
        sock_diag::DiagSocket,
        workload::{KUBELET_LOGS, Workloads},
    },
    kernel::events::{Event, EventReader, FdSocket, TcpState},
    kernel::hooks::HookState,
    kernel::loader::{self, LoadOptions, Probes, RingCounters},
    record::{Listed, OwnerChange, RetransmitRecord, StreamRecord, TransitionRecord, WallClock},
    serve::metrics::Health,
    state::clones::Clones,
    state::loss::{LossCounts, LossTracker},
    state::table::{Table, Transition},
};

/// How often the kernel's loss counter is read; a loss is reported at most this late.
const LOSS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// After a wakeup, how long the reader lets events gather before it drains again. The
/// kernel side wakes the reader only for the first event after it has caught up (and for an
/// eighth of the buffer waiting), so while events keep coming the reader drains at this
/// pace with no wakeups, and once a drain finds none it sleeps until the next event: an idle
/// host costs no wakeups, and a busy one one per window.
const BATCH_WINDOW: Duration = Duration::from_millis(2);

/// How long an accept seen at its graft waits for its fd from the system call's return
/// before the process's fds are looked at (at the next loss check: up to a second more).
const GRAFT_PATIENCE: Duration = Duration::from_millis(200);

/// How often every namespace's timewait sockets are compared with the kernel's, to learn of
/// those a RST ended early; those past their expiry or in FIN_WAIT2 are looked at every
/// LOSS_CHECK_INTERVAL.
const TIMEWAIT_CHECK_INTERVAL: Duration = Duration::from_secs(5);

pub struct Tracer {
    /// Whether this tracer keeps the socket table's holders exact after exec (the agent
    /// does; a direct watch only needs owners and state times).
    keep_rows: bool,
    /// Namespace inode -> a path to enter it, for targeted lookups and names.
    namespaces: HashMap<u32, NetNamespace>,
    probes: Option<Probes>,
    /// The snapshot the table was last seeded from (rows and owners; its namespaces are
    /// the tracer's), until taken: for whoever keeps more than the table (histories).
    seeded_from: Option<Snapshot>,
    reader: EventReader,
    ring: RingCounters,
    table: Table,
    clock: WallClock,
    loss_timer: tokio::time::Interval,
    /// Events came at the last look: drain again after BATCH_WINDOW rather than wait for a
    /// wakeup.
    busy: bool,
    losses: LossTracker,
    skipped: loader::SkippedRuns,
    /// sock_diag sockets for lookups and timewait dumps, one per namespace; opening one costs
    /// a thread, so they are kept, but only until the next loss check, since each pins its
    /// namespace.
    diag: DiagSockets,
    batch: Vec<Event>,
    /// The batch in the order it is applied (see [`Clones`]).
    sorted: Vec<Event>,
    clones: Clones,
    /// Accepts seen at their graft and not yet with their fd, by cookie (see
    /// [`Tracer::settle_grafts`]).
    grafts: HashMap<u64, FdSocket>,
    ring_size: u32,
    /// When the table was last seeded from a snapshot (Unix time, seconds).
    snapshot_at: f64,
    /// The container, pod or unit of each owner's cgroup.
    workloads: Workloads,
    /// When each namespace's timewait sockets were last compared with sock_diag's.
    timewait_checked: HashMap<u32, u64>,
    /// Someone mirrors the table ([`Tracer::take_changes`]), and whether it was rebuilt
    /// since the last changes were taken.
    tracking: bool,
    replaced: bool,
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

/// A table of what `snapshot` found, with the sockets no dump lists made known (taking
/// their cookies) so that events can name them.
fn seeded_table(snapshot: &mut Snapshot) -> Table {
    snapshot.find_unlisted();
    let now_ns = WallClock::monotonic_now_ns();
    let mut table = Table::new();
    table.seed(&snapshot.rows, &snapshot.owners, now_ns);
    table.seed_unlisted(&snapshot.unlisted, now_ns);
    table
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
        let mut snapshot = Snapshot::take();
        for problem in &snapshot.problems {
            tracing::warn!("snapshot: {problem}");
        }
        tracing::info!("snapshot: {} sockets in {:.1?}", snapshot.rows.len(), snapshot.took);
        let table = seeded_table(&mut snapshot);
        let listener_told = probes.hooks.iter().any(|h| {
            h.program == netwatch_common::program::CHILD_OF && h.state == HookState::Attached
        });
        let namespaces =
            std::mem::take(&mut snapshot.namespaces).into_iter().map(|ns| (ns.inode, ns)).collect();
        Ok(Tracer {
            keep_rows: false,
            seeded_from: Some(snapshot),
            namespaces,
            probes: Some(probes),
            reader,
            ring,
            table,
            clock: WallClock::now(),
            loss_timer: tokio::time::interval(LOSS_CHECK_INTERVAL),
            busy: false,
            losses: LossTracker::default(),
            skipped: loader::SkippedRuns::default(),
            diag: DiagSockets::default(),
            batch: Vec::new(),
            sorted: Vec::new(),
            clones: Clones::new(listener_told),
            grafts: HashMap::new(),
            ring_size: options.ring_size.unwrap_or(loader::DEFAULT_RING_SIZE),
            snapshot_at: unix_now(),
            workloads: Workloads::new(KUBELET_LOGS.into()),
            timewait_checked: HashMap::new(),
            tracking: false,
            replaced: false,
        })
    }

    /// After lost events the table may be wrong in ways no later event will fix: rebuild it
    /// from a fresh snapshot, exactly as at start (events still queued are newer and are
    /// applied after it). State times restart unknown; owners and rows are right again.
    fn resync(&mut self) {
        let mut snapshot = Snapshot::take();
        tracing::warn!(
            "events were lost: the table was rebuilt from a new snapshot ({} sockets in {:.1?})",
            snapshot.rows.len(),
            snapshot.took
        );
        let mut table = seeded_table(&mut snapshot);
        table.keep_counts_of(&self.table);
        table.track_changes(self.tracking);
        self.replaced = self.tracking;
        self.table = table;
        self.snapshot_at = unix_now();
        self.namespaces =
            std::mem::take(&mut snapshot.namespaces).into_iter().map(|ns| (ns.inode, ns)).collect();
        self.seeded_from = Some(snapshot);
    }

    /// The wall clock the records are stamped with.
    pub fn clock(&self) -> WallClock {
        self.clock
    }

    /// The snapshot the table was seeded from since the last call: the one at start, then
    /// each one a resync took after lost events.
    pub fn take_snapshot(&mut self) -> Option<Snapshot> {
        self.seeded_from.take()
    }

    /// Takes pod and container names from the kubelet's logs under `dir` (default
    /// `/var/log`), and from the API's list of the node's pods if given (`--kube`).
    pub fn naming_pods(
        mut self,
        dir: std::path::PathBuf,
        kube: Option<crate::host::kube::Pods>,
    ) -> Self {
        self.workloads = Workloads::new(dir);
        if let Some(pods) = kube {
            self.workloads = self.workloads.with_kube(pods);
        }
        self
    }

    /// The container, pod or unit of the cgroup with this id.
    pub fn workload(
        &self,
        cgroup_id: u64,
    ) -> Option<std::sync::Arc<crate::host::workload::Workload>> {
        self.workloads.of(cgroup_id)
    }

    /// Keeps the table's holders exact after exec (a look at the process's fds).
    pub fn keeping_rows(mut self) -> Self {
        self.keep_rows = true;
        self
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
            _ = self.loss_timer.tick() => {
                // Queued events first: a new connection that took over a timewait socket's
                // 4-tuple must be seen before the sock_diag dump that no longer finds it.
                self.catch_up(out);
                self.forget_gone_namespaces(out);
                self.check_timewait(out, false);
                self.settle_grafts();
                self.check_losses(out, false)
            }
            _ = tokio::time::sleep(BATCH_WINDOW), if self.busy => {
                self.busy = self.catch_up(out) > 0;
                Ok(())
            }
            read = self.reader.read_batch(&mut self.batch), if !self.busy => {
                read.context("reading the ring buffer")?;
                self.busy = !self.batch.is_empty();
                self.apply_batch(out);
                Ok(())
            }
        }
    }

    /// Turns whatever the kernel has queued into records now, without waiting for a wakeup;
    /// returns how many events there were.
    pub fn catch_up(&mut self, out: &mut Vec<StreamRecord>) -> usize {
        self.reader.read_available(&mut self.batch);
        let events = self.batch.len();
        self.apply_batch(out);
        events
    }

    /// Detaches the programs, then turns what the kernel had already delivered into records.
    pub fn finish(&mut self, out: &mut Vec<StreamRecord>) -> anyhow::Result<()> {
        drop(self.probes.take());
        self.catch_up(out);
        self.check_losses(out, false)
    }

    fn apply_batch(&mut self, out: &mut Vec<StreamRecord>) {
        let mut execs = Vec::new();
        let mut sorted = std::mem::take(&mut self.sorted);
        for event in self.batch.drain(..) {
            self.clones.sort(event, &mut sorted);
        }
        for event in sorted.drain(..) {
            if let (true, Event::Exec(task)) = (self.keep_rows, &event) {
                execs.push(task.pid);
            }
            if self.keep_rows {
                self.follow_grafts(&event);
            }
            if let Event::Retransmit(retransmit) = &event {
                let seen = self.table.retransmit(retransmit);
                let cgroup = seen.owner.as_ref().map_or(0, |owner| owner.cgroup_id);
                let mut record = RetransmitRecord::new(retransmit, seen, &self.clock);
                record.workload = self.workloads.of(cgroup);
                out.push(StreamRecord::Retransmit(Box::new(record)));
                continue;
            }
            let mut transition = self.table.apply(event);
            if let Some(new) = transition.as_mut().filter(|t| needs_diag_facts(t)) {
                new.v6only |= self.learn_from_diag(new);
            }
            for ended in self.table.take_ended().into_iter().chain(transition) {
                if let Some(cookie) = ended.change.cookie {
                    self.table.mark_changed(cookie);
                }
                out.push(StreamRecord::Transition(Box::new(self.record_of(&ended))));
            }
        }
        self.sorted = sorted;
        for pid in execs {
            // A targeted look at one process's fds: exec closed its close-on-exec ones.
            self.table.keep_open_fds(pid, &socket_fds(pid));
        }
    }

    /// The socket sock_diag has for a TCP 4-tuple, through its namespace's kept socket (a
    /// namespace not known yet is looked for first); None when the namespace cannot be
    /// found or the lookup failed.
    fn look_up_tcp(
        &mut self,
        netns: u32,
        family: crate::kernel::events::Family,
        local: (std::net::IpAddr, u16),
        remote: (std::net::IpAddr, u16),
    ) -> Option<Option<SocketRow>> {
        if !self.namespaces.contains_key(&netns) {
            self.learn_namespaces();
        }
        let namespace = self.namespaces.get(&netns)?;
        match self.diag.get(namespace).and_then(|d| d.lookup_tcp(family, local, remote)) {
            Ok(found) => Some(found),
            Err(error) => {
                tracing::debug!("sock_diag lookup in netns {netns}: {error}");
                None
            }
        }
    }

    /// An accept is seen at its graft, then with its fd when the system call returns; a
    /// graft is kept until its fd comes or its socket goes.
    fn follow_grafts(&mut self, event: &Event) {
        match event {
            Event::Accepted(accept) if accept.fd < 0 => {
                self.grafts.insert(accept.cookie, accept.clone());
            }
            Event::Accepted(fd) | Event::FdClosed(fd) => {
                self.grafts.remove(&fd.cookie);
            }
            Event::Released(life) => {
                self.grafts.remove(&life.cookie);
            }
            Event::State(change) if change.new == TcpState::Close => {
                if let Some(cookie) = change.cookie {
                    self.grafts.remove(&cookie);
                }
            }
            _ => {}
        }
    }

    /// A task that was already blocked in accept(2) when the fexit programs attached returns
    /// past them, so its fd never comes in an event: for each graft older than
    /// GRAFT_PATIENCE, the fd is found with one look at the process's fds (one per process,
    /// however many of its grafts are due).
    fn settle_grafts(&mut self) {
        let now = WallClock::monotonic_now_ns();
        let patience = GRAFT_PATIENCE.as_nanos() as u64;
        let due: Vec<FdSocket> = self
            .grafts
            .extract_if(|_, g| now.saturating_sub(g.ts_ns) >= patience)
            .map(|(_, graft)| graft)
            .collect();
        let mut looked: HashMap<u32, HashMap<i32, u64>> = HashMap::new();
        for graft in due {
            if graft.inode == 0 || self.table.holds(graft.cookie, graft.task.pid) {
                continue;
            }
            let fds = looked.entry(graft.task.pid).or_insert_with(|| socket_fds(graft.task.pid));
            if let Some((&fd, _)) = fds.iter().find(|&(_, inode)| *inode == graft.inode) {
                self.table.apply(Event::FdOpened(FdSocket { fd, ..graft }));
            }
        }
    }

    /// What no event carries, from one sock_diag lookup of the socket (see
    /// [`needs_diag_facts`]): whether an IPv6 wildcard listener takes IPv4 too (`*:80`, as ss
    /// prints it) or not (`[::]:80`), and the interface a socket is bound to (`%eth0`).
    /// Returns whether the socket is IPV6_V6ONLY.
    fn learn_from_diag(&mut self, new: &Transition) -> bool {
        let change = &new.change;
        let Some(cookie) = change.cookie else { return false };
        let remote =
            if change.new == TcpState::Listen { (change.remote.0, 0) } else { change.remote };
        let found = self.look_up_tcp(change.netns, change.family, change.local, remote).flatten();
        let Some(row) = found.filter(|row| row.cookie == cookie) else { return false };
        self.table.learn_from_diag(&row);
        row.v6only
    }

    /// Adds the namespaces a /proc scan finds to the known ones.
    fn learn_namespaces(&mut self) {
        self.namespaces.extend(network_namespaces().into_iter().map(|ns| (ns.inode, ns)));
    }

    fn push_transitions(&mut self, transitions: Vec<Transition>, out: &mut Vec<StreamRecord>) {
        for cookie in transitions.iter().filter_map(|t| t.change.cookie) {
            self.table.mark_changed(cookie);
        }
        out.extend(
            transitions.iter().map(|t| StreamRecord::Transition(Box::new(self.record_of(t)))),
        );
    }

    /// The stream's record of a transition, with its owner's workload.
    fn record_of(&self, transition: &Transition) -> TransitionRecord {
        let mut record = TransitionRecord::new(transition, &self.clock);
        let cgroup = transition.owner.as_ref().map_or(0, |owner| owner.cgroup_id);
        record.workload = self.workloads.of(cgroup);
        record
    }

    /// A `lost` record per reason whose count grew since the previous report; and the table
    /// rebuilt once the loss has stopped, or at once when `now` is set (a question is being
    /// answered, and its answer must not rest on a table that missed events).
    fn check_losses(&mut self, out: &mut Vec<StreamRecord>, now: bool) -> anyhow::Result<()> {
        // Let go of the namespaces the lookup sockets pin (a deleted one lives on until then).
        self.diag = DiagSockets::default();
        let counts = LossCounts {
            ring_buffer_full: self.ring.lost().context("reading the lost-event counter")?,
            malformed: self.reader.malformed,
            skipped: self.skipped.read(),
        };
        let time = self.clock.wall(WallClock::monotonic_now_ns());
        let verdict = self.losses.check(counts, now, time);
        if verdict.resync {
            self.resync();
        }
        out.extend(verdict.records.into_iter().map(StreamRecord::Lost));
        Ok(())
    }
}

/// Which new sockets get a sock_diag lookup for the facts no event carries: every new
/// listener (IPV6_V6ONLY; SO_BINDTODEVICE), and every connection with an IPv6 link-local
/// address, which is always bound to its interface. Both are rare, so this costs little. A
/// connection bound to a device by SO_BINDTODEVICE alone is not looked up: its interface is
/// shown only by snapshots.
fn needs_diag_facts(transition: &Transition) -> bool {
    let change = &transition.change;
    change.new == TcpState::Listen
        || (change.new == TcpState::Established && is_link_local(change.local.0))
}
