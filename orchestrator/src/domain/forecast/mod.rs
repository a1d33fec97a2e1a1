//! The forecaster: predicts fleet CPU `horizon` ahead from the history, scores
//! every prediction when its target time arrives, and says how far to trust it.
//!
//! Sans-IO: time is Unix seconds passed in, one [`Forecaster::observe`] and one
//! [`Forecaster::predict`] per scaling check. The live loop and the `backtest`
//! command run this same code.
//!
//! Models (see BENCHMARKS.md for how each fares on real traces):
//! - `linear`: the design card's OLS over the last 60 minutes (linfa-linear);
//! - `naive`: the current value (the baseline to beat);
//! - `mean`: the mean of the window;
//! - `level`: exponential smoothing of the level;
//! - `trend`: the current value plus half of the last step's change (a damped trend);
//! - `seasonal_hour`, `seasonal_day`: the value one hour / one day before the target;
//! - `holt_winters`: level, damped trend and averaged hour and day profiles
//!   ([`holt_winters`]);
//! - `auto` (default): each check, the candidate with the lowest recent scored
//!   error (exponentially weighted), `naive` until candidates have a record. A
//!   candidate that ignores the current value needs a day's record, or evidence
//!   (the record's paired edge in `record.rs`, the hourly pattern in `pattern.rs`).
//!
//! Confidence is the probability that the actual lands within +-0.10 of the
//! prediction: from the chosen model's recent scored errors once it has a record,
//! before that from the linear fit's standard error (normal errors) or, for the
//! other models, from how often the value moved less than 0.10 over one horizon
//! within the window.

pub mod accuracy;
pub mod backtest;
pub mod history;
pub mod holt_winters;
pub mod linear;
mod pattern;
mod record;

use std::{collections::VecDeque, fmt, str::FromStr, time::Duration};

pub use accuracy::{Accuracy, AccuracySummary};
pub use history::{History, Point};
use holt_winters::HoltWinters;
use record::Record;

/// The tolerance band of "a good prediction": +-10 percentage points.
pub const BAND: f64 = 0.10;
/// Scored predictions a model that ignores the current value (mean, level,
/// seasonal) needs before `auto` may pick it without other evidence (a day of
/// 5-minute checks).
const LONG_WARM_UP: u64 = 288;

/// A forecasting model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Model {
    /// The current value.
    Naive,
    /// Mean of the window.
    Mean,
    /// Exponentially smoothed level.
    Level,
    /// Current value plus a damped last step.
    Trend,
    /// The value one hour before the target.
    SeasonalHour,
    /// The value one day before the target.
    SeasonalDay,
    /// Level, damped trend and averaged hour and day profiles (Holt-Winters).
    HoltWinters,
    /// OLS over the window (the design card's model).
    Linear,
    /// Picks the candidate with the best recent record.
    Auto,
}

/// The models scored at every check, in tie-breaking order. `auto` chooses among
/// all but `linear`: it extrapolates noise, loses to `naive` on the real traces,
/// and choosing it in its good spells costs more in its bad ones.
const CANDIDATES: [Model; 8] = [
    Model::Naive,
    Model::Mean,
    Model::Level,
    Model::Trend,
    Model::SeasonalHour,
    Model::SeasonalDay,
    Model::HoltWinters,
    Model::Linear,
];

impl Model {
    /// Every model, for `--help` and errors.
    pub const ALL: [Model; 9] = [
        Model::Auto,
        Model::Naive,
        Model::Mean,
        Model::Level,
        Model::Trend,
        Model::SeasonalHour,
        Model::SeasonalDay,
        Model::HoltWinters,
        Model::Linear,
    ];

    /// The name used in config, flags and the API.
    pub fn name(self) -> &'static str {
        match self {
            Model::Naive => "naive",
            Model::Mean => "mean",
            Model::Level => "level",
            Model::Trend => "trend",
            Model::SeasonalHour => "seasonal_hour",
            Model::SeasonalDay => "seasonal_day",
            Model::HoltWinters => "holt_winters",
            Model::Linear => "linear",
            Model::Auto => "auto",
        }
    }

    fn index(self) -> usize {
        CANDIDATES
            .iter()
            .position(|m| *m == self)
            .expect("auto is not a candidate")
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown model name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown model {0:?} (one of: auto, naive, mean, level, trend, seasonal_hour, seasonal_day, holt_winters, linear)"
)]
pub struct UnknownModel(pub String);

