//! The agent's options: where it serves, what it keeps, what it logs and exports.
use std::path::PathBuf;

use clap::Args;

use super::{parse_duration, parse_ring_size};
use crate::{
    kernel::loader::{LoadOptions, SourceChoice},
    serve::api,
    serve::eventlog::{self, LogOptions},
};

/// `--log`: where and how much to keep of every stream record.
#[derive(Clone, Debug, Args)]
pub struct LogArgs {
    /// Append every record (NDJSON, one line each, "v":1) to this file.
    #[arg(long, value_name = "PATH")]
    pub log: Option<PathBuf>,
    /// Rotate the log when it would grow past this size (K, M, G).
    #[arg(long, value_name = "SIZE", default_value = "100M", value_parser = eventlog::parse_size)]
    pub log_max_size: u64,
    /// How many rotated logs to keep (PATH.1 .. PATH.N).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub log_keep: u32,
}

impl LogArgs {
    pub fn options(&self) -> Option<LogOptions> {
        let path = self.log.clone()?;
        Some(LogOptions { path, max_size: self.log_max_size, keep: self.log_keep })
    }
}

#[derive(Clone, Debug, Args)]
pub struct AgentArgs {
    /// The API socket (created mode 0600; its directory 0700 if netwatch creates it).
    #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// TCP state source: tp_btf (needs BTF), the classic tracepoint, or auto.
    #[arg(long, value_enum, default_value_t = SourceChoice::Auto)]
    pub source: SourceChoice,
    /// Ring buffer size in bytes: a power of two, at least 4096.
    #[arg(long, value_name = "BYTES", value_parser = parse_ring_size)]
    pub ring_size: Option<u32>,
    #[command(flatten)]
    pub log: LogArgs,
    /// Closed connections whose history is kept.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub history_keep: usize,
    /// How long a closed connection's history is kept, e.g. 30m, 2h.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub history_max_age: chrono::Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics (default 127.0.0.1:9911; any other
    /// address only when given).
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:9911")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Serve the metrics over TLS with this PEM certificate chain (and --metrics-tls-key).
    #[arg(long, value_name = "PATH", requires_all = ["metrics", "metrics_tls_key"])]
    pub metrics_tls_cert: Option<PathBuf>,
    /// The PEM private key of --metrics-tls-cert.
    #[arg(long, value_name = "PATH", requires = "metrics_tls_cert")]
    pub metrics_tls_key: Option<PathBuf>,
    /// Answer only scrapes with `Authorization: Bearer TOKEN`, TOKEN read from this file.
    #[arg(long, value_name = "PATH", requires = "metrics")]
    pub metrics_token_file: Option<PathBuf>,
    /// Scheduling priority (nice value, -20..19). The default -10 lets the agent drain the
    /// ring buffer on a host whose CPUs are busy with the very traffic it traces; at 0 it
    /// waited for a CPU long enough to lose events (cargo xtask bench).
    #[arg(long, value_name = "N", default_value_t = -10, allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-20..=19))]
    pub nice: i32,
    /// Also count connects, failures and retransmits per remote endpoint (IP:PORT) in the
    /// metrics, for the first N endpoints seen; later ones are counted as remote="other".
    #[arg(long, value_name = "N", default_value_t = 0, requires = "metrics")]
    pub metrics_remotes: usize,
    /// The cgroup2 hierarchy to attach to and name containers from: a mount of the host's
    /// root (in a container with its own cgroup namespace, the host's /sys/fs/cgroup
    /// mounted elsewhere). Default: the first cgroup2 mount.
    #[arg(long, value_name = "PATH")]
    pub cgroup_root: Option<PathBuf>,
    /// Also send every record as an OTLP log, and the metrics as OTLP metrics, to this
    /// collector (http://HOST:4318 for --otlp-protocol http, http://HOST:4317 for grpc;
    /// https:// for TLS).
    #[arg(long, value_name = "URL")]
    pub otlp: Option<reqwest::Url>,
    #[arg(long, value_enum, default_value_t = crate::serve::otlp::Protocol::Http, requires = "otlp")]
    pub otlp_protocol: crate::serve::otlp::Protocol,
    /// A header sent with every OTLP request, e.g. `authorization=Bearer TOKEN`; repeatable.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_header, requires = "otlp")]
    pub otlp_header: Vec<(String, String)>,
    /// A PEM CA certificate to trust for an https:// collector, besides the system's.
    #[arg(long, value_name = "PATH", requires = "otlp")]
    pub otlp_ca_certificate: Option<PathBuf>,
    /// How often the metrics are sent over OTLP.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration,
          requires = "otlp")]
    pub otlp_metrics_interval: chrono::Duration,
    /// Also ask the Kubernetes API, every 30 s and never on the event path, for this node's
    /// pods: their names, `app` label and controller, and their containers' names (RBAC:
    /// `list` on pods).
    #[arg(long)]
    pub kube: bool,
    /// The API server (default: the in-cluster one, from KUBERNETES_SERVICE_HOST/PORT).
    #[arg(long, value_name = "URL", requires = "kube")]
    pub kube_api: Option<reqwest::Url>,
    /// This node's name, whose pods are listed.
    #[arg(long, value_name = "NAME", env = "NODE_NAME", requires = "kube")]
    pub kube_node: Option<String>,
    /// The bearer token (default: the pod's service account token).
    #[arg(long, value_name = "PATH", requires = "kube")]
    pub kube_token_file: Option<PathBuf>,
    /// The API server's CA (default: the service account's ca.crt).
    #[arg(long, value_name = "PATH", requires = "kube")]
    pub kube_ca_certificate: Option<PathBuf>,
    /// Where the kubelet keeps pods/ and containers/ (pod and container names).
    #[arg(long, value_name = "DIR", default_value = crate::host::workload::KUBELET_LOGS)]
    pub kubelet_logs: PathBuf,
    /// Also count, for the protocol counters netwatch can attribute (`netwatch counters`),
    /// the increments each process and endpoint caused, for the first N such pairs seen;
    /// later ones are counted as comm="other", endpoint="other".
    #[arg(long, value_name = "N", default_value_t = 0, requires = "metrics")]
    pub metrics_causes: usize,
    /// Also count connects, failures and retransmits per Kubernetes namespace, pod and
    /// container (or container id, or systemd unit) of the owner, for the first N seen;
    /// later ones are counted as namespace="other", pod="other", container="other".
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub metrics_workloads: usize,
}

impl AgentArgs {
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions { source: self.source, ring_size: self.ring_size }
    }

    /// None without `--kube`; an error line when the node is not named.
    pub fn kube_options(&self) -> Option<crate::host::kube::Options> {
        self.kube.then(|| crate::host::kube::Options {
            api: self.kube_api.clone(),
            node: self.kube_node.clone().unwrap_or_default(),
            token_file: self.kube_token_file.clone(),
            ca_certificate: self.kube_ca_certificate.clone(),
        })
    }

    pub fn otlp_options(&self) -> Option<crate::serve::otlp::Options> {
        Some(crate::serve::otlp::Options {
            endpoint: self.otlp.clone()?,
            protocol: self.otlp_protocol,
            headers: self.otlp_header.clone(),
            ca_certificate: self.otlp_ca_certificate.clone(),
            metrics_interval: self
                .otlp_metrics_interval
                .to_std()
                .unwrap_or_default()
                .max(std::time::Duration::from_secs(1)),
        })
    }
}

/// `KEY=VALUE`.
fn parse_header(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}' is not KEY=VALUE (e.g. authorization=Bearer TOKEN)"))?;
    Ok((key.trim().to_string(), value.trim().to_string()))
}
