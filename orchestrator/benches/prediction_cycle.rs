//! The prediction cycle's cost: one scaling check's `observe` + `predict` with a
//! full 60-minute window at one check a minute (60 points), as the live loop runs
//! it. The seed promises under 50 ms per prediction cycle.
//!
//! `cargo bench -p secbeat-orchestrator --bench prediction_cycle`

use std::{hint::black_box, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use secbeat_orchestrator::domain::forecast::{ForecastConfig, Forecaster, Model, Point};

const T0: f64 = 1_700_000_000.0;

fn warmed(model: Model) -> (Forecaster, f64) {
    let mut forecaster = Forecaster::new(ForecastConfig::seed(Duration::from_secs(60), model));
    let mut t = T0;
    // Two days of one-minute checks: full window, full long history, warm records.
    for minute in 0..(2 * 24 * 60) {
        t = T0 + f64::from(minute) * 60.0;
        let value = 0.5 + 0.3 * (f64::from(minute) / 60.0 * std::f64::consts::TAU).sin();
        forecaster.observe(Point { t, value });
        forecaster.predict(t);
    }
    (forecaster, t)
}

fn cycle(c: &mut Criterion) {
    for model in [Model::Auto, Model::Linear, Model::Naive] {
        let (mut forecaster, mut t) = warmed(model);
        c.bench_function(&format!("prediction cycle ({model}, 60-point window)"), |b| {
            b.iter(|| {
                t += 60.0;
                forecaster.observe(black_box(Point { t, value: 0.5 }));
                black_box(forecaster.predict(t))
            })
        });
    }
}

criterion_group!(benches, cycle);
criterion_main!(benches);
