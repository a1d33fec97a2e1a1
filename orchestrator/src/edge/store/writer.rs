//! The store's writer: a dedicated thread that owns the [`Store`], so that the
//! fleet actor, the scaling loop and the webhook sender hand over batches without
//! waiting for a disk.
//!
//! Batches are applied in the order they were sent; whatever is queued when the
//! thread wakes up goes into one transaction (group commit), so a reconnect storm
//! costs a handful of fsyncs, not one per node. A webhook entry is passed on to the
//! sender only after the transaction that holds it has committed: the outbox is
//! written before the first attempt.
//!
//! A failing store (a full disk, an I/O error) degrades and recovers instead of
//! stopping: the writer reopens it and retries with backoff, loudly; what is queued
//! meanwhile is kept and merged (the latest state of each node, the last history
//! points; every outbox entry, heal record and delivery), so memory stays bounded by
//! the fleet's size, not by how long the disk is full. [`StoreHealth`] tells
//! readiness and metrics that the store is failing while it is. Nothing queued is
//! dropped while the process lives.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc::{self, RecvTimeoutError},
    },
    thread,
    time::Duration,
};

use tokio::sync::mpsc as tokio_mpsc;
use tracing::{error, info, warn};

use super::{Store, Write};
use crate::edge::webhook::OutboxEntry;

/// History points kept while the store is failing (12 hours at one a minute).
const MAX_PENDING_HISTORY: usize = 720;
/// First retry delay of a failing store; doubles up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Longest retry delay of a failing store.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Sends batches to the writer thread. Cloneable; the thread ends when every
/// handle is dropped, after applying everything sent.
#[derive(Debug, Clone)]
pub struct StoreWriter {
    batches: mpsc::Sender<Vec<Write>>,
}

impl StoreWriter {
    /// Queues a batch; it is applied atomically, after every batch sent before it.
    pub fn write(&self, batch: Vec<Write>) {
        if batch.is_empty() {
            return;
        }
        if self.batches.send(batch).is_err() {
            error!("state store writer has stopped; a write was not persisted");
        }
    }
}

/// Whether the store is writing, as readiness and metrics see it.
#[derive(Debug, Clone, Default)]
pub struct StoreHealth(Arc<HealthState>);

#[derive(Debug, Default)]
struct HealthState {
    failure: Mutex<Option<String>>,
    pending_writes: AtomicUsize,
    pending_outbox: AtomicUsize,
    write_errors: AtomicU64,
}

impl StoreHealth {
    /// The error of the last failed write while writes are failing; None once one
    /// succeeds.
    pub fn failure(&self) -> Option<String> {
        self.0.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Writes waiting for the store to accept them.
    pub fn pending_writes(&self) -> usize {
        self.0.pending_writes.load(Ordering::Relaxed)
    }

    /// Webhooks decided but not yet durable (they join the outbox once written).
    pub fn pending_outbox(&self) -> usize {
        self.0.pending_outbox.load(Ordering::Relaxed)
    }

    /// Failed store writes since start.
    pub fn write_errors(&self) -> u64 {
        self.0.write_errors.load(Ordering::Relaxed)
    }

    fn failed(&self, error: &str, pending: &[Write]) {
        *self.0.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_owned());
        self.0.write_errors.fetch_add(1, Ordering::Relaxed);
        self.pending(pending);
    }

    fn pending(&self, pending: &[Write]) {
        self.0.pending_writes.store(pending.len(), Ordering::Relaxed);
        let outbox = pending
            .iter()
            .filter(|write| matches!(write, Write::PutOutbox(_)))
            .count();
        self.0.pending_outbox.store(outbox, Ordering::Relaxed);
    }

    fn written(&self) {
        *self.0.failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.pending(&[]);
    }
}

/// Starts the writer thread. Committed outbox entries are passed to `committed`.
pub fn spawn(
    store: Box<dyn Store>,
    committed: tokio_mpsc::UnboundedSender<OutboxEntry>,
) -> (StoreWriter, StoreHealth, thread::JoinHandle<()>) {
    let (batches, inbox) = mpsc::channel::<Vec<Write>>();
    let health = StoreHealth::default();
    let writer = Writer {
        store,
        inbox,
        committed,
        health: health.clone(),
    };
    let thread = thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || writer.run())
        .expect("spawning a thread");
    (StoreWriter { batches }, health, thread)
}

struct Writer {
    store: Box<dyn Store>,
    inbox: mpsc::Receiver<Vec<Write>>,
    committed: tokio_mpsc::UnboundedSender<OutboxEntry>,
    health: StoreHealth,
}

