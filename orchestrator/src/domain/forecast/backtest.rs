//! `secbeat-orchestrator backtest`: replays a CPU trace through the live
//! forecaster, on the trace's own timestamps, and reports how each model would
//! have done against the baselines.
//!
//! Input: CSV `timestamp,value`, timestamps `YYYY-MM-DD HH:MM:SS` (UTC), values in
//! percent (the format of `data/nab`). Every row is one scaling check:
//! observe, score what is due, predict. The window and horizon are by time, so gaps
//! in the trace stay gaps.

use std::fmt::Write as _;

use chrono::DateTime;

use super::{BAND, ForecastConfig, Forecaster, Model, Point, accuracy::ErrorStats};

use secbeat::cputrace::{self, TIME_FORMAT};

/// A malformed trace, naming the line.
pub type InputError = cputrace::TraceError;

/// Parses the CSV (header `timestamp,value`, value in percent) into points in
/// fractions of one, in time order: the shared trace parser, plus the two rows a
/// backtest needs at least.
pub fn parse_csv(text: &str) -> Result<Vec<Point>, InputError> {
    let points: Vec<Point> = cputrace::parse(text)?
        .into_iter()
        .map(|point| Point {
            t: point.t,
            value: point.usage,
        })
        .collect();
    if points.len() < 2 {
        return Err(InputError {
            line: 0,
            message: "fewer than two data rows".into(),
        });
    }
    Ok(points)
}

/// One prediction, as `--output` writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictionRow {
    /// Target time (Unix seconds).
    pub target: f64,
    /// Predicted value (fraction).
    pub predicted: f64,
    /// Stated confidence.
    pub confidence: f64,
    /// The model that made it.
    pub model: Model,
}

/// Error figures of one part of the scored predictions, mergeable across traces.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    /// Scored predictions.
    pub count: usize,
    /// Of them, within the band.
    pub within: usize,
    /// Sum of absolute errors (fractions).
    pub abs_sum: f64,
}

impl Tally {
    fn add(&mut self, error: f64) {
        self.count += 1;
        self.abs_sum += error.abs();
        if error.abs() <= BAND {
            self.within += 1;
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.count += other.count;
        self.within += other.within;
        self.abs_sum += other.abs_sum;
    }

    /// "share within / MAE" in percent and points, or "-" when empty.
    fn cell(&self) -> String {
        if self.count == 0 {
            return "-".into();
        }
        let n = self.count as f64;
        format!(
            "{:.1}% / {:.2}",
            100.0 * self.within as f64 / n,
            100.0 * self.abs_sum / n
        )
    }
}

/// The scored predictions split the ways that matter to an operator: the first
/// day of a trace (a fresh install, before any model has a day's record) and
/// after it; targets that moved more than the band from the value the prediction
/// was made at ("fast moves": what scaling must catch) and the calm rest.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Segments {
    /// Every scored prediction.
    pub all: Tally,
    /// Targets within 24 h of the trace's first row.
    pub first_day: Tally,
    /// Targets after that.
    pub later: Tally,
    /// Targets more than 10 points away from the value at prediction time.
    pub fast: Tally,
    /// The rest.
    pub calm: Tally,
}

impl Segments {
    fn add(&mut self, start: f64, scored: &super::Scored) {
        let error = scored.actual - scored.predicted;
        self.all.add(error);
        if scored.target < start + 86_400.0 {
            self.first_day.add(error);
        } else {
            self.later.add(error);
        }
        if (scored.actual - scored.baseline).abs() > BAND {
            self.fast.add(error);
        } else {
            self.calm.add(error);
        }
    }

    /// Adds another trace's figures.
    pub fn merge(&mut self, other: &Segments) {
        for (mine, theirs) in [
            (&mut self.all, &other.all),
            (&mut self.first_day, &other.first_day),
            (&mut self.later, &other.later),
            (&mut self.fast, &other.fast),
            (&mut self.calm, &other.calm),
        ] {
            mine.merge(theirs);
        }
    }
}

/// How one model did.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelResult {
    /// The model.
    pub model: Model,
    /// Scored predictions.
    pub scored: usize,
    /// Over all scored predictions.
    pub stats: ErrorStats,
    /// The same, by segment.
    pub segments: Segments,
    /// (stated confidence, landed within the band) per scored prediction.
    pub calibration: Vec<(f64, bool)>,
    /// Every prediction made.
    pub predictions: Vec<PredictionRow>,
}

