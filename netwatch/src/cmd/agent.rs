//! `netwatch agent`: loads the programs once, keeps the socket table current from events, and
//! serves the stream and the table on the local API socket (`api`) to any number of
//! `netwatch watch` / `netwatch table` clients, until SIGTERM/SIGINT.
//!
//! Each client gets its own task and a bounded queue (a tokio broadcast receiver): a slow
//! client is told how many records it missed, in-stream, and never holds up the others; a
//! client that connects and sends nothing is dropped after a short timeout. A `live` client
//! (`netwatch top`) also gets the table's changed rows, at most ten times a second, which
//! the table notes only while such a client is connected.
use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader, BufWriter},
    net::{UnixListener, UnixStream},
    sync::{broadcast, mpsc, oneshot},
};

use crate::{
    cli::{AgentArgs, TableSelect},
    cmd::watch::Signals,
    host::{services::Services, snapshot::SocketRow},
    query::select::Selection,
    record::{Listed, LossReason, LossRecord, RowsChange, StreamRecord, WallClock},
    recorded::TableReason,
    serve::api::{self, Command, Request, SocketFile, Update},
    serve::eventlog::Logging,
    serve::metrics::{self, Metrics},
    serve::{self, otlp},
    state::attribution::{self, Attribution},
    state::history::{Histories, History, Retention},
    state::stats::{Report, Stats, listener_summaries},
    state::tracer::{Scope, Tracer},
};

/// Records a client may fall behind by before it starts missing some.
const CLIENT_QUEUE: usize = 65_536;
/// How long a new client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often at most `live` clients are sent the table's changed rows.
const ROWS_INTERVAL: Duration = Duration::from_millis(100);

/// What the main loop hands the client tasks, in the order it happened.
enum Outgoing {
    Record(StreamRecord),
    /// For `live` clients only.
    Rows(RowsChange),
}

impl Outgoing {
    fn record(&self) -> Option<&StreamRecord> {
        match self {
            Outgoing::Record(record) => Some(record),
            Outgoing::Rows(_) => None,
        }
    }
}

/// Everything the main loop answers clients from.
struct Clients {
    sender: broadcast::Sender<Arc<Outgoing>>,
    /// Each `live` client holds a strong reference (upgraded from the weak one every client
    /// task gets): while some do, the table notes its changes.
    live: Arc<()>,
    rows_sent: tokio::time::Instant,
}

impl Clients {
    /// Sends the rows changed since the last time to `live` clients; stops noting changes
    /// once none is left.
    fn send_rows(&mut self, tracer: &mut Tracer) {
        if Arc::strong_count(&self.live) == 1 {
            tracer.track_changes(false);
            return;
        }
        let change = tracer.take_changes();
        self.rows_sent = tokio::time::Instant::now();
        if !change.upsert.is_empty() || !change.gone.is_empty() || change.full {
            let _ = self.sender.send(Arc::new(Outgoing::Rows(change)));
        }
    }
}

