//! The orchestrator's own scheduling delay: how late its runtime runs a task that
//! is due.
//!
//! Heartbeats are read by one task per session. When the runtime has more ready
//! tasks than its threads can run (an overloaded machine, a reconnect storm), a
//! beat that reached the socket waits for its task's turn, and its receipt time,
//! which is what the failure detector judges, is late by that wait. A probe task
//! that asks to wake every [`PROBE_EVERY`] and notes how much later it ran waits
//! in the same queues, so its delay is what a reading waits too (the event loop
//! lag that Node.js services export, for the same reason).
//!
//! The probe's latest delay is published in a [`DelayGauge`] the fleet actor
//! reads before each dead-node check (the detector gives the nodes that much
//! more time, see `Registry::check_with_own_delay`), and in the
//! `orchestrator_scheduling_delay_seconds` histogram. A delay over
//! [`WARN_OVER`] is logged, at most once per [`WARN_EVERY`], with the worst
//! delay since the last line.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::metrics::histogram::Histogram;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How often the probe asks to run.
pub const PROBE_EVERY: Duration = Duration::from_millis(100);

/// A delay worth a warning: the orchestrator is overloaded.
const WARN_OVER: Duration = Duration::from_millis(500);

/// At most one warning per this.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The runtime's scheduling delay as the probe sees it, shared by the probe
/// (writer) and its readers. Cloning shares it. A gauge no probe writes (the
/// default) always says zero.
#[derive(Debug, Clone)]
pub struct DelayGauge {
    /// The instant the offsets below count from.
    epoch: Instant,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Nanoseconds the latest round ran late.
    latest: AtomicU64,
    /// Nanoseconds after `epoch` at which the pending round is due, or
    /// [`NOT_PENDING`].
    pending_due: AtomicU64,
}

/// No round is pending: no probe writes this gauge.
const NOT_PENDING: u64 = u64::MAX;

impl Default for DelayGauge {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl DelayGauge {
    fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            shared: Arc::new(Shared {
                latest: AtomicU64::new(0),
                pending_due: AtomicU64::new(NOT_PENDING),
            }),
        }
    }

    /// How late the runtime is running due tasks at `now`: the latest round's
    /// delay, or, if the pending round is already overdue by more, that. A
    /// runtime too busy to run the probe is too busy to read heartbeats, and
    /// the overdue round says so before it gets to run.
    pub fn current(&self, now: std::time::Instant) -> Duration {
        let latest = Duration::from_nanos(self.shared.latest.load(Ordering::Relaxed));
        match self.shared.pending_due.load(Ordering::Relaxed) {
            NOT_PENDING => latest,
            due => {
                latest.max(now.saturating_duration_since(self.epoch.into_std() + Duration::from_nanos(due)))
            }
        }
    }

    /// A gauge that always says `delay` (tests of its readers).
    #[cfg(test)]
    pub(crate) fn fixed(delay: Duration) -> Self {
        let gauge = Self::new(Instant::now());
        gauge.shared.latest.store(nanos(delay), Ordering::Relaxed);
        gauge
    }

    fn ran(&self, delay: Duration, next_due: Instant) {
        self.shared.latest.store(nanos(delay), Ordering::Relaxed);
        self.set_pending(next_due);
    }

    fn set_pending(&self, due: Instant) {
        let offset = nanos(due.saturating_duration_since(self.epoch)).min(NOT_PENDING - 1);
        self.shared.pending_due.store(offset, Ordering::Relaxed);
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Starts the probe on the current runtime; it stops at `shutdown`.
pub fn spawn(histogram: Histogram, shutdown: CancellationToken) -> DelayGauge {
    let gauge = DelayGauge::default();
    let writer = gauge.clone();
    tokio::spawn(async move {
        let mut warned_at: Option<Instant> = None;
        let mut worst_unwarned = Duration::ZERO;
        let mut due = Instant::now() + PROBE_EVERY;
        writer.set_pending(due);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(due) => {}
            }
            let now = Instant::now();
            let delay = now.saturating_duration_since(due);
            due = now + PROBE_EVERY;
            writer.ran(delay, due);
            histogram.observe(delay.as_secs_f64());
            if delay > WARN_OVER {
                worst_unwarned = worst_unwarned.max(delay);
                if warned_at.is_none_or(|at| now.saturating_duration_since(at) >= WARN_EVERY) {
                    warn!(
                        worst_delay_ms = worst_unwarned.as_millis() as u64,
                        "the orchestrator is overloaded: its runtime ran a due task {} ms late, so heartbeats are read about as late (the detector gives nodes that much more time)",
                        worst_unwarned.as_millis()
                    );
                    warned_at = Some(now);
                    worst_unwarned = Duration::ZERO;
                }
            }
        }
    });
    gauge
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gauge_says_the_latest_delay_or_how_overdue_the_pending_round_is() {
        let epoch = Instant::now();
        let gauge = DelayGauge::new(epoch);
        let at = |ms: u64| (epoch + Duration::from_millis(ms)).into_std();
        assert_eq!(gauge.current(at(10_000)), Duration::ZERO, "no probe, no delay");
        gauge.set_pending(epoch + PROBE_EVERY);
        assert_eq!(
            gauge.current(at(50)),
            Duration::ZERO,
            "the first round is not due yet"
        );
        assert_eq!(
            gauge.current(at(350)),
            Duration::from_millis(250),
            "due at 100 ms, not run by 350 ms"
        );

        // It ran at 1,350 ms (1,250 ms late); clones share what it measured.
        let writer = gauge.clone();
        writer.ran(Duration::from_millis(1_250), epoch + Duration::from_millis(1_450));
        assert_eq!(gauge.current(at(1_360)), Duration::from_millis(1_250));
        // Once the next round is overdue by more, that is the delay.
        assert_eq!(gauge.current(at(3_000)), Duration::from_millis(1_550));
        writer.ran(Duration::ZERO, epoch + Duration::from_millis(3_100));
        assert_eq!(gauge.current(at(3_010)), Duration::ZERO, "caught up");
    }

    /// On a paused clock the probe runs exactly when due: it measures no delay.
    /// A runtime blocked past the due time shows up as the delay of that round.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn the_probe_measures_how_late_a_blocked_runtime_ran_it() {
        let shutdown = CancellationToken::new();
        let gauge = spawn(Histogram::new([0.001, 0.5, 1.0, 5.0]), shutdown.clone());
        // The paused clock jumps to each timer as it comes due, so the probe
        // runs exactly on time (`advance` in steps lands between the timer
        // wheel's millisecond ticks and makes it late instead): nothing waits.
        tokio::time::sleep(PROBE_EVERY * 3 + Duration::from_millis(1)).await;
        let now = tokio::time::Instant::now().into_std();
        assert_eq!(
            gauge.current(now),
            Duration::ZERO,
            "an idle runtime runs the probe on time"
        );

        // The clock jumps 900 ms past a round's due time before the probe can
        // run, as on a runtime whose threads are all busy: overdue, or run and
        // measured late, the gauge says 800 ms or more.
        tokio::time::advance(Duration::from_millis(900)).await;
        tokio::task::yield_now().await;
        let now = tokio::time::Instant::now().into_std();
        let late = gauge.current(now);
        assert!(late >= Duration::from_millis(800), "{late:?}");
        shutdown.cancel();
    }
}
