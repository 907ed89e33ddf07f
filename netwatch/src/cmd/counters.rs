//! `netwatch counters`: the kernel's protocol counters of a namespace (or each), what changed
//! since the last call (kept as nstat keeps it, in a history file per namespace), since the
//! agent started, or since the previous reading of `--interval`; with the sockets and
//! processes that caused the change where the agent's events or the accept queues name them.
use std::{
    collections::{BTreeMap, HashMap},
    io::Write as _,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{
    cli::{CountersArgs, TableSelect},
    error::Error,
    host::{
        counters::Counters,
        snapshot::{NetNamespace, network_namespaces},
        sock_diag::DiagSocket,
    },
    kernel::events::TcpState,
    output::counters::{self as out, Cause, FullListener, Line, Report, Since},
    record::Listed,
    serve::api::{self, Command},
    state::attribution,
};

/// A namespace whose counters are shown.
struct Target {
    namespace: NetNamespace,
    /// The reading each change is counted from, once there was one in this run.
    previous: Option<(DateTime<Utc>, BTreeMap<String, i64>)>,
}

/// What `netwatch counters` keeps of a reading for the next call.
#[derive(Serialize, Deserialize)]
struct Kept {
    time: DateTime<Utc>,
    netns: u32,
    counters: BTreeMap<String, i64>,
}

pub async fn run(args: &CountersArgs) -> anyhow::Result<()> {
    let mut targets: Vec<Target> = namespaces(args.netns.as_deref())?
        .into_iter()
        .map(|namespace| Target { namespace, previous: None })
        .collect();
    let history = history_dir();
    loop {
        for target in &mut targets {
            let report = reading(args, target, history.as_ref()).await?;
            let text = if args.json {
                serde_json::to_string(&report)?
            } else {
                out::text(&report)
                    + if args.interval.is_some() || targets_len(args) { "\n" } else { "" }
            };
            let mut stdout = std::io::stdout().lock();
            match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
                Err(error) if super::reader_gone(&error) => return Ok(()),
                other => other?,
            }
        }
        let Some(interval) = args.interval else { return Ok(()) };
        tokio::time::sleep(interval).await;
    }
}

fn targets_len(args: &CountersArgs) -> bool {
    args.netns.as_deref() == Some("all")
}

/// The namespaces asked for: this process's own when none is named.
fn namespaces(wanted: Option<&str>) -> anyhow::Result<Vec<NetNamespace>> {
    let Some(wanted) = wanted else {
        let path = PathBuf::from("/proc/self/ns/net");
        let inode = std::fs::metadata(&path).context("reading /proc/self/ns/net")?.ino() as u32;
        let name =
            network_namespaces().into_iter().find(|ns| ns.inode == inode).and_then(|ns| ns.name);
        return Ok(vec![NetNamespace { inode, path, name }]);
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "--netns needs root (it enters the namespace to read its counters): run it with sudo"
        );
    }
    let known = network_namespaces();
    if wanted == "all" {
        return Ok(known);
    }
    let found: Vec<NetNamespace> = known
        .into_iter()
        .filter(|ns| ns.inode.to_string() == wanted || ns.name.as_deref() == Some(wanted))
        .collect();
    if found.is_empty() {
        return Err(Error::NoSuchNetns(wanted.to_string()).into());
    }
    Ok(found)
}

/// Where the last call's readings are kept: `$NETWATCH_COUNTERS_HISTORY`, else
/// /run/netwatch/counters for root, else the user's runtime directory; None if none can be
/// made (every call then counts since boot).
fn history_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("NETWATCH_COUNTERS_HISTORY") {
        Some(dir) => PathBuf::from(dir),
        // SAFETY: geteuid has no preconditions.
        None if unsafe { libc::geteuid() } == 0 => PathBuf::from("/run/netwatch/counters"),
        None => match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(runtime) => PathBuf::from(runtime).join("netwatch-counters"),
            // SAFETY: getuid has no preconditions.
            None => PathBuf::from(format!("/tmp/netwatch-counters.{}", unsafe { libc::getuid() })),
        },
    };
    use std::os::unix::fs::DirBuilderExt as _;
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir) {
        Ok(()) => Some(dir),
        Err(error) => {
            tracing::warn!("cannot keep counters between calls in {}: {error}", dir.display());
            None
        }
    }
}

