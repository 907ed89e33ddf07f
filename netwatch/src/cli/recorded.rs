//! Options of the commands that read what the event log recorded: `netwatch log`, the
//! `--log` of `history` and `stats`, and the `--replay` of `watch` and `top`.
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::Args;

use super::parse_state;
use crate::{
    kernel::events::{Family, TcpState},
    query::stream::{TransitionFilter, parse_transition},
    recorded::window::{Window, parse_point},
    serve::api,
};

/// Which records a stream shows: `watch`'s filters, and `log`'s.
#[derive(Clone, Debug, Default, Args)]
pub struct StreamFilters {
    /// Only transitions with this local or remote port.
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Only transitions with this local port.
    #[arg(long, value_name = "PORT")]
    pub sport: Option<u16>,
    /// Only transitions with this remote port.
    #[arg(long, value_name = "PORT")]
    pub dport: Option<u16>,
    /// Only sockets owned by this process id.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Only sockets owned by a process with this command name.
    #[arg(long, value_name = "NAME")]
    pub comm: Option<String>,
    /// Only sockets whose owner runs in this container: its id, a prefix of it, or its name.
    #[arg(long, value_name = "ID|NAME")]
    pub container: Option<String>,
    /// Only sockets whose owner runs in this Kubernetes pod: NAME, NAMESPACE/NAME or UID.
    #[arg(long, value_name = "POD")]
    pub pod: Option<String>,
    /// Only IPv4.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// Only IPv6.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
    /// Only transitions from or to this state (e.g. SYN_SENT).
    #[arg(long, value_name = "STATE", value_parser = parse_state)]
    pub state: Option<TcpState>,
    /// Only this exact transition, OLD:NEW (e.g. SYN_SENT:ESTABLISHED).
    #[arg(long, value_name = "OLD:NEW", value_parser = parse_transition)]
    pub transition: Option<(TcpState, TcpState)>,
}

impl StreamFilters {
    pub fn filter(&self) -> TransitionFilter {
        TransitionFilter {
            port: self.port,
            sport: self.sport,
            dport: self.dport,
            pid: self.pid,
            comm: self.comm.clone(),
            container: self.container.clone(),
            pod: self.pod.clone(),
            family: match (self.ipv4, self.ipv6) {
                (true, _) => Some(Family::Ipv4),
                (_, true) => Some(Family::Ipv6),
                _ => None,
            },
            state: self.state,
            transition: self.transition,
        }
    }
}

/// `--since` and `--until`: the stretch of recorded time read.
#[derive(Clone, Debug, Default, Args)]
pub struct WindowArgs {
    /// From this time: 2026-11-29T03:00, "2026-11-29 03:00:15", 03:00 (today), RFC 3339, or
    /// a duration before now (10m, 2h, 1d).
    #[arg(long, value_name = "TIME", value_parser = parse_point)]
    pub since: Option<DateTime<Utc>>,
    /// Up to this time (the same forms).
    #[arg(long, value_name = "TIME", value_parser = parse_point)]
    pub until: Option<DateTime<Utc>>,
}

impl WindowArgs {
    pub fn window(&self) -> Window {
        Window { since: self.since, until: self.until }
    }
}

/// `--replay`: play a recorded stretch of the log instead of the live stream.
#[derive(Clone, Debug, Default, Args)]
pub struct ReplayArgs {
    /// Play this event log (and its rotations) as it was recorded, instead of the live
    /// stream; with --since and --until, only that stretch.
    #[arg(long, value_name = "PATH")]
    pub replay: Option<PathBuf>,
    /// Playing speed: 10 is ten times faster than recorded, 0.5 half as fast. Gaps of more
    /// than 5 s (after the speed) with nothing recorded are cut to 5 s.
    #[arg(long, value_name = "FACTOR", default_value_t = 1.0, requires = "replay",
          value_parser = parse_speed)]
    pub speed: f64,
    /// One record at a time: the next on Enter (watch); in top, `.` steps when paused.
    #[arg(long, requires = "replay")]
    pub step: bool,
    /// Play from this time: 2026-11-29T03:00, 03:00 (today), RFC 3339, or a duration
    /// before now (10m); what came before it is taken in at once.
    #[arg(long, value_name = "TIME", value_parser = parse_point, requires = "replay")]
    pub since: Option<DateTime<Utc>>,
    /// Play up to this time.
    #[arg(long, value_name = "TIME", value_parser = parse_point, requires = "replay")]
    pub until: Option<DateTime<Utc>>,
}

impl ReplayArgs {
    pub fn window(&self) -> Window {
        Window { since: self.since, until: self.until }
    }
}

fn parse_speed(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(speed) if (0.01..=100_000.0).contains(&speed) => Ok(speed),
        _ => Err(format!("'{text}' is not a speed from 0.01 to 100000 (e.g. 10, 0.5)")),
    }
}

#[derive(Clone, Debug, Args)]
#[command(after_help = "FILTER: as for `netwatch table`, e.g. `dport = :5432 and dst 10.0.0.5` \
    or `state syn-sent`; a record matches when either of its states is one of the states. \
    The first word is the log's PATH when it contains a / or names a file.")]
pub struct LogQueryArgs {
    #[command(flatten)]
    pub filters: StreamFilters,
    /// Only connections that failed (a CLOSE with a failure: refused, timeout, aborted,
    /// reset, reset_sent, listener_closed).
    #[arg(long)]
    pub failed: bool,
    #[command(flatten)]
    pub window: WindowArgs,
    /// One JSON object per line: the log's own lines of the records shown.
    #[arg(long)]
    pub json: bool,
    /// Do not print the column header (text output).
    #[arg(long)]
    pub no_header: bool,
    /// Keep reading as the log grows, across its rotations (as `tail -F`); without
    /// --since, from its end.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// The agent asked for its log's path when none is given.
    #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// [PATH] [FILTER]: the log (default: the running agent's --log, else
    /// /var/log/netwatch/events.ndjson), then an ss-style filter.
    #[arg(value_name = "PATH|FILTER")]
    pub words: Vec<String>,
}

impl LogQueryArgs {
    /// The log's path, if the first word is one, and the filter's words.
    pub fn path_and_filter(&self) -> (Option<PathBuf>, &[String]) {
        match self.words.split_first() {
            Some((first, rest))
                if first.contains('/')
                    || crate::recorded::files::holds_a_log(std::path::Path::new(first)) =>
            {
                (Some(PathBuf::from(first)), rest)
            }
            _ => (None, &self.words),
        }
    }
}