impl Writer {
    fn run(mut self) {
        let mut pending: Vec<Write> = Vec::new();
        let mut delay = FIRST_RETRY_DELAY;
        let mut failing_since_shutdown = 0u32;
        let mut open = true;
        loop {
            // Wait for work: forever when all is written, `delay` while retrying.
            if pending.is_empty() {
                match self.inbox.recv() {
                    Ok(batch) => pending.extend(batch),
                    Err(_) => break,
                }
            } else if open {
                match self.inbox.recv_timeout(delay) {
                    Ok(batch) => pending.extend(batch),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => open = false,
                }
            }
            while let Ok(more) = self.inbox.try_recv() {
                pending.extend(more);
            }
            match self.store.apply(&pending) {
                Ok(()) => {
                    if self.health.failure().is_some() {
                        info!(
                            writes = pending.len(),
                            "state store writes again; everything queued is written"
                        );
                    }
                    self.health.written();
                    delay = FIRST_RETRY_DELAY;
                    for write in pending.drain(..) {
                        if let Write::PutOutbox(entry) = write {
                            // The sender is gone only at shutdown; the entry is durable.
                            let _ = self.committed.send(entry);
                        }
                    }
                    if !open {
                        break;
                    }
                }
                Err(failure) => {
                    if let Some(fenced) = self.store.fenced() {
                        // This process no longer leads: nothing it decided may be
                        // written any more. The new leader judges from what is stored.
                        warn!(
                            reason = %fenced, dropped_writes = pending.len(),
                            "state store refused a write from a term that has ended (fenced); the writer stops"
                        );
                        break;
                    }
                    let before = pending.len();
                    coalesce(&mut pending);
                    self.health.failed(&failure.0, &pending);
                    error!(
                        error = %failure, queued_writes = pending.len(), merged = before - pending.len(),
                        pending_webhooks = self.health.pending_outbox(), retry_in_ms = delay.as_millis() as u64,
                        "state store write failed; keeping the writes and retrying (readiness reports the store failing)"
                    );
                    if let Err(reopen) = self.store.recover() {
                        warn!(error = %reopen, "state store could not be reopened yet");
                    }
                    if !open {
                        failing_since_shutdown += 1;
                        if failing_since_shutdown >= 3 {
                            error!(
                                lost_writes = pending.len(),
                                lost_webhooks = self.health.pending_outbox(),
                                "state store still failing at shutdown; these writes are lost"
                            );
                            break;
                        }
                        thread::sleep(delay);
                    }
                    delay = (delay * 2).min(MAX_RETRY_DELAY);
                }
            }
        }
        info!("state store writer stopped");
    }
}

