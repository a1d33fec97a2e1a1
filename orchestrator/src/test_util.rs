//! Helpers for the crate's own tests.

use std::time::Duration;

/// Polls `done` (every 5 ms of real time) until it holds; panics after 10 s. For
/// waiting on work done by other threads or tasks, never as a fixed delay.
pub(crate) async fn until(done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
