//! The store's writer: a dedicated thread that owns the [`Store`], so that the
//! fleet actor and the webhook sender hand over batches without waiting for a disk.
//!
//! Batches are applied in the order they were sent; whatever is queued when the
//! thread wakes up goes into one transaction (group commit), so a reconnect storm
//! costs a handful of fsyncs, not one per node. A webhook entry is passed on to the
//! sender only after the transaction that holds it has committed: the outbox is
//! written before the first attempt. A failing disk is retried (with backoff,
//! loudly); nothing queued is dropped while the process lives.

use std::{thread, time::Duration};

use tokio::sync::mpsc;
use tracing::{error, info};

use super::{Store, Write};
use crate::edge::webhook::OutboxEntry;

/// Sends batches to the writer thread. Cloneable; the thread ends when every
/// handle is dropped, after applying everything sent.
#[derive(Debug, Clone)]
pub struct StoreWriter {
    batches: mpsc::UnboundedSender<Vec<Write>>,
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

/// Starts the writer thread. Committed outbox entries are passed to `committed`.
pub fn spawn(
    mut store: Box<dyn Store>,
    committed: mpsc::UnboundedSender<OutboxEntry>,
) -> (StoreWriter, thread::JoinHandle<()>) {
    let (batches, mut inbox) = mpsc::unbounded_channel::<Vec<Write>>();
    let thread = thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || {
            while let Some(mut batch) = inbox.blocking_recv() {
                while let Ok(more) = inbox.try_recv() {
                    batch.extend(more);
                }
                apply_until_done(store.as_mut(), &batch, &inbox);
                for write in batch {
                    if let Write::PutOutbox(entry) = write {
                        // The sender is gone only at shutdown; the entry is durable.
                        let _ = committed.send(entry);
                    }
                }
            }
            info!("state store writer stopped: everything queued is written");
        })
        .expect("spawning a thread");
    (StoreWriter { batches }, thread)
}

/// Applies a batch, retrying a failing store with backoff. At shutdown (every
/// sender gone) it gives up after a few tries rather than hang the exit.
fn apply_until_done(store: &mut dyn Store, batch: &[Write], inbox: &mpsc::UnboundedReceiver<Vec<Write>>) {
    const SHUTDOWN_TRIES: u32 = 3;
    let mut delay = Duration::from_millis(100);
    for attempt in 1.. {
        match store.apply(batch) {
            Ok(()) => return,
            Err(error) if inbox.is_closed() && attempt >= SHUTDOWN_TRIES => {
                error!(%error, writes = batch.len(), "state store write failed at shutdown; giving up on this batch");
                return;
            }
            Err(error) => {
                error!(%error, attempt, retry_in_ms = delay.as_millis() as u64, writes = batch.len(), "state store write failed; retrying");
                thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
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
        let (committed_tx, mut committed) = mpsc::unbounded_channel();
        let (writer, thread) = spawn(Box::new(store.clone()), committed_tx);
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
}
