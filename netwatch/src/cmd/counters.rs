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
    output::counters::{self as out, Cause, FullListener, Line, Reading, Since},
    record::Listed,
    serve::api::{self, Command},
    state::attribution,
};

/// A namespace whose counters are shown.
struct Target {
    namespace: NetNamespace,
    /// This process's own namespace: read without joining it (no privilege needed).
    here: bool,
    /// The reading each change is counted from, once there was one in this run.
    previous: Option<(DateTime<Utc>, BTreeMap<String, i64>)>,
}

impl Target {
    fn counters(&self) -> std::io::Result<Counters> {
        if self.here { Counters::read_here() } else { Counters::read_in(&self.namespace.path) }
    }

    fn diag(&self) -> std::io::Result<DiagSocket> {
        let ns = &self.namespace;
        if self.here {
            DiagSocket::open_here(ns.inode)
        } else {
            DiagSocket::open(&ns.path, ns.inode)
        }
    }
}

/// What `netwatch counters` keeps of a reading for the next call.
#[derive(Serialize, Deserialize)]
struct Kept {
    time: DateTime<Utc>,
    netns: u32,
    /// A reading from before the last boot counts for nothing (the counters restarted).
    boot_id: String,
    counters: BTreeMap<String, i64>,
}

pub async fn run(args: &CountersArgs) -> anyhow::Result<()> {
    let mut targets = targets(args.netns.as_deref())?;
    let history = History::open();
    let several = targets.len() > 1;
    loop {
        for target in &mut targets {
            let reading = reading(args, target, history.as_ref()).await?;
            let text = if args.json {
                serde_json::to_string(&reading)?
            } else if args.interval.is_some() || several {
                out::text(&reading) + "\n"
            } else {
                out::text(&reading)
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

/// The namespaces asked for: this process's own when none is named.
fn targets(wanted: Option<&str>) -> anyhow::Result<Vec<Target>> {
    let target = |namespace, here| Target { namespace, here, previous: None };
    let Some(wanted) = wanted else {
        let path = PathBuf::from("/proc/self/ns/net");
        let inode = std::fs::metadata(&path).context("reading /proc/self/ns/net")?.ino() as u32;
        let name = std::fs::read_dir("/run/netns").ok().and_then(|entries| {
            entries.flatten().find_map(|entry| {
                let same =
                    std::fs::metadata(entry.path()).is_ok_and(|m| m.ino() == u64::from(inode));
                same.then(|| entry.file_name().to_string_lossy().into_owned())
            })
        });
        return Ok(vec![target(NetNamespace { inode, path, name }, true)]);
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "--netns needs root (netwatch enters the namespace to read its counters): run it \
             with sudo"
        );
    }
    let known = network_namespaces();
    let found: Vec<Target> = known
        .into_iter()
        .filter(|ns| {
            wanted == "all" || ns.inode.to_string() == wanted || ns.name.as_deref() == Some(wanted)
        })
        .map(|ns| target(ns, false))
        .collect();
    if found.is_empty() {
        return Err(Error::NoSuchNetns(wanted.to_string()).into());
    }
    Ok(found)
}

/// The directory of the last call's readings, one file per namespace.
struct History {
    dir: PathBuf,
    boot_id: String,
}

impl History {
    /// `$NETWATCH_COUNTERS_HISTORY`, else /run/netwatch/counters for root, else the user's
    /// runtime directory; None if it cannot be made or others can write to it (then every
    /// call counts since boot, or since the agent started).
    fn open() -> Option<History> {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let dir = match std::env::var_os("NETWATCH_COUNTERS_HISTORY") {
            Some(dir) => PathBuf::from(dir),
            None if euid == 0 => PathBuf::from("/run/netwatch/counters"),
            None => match std::env::var_os("XDG_RUNTIME_DIR") {
                Some(runtime) => PathBuf::from(runtime).join("netwatch-counters"),
                None => PathBuf::from(format!("/tmp/netwatch-counters.{euid}")),
            },
        };
        use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
        let made = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir);
        // A directory someone else made (in /tmp) could hand this user's writes elsewhere.
        let checked = made.and_then(|()| std::fs::symlink_metadata(&dir)).and_then(|meta| {
            if meta.is_dir() && meta.uid() == euid && meta.permissions().mode() & 0o022 == 0 {
                Ok(())
            } else {
                Err(std::io::Error::other("not a directory only this user can write to"))
            }
        });
        if let Err(error) = checked {
            tracing::warn!("cannot keep counters between calls in {}: {error}", dir.display());
            return None;
        }
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|id| id.trim().to_string())
            .unwrap_or_default();
        Some(History { dir, boot_id })
    }

    fn load(&self, netns: u32) -> Option<Kept> {
        let text = std::fs::read_to_string(self.dir.join(format!("{netns}.json"))).ok()?;
        serde_json::from_str::<Kept>(&text)
            .ok()
            .filter(|kept| kept.netns == netns && kept.boot_id == self.boot_id)
    }

    /// Written to a new temporary file and renamed: a reader never sees half of it.
    fn keep(
        &self,
        time: DateTime<Utc>,
        netns: u32,
        counters: BTreeMap<String, i64>,
    ) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let kept = Kept { time, netns, boot_id: self.boot_id.clone(), counters };
        let path = self.dir.join(format!("{netns}.json"));
        let temporary = self.dir.join(format!(".{netns}.json.{}", std::process::id()));
        let _ = std::fs::remove_file(&temporary);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(&serde_json::to_vec(&kept)?)?;
        std::fs::rename(&temporary, &path)
    }
}

