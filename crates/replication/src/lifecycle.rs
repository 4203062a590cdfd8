//! What the node does to its replicated state as a whole (EX-15, EX-17): remember which
//! cluster it belongs to, reset on leaving, and copy everything out and back in.

use causeway_store::{Op, Store, StoreError};
use serde::{Deserialize, Serialize};

use crate::engine::META_TABLE;
use crate::stream::{LEGACY_RECORDS_TABLE, RECORDS_TABLE, STREAMS_TABLE};

/// Every table the engine keeps: together, this node's cluster data. The legacy table is
/// empty once the engine has opened the store, but a backup taken before may hold it.
pub const CLUSTER_TABLES: &[&str] = &[
    STREAMS_TABLE,
    RECORDS_TABLE,
    LEGACY_RECORDS_TABLE,
    META_TABLE,
];

const MEMBERSHIP_KEY: &[u8] = b"membership";

/// The cluster this store's data belongs to (`name|peer,peer,…`), when it was clustered.
pub fn membership(store: &dyn Store) -> Result<Option<String>, StoreError> {
    Ok(store
        .get(META_TABLE, MEMBERSHIP_KEY)?
        .map(|v| String::from_utf8_lossy(&v).into_owned()))
}

pub fn set_membership(store: &dyn Store, membership: &str) -> Result<(), StoreError> {
    store.apply(&[Op::Put {
        table: META_TABLE,
        key: MEMBERSHIP_KEY.to_vec(),
        value: membership.as_bytes().to_vec(),
    }])
}

/// Forgets every replicated stream, the primary, the epoch and the node id, in one
/// transaction: the node starts as if it had never been clustered.
pub fn factory_reset(store: &dyn Store) -> Result<(), StoreError> {
    let ops: Vec<Op> = CLUSTER_TABLES
        .iter()
        .map(|t| Op::DeletePrefix {
            table: t,
            prefix: Vec::new(),
        })
        .collect();
    store.apply(&ops)
}

/// A copy of every row of the cluster tables.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dump {
    pub tables: Vec<(String, causeway_store::Rows)>,
}

impl Dump {
    pub fn rows(&self) -> usize {
        self.tables.iter().map(|(_, r)| r.len()).sum()
    }
}

pub fn dump(store: &dyn Store) -> Result<Dump, StoreError> {
    let mut tables = Vec::new();
    for t in CLUSTER_TABLES {
        tables.push((t.to_string(), store.scan(t, b"")?));
    }
    Ok(Dump { tables })
}

/// Replaces the cluster tables with `dump`, in one transaction. Tables the dump names that
/// are not cluster tables are refused, so a crafted file cannot write elsewhere.
pub fn restore(
    store: &dyn Store,
    dump: &Dump,
    keyring: Option<&crate::keyring::Keyring>,
) -> Result<(), String> {
    let mut ops: Vec<Op> = CLUSTER_TABLES
        .iter()
        .map(|t| Op::DeletePrefix {
            table: t,
            prefix: Vec::new(),
        })
        .collect();
    for (name, rows) in &dump.tables {
        let table = CLUSTER_TABLES
            .iter()
            .find(|t| **t == name.as_str())
            .ok_or_else(|| format!("the backup names a table '{name}' that is not cluster data"))?;
        for (key, value) in rows {
            ops.push(Op::Put {
                table,
                key: key.clone(),
                value: value.clone(),
            });
        }
    }
    // Read it back in memory first: a damaged backup leaves the store as it was.
    let trial = causeway_store::MemoryStore::new();
    trial.apply(&ops).map_err(|e| e.to_string())?;
    crate::check_store(&trial, keyring)
        .map_err(|e| format!("the backup's data cannot be read: {e}"))?;
    store.apply(&ops).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_store::MemoryStore;

    #[test]
    fn dump_restore_and_reset_cover_every_cluster_table() {
        let store = MemoryStore::new();
        set_membership(&store, "c|a,b").unwrap();
        store
            .apply(&[Op::Put {
                table: RECORDS_TABLE,
                key: b"k".to_vec(),
                value: b"v".to_vec(),
            }])
            .unwrap();
        let copy = dump(&store).unwrap();
        assert_eq!(copy.rows(), 2);
        factory_reset(&store).unwrap();
        assert_eq!(dump(&store).unwrap().rows(), 0);
        assert_eq!(membership(&store).unwrap(), None);
        restore(&store, &copy, None).unwrap();
        assert_eq!(dump(&store).unwrap(), copy);
        // A stream header that cannot be read: refused, and the store is left as it was.
        let mut bad = copy.clone();
        bad.tables[0]
            .1
            .push((b"no separators".to_vec(), b"x".to_vec()));
        assert!(restore(&store, &bad, None)
            .unwrap_err()
            .contains("cannot be read"));
        assert_eq!(dump(&store).unwrap(), copy);
        let mut bad = copy.clone();
        bad.tables.push(("admin_users".into(), vec![]));
        assert!(restore(&store, &bad, None)
            .unwrap_err()
            .contains("admin_users"));
    }
}