impl serde::Serialize for Model {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Model {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for Model {
    type Err = UnknownModel;
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Model::ALL
            .into_iter()
            .find(|model| model.name() == name)
            .ok_or_else(|| UnknownModel(name.to_owned()))
    }
}

/// The forecaster's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ForecastConfig {
    /// History used by the window models (the seed's 60 minutes).
    pub window: Duration,
    /// How far ahead to predict (the seed's 10 minutes).
    pub horizon: Duration,
    /// Fewer points than this: no prediction (the seed's 10).
    pub min_points: usize,
    /// How far an observation may be from a wanted time and still count as the
    /// value at that time (half the check interval is right).
    pub tolerance: Duration,
    /// The model whose predictions are used.
    pub model: Model,
}

impl ForecastConfig {
    /// The seed's parameters, for checks every `check_interval`.
    pub fn seed(check_interval: Duration, model: Model) -> Self {
        Self {
            window: Duration::from_secs(60 * 60),
            horizon: Duration::from_secs(10 * 60),
            min_points: 10,
            tolerance: check_interval / 2,
            model,
        }
    }
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Forecast {
    /// When it was made (Unix seconds).
    pub made_at: f64,
    /// The current fleet CPU it was made from.
    pub current: f64,
    /// The prediction for `made_at + horizon`, clamped to 0..=1; `None` with too
    /// little history.
    pub predicted: Option<f64>,
    /// Probability that the actual lands within +-0.10 of `predicted`.
    pub confidence: f64,
    /// The model that made `predicted` (for `auto`, the candidate it picked).
    pub model: Model,
    /// Points in the window.
    pub data_points: usize,
}

impl Forecast {
    /// The target time (Unix seconds).
    pub fn target(&self, horizon: Duration) -> f64 {
        self.made_at + horizon.as_secs_f64()
    }
}

/// A prediction whose target time has come.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    /// The target time.
    pub target: f64,
    /// What happened.
    pub actual: f64,
    /// What was predicted.
    pub predicted: f64,
    /// What "current value" would have predicted.
    pub baseline: f64,
    /// The model that predicted it.
    pub model: Model,
    /// The confidence stated with it.
    pub confidence: f64,
}

#[derive(Debug, Clone)]
struct Pending {
    target: f64,
    candidates: [Option<f64>; CANDIDATES.len()],
    chosen: Option<(Model, f64)>,
    confidence: f64,
    baseline: f64,
}

/// The forecaster's state: history, predictions awaiting their target, each
/// candidate's record, and the accuracy of the predictions used.
#[derive(Debug, Clone)]
pub struct Forecaster {
    config: ForecastConfig,
    history: History,
    pending: VecDeque<Pending>,
    records: [Record; CANDIDATES.len()],
    accuracy: Accuracy,
    holt_winters: HoltWinters,
    /// Whether the last day's buckets show an hourly pattern (see
    /// [`hourly_pattern`]; updated when a bucket closes).
    hourly_pattern: Option<bool>,
}

impl Forecaster {
    /// A forecaster with an empty history.
    pub fn new(config: ForecastConfig) -> Self {
        Self {
            history: History::new(config.window.as_secs_f64()),
            holt_winters: HoltWinters::new(config.horizon.as_secs_f64()),
            config,
            pending: VecDeque::new(),
            records: [Record::default(); CANDIDATES.len()],
            accuracy: Accuracy::default(),
            hourly_pattern: None,
        }
    }

    /// The parameters.
    pub fn config(&self) -> &ForecastConfig {
        &self.config
    }

    /// The history.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Accuracy of the predictions used, and of the baseline, over recent scores.
    pub fn accuracy(&self) -> AccuracySummary {
        self.accuracy.summary()
    }

