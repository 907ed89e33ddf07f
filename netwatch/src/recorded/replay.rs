//! A recorded stretch played back in time (`watch --replay`, `top --replay`): at the pace
//! it was recorded, faster or slower, paused, or one entry at a time. What lies before the
//! stretch's start is handed over at once, marked as catching up, so that a view can build
//! the table the stretch starts from.
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::{
    Entry,
    reader::{LineTest, Next, Reader},
};

/// The longest wait between two entries: a longer silence in the log (the agent was
/// stopped, the night was quiet) is cut to this.
pub const MAX_GAP: Duration = Duration::from_secs(5);

/// Where playing is in recorded time.
#[derive(Debug)]
pub struct Pace {
    speed: f64,
    /// A recorded time and the instant it was (or will be) played at.
    anchor: Option<(DateTime<Utc>, Instant)>,
    held: bool,
    /// While held: the recorded time played last (none before the first entry).
    paused: Option<DateTime<Utc>>,
}

impl Pace {
    pub fn new(speed: f64) -> Pace {
        Pace { speed, anchor: None, held: false, paused: None }
    }

    pub fn speed(&self) -> f64 {
        self.speed
    }

    pub fn is_paused(&self) -> bool {
        self.held
    }

    /// The recorded time being played now.
    pub fn playhead(&self) -> Option<DateTime<Utc>> {
        if self.held {
            return self.paused;
        }
        let (time, instant) = self.anchor?;
        let now = Instant::now();
        let real = if now >= instant {
            (now - instant).as_secs_f64()
        } else {
            -(instant - now).as_secs_f64()
        };
        Some(time + chrono::Duration::nanoseconds((real * self.speed * 1e9) as i64))
    }

    /// How long until `time` is due (zero: now); the first time asked is due at once.
    pub fn wait(&mut self, time: DateTime<Utc>) -> Option<Duration> {
        if self.held {
            return None;
        }
        let now = Instant::now();
        let Some((anchor, at)) = self.anchor else {
            self.anchor = Some((time, now));
            return Some(Duration::ZERO);
        };
        let ahead = (time - anchor).to_std().unwrap_or_default().as_secs_f64() / self.speed;
        let due = at + Duration::from_secs_f64(ahead.min(1e9));
        let wait = due.saturating_duration_since(now);
        if wait > MAX_GAP {
            self.anchor = Some((time, now + MAX_GAP));
            return Some(MAX_GAP);
        }
        Some(wait)
    }

    pub fn set_speed(&mut self, speed: f64) {
        self.rebase();
        self.speed = speed;
    }

    pub fn pause(&mut self) {
        if !self.held {
            self.paused = self.playhead();
            self.held = true;
        }
    }

    pub fn resume(&mut self) {
        if std::mem::take(&mut self.held) {
            // Before the first entry, the first one anchors the pace.
            self.anchor = self.paused.take().map(|paused| (paused, Instant::now()));
        }
    }

    /// While paused, moves the playhead to `time` (a step).
    pub fn step_to(&mut self, time: DateTime<Utc>) {
        if self.held {
            self.paused = Some(time);
        }
    }

    /// Anchors at the playhead now, so that a change of speed applies from here on.
    fn rebase(&mut self) {
        if !self.held
            && let Some(playhead) = self.playhead()
        {
            self.anchor = Some((playhead, Instant::now()));
        }
    }
}

/// Entries of a log, each handed over when it is due.
pub struct Player {
    reader: Reader,
    keep: LineTest,
    pub pace: Pace,
    /// The next entry, read but not yet due (kept across a cancelled wait).
    ahead: Option<Entry>,
    /// Steps allowed while paused.
    steps: u32,
    ended: bool,
}

/// What the player hands over.
#[derive(Debug)]
pub enum Played {
    /// Before the stretch's start: for the starting table, not to be shown as news.
    CatchingUp(Entry),
    Entry(Entry),
    /// The stretch is over.
    End,
}

impl Player {
    /// `reader` reads from the start of the files (see [`Reader::whole_files`]) so that
    /// what came before the stretch can be caught up with.
    pub fn new(reader: Reader, keep: LineTest, speed: f64) -> Player {
        Player { reader, keep, pace: Pace::new(speed), ahead: None, steps: 0, ended: false }
    }

    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Lets one more entry through while paused.
    pub fn step(&mut self) {
        self.steps += 1;
    }

    /// The next entry, when it is due. Cancel-safe: an entry read and not yet due is kept.
    pub async fn next(&mut self) -> anyhow::Result<Played> {
        loop {
            if self.ended {
                return Ok(Played::End);
            }
            let entry = match self.ahead.take() {
                Some(entry) => entry,
                None => match self.reader.next(&mut *self.keep)? {
                    Next::Entry(entry) => entry,
                    Next::Pending => {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        continue;
                    }
                    Next::End => {
                        // The clock stops with the recording.
                        self.pace.pause();
                        self.ended = true;
                        return Ok(Played::End);
                    }
                },
            };
            let time = entry.time();
            if self.reader.window().since.is_some_and(|since| time < since) {
                return Ok(Played::CatchingUp(entry));
            }
            // A table's rows come with its mark, whatever the pace: they are one step.
            if matches!(entry, Entry::Socket(_)) {
                return Ok(Played::Entry(entry));
            }
            if self.pace.is_paused() {
                if self.steps > 0 {
                    self.steps -= 1;
                    self.pace.step_to(time);
                    return Ok(Played::Entry(entry));
                }
                self.ahead = Some(entry);
                std::future::pending::<()>().await;
                continue;
            }
            let wait = self.pace.wait(time).unwrap_or_default();
            if !wait.is_zero() {
                self.ahead = Some(entry);
                tokio::time::sleep(wait).await;
                let entry = self.ahead.take();
                match entry {
                    Some(entry) if !self.pace.is_paused() => return Ok(Played::Entry(entry)),
                    other => {
                        self.ahead = other;
                        continue;
                    }
                }
            }
            return Ok(Played::Entry(entry));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_764_000_000 + seconds, 0).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn waits_scale_with_the_speed_and_long_gaps_are_cut() {
        let mut pace = Pace::new(10.0);
        assert_eq!(pace.wait(at(0)), Some(Duration::ZERO));
        assert_eq!(pace.wait(at(20)), Some(Duration::from_secs(2)));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(pace.playhead(), Some(at(20)));
        // An hour of silence plays as MAX_GAP.
        assert_eq!(pace.wait(at(3620)), Some(MAX_GAP));
        tokio::time::advance(MAX_GAP).await;
        assert_eq!(pace.wait(at(3620)), Some(Duration::ZERO));
        pace.pause();
        assert_eq!(pace.wait(at(3630)), None, "nothing is due while paused");
        pace.step_to(at(3630));
        assert_eq!(pace.playhead(), Some(at(3630)));
        pace.resume();
        pace.set_speed(1.0);
        assert_eq!(pace.wait(at(3633)), Some(Duration::from_secs(3)));
    }
}
