//! `netwatch table`: the socket table - kept by a running agent, or else from a one-shot
//! snapshot - filtered like `ss`, with what the kernel says of each socket at the moment of
//! asking (queues, uid, tcp_info), printed as text or JSON, once or again (`-c`).
use std::{collections::HashMap, io::Write as _, time::Duration};

use anyhow::Context as _;

use crate::{
    cli::{TableArgs, TableSelect},
    error::Error,
    host::services::Services,
    host::snapshot::{Snapshot, SocketRow, Source, network_namespaces},
    host::sock_diag::{DiagSocket, TcpInfo},
    host::tcp_info::TcpInfoRecord,
    host::workload::{KUBELET_LOGS, Workloads},
    output::table::{self, Extras, TextOptions},
    query::select::Selection,
    record::Listed,
    serve::api::{self, Command},
};

/// Rows of a snapshot with their owners and namespace names, in a stable order.
pub fn listed_from(snapshot: Snapshot) -> Vec<Listed> {
    let names: HashMap<u32, String> =
        snapshot.namespaces.iter().filter_map(|ns| Some((ns.inode, ns.name.clone()?))).collect();
    let mut owners = snapshot.owners;
    let workloads = Workloads::new(KUBELET_LOGS.into());
    let mut rows: Vec<Listed> = snapshot
        .rows
        .into_iter()
        .map(|row: SocketRow| {
            let owners =
                owners.get(&row.inode).filter(|_| row.inode != 0).cloned().unwrap_or_default();
            Listed {
                workload: owners.first().and_then(|holder| workloads.of(holder.cgroup_id)),
                owners,
                netns_name: names.get(&row.netns).cloned(),
                in_state: None,
                queues_known: true,
                owner_history: Vec::new(),
                row,
            }
        })
        .collect();
    owners.clear();
    sort(&mut rows);
    rows
}

/// A stable order: namespace, protocol, local then remote endpoint.
fn sort(rows: &mut [Listed]) {
    rows.sort_by(|a, b| {
        let key =
            |l: &Listed| (l.row.netns, l.row.protocol, l.row.local, l.row.remote, l.row.cookie);
        key(a).cmp(&key(b))
    });
}

/// The rows of the table kept by a running agent that `select` keeps; None when no agent
/// listens at `socket`.
async fn from_agent(
    socket: &std::path::Path,
    select: &TableSelect,
) -> anyhow::Result<Option<Vec<Listed>>> {
    let ask = |select| async move {
        api::ask(socket, Command::Table { select }).await.context("asking the agent")
    };
    let Some(mut line) = ask(Some(select.clone())).await? else { return Ok(None) };
    // An agent that cannot apply the selection (a filter longer than a request may be, a
    // service name its /etc/services lacks, a field newer than it) answers an error line, not
    // rows, and sends every row when asked without one; they are filtered here in any case.
    if !line.starts_with('[') {
        let Some(again) = ask(None).await? else { return Ok(None) };
        line = again;
    }
    let rows = serde_json::from_str(&line)
        .with_context(|| format!("the agent at {} answered: {}", socket.display(), line.trim()))?;
    Ok(Some(rows))
}

pub async fn run(args: &TableArgs) -> anyhow::Result<()> {
    let services = Services::load();
    let selection = Selection::new(&args.select, &services)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::TableNotRoot.into());
    }
    if let Some(wanted) = &args.select.netns {
        let known = network_namespaces();
        if !known
            .iter()
            .any(|ns| ns.inode.to_string() == *wanted || ns.name.as_ref() == Some(wanted))
        {
            return Err(Error::NoSuchNetns(wanted.clone()).into());
        }
    }
    let Some(interval) = args.continuous else {
        let (text, ..) = listing(args, &selection, &services, true).await?;
        return super::emit(&text);
    };
    // With an agent, a reprint waits for a change it reports (any line of its `live` stream
    // after the table); without one, each interval reprints.
    let mut changes =
        if args.no_agent || args.from_proc { None } else { Changes::open(&args.socket).await? };
    let mut shown = None;
    loop {
        let first = shown.is_none();
        let (text, from_agent, fingerprint) = listing(args, &selection, &services, first).await?;
        // A change elsewhere on the host that left these rows as they were prints nothing.
        if !(from_agent && changes.is_some() && shown == Some(fingerprint)) {
            shown = Some(fingerprint);
            let stamp = chrono::Local::now().format("%H:%M:%S");
            let text =
                if args.json || args.ndjson { text } else { format!("--- {stamp}\n{text}\n") };
            let mut stdout = std::io::stdout().lock();
            match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
                Err(error) if super::reader_gone(&error) => return Ok(()),
                other => other?,
            }
        }
        // At most one listing an interval, whatever the agent reports meanwhile.
        tokio::time::sleep(interval).await;
        if let Some(changes) = changes.as_mut().filter(|_| from_agent) {
            changes.next(args).await?;
        }
    }
}

/// The agent's `live` stream past its first line (the table): each later line is a change.
struct Changes {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
    /// Kept open for as long as the stream is read.
    _request: tokio::net::unix::OwnedWriteHalf,
}

