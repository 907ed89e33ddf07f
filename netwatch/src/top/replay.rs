//! `top --replay`: the live view's feed played from an event log. The log's tables become
//! whole new tables for the model, its records what the stream would have sent, at the
//! pace they were recorded (or as the user steers: pause, step, faster, slower); the
//! view's clock is the recording's.
use std::path::{Path, PathBuf};

use super::feed::News;
use crate::{
    cli::ReplayArgs,
    query::recorded::RecordSelection,
    record::{RowsChange, StreamRecord, WallClock},
    recorded::{
        rebuild::{Assembled, Assembler, take_table},
        replay::{Played, Player},
    },
    state::history::{Histories, History, Retention},
};

pub struct Replaying {
    path: PathBuf,
    player: Player,
    assembler: Assembler,
    histories: Histories,
    /// The recording agent's wall clock (its CLOCK_MONOTONIC to wall time), from its lines.
    clock: WallClock,
    /// The recording's CLOCK_MONOTONIC at the last entry handed over.
    last_mono_ns: u64,
    tables_seen: bool,
}

impl Replaying {
    pub fn open(path: &Path, args: &ReplayArgs) -> anyhow::Result<Replaying> {
        // From the start of the first file the stretch reaches: it begins with a table.
        let reader = crate::cmd::log::open(path, args.window(), false)?.whole_files();
        let keep = RecordSelection::default().prefilter();
        let mut player = Player::new(reader, keep, args.speed);
        if args.step {
            player.pace.pause();
        }
        Ok(Replaying {
            path: path.to_path_buf(),
            player,
            assembler: Assembler::default(),
            histories: Histories::new(Retention::default()),
            clock: WallClock::with_offset_ns(0),
            last_mono_ns: 0,
            tables_seen: false,
        })
    }

    /// Waits for the next entry that is due and hands it over as news.
    pub async fn next(&mut self, out: &mut Vec<News>) -> anyhow::Result<()> {
        if self.player.ended() {
            return std::future::pending().await;
        }
        let mut assembled = Vec::new();
        let past = match self.player.next().await? {
            Played::CatchingUp(entry) => {
                self.assembler.feed(entry, &mut assembled);
                true
            }
            Played::Entry(entry) => {
                self.assembler.feed(entry, &mut assembled);
                false
            }
            // A table cut short at the end is shown with the rows it has.
            Played::End => {
                self.assembler.flush(&mut assembled);
                false
            }
        };
        for item in assembled {
            match item {
                Assembled::Record(record) => {
                    match &record {
                        StreamRecord::Transition(t) => self.learn_clock(t.time, t.mono_ns),
                        StreamRecord::Retransmit(r) => self.learn_clock(r.time, r.mono_ns),
                        _ => {}
                    }
                    self.histories.observe(&record);
                    out.push(if past { News::Past(record) } else { News::Record(record) });
                }
                Assembled::Table(mark, rows) => {
                    self.learn_clock(mark.time, mark.mono_ns);
                    let first = !std::mem::replace(&mut self.tables_seen, true);
                    take_table(&mut self.histories, &mark, &rows, first);
                    out.push(News::Rows(RowsChange { full: true, upsert: rows, gone: Vec::new() }));
                }
            }
        }
        Ok(())
    }

    fn learn_clock(&mut self, wall: chrono::DateTime<chrono::Utc>, mono_ns: u64) {
        let wall_ns = i128::from(wall.timestamp_nanos_opt().unwrap_or_default());
        self.clock = WallClock::with_offset_ns(wall_ns - i128::from(mono_ns));
        self.last_mono_ns = mono_ns;
    }

    /// The recording's CLOCK_MONOTONIC being played now.
    pub fn now_ns(&self) -> u64 {
        let played = self.player.pace.playhead().map(|wall| self.clock.monotonic(wall));
        played.unwrap_or(0).max(self.last_mono_ns)
    }

    /// The recording's wall time being played now.
    pub fn wall(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.wall(self.now_ns())
    }

    pub fn history(&self, cookie: u64) -> Option<History> {
        self.histories.of(cookie).pop()
    }

    /// The header's words: what is played, how fast, and whether it is paused or over.
    pub fn describe(&self) -> String {
        let pace = &self.player.pace;
        let state = if self.player.ended() {
            " (ended)"
        } else if pace.is_paused() {
            " (paused: space plays, . steps)"
        } else {
            ""
        };
        format!("replay {} at {}x{state}", self.path.display(), pace.speed())
    }

    /// A key for the player: space pauses and plays, `.` steps while paused, `+` and `-`
    /// double and halve the speed. False for any other key.
    pub fn key(&mut self, key: char) -> bool {
        let ended = self.player.ended();
        let pace = &mut self.player.pace;
        match key {
            // Nothing is left to play.
            ' ' | '.' if ended => {}
            ' ' if pace.is_paused() => pace.resume(),
            ' ' => pace.pause(),
            '.' => {
                pace.pause();
                self.player.step();
            }
            '+' => pace.set_speed((pace.speed() * 2.0).min(100_000.0)),
            '-' => pace.set_speed((pace.speed() / 2.0).max(0.01)),
            _ => return false,
        }
        true
    }
}

impl std::fmt::Debug for Replaying {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replaying").field("path", &self.path).finish_non_exhaustive()
    }
}
