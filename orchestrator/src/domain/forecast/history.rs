//! Fleet CPU history: the recent window at full resolution (one point per scaling
//! check) and a downsampled long history (5-minute means over 8 days) for the
//! seasonal models and for lookups of "the value at time t".
//!
//! Time is Unix seconds (`f64`); the models turn it into minutes relative to now.

use std::collections::VecDeque;

/// One observation: fleet CPU as a fraction of one, at Unix time `t` (seconds).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Point {
    /// Unix seconds.
    pub t: f64,
    /// CPU fraction, 0..=1.
    pub value: f64,
}

/// Width of a long-history bucket.
pub const BUCKET_SECONDS: f64 = 300.0;
/// How far back the long history reaches (a week and a day, for day-ago lookups).
pub const LONG_HISTORY_SECONDS: f64 = 8.0 * 86_400.0;

/// The history. Bounded: the window holds at most what fits in it at the check
/// rate, the long history at most `LONG_HISTORY_SECONDS / BUCKET_SECONDS` buckets.
#[derive(Debug, Clone)]
pub struct History {
    window: f64,
    recent: VecDeque<Point>,
    long: VecDeque<Point>,
    /// The bucket being filled: (bucket start, sum, count).
    filling: Option<(f64, f64, u32)>,
    level: Option<f64>,
    previous: Option<Point>,
}

/// Weight of the newest point in the level (exponential smoothing).
const LEVEL_ALPHA: f64 = 0.5;

impl History {
    /// An empty history with a recent window of `window_seconds`.
    pub fn new(window_seconds: f64) -> Self {
        Self {
            window: window_seconds,
            recent: VecDeque::new(),
            long: VecDeque::new(),
            filling: None,
            level: None,
            previous: None,
        }
    }

    /// Adds a point. Points must come in time order; a point not after the latest
    /// one, or with a value outside 0..=1, is refused (returns false).
    pub fn push(&mut self, point: Point) -> bool {
        let in_order = self.recent.back().is_none_or(|last| point.t > last.t);
        if !in_order || !point.t.is_finite() || !(0.0..=1.0).contains(&point.value) {
            return false;
        }
        self.previous = self.recent.back().copied();
        self.recent.push_back(point);
        while self.recent.front().is_some_and(|p| p.t <= point.t - self.window) {
            self.recent.pop_front();
        }
        self.level = Some(match self.level {
            Some(level) => LEVEL_ALPHA * point.value + (1.0 - LEVEL_ALPHA) * level,
            None => point.value,
        });
        self.add_to_long(point);
        true
    }

    fn add_to_long(&mut self, point: Point) {
        let start = (point.t / BUCKET_SECONDS).floor() * BUCKET_SECONDS;
        match &mut self.filling {
            Some((bucket, sum, count)) if *bucket == start => {
                *sum += point.value;
                *count += 1;
            }
            filling => {
                if let Some((bucket, sum, count)) = filling.take() {
                    self.long.push_back(Point {
                        t: bucket + BUCKET_SECONDS / 2.0,
                        value: sum / f64::from(count),
                    });
                }
                *filling = Some((start, point.value, 1));
            }
        }
        while self
            .long
            .front()
            .is_some_and(|p| p.t < point.t - LONG_HISTORY_SECONDS)
        {
            self.long.pop_front();
        }
    }

    /// Points of the recent window, oldest first.
    pub fn recent(&self) -> impl ExactSizeIterator<Item = &Point> + Clone {
        self.recent.iter()
    }

    /// Number of points in the recent window.
    pub fn len(&self) -> usize {
        self.recent.len()
    }

    /// Whether the recent window is empty.
    pub fn is_empty(&self) -> bool {
        self.recent.is_empty()
    }

    /// The newest point.
    pub fn latest(&self) -> Option<Point> {
        self.recent.back().copied()
    }

    /// The point before the newest.
    pub fn previous(&self) -> Option<Point> {
        self.previous
    }

    /// The newest closed bucket of the long history (its centre and mean).
    pub fn last_bucket(&self) -> Option<Point> {
        self.long.back().copied()
    }

    /// The closed buckets of the long history, oldest first (centre and mean).
    pub fn buckets(&self) -> impl DoubleEndedIterator<Item = &Point> + ExactSizeIterator {
        self.long.iter()
    }

    /// The bucket being filled: its start (Unix seconds) and the mean so far.
    pub fn filling(&self) -> Option<(f64, f64)> {
        self.filling
            .map(|(start, sum, count)| (start, sum / f64::from(count)))
    }

    /// The exponentially smoothed level.
    pub fn level(&self) -> Option<f64> {
        self.level
    }

    /// The value observed nearest to `t`, if one lies within `tolerance` seconds:
    /// from the recent window at full resolution, else from the long history.
    pub fn value_near(&self, t: f64, tolerance: f64) -> Option<f64> {
        nearest(&self.recent, t, tolerance)
            .or_else(|| nearest(&self.long, t, tolerance.max(BUCKET_SECONDS / 2.0)))
    }
}

fn nearest(points: &VecDeque<Point>, t: f64, tolerance: f64) -> Option<f64> {
    let after = points.partition_point(|p| p.t < t);
    let candidates = [after.checked_sub(1), Some(after)];
    candidates
        .into_iter()
        .flatten()
        .filter_map(|i| points.get(i))
        .filter(|p| (p.t - t).abs() <= tolerance)
        .min_by(|a, b| (a.t - t).abs().total_cmp(&(b.t - t).abs()))
        .map(|p| p.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(minutes: f64, value: f64) -> Point {
        Point {
            t: 1_700_000_000.0 + minutes * 60.0,
            value,
        }
    }

    #[test]
    fn the_window_keeps_the_last_hour_in_order() {
        let mut history = History::new(3600.0);
        for minute in 0..=90 {
            assert!(history.push(point(f64::from(minute), 0.5)));
        }
        assert_eq!(history.len(), 60, "(t - 60 min, t]");
        assert_eq!(history.latest(), Some(point(90.0, 0.5)));
        assert!(!history.push(point(90.0, 0.4)), "same time twice");
        assert!(!history.push(point(89.0, 0.4)), "out of order");
        assert!(!history.push(point(91.0, f64::NAN)));
        assert!(!history.push(point(91.0, 1.5)));
    }

    #[test]
    fn lookups_find_the_nearest_point_within_the_tolerance_only() {
        let mut history = History::new(3600.0);
        for minute in [0.0, 5.0, 10.0, 30.0] {
            history.push(point(minute, minute / 100.0));
        }
        let at = |minutes: f64| 1_700_000_000.0 + minutes * 60.0;
        assert_eq!(history.value_near(at(6.0), 150.0), Some(0.05));
        assert_eq!(history.value_near(at(9.0), 150.0), Some(0.10));
        assert_eq!(history.value_near(at(20.0), 150.0), None, "a gap is a gap");
    }

    #[test]
    fn the_long_history_serves_day_old_lookups_from_bucket_means() {
        let mut history = History::new(3600.0);
        for minute in 0..(26 * 60) {
            let value = if minute < 60 { 0.2 } else { 0.6 };
            history.push(point(f64::from(minute), value));
        }
        // Long gone from the one-hour window, still in the 5-minute buckets.
        let day_ago = 1_700_000_000.0 + 30.0 * 60.0;
        assert_eq!(history.value_near(day_ago, 30.0), Some(0.2));
        assert!(history.len() <= 60);
    }
}
