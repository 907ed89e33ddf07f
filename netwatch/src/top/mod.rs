//! `netwatch top`: a live full-screen view of every socket, its owner and its state machine.
//!
//! The data's path: [`feed`] (a running agent's `live` answer, or programs of top's own)
//! -> [`model`] (every socket by cookie, the recent stream, the header's rates) -> [`ui`]
//! (what the user chose: filters, sort, grouping; the rows that shows) -> [`view`] and
//! [`detail`] (drawing). [`traffic`] adds live byte counts for the rows on screen. The
//! screen is redrawn at most ten times a second, and only when something on it changed.
mod detail;
mod feed;
mod model;
mod replay;
mod terminal;
mod text;
mod traffic;
mod ui;
mod view;

#[cfg(test)]
mod tests;

use std::{
    io::IsTerminal as _,
    time::{Duration, Instant},
};

use crossterm::event::{Event, EventStream, KeyEventKind};
use futures_util::StreamExt as _;
use tokio::signal::unix::{SignalKind, signal};

pub use detail::Detail;

use crate::{cli::TopArgs, host::services::Services, record::WallClock};
use feed::{Feed, News};
use model::Model;
use ui::{Action, Overlay, Ui};
use view::{Palette, Status};

/// The shortest time between two frames.
const FRAME: Duration = Duration::from_millis(100);
/// How often the rows on screen get new byte counts, and an open detail is asked again.
const REFRESH: Duration = Duration::from_secs(1);

pub async fn run(args: &TopArgs) -> anyhow::Result<()> {
    if !std::io::stdout().is_terminal() {
        anyhow::bail!(
            "netwatch top draws on a terminal and stdout is not one: use `netwatch watch` \
             (the stream) or `netwatch table` for a pipe or a file"
        );
    }
    let names = if args.numeric { Services::default() } else { Services::load() };
    let ui = Ui::new(args.select.clone(), Services::load(), names)?;
    let (feed, rows, source) = match &args.replay.replay {
        Some(path) => {
            let replaying = replay::Replaying::open(path, &args.replay)?;
            (Feed::Replay(Box::new(replaying)), Vec::new(), String::new())
        }
        None => {
            let own = args.programs.own();
            if own {
                eprintln!("netwatch: loading programs of our own...");
            }
            Feed::open(&args.programs.socket, own, &args.programs.load_options()).await?
        }
    };
    let model = Model::new(rows, feed.now_ns());
    // The first table's JSON and rows (tens of MB with 100k sockets) are freed by now.
    crate::cmd::release_freed_memory();
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let screen = terminal::Screen::enter()?;
    let mut app = App {
        feed,
        model,
        ui,
        screen,
        source,
        palette: Palette::from_env(),
        detail: None,
        traffic: traffic::Traffic::default(),
        page: 10,
        touched: true,
        drawn: None,
        drawn_at: Instant::now() - FRAME,
        arranged: None,
        arrange_after: Instant::now(),
        refreshed: Instant::now() - REFRESH,
    };
    let mut events = EventStream::new();
    let mut tick = tokio::time::interval(FRAME);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut news = Vec::new();
    let result = loop {
        let step = tokio::select! {
            _ = hangup.recv() => break Ok(()),
            _ = terminate.recv() => break Ok(()),
            _ = interrupt.recv() => break Ok(()),
            event = events.next() => match event {
                Some(Ok(Event::Key(key))) if key.kind != KeyEventKind::Release => {
                    app.touched = true;
                    // Keys that came together (a paste, a fast typist, a slow machine) act on
                    // the rows the keys before them chose, not on the last frame's.
                    if app.ui.stale() {
                        app.ui.arrange(&app.model, app.feed.now_ns());
                    }
                    if app.replay_key(key) {
                        app.touched = true;
                        if let Err(error) = app.frame(false) {
                            break Err(error);
                        }
                        continue;
                    }
                    match app.ui.key(key, &mut app.model, app.page) {
                        Action::Quit => break Ok(()),
                        Action::OpenDetail(cookie) => app.ask_detail(cookie).await,
                        Action::Suspend => {
                            if let Err(error) = app.screen.suspend() {
                                break Err(error);
                            }
                        }
                        Action::None => {}
                    }
                    // A key shows at once, unless a frame was just drawn.
                    app.frame(false)
                }
                Some(Ok(Event::Resize(..))) => {
                    app.touched = true;
                    Ok(())
                }
                Some(Ok(_)) => Ok(()),
                Some(Err(error)) => Err(anyhow::Error::from(error).context("reading the terminal")),
                None => break Ok(()),
            },
            next = app.feed.next(&mut news) => next.map(|()| app.absorb(&mut news)),
            _ = tick.tick() => app.tick().await,
        };
        if let Err(error) = step {
            break Err(error);
        }
    };
    let App { mut feed, screen, .. } = app;
    drop(screen);
    let finished = feed.finish(&mut Vec::new());
    result.and(finished)
}

