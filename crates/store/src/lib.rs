//! The node's local store: named tables of byte keys and values, written in atomic batches.
//!
//! [`RedbStore`] (one redb file per node) in the product, [`MemoryStore`] in tests. The
//! replication engine keeps its streams here so a restart resumes where it stopped.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use redb::{ReadableDatabase, TableDefinition};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {doing}: {reason}")]
    Io {
        path: String,
        doing: &'static str,
        reason: String,
    },
}

/// One change in an atomic batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        table: &'static str,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        table: &'static str,
        key: Vec<u8>,
    },
    /// Every key of `table` that starts with `prefix`.
    DeletePrefix {
        table: &'static str,
        prefix: Vec<u8>,
    },
}

pub type Rows = Vec<(Vec<u8>, Vec<u8>)>;

type BytesTable<'txn> = redb::Table<'txn, &'static [u8], &'static [u8]>;

/// A store of named tables. Every batch is applied atomically and durably.
pub trait Store: Send + Sync {
    fn get(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every row of `table` whose key starts with `prefix`, in key order.
    fn scan(&self, table: &'static str, prefix: &[u8]) -> Result<Rows, StoreError>;
    fn apply(&self, ops: &[Op]) -> Result<(), StoreError>;
    /// True for a store kept in memory: its saves cost nothing, so callers make them inline
    /// instead of on a thread of their own (which would let tokio's paused clock run ahead
    /// in tests while a save is outstanding).
    fn in_memory(&self) -> bool {
        false
    }
}

pub struct RedbStore {
    db: redb::Database,
    path: PathBuf,
}

/// redb's page cache. Its default (1 GiB) keeps every page written until the cache is full:
/// with the replicated registrations in the store, that was a fifth of a peer's memory per
/// binding (`bench/RESULTS.md`, "Memory per binding"). The replication engine keeps its streams in
/// memory and reads them from the store only at start-up, so for them the cache serves the
/// write path: the pages a commit touches (the right edge of the log, kept by sequence
/// number) and the few a refresh deletes from. The consensus log, read while running, is
/// small and stays in it. A miss is a read from the OS page cache.
pub const CACHE_BYTES: usize = 8 * 1024 * 1024;

impl RedbStore {
    /// Opens the store file, creating it when it does not exist.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| StoreError::Io {
                path: path.display().to_string(),
                doing: "opening",
                reason: e.to_string(),
            })?;
        Ok(Self {
            db,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, doing: &'static str) -> impl Fn(&dyn std::fmt::Display) -> StoreError + '_ {
        move |e| StoreError::Io {
            path: self.path.display().to_string(),
            doing,
            reason: e.to_string(),
        }
    }
}

fn def(table: &str) -> TableDefinition<'_, &'static [u8], &'static [u8]> {
    TableDefinition::new(table)
}

impl Store for RedbStore {
    fn get(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let err = self.err("reading");
        let tx = self.db.begin_read().map_err(|e| err(&e))?;
        let t = match tx.open_table(def(table)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(err(&e)),
        };
        Ok(t.get(key).map_err(|e| err(&e))?.map(|v| v.value().to_vec()))
    }

