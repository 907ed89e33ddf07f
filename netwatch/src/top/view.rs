//! Draws `netwatch top`: header, connections pane, transitions pane, footer, and the help,
//! detail and filter overlays. Only the rows on screen are built.
use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Clear, Paragraph, Row, Table, Wrap},
};

use super::{
    Detail,
    model::{Conn, Model},
    text::{age, fit_owner, keep_end, millis, owner_text, rate, short},
    ui::{Column, Grouping, Overlay, Pane, Ui},
};
use crate::{
    host::snapshot::Protocol,
    kernel::events::TcpState,
    output::{address::endpoint, table::ss_state},
    record::{StreamRecord, TransitionRecord},
};

/// Colours, or none (`NO_COLOR`, a dumb terminal): then only bold and reverse video.
#[derive(Clone, Copy, Debug)]
pub struct Palette {
    pub color: bool,
}

impl Palette {
    /// Colours unless `NO_COLOR` is set (to anything non-empty) or the terminal is dumb.
    pub fn from_env() -> Palette {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        Palette { color: !no_color && !dumb }
    }

    fn fg(self, color: Color) -> Style {
        if self.color { Style::new().fg(color) } else { Style::new() }
    }

    /// A state's colour by family: open (green), opening (yellow), closing (magenta),
    /// listening (cyan).
    fn state(self, state: TcpState) -> Style {
        use TcpState::*;
        match state {
            Established => self.fg(Color::Green),
            SynSent | SynRecv | NewSynRecv => self.fg(Color::Yellow),
            Listen => self.fg(Color::Cyan),
            Close => self.fg(Color::Blue),
            FinWait1 | FinWait2 | TimeWait | CloseWait | LastAck | Closing => {
                self.fg(Color::Magenta)
            }
        }
    }

    pub fn failure(self) -> Style {
        self.fg(Color::Red).add_modifier(Modifier::BOLD)
    }

    fn dim(self) -> Style {
        if self.color { Style::new().fg(Color::DarkGray) } else { Style::new() }
    }

    fn selected(self) -> Style {
        Style::new().add_modifier(Modifier::REVERSED)
    }

    fn title(self) -> Style {
        Style::new().add_modifier(Modifier::BOLD)
    }
}

/// What the header says about where the data comes from.
pub struct Status<'a> {
    pub source: &'a str,
    pub now_ns: u64,
    pub wall: chrono::DateTime<chrono::Utc>,
    /// The local time zone's offset, for the times shown.
    pub offset: chrono::FixedOffset,
    pub handshakes_per_s: f64,
    pub failures_per_s: f64,
}

/// How many rows the connections pane shows, for paging (set by the last draw).
pub fn draw(
    frame: &mut Frame,
    model: &Model,
    ui: &mut Ui,
    status: &Status,
    detail: Option<&Detail>,
    palette: Palette,
) -> usize {
    let [header, body, footer] =
        Layout::vertical([Constraint::Length(2), Constraint::Min(4), Constraint::Length(1)])
            .areas(frame.area());
    draw_header(frame, header, model, ui, status, palette);
    let [connections, transitions] =
        Layout::vertical([Constraint::Percentage(62), Constraint::Percentage(38)]).areas(body);
    let page = connections.height.saturating_sub(2) as usize;
    if ui.grouping == Grouping::None {
        draw_connections(frame, connections, model, ui, status.now_ns, palette);
    } else {
        draw_groups(frame, connections, ui, palette);
    }
    draw_transitions(frame, transitions, model, ui, status.offset, palette);
    draw_footer(frame, footer, ui, palette);
    match &ui.overlay {
        Overlay::Help => draw_help(frame, palette),
        Overlay::Detail(cookie) => draw_detail(frame, *cookie, model, detail, status, ui, palette),
        Overlay::Filter(_) | Overlay::None => {}
    }
    page
}

