//! Accuracy of scored predictions over a recent window, for the model in use and
//! for the "current value" baseline side by side, so operators see whether the
//! forecaster beats doing nothing.

use std::collections::VecDeque;

use super::BAND;

/// Scored predictions the figures cover (a day of one-minute checks).
pub const WINDOW: usize = 1440;

/// Share within the band, mean absolute error and bias of a set of errors.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ErrorStats {
    /// Share of errors within +-0.10.
    pub within_ratio: f64,
    /// Mean absolute error (fraction of one).
    pub mean_absolute_error: f64,
    /// Mean error, actual minus predicted (positive: the model predicts too low).
    pub bias: f64,
}

impl ErrorStats {
    /// The figures of `errors` (all zero when empty).
    pub fn of(errors: impl ExactSizeIterator<Item = f64> + Clone) -> Self {
        let n = errors.len();
        if n == 0 {
            return Self::default();
        }
        let n_f = n as f64;
        Self {
            within_ratio: errors.clone().filter(|e| e.abs() <= BAND).count() as f64 / n_f,
            mean_absolute_error: errors.clone().map(f64::abs).sum::<f64>() / n_f,
            bias: errors.sum::<f64>() / n_f,
        }
    }
}

/// The figures as reported.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AccuracySummary {
    /// Predictions scored since start.
    pub scored: u64,
    /// How many the figures cover (the most recent, at most [`WINDOW`]).
    pub window: usize,
    /// The predictions used.
    pub model: ErrorStats,
    /// "Current value" on the same targets.
    pub baseline: ErrorStats,
}

/// Recent errors of the model and the baseline.
#[derive(Debug, Clone, Default)]
pub struct Accuracy {
    errors: VecDeque<(f64, f64)>,
    scored: u64,
}

impl Accuracy {
    /// Records one scored prediction: the model's and the baseline's error.
    pub fn add(&mut self, model_error: f64, baseline_error: f64) {
        if self.errors.len() == WINDOW {
            self.errors.pop_front();
        }
        self.errors.push_back((model_error, baseline_error));
        self.scored += 1;
    }

    /// The figures.
    pub fn summary(&self) -> AccuracySummary {
        AccuracySummary {
            scored: self.scored,
            window: self.errors.len(),
            model: ErrorStats::of(self.errors.iter().map(|(model, _)| *model)),
            baseline: ErrorStats::of(self.errors.iter().map(|(_, baseline)| *baseline)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_cover_the_most_recent_window() {
        let mut accuracy = Accuracy::default();
        for _ in 0..WINDOW {
            accuracy.add(0.5, 0.5);
        }
        for _ in 0..WINDOW {
            accuracy.add(-0.05, 0.2);
        }
        let summary = accuracy.summary();
        assert_eq!(summary.scored, 2 * WINDOW as u64);
        assert_eq!(summary.window, WINDOW);
        assert_eq!(summary.model.within_ratio, 1.0);
        assert!((summary.model.bias + 0.05).abs() < 1e-12);
        assert_eq!(summary.baseline.within_ratio, 0.0);
        assert!((summary.baseline.mean_absolute_error - 0.2).abs() < 1e-12);
    }
}
