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
pub mod terminal;
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
    let mut ui = Ui::new(args.select.clone(), Services::load(), names)?;
    let own = args.no_agent
        || args.ring_size.is_some()
        || args.source != crate::kernel::loader::SourceChoice::Auto;
    if own {
        eprintln!("netwatch: loading programs of our own...");
    }
    let (mut feed, rows, source) = Feed::open(&args.socket, own, &args.load_options()).await?;
    let mut model = Model::new(rows, WallClock::monotonic_now_ns());
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut screen = terminal::Screen::enter()?;
    let mut events = EventStream::new();
    let mut tick = tokio::time::interval(FRAME);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let palette = Palette::from_env();
    let mut news = Vec::new();
    let mut detail: Option<Detail> = None;
    let mut traffic = traffic::Traffic::default();
    let mut page = 10;
    let mut drawn: Option<(u64, u64)> = None;
    let mut touched = true;
    let mut arranged_version = None;
    let mut arrange_after = Instant::now();
    let mut refreshed = Instant::now() - REFRESH;
    let result = loop {
        tokio::select! {
            _ = hangup.recv() => break Ok(()),
            _ = terminate.recv() => break Ok(()),
            _ = interrupt.recv() => break Ok(()),
            event = events.next() => match event {
                Some(Ok(Event::Key(key))) if key.kind != KeyEventKind::Release => {
                    touched = true;
                    match ui.key(key, &mut model, page) {
                        Action::Quit => break Ok(()),
                        Action::OpenDetail(cookie) => {
                            detail = Some(ask_detail(&mut feed, cookie).await);
                            refreshed = Instant::now();
                        }
                        Action::None => {}
                    }
                }
                Some(Ok(Event::Resize(..))) => touched = true,
                Some(Ok(_)) => {}
                Some(Err(error)) => break Err(anyhow::Error::from(error).context("reading the terminal")),
                None => break Ok(()),
            },
            next = feed.next(&mut news) => {
                if let Err(error) = next {
                    break Err(error);
                }
                let now = WallClock::monotonic_now_ns();
                for item in news.drain(..) {
                    match item {
                        News::Record(record) => model.apply(record),
                        News::Rows(change) => model.apply_rows(change, now),
                    }
                }
            }
            _ = tick.tick() => {
                let now = WallClock::monotonic_now_ns();
                if refreshed.elapsed() >= REFRESH {
                    refreshed = Instant::now();
                    let visible: Vec<u64> = ui.order.iter().skip(ui.connections_offset).take(page).copied().collect();
                    traffic.refresh(&mut model, &visible, now);
                    if let Overlay::Detail(cookie) = ui.overlay {
                        detail = Some(ask_detail(&mut feed, cookie).await);
                        touched = true;
                    }
                }
                // Sorting 100k rows takes tens of milliseconds: then it is done less often.
                if (touched || arranged_version != Some(model.version)) && Instant::now() >= arrange_after {
                    let started = Instant::now();
                    ui.arrange(&model, now);
                    arranged_version = Some(model.version);
                    arrange_after = Instant::now() + started.elapsed() * 9;
                    touched = true;
                }
                // The seconds shown (time in state, the clock) change once a second.
                let second = now / 1_000_000_000;
                if touched || drawn != Some((model.version, second)) {
                    let (handshakes_per_s, failures_per_s) = model.rates(now);
                    let status = Status {
                        source: &source,
                        now_ns: now,
                        wall: chrono::Utc::now(),
                        offset: *chrono::Local::now().offset(),
                        handshakes_per_s,
                        failures_per_s,
                    };
                    page = screen.draw(|frame| view::draw(frame, &model, &mut ui, &status, detail.as_ref(), palette))?;
                    drawn = Some((model.version, second));
                    touched = false;
                }
            }
        }
    };
    drop(screen);
    let mut rest = Vec::new();
    let finished = feed.finish(&mut rest);
    result.and(finished)
}

/// The connection's history and listener queues, or why they could not be had.
async fn ask_detail(feed: &mut Feed, cookie: u64) -> Detail {
    match feed.detail(cookie).await {
        Ok((history, listener)) => {
            let problem = history.is_none().then(|| "none kept for this connection".to_string());
            Detail { cookie, history, listener, problem }
        }
        Err(error) => Detail { cookie, problem: Some(format!("{error:#}")), ..Detail::default() },
    }
}