fn draw_header(
    frame: &mut Frame,
    area: Rect,
    model: &Model,
    ui: &Ui,
    status: &Status,
    palette: Palette,
) {
    let shown: usize = ui.shown_by_state.iter().map(|(_, n)| n).sum();
    let lost = Span::styled(
        format!(" lost {}", model.lost),
        if model.lost > 0 { palette.failure() } else { Style::new() },
    );
    let first = Line::from(vec![
        Span::styled("netwatch top", palette.title()),
        Span::raw(format!(
            " {} | {} ",
            status.wall.with_timezone(&status.offset).format("%H:%M:%S"),
            status.source
        )),
        Span::raw(format!("| {shown}/{} sockets |", model.conns.len())),
        lost,
    ]);
    let mut second = vec![Span::raw(format!("handshakes {:.1}/s  ", status.handshakes_per_s))];
    second.push(Span::styled(
        format!("failures {:.1}/s", status.failures_per_s),
        if status.failures_per_s > 0.0 { palette.failure() } else { Style::new() },
    ));
    second.push(Span::raw(" |"));
    for (state, count) in &ui.shown_by_state {
        second.push(Span::styled(format!(" {} {count}", ss_state(*state)), palette.state(*state)));
    }
    frame.render_widget(Paragraph::new(vec![first, Line::from(second)]), area);
}

fn pane_block(title: String, focused: bool, palette: Palette) -> Block<'static> {
    let style = if focused { palette.title() } else { Style::new() };
    Block::new().borders(Borders::TOP).title(Span::styled(title, style))
}

/// Each column's width: fixed ones, and the addresses sharing what is left; traffic only
/// on terminals wide enough for it.
fn columns(width: u16) -> Vec<(Column, u16)> {
    let mut columns = vec![
        (Column::State, Constraint::Length(10)),
        (Column::Local, Constraint::Fill(1)),
        (Column::Remote, Constraint::Fill(1)),
        (Column::Process, Constraint::Length(if width >= 110 { 22 } else { 15 })),
        (Column::InState, Constraint::Length(8)),
        (Column::Connect, Constraint::Length(7)),
        (Column::Retransmits, Constraint::Length(3)),
    ];
    if width >= 110 {
        columns.push((Column::Sent, Constraint::Length(7)));
        columns.push((Column::Received, Constraint::Length(7)));
    }
    let area = Rect { x: 0, y: 0, width, height: 1 };
    let widths = Layout::horizontal(columns.iter().map(|(_, c)| *c)).spacing(1).split(area);
    columns.iter().zip(widths.iter()).map(|((column, _), rect)| (*column, rect.width)).collect()
}

fn draw_connections(
    frame: &mut Frame,
    area: Rect,
    model: &Model,
    ui: &mut Ui,
    now_ns: u64,
    palette: Palette,
) {
    let mut title = format!(
        " Connections: {} shown, sorted by {}{}",
        ui.order.len(),
        ui.sort.title(),
        if ui.descending { " (reversed)" } else { "" }
    );
    for (name, on) in [
        ("state", ui.state_filter.map(|s| ss_state(s).to_string())),
        ("pid", ui.pid_filter.map(|p| p.to_string())),
        ("port", ui.port_filter.map(|p| p.to_string())),
        ("filter", (!ui.filter_text.is_empty()).then(|| ui.filter_text.clone())),
    ] {
        if let Some(value) = on {
            title.push_str(&format!(", {name}: {value}"));
        }
    }
    title.push(' ');
    let block = pane_block(title, ui.focus == Pane::Connections, palette);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let page = inner.height.saturating_sub(1) as usize;
    let offset = scroll(&mut ui.connections_offset, ui.selected, page);
    let columns = columns(inner.width);
    let header = Row::new(columns.iter().map(|(c, _)| {
        let mark = match (*c == ui.sort, ui.descending != c.most_first()) {
            (false, _) => "",
            (true, true) => "v",
            (true, false) => "^",
        };
        Cell::from(format!("{}{mark}", c.title()))
    }))
    .style(palette.title());
    let rows = ui.order.iter().enumerate().skip(offset).take(page).filter_map(|(i, cookie)| {
        let conn = model.conns.get(cookie)?;
        let row = Row::new(columns.iter().map(|(c, w)| cell(*c, *w, conn, now_ns, ui, palette)));
        let focused = i == ui.selected && ui.focus == Pane::Connections;
        Some(if focused { row.style(palette.selected()) } else { row })
    });
    let widths: Vec<Constraint> = columns.iter().map(|(_, w)| Constraint::Length(*w)).collect();
    frame.render_widget(Table::new(rows, widths).header(header).column_spacing(1), inner);
}

