//! Durable state: what must survive a crash or restart of the orchestrator.
//!
//! - known nodes (identity, address, last state, terminating marks), so that after a
//!   restart they get a reconnect grace and those that do not return are judged once;
//! - the webhook outbox, so that no decided webhook is lost;
//! - the self-healing ledger, so that a restart does not reset the limits;
//! - the fleet CPU history, so that the forecaster does not start from nothing.
//!
//! [`Store`] is the seam between them: [`redb::RedbStore`] is the embedded one,
//! [`crate::edge::etcd::store::EtcdStore`] the shared, fenced one. [`writer`] runs the store on its own
//! thread: callers hand it batches and never wait for the disk.

#[cfg(test)]
pub(crate) mod conformance;
pub mod redb;
pub mod writer;

use std::time::SystemTime;

pub use crate::domain::node::{PersistedNode, PersistedTermination};
use crate::{
    domain::forecast::Point,
    domain::healer::HealRecord,
    domain::node::{Automation, NodeId},
    edge::webhook::OutboxEntry,
};

/// One change to durable state. A batch of them is applied atomically.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Insert or replace a node.
    PutNode(PersistedNode),
    /// Forget a node.
    DeleteNode(NodeId),
    /// Record a heal in the ledger.
    PutHeal(HealRecord),
    /// Drop ledger entries older than this.
    PruneHeals {
        /// The cut-off.
        before: SystemTime,
    },
    /// Queue a webhook.
    PutOutbox(OutboxEntry),
    /// A webhook was delivered (2xx).
    DeleteOutbox(String),
    /// A webhook outlived its maximum age: move it aside, keep it for the operator.
    DeadLetter(String),
    /// Append a fleet CPU history point.
    PutHistory(Point),
    /// Drop history points older than this (Unix seconds).
    PruneHistory {
        /// The cut-off.
        before: f64,
    },
    /// This run's event epoch (see [`crate::runtime::bus`]): one more than the last run's.
    PutEventEpoch(u64),
    /// Which automation runs (`SetAutomation`).
    PutAutomation(Automation),
}

/// Everything loaded at start-up.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoredState {
    /// Known nodes.
    pub nodes: Vec<PersistedNode>,
    /// The self-healing ledger.
    pub heals: Vec<HealRecord>,
    /// Undelivered webhooks, oldest first.
    pub outbox: Vec<OutboxEntry>,
    /// How many webhooks were given up on (kept aside).
    pub dead_letters: u64,
    /// Fleet CPU history, oldest first.
    pub history: Vec<Point>,
    /// The event epoch of the last run (0: none yet).
    pub event_epoch: u64,
    /// Which automation runs (both, unless an operator paused one).
    pub automation: Automation,
}

/// A store failure, in words (the backend's error types stay inside the backend).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("state store: {0}")]
pub struct StoreError(pub String);

/// The ledger key of a heal: `<unix nanos, 20 digits>/<node id>`, so key order is
/// time order (both backends).
pub(crate) fn heal_key(record: &HealRecord) -> String {
    format!("{}/{}", unix_nanos(record.at), record.node)
}

/// A time as 20-digit Unix nanoseconds (sorts as text).
pub(crate) fn unix_nanos(at: SystemTime) -> String {
    let nanos = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{nanos:020}")
}

/// The key of a history point: 20-digit Unix milliseconds (sorts as text).
pub(crate) fn history_key(t: f64) -> String {
    format!("{:020}", (t.max(0.0) * 1000.0) as u64)
}

/// A record as stored (JSON, readable with any tool).
pub(crate) fn encode(value: &impl serde::Serialize) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError(format!("encode: {e}")))
}

/// A stored record back; a corrupt one is an error naming it.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    table: &str,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError(format!("{table}[{key}] is corrupt: {e}")))
}

/// Durable state behind a small interface.
///
/// Fencing: a backend shared by several orchestrators (etcd) accepts writes only
/// from the current leader; once it refuses one, [`Store::fenced`] says so and the
/// writer stops for good (a new leader term gets a new store). The embedded store
/// is fenced by its file lock: only one process can open it.
pub trait Store: Send + 'static {
    /// Loads everything.
    fn load(&self) -> Result<StoredState, StoreError>;
    /// Applies a batch atomically and durably: all of it or none of it.
    fn apply(&mut self, writes: &[Write]) -> Result<(), StoreError>;
    /// After a failed apply: get ready to be tried again (reopen files, reconnect).
    fn recover(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Why writes are refused for good (this process lost the leadership), if they are.
    fn fenced(&self) -> Option<String> {
        None
    }
}