fn load(dir: &std::path::Path, netns: u32) -> Option<Kept> {
    let text = std::fs::read_to_string(dir.join(format!("{netns}.json"))).ok()?;
    serde_json::from_str::<Kept>(&text).ok().filter(|kept| kept.netns == netns)
}

/// Written to a temporary file and renamed: a reader never sees half of it.
fn keep(dir: &std::path::Path, kept: &Kept) -> std::io::Result<()> {
    let path = dir.join(format!("{}.json", kept.netns));
    let temporary = dir.join(format!(".{}.json.{}", kept.netns, std::process::id()));
    std::fs::write(&temporary, serde_json::to_vec(kept)?)?;
    std::fs::rename(&temporary, &path)
}

/// One reading of one namespace, compared with the one it counts from.
async fn reading(
    args: &CountersArgs,
    target: &mut Target,
    history: Option<&PathBuf>,
) -> anyhow::Result<Report> {
    let ns = &target.namespace;
    let counters = Counters::read_in(&ns.path)
        .with_context(|| format!("reading the counters of netns {}", ns.inode))?;
    let now = Utc::now();
    let kept = history.filter(|_| !args.since_boot).and_then(|dir| load(dir, ns.inode));
    // The agent's attribution answers for the same interval as the counters.
    let mut since = match (&target.previous, kept) {
        (Some((time, values)), _) => Some((Since::Previous { time: *time }, values.clone())),
        (None, Some(kept)) => Some((Since::LastCall { time: kept.time }, kept.counters)),
        (None, None) => None,
    };
    let agent = if args.no_agent {
        None
    } else {
        let asked = since.as_ref().and_then(|(since, _)| match since {
            Since::LastCall { time } | Since::Previous { time } | Since::AgentStart { time } => {
                Some(*time)
            }
            Since::Boot => None,
        });
        ask_agent(&args.socket, asked, ns.inode).await?
    };
    if since.is_none() && !args.since_boot {
        since = agent.as_ref().and_then(|report| {
            let baseline = report.baseline.clone().filter(|_| report.netns == ns.inode)?;
            Some((Since::AgentStart { time: report.started? }, baseline))
        });
    }
    let (since, earlier) = since.unwrap_or((Since::Boot, BTreeMap::new()));
    let interval_s = match since {
        Since::LastCall { time } | Since::Previous { time } | Since::AgentStart { time } => {
            Some((now - time).num_milliseconds() as f64 / 1000.0)
        }
        Since::Boot => None,
    };
    let mut queues = None;
    let mut lines = Vec::new();
    for change in counters.since(&earlier) {
        let c = &change.counter;
        if !shown(args, &c.group, &c.key()) || !(args.all || change.delta.is_some_and(|d| d != 0)) {
            continue;
        }
        let grew = change.delta.is_some_and(|d| d > 0);
        let cause = if !grew {
            None
        } else if c.group == "TcpExt"
            && matches!(c.name.as_str(), "ListenOverflows" | "ListenDrops")
        {
            if queues.is_none() {
                queues = Some(full_listeners(ns, &args.socket, args.no_agent).await);
            }
            queues.clone()
        } else {
            events_cause(agent.as_ref(), &c.group, &c.name).or_else(|| {
                out::unknown_cause(&c.group, &c.name, agent.is_some())
                    .filter(|_| out::meaning(&c.group, &c.name).is_some())
            })
        };
        lines.push(Line {
            group: c.group.clone(),
            name: c.name.clone(),
            value: c.value,
            delta: change.delta,
            per_second: change
                .delta
                .zip(interval_s)
                .filter(|(_, s)| *s > 0.0)
                .map(|(d, s)| d as f64 / s),
            meaning: out::meaning(&c.group, &c.name),
            cause,
        });
    }
    if let Some(dir) = history.filter(|_| !args.no_update)
        && let Err(error) =
            keep(dir, &Kept { time: now, netns: ns.inode, counters: counters.by_key() })
    {
        tracing::warn!("cannot keep this reading for the next call in {}: {error}", dir.display());
    }
    target.previous = Some((now, counters.by_key()));
    Ok(Report {
        time: now,
        netns: ns.inode,
        netns_name: ns.name.clone(),
        since,
        interval_s,
        agent: agent.is_some(),
        counters: lines,
    })
}