/// Replays `points` through a forecaster running `model`.
pub fn replay(points: &[Point], model: Model) -> ModelResult {
    let mut forecaster = Forecaster::new(config_for(points, model));
    let mut errors = Vec::new();
    let mut calibration = Vec::new();
    let mut predictions = Vec::new();
    let mut segments = Segments::default();
    let horizon = forecaster.config().horizon;
    let start = points.first().map_or(0.0, |p| p.t);
    for point in points {
        for scored in forecaster.observe(*point) {
            segments.add(start, &scored);
            let error = scored.actual - scored.predicted;
            errors.push(error);
            calibration.push((scored.confidence, error.abs() <= BAND));
        }
        if let Some(forecast) = forecaster.predict(point.t)
            && let Some(predicted) = forecast.predicted
        {
            predictions.push(PredictionRow {
                target: forecast.target(horizon),
                predicted,
                confidence: forecast.confidence,
                model: forecast.model,
            });
        }
    }
    ModelResult {
        model,
        scored: errors.len(),
        stats: ErrorStats::of(errors.iter().copied()),
        segments,
        calibration,
        predictions,
    }
}

/// The seed's window and horizon; the matching tolerance is half the trace's
/// median step.
fn config_for(points: &[Point], model: Model) -> ForecastConfig {
    let mut steps: Vec<f64> = points.windows(2).map(|w| w[1].t - w[0].t).collect();
    steps.sort_by(f64::total_cmp);
    let median = steps[steps.len() / 2];
    ForecastConfig::seed(std::time::Duration::from_secs_f64(median), model)
}

/// The models a report compares: `model`, then the baselines (current value,
/// window mean, the card's linear regression) and the classic seasonal method
/// (Holt-Winters).
pub fn compared(model: Model) -> Vec<Model> {
    let mut models = vec![model];
    for baseline in [Model::Naive, Model::Mean, Model::Linear, Model::HoltWinters] {
        if !models.contains(&baseline) {
            models.push(baseline);
        }
    }
    models
}

fn label(model: Model) -> String {
    match model {
        Model::Naive => "naive (current value)".into(),
        Model::Mean => "mean (window mean)".into(),
        Model::Linear => "linear (design card)".into(),
        other => other.name().into(),
    }
}

/// The table: one row per model, percentage points.
pub fn report(name: &str, points: &[Point], results: &[ModelResult]) -> String {
    let mut out = String::new();
    let first = format_time(points[0].t);
    let last = format_time(points[points.len() - 1].t);
    let _ = writeln!(
        out,
        "{name}: {} points, {first} .. {last}; 60-minute window, 10-minute horizon",
        points.len()
    );
    let _ = writeln!(
        out,
        "{:<24} {:>7} {:>12} {:>9} {:>10}",
        "model", "scored", "within+-10", "MAE pts", "bias pts"
    );
    for result in results {
        let _ = writeln!(
            out,
            "{:<24} {:>7} {:>11.1}% {:>9.2} {:>+10.2}",
            label(result.model),
            result.scored,
            100.0 * result.stats.within_ratio,
            100.0 * result.stats.mean_absolute_error,
            100.0 * result.stats.bias
        );
    }
    out
}

/// The segments table: one row per model, "share within +-10 / MAE in points"
/// per segment.
pub fn segments_table(results: &[(Model, Segments)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:>16} {:>16} {:>16} {:>23} {:>16}",
        "model", "all", "first day", "after day one", "fast moves (count)", "calm"
    );
    for (model, segments) in results {
        let _ = writeln!(
            out,
            "{:<24} {:>16} {:>16} {:>16} {:>23} {:>16}",
            label(*model),
            segments.all.cell(),
            segments.first_day.cell(),
            segments.later.cell(),
            format!("{} ({})", segments.fast.cell(), segments.fast.count),
            segments.calm.cell()
        );
    }
    out
}

/// One band of stated confidence: how many predictions were stated in it, their
/// mean stated confidence, and the share that landed within the band.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CalibrationBand {
    /// Lower edge (inclusive).
    pub low: f64,
    /// Upper edge (exclusive).
    pub high: f64,
    /// Predictions stated in the band.
    pub count: usize,
    /// Their mean stated confidence.
    pub stated: f64,
    /// The share of them that landed within +-10 points.
    pub landed: f64,
}

/// The calibration bands that hold any prediction.
pub fn calibration_bands(samples: &[(f64, bool)]) -> Vec<CalibrationBand> {
    const EDGES: [(f64, f64); 7] = [
        (0.0, 0.5),
        (0.5, 0.6),
        (0.6, 0.7),
        (0.7, 0.8),
        (0.8, 0.9),
        (0.9, 0.95),
        (0.95, 1.01),
    ];
    EDGES
        .into_iter()
        .filter_map(|(low, high)| {
            let in_band: Vec<&(f64, bool)> = samples
                .iter()
                .filter(|(confidence, _)| *confidence >= low && *confidence < high)
                .collect();
            let count = in_band.len();
            (count > 0).then(|| CalibrationBand {
                low,
                high: high.min(1.0),
                count,
                stated: in_band.iter().map(|(c, _)| c).sum::<f64>() / count as f64,
                landed: in_band.iter().filter(|(_, hit)| *hit).count() as f64 / count as f64,
            })
        })
        .collect()
}

