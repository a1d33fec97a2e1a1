//! Capped, jittered exponential backoff (after linkerd's
//! `exp-backoff`): the n-th delay is drawn from
//! `[d * (1 - jitter), d]` with `d = min(max, initial * 2^n)`, so a fleet that lost
//! its orchestrator at the same instant does not come back at the same instant.

use std::time::Duration;

use rand::Rng;

/// Parameters that make no sense.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidBackoff {
    /// `initial` is zero or above `max`.
    #[error("initial backoff must be above zero and at most the maximum")]
    Range,
    /// `jitter` is outside `0.0..=1.0`.
    #[error("jitter must be within 0..=1")]
    Jitter,
}

/// Backoff state for one reconnect loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    jitter: f64,
    attempt: u32,
}

impl Backoff {
    /// A validated backoff.
    pub fn new(initial: Duration, max: Duration, jitter: f64) -> Result<Self, InvalidBackoff> {
        if initial.is_zero() || initial > max {
            return Err(InvalidBackoff::Range);
        }
        if !(0.0..=1.0).contains(&jitter) {
            return Err(InvalidBackoff::Jitter);
        }
        Ok(Self {
            initial,
            max,
            jitter,
            attempt: 0,
        })
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let factor = 2f64.powi(self.attempt.min(32) as i32);
        let ceiling = self.initial.mul_f64(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(1.0 - self.jitter * rng.random::<f64>())
    }

    /// Starts over after a connection that worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_within_the_jitter_band() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 0.5).unwrap();
        let ceilings = [100, 200, 400, 800, 1000, 1000];
        for ceiling in ceilings {
            let delay = backoff.next_delay(&mut rng).as_millis() as u64;
            assert!(
                (ceiling / 2..=ceiling).contains(&delay),
                "{delay}ms outside [{}, {ceiling}]",
                ceiling / 2
            );
        }
        backoff.reset();
        assert!(backoff.next_delay(&mut rng) <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_a_fleet() {
        let mut rng = StdRng::seed_from_u64(1);
        let delays: Vec<_> = (0..100)
            .map(|_| {
                Backoff::new(Duration::from_secs(1), Duration::from_secs(1), 1.0)
                    .unwrap()
                    .next_delay(&mut rng)
            })
            .collect();
        let (min, max) = (delays.iter().min().unwrap(), delays.iter().max().unwrap());
        assert!(
            *max - *min > Duration::from_millis(500),
            "{min:?}..{max:?} is not spread"
        );
    }

    #[test]
    fn nonsense_parameters_are_rejected() {
        let s = Duration::from_secs(1);
        assert_eq!(
            Backoff::new(Duration::ZERO, s, 0.5).unwrap_err(),
            InvalidBackoff::Range
        );
        assert_eq!(Backoff::new(s * 2, s, 0.5).unwrap_err(), InvalidBackoff::Range);
        assert_eq!(Backoff::new(s, s, 1.5).unwrap_err(), InvalidBackoff::Jitter);
    }
}