    /// Warm start: replays a persisted history as the scaling checks that made it
    /// (each check observed its point, then predicted), so every model's scored
    /// record, the accuracy summary and the predictions still waiting for their
    /// target are rebuilt: after a restart or a failover, `auto` chooses as it
    /// would have without one, instead of starting over from `naive` for a day.
    /// Returns the forecasts the replayed checks made, oldest first, one per
    /// point replayed (out-of-order points are skipped, as `observe` skips them).
    pub fn replay(&mut self, points: impl IntoIterator<Item = Point>) -> Vec<Forecast> {
        let mut forecasts = Vec::new();
        for point in points {
            let accepted = self.history.latest().is_none_or(|last| point.t > last.t);
            self.observe(point);
            if accepted && let Some(forecast) = self.predict(point.t) {
                forecasts.push(forecast);
            }
        }
        forecasts
    }

    /// Adds an observation and scores every pending prediction whose target it
    /// settles. Observations out of time order or outside 0..=1 are ignored.
    pub fn observe(&mut self, point: Point) -> Vec<Scored> {
        let closed_before = self.history.last_bucket();
        if !self.history.push(point) {
            return Vec::new();
        }
        if let Some(closed) = self.history.last_bucket()
            && closed_before != Some(closed)
        {
            self.holt_winters
                .update(holt_winters::bucket_of(closed.t), closed.value);
            self.hourly_pattern = pattern::hourly_pattern(&self.history);
        }
        let tolerance = self.config.tolerance.as_secs_f64();
        let mut scored = Vec::new();
        while let Some(pending) = self.pending.front() {
            if pending.target > point.t + tolerance {
                break;
            }
            if point.t < pending.target - tolerance {
                break;
            }
            let pending = self.pending.pop_front().expect("front exists");
            let Some(actual) = self.history.value_near(pending.target, tolerance) else {
                continue;
            };
            let naive_error = actual - pending.baseline;
            for (record, prediction) in self.records.iter_mut().zip(pending.candidates) {
                if let Some(prediction) = prediction {
                    record.add(actual - prediction, naive_error);
                }
            }
            if let Some((model, predicted)) = pending.chosen {
                self.accuracy.add(actual - predicted, actual - pending.baseline);
                scored.push(Scored {
                    target: pending.target,
                    actual,
                    predicted,
                    baseline: pending.baseline,
                    model,
                    confidence: pending.confidence,
                });
            }
        }
        scored
    }

    /// Predicts from the history as of `now` (normally the time of the latest
    /// observation) and remembers the prediction for scoring.
    pub fn predict(&mut self, now: f64) -> Option<Forecast> {
        let current = self.history.latest()?.value;
        let data_points = self.history.len();
        if data_points < self.config.min_points {
            return Some(Forecast {
                made_at: now,
                current,
                predicted: None,
                confidence: 0.0,
                model: self.config.model,
                data_points,
            });
        }
        let horizon = self.config.horizon.as_secs_f64();
        let target = now + horizon;
        let mut linear_se = None;
        let mut candidates = [None; CANDIDATES.len()];
        for (slot, model) in candidates.iter_mut().zip(CANDIDATES) {
            *slot = self
                .candidate(model, now, current, &mut linear_se)
                .map(|v| v.clamp(0.0, 1.0));
        }
        let model = match self.config.model {
            Model::Auto => self.best_candidate(&candidates),
            fixed if candidates[fixed.index()].is_some() => fixed,
            // A seasonal model without enough history falls back to the baseline.
            _ => Model::Naive,
        };
        let predicted = candidates[model.index()].expect("chosen models have a prediction");
        let record = &self.records[model.index()];
        let confidence = if record.warm() {
            record.confidence()
        } else if let (Model::Linear, Some(se)) = (model, linear_se) {
            normal_within(se)
        } else {
            self.in_window_confidence()
        };
        self.pending.push_back(Pending {
            target,
            candidates,
            chosen: Some((model, predicted)),
            confidence,
            baseline: current,
        });
        Some(Forecast {
            made_at: now,
            current,
            predicted: Some(predicted),
            confidence,
            model,
            data_points,
        })
    }