/// Merges queued writes while the store is failing, so memory stays bounded: only
/// the latest write of each node and event epoch, the last history points and the
/// last prune of each kind are kept; outbox entries, deliveries and heal records
/// are all kept (the healer's budget and the scaler's cooldowns bound them). Writes
/// to different keys commute, and a later write to a key supersedes an earlier one,
/// so the merged batch leaves the store as the whole queue would.
fn coalesce(pending: &mut Vec<Write>) {
    let mut nodes = HashSet::new();
    let (mut epoch, mut prune_heals, mut prune_history) = (false, false, false);
    let mut automation = false;
    let mut history = 0usize;
    let mut kept: Vec<Write> = Vec::with_capacity(pending.len());
    for write in pending.drain(..).rev() {
        let keep = match &write {
            Write::PutNode(node) => nodes.insert(node.id),
            Write::DeleteNode(id) => nodes.insert(*id),
            Write::PutEventEpoch(_) => !std::mem::replace(&mut epoch, true),
            Write::PutAutomation(_) => !std::mem::replace(&mut automation, true),
            Write::PruneHeals { .. } => !std::mem::replace(&mut prune_heals, true),
            Write::PruneHistory { .. } => !std::mem::replace(&mut prune_history, true),
            Write::PutHistory(_) => {
                history += 1;
                history <= MAX_PENDING_HISTORY
            }
            Write::PutHeal(_) | Write::PutOutbox(_) | Write::DeleteOutbox(_) | Write::DeadLetter(_) => true,
        };
        if keep {
            kept.push(write);
        }
    }
    kept.reverse();
    *pending = kept;
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::SystemTime,
    };

    use super::*;
    use crate::edge::store::{StoreError, StoredState};

    /// A store that records applied batches and fails the first `failures` applies.
    #[derive(Clone, Default)]
    struct Recording {
        applied: Arc<Mutex<Vec<Vec<Write>>>>,
        failures: Arc<Mutex<u32>>,
    }

    impl Store for Recording {
        fn load(&self) -> Result<StoredState, StoreError> {
            Ok(StoredState::default())
        }
        fn apply(&mut self, writes: &[Write]) -> Result<(), StoreError> {
            let mut failures = self.failures.lock().unwrap();
            if *failures > 0 {
                *failures -= 1;
                return Err(StoreError("disk full".into()));
            }
            self.applied.lock().unwrap().push(writes.to_vec());
            Ok(())
        }
    }

    fn entry(id: &str) -> OutboxEntry {
        OutboxEntry {
            id: id.into(),
            reason: "UNEXPECTED_NODE_FAILURE".into(),
            created_at: SystemTime::UNIX_EPOCH,
            traceparent: String::new(),
            body: b"{}".to_vec(),
        }
    }

    #[test]
    fn entries_are_passed_on_only_after_commit_and_everything_is_written_by_exit() {
        let store = Recording::default();
        *store.failures.lock().unwrap() = 2;
        let (committed_tx, mut committed) = tokio_mpsc::unbounded_channel();
        let (writer, _health, thread) = spawn(Box::new(store.clone()), committed_tx);
        writer.write(vec![Write::PutOutbox(entry("msg_1"))]);
        writer.write(vec![Write::DeleteOutbox("msg_0".into())]);
        drop(writer);
        thread.join().unwrap();
        let applied: Vec<Write> = store.applied.lock().unwrap().concat();
        assert_eq!(
            applied,
            vec![
                Write::PutOutbox(entry("msg_1")),
                Write::DeleteOutbox("msg_0".into())
            ]
        );
        assert_eq!(committed.try_recv().unwrap(), entry("msg_1"));
        assert!(committed.try_recv().is_err());
    }

    fn node(n: u8, state: crate::domain::node::NodeState) -> crate::domain::node::PersistedNode {
        crate::domain::node::PersistedNode {
            id: crate::domain::node::NodeId(uuid::Uuid::from_bytes([n; 16])),
            hostname: format!("edge-{n}"),
            ip: std::net::IpAddr::from([10, 0, 0, n]),
            agent_version: "1".into(),
            labels: Default::default(),
            state,
            state_reason: String::new(),
            termination: None,
            drain: None,
            maintenance: None,
            boot_id: None,
        }
    }

    #[test]
    fn a_failing_store_is_reported_and_recovers_with_nothing_lost() {
        use crate::domain::node::NodeState;
        let store = Recording::default();
        *store.failures.lock().unwrap() = u32::MAX;
        let (committed_tx, mut committed) = tokio_mpsc::unbounded_channel();
        let (writer, health, thread) = spawn(Box::new(store.clone()), committed_tx);
        writer.write(vec![Write::PutNode(node(1, NodeState::Connected))]);
        // The disk is full: the writer says so, and keeps what it was given.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while health.failure().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the failure was never reported"
            );
            thread::yield_now();
        }
        assert!(health.failure().unwrap().contains("disk full"));
        for n in 0..1000 {
            let state = if n % 2 == 0 {
                NodeState::Suspect
            } else {
                NodeState::Connected
            };
            writer.write(vec![Write::PutNode(node(1, state))]);
        }
        writer.write(vec![
            Write::PutNode(node(1, NodeState::Failed)),
            Write::PutOutbox(entry("msg_1")),
        ]);
        while health.pending_outbox() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the webhook never counted as pending"
            );
            thread::yield_now();
        }
        // 1,002 writes about one node and one webhook merge into two.
        assert!(health.pending_writes() <= 2, "{}", health.pending_writes());
        assert!(
            committed.try_recv().is_err(),
            "nothing is handed on before it is durable"
        );

        // Space is back.
        *store.failures.lock().unwrap() = 0;
        while health.failure().is_some() {
            assert!(
                std::time::Instant::now() < deadline + Duration::from_secs(10),
                "never recovered"
            );
            thread::yield_now();
        }
        drop(writer);
        thread.join().unwrap();
        let applied: Vec<Write> = store.applied.lock().unwrap().concat();
        assert_eq!(
            applied,
            vec![
                Write::PutNode(node(1, NodeState::Failed)),
                Write::PutOutbox(entry("msg_1"))
            ],
            "the latest state of the node and the webhook, once"
        );
        assert_eq!(committed.try_recv().unwrap(), entry("msg_1"));
        assert_eq!((health.pending_writes(), health.pending_outbox()), (0, 0));
        assert!(health.write_errors() >= 1);
    }

    #[test]
    fn merging_keeps_the_last_write_per_node_and_every_webhook() {
        use crate::domain::node::NodeState;
        let mut pending = vec![
            Write::PutNode(node(1, NodeState::Connected)),
            Write::PutOutbox(entry("msg_1")),
            Write::PutNode(node(2, NodeState::Connected)),
            Write::DeleteNode(node(1, NodeState::Left).id),
            Write::PruneHeals {
                before: SystemTime::UNIX_EPOCH,
            },
            Write::DeleteOutbox("msg_0".into()),
            Write::PutNode(node(2, NodeState::Failed)),
            Write::PruneHeals {
                before: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
            },
        ];
        coalesce(&mut pending);
        assert_eq!(
            pending,
            vec![
                Write::PutOutbox(entry("msg_1")),
                Write::DeleteNode(node(1, NodeState::Left).id),
                Write::DeleteOutbox("msg_0".into()),
                Write::PutNode(node(2, NodeState::Failed)),
                Write::PruneHeals {
                    before: SystemTime::UNIX_EPOCH + Duration::from_secs(1)
                },
            ]
        );
    }
}
