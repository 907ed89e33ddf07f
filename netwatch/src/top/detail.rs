//! The detail overlay of `netwatch top`: one connection's history (each state with its
//! duration, owners, bytes, failure), or a listener's queues, as text lines.
use ratatui::{
    style::{Modifier, Style},
    text::{Line, Span},
};

use super::{
    model::Conn,
    text::{age, bytes, millis, owner_text},
    view::{Palette, Status},
};
use crate::{
    host::snapshot::Protocol,
    kernel::events::TcpState,
    output::{address::endpoint, table::ss_state},
    state::{history::History, stats::ListenerSummary},
};

/// What was asked for the connection on screen: its history (from the agent, or the
/// direct tracer), and for a listener its queues.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Detail {
    pub cookie: u64,
    pub history: Option<History>,
    pub listener: Option<ListenerSummary>,
    /// Why either could not be had.
    pub problem: Option<String>,
}

fn bold(text: impl Into<String>) -> Span<'static> {
    Span::styled(text.into(), Style::new().add_modifier(Modifier::BOLD))
}

pub fn lines(
    cookie: u64,
    conn: Option<&Conn>,
    detail: Option<&Detail>,
    status: &Status,
    ui: &super::ui::Ui,
    palette: Palette,
) -> Vec<Line<'static>> {
    let now_ns = status.now_ns;
    let mut lines = Vec::new();
    let detail = detail.filter(|d| d.cookie == cookie);
    let history = detail.and_then(|d| d.history.as_ref());
    match (conn, history) {
        (Some(conn), _) => {
            let row = conn.row();
            let protocol = if row.protocol == Protocol::Tcp { "tcp" } else { "udp" };
            let service = |port| ui.name_of(port, row.protocol);
            lines.push(Line::from(vec![
                bold(format!("{protocol} {}", ss_state(row.state))),
                Span::raw(format!(
                    "  {} -> {}  for {}",
                    endpoint(row.local, row.v6only, row.scope.as_deref(), service(row.local.1)),
                    endpoint(row.remote, row.v6only, None, service(row.remote.1)),
                    conn.in_state_ns(now_ns)
                        .map_or("an unknown time (older than netwatch)".into(), age),
                )),
            ]));
            lines.push(Line::raw(format!(
                "netns {}{}  cookie {cookie}  inode {}",
                row.netns,
                conn.listed.netns_name.as_ref().map_or(String::new(), |n| format!(" ({n})")),
                row.inode
            )));
            let holders: Vec<String> = conn
                .listed
                .owners
                .iter()
                .map(|h| {
                    let owner = owner_text(Some(h.pid), Some(&h.comm));
                    if h.fd >= 0 { format!("{owner} fd {}", h.fd) } else { owner }
                })
                .collect();
            lines.push(Line::from(vec![
                bold("Held by: "),
                Span::raw(if holders.is_empty() {
                    "no process (ss shows none either)".into()
                } else {
                    holders.join(", ")
                }),
            ]));
            let owners: Vec<String> = conn
                .listed
                .owner_history
                .iter()
                .map(|c| match c.ago {
                    // `ago` was counted when the row came: it has aged since.
                    Some(ago) => {
                        let since_row = now_ns.saturating_sub(conn.listed_at_ns);
                        format!("{} {} ago", c.owner, age(ago.as_nanos() as u64 + since_row))
                    }
                    None => format!("{} (at netwatch's start)", c.owner),
                })
                .collect();
            if !owners.is_empty() {
                lines.push(Line::from(vec![
                    bold("Owners, oldest first: "),
                    Span::raw(owners.join(" -> ")),
                ]));
            }
            let mut facts = Vec::new();
            if let Some(ns) = conn.connect_ns {
                facts.push(format!("handshake {}", millis(ns)));
            }
            facts.push(format!("retransmits {}", conn.retransmits));
            if let Some(t) = conn.traffic.as_deref() {
                facts.push(format!(
                    "sent {} ({}/s)  received {} ({}/s)",
                    bytes(t.sent),
                    t.sent_per_s.map_or("-".into(), |r| bytes(r as u64)),
                    bytes(t.received),
                    t.received_per_s.map_or("-".into(), |r| bytes(r as u64)),
                ));
            } else if row.protocol == Protocol::Tcp && row.state != TcpState::Listen {
                facts.push("bytes: shown once the row has been on screen for a refresh".into());
            }
            lines.push(Line::raw(facts.join("  ")));
        }
        (None, Some(h)) => {
            lines.push(Line::from(vec![
                bold(if h.closed { "closed" } else { "gone from the table" }),
                Span::raw(format!(
                    "  {} -> {}  netns {}  cookie {cookie}",
                    endpoint((h.laddr, h.lport), false, None, None),
                    endpoint((h.raddr, h.rport), false, None, None),
                    h.netns
                )),
            ]));
        }
        (None, None) => lines.push(Line::raw(format!("cookie {cookie}: no longer in the table"))),
    }
    if let Some(listener) = detail.and_then(|d| d.listener.as_ref()) {
        lines.push(Line::raw(""));
        lines.push(Line::from(bold("Listener")));
        let queue = match (listener.accept_queue, listener.backlog) {
            (Some(queue), Some(backlog)) => format!("{queue}/{backlog}"),
            _ => "unknown (the kernel could not be asked)".into(),
        };
        lines.push(Line::raw(format!(
            "accept queue {queue}  half-open {}  SYN-ACK retransmits {}",
            listener.half_open.map_or("unknown".into(), |n| n.to_string()),
            listener.synack_retransmits
        )));
        lines.push(Line::raw(format!(
            "handshakes {}  accepted {}  waiting now {} (peak {})",
            listener.handshakes, listener.accepted, listener.queued, listener.peak_queued
        )));
    }
    lines.push(Line::raw(""));
    match history {
        Some(h) => history_lines(h, &mut lines, status.offset, palette),
        None => lines.push(Line::raw(match detail.and_then(|d| d.problem.as_deref()) {
            Some(problem) => format!("History: {problem}"),
            None => "History: asking...".to_string(),
        })),
    }
    lines
}

