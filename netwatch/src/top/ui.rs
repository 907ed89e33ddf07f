//! What the user chose in `netwatch top`: the focused pane, selection, sort, filters,
//! grouping and open overlay; the keys that change them; and the rows that choice shows, in
//! order. Pure: keys and the model in, the visible rows out.
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::model::{Conn, Model};
use crate::{
    cli::TableSelect, host::services::Services, kernel::events::TcpState, query::select::Selection,
    record::StreamRecord,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pane {
    Connections,
    Transitions,
}

/// The columns of the connections pane, in order; each can be sorted on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Column {
    State,
    Local,
    Remote,
    Process,
    InState,
    Connect,
    Retransmits,
    Sent,
    Received,
}

impl Column {
    pub const ALL: [Column; 9] = [
        Column::State,
        Column::Local,
        Column::Remote,
        Column::Process,
        Column::InState,
        Column::Connect,
        Column::Retransmits,
        Column::Sent,
        Column::Received,
    ];

    /// Columns one sorts to find the most: largest first unless reversed.
    pub fn most_first(self) -> bool {
        matches!(self, Column::Retransmits | Column::Sent | Column::Received)
    }

    pub fn title(self) -> &'static str {
        match self {
            Column::State => "STATE",
            Column::Local => "LOCAL",
            Column::Remote => "REMOTE",
            Column::Process => "PROCESS",
            Column::InState => "IN STATE",
            Column::Connect => "CONNECT",
            Column::Retransmits => "RTX",
            Column::Sent => "SENT/s",
            Column::Received => "RECV/s",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grouping {
    None,
    Process,
    Remote,
}

/// What covers the panes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Overlay {
    None,
    Help,
    /// The connection with this cookie.
    Detail(u64),
    /// The filter bar, with the text being typed.
    Filter(String),
}

/// The state quick key's cycle.
const STATE_CYCLE: [Option<TcpState>; 7] = [
    None,
    Some(TcpState::Established),
    Some(TcpState::Listen),
    Some(TcpState::SynSent),
    Some(TcpState::TimeWait),
    Some(TcpState::CloseWait),
    Some(TcpState::FinWait2),
];

/// What a key asks of the loop beyond changing this state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    None,
    Quit,
    /// A detail was opened: fetch its history.
    OpenDetail(u64),
    /// Ctrl-Z: stop as a shell job, until continued.
    Suspend,
}

/// A group's line: its name, what Enter filters on, and its sockets by state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub pid: Option<u32>,
    /// The remote address, and port when the group is one remote service.
    pub remote: Option<(std::net::IpAddr, Option<u16>)>,
    pub sockets: usize,
    pub established: usize,
    pub listening: usize,
    pub time_wait: usize,
}

pub struct Ui {
    pub focus: Pane,
    pub sort: Column,
    pub descending: bool,
    pub grouping: Grouping,
    pub overlay: Overlay,
    /// The command line's selection (protocols, family, netns...) and the filter bar's text.
    base: TableSelect,
    pub filter_text: String,
    pub filter_error: Option<String>,
    selection: Selection,
    pub state_filter: Option<TcpState>,
    pub pid_filter: Option<u32>,
    pub port_filter: Option<u16>,
    /// Index of the selected row in each pane (the transitions pane counts from the newest).
    pub selected: usize,
    pub selected_line: usize,
    /// The connection the selection stays on while rows move (re-sorted, added, removed).
    pinned: Option<u64>,
    /// A key changed what is shown since the rows were last arranged.
    stale: bool,
    /// The first row each pane shows.
    pub connections_offset: usize,
    pub transitions_offset: usize,
    /// The rows shown, in order (cookies), and groups in group mode.
    pub order: Vec<u64>,
    pub groups: Vec<Group>,
    /// Sockets by state among those the filters keep, for the header.
    pub shown_by_state: Vec<(TcpState, usize)>,
    /// Port names the filter accepts, and those shown (none with `-n`).
    services: Services,
    names: Services,
}

impl Ui {
    pub fn new(base: TableSelect, services: Services, names: Services) -> anyhow::Result<Ui> {
        let filter_text = base.filter.join(" ");
        let selection = Selection::new(&all_states(&base), &services)?;
        Ok(Ui {
            focus: Pane::Connections,
            sort: Column::InState,
            descending: false,
            grouping: Grouping::None,
            overlay: Overlay::None,
            base,
            filter_text,
            filter_error: None,
            selection,
            state_filter: None,
            pid_filter: None,
            port_filter: None,
            selected: 0,
            selected_line: 0,
            pinned: None,
            stale: true,
            connections_offset: 0,
            transitions_offset: 0,
            order: Vec::new(),
            groups: Vec::new(),
            shown_by_state: Vec::new(),
            services,
            names,
        })
    }

