//! Loss accounting: which counters grew since the last report, the `lost` records that say
//! so, and when the table must be rebuilt. Pure: the tracer reads the counters (the kernel's
//! ring buffer failures and skipped runs, the decoder's malformed records) and acts on the
//! verdict, so this logic is tested without a kernel.
use chrono::{DateTime, Utc};

use crate::record::{LossReason, LossRecord};

/// Loss checks in a row that may find new losses before the table is rebuilt anyway.
const RESYNC_AT_LATEST: u32 = 5;

/// Totals since start, as read from their sources.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LossCounts {
    pub ring_buffer_full: u64,
    pub malformed: u64,
    pub skipped: u64,
}

impl LossCounts {
    fn by_reason(self) -> [(LossReason, u64); 3] {
        [
            (LossReason::RingBufferFull, self.ring_buffer_full),
            (LossReason::Malformed, self.malformed),
            (LossReason::Skipped, self.skipped),
        ]
    }
}

/// What a check found: the records to emit, and whether to rebuild the table now.
#[derive(Debug, Default, PartialEq)]
pub struct Verdict {
    pub records: Vec<LossRecord>,
    pub resync: bool,
}

#[derive(Debug, Default)]
pub struct LossTracker {
    reported: LossCounts,
    /// Checks since events were first lost without a resync yet (None: the table is sound).
    resync_due: Option<u32>,
}

impl LossTracker {
    /// Compares `counts` with what was reported. A snapshot costs more than the events it
    /// replaces, so one taken while events are still being lost would only deepen the loss:
    /// the rebuild waits for a check that finds no new loss, or RESYNC_AT_LATEST checks of
    /// continuous loss. With `now` (a question is being answered, and its answer must not
    /// rest on a table that missed events) any unrepaired loss is rebuilt at once.
    pub fn check(&mut self, counts: LossCounts, now: bool, time: DateTime<Utc>) -> Verdict {
        let losing =
            counts.by_reason().iter().zip(self.reported.by_reason()).any(|(n, r)| n.1 > r.1);
        let mut resync = false;
        self.resync_due = match (self.resync_due, losing) {
            (None, true) | (Some(_), _) if now => {
                resync = true;
                None
            }
            (None, false) => None,
            (Some(checks), true) if checks + 1 < RESYNC_AT_LATEST => Some(checks + 1),
            (None, true) => Some(0),
            (Some(_), losing) => {
                resync = true;
                losing.then_some(0)
            }
        };
        let records = counts
            .by_reason()
            .into_iter()
            .zip(self.reported.by_reason())
            .filter(|((_, total), (_, reported))| total > reported)
            .map(|((reason, total), (_, reported))| LossRecord {
                time,
                reason,
                count: total - reported,
                total,
            })
            .collect();
        self.reported = counts;
        Verdict { records, resync }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(ring_buffer_full: u64, skipped: u64) -> LossCounts {
        LossCounts { ring_buffer_full, malformed: 0, skipped }
    }

    fn time() -> DateTime<Utc> {
        DateTime::from_timestamp_nanos(0)
    }

    #[test]
    fn each_reason_that_grew_is_reported_with_its_increase_and_total() {
        let mut tracker = LossTracker::default();
        assert_eq!(tracker.check(counts(0, 0), false, time()), Verdict::default());
        let verdict = tracker.check(counts(7, 2), false, time());
        let found: Vec<(LossReason, u64, u64)> =
            verdict.records.iter().map(|r| (r.reason, r.count, r.total)).collect();
        assert_eq!(found, [(LossReason::RingBufferFull, 7, 7), (LossReason::Skipped, 2, 2)]);
        let verdict = tracker.check(counts(10, 2), false, time());
        let found: Vec<(LossReason, u64, u64)> =
            verdict.records.iter().map(|r| (r.reason, r.count, r.total)).collect();
        assert_eq!(found, [(LossReason::RingBufferFull, 3, 10)], "only what grew, by its increase");
    }

    #[test]
    fn the_rebuild_waits_for_the_loss_to_stop() {
        let mut tracker = LossTracker::default();
        assert!(!tracker.check(counts(1, 0), false, time()).resync, "still losing");
        assert!(!tracker.check(counts(2, 0), false, time()).resync, "still losing");
        assert!(tracker.check(counts(2, 0), false, time()).resync, "stopped: rebuild");
        assert!(!tracker.check(counts(2, 0), false, time()).resync, "sound again");
    }

    #[test]
    fn continuous_loss_is_rebuilt_after_five_checks() {
        let mut tracker = LossTracker::default();
        let resyncs: Vec<bool> =
            (1..=6).map(|n| tracker.check(counts(n, 0), false, time()).resync).collect();
        assert_eq!(resyncs, [false, false, false, false, false, true]);
    }

    #[test]
    fn a_question_rebuilds_at_once() {
        let mut tracker = LossTracker::default();
        let verdict = tracker.check(counts(4, 0), true, time());
        assert!(verdict.resync && verdict.records.len() == 1);
        assert!(!tracker.check(counts(4, 0), true, time()).resync, "nothing new to repair");
        assert!(!tracker.check(counts(5, 0), false, time()).resync);
        assert!(tracker.check(counts(5, 0), true, time()).resync, "an unrepaired loss");
    }
}
