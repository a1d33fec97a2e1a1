//! The fenced store: the fleet's durable state in etcd, written only by the leader.
//!
//! Every write is one etcd transaction that first compares the leader key's create
//! revision with this term's fencing token. A process that lost its lease (paused,
//! partitioned) can therefore not write after a new leader was elected, even if it
//! has not noticed yet: etcd refuses the transaction, [`Store::fenced`] says so, and
//! the writer stops.
//!
//! A batch becomes as few transactions as etcd's limits allow: 128 operations per
//! transaction and 1.5 MiB per request by default (a node may carry 32 labels of
//! 128 bytes, so 100 such records are more than one request holds). Whatever must stay atomic stays in one transaction: a
//! healed node's FAILED record, its ledger entry and its outbox entry, and a dead
//! letter's move. Ops on distinct keys commute, so the rest is split freely; a
//! later write to a key replaces an earlier one in the same batch (etcd refuses two
//! ops on one key in a transaction). Applying a batch twice leaves the same state,
//! so a retry after a lost answer is safe.
//!
//! Loading reads every kind of record page by page at one revision, so the new
//! leader sees one consistent snapshot however large the fleet.

use std::collections::HashMap;

use secbeat::etcdpb::etcdserverpb as pb;
use tracing::warn;

use super::{client::EtcdClient, created_at, delete, prefix_end, put};
use crate::{
    domain::forecast::Point,
    domain::healer::HealRecord,
    domain::node::Automation,
    edge::store::{
        PersistedNode, Store, StoreError, StoredState, Write, decode, encode, heal_key, history_key,
        unix_nanos,
    },
    edge::webhook::OutboxEntry,
    runtime::role::Term,
};

/// Operations per transaction (etcd's default `--max-txn-ops` is 128; the fence
/// compare and headroom stay below it).
const MAX_OPS: usize = 100;
/// Bytes of keys and values per transaction (etcd's default `--max-request-bytes`
/// is 1.5 MiB; the rest is headroom for framing).
const MAX_TXN_BYTES: usize = 1024 * 1024;
/// Keys per page when loading. The largest node record is about 17 KB, so a page
/// can reach 17 MB: the client reads responses up to
/// [`super::client::MAX_RESPONSE_BYTES`].
const PAGE: i64 = 1000;
/// Where the nodes' range is cut into slices read at once: node ids are UUIDs,
/// so these cut a fleet into sixteen about equal parts (any other key still
/// falls in one slice).
const SPLITS: &str = "123456789abcdef";

/// The fleet's state under one etcd prefix, for one leader term.
#[derive(Debug)]
pub struct EtcdStore {
    client: EtcdClient,
    prefix: String,
    token: i64,
    runtime: tokio::runtime::Handle,
    fenced: Option<String>,
    term: Term,
}

/// The leader key under `prefix`.
pub fn leader_key(prefix: &str) -> Vec<u8> {
    format!("{prefix}leader").into_bytes()
}

/// One point op in a batch, by key.
#[derive(Debug, Clone)]
enum Op {
    Put(Vec<u8>),
    Delete,
}

impl EtcdStore {
    /// The store of leader term `term` (its token fences every write). The first
    /// write etcd refuses ends the term.
    pub fn new(client: EtcdClient, prefix: String, term: Term, runtime: tokio::runtime::Handle) -> Self {
        Self {
            client,
            prefix,
            token: term.token,
            runtime,
            fenced: None,
            term,
        }
    }

    fn key(&self, kind: &str, name: &str) -> Vec<u8> {
        format!("{}{kind}/{name}", self.prefix).into_bytes()
    }

    fn fence(&self) -> pb::Compare {
        created_at(leader_key(&self.prefix), self.token)
    }

    /// Every key and value under `<prefix><kind>/` at `revision`, in key order.
    ///
    /// With `split` (the nodes, the one kind as large as the fleet) the range
    /// is read as [`SPLITS`] slices at once, each page by page. A
    /// new leader loads while the fleet is knocking at its door and its runtime
    /// is busy: what costs then is the number of round trips one after another
    /// (50 pages of 1,000 at 50,000 nodes took a second), not the bytes. etcd
    /// 3.4 also counts every key left in the range for each page, so short
    /// slices are cheaper for it too.
    async fn scan(
        &self,
        kind: &str,
        revision: i64,
        split: bool,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let start = format!("{}{kind}/", self.prefix).into_bytes();
        let end = prefix_end(&start);
        let splits = if split { SPLITS } else { "" };
        let bounds: Vec<Vec<u8>> = std::iter::once(start.clone())
            .chain(splits.chars().map(|split| {
                let mut bound = start.clone();
                bound.push(split as u8);
                bound
            }))
            .chain(std::iter::once(end))
            .collect();
        let slices = bounds
            .windows(2)
            .map(|slice| self.scan_slice(&start, slice[0].clone(), slice[1].clone(), revision));
        let slices = futures_util::future::try_join_all(slices).await?;
        Ok(slices.into_iter().flatten().collect())
    }

