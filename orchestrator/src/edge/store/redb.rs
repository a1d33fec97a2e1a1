//! The embedded store: one redb file under `state_dir`, one table per kind of
//! record, values as JSON (readable with any redb tool, easy to migrate). Table
//! names carry a schema version.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::de::DeserializeOwned;

use super::{
    PersistedNode, Store, StoreError, StoredState, Write, decode, encode, heal_key, history_key, unix_nanos,
};
use crate::{
    domain::forecast::Point, domain::healer::HealRecord, domain::node::Automation, edge::webhook::OutboxEntry,
};

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
const AUTOMATION: &str = "automation";

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
        let automation = match meta.get(AUTOMATION).map_err(|e| err("read", e))? {
            Some(value) => decode(META.name(), AUTOMATION, value.value())?,
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
                    Write::PutAutomation(automation) => {
                        meta.insert(AUTOMATION, encode(automation)?.as_slice())
                            .map_err(io)?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| err("commit", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::store::conformance::{self, Backing};

    /// A redb file in a temporary directory, opened afresh each time.
    struct Redb(tempfile::TempDir);

    impl Backing for Redb {
        fn open(&mut self) -> Box<dyn Store> {
            Box::new(RedbStore::open(self.0.path()).unwrap())
        }
    }

    fn redb() -> Redb {
        Redb(tempfile::tempdir().unwrap())
    }

    #[test]
    fn everything_written_is_there_after_reopening() {
        conformance::everything_written_is_there_after_reopening(&mut redb());
    }

    #[test]
    fn delivered_entries_go_and_dead_letters_are_kept_aside() {
        conformance::delivered_entries_go_and_dead_letters_are_kept_aside(&mut redb());
    }

    #[test]
    fn pruning_keeps_only_recent_heals() {
        conformance::pruning_keeps_only_recent_heals(&mut redb());
    }

    #[test]
    fn history_is_kept_in_time_order_and_pruned_by_time() {
        conformance::history_is_kept_in_time_order_and_pruned_by_time(&mut redb());
    }

    #[test]
    fn a_large_batch_is_written_whole_and_a_repeated_one_changes_nothing() {
        conformance::a_large_batch_is_written_whole_and_a_repeated_one_changes_nothing(&mut redb());
    }

    #[test]
    fn nodes_with_the_largest_labels_are_written_and_loaded() {
        conformance::nodes_with_the_largest_labels_are_written_and_loaded(&mut redb());
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
