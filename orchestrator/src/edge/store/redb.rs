//! The embedded store: one redb file under `state_dir`, one table per kind of
//! record, values as JSON (readable with any redb tool, easy to migrate). Table
//! names carry a schema version.

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::{Serialize, de::DeserializeOwned};

use super::{PersistedNode, Store, StoreError, StoredState, Write};
use crate::{domain::forecast::Point, domain::healer::HealRecord, edge::webhook::OutboxEntry};

const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes_v1");
/// Keyed `<unix nanos, 20 digits>/<node id>` so key order is time order.
const HEALS: TableDefinition<&str, &[u8]> = TableDefinition::new("heals_v1");
const OUTBOX: TableDefinition<&str, &[u8]> = TableDefinition::new("outbox_v1");
const DEAD_LETTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("dead_letters_v1");
/// Keyed by Unix milliseconds, 20 digits, so key order is time order.
const HISTORY: TableDefinition<&str, &[u8]> = TableDefinition::new("history_v1");
/// Single values by name (`event_epoch`).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta_v1");
const EVENT_EPOCH: &str = "event_epoch";

/// The file name inside `state_dir`.
pub const FILE_NAME: &str = "orchestrator.redb";

/// A redb database file.
#[derive(Debug)]
pub struct RedbStore {
    /// None between a failed reopen and the next one.
    db: Option<Database>,
    path: PathBuf,
}

fn err(context: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{context}: {error}"))
}

/// Runs `work` on a database file, turning a panic inside redb (a bit-flipped
/// file can trip its assertions) into the same clear error as other corruption.
/// `quiet` (start-up only, while nothing else runs) keeps the default hook from
/// printing a panic report before the clear line.
fn guarded<T>(
    path: &Path,
    quiet: bool,
    work: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let hook = quiet.then(|| {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        hook
    });
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
    if let Some(hook) = hook {
        std::panic::set_hook(hook);
    }
    outcome.unwrap_or_else(|panic| {
        let detail = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown");
        Err(StoreError(format!(
            "{} is corrupt (the database engine failed: {detail}); restore it from a backup or move it aside to start empty",
            path.display()
        )))
    })
}

impl RedbStore {
    /// Opens the database in `state_dir`, creating it on the very first start. A
    /// second orchestrator on the same directory is refused; a corrupt file is a
    /// clear error, never a panic.
    ///
    /// Creation is atomic: the new database is built under a temporary name and
    /// renamed into place once its tables are committed, so a process killed during
    /// its first start leaves either nothing or a whole database, never a file that
    /// will not open again.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let path = state_dir.join(FILE_NAME);
        if !path.exists() {
            create_atomically(&path)?;
        }
        let db = guarded(&path, true, || open_file(&path))?;
        Ok(Self { db: Some(db), path })
    }

    fn db(&self) -> Result<&Database, StoreError> {
        self.db
            .as_ref()
            .ok_or_else(|| StoreError(format!("{} is closed after a failed reopen", self.path.display())))
    }
}

fn open_file(path: &Path) -> Result<Database, StoreError> {
    let db = Database::open(path).map_err(|error| match error {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError(format!(
            "{} is in use by another process (is another orchestrator running on this state_dir?)",
            path.display()
        )),
        other => err(&format!("cannot open {}", path.display()), other),
    })?;
    create_tables(&db)?;
    Ok(db)
}

fn create_tables(db: &Database) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(|e| err("begin", e))?;
    for table in [NODES, HEALS, OUTBOX, DEAD_LETTERS, HISTORY, META] {
        txn.open_table(table).map_err(|e| err("create table", e))?;
    }
    txn.commit().map_err(|e| err("commit", e))
}

/// Builds an empty database at `<path>.creating`, then renames it to `path`.
fn create_atomically(path: &Path) -> Result<(), StoreError> {
    let temporary = path.with_extension("redb.creating");
    // A leftover from a start that was killed half-way: it never became the store.
    let _ = std::fs::remove_file(&temporary);
    {
        let db = Database::create(&temporary)
            .map_err(|error| err(&format!("cannot create {}", temporary.display()), error))?;
        create_tables(&db)?;
    }
    std::fs::rename(&temporary, path)
        .map_err(|error| err(&format!("cannot move {} into place", temporary.display()), error))?;
    if let Some(dir) = path.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        // The rename is durable once the directory is.
        let _ = dir.sync_all();
    }
    Ok(())
}

fn heal_key(record: &HealRecord) -> String {
    format!("{}/{}", unix_nanos(record.at), record.node)
}

fn unix_nanos(at: SystemTime) -> String {
    let nanos = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{nanos:020}")
}

fn history_key(t: f64) -> String {
    format!("{:020}", (t.max(0.0) * 1000.0) as u64)
}

fn encode(value: &impl Serialize) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| err("encode", e))
}

fn decode<T: DeserializeOwned>(table: &str, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| err(&format!("{table}[{key}] is corrupt"), e))
}