    /// The keys in `[from, end)` at `revision`, page by page, named relative to
    /// `start`.
    async fn scan_slice(
        &self,
        start: &[u8],
        mut from: Vec<u8>,
        end: Vec<u8>,
        revision: i64,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut found = Vec::new();
        loop {
            let response = self
                .client
                .range(pb::RangeRequest {
                    key: from.clone(),
                    range_end: end.clone(),
                    limit: PAGE,
                    revision,
                    ..Default::default()
                })
                .await
                .map_err(|error| StoreError(error.to_string()))?;
            let Some(last) = response.kvs.last() else { break };
            from = last.key.clone();
            from.push(0);
            for kv in response.kvs {
                let name = String::from_utf8_lossy(&kv.key[start.len()..]).into_owned();
                found.push((name, kv.value));
            }
            if !response.more {
                break;
            }
        }
        Ok(found)
    }

    /// Loads everything at one revision (the latest, read first).
    pub async fn load_async(&self) -> Result<StoredState, StoreError> {
        // A linearizable read of the leader key gives the revision every slice
        // is then read at, so the slices are one consistent picture.
        let revision = self
            .client
            .range(pb::RangeRequest {
                key: leader_key(&self.prefix),
                ..Default::default()
            })
            .await
            .map_err(|error| StoreError(error.to_string()))?
            .header
            .map_or(0, |header| header.revision);
        let (nodes, heals, outbox, dead, history, meta) = tokio::try_join!(
            self.scan("nodes", revision, true),
            self.scan("heals", revision, false),
            self.scan("outbox", revision, false),
            self.scan("dead", revision, false),
            self.scan("history", revision, false),
            self.scan("meta", revision, false),
        )?;
        let table = |kind: &str| format!("{}{kind}", self.prefix);
        let nodes = nodes
            .iter()
            .map(|(name, value)| decode::<PersistedNode>(&table("nodes"), name, value))
            .collect::<Result<_, _>>()?;
        let heals = heals
            .iter()
            .map(|(name, value)| decode::<HealRecord>(&table("heals"), name, value))
            .collect::<Result<_, _>>()?;
        let mut outbox: Vec<OutboxEntry> = outbox
            .iter()
            .map(|(name, value)| decode(&table("outbox"), name, value))
            .collect::<Result<_, _>>()?;
        outbox.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
        let dead_letters = dead.len() as u64;
        let history: Vec<Point> = history
            .iter()
            .map(|(name, value)| decode(&table("history"), name, value))
            .collect::<Result<_, _>>()?;
        let event_epoch = match meta.iter().find(|(name, _)| name == "event_epoch") {
            Some((name, value)) => decode(&table("meta"), name, value)?,
            None => 0,
        };
        let automation = match meta.iter().find(|(name, _)| name == "automation") {
            Some((name, value)) => decode(&table("meta"), name, value)?,
            None => Automation::default(),
        };
        Ok(StoredState {
            nodes,
            heals,
            outbox,
            dead_letters,
            history,
            event_epoch,
            automation,
        })
    }

    /// Applies a batch as fenced transactions (see the module doc).
    pub async fn apply_async(&mut self, writes: &[Write]) -> Result<(), StoreError> {
        if let Some(fenced) = &self.fenced {
            return Err(StoreError(fenced.clone()));
        }
        let plan = self.plan(writes).await?;
        for txn in plan {
            let request = pb::TxnRequest {
                compare: vec![self.fence()],
                success: txn,
                failure: Vec::new(),
            };
            let response = self
                .client
                .txn(request)
                .await
                .map_err(|error| StoreError(error.to_string()))?;
            if !response.succeeded {
                let reason = format!(
                    "etcd refused a write: {}leader no longer has fencing token {} (another orchestrator leads now)",
                    self.prefix, self.token
                );
                self.fenced = Some(reason.clone());
                self.term.end(reason.clone());
                return Err(StoreError(reason));
            }
        }
        Ok(())
    }

