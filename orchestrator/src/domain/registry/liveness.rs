//! A session's liveness cell: where its stream handler leaves the latest beat.
//!
//! Heartbeats are most of what agents send (one per agent-second), and all they
//! change is "heard from at T, CPU was x". Sending each through the fleet actor's
//! channel cost a channel hop, a wake-up of the actor and a registry lookup per
//! beat. Instead the registry hands every new session a cell: the stream handler
//! stores the receipt time and the CPU value there (two atomic stores, no lock, no
//! wake-up), and the registry reads it when the node comes due in the detector's
//! schedule, or when it answers a query.
//!
//! The registry stays the one owner of every state change: the cell only holds
//! the latest observation; what it means (fresh, recovered, silent) is decided by
//! the registry on its own thread. A session replaced by a newer one keeps writing
//! to its own cell, which nobody reads any more: fencing needs no extra check.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// The bits of an `f64` that mean "no CPU value yet" (a NaN no sample can be:
/// samples are validated to lie in 0..=1 at the edge).
const NO_CPU: u64 = u64::MAX;

/// One session's latest beat, shared by its stream handler (writer) and the
/// registry (reader). Cloning shares the cell.
#[derive(Debug, Clone)]
pub struct Liveness {
    /// The instant `seen` counts from (the registry's anchor).
    epoch: Instant,
    cell: Arc<Cell>,
}

#[derive(Debug)]
struct Cell {
    /// Nanoseconds after `epoch` of the latest beat's receipt.
    seen: AtomicU64,
    /// The latest CPU fraction's bits, or `NO_CPU`.
    cpu: AtomicU64,
}

impl Liveness {
    /// A cell for a session that opened at `now` (which counts as heard from).
    pub(crate) fn new(epoch: Instant, now: Instant) -> Self {
        let liveness = Self {
            epoch,
            cell: Arc::new(Cell {
                seen: AtomicU64::new(0),
                cpu: AtomicU64::new(NO_CPU),
            }),
        };
        liveness.cell.seen.store(liveness.offset(now), Ordering::Relaxed);
        liveness
    }

    /// The session was heard from at `at` (receipt, on the orchestrator's clock),
    /// with the CPU fraction of its interval when the message carried one. Beats
    /// never move the time backwards.
    pub fn beat(&self, at: Instant, cpu: Option<f64>) {
        if let Some(cpu) = cpu {
            self.cell.cpu.store(cpu.to_bits(), Ordering::Relaxed);
        }
        self.cell.seen.fetch_max(self.offset(at), Ordering::Release);
    }

    /// When the session was last heard from.
    pub fn seen(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.cell.seen.load(Ordering::Acquire))
    }

    /// The latest CPU fraction the session reported, if any.
    pub fn cpu(&self) -> Option<f64> {
        match self.cell.cpu.load(Ordering::Relaxed) {
            NO_CPU => None,
            bits => Some(f64::from_bits(bits)),
        }
    }

    fn offset(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_beat_is_read_back_with_its_cpu_and_time_never_goes_back() {
        let epoch = Instant::now();
        let cell = Liveness::new(epoch, epoch + Duration::from_secs(1));
        assert_eq!(cell.seen(), epoch + Duration::from_secs(1));
        assert_eq!(cell.cpu(), None);

        cell.beat(epoch + Duration::from_secs(3), Some(0.25));
        assert_eq!(cell.seen(), epoch + Duration::from_secs(3));
        assert_eq!(cell.cpu(), Some(0.25));

        // A beat without a sample keeps the last CPU value; an older time is ignored.
        cell.beat(epoch + Duration::from_secs(2), None);
        assert_eq!(cell.seen(), epoch + Duration::from_secs(3));
        assert_eq!(cell.cpu(), Some(0.25));

        // Clones share the cell: the writer's beat is what the reader sees.
        let writer = cell.clone();
        writer.beat(epoch + Duration::from_secs(4), Some(0.0));
        assert_eq!(cell.seen(), epoch + Duration::from_secs(4));
        assert_eq!(cell.cpu(), Some(0.0));
    }
}
