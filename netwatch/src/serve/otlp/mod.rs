//! OTLP export (`netwatch agent --otlp URL`): the stream's records as OTLP [`logs`], the
//! agent's metrics as OTLP [`metrics`], sent over gRPC or HTTP ([`transport`]).
//!
//! The exporter is one more reader of the agent's record queue, the one `watch` clients
//! read: it takes up to [`BATCH`] records or what came in a second, sends them, and reads
//! on. While a send is slow or retried, records wait in that bounded queue; the ones it
//! passes by are counted as dropped (`netwatch_otlp_dropped_records_total`) and reported in
//! the stream (an `export_dropped` record), never kept in memory or slowing the tracing.
mod logs;
mod metrics;
mod transport;

use std::{
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use opentelemetry_proto::tonic::common::v1::KeyValue;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use tokio::sync::broadcast::{self, error::RecvError};

use crate::record::{ExportDroppedRecord, StreamRecord};
use transport::{ExportError, Transport};

/// Records sent in one request at most.
pub const BATCH: usize = 512;
/// How long a record waits for a batch to fill.
const FLUSH: Duration = Duration::from_secs(1);
/// Attempts of one request (the first and three retries, 1, 2 and 4 s apart).
const ATTEMPTS: u32 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// OTLP/gRPC (collectors listen on 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies, to URL/v1/logs and URL/v1/metrics (4318).
    Http,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub endpoint: reqwest::Url,
    pub protocol: Protocol,
    /// Sent with every request (`authorization`, a tenant id).
    pub headers: Vec<(String, String)>,
    /// A CA to trust for an `https` endpoint, besides the system's.
    pub ca_certificate: Option<PathBuf>,
    pub metrics_interval: Duration,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

/// The exporter's own counts, registered with the agent's metrics.
#[derive(Clone, Default)]
pub struct Counters {
    exported: Counter,
    dropped: Family<DropLabels, Counter>,
    failed_requests: Counter,
    /// Every record dropped, for the stream's reports.
    dropped_total: Arc<AtomicU64>,
}

impl Counters {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "otlp_exported_records",
            "Stream records the OTLP collector accepted",
            self.exported.clone(),
        );
        registry.register(
            "otlp_dropped_records",
            "Stream records not exported: queue_full (the collector was slower than the \
             stream), lagged (the record queue passed the exporter by; it may count live \
             views' row updates too), failed (retries ran out), refused (the collector \
             rejected them)",
            self.dropped.clone(),
        );
        registry.register(
            "otlp_failed_requests",
            "OTLP requests that failed, retried ones included",
            self.failed_requests.clone(),
        );
    }

    fn drop_records(&self, reason: &'static str, count: u64) {
        self.dropped.get_or_create(&DropLabels { reason }).inc_by(count);
        self.dropped_total.fetch_add(count, Ordering::Relaxed);
    }
}

/// The agent's metrics exposition, asked of its main loop.
pub type MetricsText = Box<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send>;

/// The running exporter, as the main loop sees it: what it dropped, to report.
pub struct Exporter {
    counters: Counters,
    reported: u64,
    reported_at: std::time::Instant,
    task: tokio::task::JoinHandle<()>,
}

/// How long the agent waits at exit for the last records to be sent.
const SHUTDOWN: Duration = Duration::from_secs(5);

/// The node's resource: service, host, and what the environment says (`NODE_NAME` from a
/// DaemonSet's downward API, `OTEL_RESOURCE_ATTRIBUTES`).
fn resource() -> Vec<KeyValue> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut attributes = vec![
        logs::string("service.name", "netwatch"),
        logs::string("service.version", env!("CARGO_PKG_VERSION")),
        logs::string("host.name", host.trim()),
    ];
    if let Ok(node) = std::env::var("NODE_NAME") {
        attributes.push(logs::string("k8s.node.name", node));
    }
    if let Ok(extra) = std::env::var("OTEL_RESOURCE_ATTRIBUTES") {
        for pair in extra.split(',').filter_map(|p| p.split_once('=')) {
            attributes.retain(|kv| kv.key != pair.0.trim());
            attributes.push(logs::string(pair.0.trim(), pair.1.trim()));
        }
    }
    attributes
}

