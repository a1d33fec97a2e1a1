//! The design card's model: ordinary least squares with linfa-linear over the
//! recent window, time in minutes relative to now, extrapolated to the horizon.
//!
//! Besides the point prediction it returns the standard error of that prediction
//! (residual standard error widened for the distance from the data's centre), from
//! which a confidence can be derived before any prediction has been scored.

use linfa::{Dataset, traits::Fit};
use linfa_linear::LinearRegression;
use ndarray::{Array1, Array2};

use super::history::Point;

/// A fitted line's prediction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearForecast {
    /// The prediction at the horizon (not yet clamped).
    pub value: f64,
    /// Standard error of that prediction.
    pub standard_error: f64,
}

/// Fits `points` against minutes relative to `now` and predicts `horizon_minutes`
/// ahead. Needs at least 3 points at distinct times.
pub fn fit(points: &[Point], now: f64, horizon_minutes: f64) -> Option<LinearForecast> {
    let n = points.len();
    if n < 3 {
        return None;
    }
    let minutes: Vec<f64> = points.iter().map(|p| (p.t - now) / 60.0).collect();
    let values: Vec<f64> = points.iter().map(|p| p.value).collect();
    let x = Array2::from_shape_vec((n, 1), minutes.clone()).ok()?;
    let y = Array1::from(values.clone());
    let model = LinearRegression::default().fit(&Dataset::new(x, y)).ok()?;
    let slope = model.params()[0];
    let intercept = model.intercept();
    let value = intercept + slope * horizon_minutes;

    let mean_x = minutes.iter().sum::<f64>() / n as f64;
    let sxx: f64 = minutes.iter().map(|m| (m - mean_x).powi(2)).sum();
    if sxx <= 0.0 || !value.is_finite() {
        return None;
    }
    let residual_ss: f64 = minutes
        .iter()
        .zip(&values)
        .map(|(m, v)| (v - (intercept + slope * m)).powi(2))
        .sum();
    let residual_se = (residual_ss / (n - 2) as f64).sqrt();
    let standard_error =
        residual_se * (1.0 + 1.0 / n as f64 + (horizon_minutes - mean_x).powi(2) / sxx).sqrt();
    Some(LinearForecast {
        value,
        standard_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(f: impl Fn(f64) -> f64) -> Vec<Point> {
        (0..20)
            .map(|i| {
                let minute = f64::from(i) - 19.0;
                Point {
                    t: 1_700_000_000.0 + minute * 60.0,
                    value: f(minute),
                }
            })
            .collect()
    }

    #[test]
    fn a_line_is_predicted_exactly_with_no_error() {
        let now = 1_700_000_000.0;
        let forecast = fit(&points(|m| 0.5 + 0.01 * m), now, 10.0).unwrap();
        assert!((forecast.value - 0.6).abs() < 1e-9, "{forecast:?}");
        assert!(forecast.standard_error < 1e-9);
    }

    #[test]
    fn flat_data_gives_the_flat_value() {
        let forecast = fit(&points(|_| 0.42), 1_700_000_000.0, 10.0).unwrap();
        assert!((forecast.value - 0.42).abs() < 1e-9);
    }

    #[test]
    fn noise_widens_the_standard_error() {
        let noisy = points(|m| 0.5 + if (m as i64) % 2 == 0 { 0.05 } else { -0.05 });
        let forecast = fit(&noisy, 1_700_000_000.0, 10.0).unwrap();
        assert!(forecast.standard_error > 0.05, "{forecast:?}");
        assert!(fit(&noisy[..2], 1_700_000_000.0, 10.0).is_none());
    }
}