    fn candidate(&self, model: Model, now: f64, current: f64, linear_se: &mut Option<f64>) -> Option<f64> {
        let horizon = self.config.horizon.as_secs_f64();
        let tolerance = self.config.tolerance.as_secs_f64();
        let history = &self.history;
        match model {
            Model::Naive => Some(current),
            Model::Mean => {
                let sum: f64 = history.recent().map(|p| p.value).sum();
                Some(sum / history.len() as f64)
            }
            Model::Level => history.level(),
            Model::Trend => {
                let (latest, previous) = (history.latest()?, history.previous()?);
                // Only a step of about one check is a trend; across a gap it is not.
                (latest.t - previous.t <= horizon).then_some(current + 0.5 * (current - previous.value))
            }
            Model::SeasonalHour => history.value_near(now + horizon - 3600.0, tolerance),
            Model::SeasonalDay => history.value_near(now + horizon - 86_400.0, tolerance),
            Model::HoltWinters => {
                let (start, mean) = history.filling()?;
                self.holt_winters
                    .forecast((holt_winters::bucket_of(start), mean), now + horizon)
            }
            Model::Linear => {
                let points: Vec<Point> = history.recent().copied().collect();
                let fit = linear::fit(&points, now, horizon / 60.0)?;
                *linear_se = Some(fit.standard_error);
                Some(fit.value)
            }
            Model::Auto => None,
        }
    }

    /// The candidate (not `linear`) with the lowest recent error among those with a
    /// record; `naive` until then and on ties.
    fn best_candidate(&self, candidates: &[Option<f64>]) -> Model {
        let naive = self.records[Model::Naive.index()];
        // Scored checks per independent horizon (checks come every 2 x tolerance).
        let per_horizon =
            self.config.horizon.as_secs_f64() / (2.0 * self.config.tolerance.as_secs_f64()).max(1.0);
        let hourly = self.hourly_pattern.unwrap_or(false);
        CANDIDATES
            .into_iter()
            .filter(|model| candidates[model.index()].is_some())
            .filter(|model| {
                let record = self.records[model.index()];
                match model {
                    Model::Naive | Model::Trend => record.warm(),
                    Model::Linear | Model::Auto => false,
                    // Models that do not follow the current value must have earned
                    // it: in quiet spells every model looks good, and picking one
                    // that ignores the present is what loses when the next burst
                    // comes. Earned by a long record no worse than current
                    // value's; or sooner by evidence: a record that beats current
                    // value on the same targets beyond chance, or (for the models
                    // that see the hour's shape) an hourly pattern in the data and
                    // a warm record no worse than current value's.
                    _ => {
                        (record.count >= LONG_WARM_UP && record.abs_slow <= naive.abs_slow)
                            || record.proven(per_horizon)
                            || (matches!(model, Model::SeasonalHour | Model::HoltWinters)
                                && hourly
                                && record.warm()
                                && record.abs_slow <= naive.abs_slow)
                    }
                }
            })
            .min_by(|a, b| {
                let (a, b) = (self.records[a.index()], self.records[b.index()]);
                a.abs_error.total_cmp(&b.abs_error)
            })
            .unwrap_or(Model::Naive)
    }

    /// Before a model has a record: how often the value moved by at most the band
    /// over one horizon within the window (Laplace-smoothed).
    fn in_window_confidence(&self) -> f64 {
        let horizon = self.config.horizon.as_secs_f64();
        let tolerance = self.config.tolerance.as_secs_f64();
        let (mut within, mut total) = (0u32, 0u32);
        for point in self.history.recent() {
            if let Some(later) = self.history.value_near(point.t + horizon, tolerance)
                && point.t + horizon <= self.history.latest().map_or(0.0, |p| p.t) + tolerance
            {
                total += 1;
                if (later - point.value).abs() <= BAND {
                    within += 1;
                }
            }
        }
        (f64::from(within) + 1.0) / (f64::from(total) + 2.0)
    }
}

/// P(|e| <= BAND) for e ~ N(0, se^2).
fn normal_within(standard_error: f64) -> f64 {
    if standard_error <= 1e-12 {
        return 1.0;
    }
    erf(BAND / (standard_error * std::f64::consts::SQRT_2))
}