    /// Turns a batch into transactions: prunes (range deletes) first, then point ops
    /// (last write per key wins) packed into transactions of at most [`MAX_OPS`],
    /// never splitting an atomic group.
    async fn plan(&self, writes: &[Write]) -> Result<Vec<Vec<pb::RequestOp>>, StoreError> {
        let mut ops: HashMap<Vec<u8>, Op> = HashMap::new();
        let mut groups = Groups::default();
        let mut prunes: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        // The group of a heal record just written: its outbox entry joins it.
        let mut healing: Option<usize> = None;
        for write in writes {
            match write {
                Write::PutNode(node) => {
                    let key = self.key("nodes", &node.id.to_string());
                    ops.insert(key.clone(), Op::Put(encode(node)?));
                    groups.join(key, None);
                    healing = None;
                }
                Write::DeleteNode(id) => {
                    let key = self.key("nodes", &id.to_string());
                    ops.insert(key.clone(), Op::Delete);
                    groups.join(key, None);
                    healing = None;
                }
                Write::PutHeal(record) => {
                    // The healed node's record commits with its heal and webhook.
                    let node = self.key("nodes", &record.node.to_string());
                    let group = groups.of(&node);
                    let key = self.key("heals", &heal_key(record));
                    ops.insert(key.clone(), Op::Put(encode(record)?));
                    groups.join(key, Some(group));
                    healing = Some(group);
                }
                Write::PutOutbox(entry) => {
                    let key = self.key("outbox", &entry.id);
                    ops.insert(key.clone(), Op::Put(encode(entry)?));
                    groups.join(key, healing.take());
                }
                Write::DeleteOutbox(id) => {
                    let key = self.key("outbox", id);
                    ops.insert(key.clone(), Op::Delete);
                    groups.join(key, None);
                    healing = None;
                }
                Write::DeadLetter(id) => {
                    let outbox = self.key("outbox", id);
                    let value = match ops.get(&outbox) {
                        Some(Op::Put(value)) => Some(value.clone()),
                        Some(Op::Delete) => None,
                        None => self.read(&outbox).await?,
                    };
                    healing = None;
                    // Already moved (a retried batch) or delivered: nothing to do.
                    let Some(value) = value else { continue };
                    let dead = self.key("dead", id);
                    ops.insert(outbox.clone(), Op::Delete);
                    ops.insert(dead.clone(), Op::Put(value));
                    let group = groups.join(outbox, None);
                    groups.join(dead, Some(group));
                }
                Write::PutHistory(point) => {
                    let key = self.key("history", &history_key(point.t));
                    ops.insert(key.clone(), Op::Put(encode(point)?));
                    groups.join(key, None);
                    healing = None;
                }
                Write::PutEventEpoch(epoch) => {
                    let key = format!("{}meta/event_epoch", self.prefix).into_bytes();
                    ops.insert(key.clone(), Op::Put(encode(epoch)?));
                    groups.join(key, None);
                    healing = None;
                }
                Write::PutAutomation(automation) => {
                    let key = format!("{}meta/automation", self.prefix).into_bytes();
                    ops.insert(key.clone(), Op::Put(encode(automation)?));
                    groups.join(key, None);
                    healing = None;
                }
                Write::PruneHeals { before } => {
                    let start = self.key("heals", "");
                    let end = self.key("heals", &unix_nanos(*before));
                    drop_in_range(&mut ops, &start, &end);
                    prunes.push((start, end));
                }
                Write::PruneHistory { before } => {
                    let start = self.key("history", "");
                    let end = self.key("history", &history_key(*before));
                    drop_in_range(&mut ops, &start, &end);
                    prunes.push((start, end));
                }
            }
        }
        let mut plan: Vec<Vec<pb::RequestOp>> = Vec::new();
        if !prunes.is_empty() {
            // The last prune of each range covers the earlier ones.
            let mut seen = HashMap::new();
            for (start, end) in prunes {
                seen.insert(start, end);
            }
            plan.push(
                seen.into_iter()
                    .map(|(key, range_end)| delete(key, range_end))
                    .collect(),
            );
        }
        let mut txn: Vec<pb::RequestOp> = Vec::new();
        let mut txn_bytes = 0;
        for group in groups.groups {
            let group: Vec<pb::RequestOp> = group
                .into_iter()
                .filter_map(|key| {
                    ops.remove(&key).map(|op| match op {
                        Op::Put(value) => put(key, value, 0),
                        Op::Delete => delete(key, Vec::new()),
                    })
                })
                .collect();
            if group.is_empty() {
                continue;
            }
            let group_bytes: usize = group.iter().map(op_bytes).sum();
            if !txn.is_empty()
                && (txn.len() + group.len() > MAX_OPS || txn_bytes + group_bytes > MAX_TXN_BYTES)
            {
                plan.push(std::mem::take(&mut txn));
                txn_bytes = 0;
            }
            if group.len() > MAX_OPS || group_bytes > MAX_TXN_BYTES {
                warn!(
                    ops = group.len(),
                    bytes = group_bytes,
                    "an atomic group is larger than one etcd transaction allows; splitting it"
                );
                let mut chunk = Vec::new();
                let mut chunk_bytes = 0;
                for op in group {
                    let bytes = op_bytes(&op);
                    if !chunk.is_empty() && (chunk.len() == MAX_OPS || chunk_bytes + bytes > MAX_TXN_BYTES) {
                        plan.push(std::mem::take(&mut chunk));
                        chunk_bytes = 0;
                    }
                    chunk_bytes += bytes;
                    chunk.push(op);
                }
                plan.push(chunk);
                continue;
            }
            txn_bytes += group_bytes;
            txn.extend(group);
        }
        if !txn.is_empty() {
            plan.push(txn);
        }
        Ok(plan)
    }

