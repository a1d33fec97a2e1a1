//! Holt-Winters: a level, a damped trend and averaged seasonal profiles (the
//! hour's shape and the day's), updated online in constant time per 5-minute
//! bucket of the history.
//!
//! Additive, double-seasonal (Taylor, 2003): a bucket's value is level + trend +
//! the hour profile at the bucket's slot (12 slots) + the day profile at its slot
//! (288 slots). Where `seasonal_hour` copies one earlier value, a profile averages
//! the slot over many hours or days, so one noisy hour does not repeat itself.
//!
//! Its parameters are fitted causally: a few parameter sets run side by side over
//! the same buckets, each is scored on its own forecasts one horizon ahead as the
//! buckets arrive, and the forecast comes from the set with the lowest recent
//! error. Nothing is fitted on the future, and a restart that replays the history
//! rebuilds the same state.

use super::history::BUCKET_SECONDS;

/// Slots of the hour profile.
const HOUR_SLOTS: usize = 12;
/// Slots of the day profile.
const DAY_SLOTS: usize = 288;
/// Damping of the trend per bucket: a trend fades to nothing over about an hour.
const DAMPING: f64 = 0.9;
/// Weight of the newest error in a parameter set's record (about a day of buckets).
const SCORE_DECAY: f64 = 1.0 / 288.0;
/// A gap longer than this in the buckets restarts level and trend (the profiles stay).
const MAX_GAP_BUCKETS: i64 = 12;

/// One parameter set: (level alpha, trend beta, hour profile gamma, day profile gamma).
/// Few and far apart on purpose: a responsive and a smooth level, each with a
/// fast- and a slow-learning profile. A grid this coarse cannot be tuned to a
/// trace; it only lets the data say how fast it changes.
const PARAMETERS: [(f64, f64, f64, f64); 6] = [
    (0.2, 0.02, 0.5, 0.0),
    (0.5, 0.02, 0.3, 0.0),
    (0.8, 0.02, 0.3, 0.0),
    (0.2, 0.02, 0.5, 0.2),
    (0.5, 0.02, 0.3, 0.2),
    (0.8, 0.02, 0.3, 0.2),
];

#[derive(Debug, Clone)]
struct Smoother {
    alpha: f64,
    beta: f64,
    gamma_hour: f64,
    gamma_day: f64,
    level: f64,
    trend: f64,
    hour: [Option<f64>; HOUR_SLOTS],
    day: Box<[Option<f64>; DAY_SLOTS]>,
    /// Forecasts made for the next buckets, by bucket index: (index, value).
    pending: [(i64, f64); 4],
    abs_error: Option<f64>,
}

impl Smoother {
    fn new((alpha, beta, gamma_hour, gamma_day): (f64, f64, f64, f64)) -> Self {
        Self {
            alpha,
            beta,
            gamma_hour,
            gamma_day,
            level: f64::NAN,
            trend: 0.0,
            hour: [None; HOUR_SLOTS],
            day: Box::new([None; DAY_SLOTS]),
            pending: [(i64::MIN, 0.0); 4],
            abs_error: None,
        }
    }

    fn seasonal(&self, bucket: i64) -> f64 {
        let hour = self.hour[slot(bucket, HOUR_SLOTS)].unwrap_or(0.0);
        let day = self.day[slot(bucket, DAY_SLOTS)].unwrap_or(0.0);
        hour + day
    }

    /// The state after taking `value` as bucket `bucket` (whose previous bucket
    /// was `gap` buckets earlier), without keeping it: (level, trend, hour, day).
    fn step(&self, bucket: i64, value: f64, gap: i64) -> (f64, f64, f64, f64) {
        let hour = self.hour[slot(bucket, HOUR_SLOTS)];
        let day = self.day[slot(bucket, DAY_SLOTS)];
        let seasonal = hour.unwrap_or(0.0) + day.unwrap_or(0.0);
        if self.level.is_nan() || gap > MAX_GAP_BUCKETS {
            let level = value - seasonal;
            return (level, 0.0, hour.unwrap_or(0.0), day.unwrap_or(0.0));
        }
        let mut expected_level = self.level;
        let mut trend = self.trend;
        for _ in 0..gap.max(1) {
            expected_level += DAMPING * trend;
            trend *= DAMPING;
        }
        let level = self.alpha * (value - seasonal) + (1.0 - self.alpha) * expected_level;
        let trend = self.beta * (level - self.level) + (1.0 - self.beta) * trend;
        let residual = value - level;
        // A slot seen for the first time takes what the other parts leave over.
        let hour = match hour {
            Some(old) => old + self.gamma_hour * (residual - day.unwrap_or(0.0) - old),
            None => residual - day.unwrap_or(0.0),
        };
        let day = match day {
            Some(old) => old + self.gamma_day * (residual - hour - old),
            None => 0.0,
        };
        (level, trend, hour, day)
    }

    fn update(&mut self, bucket: i64, value: f64, gap: i64) {
        for (index, forecast) in &mut self.pending {
            if *index == bucket {
                let error = (value - *forecast).abs();
                self.abs_error = Some(match self.abs_error {
                    Some(old) => old + SCORE_DECAY * (error - old),
                    None => error,
                });
                *index = i64::MIN;
            }
        }
        let (level, trend, hour, day) = self.step(bucket, value, gap);
        let first_day_visit = self.day[slot(bucket, DAY_SLOTS)].is_none();
        self.level = level;
        self.trend = trend;
        self.hour[slot(bucket, HOUR_SLOTS)] = Some(hour);
        // The day profile starts at zero on a slot's first visit: the hour
        // profile and the level explain the first day.
        self.day[slot(bucket, DAY_SLOTS)] = Some(if first_day_visit { 0.0 } else { day });
    }