fn read_all<T: DeserializeOwned>(
    txn: &redb::ReadTransaction,
    table: TableDefinition<&str, &[u8]>,
) -> Result<Vec<T>, StoreError> {
    let name = table.name().to_owned();
    let table = txn.open_table(table).map_err(|e| err("open table", e))?;
    let mut values = Vec::new();
    for entry in table.iter().map_err(|e| err("read", e))? {
        let (key, value) = entry.map_err(|e| err("read", e))?;
        values.push(decode(&name, key.value(), value.value())?);
    }
    Ok(values)
}

impl Store for RedbStore {
    fn load(&self) -> Result<StoredState, StoreError> {
        guarded(&self.path, true, || self.load_unguarded())
    }

    fn apply(&mut self, writes: &[Write]) -> Result<(), StoreError> {
        let path = self.path.clone();
        guarded(&path, false, || self.apply_unguarded(writes))
    }

    fn recover(&mut self) -> Result<(), StoreError> {
        // redb refuses every write after one I/O error ("Previous I/O error") until
        // the database is opened again; a full disk that has been freed needs that.
        self.db = None;
        let db = guarded(&self.path, false, || open_file(&self.path))?;
        self.db = Some(db);
        Ok(())
    }
}

impl RedbStore {
    fn load_unguarded(&self) -> Result<StoredState, StoreError> {
        let txn = self.db()?.begin_read().map_err(|e| err("begin", e))?;
        let nodes: Vec<PersistedNode> = read_all(&txn, NODES)?;
        let heals: Vec<HealRecord> = read_all(&txn, HEALS)?;
        let mut outbox: Vec<OutboxEntry> = read_all(&txn, OUTBOX)?;
        outbox.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
        let dead_letters = txn
            .open_table(DEAD_LETTERS)
            .and_then(|table| Ok(redb::ReadableTableMetadata::len(&table)?))
            .map_err(|e| err("read", e))?;
        let history: Vec<Point> = read_all(&txn, HISTORY)?;
        let meta = txn.open_table(META).map_err(|e| err("open table", e))?;
        let event_epoch = match meta.get(EVENT_EPOCH).map_err(|e| err("read", e))? {
            Some(value) => decode(META.name(), EVENT_EPOCH, value.value())?,
            None => 0,
        };
        Ok(StoredState {
            nodes,
            heals,
            outbox,
            dead_letters,
            history,
            event_epoch,
        })
    }

