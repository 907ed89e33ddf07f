//! Command-line arguments, parsed once into the configuration the rest of netwatch uses.
//! Bad values fail here, with clap's one-line error naming the value (exit code 2).
//! netstat's and ss's options typed to `netwatch` itself are first made their subcommand's
//! ([`habits`]).
mod agent;
pub mod habits;
mod recorded;

pub use agent::{AgentArgs, LogArgs};
pub use recorded::{LogQueryArgs, ReplayArgs, StreamFilters, WindowArgs};

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    kernel::events::TcpState,
    kernel::loader::{LoadOptions, SourceChoice},
    output::Format,
    query::stream::TransitionFilter,
    serve::api,
};

#[derive(Debug, Parser)]
#[command(
    name = "netwatch",
    version,
    about = "Live TCP connection tracer: every state transition, with its real owner",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// More diagnostics on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Option<Command>,

    /// With no subcommand: print the stream even on a terminal (as `netwatch watch`).
    #[arg(long, conflicts_with = "top")]
    pub stream: bool,

    /// With no subcommand: the live view even if stream options are given (as `netwatch top`).
    #[arg(long)]
    pub top: bool,

    /// With no subcommand, netwatch runs `top` when stdout is a terminal, and `watch` with
    /// these options when it is not (a pipe, a file) or when one of them is given.
    #[command(flatten)]
    pub watch: WatchArgs,
}

impl Cli {
    /// Whether `netwatch` with no subcommand starts the live view: on a terminal, unless
    /// `--stream` or an option only the stream has (`--json`, `--log`, `--no-header`,
    /// `--state`, `--transition`, a port filter) asks for the stream.
    pub fn default_is_top(&self, stdout_is_terminal: bool) -> bool {
        let w = &self.watch;
        let f = &w.filters;
        let stream_options = w.json
            || w.log.log.is_some()
            || w.no_header
            || f.state.is_some()
            || f.transition.is_some()
            || f.port.is_some()
            || f.sport.is_some()
            || f.dport.is_some();
        self.top || (stdout_is_terminal && !self.stream && !stream_options)
    }

    /// `top`'s options from the default command's (`--pid`, `--comm`, -4/-6, where the
    /// programs come from).
    pub fn default_top(&self) -> TopArgs {
        let w = &self.watch;
        TopArgs {
            select: TableSelect {
                pid: w.filters.pid,
                comm: w.filters.comm.clone(),
                ipv4: w.filters.ipv4,
                ipv6: w.filters.ipv6,
                ..TableSelect::default()
            },
            numeric: false,
            programs: w.programs.clone(),
            replay: w.replay.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// A live full-screen view of every socket, its owner and its state machine (the default
    /// on a terminal).
    Top(TopArgs),
    /// Stream TCP state transitions as they happen (the default when stdout is not a
    /// terminal).
    Watch(WatchArgs),
    /// Read the event log (`agent --log`): its records, filtered as `watch` filters them,
    /// within a stretch of time, even with no agent (a log copied from another machine).
    Log(LogQueryArgs),
    /// Print the socket table, like `ss -tanup` (`netwatch -tanp` is this too).
    #[command(visible_alias = "ls")]
    Table(TableArgs),
    /// The kernel's protocol counters (netstat -s, nstat): what changed since the last call,
    /// per second, and which sockets and processes caused it (`netwatch -s` is this too).
    Counters(CountersArgs),
    /// Load the programs once and serve their stream to `netwatch watch` clients.
    Agent(Box<AgentArgs>),
    /// Connect latency (p50/p90/p99/max) and failed connects, per remote endpoint and per
    /// process, from a running agent.
    Stats(StatsArgs),
    /// Each connection's state-machine history (open, and recently closed), from a running
    /// agent.
    History(HistoryArgs),
    /// What works on this kernel: every hook, attached or not, why, and what is lost
    /// (exit 0 only on the full path).
    Check(CheckArgs),
    /// Writes the man pages (DIR/man) and bash, zsh and fish completions (DIR/completions),
    /// for packaging.
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
}

#[derive(Clone, Debug, Args)]
#[command(after_help = "FILTER: as for `netwatch table`, e.g. `state established dport = :443`; \
    the same language is typed into the filter bar (/). Press ? in top for the keys.")]
pub struct TopArgs {
    #[command(flatten)]
    pub select: TableSelect,
    /// Numeric ports (no service names from /etc/services).
    #[arg(short = 'n', long = "numeric")]
    pub numeric: bool,
    #[command(flatten)]
    pub programs: Programs,
    #[command(flatten)]
    pub replay: ReplayArgs,
}

/// Where `watch` and `top` get their events: a running agent, or programs of their own.
#[derive(Clone, Debug, Args)]
pub struct Programs {
    /// Load programs of our own even when an agent is running.
    #[arg(long)]
    pub no_agent: bool,
    /// Where to look for a running agent.
    #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// TCP state source: tp_btf (needs BTF), the classic tracepoint, or auto. Implies
    /// --no-agent.
    #[arg(long, value_enum, default_value_t = SourceChoice::Auto)]
    pub source: SourceChoice,
    /// Ring buffer size in bytes: a power of two, at least 4096. Implies --no-agent.
    #[arg(long, value_name = "BYTES", value_parser = parse_ring_size)]
    pub ring_size: Option<u32>,
}

impl Programs {
    /// Whether to load programs of our own: asked, or an option shapes the kernel side.
    pub fn own(&self) -> bool {
        self.no_agent || self.source != SourceChoice::Auto || self.ring_size.is_some()
    }

    pub fn load_options(&self) -> LoadOptions {
        LoadOptions { source: self.source, ring_size: self.ring_size }
    }
}

#[derive(Clone, Debug, Args)]
pub struct CheckArgs {
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Debug, Args)]
#[command(after_help = "FILTER: as for `netwatch table`, e.g. `dport = :5432 dst 10.0.0.5`.")]
pub struct HistoryArgs {
    /// The running agent's socket.
    #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Only connections active (with a transition) since this time: a duration before now
    /// (10m, 2h, 30s) or a time (2026-11-29T03:00, 03:00, RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = crate::recorded::window::parse_point)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// With --log: only connections active up to this time (the same forms).
    #[arg(long, value_name = "TIME", value_parser = crate::recorded::window::parse_point,
          requires = "log")]
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// Rebuild the histories from this event log (and its rotations) instead of asking
    /// the agent.
    #[arg(long, value_name = "PATH")]
    pub log: Option<PathBuf>,
    /// Only closed connections.
    #[arg(long)]
    pub closed: bool,
    /// Only failed connections (refused, timeout, aborted, reset).
    #[arg(long)]
    pub failed: bool,
    /// Only the connection with this socket cookie, in full detail.
    #[arg(long)]
    pub cookie: Option<u64>,
    /// Only connections whose owner runs in this container: its id, a prefix of it, or its
    /// name.
    #[arg(long, value_name = "ID|NAME")]
    pub container: Option<String>,
    /// Only connections whose owner runs in this Kubernetes pod: NAME, NAMESPACE/NAME or UID.
    #[arg(long, value_name = "POD")]
    pub pod: Option<String>,
    /// JSON (one array) instead of text.
    #[arg(long)]
    pub json: bool,
    /// ss-style address and port filter.
    #[arg(value_name = "FILTER")]
    pub filter: Vec<String>,
}

