//! A Prometheus histogram whose observations take no lock.
//!
//! `prometheus_client`'s `Histogram` keeps its buckets behind one mutex, taken
//! on every observation. Each agent's heartbeat is observed twice (lateness and
//! handling), so at 50,000 agents two runtime threads took those two locks
//! 100,000 times a second between them. Here an observation is one atomic add to
//! its bucket and one to the sum; a scrape reads the buckets one by one (it may
//! see an observation in a bucket and not yet in the sum, as Prometheus allows
//! for a scrape racing an observation). It encodes exactly as the library's
//! histogram does with the same bounds.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric},
};

/// A histogram with fixed upper bounds (and `+Inf`), cheap to clone and share.
#[derive(Debug, Clone)]
pub struct AtomicHistogram(Arc<Buckets>);

#[derive(Debug)]
struct Buckets {
    /// Upper bounds, ascending; the last is infinite (`+Inf`).
    bounds: Box<[f64]>,
    /// Observations per bucket (not cumulative).
    counts: Box<[AtomicU64]>,
    /// The sum of observations, as `f64` bits.
    sum: AtomicU64,
}

impl AtomicHistogram {
    /// A histogram with `bounds` (ascending) and `+Inf`.
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let bounds: Box<[f64]> = bounds.into_iter().chain(std::iter::once(f64::INFINITY)).collect();
        let counts = bounds.iter().map(|_| AtomicU64::new(0)).collect();
        Self(Arc::new(Buckets {
            bounds,
            counts,
            sum: AtomicU64::new(0f64.to_bits()),
        }))
    }

    /// Counts `value` in the first bucket whose bound is at least it (NaN in
    /// `+Inf`, as the library does).
    pub fn observe(&self, value: f64) {
        let buckets = &self.0;
        let last = buckets.bounds.len() - 1;
        let index = if value.is_nan() {
            last
        } else {
            buckets.bounds.partition_point(|bound| *bound < value).min(last)
        };
        buckets.counts[index].fetch_add(1, Ordering::Relaxed);
        // Never fails: the closure always returns Some.
        let _ = buckets
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }

    /// The sum, the count and each bucket's bound and count, as encoded.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets = &self.0;
        let counts: Vec<(f64, u64)> = buckets
            .bounds
            .iter()
            .zip(buckets.counts.iter())
            .map(|(bound, count)| (*bound, count.load(Ordering::Relaxed)))
            .collect();
        let count = counts.iter().map(|(_, count)| count).sum();
        (f64::from_bits(buckets.sum.load(Ordering::Relaxed)), count, counts)
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{encoding::text::encode, metrics::histogram::Histogram, registry::Registry};

    use super::*;

    fn text(metric: impl EncodeMetric + std::fmt::Debug + Send + Sync + 'static) -> String {
        let mut registry = Registry::default();
        registry.register("x_seconds", "help", metric);
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn it_encodes_as_the_librarys_histogram_does() {
        let bounds = [0.001, 0.01, 0.1, 1.0];
        let ours = AtomicHistogram::new(bounds);
        let theirs = Histogram::new(bounds);
        // On a bound, between bounds, below the first, above the last, NaN.
        for value in [
            0.001,
            0.0005,
            0.05,
            0.1,
            0.7,
            1.0,
            3.0,
            f64::NAN,
            0.0,
            f64::INFINITY,
        ] {
            ours.observe(value);
            theirs.observe(value);
        }
        let expected = text(theirs);
        assert!(
            expected.contains("x_seconds_bucket{le=\"+Inf\"} 10"),
            "{expected}"
        );
        assert_eq!(text(ours), expected);
    }

    #[test]
    fn observations_racing_on_two_threads_are_all_counted() {
        let histogram = AtomicHistogram::new([1.0, 2.0]);
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let histogram = histogram.clone();
                std::thread::spawn(move || {
                    for i in 0..50_000 {
                        histogram.observe(f64::from(i % 3));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let (sum, count, buckets) = histogram.snapshot();
        assert_eq!(count, 100_000);
        // Values 0, 1, 2 in turn: sums of small integers are exact in f64.
        let expected: f64 = (0..50_000).map(|i| f64::from(i % 3)).sum::<f64>() * 2.0;
        assert_eq!(sum, expected);
        // Per thread: 16,667 zeros, 16,667 ones, 16,666 twos.
        assert_eq!(buckets[0].1, 2 * (16_667 + 16_667), "0s and 1s");
        assert_eq!(buckets[1].1, 2 * 16_666, "2s");
        assert_eq!(buckets[2].1, 0, "+Inf");
    }
}