    fn apply_unguarded(&mut self, writes: &[Write]) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let txn = self.db()?.begin_write().map_err(|e| err("begin", e))?;
        {
            let mut nodes = txn.open_table(NODES).map_err(|e| err("open table", e))?;
            let mut heals = txn.open_table(HEALS).map_err(|e| err("open table", e))?;
            let mut outbox = txn.open_table(OUTBOX).map_err(|e| err("open table", e))?;
            let mut dead = txn.open_table(DEAD_LETTERS).map_err(|e| err("open table", e))?;
            let mut history = txn.open_table(HISTORY).map_err(|e| err("open table", e))?;
            let mut meta = txn.open_table(META).map_err(|e| err("open table", e))?;
            let io = |e: redb::StorageError| err("write", e);
            for write in writes {
                match write {
                    Write::PutNode(node) => {
                        nodes
                            .insert(node.id.to_string().as_str(), encode(node)?.as_slice())
                            .map_err(io)?;
                    }
                    Write::DeleteNode(id) => {
                        nodes.remove(id.to_string().as_str()).map_err(io)?;
                    }
                    Write::PutHeal(record) => {
                        heals
                            .insert(heal_key(record).as_str(), encode(record)?.as_slice())
                            .map_err(io)?;
                    }
                    Write::PruneHeals { before } => {
                        let cut = unix_nanos(*before);
                        heals.retain(|key, _| key >= cut.as_str()).map_err(io)?;
                    }
                    Write::PutOutbox(entry) => {
                        outbox
                            .insert(entry.id.as_str(), encode(entry)?.as_slice())
                            .map_err(io)?;
                    }
                    Write::DeleteOutbox(id) => {
                        outbox.remove(id.as_str()).map_err(io)?;
                    }
                    Write::DeadLetter(id) => {
                        let entry = outbox
                            .remove(id.as_str())
                            .map_err(io)?
                            .map(|value| value.value().to_vec());
                        if let Some(entry) = entry {
                            dead.insert(id.as_str(), entry.as_slice()).map_err(io)?;
                        }
                    }
                    Write::PutHistory(point) => {
                        history
                            .insert(history_key(point.t).as_str(), encode(point)?.as_slice())
                            .map_err(io)?;
                    }
                    Write::PruneHistory { before } => {
                        let cut = history_key(*before);
                        history.retain_in(..cut.as_str(), |_, _| false).map_err(io)?;
                    }
                    Write::PutEventEpoch(epoch) => {
                        meta.insert(EVENT_EPOCH, encode(epoch)?.as_slice()).map_err(io)?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| err("commit", e))
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr},
        time::Duration,
    };

    use uuid::Uuid;

    use super::*;
    use crate::{
        domain::node::{NodeId, NodeState},
        edge::store::PersistedTermination,
    };

    fn node(n: u8, state: NodeState) -> PersistedNode {
        PersistedNode {
            id: NodeId(Uuid::from_bytes([n; 16])),
            hostname: format!("edge-{n}"),
            ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)),
            agent_version: "1".into(),
            labels: [("zone".to_owned(), "a".to_owned())].into(),
            state,
            state_reason: String::new(),
            termination: None,
        }
    }

    fn entry(id: &str, seconds: u64) -> OutboxEntry {
        OutboxEntry {
            id: id.into(),
            reason: "UNEXPECTED_NODE_FAILURE".into(),
            created_at: SystemTime::UNIX_EPOCH + Duration::from_secs(seconds),
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            body: br#"{"reason":"UNEXPECTED_NODE_FAILURE"}"#.to_vec(),
        }
    }

    #[test]
    fn everything_written_is_there_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut terminating = node(2, NodeState::Terminating);
        terminating.termination = Some(PersistedTermination {
            reason: "scale down".into(),
            acknowledged: true,
        });
        let heal = HealRecord {
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            node: node(1, NodeState::Failed).id,
        };
        {
            let mut store = RedbStore::open(dir.path()).unwrap();
            store
                .apply(&[
                    Write::PutNode(node(1, NodeState::Connected)),
                    Write::PutNode(terminating.clone()),
                    Write::PutOutbox(entry("msg_b", 20)),
                    Write::PutOutbox(entry("msg_a", 10)),
                    Write::PutHeal(heal),
                    Write::PutEventEpoch(6),
                ])
                .unwrap();
            store
                .apply(&[
                    Write::PutNode(node(1, NodeState::Failed)),
                    Write::PutNode(node(3, NodeState::Left)),
                    Write::DeleteNode(node(3, NodeState::Left).id),
                ])
                .unwrap();
        }
        let store = RedbStore::open(dir.path()).unwrap();
        let state = store.load().unwrap();
        let mut nodes = state.nodes;
        nodes.sort_by_key(|node| node.id);
        assert_eq!(nodes, vec![node(1, NodeState::Failed), terminating]);
        let ids: Vec<_> = state.outbox.iter().map(|entry| entry.id.as_str()).collect();
        assert_eq!(ids, ["msg_a", "msg_b"], "oldest first");
        assert_eq!(state.outbox[0], entry("msg_a", 10));
        assert_eq!(state.heals, vec![heal]);
        assert_eq!(state.event_epoch, 6);
    }

    #[test]
    fn delivered_entries_go_and_dead_letters_are_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = RedbStore::open(dir.path()).unwrap();
        store
            .apply(&[
                Write::PutOutbox(entry("msg_1", 1)),
                Write::PutOutbox(entry("msg_2", 2)),
                Write::PutOutbox(entry("msg_3", 3)),
            ])
            .unwrap();
        store
            .apply(&[
                Write::DeleteOutbox("msg_1".into()),
                Write::DeadLetter("msg_2".into()),
            ])
            .unwrap();
        let state = store.load().unwrap();
        assert_eq!(state.outbox, vec![entry("msg_3", 3)]);
        assert_eq!(state.dead_letters, 1);
    }

    #[test]
    fn pruning_keeps_only_recent_heals() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = RedbStore::open(dir.path()).unwrap();
        let at = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let heals: Vec<_> = [100, 200, 300]
            .into_iter()
            .map(|s| HealRecord {
                at: at(s),
                node: NodeId(Uuid::from_u128(s.into())),
            })
            .collect();
        store
            .apply(&heals.iter().copied().map(Write::PutHeal).collect::<Vec<_>>())
            .unwrap();
        store.apply(&[Write::PruneHeals { before: at(200) }]).unwrap();
        assert_eq!(store.load().unwrap().heals, heals[1..].to_vec());
    }

    #[test]
    fn history_is_kept_in_time_order_and_pruned_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = RedbStore::open(dir.path()).unwrap();
        let point = |t: f64| Point { t, value: t / 1e10 };
        store
            .apply(&[
                Write::PutHistory(point(1_700_000_120.0)),
                Write::PutHistory(point(1_700_000_000.0)),
                Write::PutHistory(point(1_700_000_060.5)),
            ])
            .unwrap();
        store
            .apply(&[Write::PruneHistory {
                before: 1_700_000_060.0,
            }])
            .unwrap();
        assert_eq!(
            store.load().unwrap().history,
            vec![point(1_700_000_060.5), point(1_700_000_120.0)]
        );
    }

    #[test]
    fn a_second_orchestrator_on_the_same_state_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = RedbStore::open(dir.path()).unwrap();
        let second = RedbStore::open(dir.path()).unwrap_err();
        assert!(second.0.contains("in use by another process"), "{second}");
    }

    #[test]
    fn a_corrupt_record_is_an_error_naming_it_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let txn = store.db().unwrap().begin_write().unwrap();
        txn.open_table(NODES)
            .unwrap()
            .insert("bad-node", b"{not json".as_slice())
            .unwrap();
        txn.commit().unwrap();
        let error = store.load().unwrap_err();
        assert!(error.0.contains("nodes_v1[bad-node] is corrupt"), "{error}");
    }
}