fn history_lines(
    h: &History,
    lines: &mut Vec<Line<'static>>,
    offset: chrono::FixedOffset,
    palette: Palette,
) {
    lines.push(Line::from(bold("History")));
    if let Some(state) = h.snapshot_state {
        let owner = h.snapshot_owner.as_ref().map_or(String::new(), |o| format!(" held by {o}"));
        lines.push(Line::raw(format!("  {state} when netwatch started{owner}")));
    }
    for (i, step) in h.steps.iter().enumerate() {
        let spent = h.steps.get(i + 1).and_then(|next| next.duration_ns);
        let owner = owner_text(step.pid, step.comm.as_ref());
        let time = step.time.with_timezone(&offset).format("%H:%M:%S%.6f");
        let entered = format!("{:<12}", step.new.to_string());
        let duration = match (spent, h.closed || i + 1 < h.steps.len()) {
            (Some(ns), _) => millis(ns),
            (None, true) => "-".into(),
            (None, false) => "(now)".into(),
        };
        lines.push(Line::raw(format!("  {time}  {entered} {duration:>9}  {owner}")));
    }
    if h.lost_events {
        lines.push(Line::styled(
            "  events were lost while it was open: steps may be missing",
            palette.failure(),
        ));
    }
    let mut end = Vec::new();
    if let Some(failure) = h.failure {
        end.push(Span::styled(format!("failed: {}", failure.name()), palette.failure()));
    }
    if let Some(ending) = h.ending {
        end.push(Span::raw(format!(" ended: {}", ending.name())));
    }
    if let Some(life) = h.lifespan_ns {
        end.push(Span::raw(format!(" lived {}", millis(life))));
    }
    if let (Some(sent), Some(received)) = (h.bytes_sent, h.bytes_received) {
        end.push(Span::raw(format!(" sent {} received {}", bytes(sent), bytes(received))));
    }
    let retransmits =
        h.retransmits.map_or(h.retransmits_seen, |n| u64::from(n).max(h.retransmits_seen));
    if retransmits > 0 {
        end.push(Span::raw(format!(" retransmits {retransmits}")));
    }
    if !end.is_empty() {
        lines.push(Line::from(end));
    }
}
