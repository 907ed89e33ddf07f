//! `netwatch top` without a kernel: a recorded `live` answer (`fixtures/live.ndjson`: an
//! agent's table, then its records and row changes, while python's http.server answered
//! three requests, a connect was refused and a fourth client held its connection) replayed
//! into the model, drawn on ratatui's TestBackend, and compared with the snapshot files.
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::{Terminal, backend::TestBackend, style::Color};

use super::{
    Detail,
    model::Model,
    ui::{Action, Overlay, Pane, Ui},
    view::{self, Palette, Status},
};
use crate::{cli::TableSelect, host::services::Services, record::Listed, serve::api::Update};

const RECORDING: &str = include_str!("fixtures/live.ndjson");
const SERVER_PID: u32 = 9340;

/// The model after the recording, and the monotonic time one second after its last record.
fn replayed() -> (Model, u64) {
    let mut lines = RECORDING.lines();
    let rows: Vec<Listed> = serde_json::from_str(lines.next().unwrap()).unwrap();
    let records: Vec<&str> = lines.collect();
    let mono =
        |line: &str| serde_json::from_str::<serde_json::Value>(line).unwrap()["mono_ns"].as_u64();
    let first = records.iter().find_map(|l| mono(l)).unwrap();
    let mut model = Model::new(rows, first);
    let mut now = first;
    for line in records {
        if Update::is_update(line) {
            let Update::Rows(change) = serde_json::from_str(line).unwrap();
            model.apply_rows(change, now);
        } else {
            now = mono(line).unwrap_or(now);
            model.apply(serde_json::from_str(line).unwrap());
        }
    }
    (model, now + 1_000_000_000)
}

fn ui() -> Ui {
    Ui::new(TableSelect::default(), Services::default(), Services::default()).unwrap()
}

fn key(ui: &mut Ui, model: &mut Model, code: KeyCode) -> Action {
    ui.key(KeyEvent::new(code, KeyModifiers::NONE), model, 10)
}

fn typed(ui: &mut Ui, model: &mut Model, text: &str) {
    for c in text.chars() {
        key(ui, model, KeyCode::Char(c));
    }
}