/// Keeps `selected` within the window starting at `offset`; returns the new offset.
fn scroll(offset: &mut usize, selected: usize, page: usize) -> usize {
    if selected < *offset {
        *offset = selected;
    } else if page > 0 && selected >= *offset + page {
        *offset = selected + 1 - page;
    }
    *offset
}

fn cell(
    column: Column,
    width: u16,
    conn: &Conn,
    now_ns: u64,
    ui: &Ui,
    palette: Palette,
) -> Cell<'static> {
    let row = conn.row();
    let service = |port: u16| ui.name_of(port, row.protocol);
    match column {
        // TCP rows are most rows: only UDP ones say their protocol.
        Column::State => {
            let text = match row.protocol {
                Protocol::Tcp => ss_state(row.state).to_string(),
                Protocol::Udp => format!("udp {}", ss_state(row.state)),
            };
            Cell::from(text).style(palette.state(row.state))
        }
        Column::Local => Cell::from(keep_end(
            endpoint(row.local, row.v6only, row.scope.as_deref(), service(row.local.1)),
            width,
        )),
        Column::Remote => Cell::from(keep_end(
            endpoint(row.remote, row.v6only, None, service(row.remote.1)),
            width,
        )),
        Column::Process => {
            let (owner, holders) = conn.owner();
            match (owner, &conn.last_owner) {
                (Some(owner), _) => {
                    let more =
                        if holders > 1 { format!("+{}", holders - 1) } else { String::new() };
                    Cell::from(fit_owner(&owner, "", &more, width))
                }
                // Held by no process any more: who had it, in parentheses.
                (None, Some(last)) => {
                    Cell::from(fit_owner(last, "(", ")", width)).style(palette.dim())
                }
                (None, None) => Cell::from("-"),
            }
        }
        Column::InState => Cell::from(conn.in_state_ns(now_ns).map_or("-".into(), age)),
        Column::Connect => Cell::from(conn.connect_ns.map_or(String::new(), millis)),
        Column::Retransmits => {
            let style = if conn.retransmits > 0 { palette.failure() } else { Style::new() };
            Cell::from(if conn.retransmits > 0 {
                conn.retransmits.to_string()
            } else {
                String::new()
            })
            .style(style)
        }
        Column::Sent => {
            Cell::from(conn.traffic.as_ref().and_then(|t| t.sent_per_s).map_or(String::new(), rate))
        }
        Column::Received => Cell::from(
            conn.traffic.as_ref().and_then(|t| t.received_per_s).map_or(String::new(), rate),
        ),
    }
}

fn draw_groups(frame: &mut Frame, area: Rect, ui: &mut Ui, palette: Palette) {
    let by = if ui.grouping == Grouping::Process { "process" } else { "remote endpoint" };
    let title = format!(
        " Grouped by {by}: {} groups (Enter: show its sockets, g: next grouping) ",
        ui.groups.len()
    );
    let block = pane_block(title, ui.focus == Pane::Connections, palette);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let page = inner.height.saturating_sub(1) as usize;
    let offset = scroll(&mut ui.connections_offset, ui.selected, page);
    let header =
        Row::new(["GROUP", "SOCKETS", "ESTAB", "LISTEN", "TIME-WAIT"]).style(palette.title());
    let rows = ui.groups.iter().enumerate().skip(offset).take(page).map(|(i, g)| {
        let row = Row::new([
            g.name.clone(),
            g.sockets.to_string(),
            g.established.to_string(),
            g.listening.to_string(),
            g.time_wait.to_string(),
        ]);
        if i == ui.selected && ui.focus == Pane::Connections {
            row.style(palette.selected())
        } else {
            row
        }
    });
    let widths = [
        Constraint::Fill(1),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(10),
    ];
    frame.render_widget(Table::new(rows, widths).header(header), inner);
}