pub async fn run(args: &AgentArgs) -> anyhow::Result<()> {
    let mut signals = Signals::install()?;
    // A second agent fails before touching the kernel; the socket itself is made only once
    // the programs are attached, so that a client never waits on an agent not ready yet.
    api::check_free(&args.socket)?;
    // A log that cannot be opened stops the agent before it touches the kernel.
    let mut log = Logging::start(args.log.options())?;

    if let Some(root) = &args.cgroup_root {
        anyhow::ensure!(
            root.join("cgroup.controllers").is_file(),
            "--cgroup-root {}: not a cgroup2 mount (it has no cgroup.controllers); give the \
             host's cgroup2 hierarchy, e.g. /sys/fs/cgroup",
            root.display()
        );
        crate::host::cgroup::set_root(root.clone());
    }
    let (sender, _) = broadcast::channel::<Arc<Outgoing>>(CLIENT_QUEUE);
    let (table_requests, mut table_queue) = mpsc::channel::<Query>(64);
    let otlp_counters = otlp::Counters::default();
    // Before loading: a bad header or CA file stops the start.
    let mut exporter = match args.otlp_options() {
        Some(options) => {
            let queries = table_requests.clone();
            let metrics_text: otlp::MetricsText = Box::new(move || {
                let queries = queries.clone();
                Box::pin(async move { ask_main_loop(&queries, Query::Metrics).await })
            });
            let records = sender.subscribe();
            Some(otlp::Exporter::start(
                &options,
                otlp_counters.clone(),
                records,
                Outgoing::record,
                metrics_text,
            )?)
        }
        None => None,
    };
    let kube = match args.kube_options() {
        Some(options) => Some(crate::host::kube::start(&options)?),
        None => None,
    };
    let mut tracer = Tracer::start(&args.load_options())?
        .keeping_rows()
        .naming_pods(args.kubelet_logs.clone(), kube);
    let listener = api::bind(&args.socket)?;
    let socket_file = SocketFile(args.socket.clone());
    listener.set_nonblocking(true).context("configuring the agent socket")?;
    let listener = UnixListener::from_std(listener).context("registering the agent socket")?;
    set_priority(args.nice);
    let mut clients =
        Clients { sender, live: Arc::new(()), rows_sent: tokio::time::Instant::now() };
    // Port names in table filters; a changed /etc/services is read at the next start.
    let services = Arc::new(Services::load());
    let log_path =
        args.log.log.as_ref().map(|p| Arc::new(std::path::absolute(p).unwrap_or(p.clone())));
    let mut stats = Stats::new();
    let mut histories =
        Histories::new(Retention { count: args.history_keep, max_age: args.history_max_age });
    if let Some(snapshot) = tracer.take_snapshot() {
        histories.seed(&snapshot);
    }
    let mut records = Vec::new();
    // The log begins with the table, so that a reader knows what was open before its events.
    log.set_clock(tracer.clock());
    records.extend(log.write_table(TableReason::Start, || every_row(&mut tracer)));
    super::release_freed_memory();
    let mut attribution = Attribution::default();
    let counters_at_start = attribution::Account {
        started: Some(chrono::Utc::now()),
        netns: own_netns(),
        baseline: crate::host::counters::Counters::read_here().ok().map(|c| c.by_key()),
        ..attribution::Account::default()
    };
    let mut metrics = Metrics::new(args.metrics_remotes, args.metrics_causes);
    if exporter.is_some() {
        metrics.register_otlp(&otlp_counters);
    }
    metrics.count_workloads(args.metrics_workloads);
    let guard = serve::scrape::Guard::new(
        args.metrics_tls_cert.as_deref().zip(args.metrics_tls_key.as_deref()),
        args.metrics_token_file.as_deref(),
    )?;
    if let Some(address) = args.metrics.filter(|a| !a.ip().is_loopback()) {
        if guard.is_open() {
            tracing::warn!(
                "metrics on {address} with neither TLS nor a token: whoever reaches it reads \
                 this host's connections (--metrics-tls-cert, --metrics-token-file)"
            );
        } else if guard.token_in_clear() {
            tracing::warn!(
                "metrics on {address} with a token but no TLS: the token crosses the network \
                 in clear (--metrics-tls-cert)"
            );
        }
    }
    let metrics_listener = match args.metrics {
        Some(address) => Some(metrics::bind(address).await?),
        None => None,
    };
    // The address actually bound: `--metrics 127.0.0.1:0` picks a free port.
    let metrics_at = metrics_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|address| {
            let scheme = if args.metrics_tls_cert.is_some() { "https" } else { "http" };
            format!("; metrics on {scheme}://{address}/metrics")
        })
        .unwrap_or_default();
    eprintln!(
        "netwatch agent: tracing via {}; serving {}{metrics_at}",
        tracer.describe(),
        args.socket.display()
    );
    loop {
        tokio::select! {
            _ = signals.stop() => break,
            Some(scrape) = accept_scrape(metrics_listener.as_ref()) => {
                tokio::spawn(serve_metrics(scrape, guard.clone(), table_requests.clone()));
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let client = serve(stream, clients.sender.subscribe(), Arc::downgrade(&clients.live), table_requests.clone(), services.clone(), log_path.clone());
                    tokio::spawn(client);
                }
                Err(error) => tracing::warn!("accepting an API client: {error}"),
            },
            Some(query) = table_queue.recv() => {
                // Answer with every event the kernel has queued so far applied: what the user
                // did just before asking must be in the answer.
                let scope = match &query {
                    Query::Table(_, Some(selection)) => selection.scope(),
                    Query::Live(_) => Scope::LIVE,
                    // One connection's history (top's detail, asked every second while
                    // open): its events, not a dump of every timewait socket.
                    Query::History(_, Some(_)) | Query::Counters(..) => Scope::NONE,
                    _ => Scope::ALL,
                };
                let left_out = tracer.settle(&mut records, scope)?;
                absorb(&mut records, (&mut log, &mut tracer), &metrics, (&mut stats, &mut histories, &mut attribution), &clients.sender);
                reconcile(&mut tracer, &mut histories, &mut log, &mut records);
                // The client may have gone; nothing to do then.
                match query {
                    Query::Table(reply, selection) => {
                        let keep_row = |row: &SocketRow| {
                            !left_out.contains(&row.cookie)
                                && selection.as_ref().is_none_or(|s| s.keeps_row(row))
                        };
                        let keep = |listed: &Listed| selection.as_ref().is_none_or(|s| s.keeps(listed));
                        let _ = reply.send(tracer.listed_with_half_open(scope, keep_row, keep));
                    }
                    Query::Stats(reply) => {
                        let mut report = stats.report();
                        let listeners = tracer.listeners();
                        let kernel = tracer.passive_sockets(&listeners);
                        report.listeners = listener_summaries(listeners, kernel.as_deref());
                        let _ = reply.send(report);
                    }
                    Query::Metrics(reply) => { let _ = reply.send(metrics.render(&tracer.counts(), tracer.health())); }
                    Query::History(reply, cookie) => {
                        histories.expire(chrono::Utc::now());
                        let mut list = match cookie {
                            Some(cookie) => histories.of(cookie),
                            None => histories.all(),
                        };
                        for history in list.iter_mut().filter(|h| h.workload.is_none()) {
                            let cgroup = history.snapshot_owner.as_ref().map_or(0, |o| o.cgroup_id);
                            history.workload = tracer.workload(cgroup);
                        }
                        let _ = reply.send(list);
                    }
                    Query::Counters(reply, since, netns) => {
                        let _ = reply.send(account(&attribution, &counters_at_start, since, netns));
                    }
                    Query::Live(reply) => {
                        // Rows changed before this table go to the live clients already
                        // there; the new one starts from the table and misses nothing after.
                        if tracer.has_changes() {
                            clients.send_rows(&mut tracer);
                        }
                        tracer.track_changes(true);
                        let rows = tracer.listed_with_half_open(scope, |_| true, |_| true);
                        let _ = reply.send(Some((rows, clients.sender.subscribe())));
                    }
                }
            }
            _ = tokio::time::sleep_until(clients.rows_sent + ROWS_INTERVAL), if tracer.has_changes() => {
                clients.send_rows(&mut tracer);
            }
            next = tracer.next(&mut records) => {
                next?;
                if let Some(exporter) = &mut exporter {
                    exporter.report(&mut records);
                }
                absorb(&mut records, (&mut log, &mut tracer), &metrics, (&mut stats, &mut histories, &mut attribution), &clients.sender);
                reconcile(&mut tracer, &mut histories, &mut log, &mut records);
            }
        }
    }
    tracer.finish(&mut records)?;
    absorb(
        &mut records,
        (&mut log, &mut tracer),
        &metrics,
        (&mut stats, &mut histories, &mut attribution),
        &clients.sender,
    );
    drop(clients);
    // The record queue is closed: the exporter sends what still waits.
    if let Some(exporter) = exporter {
        exporter.finish().await;
    }
    drop(socket_file);
    Ok(())
}

