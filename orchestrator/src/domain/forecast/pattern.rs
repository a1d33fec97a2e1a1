//! Evidence of an hourly pattern in the data itself, which lets `auto` trust the
//! models that see the hour's shape (`seasonal_hour`, `holt_winters`) within
//! hours instead of after a day's record.

use super::{History, holt_winters, record::EVIDENCE_T};

/// Buckets in an hour.
const HOUR_BUCKETS: i64 = 12;
/// Buckets of the long history the pattern evidence looks at (a day).
const PATTERN_BUCKETS: usize = 288;
/// Change pairs the pattern evidence needs (three hours' worth).
const PATTERN_MIN_PAIRS: usize = 36;

/// Evidence of an hourly pattern: the autocorrelation of bucket-to-bucket changes
/// at a lag of one hour, over the last day of buckets, is at least three standard
/// errors of a patternless series' (1/sqrt(pairs)): 0.5 over three hours, 0.18
/// over a day. Changes, not values: a level that merely persists (a quiet or a
/// drifting trace) correlates with itself at every lag, while a pattern that
/// repeats each hour makes its rises and falls repeat at the hour's lag. `None`
/// with fewer than three hours of change pairs.
pub(super) fn hourly_pattern(history: &History) -> Option<bool> {
    let lag = HOUR_BUCKETS as usize;
    let buckets: Vec<(i64, f64)> = history
        .buckets()
        .rev()
        .take(PATTERN_BUCKETS + 1)
        .rev()
        .map(|p| (holt_winters::bucket_of(p.t), p.value))
        .collect();
    let first = buckets.first()?.0;
    let span = (buckets.last()?.0 - first + 1) as usize;
    let mut by_index = vec![None; span];
    for (index, value) in &buckets {
        by_index[(index - first) as usize] = Some(*value);
    }
    let change = |i: usize| -> Option<f64> { Some(by_index[i]? - by_index[i.checked_sub(1)?]?) };
    let (mut sum_xy, mut sum_xx, mut sum_yy, mut pairs) = (0.0, 0.0, 0.0, 0usize);
    for i in lag..span {
        if let (Some(x), Some(y)) = (change(i), change(i - lag)) {
            sum_xy += x * y;
            sum_xx += x * x;
            sum_yy += y * y;
            pairs += 1;
        }
    }
    if pairs < PATTERN_MIN_PAIRS || sum_xx <= 0.0 || sum_yy <= 0.0 {
        return None;
    }
    Some(sum_xy / (sum_xx * sum_yy).sqrt() * (pairs as f64).sqrt() >= EVIDENCE_T)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::forecast::{
        Point,
        tests::{T0, random_walk},
    };

    #[test]
    fn the_hourly_pattern_evidence_needs_three_hours_and_a_repeating_shape() {
        let mut history = History::new(3600.0);
        let saw = |i: usize| 0.2 + 0.04 * (i % 12) as f64;
        for i in 0..36 {
            history.push(Point {
                t: T0 + i as f64 * 300.0,
                value: saw(i),
            });
        }
        assert_eq!(hourly_pattern(&history), None, "under three hours of pairs");
        for i in 36..60 {
            history.push(Point {
                t: T0 + i as f64 * 300.0,
                value: saw(i),
            });
        }
        assert_eq!(hourly_pattern(&history), Some(true));
        // A steady climb persists at every lag, yet its changes do not repeat.
        let mut climbing = History::new(3600.0);
        let walk = random_walk(100, 3);
        for (i, value) in walk.iter().enumerate() {
            climbing.push(Point {
                t: T0 + i as f64 * 300.0,
                value: (0.001 * i as f64 + value * 0.5).min(1.0),
            });
        }
        assert_eq!(hourly_pattern(&climbing), Some(false));
    }
}
