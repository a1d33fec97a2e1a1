//! The orchestrator's clock: monotonic, read at receipt, never the agent's.
//!
//! It follows tokio's clock, so tests that pause and advance tokio time
//! (`#[tokio::test(start_paused = true)]`) drive the actor's timers and the
//! registry's notion of "now" together, in milliseconds of real time.

use std::time::Instant;

/// Now, on the orchestrator's monotonic clock.
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
