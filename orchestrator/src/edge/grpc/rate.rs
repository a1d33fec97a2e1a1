//! A token bucket per agent stream: `rate` messages a second on average, bursts
//! up to `burst`. Time is passed in.

use std::time::Instant;

/// The bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token; false when the stream is over its rate.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn bursts_pass_floods_do_not_and_the_bucket_refills() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 40.0, start);
        assert!((0..40).all(|_| bucket.take(start)), "a burst of 40");
        assert!(!bucket.take(start), "the 41st at once is over the rate");
        assert!(
            bucket.take(start + Duration::from_millis(100)),
            "one more after 0.1 s"
        );
        // Steady at the rate: always allowed.
        let mut steady = TokenBucket::new(10.0, 40.0, start);
        assert!((1..1000).all(|i| steady.take(start + Duration::from_millis(100 * i))));
    }
}