    async fn read(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let response = self
            .client
            .range(pb::RangeRequest {
                key: key.to_vec(),
                ..Default::default()
            })
            .await
            .map_err(|error| StoreError(error.to_string()))?;
        Ok(response.kvs.into_iter().next().map(|kv| kv.value))
    }
}

/// Keys that must commit together, in first-seen order.
#[derive(Debug, Default)]
struct Groups {
    groups: Vec<Vec<Vec<u8>>>,
    group_of: HashMap<Vec<u8>, usize>,
}

impl Groups {
    /// Puts `key` into `group` (moving it there if it was elsewhere), or into its
    /// existing group, or into a new one; returns the group.
    fn join(&mut self, key: Vec<u8>, group: Option<usize>) -> usize {
        let index = match (self.group_of.get(&key).copied(), group) {
            (Some(existing), Some(wanted)) if existing != wanted => {
                self.groups[existing].retain(|k| *k != key);
                self.groups[wanted].push(key.clone());
                wanted
            }
            (Some(existing), _) => existing,
            (None, Some(wanted)) => {
                self.groups[wanted].push(key.clone());
                wanted
            }
            (None, None) => {
                self.groups.push(vec![key.clone()]);
                self.groups.len() - 1
            }
        };
        self.group_of.insert(key, index);
        index
    }

    /// The group of `key`, or a new empty one for it to join.
    fn of(&mut self, key: &[u8]) -> usize {
        match self.group_of.get(key) {
            Some(&group) => group,
            None => {
                self.groups.push(Vec::new());
                self.groups.len() - 1
            }
        }
    }
}

/// Puts in `[start, end)` that a later prune deletes anyway (etcd refuses a put
/// and a delete range over the same key in one transaction).
/// What an op adds to a transaction's size: its key and value.
fn op_bytes(op: &pb::RequestOp) -> usize {
    use pb::request_op::Request;
    match &op.request {
        Some(Request::RequestPut(put)) => put.key.len() + put.value.len(),
        Some(Request::RequestDeleteRange(delete)) => delete.key.len() + delete.range_end.len(),
        Some(Request::RequestRange(range)) => range.key.len() + range.range_end.len(),
        Some(Request::RequestTxn(_)) | None => 0,
    }
}

fn drop_in_range(ops: &mut HashMap<Vec<u8>, Op>, start: &[u8], end: &[u8]) {
    ops.retain(|key, _| !(key.as_slice() >= start && key.as_slice() < end));
}

impl Store for EtcdStore {
    fn load(&self) -> Result<StoredState, StoreError> {
        self.runtime.block_on(self.load_async())
    }