impl Changes {
    /// None without an agent.
    async fn open(socket: &std::path::Path) -> anyhow::Result<Option<Changes>> {
        use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
        let Some(stream) = api::connect(socket).await? else { return Ok(None) };
        let (read, mut write) = stream.into_split();
        let request = serde_json::to_string(&api::Request::new(Command::Live))? + "\n";
        write.write_all(request.as_bytes()).await.context("asking the agent")?;
        let mut lines = tokio::io::BufReader::new(read).lines();
        lines.next_line().await.context("reading the agent's table")?;
        Ok(Some(Changes { lines, _request: write }))
    }

    /// Returns once the agent reported a change: at once if some came since the last call
    /// (all of them count as one), else when the next one comes.
    async fn next(&mut self, args: &TableArgs) -> anyhow::Result<()> {
        let mut came = false;
        while let Ok(line) = tokio::time::timeout(Duration::ZERO, self.lines.next_line()).await {
            if line?.is_none() {
                break;
            }
            came = true;
        }
        if !came && self.lines.next_line().await?.is_none() {
            anyhow::bail!("the agent at {} stopped", args.socket.display());
        }
        Ok(())
    }
}

/// The table as text or JSON, whether an agent's rows made it, and a fingerprint of what
/// the rows are (sockets, states, owners) to tell a changed table from the same one.
async fn listing(
    args: &TableArgs,
    selection: &Selection,
    services: &Services,
    first: bool,
) -> anyhow::Result<(String, bool, u64)> {
    let agent = if args.no_agent || args.from_proc {
        None
    } else {
        from_agent(&args.socket, &args.select).await?
    };
    let from_agent = agent.is_some();
    let all = match agent {
        Some(rows) => rows,
        None => {
            if !first {
                // Said on the first listing of `-c`.
            } else if args.no_agent || args.from_proc {
                eprintln!("netwatch: a one-shot snapshot, as asked (no time-in-state)");
            } else {
                eprintln!(
                    "netwatch: no agent to ask: showing a one-shot snapshot (no time-in-state)"
                );
            }
            let source = if args.from_proc { Source::ProcNet } else { Source::SockDiag };
            let snapshot = Snapshot::take_from(source);
            for problem in &snapshot.problems {
                tracing::warn!("{problem}");
            }
            listed_from(snapshot)
        }
    };
    let mut rows: Vec<Listed> = all.into_iter().filter(|l| selection.keeps(l)).collect();
    sort(&mut rows);
    let mut extras = Extras::default();
    // The agent keeps no queue lengths (they change with every packet), nor the uid of a
    // socket it learned from events: the kernel is asked for them now, with tcp_info for -i.
    if (from_agent || args.info) && !args.from_proc {
        extras.info = kernel_facts(&mut rows, args.info);
    }
    if args.extended || args.json || args.ndjson {
        for listed in rows.iter().filter(|l| l.queues_known && l.row.inode != 0) {
            extras.users.entry(listed.row.uid).or_insert_with(|| user_name(listed.row.uid));
        }
    }
    let text = if args.json {
        table::json_array(&rows, &extras)
    } else if args.ndjson {
        table::ndjson(&rows, &extras)
    } else {
        let services = (!args.numeric).then_some(services);
        let netid = selection.both_protocols();
        let state = selection.shown_states().count() > 1;
        let options = TextOptions {
            services,
            timers: args.timers,
            netid,
            state,
            extended: args.extended,
            extras: &extras,
        };
        table::text(&rows, &options)
    };
    let fingerprint = {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for listed in &rows {
            (listed.row.cookie, listed.row.state as u8).hash(&mut hasher);
            listed.owners.iter().for_each(|o| o.pid.hash(&mut hasher));
        }
        hasher.finish()
    };
    Ok((text, from_agent, fingerprint))
}

/// A user's name, or the uid when /etc/passwd (or NSS) has none.
fn user_name(uid: u32) -> String {
    uzers::get_user_by_uid(uid)
        .map_or_else(|| uid.to_string(), |user| user.name().to_string_lossy().into_owned())
}

/// Sets each row's queues, uid, inode and timer from a sock_diag dump of its namespace now,
/// and returns the TCP sockets' tcp_info when `info` is asked for. A row whose socket the
/// dump no longer has keeps its queues unknown.
fn kernel_facts(rows: &mut [Listed], info: bool) -> HashMap<u64, TcpInfoRecord> {
    let wanted: std::collections::BTreeSet<u32> = rows.iter().map(|l| l.row.netns).collect();
    let mut now: HashMap<u64, (SocketRow, Option<Box<TcpInfo>>)> = HashMap::new();
    for namespace in network_namespaces().into_iter().filter(|ns| wanted.contains(&ns.inode)) {
        match DiagSocket::open(&namespace.path, namespace.inode).and_then(|mut d| d.detailed(info))
        {
            Ok(found) => now.extend(found.into_iter().map(|(row, info)| (row.cookie, (row, info)))),
            Err(error) => tracing::warn!("netns {}: sock_diag failed: {error}", namespace.inode),
        }
    }
    let mut infos = HashMap::new();
    for listed in rows.iter_mut() {
        let Some((kernel, tcp_info)) = now.remove(&listed.row.cookie) else { continue };
        let row = &mut listed.row;
        (row.recv_q, row.send_q, row.uid, row.inode) =
            (kernel.recv_q, kernel.send_q, kernel.uid, kernel.inode);
        row.timer = kernel.timer.or(row.timer);
        listed.queues_known = true;
        if let Some(tcp_info) = tcp_info.filter(|_| info) {
            infos.insert(row.cookie, TcpInfoRecord::from(&*tcp_info));
        }
    }
    infos
}