/// The next connection to the metrics endpoint, if there is one; pending forever otherwise.
async fn accept_scrape(
    listener: Option<&tokio::net::TcpListener>,
) -> Option<tokio::net::TcpStream> {
    match listener {
        Some(listener) => listener.accept().await.ok().map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

/// A question for the main loop, which owns the table and the statistics.
enum Query {
    /// The rows the selection keeps, or all of them.
    Table(oneshot::Sender<Vec<Listed>>, Option<Selection>),
    Stats(oneshot::Sender<Report>),
    Metrics(oneshot::Sender<String>),
    /// Every history, or the one with this cookie.
    History(oneshot::Sender<Vec<History>>, Option<u64>),
    /// The table, and a receiver of everything after it.
    Live(oneshot::Sender<Option<LiveStart>>),
    /// Who moved the counters since then (or since the start).
    Counters(
        oneshot::Sender<attribution::Account>,
        Option<chrono::DateTime<chrono::Utc>>,
        Option<u32>,
    ),
}

/// A `live` client's start: the table, and a receiver of everything after it.
type LiveStart = (Vec<Listed>, broadcast::Receiver<Arc<Outgoing>>);

/// Asks the main loop (which owns the table and the statistics) and waits for its answer;
/// the empty answer if the agent is stopping.
async fn ask_main_loop<T: Default>(
    queries: &mpsc::Sender<Query>,
    question: impl FnOnce(oneshot::Sender<T>) -> Query,
) -> T {
    let (reply, answer) = oneshot::channel();
    match queries.send(question(reply)).await {
        Ok(()) => answer.await.unwrap_or_default(),
        Err(_) => T::default(),
    }
}

/// What a client's table request selects; the error line's text when its filter is bad.
fn parse_selection(select: &TableSelect, services: &Services) -> Result<Selection, String> {
    Selection::new(select, services).map_err(|e| format!("bad filter: {e}"))
}

/// Writes `value` as one JSON line. A table or history of 100k rows takes tens of
/// milliseconds to serialize: that is done on a blocking thread, so that the event loop (this
/// runtime's one thread) goes on draining the kernel meanwhile.
async fn write_json_line(
    write: &mut BufWriter<tokio::net::unix::OwnedWriteHalf>,
    value: impl serde::Serialize + Send + 'static,
) -> std::io::Result<()> {
    let json = tokio::task::spawn_blocking(move || {
        serde_json::to_string(&value).unwrap_or_else(|e| api::error_line(&e.to_string()))
    });
    let line = json.await.unwrap_or_else(|e| api::error_line(&e.to_string())) + "\n";
    write.write_all(line.as_bytes()).await?;
    write.flush().await
}

/// One scrape of the metrics endpoint.
async fn serve_metrics(
    stream: tokio::net::TcpStream,
    guard: serve::scrape::Guard,
    queries: mpsc::Sender<Query>,
) {
    guard.serve(stream, || ask_main_loop(&queries, Query::Metrics)).await;
}

/// One client connection: read its request, then answer it.
async fn serve(
    stream: UnixStream,
    records: broadcast::Receiver<Arc<Outgoing>>,
    live: std::sync::Weak<()>,
    table_requests: mpsc::Sender<Query>,
    services: Arc<Services>,
    log_path: Option<Arc<PathBuf>>,
) {
    let (read, write) = stream.into_split();
    let mut write = BufWriter::new(write);
    let mut line = Vec::new();
    let limit = api::MAX_REQUEST_BYTES as u64 + 1;
    let read = tokio::time::timeout(
        REQUEST_TIMEOUT,
        BufReader::new(read.take(limit)).read_until(b'\n', &mut line),
    )
    .await;
    let request = match read {
        Err(_) => Err("no request within 5 s".to_string()),
        Ok(Err(error)) => Err(format!("reading the request: {error}")),
        Ok(Ok(_)) => Request::parse(line.strip_suffix(b"\n").unwrap_or(&line)),
    };
    // Subscribed at accept, so that a watch misses nothing from its connect on; anyone else's
    // receiver would only hold records until its answer is written.
    let records = matches!(request, Ok(Request { command: Command::Watch, .. })).then_some(records);
    let result = match request {
        Ok(Request { command: Command::Watch, .. }) => match records {
            Some(records) => stream_records(&mut write, records, None).await,
            None => Ok(()),
        },
        Ok(Request { command: Command::Live, .. }) => {
            // Held while the client is served: the main loop notes row changes meanwhile.
            let _live = live.upgrade();
            match ask_main_loop(&table_requests, Query::Live).await {
                Some((rows, records)) => match write_json_line(&mut write, rows).await {
                    Ok(()) => stream_records(&mut write, records, Some(&table_requests)).await,
                    Err(error) => Err(error),
                },
                None => Ok(()),
            }
        }
        Ok(Request { command: Command::Table { select }, .. }) => {
            match select.map(|select| parse_selection(&select, &services)) {
                Some(Err(message)) => {
                    let reply = api::error_line(&message) + "\n";
                    write.write_all(reply.as_bytes()).await.and(write.flush().await)
                }
                selected => {
                    let selected = selected.and_then(Result::ok);
                    let rows = ask_main_loop(&table_requests, |r| Query::Table(r, selected)).await;
                    write_json_line(&mut write, rows).await
                }
            }
        }
        Ok(Request { command: Command::Log, .. }) => {
            write_json_line(&mut write, serde_json::json!({ "path": log_path.as_deref() })).await
        }
        Ok(Request { command: Command::Stats, .. }) => {
            let report = ask_main_loop(&table_requests, Query::Stats).await;
            write_json_line(&mut write, report).await
        }
        Ok(Request { command: Command::Counters { since, netns }, .. }) => {
            let report = ask_main_loop(&table_requests, |r| Query::Counters(r, since, netns)).await;
            write_json_line(&mut write, report).await
        }
        Ok(Request { command: Command::History { cookie }, .. }) => {
            let histories = ask_main_loop(&table_requests, |r| Query::History(r, cookie)).await;
            write_json_line(&mut write, histories).await
        }
        Err(message) => {
            let reply = api::error_line(&message) + "\n";
            write.write_all(reply.as_bytes()).await.and(write.flush().await)
        }
    };
    if let Err(error) = result {
        tracing::debug!("API client gone: {error}");
    }
}

/// Writes each record as an NDJSON line; for a `live` client (given the main loop's queue)
/// each change of rows too, and after it fell behind a whole new table, since the rows it
/// missed are not sent again.
async fn stream_records(
    write: &mut BufWriter<tokio::net::unix::OwnedWriteHalf>,
    mut records: broadcast::Receiver<Arc<Outgoing>>,
    live: Option<&mpsc::Sender<Query>>,
) -> std::io::Result<()> {
    let clock = WallClock::now();
    let mut missed_total = 0;
    loop {
        let line = match records.recv().await {
            Ok(outgoing) => match &*outgoing {
                Outgoing::Record(record) => record.json(),
                Outgoing::Rows(change) if live.is_some() => Update::rows_line(change),
                Outgoing::Rows(_) => continue,
            },
            Err(broadcast::error::RecvError::Lagged(count)) => {
                missed_total += count;
                let time = clock.wall(WallClock::monotonic_now_ns());
                let loss = LossRecord {
                    time,
                    reason: LossReason::ClientTooSlow,
                    count,
                    total: missed_total,
                };
                let mut line = StreamRecord::Lost(loss).json();
                if let Some(queries) = live
                    && let Some((rows, receiver)) = ask_main_loop(queries, Query::Live).await
                {
                    records = receiver;
                    let table = RowsChange { full: true, upsert: rows, gone: Vec::new() };
                    line.push('\n');
                    line.push_str(&Update::rows_line(&table));
                }
                line
            }
            Err(broadcast::error::RecvError::Closed) => break,
        };
        write.write_all(line.as_bytes()).await?;
        write.write_all(b"\n").await?;
        if records.is_empty() {
            write.flush().await?;
        }
    }
    write.flush().await
}

/// Hands new records to everything the agent keeps or serves: the log (a file it begins
/// starts with the table), metrics, statistics, histories, counter attribution and the
/// stream's subscribers.
fn absorb(
    records: &mut Vec<StreamRecord>,
    (log, tracer): (&mut Logging, &mut Tracer),
    metrics: &Metrics,
    (stats, histories, attribution): (&mut Stats, &mut Histories, &mut Attribution),
    sender: &broadcast::Sender<Arc<Outgoing>>,
) {
    log.write_with_table(records, || every_row(tracer));
    for record in records.iter() {
        metrics.observe(record);
        histories.observe(record);
        attribution.observe(record);
        match record {
            StreamRecord::Transition(t) => stats.record(t),
            StreamRecord::Retransmit(r) => stats.record_retransmit(r),
            StreamRecord::Lost(_) | StreamRecord::LogFailed(_) | StreamRecord::ExportDropped(_) => {
            }
        }
    }
    if sender.receiver_count() == 0 {
        // Nobody is watching: no shared copy to make.
        records.clear();
    }
    for record in records.drain(..) {
        let _ = sender.send(Arc::new(Outgoing::Record(record)));
    }
}

/// After a resync the table was rebuilt from a new snapshot: histories follow it, and the
/// log gets the new table. A failure to log is a record for the next batch.
fn reconcile(
    tracer: &mut Tracer,
    histories: &mut Histories,
    log: &mut Logging,
    records: &mut Vec<StreamRecord>,
) {
    if let Some(snapshot) = tracer.take_snapshot() {
        histories.reconcile(&snapshot, chrono::Utc::now());
        records.extend(log.write_table(TableReason::Resync, || every_row(tracer)));
    }
}

/// Every row of the table, as a `live` client gets it.
fn every_row(tracer: &mut Tracer) -> Vec<Listed> {
    tracer.listed_with_half_open(Scope::LIVE, |_| true, |_| true)
}

/// Who moved the counters in `netns` (every namespace if None) since `since`.
fn account(
    attribution: &Attribution,
    at_start: &attribution::Account,
    since: Option<chrono::DateTime<chrono::Utc>>,
    netns: Option<u32>,
) -> attribution::Account {
    let clock = WallClock::now();
    let since_ns = since.map_or(0, |t| clock.monotonic(t));
    let (attributed, kept) = attribution.since(since_ns, netns);
    let after_start = since.zip(at_start.started).is_some_and(|(since, started)| since >= started);
    attribution::Account {
        attributed,
        counted_from: since.map(|_| clock.wall(since_ns / 1_000_000_000 * 1_000_000_000)),
        complete: kept && after_start,
        ..at_start.clone()
    }
}

/// The inode of the agent's own network namespace (0 if it cannot be read).
fn own_netns() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self/ns/net").map_or(0, |m| m.ino() as u32)
}

/// Sets the agent's nice value; a failure costs only latency under load, so it is a warning.
fn set_priority(nice: i32) {
    // SAFETY: setpriority on our own process has no memory-safety preconditions.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        tracing::warn!(
            "cannot set the agent's nice value to {nice} ({}): it may fall behind and lose \
             events on a busy host",
            std::io::Error::last_os_error()
        );
    }
}