/// `30s`, `10m`, `2h`, `1d`.
pub(crate) fn parse_duration(text: &str) -> Result<chrono::Duration, String> {
    crate::recorded::window::duration(text.trim())
        .ok_or_else(|| format!("'{text}' is not a duration (e.g. 30s, 10m, 2h, 1d)"))
}

#[derive(Clone, Debug, Args)]
pub struct StatsArgs {
    /// The running agent's socket.
    #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Count from this event log (and its rotations) instead of asking the agent.
    #[arg(long, value_name = "PATH")]
    pub log: Option<PathBuf>,
    /// With --log: the stretch of recorded time counted.
    #[command(flatten)]
    pub window: WindowArgs,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Debug, Args)]
#[command(after_help = "FILTER: [state NAME]... [EXPR], e.g. `state established dport = :443` or \
    `sport >= 1024 and dst 10.0.0.0/8`. EXPR combines `sport|dport OP PORT` and \
    `src|dst ADDR[/LEN]` with and, or, not and parentheses; OP is = != < > <= >=.")]
pub struct TableArgs {
    #[command(flatten)]
    pub select: TableSelect,
    /// Numeric ports (no service names from /etc/services).
    #[arg(short = 'n', long = "numeric")]
    pub numeric: bool,
    /// Accepted for `ss -tanp` habits: owners are always shown.
    #[arg(short = 'p', long = "processes")]
    pub processes: bool,
    /// Show each socket's kernel timer (TIME_WAIT remaining time, retransmit, keepalive).
    #[arg(short = 'o', long = "options")]
    pub timers: bool,
    /// Extended columns (ss -e, netstat -e): the owner's user, the socket's inode and cookie.
    #[arg(short = 'e', long = "extended")]
    pub extended: bool,
    /// TCP internals at this moment (ss -i): rtt, cwnd, ssthresh, retransmits, bytes acked
    /// and received, delivery and pacing rates, last send and receive.
    #[arg(short = 'i', long = "info")]
    pub info: bool,
    /// Print the table again every SECONDS (1 if not given), like `netstat -c`; with an
    /// agent, only when something changed. Give it last in a group of flags (`-tanc`).
    #[arg(short = 'c', long = "continuous", value_name = "SECONDS", num_args = 0..=1,
          default_missing_value = "1", value_parser = parse_seconds)]
    pub continuous: Option<Duration>,
    /// Take a snapshot of our own even when an agent is running.
    #[arg(long)]
    pub no_agent: bool,
    /// Read /proc/net/* (as netstat does) instead of netlink sock_diag; implies --no-agent.
    /// No socket cookies, timers or IPV6_V6ONLY then.
    #[arg(long)]
    pub from_proc: bool,
    /// Where to look for a running agent.
    #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// One JSON array.
    #[arg(long, conflicts_with = "ndjson")]
    pub json: bool,
    /// One JSON object per line.
    #[arg(long)]
    pub ndjson: bool,
}