/// Calibration of stated confidence: per band of confidence, how many predictions,
/// their mean stated confidence and what share actually landed within +-10 points.
pub fn calibration_table(samples: &[(f64, bool)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:>8} {:>10} {:>14}",
        "confidence", "count", "stated", "within+-10"
    );
    for band in calibration_bands(samples) {
        let _ = writeln!(
            out,
            "{:<14} {:>8} {:>9.1}% {:>13.1}%",
            format!("[{:.2}, {:.2})", band.low, band.high),
            band.count,
            100.0 * band.stated,
            100.0 * band.landed
        );
    }
    out
}

/// `--output`: `target_timestamp,predicted,confidence,model`, predicted in percent.
pub fn predictions_csv(rows: &[PredictionRow]) -> String {
    let mut out = String::from("target_timestamp,predicted,confidence,model\n");
    for row in rows {
        let _ = writeln!(
            out,
            "{},{:.3},{:.3},{}",
            format_time(row.target),
            100.0 * row.predicted,
            row.confidence,
            row.model
        );
    }
    out
}

fn format_time(t: f64) -> String {
    DateTime::from_timestamp(t as i64, 0)
        .map(|time| time.format(TIME_FORMAT).to_string())
        .unwrap_or_else(|| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv(values: impl IntoIterator<Item = f64>) -> String {
        let mut text = String::from("timestamp,value\n");
        for (i, value) in values.into_iter().enumerate() {
            let t = DateTime::from_timestamp(1_400_000_000 + 300 * i as i64, 0).unwrap();
            let _ = writeln!(text, "{},{value}", t.format(TIME_FORMAT));
        }
        text
    }

    #[test]
    fn bad_rows_are_errors_naming_the_line() {
        assert_eq!(
            parse_csv("timestamp,value\n2014-01-01 00:00:00,abc\n")
                .unwrap_err()
                .line,
            2
        );
        assert_eq!(parse_csv("timestamp,value\nyesterday,5\n").unwrap_err().line, 2);
        assert_eq!(
            parse_csv("timestamp,value\n2014-01-01 00:00:00,150\n")
                .unwrap_err()
                .line,
            2
        );
        let unordered = "timestamp,value\n2014-01-01 00:05:00,1\n2014-01-01 00:00:00,1\n";
        assert_eq!(parse_csv(unordered).unwrap_err().line, 3);
        assert!(parse_csv("timestamp,value\n").is_err());
    }

    #[test]
    fn a_replay_scores_every_target_it_can_and_writes_percent() {
        let points = parse_csv(&csv((0..100).map(|i| f64::from(i % 20)))).unwrap();
        assert_eq!(points[1].value, 0.01);
        let result = replay(&points, Model::Naive);
        // 12 points fill the window from the 10th row on; the last two targets
        // lie beyond the trace.
        assert_eq!(result.predictions.len(), 91);
        assert_eq!(result.scored, 89);
        let output = predictions_csv(&result.predictions);
        let first = output.lines().nth(1).unwrap();
        assert!(first.starts_with("2014-05-13 17:48:20,9.000,"), "{first}");
        assert!(first.ends_with(",naive"), "{first}");
    }

    #[test]
    fn the_report_compares_the_model_with_the_baselines() {
        let points = parse_csv(&csv((0..1000).map(|i| f64::from(i % 12) * 5.0))).unwrap();
        let results: Vec<_> = compared(Model::Auto)
            .into_iter()
            .map(|m| replay(&points, m))
            .collect();
        let text = report("saw.csv", &points, &results);
        for name in [
            "auto",
            "naive (current value)",
            "mean (window mean)",
            "linear (design card)",
        ] {
            assert!(text.contains(name), "{text}");
        }
        // An hourly sawtooth: auto finds the seasonal model and beats the baseline.
        assert!(results[0].stats.mean_absolute_error < results[1].stats.mean_absolute_error / 2.0);
        assert!(calibration_table(&results[0].calibration).contains("confidence"));
        let segments: Vec<_> = results.iter().map(|r| (r.model, r.segments)).collect();
        let table = segments_table(&segments);
        assert!(
            table.contains("first day") && table.contains("holt_winters"),
            "{table}"
        );
        let auto = results[0].segments;
        assert_eq!(auto.all.count, results[0].scored);
        assert_eq!(auto.first_day.count + auto.later.count, auto.all.count);
        assert_eq!(auto.fast.count + auto.calm.count, auto.all.count);
        // Every target of an hourly sawtooth in 5-point steps moves by 10 points
        // in 10 minutes or less, except where it wraps.
        assert!(auto.fast.count > 0 && auto.calm.count > auto.fast.count);
    }

    /// The bar, on the real traces: the default model beats "current value"
    /// on mean absolute error on every file and pooled.
    #[test]
    fn the_default_beats_current_value_on_every_nab_trace() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/nab");
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|error| panic!("{}: {error}", dir.display()));
        let (mut auto_sum, mut naive_sum, mut n) = (0.0, 0.0, 0usize);
        let mut files = 0;
        let mut calibration = Vec::new();
        for path in entries.flatten().map(|entry| entry.path()) {
            if path.extension().is_none_or(|e| e != "csv") {
                continue;
            }
            let points = parse_csv(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let auto = replay(&points, Model::Auto);
            let naive = replay(&points, Model::Naive);
            assert_eq!(auto.scored, naive.scored, "same targets");
            assert!(
                auto.stats.mean_absolute_error < naive.stats.mean_absolute_error,
                "{}: auto {:?} vs naive {:?}",
                path.display(),
                auto.stats,
                naive.stats
            );
            calibration.extend_from_slice(&auto.calibration);
            auto_sum += auto.stats.mean_absolute_error * auto.scored as f64;
            naive_sum += naive.stats.mean_absolute_error * naive.scored as f64;
            n += auto.scored;
            files += 1;
        }
        assert!(files >= 6, "found {files} traces in {}", dir.display());
        assert!(auto_sum / (n as f64) < naive_sum / (n as f64));
        // The stated confidence means what it says: in every band that holds a
        // hundred predictions, the share that landed is within 0.10 of the mean
        // stated confidence.
        for band in calibration_bands(&calibration)
            .into_iter()
            .filter(|b| b.count >= 100)
        {
            assert!((band.landed - band.stated).abs() <= 0.10, "{band:?}");
        }
    }

    /// A restart in the middle of a trace (the persisted history replayed into a
    /// fresh forecaster, then the trace goes on) changes no prediction after it,
    /// and the replay remakes every prediction before it.
    #[test]
    fn a_restart_anywhere_changes_no_prediction_after_it() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/nab");
        let text = std::fs::read_to_string(dir.join("ec2_cpu_utilization_5f5533.csv")).unwrap();
        let points = parse_csv(&text).unwrap();
        let config = config_for(&points, Model::Auto);
        use crate::domain::forecast::history;
        let run = |forecaster: &mut Forecaster, points: &[Point]| -> Vec<(Option<f64>, f64, Model)> {
            points
                .iter()
                .map(|point| {
                    forecaster.observe(*point);
                    let forecast = forecaster.predict(point.t).unwrap();
                    (forecast.predicted, forecast.confidence, forecast.model)
                })
                .collect()
        };
        let straight = run(&mut Forecaster::new(config.clone()), &points);
        // Restarts early, mid-way (after auto has its long records) and late.
        for restart in [37, points.len() / 3, points.len() / 2 + 11, points.len() - 5] {
            let mut before = Forecaster::new(config.clone());
            run(&mut before, &points[..restart]);
            let mut after = Forecaster::new(config.clone());
            let replayed: Vec<_> = after
                .replay(points[..restart].iter().copied())
                .into_iter()
                .map(|forecast| (forecast.predicted, forecast.confidence, forecast.model))
                .collect();
            // The replay remakes the forecasts the checks made (the console's
            // chart shows them after a restart), and the records behind them.
            assert_eq!(replayed, straight[..restart], "restart at {restart}");
            assert_eq!(after.accuracy(), before.accuracy(), "restart at {restart}");
            let resumed = run(&mut after, &points[restart..]);
            assert_eq!(resumed, straight[restart..], "restart at {restart}");
        }
        // The store keeps eight days: a restart later than that replays only the
        // last eight days. The records' memory is a few hundred checks, so what
        // comes after still matches what an unbroken run predicts.
        let kept = (history::LONG_HISTORY_SECONDS / 300.0) as usize;
        let restart = points.len() - 200;
        assert!(restart > kept, "the trace is longer than what the store keeps");
        let mut after = Forecaster::new(config.clone());
        after.replay(points[restart - kept..restart].iter().copied());
        let resumed = run(&mut after, &points[restart..]);
        let same_model = resumed
            .iter()
            .zip(&straight[restart..])
            .filter(|(a, b)| a.2 == b.2)
            .count();
        let largest = resumed
            .iter()
            .zip(&straight[restart..])
            .filter_map(|(a, b)| Some((a.0? - b.0?).abs()))
            .fold(0.0, f64::max);
        assert_eq!(same_model, resumed.len(), "the same model chosen at every check");
        assert!(largest < 1e-6, "predictions differ by up to {largest}");
    }
}
