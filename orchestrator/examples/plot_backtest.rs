//! Draws predicted against actual fleet CPU for one trace, as the backtest replays
//! it: `cargo run -p secbeat-orchestrator --example plot_backtest -- TRACE.csv OUT.png [FROM_DAY DAYS]`.
//!
//! The PNG has no text (no font stack is needed): x is time over DAYS days (default
//! 2) from day FROM_DAY of the trace (default 2, after `auto`'s day of record
//! keeping), y is CPU from 0 % (bottom) to 100 % (top); the
//! actual value is blue, the `auto` prediction for the same time is red, and the
//! design card's linear regression is grey.

use std::error::Error;

use plotters::prelude::*;
use secbeat_orchestrator::domain::forecast::{Model, backtest};

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(input), Some(output)) = (args.get(1), args.get(2)) else {
        return Err("usage: plot_backtest TRACE.csv OUT.png [FROM_DAY DAYS]".into());
    };
    let from: f64 = args.get(3).map_or(Ok(2.0), |d| d.parse())?;
    let days: f64 = args.get(4).map_or(Ok(2.0), |d| d.parse())?;
    let points = backtest::parse_csv(&std::fs::read_to_string(input)?)?;
    let start = points[0].t + from * 86_400.0;
    let end = start + days * 86_400.0;
    let series = |model: Model| -> Vec<(f64, f64)> {
        backtest::replay(&points, model)
            .predictions
            .iter()
            .filter(|row| row.target >= start && row.target <= end)
            .map(|row| ((row.target - start) / 3600.0, 100.0 * row.predicted))
            .collect()
    };
    let actual: Vec<(f64, f64)> = points
        .iter()
        .filter(|p| p.t >= start && p.t <= end)
        .map(|p| ((p.t - start) / 3600.0, 100.0 * p.value))
        .collect();
    eprintln!("{} actual points from day {from} for {days} days", actual.len());

    let root = BitMapBackend::new(output, (1600, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .margin(10)
        .build_cartesian_2d(0.0..days * 24.0, 0.0..100.0)?;
    chart.draw_series(LineSeries::new(series(Model::Linear), RGBColor(170, 170, 170)))?;
    chart.draw_series(LineSeries::new(actual, BLUE))?;
    chart.draw_series(LineSeries::new(series(Model::Auto), RED))?;
    root.present()?;
    Ok(())
}