    fn apply(&mut self, writes: &[Write]) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let runtime = self.runtime.clone();
        runtime.block_on(self.apply_async(writes))
    }

    fn fenced(&self) -> Option<String> {
        self.fenced.clone()
    }
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::edge::{
        etcd::testing::TestEtcd,
        store::conformance::{self, Backing},
    };

    /// A fleet under its own prefix in a real etcd, with a leader key standing
    /// for an elected term.
    struct Etcd {
        etcd: TestEtcd,
        prefix: String,
        term: Term,
    }

    impl Etcd {
        fn start() -> Option<Self> {
            let etcd = TestEtcd::start()?;
            let prefix = "/test/".to_owned();
            let token = etcd.runtime.block_on(elect(&etcd.client(), &prefix));
            let term = Term::new(token, &CancellationToken::new());
            Some(Self { etcd, prefix, term })
        }
    }

    /// Puts the leader key; its create revision is the term's token.
    async fn elect(client: &EtcdClient, prefix: &str) -> i64 {
        let response = client
            .txn(pb::TxnRequest {
                success: vec![put(leader_key(prefix), b"{}".to_vec(), 0)],
                ..Default::default()
            })
            .await
            .unwrap();
        response.header.unwrap().revision
    }

    impl Backing for Etcd {
        fn open(&mut self) -> Box<dyn Store> {
            Box::new(EtcdStore::new(
                self.etcd.client(),
                self.prefix.clone(),
                self.term.clone(),
                self.etcd.runtime.handle().clone(),
            ))
        }
    }

    macro_rules! conformance_tests {
        ($($name:ident),* $(,)?) => {
            $(#[test]
            fn $name() {
                if let Some(mut etcd) = Etcd::start() {
                    conformance::$name(&mut etcd);
                }
            })*
        };
    }

    conformance_tests!(
        everything_written_is_there_after_reopening,
        delivered_entries_go_and_dead_letters_are_kept_aside,
        pruning_keeps_only_recent_heals,
        history_is_kept_in_time_order_and_pruned_by_time,
        a_large_batch_is_written_whole_and_a_repeated_one_changes_nothing,
        nodes_with_the_largest_labels_are_written_and_loaded,
    );

    #[test]
    fn a_fleet_read_in_slices_and_pages_loads_every_node_once_in_key_order() {
        let Some(mut etcd) = Etcd::start() else { return };
        let mut store = etcd.open();
        // Ten nodes in each of the sixteen slices, and one slice three pages deep.
        let ids: Vec<u128> = (0..16u128)
            .flat_map(|slice| (0..10).map(move |i| (slice << 124) | i))
            .chain((10..2 * PAGE as u128 + 100).map(|i| (0xa << 124) | i))
            .collect();
        let writes: Vec<Write> = ids
            .iter()
            .map(|&id| {
                let mut node = conformance::node(1, crate::domain::node::NodeState::Connected);
                node.id = crate::domain::node::NodeId(uuid::Uuid::from_u128(id));
                Write::PutNode(node)
            })
            .collect();
        store.apply(&writes).unwrap();
        let loaded: Vec<u128> = store
            .load()
            .unwrap()
            .nodes
            .iter()
            .map(|node| node.id.0.as_u128())
            .collect();
        let mut expected = ids.clone();
        expected.sort_unstable();
        assert_eq!(loaded.len(), ids.len(), "every node, none twice");
        assert_eq!(loaded, expected, "in key order");
    }

    #[test]
    fn a_write_after_another_leader_was_elected_is_refused_and_ends_the_term() {
        let Some(mut etcd) = Etcd::start() else { return };
        let mut store = etcd.open();
        store
            .apply(&[Write::PutNode(conformance::node(
                1,
                crate::domain::node::NodeState::Connected,
            ))])
            .unwrap();
        // The lease ran out and another orchestrator was elected: a new leader key.
        let client = etcd.etcd.client();
        etcd.etcd.runtime.block_on(async {
            client
                .txn(pb::TxnRequest {
                    success: vec![delete(leader_key(&etcd.prefix), Vec::new())],
                    ..Default::default()
                })
                .await
                .unwrap();
            elect(&client, &etcd.prefix).await
        });
        let failed = crate::domain::node::NodeState::Failed;
        let refused = store
            .apply(&[
                Write::PutNode(conformance::node(1, failed)),
                Write::PutOutbox(conformance::entry("msg_stale", 1)),
            ])
            .unwrap_err();
        assert!(refused.0.contains("no longer has fencing token"), "{refused}");
        assert!(store.fenced().is_some());
        assert!(etcd.term.ended().is_cancelled(), "a fenced write ends the term");
        assert!(etcd.term.end_reason().contains("fencing token"));
        // Nothing of the refused batch was written.
        let state = store.load().unwrap();
        assert_eq!(state.nodes[0].state, crate::domain::node::NodeState::Connected);
        assert!(state.outbox.is_empty());
    }

    #[test]
    fn a_corrupt_record_is_an_error_naming_it_not_a_panic() {
        let Some(mut etcd) = Etcd::start() else { return };
        let client = etcd.etcd.client();
        let key = format!("{}nodes/bad-node", etcd.prefix).into_bytes();
        etcd.etcd.runtime.block_on(async {
            client
                .txn(pb::TxnRequest {
                    success: vec![put(key, b"{not json".to_vec(), 0)],
                    ..Default::default()
                })
                .await
                .unwrap()
        });
        let error = etcd.open().load().unwrap_err();
        assert!(error.0.contains("/test/nodes[bad-node] is corrupt"), "{error}");
    }
}