    /// The service name shown for a port (none with `-n`).
    pub fn name_of(&self, port: u16, protocol: crate::host::snapshot::Protocol) -> Option<&str> {
        self.names.name_of(port, protocol)
    }

    /// The cookie of the selected connection, in either pane.
    pub fn selected_cookie(&self, model: &Model) -> Option<u64> {
        match self.focus {
            Pane::Connections if self.grouping == Grouping::None => {
                self.order.get(self.selected).copied()
            }
            Pane::Connections => None,
            Pane::Transitions => {
                // Counted from the newest line shown: while paused, those that came since are not.
                let shown = model.stream.len().saturating_sub(model.unseen);
                let index = shown.checked_sub(1 + self.selected_line)?;
                match model.stream.get(index)? {
                    StreamRecord::Transition(t) => t.cookie,
                    StreamRecord::Retransmit(r) => Some(r.cookie),
                    _ => None,
                }
            }
        }
    }

    /// Handles one key; `page` is how many rows the focused pane shows.
    pub fn key(&mut self, key: KeyEvent, model: &mut Model, page: usize) -> Action {
        if key.modifiers.contains(KeyModifiers::CONTROL) {
            match key.code {
                KeyCode::Char('c') => return Action::Quit,
                KeyCode::Char('z') => return Action::Suspend,
                _ => {}
            }
        }
        if let Overlay::Filter(text) = &mut self.overlay {
            match key.code {
                KeyCode::Enter => {
                    let text = std::mem::take(text);
                    self.overlay = Overlay::None;
                    self.set_filter(&text);
                    self.stale = true;
                }
                KeyCode::Esc => self.overlay = Overlay::None,
                KeyCode::Backspace => {
                    text.pop();
                }
                KeyCode::Char(c) => text.push(c),
                _ => {}
            }
            return Action::None;
        }
        if self.overlay != Overlay::None {
            if matches!(key.code, KeyCode::Esc | KeyCode::Enter | KeyCode::Char('?' | 'q')) {
                self.overlay = Overlay::None;
            }
            return Action::None;
        }
        let rows = match self.focus {
            Pane::Connections if self.grouping == Grouping::None => self.order.len(),
            Pane::Connections => self.groups.len(),
            Pane::Transitions => model.stream.len().saturating_sub(model.unseen),
        };
        let at = match self.focus {
            Pane::Connections => &mut self.selected,
            Pane::Transitions => &mut self.selected_line,
        };
        match key.code {
            KeyCode::Char('q') => return Action::Quit,
            KeyCode::Char('?') | KeyCode::F(1) => self.overlay = Overlay::Help,
            KeyCode::Up | KeyCode::Char('k') => *at = at.saturating_sub(1),
            KeyCode::Down | KeyCode::Char('j') => *at = (*at + 1).min(rows.saturating_sub(1)),
            KeyCode::PageUp => *at = at.saturating_sub(page.max(1)),
            KeyCode::PageDown => *at = (*at + page.max(1)).min(rows.saturating_sub(1)),
            KeyCode::Home => *at = 0,
            KeyCode::End => *at = rows.saturating_sub(1),
            _ => {}
        }
        if matches!(
            key.code,
            KeyCode::Up
                | KeyCode::Down
                | KeyCode::Char('j' | 'k')
                | KeyCode::PageUp
                | KeyCode::PageDown
                | KeyCode::Home
                | KeyCode::End
        ) {
            if self.focus == Pane::Connections && self.grouping == Grouping::None {
                self.pinned = self.order.get(self.selected).copied();
            }
            return Action::None;
        }
        // Any other key may change what is shown: the next key that acts on the selection
        // must see the rows arranged again first.
        self.stale = true;
        match key.code {
            KeyCode::Tab | KeyCode::BackTab => {
                self.focus = match self.focus {
                    Pane::Connections => Pane::Transitions,
                    Pane::Transitions => Pane::Connections,
                }
            }
            KeyCode::Enter => return self.enter(model),
            KeyCode::Char('/') => self.overlay = Overlay::Filter(self.filter_text.clone()),
            KeyCode::Char(' ') => model.set_paused(!model.paused),
            KeyCode::Char('>') | KeyCode::Right => self.sort = next_column(self.sort, 1),
            KeyCode::Char('<') | KeyCode::Left => self.sort = next_column(self.sort, -1),
            KeyCode::Char('r' | 'I') => self.descending = !self.descending,
            KeyCode::Char('s') => {
                let at = STATE_CYCLE.iter().position(|s| *s == self.state_filter).unwrap_or(0);
                self.state_filter = STATE_CYCLE[(at + 1) % STATE_CYCLE.len()];
                self.unpin();
            }
            KeyCode::Char('p') => {
                self.pid_filter = match self.pid_filter {
                    Some(_) => None,
                    None => self.selected_conn(model).and_then(|c| c.owner().0).map(|o| o.pid),
                };
                self.unpin();
            }
            KeyCode::Char('o') => {
                self.port_filter = match self.port_filter {
                    Some(_) => None,
                    None => self.selected_conn(model).map(service_port),
                };
                self.unpin();
            }
            KeyCode::Char('c') => {
                (self.state_filter, self.pid_filter, self.port_filter) = (None, None, None);
                self.set_filter("");
            }
            KeyCode::Char('g') => {
                self.grouping = match self.grouping {
                    Grouping::None => Grouping::Process,
                    Grouping::Process => Grouping::Remote,
                    Grouping::Remote => Grouping::None,
                };
                self.unpin();
            }
            _ => {}
        }
        Action::None
    }