fn draw_transitions(
    frame: &mut Frame,
    area: Rect,
    model: &Model,
    ui: &mut Ui,
    zone: chrono::FixedOffset,
    palette: Palette,
) {
    let mut title = " Transitions".to_string();
    if model.paused {
        title.push_str(&format!(" PAUSED ({} new; space resumes)", model.unseen));
    }
    if model.dropped > 0 {
        title.push_str(&format!(", {} dropped while paused", model.dropped));
    }
    title.push(' ');
    let block = pane_block(title, ui.focus == Pane::Transitions, palette);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let page = inner.height as usize;
    // Newest first; while paused, the lines that came since stay out of sight.
    let visible = model.stream.len().saturating_sub(model.unseen);
    let offset = scroll(&mut ui.transitions_offset, ui.selected_line, page);
    let lines: Vec<Line> = model
        .stream
        .iter()
        .take(visible)
        .rev()
        .enumerate()
        .skip(offset)
        .take(page)
        .map(|(i, record)| {
            let line = stream_line(record, ui, zone, inner.width, palette);
            if i == ui.selected_line && ui.focus == Pane::Transitions {
                line.style(palette.selected())
            } else {
                line
            }
        })
        .collect();
    frame.render_widget(Paragraph::new(lines), inner);
}

/// Both ends; on a narrow terminal the local address is left out where it is the remote's
/// (loopback, a host talking to itself), so that the remote end, which says where a failed
/// connect went, still fits.
fn ends(t: &TransitionRecord, ui: &Ui, width: u16) -> String {
    let service = |port| ui.name_of(port, Protocol::Tcp);
    let remote = endpoint((t.raddr, t.rport), t.v6only, None, service(t.rport));
    let local = if width < 100 && t.laddr == t.raddr {
        endpoint((t.laddr, t.lport), t.v6only, None, service(t.lport))
            .rsplit_once(':')
            .map_or(String::new(), |(_, port)| format!(":{port}"))
    } else {
        endpoint((t.laddr, t.lport), t.v6only, None, service(t.lport))
    };
    format!("{local}  {remote}")
}

/// A stream line, most telling first so that a narrow terminal cuts the least of it: time,
/// transition (in `ss`'s short names), failure, time in the old state, owner, then the ends.
fn stream_line(
    record: &StreamRecord,
    ui: &Ui,
    zone: chrono::FixedOffset,
    width: u16,
    palette: Palette,
) -> Line<'static> {
    let clock = |time: &chrono::DateTime<chrono::Utc>| {
        let format = if width >= 100 { "%H:%M:%S%.3f " } else { "%H:%M:%S " };
        Span::styled(time.with_timezone(&zone).format(format).to_string(), palette.dim())
    };
    match record {
        StreamRecord::Transition(t) => {
            let mut spans = vec![
                clock(&t.time),
                Span::styled(short(t.old), palette.state(t.old)),
                Span::raw(">"),
                Span::styled(short(t.new), palette.state(t.new)),
            ];
            if let Some(failure) = t.failure {
                spans.push(Span::styled(
                    format!(" {}", failure.name().to_uppercase()),
                    palette.failure(),
                ));
            }
            spans.push(Span::raw(format!(
                " {} {} {}",
                t.duration_ns.map_or("-".into(), millis),
                owner_text(t.pid, t.comm.as_ref()),
                ends(t, ui, width)
            )));
            Line::from(spans)
        }
        StreamRecord::Retransmit(r) => Line::from(vec![
            clock(&r.time),
            Span::styled(format!("RETRANSMIT {} #{}", r.resent.name(), r.count), palette.failure()),
            Span::raw(format!(
                " {} {}  {}",
                owner_text(r.pid, r.comm.as_ref()),
                endpoint((r.laddr, r.lport), false, None, None),
                endpoint((r.raddr, r.rport), false, None, None)
            )),
        ]),
        StreamRecord::Lost(loss) => Line::from(Span::styled(
            format!("LOST {} events ({}), {} in all", loss.count, loss.reason.name(), loss.total),
            palette.failure(),
        )),
        StreamRecord::LogFailed(failed) => Line::from(Span::styled(
            format!("LOG FAILED {}: {}", failed.path.display(), failed.error),
            palette.failure(),
        )),
        StreamRecord::ExportDropped(dropped) => Line::from(Span::styled(
            format!(
                "{} DROPPED {} records, {} in all",
                dropped.destination.to_uppercase(),
                dropped.count,
                dropped.total
            ),
            palette.failure(),
        )),
    }
}