    /// Forecast for bucket `target` from state `(level, trend)` as of bucket `from`.
    fn forecast_from(&self, level: f64, trend: f64, from: i64, target: i64) -> f64 {
        let steps = (target - from).max(0);
        let mut damped = 0.0;
        let mut factor = 1.0;
        for _ in 0..steps {
            factor *= DAMPING;
            damped += factor;
        }
        level + damped * trend + self.seasonal(target)
    }
}

fn slot(bucket: i64, slots: usize) -> usize {
    bucket.rem_euclid(slots as i64) as usize
}

/// The bucket index of Unix time `t`.
pub fn bucket_of(t: f64) -> i64 {
    (t / BUCKET_SECONDS).floor() as i64
}

/// Holt-Winters over the 5-minute buckets, with causally chosen parameters.
#[derive(Debug, Clone)]
pub struct HoltWinters {
    smoothers: Vec<Smoother>,
    last_bucket: Option<i64>,
    /// Buckets ahead that each smoother forecasts for its own record.
    horizon_buckets: i64,
}

impl HoltWinters {
    /// A model whose parameter sets are scored `horizon_seconds` ahead.
    pub fn new(horizon_seconds: f64) -> Self {
        Self {
            smoothers: PARAMETERS.into_iter().map(Smoother::new).collect(),
            last_bucket: None,
            horizon_buckets: ((horizon_seconds / BUCKET_SECONDS).round() as i64).clamp(1, 3),
        }
    }

    /// Takes a closed bucket (its start time's bucket index and mean value).
    pub fn update(&mut self, bucket: i64, value: f64) {
        if self.last_bucket.is_some_and(|last| bucket <= last) {
            return;
        }
        let gap = self.last_bucket.map_or(1, |last| bucket - last);
        let target = bucket + self.horizon_buckets;
        for smoother in &mut self.smoothers {
            smoother.update(bucket, value, gap);
            let forecast = smoother.forecast_from(smoother.level, smoother.trend, bucket, target);
            if let Some(free) = smoother.pending.iter_mut().find(|(index, _)| *index < bucket) {
                *free = (target, forecast);
            }
        }
        self.last_bucket = Some(bucket);
    }

    /// The forecast for Unix time `target`, given the bucket being filled now (its
    /// index and mean so far): that bucket is taken as if it closed now, without
    /// keeping it (before any bucket has closed, its value is the level). `None`
    /// for a bucket that is not after the last closed one.
    pub fn forecast(&self, filling: (i64, f64), target: f64) -> Option<f64> {
        let (bucket, value) = filling;
        if self.last_bucket.is_some_and(|last| bucket <= last) {
            return None;
        }
        let best = self.smoothers.iter().min_by(|a, b| {
            let (a, b) = (a.abs_error.unwrap_or(f64::MAX), b.abs_error.unwrap_or(f64::MAX));
            a.total_cmp(&b)
        })?;
        let gap = self.last_bucket.map_or(1, |last| bucket - last);
        let (level, trend, _, _) = best.step(bucket, value, gap);
        Some(best.forecast_from(level, trend, bucket, bucket_of(target)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_hourly_shape_is_learned_and_averaged() {
        let mut model = HoltWinters::new(600.0);
        // An hourly shape plus alternating noise on one slot: the profile averages it.
        let shape = |b: i64| 0.3 + 0.02 * (b.rem_euclid(12) as f64);
        for b in 0..(24 * 12) {
            let noise = if b % 12 == 5 {
                if (b / 12) % 2 == 0 { 0.05 } else { -0.05 }
            } else {
                0.0
            };
            model.update(b, shape(b) + noise);
        }
        let b = 24 * 12;
        let target = (b + 2) as f64 * BUCKET_SECONDS;
        let forecast = model.forecast((b, shape(b)), target).unwrap();
        assert!(
            (forecast - shape(b + 2)).abs() < 0.01,
            "{forecast} vs {}",
            shape(b + 2)
        );
        // The noisy slot: its average, not its last value.
        let b = 24 * 12 + 3;
        let target = (b + 2) as f64 * BUCKET_SECONDS;
        let forecast = model.forecast((b, shape(b)), target).unwrap();
        assert!(
            (forecast - shape(b + 2)).abs() < 0.03,
            "{forecast} vs {}",
            shape(b + 2)
        );
    }

    #[test]
    fn flat_data_is_forecast_flat_and_gaps_restart_the_level() {
        let mut model = HoltWinters::new(600.0);
        assert_eq!(
            model.forecast((0, 0.4), 2.0 * BUCKET_SECONDS),
            Some(0.4),
            "no bucket closed yet"
        );
        for b in 0..100 {
            model.update(b, 0.4);
        }
        let forecast = model.forecast((100, 0.4), 102.0 * BUCKET_SECONDS).unwrap();
        assert!((forecast - 0.4).abs() < 1e-9);
        // A day later at another level: the level restarts from the new value.
        let forecast = model.forecast((400, 0.7), 402.0 * BUCKET_SECONDS).unwrap();
        assert!((forecast - 0.7).abs() < 0.05, "{forecast}");
        assert_eq!(model.forecast((99, 0.4), 0.0), None, "the past is not forecast");
    }
}