    /// Selects the first row, for a new filter or grouping.
    fn unpin(&mut self) {
        self.selected = 0;
        self.pinned = None;
    }

    fn selected_conn<'m>(&self, model: &'m Model) -> Option<&'m Conn> {
        model.conns.get(&self.selected_cookie(model)?)
    }

    /// Enter: a connection's detail, or a group's sockets.
    fn enter(&mut self, model: &Model) -> Action {
        if self.focus == Pane::Connections && self.grouping != Grouping::None {
            if let Some(group) = self.groups.get(self.selected).cloned() {
                self.grouping = Grouping::None;
                self.unpin();
                if let Some(pid) = group.pid {
                    self.pid_filter = Some(pid);
                }
                match group.remote {
                    Some((address, Some(port))) => {
                        self.set_filter(&format!("dst {} dport = :{port}", bare(address)));
                    }
                    Some((address, None)) => self.set_filter(&format!("dst {}", bare(address))),
                    None => {}
                }
            }
            return Action::None;
        }
        match self.selected_cookie(model) {
            Some(cookie) => {
                self.overlay = Overlay::Detail(cookie);
                Action::OpenDetail(cookie)
            }
            None => Action::None,
        }
    }

    /// Parses the filter bar's text, the language of `netwatch table`; a bad one is shown
    /// and the previous filter stays.
    pub fn set_filter(&mut self, text: &str) {
        let mut select = all_states(&self.base);
        select.filter = text.split_whitespace().map(String::from).collect();
        match Selection::new(&select, &self.services) {
            Ok(selection) => {
                self.selection = selection;
                self.filter_text = text.trim().to_string();
                self.filter_error = None;
                self.unpin();
            }
            Err(error) => self.filter_error = Some(format!("bad filter: {error}")),
        }
    }

    pub fn keeps(&self, conn: &Conn) -> bool {
        let row = conn.row();
        self.selection.keeps(&conn.listed)
            && self.state_filter.is_none_or(|state| row.state == state)
            && self.pid_filter.is_none_or(|pid| conn.listed.owners.iter().any(|o| o.pid == pid))
            && self.port_filter.is_none_or(|port| row.local.1 == port || row.remote.1 == port)
    }

    /// Recomputes the rows shown and their order (and the groups, and the header's counts).
    /// Whether a key changed what is shown since the rows were last arranged.
    pub fn stale(&self) -> bool {
        self.stale
    }

    pub fn arrange(&mut self, model: &Model, now_ns: u64) {
        self.stale = false;
        let mut kept: Vec<&Conn> = model.conns.values().filter(|c| self.keeps(c)).collect();
        let mut by_state = std::collections::BTreeMap::new();
        for conn in &kept {
            *by_state.entry(conn.row().state as u8).or_insert(0usize) += 1;
        }
        self.shown_by_state = by_state
            .into_iter()
            .filter_map(|(state, n)| Some((TcpState::from_kernel(state)?, n)))
            .collect();
        self.shown_by_state.sort_by_key(|(state, n)| (std::cmp::Reverse(*n), *state as u8));
        sort(&mut kept, self.sort, self.descending, now_ns);
        self.groups = match self.grouping {
            Grouping::None => Vec::new(),
            grouping => groups(&kept, grouping),
        };
        self.order = kept.iter().map(|c| c.row().cookie).collect();
        let rows =
            if self.grouping == Grouping::None { self.order.len() } else { self.groups.len() };
        if let Some(at) = self.pinned.and_then(|c| self.order.iter().position(|o| *o == c)) {
            self.selected = at;
        }
        self.selected = self.selected.min(rows.saturating_sub(1));
        if self.grouping == Grouping::None {
            self.pinned = self.order.get(self.selected).copied();
        }
        let lines = model.stream.len().saturating_sub(model.unseen);
        self.selected_line = self.selected_line.min(lines.saturating_sub(1));
    }
}

/// The command line's selection, showing every state unless it names some (or `-l`).
fn all_states(base: &TableSelect) -> TableSelect {
    TableSelect { all: !base.listening, ..base.clone() }
}

