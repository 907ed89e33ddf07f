//! What `netwatch table` selects ([`TableSelect`], its flags and filter), resolved once
//! ([`Selection`]) and applied wherever the rows are: in the agent before it sends them, and
//! in the client to a one-shot snapshot's rows or an older agent's whole table.
use crate::{
    cli::TableSelect,
    host::{
        services::Services,
        snapshot::{Protocol, SocketRow},
    },
    kernel::events::{Family, TcpState},
    query::ss::{self as query, Endpoints, Query, StateSet},
    record::Listed,
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
    container: Option<String>,
    pod: Option<String>,
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
            container: args.container.clone(),
            pod: args.pod.clone(),
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

    /// Whether both TCP and UDP are shown (a Netid column then, as in `ss`).
    pub fn both_protocols(&self) -> bool {
        self.protocols.len() > 1
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
            && self
                .container
                .as_deref()
                .is_none_or(|c| listed.workload.as_deref().is_some_and(|w| w.matches_container(c)))
            && self
                .pod
                .as_deref()
                .is_none_or(|p| listed.workload.as_deref().is_some_and(|w| w.matches_pod(p)))
    }
}