#[cfg(test)]
pub(crate) mod memory {
    //! An in-memory [`Store`] for tests of the parts that write to it.

    use std::{
        collections::BTreeMap,
        sync::{Arc, Condvar, Mutex},
        time::Duration,
    };

    use super::*;
    use crate::domain::node::PersistedNode;

    /// Shared, so a test keeps a handle while the writer thread owns a clone.
    #[derive(Debug, Clone, Default)]
    pub(crate) struct MemoryStore {
        inner: Arc<(Mutex<Inner>, Condvar)>,
    }

    #[derive(Debug, Default)]
    struct Inner {
        nodes: BTreeMap<NodeId, PersistedNode>,
        heals: Vec<HealRecord>,
        outbox: Vec<OutboxEntry>,
        dead_letters: u64,
        history: Vec<Point>,
        event_epoch: u64,
        automation: Automation,
        /// Outbox ids deleted (delivered), in order.
        deleted: Vec<String>,
        /// Every node write, in order.
        node_writes: Vec<NodeId>,
    }

    impl MemoryStore {
        /// Every node written so far, in order (one entry per write).
        pub(crate) fn node_writes(&self) -> Vec<NodeId> {
            self.inner.0.lock().unwrap().node_writes.clone()
        }

        /// Waits (real time, 10 s at most) until the outbox entry `id` was deleted.
        pub(crate) fn wait_for_deleted(&self, id: &str) {
            let (lock, changed) = &*self.inner;
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let mut inner = lock.lock().unwrap();
            while !inner.deleted.iter().any(|deleted| deleted == id) {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                assert!(!left.is_zero(), "outbox entry {id} was never deleted");
                inner = changed.wait_timeout(inner, left).unwrap().0;
            }
        }

        /// Waits (in real time, the writer is a thread) until the stored state
        /// satisfies `done`, and returns it; panics after 10 s with what is there.
        pub(crate) fn wait_for(&self, done: impl Fn(&StoredState) -> bool) -> StoredState {
            let (lock, changed) = &*self.inner;
            let mut inner = lock.lock().unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let state = inner.state();
                if done(&state) {
                    return state;
                }
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                assert!(
                    !left.is_zero(),
                    "the store never reached the expected state: {state:#?}"
                );
                inner = changed.wait_timeout(inner, left).unwrap().0;
            }
        }
    }

    impl Inner {
        fn state(&self) -> StoredState {
            StoredState {
                nodes: self.nodes.values().cloned().collect(),
                heals: self.heals.clone(),
                outbox: self.outbox.clone(),
                dead_letters: self.dead_letters,
                history: self.history.clone(),
                event_epoch: self.event_epoch,
                automation: self.automation,
            }
        }
    }

    impl Store for MemoryStore {
        fn load(&self) -> Result<StoredState, StoreError> {
            Ok(self.inner.0.lock().unwrap().state())
        }

        fn apply(&mut self, writes: &[Write]) -> Result<(), StoreError> {
            let (lock, changed) = &*self.inner;
            let mut inner = lock.lock().unwrap();
            changed.notify_all();
            for write in writes.iter().cloned() {
                match write {
                    Write::PutNode(node) => {
                        inner.node_writes.push(node.id);
                        inner.nodes.insert(node.id, node);
                    }
                    Write::DeleteNode(id) => {
                        inner.nodes.remove(&id);
                    }
                    Write::PutHeal(record) => inner.heals.push(record),
                    Write::PruneHeals { before } => inner.heals.retain(|record| record.at >= before),
                    Write::PutOutbox(entry) => inner.outbox.push(entry),
                    Write::DeleteOutbox(id) => {
                        inner.outbox.retain(|entry| entry.id != id);
                        inner.deleted.push(id);
                    }
                    Write::DeadLetter(id) => {
                        inner.outbox.retain(|entry| entry.id != id);
                        inner.dead_letters += 1;
                    }
                    Write::PutHistory(point) => inner.history.push(point),
                    Write::PruneHistory { before } => inner.history.retain(|point| point.t >= before),
                    Write::PutEventEpoch(epoch) => inner.event_epoch = epoch,
                    Write::PutAutomation(automation) => inner.automation = automation,
                }
            }
            Ok(())
        }
    }
}