fn draw_footer(frame: &mut Frame, area: Rect, ui: &Ui, palette: Palette) {
    let line = match (&ui.overlay, &ui.filter_error) {
        (Overlay::Filter(text), _) => Line::from(vec![
            Span::styled("filter: ", palette.title()),
            Span::raw(format!("{text}_")),
            Span::styled(
                "  (Enter apply, Esc cancel; e.g. state established dport = :443)",
                palette.dim(),
            ),
        ]),
        (_, Some(error)) => Line::from(Span::styled(error.clone(), palette.failure())),
        _ => Line::from(Span::styled(
            "q quit  ? help  / filter  s state  p process  o port  c clear  g group  </> sort  Enter detail",
            palette.dim(),
        )),
    };
    frame.render_widget(Paragraph::new(line), area);
}

/// The key map, as the help overlay shows it (one line each, to fit 80x24).
pub const KEYS: &[(&str, &str)] = &[
    ("q, Ctrl-C", "quit; Ctrl-Z stops top as a shell job (fg resumes)"),
    ("arrows j k", "move the selection; PgUp PgDn Home End by page"),
    ("Tab", "switch pane: connections / transitions"),
    ("Enter", "history, owners, bytes of the selected one; a listener's queues"),
    ("/", "filter: state NAME, sport|dport OP :PORT, src|dst ADDR[/LEN]"),
    ("s", "cycle a state: ESTAB LISTEN SYN-SENT TIME-WAIT CLOSE-WAIT ..."),
    ("p  o", "only the selected socket's process / service port (again: all)"),
    ("c", "clear the filters set here (not the command line's)"),
    ("g", "group by process, by remote endpoint, or not"),
    ("<  >  r", "sort by the previous / next column; reverse the sort"),
    ("space . + -", "pause the pane; replaying: play/pause, step, faster, slower"),
    ("(comm[pid])", "held by no process any more: the last one that owned it"),
    ("Esc, ?", "close this help"),
];

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let width = width.min(area.width);
    let height = height.min(area.height);
    Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    }
}

fn draw_help(frame: &mut Frame, palette: Palette) {
    let area = centered(frame.area(), 78, KEYS.len() as u16 + 2);
    let lines: Vec<Line> = KEYS
        .iter()
        .map(|(keys, what)| {
            Line::from(vec![
                Span::styled(format!("{keys:>11}  "), palette.title()),
                Span::raw(*what),
            ])
        })
        .collect();
    frame.render_widget(Clear, area);
    let block = Block::bordered().title(" netwatch top: keys ");
    frame.render_widget(Paragraph::new(lines).block(block).wrap(Wrap { trim: false }), area);
}

fn draw_detail(
    frame: &mut Frame,
    cookie: u64,
    model: &Model,
    detail: Option<&Detail>,
    status: &Status,
    ui: &Ui,
    palette: Palette,
) {
    let area = centered(
        frame.area(),
        frame.area().width.saturating_sub(2),
        frame.area().height.saturating_sub(2),
    );
    frame.render_widget(Clear, area);
    let lines = super::detail::lines(cookie, model.conns.get(&cookie), detail, status, ui, palette);
    let block = Block::bordered().title(format!(" Connection {cookie} (Esc closes) "));
    frame.render_widget(Paragraph::new(lines).block(block).wrap(Wrap { trim: false }), area);
}