/// Whether a counter is among those asked for (-t, -u, names).
fn shown(args: &CountersArgs, group: &str, key: &str) -> bool {
    let tcp = matches!(group, "Tcp" | "TcpExt");
    let udp = matches!(group, "Udp" | "Udp6" | "UdpLite" | "UdpLite6");
    let protocol = (!args.tcp && !args.udp) || (args.tcp && tcp) || (args.udp && udp);
    let key = key.to_lowercase();
    protocol
        && (args.names.is_empty() || args.names.iter().any(|n| key.contains(&n.to_lowercase())))
}

/// The agent's account of the counters since `since` in `netns`; None when no agent runs.
async fn ask_agent(
    socket: &std::path::Path,
    since: Option<DateTime<Utc>>,
    netns: u32,
) -> anyhow::Result<Option<attribution::Report>> {
    let Some(line) = api::ask(socket, Command::Counters { since, netns: Some(netns) })
        .await
        .context("asking the agent")?
    else {
        return Ok(None);
    };
    match serde_json::from_str(&line) {
        Ok(report) => Ok(Some(report)),
        // An agent older than `counters` answers an error line: counters without causes.
        Err(_) => {
            tracing::warn!(
                "the agent at {} cannot say who caused what: {}",
                socket.display(),
                line.trim()
            );
            Ok(None)
        }
    }
}

fn events_cause(agent: Option<&attribution::Report>, group: &str, name: &str) -> Option<Cause> {
    let report = agent?;
    let rule = attribution::RULES.iter().find(|r| r.group == group && r.name == name)?;
    let found = report.attributed.iter().find(|a| a.group == group && a.name == name);
    Some(Cause::Events {
        evidence: rule.evidence,
        events: rule.events.to_string(),
        culprits: found.map(|a| a.culprits.clone()).unwrap_or_default(),
        others: found.map_or(0, |a| a.others),
        complete: report.complete,
    })
}

/// The namespace's listeners whose accept queue is at or past its backlog now, with their
/// owners from the agent's table or, without one, from /proc.
async fn full_listeners(ns: &NetNamespace, socket: &std::path::Path, no_agent: bool) -> Cause {
    let rows = DiagSocket::open(&ns.path, ns.inode).and_then(|mut diag| diag.passive_sockets());
    let rows = match rows {
        Ok(rows) => rows,
        Err(error) => {
            return Cause::Unknown { why: format!("the accept queues could not be read: {error}") };
        }
    };
    let full: Vec<_> = rows
        .into_iter()
        .filter(|r| r.state == TcpState::Listen && r.recv_q > 0 && r.recv_q >= r.send_q)
        .collect();
    let mut owners: HashMap<u64, Vec<String>> = HashMap::new();
    if !full.is_empty() {
        let select = TableSelect {
            tcp: true,
            listening: true,
            netns: Some(ns.inode.to_string()),
            ..TableSelect::default()
        };
        let asked = if no_agent {
            None
        } else {
            api::ask(socket, Command::Table { select: Some(select) }).await.ok().flatten()
        };
        match asked.and_then(|line| serde_json::from_str::<Vec<Listed>>(&line).ok()) {
            Some(listed) => {
                for l in listed {
                    owners.insert(
                        l.row.cookie,
                        l.owners.iter().map(|h| format!("{}[{}]", h.comm, h.pid)).collect(),
                    );
                }
            }
            None => {
                let by_inode = crate::host::procfs::socket_owners(&mut Vec::new());
                for row in &full {
                    let holders = by_inode
                        .get(&row.inode)
                        .map(|h| h.iter().map(|h| format!("{}[{}]", h.comm, h.pid)).collect());
                    owners.insert(row.cookie, holders.unwrap_or_default());
                }
            }
        }
    }
    Cause::AcceptQueues {
        listeners: full
            .into_iter()
            .map(|row| FullListener {
                local: std::net::SocketAddr::from(row.local),
                queue: row.recv_q,
                backlog: row.send_q,
                owners: owners.remove(&row.cookie).unwrap_or_default(),
            })
            .collect(),
    }
}