/// The error function (Abramowitz and Stegun 7.1.26; absolute error below 1.5e-7).
fn erf(x: f64) -> f64 {
    let sign = x.signum();
    let x = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    sign * (1.0 - poly * (-x * x).exp())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(super) const T0: f64 = 1_700_000_000.0;

    fn forecaster(model: Model) -> Forecaster {
        Forecaster::new(ForecastConfig::seed(Duration::from_secs(60), model))
    }

    /// Feeds one point per minute from `values` and returns the last forecast.
    fn run(forecaster: &mut Forecaster, values: impl IntoIterator<Item = f64>) -> Option<Forecast> {
        let mut last = None;
        for (minute, value) in values.into_iter().enumerate() {
            let t = T0 + minute as f64 * 60.0;
            forecaster.observe(Point { t, value });
            last = forecaster.predict(t);
        }
        last
    }

    #[test]
    fn linear_data_is_predicted_exactly() {
        let mut linear = forecaster(Model::Linear);
        let forecast = run(&mut linear, (0..30).map(|m| 0.2 + 0.01 * f64::from(m))).unwrap();
        // The last point is 0.49 at minute 29; ten minutes on: 0.59.
        assert!((forecast.predicted.unwrap() - 0.59).abs() < 1e-9, "{forecast:?}");
        assert_eq!(forecast.model, Model::Linear);
        assert!(
            forecast.confidence > 0.99,
            "an exact fit is certain: {forecast:?}"
        );
    }

    #[test]
    fn flat_data_gives_the_flat_value_for_every_model() {
        for model in Model::ALL {
            let mut forecaster = forecaster(model);
            let forecast = run(&mut forecaster, std::iter::repeat_n(0.37, 40)).unwrap();
            let predicted = forecast.predicted.unwrap();
            assert!((predicted - 0.37).abs() < 1e-9, "{model}: {forecast:?}");
        }
    }

    #[test]
    fn fewer_than_ten_points_make_no_prediction() {
        let mut forecaster = forecaster(Model::Auto);
        let forecast = run(&mut forecaster, std::iter::repeat_n(0.5, 9)).unwrap();
        assert_eq!(forecast.predicted, None);
        assert_eq!(forecast.data_points, 9);
        assert_eq!(forecast.current, 0.5);
        let t = T0 + 9.0 * 60.0;
        forecaster.observe(Point { t, value: 0.5 });
        let forecast = forecaster.predict(t).unwrap();
        assert_eq!(forecast.data_points, 10);
        assert!(forecast.predicted.is_some());
    }

    #[test]
    fn predictions_are_clamped_to_the_unit_interval() {
        let mut up = forecaster(Model::Linear);
        let forecast = run(&mut up, (0..30).map(|m| (0.5 + 0.03 * f64::from(m)).min(1.0))).unwrap();
        assert_eq!(forecast.predicted, Some(1.0));
        let mut down = forecaster(Model::Linear);
        let forecast = run(&mut down, (0..30).map(|m| (0.5 - 0.03 * f64::from(m)).max(0.0))).unwrap();
        assert_eq!(forecast.predicted, Some(0.0));
    }

    #[test]
    fn gaps_are_handled_by_time_not_by_row_count() {
        let mut forecaster = forecaster(Model::Naive);
        // Ten points a minute apart, then nothing for 70 minutes: the window is empty
        // of everything but the new point.
        run(&mut forecaster, std::iter::repeat_n(0.5, 10));
        let t = T0 + 80.0 * 60.0;
        forecaster.observe(Point { t, value: 0.9 });
        let forecast = forecaster.predict(t).unwrap();
        assert_eq!(forecast.data_points, 1);
        assert_eq!(forecast.predicted, None);
        // Pending predictions whose target fell into the gap are dropped, not scored
        // against a value from another time.
        assert_eq!(forecaster.accuracy().scored, 0);
    }

    #[test]
    fn every_prediction_is_scored_at_its_target_against_the_baseline() {
        let mut forecaster = forecaster(Model::Naive);
        // A ramp: naive is always 0.1 behind over ten minutes.
        run(&mut forecaster, (0..40).map(|m| 0.01 * f64::from(m)));
        let accuracy = forecaster.accuracy();
        // Predictions from minute 9 on (10 points), targets up to minute 39.
        assert_eq!(accuracy.scored, 21);
        assert!(
            (accuracy.model.mean_absolute_error - 0.10).abs() < 1e-9,
            "{accuracy:?}"
        );
        assert!(
            (accuracy.model.bias - 0.10).abs() < 1e-9,
            "actual above predicted"
        );
        assert_eq!(accuracy.model, accuracy.baseline, "naive is the baseline");
    }

    #[test]
    fn auto_learns_an_hourly_pattern_that_naive_cannot_see() {
        // A 60-minute sawtooth: the value one hour before the target is exact.
        let saw = |m: u32| f64::from(m % 60) / 100.0;
        let mut auto = forecaster(Model::Auto);
        let forecast = run(&mut auto, (0..2000).map(saw)).unwrap();
        assert_eq!(forecast.model, Model::SeasonalHour, "{forecast:?}");
        let accuracy = auto.accuracy();
        assert!(
            accuracy.model.mean_absolute_error < accuracy.baseline.mean_absolute_error / 2.0,
            "{accuracy:?}"
        );
        assert!(forecast.confidence > 0.9);
    }

    /// A deterministic pseudo-random walk in 0.2..=0.8 (no pattern at any lag).
    /// (`Model::Auto` in a forecast means "too little history to predict".)
    pub(super) fn random_walk(steps: usize, seed: u64) -> Vec<f64> {
        let mut state = seed;
        let mut value: f64 = 0.5;
        (0..steps)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let step = ((state >> 33) as f64 / (1u64 << 31) as f64 - 0.5) * 0.04;
                value = (value + step).clamp(0.2, 0.8);
                value
            })
            .collect()
    }

    /// Feeds one point per five minutes; returns every forecast.
    fn run_five_minutes(forecaster: &mut Forecaster, values: &[f64]) -> Vec<Forecast> {
        values
            .iter()
            .enumerate()
            .filter_map(|(i, value)| {
                let t = T0 + i as f64 * 300.0;
                forecaster.observe(Point { t, value: *value });
                forecaster.predict(t)
            })
            .collect()
    }

    fn five_minute_forecaster() -> Forecaster {
        Forecaster::new(ForecastConfig::seed(Duration::from_secs(300), Model::Auto))
    }

    #[test]
    fn an_hourly_pattern_is_trusted_within_hours_not_after_a_day() {
        // Hourly spikes over a noisy floor, the shape of an auto-scaling group
        // that misbehaves every hour: current value misses every spike.
        let noise = random_walk(400, 7);
        let values: Vec<f64> = (0..400)
            .map(|i| {
                let floor = 0.3 + (noise[i] - 0.5) * 0.1;
                if i % 12 == 10 { floor + 0.35 } else { floor }
            })
            .collect();
        let forecasts = run_five_minutes(&mut five_minute_forecaster(), &values);
        let first_seasonal = forecasts
            .iter()
            .position(|f| matches!(f.model, Model::SeasonalHour | Model::HoltWinters))
            .expect("the hourly pattern is picked up");
        assert!(
            first_seasonal < 72,
            "trusted after {first_seasonal} checks (a day is 288)"
        );
    }

    #[test]
    fn without_evidence_the_day_long_guard_stays() {
        // A random walk: current value is the best prediction there is, and no
        // model that ignores it may be picked on a lucky first day.
        for seed in 1..=5 {
            let values = random_walk(LONG_WARM_UP as usize + 12, seed);
            let mut forecaster = five_minute_forecaster();
            for forecast in run_five_minutes(&mut forecaster, &values) {
                assert!(
                    matches!(forecast.model, Model::Naive | Model::Trend | Model::Auto),
                    "seed {seed}: {forecast:?}"
                );
            }
            assert_eq!(forecaster.hourly_pattern, Some(false), "seed {seed}");
        }
    }

    #[test]
    fn model_names_round_trip_and_unknown_ones_are_refused() {
        for model in Model::ALL {
            assert_eq!(model.name().parse::<Model>(), Ok(model));
        }
        assert!("arima".parse::<Model>().is_err());
    }

    #[test]
    fn the_normal_band_probability_is_right() {
        // P(|N(0,1)| <= 1) = 0.6827
        assert!((normal_within(0.10) - 0.6827).abs() < 1e-3);
        assert!((erf(0.5) - 0.5205).abs() < 1e-3);
        assert_eq!(normal_within(0.0), 1.0);
    }
}
