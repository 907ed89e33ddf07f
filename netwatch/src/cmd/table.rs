//! `netwatch table`: the socket table - kept by a running agent, or else from a one-shot
//! snapshot - filtered like `ss` and printed as text or JSON.
use std::collections::HashMap;

use anyhow::Context as _;

use crate::{
    cli::{TableArgs, TableSelect},
    error::Error,
    host::services::Services,
    host::snapshot::{Snapshot, SocketRow, Source, network_namespaces},
    output::table::{self, TextOptions},
    query::select::Selection,
    record::Listed,
    serve::api::{self, Command},
};

/// Rows of a snapshot with their owners and namespace names, in a stable order.
pub fn listed_from(snapshot: Snapshot) -> Vec<Listed> {
    let names: HashMap<u32, String> =
        snapshot.namespaces.iter().filter_map(|ns| Some((ns.inode, ns.name.clone()?))).collect();
    let mut owners = snapshot.owners;
    let mut rows: Vec<Listed> = snapshot
        .rows
        .into_iter()
        .map(|row: SocketRow| Listed {
            owners: owners.get(&row.inode).filter(|_| row.inode != 0).cloned().unwrap_or_default(),
            netns_name: names.get(&row.netns).cloned(),
            in_state: None,
            queues_known: true,
            owner_history: Vec::new(),
            row,
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
    let agent = if args.no_agent || args.from_proc {
        None
    } else {
        from_agent(&args.socket, &args.select).await?
    };
    let all = match agent {
        Some(rows) => rows,
        None => {
            if args.no_agent || args.from_proc {
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
    let text = if args.json {
        table::json_array(&rows)
    } else if args.ndjson {
        table::ndjson(&rows)
    } else {
        let services = (!args.numeric).then_some(&services);
        let netid = selection.both_protocols();
        let state = selection.shown_states().count() > 1;
        table::text(&rows, &TextOptions { services, timers: args.timers, netid, state })
    };
    super::emit(&text)
}
