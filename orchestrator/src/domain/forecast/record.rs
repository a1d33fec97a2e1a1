//! A candidate model's scored record: its recent and long-run error, its share
//! within the band, and its paired edge over current value on the same targets,
//! from which `auto` chooses and the stated confidence comes.

use super::BAND;

/// Scored predictions a model needs before its record is trusted.
const WARM_UP: u64 = 12;
/// Independent horizons a model's record must span before its evidence counts
/// (two hours of 10-minute horizons).
const EVIDENCE_HORIZONS: f64 = 12.0;
/// Standard errors that count as evidence (the t statistic of the paired edge
/// here, the pattern test in [`super::pattern`]).
pub(super) const EVIDENCE_T: f64 = 3.0;
/// Weight of the newest scored error in a model's recent record (about 50 checks).
const SCORE_DECAY: f64 = 0.02;
/// Weight of the newest scored error in a model's long record (about 200 checks).
const SLOW_DECAY: f64 = 0.005;

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Record {
    /// Recent mean absolute error (exponentially weighted).
    pub(super) abs_error: f64,
    /// The same over a longer memory.
    pub(super) abs_slow: f64,
    /// Recent share within the band.
    within: f64,
    /// The same over a longer memory.
    within_slow: f64,
    /// Scored predictions so far.
    pub(super) count: u64,
    /// Mean of the paired edge over current value, |naive error| - |this error|
    /// (the plain mean over the first few hundred, then exponentially weighted).
    edge: f64,
    /// Mean of the squared edge, likewise.
    edge_sq: f64,
}

impl Record {
    /// Scores one prediction: its error and current value's on the same target.
    pub(super) fn add(&mut self, error: f64, naive_error: f64) {
        let edge = naive_error.abs() - error.abs();
        let within = if error.abs() <= BAND { 1.0 } else { 0.0 };
        // Each average is the plain mean until the record is as long as its
        // memory, then exponentially weighted: a first error does not weigh like a
        // hundred (a seasonal model's first lookups may reach back to the start
        // of a trace, and would otherwise hold it back for days).
        let running = 1.0 / (self.count + 1) as f64;
        self.edge += running.max(SLOW_DECAY) * (edge - self.edge);
        self.edge_sq += running.max(SLOW_DECAY) * (edge * edge - self.edge_sq);
        if self.count == 0 {
            self.abs_slow = error.abs();
            self.abs_error = error.abs();
            self.within = within;
            self.within_slow = within;
        } else {
            let (fast, slow) = (running.max(SCORE_DECAY), running.max(SLOW_DECAY));
            self.abs_slow += slow * (error.abs() - self.abs_slow);
            self.abs_error += fast * (error.abs() - self.abs_error);
            self.within += fast * (within - self.within);
            self.within_slow += slow * (within - self.within_slow);
        }
        self.count += 1;
    }

    /// Whether the record is long enough to go by.
    pub(super) fn warm(&self) -> bool {
        self.count >= WARM_UP
    }

    /// Whether the record shows, beyond chance, that this model beats current
    /// value on the same targets: the paired edge's t statistic over the
    /// independent horizons it spans (`per_horizon` scored checks make one; errors
    /// of overlapping horizons are not independent).
    pub(super) fn proven(&self, per_horizon: f64) -> bool {
        let samples = (self.count as f64).min(1.0 / SLOW_DECAY) / per_horizon.max(1.0);
        if samples < EVIDENCE_HORIZONS || self.edge <= 0.0 {
            return false;
        }
        let variance = (self.edge_sq - self.edge * self.edge).max(1e-12);
        self.edge / (variance / samples).sqrt() >= EVIDENCE_T
    }

    /// The share within the band, recent and long-run alike (a burst empties
    /// the recent share, yet the calm after it lands as often as before), shrunk
    /// towards 1/2 while the record is short.
    pub(super) fn confidence(&self) -> f64 {
        let effective = (self.count as f64).min(1.0 / SCORE_DECAY);
        let within = 0.5 * (self.within + self.within_slow);
        (within * effective + 1.0) / (effective + 2.0)
    }
}