/// The screen as text, one line per row, and the terminal for looking at styles.
fn screen(
    model: &Model,
    ui: &mut Ui,
    now: u64,
    size: (u16, u16),
    detail: Option<&Detail>,
    palette: Palette,
) -> (String, Terminal<TestBackend>) {
    ui.arrange(model, now);
    let mut terminal = Terminal::new(TestBackend::new(size.0, size.1)).unwrap();
    let wall = chrono::DateTime::parse_from_rfc3339("2026-11-29T18:42:40Z").unwrap().to_utc();
    let status = Status {
        source: "agent /run/netwatch/agent.sock",
        now_ns: now,
        wall,
        offset: chrono::FixedOffset::east_opt(0).unwrap(),
        handshakes_per_s: 1.6,
        failures_per_s: 0.2,
    };
    terminal
        .draw(|frame| {
            view::draw(frame, model, ui, &status, detail, palette);
        })
        .unwrap();
    let buffer = terminal.backend().buffer();
    let width = usize::from(buffer.area.width);
    let text = buffer
        .content
        .chunks(width)
        .map(|row| row.iter().map(|cell| cell.symbol()).collect::<String>().trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n");
    (text, terminal)
}

const COLOR: Palette = Palette { color: true };

#[test]
fn the_default_view_fits_80_by_24() {
    let (model, now) = replayed();
    let mut ui = ui();
    let (text, _) = screen(&model, &mut ui, now, (80, 24), None, COLOR);
    insta::assert_snapshot!("default_80x24", text);
    assert!(text.contains("python3[9340]") && text.contains("LISTEN"), "{text}");
    let (tall, _) = screen(&model, &mut ui, now, (80, 40), None, COLOR);
    let refused = tall.lines().find(|l| l.contains("REFUSED")).unwrap_or_default();
    assert!(refused.contains("SYN-SENT>CLOSE REFUSED"), "the refused connect: {tall}");
    assert!(refused.ends_with(" 127.0.0.1:18081"), "and where it went, in 80 columns: {refused}");
}

#[test]
fn a_wide_terminal_shows_traffic_columns() {
    let (model, now) = replayed();
    let (text, _) = screen(&model, &mut ui(), now, (130, 30), None, COLOR);
    insta::assert_snapshot!("wide_130x30", text);
    assert!(text.contains("SENT/s") && text.contains("RECV/s"));
}

#[test]
fn failures_are_red_and_no_color_means_no_colours() {
    let (model, now) = replayed();
    let cell_of = |terminal: &Terminal<TestBackend>, needle: &str| {
        let buffer = terminal.backend().buffer();
        let width = usize::from(buffer.area.width);
        let rows: Vec<String> =
            buffer.content.chunks(width).map(|r| r.iter().map(|c| c.symbol()).collect()).collect();
        let (y, row) = rows.iter().enumerate().find(|(_, r)| r.contains(needle)).unwrap();
        let x = row[..row.find(needle).unwrap()].chars().count();
        buffer.content[y * width + x].clone()
    };
    let (_, colored) = screen(&model, &mut ui(), now, (100, 30), None, COLOR);
    assert_eq!(cell_of(&colored, "REFUSED").fg, Color::Red);
    let (_, plain) = screen(&model, &mut ui(), now, (100, 30), None, Palette { color: false });
    assert_eq!(cell_of(&plain, "REFUSED").fg, Color::Reset);
}

#[test]
fn keys_sort_filter_and_group() {
    let (mut model, now) = replayed();
    let mut ui = ui();
    ui.arrange(&model, now);
    // Sorting by the previous column (CONNECT... from IN STATE: PROCESS) puts python3's
    // listener, the only row of process 9340 that it still holds, among its clients.
    key(&mut ui, &mut model, KeyCode::Char('<'));
    let (text, _) = screen(&model, &mut ui, now, (80, 24), None, COLOR);
    insta::assert_snapshot!("sorted_by_process", text);
    // The filter bar takes netwatch table's language.
    key(&mut ui, &mut model, KeyCode::Char('/'));
    typed(&mut ui, &mut model, "state listening");
    key(&mut ui, &mut model, KeyCode::Enter);
    ui.arrange(&model, now);
    assert_eq!(ui.order.len(), 1, "one listener");
    assert!(model.conns[&ui.order[0]].listed.owners.iter().all(|o| o.pid == SERVER_PID));
    // A bad filter is explained and the last good one stays.
    key(&mut ui, &mut model, KeyCode::Char('/'));
    typed(&mut ui, &mut model, " sport ==");
    key(&mut ui, &mut model, KeyCode::Enter);
    assert!(
        ui.filter_error.as_deref().is_some_and(|e| e.starts_with("bad filter")),
        "{:?}",
        ui.filter_error
    );
    assert_eq!(ui.filter_text, "state listening");
    key(&mut ui, &mut model, KeyCode::Char('c'));
    ui.arrange(&model, now);
    let all = ui.order.len();
    // The state quick key cycles: ESTAB first.
    key(&mut ui, &mut model, KeyCode::Char('s'));
    ui.arrange(&model, now);
    assert!(
        ui.order
            .iter()
            .all(|c| model.conns[c].row().state == crate::kernel::events::TcpState::Established)
    );
    assert!(ui.order.len() < all);
    key(&mut ui, &mut model, KeyCode::Char('c'));
    // Grouping by process counts sockets no process holds under their last owner.
    key(&mut ui, &mut model, KeyCode::Char('g'));
    let (text, _) = screen(&model, &mut ui, now, (80, 24), None, COLOR);
    insta::assert_snapshot!("grouped_by_process", text);
    let server = ui.groups.iter().position(|g| g.pid == Some(SERVER_PID)).unwrap();
    ui.selected = server;
    key(&mut ui, &mut model, KeyCode::Enter);
    ui.arrange(&model, now);
    assert_eq!(ui.pid_filter, Some(SERVER_PID), "Enter on a group shows its sockets");
    assert_eq!(ui.order.len(), 2, "the two it holds: its listener and one accepted");
}

#[test]
fn enter_opens_the_detail_of_a_connection_from_either_pane() {
    let (mut model, now) = replayed();
    let mut ui = ui();
    ui.arrange(&model, now);
    // The transitions pane's newest line is the held client's handshake.
    key(&mut ui, &mut model, KeyCode::Tab);
    assert_eq!(ui.focus, Pane::Transitions);
    let Action::OpenDetail(cookie) = key(&mut ui, &mut model, KeyCode::Enter) else {
        panic!("no detail opened")
    };
    assert_eq!(ui.overlay, Overlay::Detail(cookie));
    let history = serde_json::from_value(serde_json::json!({
        "cookie": cookie, "netns": 4026531833u32, "laddr": "127.0.0.1", "lport": 18080,
        "raddr": "127.0.0.1", "rport": 47800, "first_seen": "event", "snapshot_state": null,
        "steps": [
            {"time": "2026-11-29T18:42:34.335299130Z", "old": "LISTEN", "new": "SYN_RECV",
             "duration_ns": null, "pid": 9340, "comm": "python3"},
            {"time": "2026-11-29T18:42:34.335304168Z", "old": "SYN_RECV", "new": "ESTABLISHED",
             "duration_ns": 5038, "pid": 9340, "comm": "python3"}
        ],
        "closed": false, "failure": null, "lifespan_ns": null, "bytes_sent": null,
        "bytes_received": null, "retransmits": null
    }))
    .unwrap();
    let detail = Detail { cookie, history: Some(history), listener: None, problem: None };
    let (text, _) = screen(&model, &mut ui, now, (80, 24), Some(&detail), COLOR);
    insta::assert_snapshot!("detail", text);
    assert!(text.contains("SYN_RECV") && text.contains("History"), "{text}");
    key(&mut ui, &mut model, KeyCode::Esc);
    assert_eq!(ui.overlay, Overlay::None);
}

#[test]
fn help_pause_and_quit() {
    let (mut model, now) = replayed();
    let mut ui = ui();
    key(&mut ui, &mut model, KeyCode::Char('?'));
    let (text, _) = screen(&model, &mut ui, now, (80, 24), None, COLOR);
    insta::assert_snapshot!("help", text);
    key(&mut ui, &mut model, KeyCode::Esc);
    key(&mut ui, &mut model, KeyCode::Char(' '));
    assert!(model.paused);
    let lines = model.stream.len();
    model.apply(model.stream[0].clone());
    let (text, _) = screen(&model, &mut ui, now, (80, 24), None, COLOR);
    assert!(text.contains("PAUSED (1 new"), "{text}");
    assert_eq!(model.stream.len(), lines + 1, "kept while paused");
    assert_eq!(key(&mut ui, &mut model, KeyCode::Char('q')), Action::Quit);
    let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
    assert_eq!(ui.key(ctrl_c, &mut model, 10), Action::Quit);
}

/// The recording's last transition, as a new connection's (`cookie`) at `mono_ns`.
fn new_connection(cookie: u64, mono_ns: u64) -> crate::record::StreamRecord {
    let last = RECORDING.lines().rev().find(|l| l.contains(r#""type":"transition""#)).unwrap();
    let mut record: crate::record::StreamRecord = serde_json::from_str(last).unwrap();
    if let crate::record::StreamRecord::Transition(t) = &mut record {
        (t.cookie, t.mono_ns) = (Some(cookie), mono_ns);
    }
    record
}

#[test]
fn the_selection_stays_on_its_connection_and_a_paused_pane_selects_what_it_shows() {
    let (mut model, now) = replayed();
    let mut ui = ui();
    ui.arrange(&model, now);
    key(&mut ui, &mut model, KeyCode::Down);
    key(&mut ui, &mut model, KeyCode::Down);
    let chosen = ui.order[ui.selected];
    // A new connection sorts first (the newest state): the selection stays on its row.
    model.apply(new_connection(99, now));
    ui.arrange(&model, now);
    assert_eq!(ui.order[0], 99);
    assert_eq!(ui.order[ui.selected], chosen, "the selection followed its connection");
    // Paused, the pane shows what it had: its newest line is still the one selected.
    key(&mut ui, &mut model, KeyCode::Tab);
    assert_eq!(ui.selected_cookie(&model), Some(99));
    key(&mut ui, &mut model, KeyCode::Char(' '));
    model.apply(new_connection(98, now));
    ui.arrange(&model, now);
    assert_eq!(ui.selected_cookie(&model), Some(99), "not the line that came while paused");
}

/// Keys that arrive together act on what the keys before them chose: the loop arranges a
/// stale view before the next key.
#[test]
fn keys_in_one_burst_act_on_the_rows_the_earlier_ones_chose() {
    let (mut model, now) = replayed();
    let mut ui = ui();
    ui.arrange(&model, now);
    for code in [KeyCode::Char('s'), KeyCode::Char('s'), KeyCode::Enter] {
        if ui.stale() {
            ui.arrange(&model, now);
        }
        if let Action::OpenDetail(cookie) = key(&mut ui, &mut model, code) {
            assert_eq!(model.conns[&cookie].row().state, crate::kernel::events::TcpState::Listen);
            return;
        }
    }
    panic!("Enter opened no detail on the listener");
}

#[test]
fn grouping_by_remote_takes_a_servers_peers_by_address() {
    let (mut model, now) = replayed();
    let mut ui = ui();
    key(&mut ui, &mut model, KeyCode::Char('g'));
    key(&mut ui, &mut model, KeyCode::Char('g'));
    ui.arrange(&model, now);
    let names: Vec<&str> = ui.groups.iter().map(|g| g.name.as_str()).collect();
    // The server's accepted connections and timewait ends come from ephemeral ports of
    // 127.0.0.1; its clients' ends go to 127.0.0.1:18080.
    assert!(names.contains(&"127.0.0.1") && names.contains(&"127.0.0.1:18080"), "{names:?}");
    let service = ui.groups.iter().position(|g| g.name == "127.0.0.1:18080").unwrap();
    ui.selected = service;
    key(&mut ui, &mut model, KeyCode::Enter);
    ui.arrange(&model, now);
    assert_eq!(ui.filter_text, "dst 127.0.0.1 dport = :18080");
    assert!(ui.order.iter().all(|c| model.conns[c].row().remote.1 == 18080));
}