fn now_ns() -> u64 {
    chrono::Utc::now().timestamp_nanos_opt().map_or(0, |ns| ns.max(0) as u64)
}

impl Exporter {
    /// Checks `options` and starts exporting the records `records` receives (`record_of`
    /// picks the stream records out of what the queue carries) and, every
    /// `metrics_interval`, the exposition `metrics_text` gives.
    pub fn start<T: Send + Sync + 'static>(
        options: &Options,
        counters: Counters,
        records: broadcast::Receiver<Arc<T>>,
        record_of: fn(&T) -> Option<&StreamRecord>,
        metrics_text: MetricsText,
    ) -> anyhow::Result<Exporter> {
        // reqwest is built without a default TLS provider (see the workspace manifest).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let transport = Transport::new(options)?;
        let task = Task {
            transport: Arc::new(transport),
            counters: counters.clone(),
            resource: Arc::new(resource()),
            started: now_ns(),
        };
        let task =
            tokio::spawn(task.run(records, record_of, metrics_text, options.metrics_interval));
        Ok(Exporter { counters, reported: 0, reported_at: std::time::Instant::now(), task })
    }

    /// Once the record queue is closed (the agent stops): waits, at most `SHUTDOWN`, for the
    /// records still waiting to be sent.
    pub async fn finish(self) {
        if tokio::time::timeout(SHUTDOWN, self.task).await.is_err() {
            tracing::warn!("OTLP: records still unsent after {SHUTDOWN:?} at exit were dropped");
        }
    }

    /// An `export_dropped` record for what was dropped since the last one, at most once a
    /// second.
    pub fn report(&mut self, out: &mut Vec<StreamRecord>) {
        let total = self.counters.dropped_total.load(Ordering::Relaxed);
        if total > self.reported && self.reported_at.elapsed() >= FLUSH {
            out.push(StreamRecord::ExportDropped(ExportDroppedRecord {
                time: chrono::Utc::now(),
                destination: "otlp".into(),
                count: total - self.reported,
                total,
            }));
            self.reported = total;
            self.reported_at = std::time::Instant::now();
        }
    }
}

/// Sends one request at a time of each kind, on tasks of their own, while records keep
/// being read: so a stalled collector is seen as records dropped at once, not later.
struct Task {
    transport: Arc<Transport>,
    counters: Counters,
    resource: Arc<Vec<KeyValue>>,
    started: u64,
}

/// Records waiting for the request in flight to finish, at most: a collector that stalls
/// costs these and one batch, and drops the rest.
const PENDING: usize = 8 * BATCH;

type Sending = Option<tokio::task::JoinHandle<()>>;

/// Waits for the send in flight, if any; pending forever otherwise.
async fn finished(sending: &mut Sending) {
    match sending {
        Some(handle) => {
            let _ = handle.await;
            *sending = None;
        }
        None => std::future::pending().await,
    }
}