/// Everything the loop keeps between events.
struct App {
    feed: Feed,
    model: Model,
    ui: Ui,
    screen: terminal::Screen,
    source: String,
    palette: Palette,
    detail: Option<Detail>,
    traffic: traffic::Traffic,
    /// Rows the connections pane showed at the last frame, for paging.
    page: usize,
    /// The user did something since the last frame.
    touched: bool,
    /// The model's version and the second shown at the last frame, and when it was drawn.
    drawn: Option<(u64, u64)>,
    drawn_at: Instant,
    /// The model's version the rows were last arranged for, and when they may be again.
    arranged: Option<u64>,
    arrange_after: Instant,
    /// When the byte counts and an open detail were last asked for.
    refreshed: Instant,
}

impl App {
    /// A key that steers a replay (space, `.`, `+`, `-`), on the main view or a detail.
    fn replay_key(&mut self, key: crossterm::event::KeyEvent) -> bool {
        use crossterm::event::{KeyCode, KeyModifiers};
        let plain = !key.modifiers.intersects(KeyModifiers::CONTROL | KeyModifiers::ALT);
        match (self.feed.replaying(), key.code) {
            (Some(replaying), KeyCode::Char(c))
                if plain && matches!(self.ui.overlay, Overlay::None | Overlay::Detail(_)) =>
            {
                replaying.key(c)
            }
            _ => false,
        }
    }

    fn absorb(&mut self, news: &mut Vec<News>) {
        let now = self.feed.now_ns();
        for item in news.drain(..) {
            match item {
                News::Record(record) => self.model.apply(record),
                News::Past(record) => self.model.take_in(&record),
                News::Rows(change) => self.model.apply_rows(change, now),
            }
        }
    }

    async fn tick(&mut self) -> anyhow::Result<()> {
        if self.refreshed.elapsed() >= REFRESH {
            self.refreshed = Instant::now();
            // Grouped, no connection is on screen.
            let rows = if self.ui.grouping == ui::Grouping::None { self.page } else { 0 };
            let on_screen: Vec<u64> =
                self.ui.order.iter().skip(self.ui.connections_offset).take(rows).copied().collect();
            // A replay's sockets are not this host's: the kernel has no bytes for them.
            if self.feed.replaying().is_none() {
                self.traffic.refresh(&mut self.model, &on_screen, WallClock::monotonic_now_ns());
            }
            if let Overlay::Detail(cookie) = self.ui.overlay {
                self.ask_detail(cookie).await;
            }
        }
        self.frame(true)
    }

    /// The connection's history and listener queues, or why they could not be had.
    async fn ask_detail(&mut self, cookie: u64) {
        let detail = match self.feed.detail(cookie).await {
            Ok((history, listener)) => {
                let problem =
                    history.is_none().then(|| "none kept for this connection".to_string());
                Detail { cookie, history, listener, problem }
            }
            Err(error) => {
                Detail { cookie, problem: Some(format!("{error:#}")), ..Detail::default() }
            }
        };
        self.detail = Some(detail);
        self.refreshed = Instant::now();
        self.touched = true;
    }

    /// Draws a frame if something on it changed and the last one is at least FRAME old (or,
    /// on the tick, whatever its age).
    fn frame(&mut self, on_tick: bool) -> anyhow::Result<()> {
        if !on_tick && self.drawn_at.elapsed() < FRAME {
            return Ok(());
        }
        let now = self.feed.now_ns();
        let changed = self.arranged != Some(self.model.version);
        // Sorting 100k rows takes tens of milliseconds: changes in the model are then taken
        // in less often; what the user did, at once.
        if self.touched || (changed && Instant::now() >= self.arrange_after) {
            let started = Instant::now();
            self.ui.arrange(&self.model, now);
            self.arranged = Some(self.model.version);
            self.arrange_after = Instant::now() + started.elapsed() * 9;
            self.touched = true;
        }
        // The seconds shown (time in state, the clock) change once a second.
        let second = now / 1_000_000_000;
        if !self.touched && self.drawn == Some((self.model.version, second)) {
            return Ok(());
        }
        let (handshakes_per_s, failures_per_s) = self.model.rates(now);
        let (source, wall) = match self.feed.replaying() {
            Some(replaying) => (replaying.describe(), replaying.wall()),
            None => (self.source.clone(), chrono::Utc::now()),
        };
        let status = Status {
            source: &source,
            now_ns: now,
            wall,
            offset: *chrono::Local::now().offset(),
            handshakes_per_s,
            failures_per_s,
        };
        let (model, ui, detail, palette) =
            (&self.model, &mut self.ui, self.detail.as_ref(), self.palette);
        self.page =
            self.screen.draw(|frame| view::draw(frame, model, ui, &status, detail, palette))?;
        self.drawn = Some((self.model.version, second));
        self.drawn_at = Instant::now();
        self.touched = false;
        Ok(())
    }
}
