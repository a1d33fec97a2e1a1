//! A budget for routine per-node log lines.
//!
//! Node events that are routine one at a time come in floods at fleet-wide
//! moments: after a restart or a failover every node reconnects at once (50,000
//! "node reconnected" lines in three seconds; 3-4% of the orchestrator's samples
//! in a profile of that storm), and a network blip makes thousands of nodes suspect and then
//! recovered. Every event is still published (WatchFleet, `/api/v1/events`, the
//! console). The log writes the first [`ROUTINE_LINES_PER_SECOND`] routine lines
//! of each second one by one, and once the second is over says how many more
//! there were, of each kind. Failures, terminations and what operators asked for
//! are not routine: they are always written line by line.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

/// Routine lines written one by one per second; more are counted.
pub const ROUTINE_LINES_PER_SECOND: u32 = 50;

const WINDOW: Duration = Duration::from_secs(1);

/// Counts routine lines per second. Time is the caller's (monotonic) clock.
#[derive(Debug, Default)]
pub struct LogBudget {
    /// When the current second began: at its first routine line.
    since: Option<Instant>,
    written: u32,
    /// Lines not written in the current second, by what they would have said.
    held: BTreeMap<&'static str, u64>,
}

/// Routine lines of a second that is over and were not written one by one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// How long the second really was (from its first line to the roll).
    pub over: Duration,
    /// What the lines would have said, and how many of each.
    pub counts: BTreeMap<&'static str, u64>,
}

impl Held {
    /// How many lines in all.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }
}

impl LogBudget {
    /// Whether a routine line saying `what` may be written at `now` (if not, it is
    /// counted), and the count of a second that ended before it, to be logged
    /// first.
    pub fn admit(&mut self, what: &'static str, now: Instant) -> (bool, Option<Held>) {
        let held = self.roll(now);
        self.since.get_or_insert(now);
        if self.written < ROUTINE_LINES_PER_SECOND {
            self.written += 1;
            return (true, held);
        }
        *self.held.entry(what).or_default() += 1;
        (false, held)
    }

    /// Closes the current second if it is over, and returns what it held, if
    /// anything. Called on each routine line and by the periodic check, so a
    /// count is said within a check interval of its second's end even when no
    /// further line comes.
    pub fn roll(&mut self, now: Instant) -> Option<Held> {
        let since = self.since?;
        let over = now.saturating_duration_since(since);
        if over < WINDOW {
            return None;
        }
        self.since = None;
        self.written = 0;
        if self.held.is_empty() {
            return None;
        }
        Some(Held {
            over,
            counts: std::mem::take(&mut self.held),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_written_up_to_the_budget_then_counted_once_the_second_is_over() {
        let mut budget = LogBudget::default();
        let start = Instant::now();
        let mut written = 0;
        for i in 0..1_000u32 {
            let what = if i % 10 == 0 {
                "node joined"
            } else {
                "node reconnected"
            };
            let (admitted, held) = budget.admit(what, start + Duration::from_micros(u64::from(i)));
            assert_eq!(held, None, "the second is not over yet");
            written += u32::from(admitted);
        }
        assert_eq!(written, ROUTINE_LINES_PER_SECOND);
        assert_eq!(budget.roll(start + Duration::from_millis(999)), None);

        // The next line after the second opens a fresh budget and brings the count.
        let (admitted, held) = budget.admit("node reconnected", start + WINDOW);
        assert!(admitted);
        let held = held.expect("lines were held");
        assert_eq!(held.total(), 1_000 - u64::from(ROUTINE_LINES_PER_SECOND));
        assert_eq!(held.counts["node joined"], 95, "100 joined, the first 5 written");
        assert_eq!(held.counts["node reconnected"], 855);
        assert_eq!(held.over, WINDOW);
    }

    #[test]
    fn the_periodic_roll_says_the_count_without_another_line_and_only_once() {
        let mut budget = LogBudget::default();
        let start = Instant::now();
        for _ in 0..ROUTINE_LINES_PER_SECOND + 7 {
            budget.admit("node suspected", start);
        }
        let later = start + Duration::from_millis(1_500);
        let held = budget.roll(later).expect("seven were held");
        assert_eq!(held.counts["node suspected"], 7);
        assert_eq!(held.over, Duration::from_millis(1_500));
        assert_eq!(budget.roll(later), None);
        assert_eq!(budget.admit("node suspected", later), (true, None));
    }

    #[test]
    fn a_quiet_second_holds_nothing_and_says_nothing() {
        let mut budget = LogBudget::default();
        let start = Instant::now();
        for i in 0..ROUTINE_LINES_PER_SECOND {
            let (admitted, _) = budget.admit("node joined", start + Duration::from_millis(u64::from(i)));
            assert!(admitted);
        }
        assert_eq!(budget.roll(start + WINDOW * 3), None);
        assert_eq!(budget.roll(start + WINDOW * 4), None, "nothing open");
    }
}