fn next_column(column: Column, step: isize) -> Column {
    let at = Column::ALL.iter().position(|c| *c == column).unwrap_or(0) as isize;
    let count = Column::ALL.len() as isize;
    Column::ALL[(at + step).rem_euclid(count) as usize]
}

/// The port that names a connection's service: a listener's or server's own port, else the
/// remote one.
fn service_port(conn: &Conn) -> u16 {
    let row = conn.row();
    if row.state == TcpState::Listen || row.remote.1 == 0 || row.local.1 < row.remote.1 {
        row.local.1
    } else {
        row.remote.1
    }
}

/// An address as the filter language takes it (v4-mapped IPv6 as IPv4).
fn bare(address: std::net::IpAddr) -> String {
    match address {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(v6.to_string(), |v4| v4.to_string()),
        v4 => v4.to_string(),
    }
}

fn sort(rows: &mut [&Conn], column: Column, descending: bool, now_ns: u64) {
    // Unknowns sort last either way; ties keep a stable order by cookie.
    fn key<T: Ord>(
        value: Option<T>,
        descending: bool,
    ) -> (bool, Option<std::cmp::Reverse<T>>, Option<T>) {
        match value {
            None => (true, None, None),
            Some(v) if descending => (false, Some(std::cmp::Reverse(v)), None),
            Some(v) => (false, None, Some(v)),
        }
    }
    let rate = |r: Option<f64>| r.map(|r| (r * 1000.0) as u64);
    let descending = descending != column.most_first();
    match column {
        Column::State => rows
            .sort_by_cached_key(|c| key(Some((c.row().state as u8, c.row().cookie)), descending)),
        Column::Local => {
            rows.sort_by_cached_key(|c| key(Some((c.row().local, c.row().cookie)), descending))
        }
        Column::Remote => {
            rows.sort_by_cached_key(|c| key(Some((c.row().remote, c.row().cookie)), descending))
        }
        // A socket no process holds sorts with the process that last had it, after its held ones.
        Column::Process => rows.sort_by_cached_key(|c| {
            let (held, last) = (c.owner().0, c.last_owner.clone());
            let unheld = held.is_none();
            key(held.or(last).map(|o| (o.comm, o.pid, unheld, c.row().cookie)), descending)
        }),
        Column::InState => rows.sort_by_cached_key(|c| {
            key(c.in_state_ns(now_ns).map(|n| (n, c.row().cookie)), descending)
        }),
        Column::Connect => {
            rows.sort_by_cached_key(|c| key(c.connect_ns.map(|n| (n, c.row().cookie)), descending))
        }
        Column::Retransmits => {
            rows.sort_by_cached_key(|c| key(Some((c.retransmits, c.row().cookie)), descending))
        }
        Column::Sent => rows.sort_by_cached_key(|c| {
            key(
                rate(c.traffic.as_ref().and_then(|t| t.sent_per_s)).map(|r| (r, c.row().cookie)),
                descending,
            )
        }),
        Column::Received => rows.sort_by_cached_key(|c| {
            key(
                rate(c.traffic.as_ref().and_then(|t| t.received_per_s))
                    .map(|r| (r, c.row().cookie)),
                descending,
            )
        }),
    }
}

fn groups(rows: &[&Conn], grouping: Grouping) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for conn in rows {
        let (name, pid, remote) = match grouping {
            // A socket no process holds any more counts for the process that last had it.
            Grouping::Process => match conn.owner().0.or_else(|| conn.last_owner.clone()) {
                Some(owner) => (owner.to_string(), Some(owner.pid), None),
                None => ("(no process)".to_string(), None, None),
            },
            _ => {
                let remote = conn.row().remote;
                // A server's peers connect from ephemeral ports: its peer is the address.
                let server = service_port(conn) == conn.row().local.1;
                if remote.1 == 0 {
                    ("(not connected)".to_string(), None, None)
                } else if server {
                    (bare(remote.0), None, Some((remote.0, None)))
                } else {
                    let name = crate::output::address::endpoint(remote, false, None, None);
                    (name, None, Some((remote.0, Some(remote.1))))
                }
            }
        };
        let at = *index.entry(name.clone()).or_insert_with(|| {
            groups.push(Group {
                name,
                pid,
                remote,
                sockets: 0,
                established: 0,
                listening: 0,
                time_wait: 0,
            });
            groups.len() - 1
        });
        let group = &mut groups[at];
        group.sockets += 1;
        match conn.row().state {
            TcpState::Established => group.established += 1,
            TcpState::Listen => group.listening += 1,
            TcpState::TimeWait => group.time_wait += 1,
            _ => {}
        }
    }
    groups.sort_by(|a, b| b.sockets.cmp(&a.sockets).then_with(|| a.name.cmp(&b.name)));
    groups
}
