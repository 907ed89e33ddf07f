//! `netwatch table`: the socket table - kept by a running agent, or else from a one-shot
//! snapshot - filtered like `ss` and printed as text or JSON.
use std::collections::HashMap;

use anyhow::Context as _;

use crate::{
    cli::{TableArgs, TableSelect},
    error::Error,
    host::services::Services,
    host::snapshot::{Protocol, Snapshot, SocketRow, Source, network_namespaces},
    kernel::events::{Family, TcpState},
    output::table::{self, TextOptions},
    query::ss::{self as query, Endpoints, Query, StateSet},
    record::Listed,
    serve::api::{self, Command},
    state::tracer::Scope,
};

/// Everything `netwatch table` was asked for, resolved before any socket is read.
pub struct Selection {
    protocols: Vec<Protocol>,
    family: Option<Family>,
    /// States per protocol when the filter names none.
    tcp_states: StateSet,
    udp_states: StateSet,
    query: Query,
    pid: Option<u32>,
    comm: Option<String>,
    netns: Option<String>,
}

impl Selection {
    pub fn new(args: &TableSelect, services: &Services) -> Result<Selection, query::QueryError> {
        let query = query::parse(&args.filter, services)?;
        let (tcp_states, udp_states) = match query.states {
            Some(states) => (states, states),
            None if args.all => (StateSet::ALL, StateSet::ALL),
            None if args.listening => {
                (StateSet::of(&[TcpState::Listen]), StateSet::of(&[TcpState::Close]))
            }
            None => (StateSet::connected_default(), StateSet::of(&[TcpState::Established])),
        };
        let protocols = match (args.tcp, args.udp) {
            (true, false) => vec![Protocol::Tcp],
            (false, true) => vec![Protocol::Udp],
            _ => vec![Protocol::Tcp, Protocol::Udp],
        };
        let family = match (args.ipv4, args.ipv6) {
            (true, _) => Some(Family::Ipv4),
            (_, true) => Some(Family::Ipv6),
            _ => None,
        };
        Ok(Selection {
            protocols,
            family,
            tcp_states,
            udp_states,
            query,
            pid: args.pid,
            comm: args.comm.clone(),
            netns: args.netns.clone(),
        })
    }

    /// The states a row can be shown in (UDP sockets are only ever CLOSE or ESTABLISHED).
    pub fn shown_states(&self) -> impl Iterator<Item = TcpState> + '_ {
        TcpState::ALL.into_iter().filter(|state| {
            self.protocols.iter().any(|protocol| match protocol {
                Protocol::Tcp => self.tcp_states.contains(*state),
                Protocol::Udp => {
                    matches!(state, TcpState::Close | TcpState::Established)
                        && self.udp_states.contains(*state)
                }
            })
        })
    }

    /// What the selected rows can include that only the kernel can confirm.
    pub fn scope(&self) -> Scope {
        let shows = |wanted| self.shown_states().any(|state| state == wanted);
        let tcp = self.protocols.contains(&Protocol::Tcp);
        Scope {
            timewait: tcp && shows(TcpState::TimeWait),
            fin_wait2: tcp && shows(TcpState::FinWait2),
            half_open: tcp && shows(TcpState::SynRecv),
        }
    }

    /// What can be told from the socket alone: protocol, family, state and the filter.
    pub fn keeps_row(&self, row: &SocketRow) -> bool {
        let states = match row.protocol {
            Protocol::Tcp => self.tcp_states,
            Protocol::Udp => self.udp_states,
        };
        self.protocols.contains(&row.protocol)
            && self.family.is_none_or(|f| f == row.family)
            && states.contains(row.state)
            && self.query.expr.as_ref().is_none_or(|e| {
                let ends = Endpoints { local: row.local, remote: row.remote };
                e.matches_scoped(&ends, row.scope.as_deref())
            })
    }

    pub fn keeps(&self, listed: &Listed) -> bool {
        let row = &listed.row;
        self.keeps_row(row)
            && self.pid.is_none_or(|pid| listed.owners.iter().any(|o| o.pid == pid))
            && self.comm.as_ref().is_none_or(|c| listed.owners.iter().any(|o| o.comm == *c))
            && self.netns.as_ref().is_none_or(|ns| {
                row.netns.to_string() == *ns || listed.netns_name.as_deref() == Some(ns.as_str())
            })
    }
}

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
    // An agent older than the selection sends every row, when asked without it.
    if line.contains(r#""type":"error""#) && line.contains("unknown field `select`") {
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
        let netid = selection.protocols.len() > 1;
        let state = selection.shown_states().count() > 1;
        table::text(&rows, &TextOptions { services, timers: args.timers, netid, state })
    };
    super::emit(&text)
}