/// One reading of one namespace, compared with the one it counts from.
async fn reading(
    args: &CountersArgs,
    target: &mut Target,
    history: Option<&History>,
) -> anyhow::Result<Reading> {
    let ns = &target.namespace;
    let counters =
        target.counters().with_context(|| format!("reading the counters of netns {}", ns.inode))?;
    let now = Utc::now();
    let kept = history.filter(|_| !args.since_boot).and_then(|h| h.load(ns.inode));
    let mut since = match (&target.previous, kept) {
        (Some((time, values)), _) => Some((Since::Previous { time: *time }, values.clone())),
        (None, Some(kept)) => Some((Since::LastCall { time: kept.time }, kept.counters)),
        (None, None) => None,
    };
    // The agent's account is asked for the same interval as the counters'.
    let (agent, no_agent) = if args.no_agent {
        (None, "the agent was not asked (--no-agent)".to_string())
    } else {
        let asked = since.as_ref().and_then(|(since, _)| since.time());
        match ask_agent(&args.socket, asked, ns.inode).await {
            Ok(account) => (Some(account), String::new()),
            Err(why) => (None, why),
        }
    };
    if since.is_none() && !args.since_boot {
        since = agent.as_ref().and_then(|account| {
            let baseline = account.baseline.clone().filter(|_| account.netns == ns.inode)?;
            Some((Since::AgentStart { time: account.started? }, baseline))
        });
    }
    let (since, earlier) = since.unwrap_or((Since::Boot, BTreeMap::new()));
    let interval_s = since.time().map(|time| (now - time).num_milliseconds() as f64 / 1000.0);
    let no_agent = agent.is_none().then_some(no_agent.as_str());
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
                queues = Some(full_listeners(target, &args.socket, args.no_agent).await);
            }
            queues.clone()
        } else {
            events_cause(agent.as_ref(), &c.group, &c.name).or_else(|| {
                out::unknown_cause(&c.group, &c.name, no_agent)
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
    let values = counters.by_key();
    if let Some(history) = history.filter(|_| !args.no_update)
        && let Err(error) = history.keep(now, ns.inode, values.clone())
    {
        tracing::warn!(
            "cannot keep this reading for the next call in {}: {error}",
            history.dir.display()
        );
    }
    target.previous = Some((now, values));
    let ns = &target.namespace;
    Ok(Reading {
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

/// The agent's account of the counters since `since` in `netns`, or why there is none. The
/// counters are true without it: no agent (or one a user may not ask, or one older than
/// `counters`) costs only the causes.
async fn ask_agent(
    socket: &std::path::Path,
    since: Option<DateTime<Utc>>,
    netns: u32,
) -> Result<attribution::Account, String> {
    match api::ask(socket, Command::Counters { since, netns: Some(netns) }).await {
        Ok(Some(line)) => serde_json::from_str(&line).map_err(|_| {
            format!("the agent at {} cannot say who caused it: {}", socket.display(), line.trim())
        }),
        Ok(None) => Err("no agent runs: start `netwatch agent` to see who caused it".into()),
        Err(error) => Err(format!("the agent was not asked: {error}")),
    }
}

fn events_cause(agent: Option<&attribution::Account>, group: &str, name: &str) -> Option<Cause> {
    let account = agent?;
    let rule = attribution::RULES.iter().find(|r| r.group == group && r.name == name)?;
    let found = account.attributed.iter().find(|a| a.group == group && a.name == name);
    Some(Cause::Events {
        evidence: rule.evidence,
        events: rule.events.to_string(),
        culprits: found.map(|a| a.culprits.clone()).unwrap_or_default(),
        others: found.map_or(0, |a| a.others),
        counted_from: account.counted_from,
        complete: account.complete,
    })
}

/// The namespace's listeners whose accept queue is at or past its backlog now, with their
/// owners from the agent's table or, without one, from /proc.
async fn full_listeners(target: &Target, socket: &std::path::Path, no_agent: bool) -> Cause {
    let ns = &target.namespace;
    let rows = target.diag().and_then(|mut diag| diag.passive_sockets());
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
                let by_inode = crate::host::procfs::socket_owners(&mut Vec::new(), None);
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