/// Which sockets `netwatch table` shows: sent to the agent with the request, so that the
/// agent sends only those rows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Args, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TableSelect {
    /// TCP sockets (with -u: both; neither: both).
    #[arg(short = 't', long = "tcp")]
    pub tcp: bool,
    /// UDP sockets.
    #[arg(short = 'u', long = "udp")]
    pub udp: bool,
    /// Listening sockets only (TCP LISTEN, unconnected UDP).
    #[arg(short = 'l', long = "listening", conflicts_with = "all")]
    pub listening: bool,
    /// Sockets in every state (default: connected ones, as ss).
    #[arg(short = 'a', long = "all")]
    pub all: bool,
    /// Only IPv4.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// Only IPv6.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
    /// Only sockets held by this process id.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Only sockets held by a process with this command name.
    #[arg(long, value_name = "NAME")]
    pub comm: Option<String>,
    /// Only this network namespace: an inode number or an `ip netns` name.
    #[arg(long, value_name = "INODE|NAME")]
    pub netns: Option<String>,
    /// Only sockets whose owner runs in this container: its id, a prefix of it, or its name.
    #[arg(long, value_name = "ID|NAME")]
    pub container: Option<String>,
    /// Only sockets whose owner runs in this Kubernetes pod: NAME, NAMESPACE/NAME or UID.
    #[arg(long, value_name = "POD")]
    pub pod: Option<String>,
    /// ss-style filter (see below).
    #[arg(value_name = "FILTER")]
    pub filter: Vec<String>,
}

#[derive(Clone, Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub filters: StreamFilters,
    /// One JSON object per line (NDJSON) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Do not print the column header (text output).
    #[arg(long)]
    pub no_header: bool,
    #[command(flatten)]
    pub programs: Programs,
    /// The records shown (after the filters) are also appended to --log.
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub replay: ReplayArgs,
}

#[derive(Clone, Debug, Args)]
#[command(after_help = "NAME: only counters whose nstat name (TcpExtListenOverflows) contains \
    one of these, case-insensitively, e.g. `netwatch counters listen retrans`.")]
pub struct CountersArgs {
    /// Every counter, unchanged ones and gauges (settings, current levels) too.
    #[arg(short = 'a', long = "all")]
    pub all: bool,
    /// Only TCP's counters (Tcp, TcpExt).
    #[arg(short = 't', long = "tcp")]
    pub tcp: bool,
    /// Only UDP's counters (Udp, Udp6, UdpLite, UdpLite6).
    #[arg(short = 'u', long = "udp")]
    pub udp: bool,
    /// Repeat every SECONDS (1 if not given), each time with what changed since the one
    /// before, like `netstat -c`.
    #[arg(short = 'c', long = "interval", visible_alias = "continuous", value_name = "SECONDS",
          num_args = 0..=1, default_missing_value = "1", value_parser = parse_seconds)]
    pub interval: Option<Duration>,
    /// The values themselves (counted since boot, or since the namespace was made), not what
    /// changed since the last call.
    #[arg(long)]
    pub since_boot: bool,
    /// Do not keep this reading as the last call's (the next call counts from the one before).
    #[arg(long)]
    pub no_update: bool,
    /// Only this network namespace: an inode number or an `ip netns` name; `all` for each.
    #[arg(long, value_name = "INODE|NAME|all")]
    pub netns: Option<String>,
    /// One JSON object per namespace and reading, one per line.
    #[arg(long)]
    pub json: bool,
    /// Do not ask a running agent which sockets caused the changes.
    #[arg(long)]
    pub no_agent: bool,
    /// Where to look for a running agent.
    #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    #[arg(value_name = "NAME")]
    pub names: Vec<String>,
}

/// `2`, `0.5`: seconds, at least a tenth of one.
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 =
        text.parse().map_err(|_| format!("'{text}' is not a number of seconds (e.g. 2, 0.5)"))?;
    if !(0.1..=86_400.0).contains(&seconds) {
        return Err(format!("{text} seconds is out of range (0.1 to 86400)"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_state(text: &str) -> Result<TcpState, String> {
    text.parse()
}

pub(crate) fn parse_ring_size(text: &str) -> Result<u32, String> {
    let size: u32 = text.parse().map_err(|_| format!("'{text}' is not a number of bytes"))?;
    if size < 4096 || !size.is_power_of_two() {
        return Err(format!("{size} is not a power of two of at least 4096 (e.g. 1048576)"));
    }
    Ok(size)
}

impl WatchArgs {
    pub fn filter(&self) -> TransitionFilter {
        self.filters.filter()
    }

    pub fn format(&self) -> Format {
        if self.json { Format::Json } else { Format::Text }
    }
}

#[cfg(test)]
mod tests;