    fn scan(&self, table: &'static str, prefix: &[u8]) -> Result<Rows, StoreError> {
        let err = self.err("reading");
        let tx = self.db.begin_read().map_err(|e| err(&e))?;
        let t = match tx.open_table(def(table)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(err(&e)),
        };
        let mut out = Vec::new();
        for row in t.range(prefix..).map_err(|e| err(&e))? {
            let (k, v) = row.map_err(|e| err(&e))?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn apply(&self, ops: &[Op]) -> Result<(), StoreError> {
        let err = self.err("writing");
        let tx = self.db.begin_write().map_err(|e| err(&e))?;
        {
            // Opening a table costs more than an insert, and a group commit interleaves
            // tables (each write's records, then its stream's header). Within one
            // transaction, ops on different tables do not interact: each table's ops are
            // applied together, in their order.
            let mut order: Vec<&Op> = effective(ops);
            order.sort_by_key(|op| table_of(op));
            let mut open: Option<(&'static str, BytesTable)> = None;
            for op in order {
                let name = table_of(op);
                if open.as_ref().is_none_or(|(n, _)| *n != name) {
                    drop(open.take()); // a table is opened once at a time
                    open = Some((name, tx.open_table(def(name)).map_err(|e| err(&e))?));
                }
                let Some((_, t)) = open.as_mut() else {
                    continue;
                };
                match op {
                    Op::Put { key, value, .. } => {
                        t.insert(key.as_slice(), value.as_slice())
                            .map_err(|e| err(&e))?;
                    }
                    Op::Delete { key, .. } => {
                        t.remove(key.as_slice()).map_err(|e| err(&e))?;
                    }
                    Op::DeletePrefix { prefix, .. } => {
                        t.retain(|k, _| !k.starts_with(prefix))
                            .map_err(|e| err(&e))?;
                    }
                }
            }
        }
        tx.commit().map_err(|e| err(&e))
    }
}

fn table_of(op: &Op) -> &'static str {
    match op {
        Op::Put { table, .. } | Op::Delete { table, .. } | Op::DeletePrefix { table, .. } => table,
    }
}

/// `ops` without the puts and deletes of a key that a later put or delete of the same key
/// undoes (a stream's header is rewritten by every write of a group commit).
fn effective(ops: &[Op]) -> Vec<&Op> {
    let mut later = std::collections::HashSet::new();
    let mut kept: Vec<&Op> = ops
        .iter()
        .rev()
        .filter(|op| match op {
            Op::Put { table, key, .. } | Op::Delete { table, key } => {
                later.insert((*table, key.as_slice()))
            }
            Op::DeletePrefix { .. } => true,
        })
        .collect();
    kept.reverse();
    kept
}

/// The same contract in memory. Cloning a handle is done by sharing it in an `Arc`, so a
/// test can "restart" a node on the store it left behind.
type Tables = BTreeMap<&'static str, BTreeMap<Vec<u8>, Vec<u8>>>;

#[derive(Default)]
pub struct MemoryStore {
    tables: Mutex<Tables>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for MemoryStore {
    fn in_memory(&self) -> bool {
        true
    }

    fn get(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().get(table).and_then(|t| t.get(key).cloned()))
    }

    fn scan(&self, table: &'static str, prefix: &[u8]) -> Result<Rows, StoreError> {
        let tables = self.lock();
        let Some(t) = tables.get(table) else {
            return Ok(Vec::new());
        };
        Ok(t.range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn apply(&self, ops: &[Op]) -> Result<(), StoreError> {
        let mut tables = self.lock();
        for op in ops {
            match op {
                Op::Put { table, key, value } => {
                    tables
                        .entry(table)
                        .or_default()
                        .insert(key.clone(), value.clone());
                }
                Op::Delete { table, key } => {
                    tables.entry(table).or_default().remove(key);
                }
                Op::DeletePrefix { table, prefix } => {
                    tables
                        .entry(table)
                        .or_default()
                        .retain(|k, _| !k.starts_with(prefix));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(store: &dyn Store) {
        let put = |k: &str, v: &str| Op::Put {
            table: "t",
            key: k.as_bytes().to_vec(),
            value: v.as_bytes().to_vec(),
        };
        assert_eq!(store.get("t", b"a").unwrap(), None);
        assert!(store.scan("t", b"").unwrap().is_empty());
        store
            .apply(&[put("a/1", "x"), put("a/2", "y"), put("b/1", "z")])
            .unwrap();
        assert_eq!(store.get("t", b"a/2").unwrap(), Some(b"y".to_vec()));
        let a = store.scan("t", b"a/").unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].0, b"a/1");
        store
            .apply(&[
                Op::DeletePrefix {
                    table: "t",
                    prefix: b"a/".to_vec(),
                },
                Op::Delete {
                    table: "t",
                    key: b"b/1".to_vec(),
                },
                put("c", "w"),
            ])
            .unwrap();
        assert_eq!(
            store.scan("t", b"").unwrap(),
            vec![(b"c".to_vec(), b"w".to_vec())]
        );
        // A group commit: tables interleaved, a key written several times, a prefix deleted
        // between two writes of a key. The last op on each key wins, in each table.
        let on = |table: &'static str, k: &str, v: &str| Op::Put {
            table,
            key: k.as_bytes().to_vec(),
            value: v.as_bytes().to_vec(),
        };
        store
            .apply(&[
                on("t", "d/1", "1"),
                on("h", "head", "1"),
                on("t", "d/2", "2"),
                on("h", "head", "2"),
                Op::DeletePrefix {
                    table: "t",
                    prefix: b"d/".to_vec(),
                },
                on("t", "d/2", "3"),
                on("h", "head", "3"),
                Op::Delete {
                    table: "t",
                    key: b"c".to_vec(),
                },
                on("t", "c", "again"),
                on("t", "e", "gone"),
                Op::Delete {
                    table: "t",
                    key: b"e".to_vec(),
                },
            ])
            .unwrap();
        assert_eq!(
            store.scan("t", b"").unwrap(),
            vec![
                (b"c".to_vec(), b"again".to_vec()),
                (b"d/2".to_vec(), b"3".to_vec())
            ]
        );
        assert_eq!(store.get("h", b"head").unwrap(), Some(b"3".to_vec()));
    }

    #[test]
    fn memory_store_keeps_the_contract() {
        exercise(&MemoryStore::new());
    }

    #[test]
    fn redb_store_keeps_the_contract_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        exercise(&RedbStore::open(&path).unwrap());
        let again = RedbStore::open(&path).unwrap();
        assert_eq!(again.get("t", b"c").unwrap(), Some(b"again".to_vec()));
    }

    #[test]
    fn a_file_that_is_not_a_store_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        std::fs::write(&path, b"this is not a redb file, it is garbage").unwrap();
        let err = RedbStore::open(&path)
            .err()
            .expect("garbage must be refused");
        assert!(err.to_string().contains("node.redb"), "{err}");
    }
}