impl Task {
    async fn run<T: Send + Sync + 'static>(
        self,
        mut records: broadcast::Receiver<Arc<T>>,
        record_of: fn(&T) -> Option<&StreamRecord>,
        metrics_text: MetricsText,
        metrics_interval: Duration,
    ) {
        let mut pending: Vec<Arc<T>> = Vec::with_capacity(BATCH);
        let (mut logs_sending, mut metrics_sending): (Sending, Sending) = (None, None);
        let mut flush = tokio::time::interval(FLUSH);
        let mut metrics_tick = tokio::time::interval(metrics_interval);
        let mut tick_seen = false;
        loop {
            tokio::select! {
                received = records.recv() => match received {
                    // Its own reports of drops are not sent where the drops happen.
                    Ok(item) if record_of(&item).is_none_or(|r| matches!(r, StreamRecord::ExportDropped(_))) => {}
                    Ok(item) if pending.len() < PENDING => pending.push(item),
                    Ok(_) => self.counters.drop_records("queue_full", 1),
                    // The queue passed it by: records, and perhaps live views' row updates,
                    // which it would not have sent (the queue does not say which).
                    Err(RecvError::Lagged(missed)) => self.counters.drop_records("lagged", missed),
                    Err(RecvError::Closed) => break,
                },
                _ = flush.tick() => tick_seen = true,
                () = finished(&mut logs_sending) => {}
                _ = metrics_tick.tick() => {
                    if metrics_sending.as_ref().is_none_or(|h| h.is_finished()) {
                        let text = metrics_text().await;
                        let request = metrics::request(&text, &self.resource, self.started, now_ns());
                        let (transport, counters) = (self.transport.clone(), self.counters.clone());
                        metrics_sending = Some(tokio::spawn(async move {
                            let sent = retrying(&counters, || transport.metrics(&request)).await;
                            if let Err(error) = sent {
                                warn(&format!("OTLP metrics not exported: {error}"));
                            }
                        }));
                    }
                }
            }
            // A batch when the last one is done: a full one at once, else at each tick.
            let due = pending.len() >= BATCH || tick_seen;
            if logs_sending.is_none() && due && !pending.is_empty() {
                tick_seen = false;
                let take = pending.len().min(BATCH);
                let batch: Vec<Arc<T>> = pending.drain(..take).collect();
                logs_sending = Some(self.send_logs(batch, record_of));
            }
        }
        // The agent is stopping: what waits is sent, one batch after another.
        finished(&mut logs_sending).await;
        while !pending.is_empty() {
            let take = pending.len().min(BATCH);
            let batch: Vec<Arc<T>> = pending.drain(..take).collect();
            let _ = self.send_logs(batch, record_of).await;
        }
    }

    fn send_logs<T: Send + Sync + 'static>(
        &self,
        batch: Vec<Arc<T>>,
        record_of: fn(&T) -> Option<&StreamRecord>,
    ) -> tokio::task::JoinHandle<()> {
        let (transport, counters) = (self.transport.clone(), self.counters.clone());
        let resource = self.resource.clone();
        // Only records are pending (see `run`).
        let count = batch.len() as u64;
        tokio::spawn(async move {
            // Encoded off the event loop's thread, which drains the kernel's ring.
            let encoded = tokio::task::spawn_blocking(move || {
                let records: Vec<&StreamRecord> =
                    batch.iter().filter_map(|item| record_of(item)).collect();
                logs::request(&records, &resource, now_ns())
            })
            .await;
            let Ok(request) = encoded else {
                counters.drop_records("failed", count);
                return;
            };
            match retrying(&counters, || transport.logs(&request)).await {
                Ok(rejected) => {
                    let rejected = rejected.min(count);
                    counters.exported.inc_by(count - rejected);
                    if rejected > 0 {
                        counters.drop_records("refused", rejected);
                        warn(&format!("the OTLP collector rejected {rejected} of {count} records"));
                    }
                }
                Err(error) => {
                    let reason = match error {
                        ExportError::Transient(_) => "failed",
                        ExportError::Refused(_) => "refused",
                    };
                    counters.drop_records(reason, count);
                    warn(&format!("{count} records not exported over OTLP: {error}"));
                }
            }
        })
    }
}

/// `send`, tried again after 1, 2 and 4 s while it fails in a way worth retrying.
async fn retrying<R, F: Future<Output = Result<R, ExportError>>>(
    counters: &Counters,
    send: impl Fn() -> F,
) -> Result<R, ExportError> {
    let mut attempt = 0;
    loop {
        let result = send().await;
        if result.is_err() {
            counters.failed_requests.inc();
        }
        attempt += 1;
        match result {
            Err(ExportError::Transient(_)) if attempt < ATTEMPTS => {
                tokio::time::sleep(Duration::from_secs(1 << (attempt - 1))).await;
            }
            other => return other,
        }
    }
}

/// At most one warning a minute: a collector that is down says so once, not per batch.
fn warn(message: &str) {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
        tracing::warn!("{message}");
        *last = Some(std::time::Instant::now());
    }
}
