//! What the node does to its replicated state as a whole (EX-15, EX-17): remember which
//! cluster it belongs to, reset on leaving, and copy everything out and back in.

use causeway_store::{MemoryStore, Op, Store, StoreError};
use serde::{Deserialize, Serialize};

use crate::engine::META_TABLE;
use crate::keyring::Keyring;
use crate::stream::{Stream, LEGACY_RECORDS_TABLE, RECORDS_TABLE, STREAMS_TABLE};

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
pub fn restore(store: &dyn Store, dump: &Dump, keyring: Option<&Keyring>) -> Result<(), String> {
    let ops = replace_ops(dump)?;
    // Read it back in memory first: a damaged backup leaves the store as it was.
    let trial = MemoryStore::new();
    trial.apply(&ops).map_err(|e| e.to_string())?;
    crate::check_store(&trial, keyring)
        .map_err(|e| format!("the backup's data cannot be read: {e}"))?;
    store.apply(&ops).map_err(|e| e.to_string())
}

/// Puts back cluster tables exactly as `dump` holds them, without reading them first: for
/// undoing a restore, where what was there before may be damaged (the reason to restore).
pub fn put_back(store: &dyn Store, dump: &Dump) -> Result<(), String> {
    store.apply(&replace_ops(dump)?).map_err(|e| e.to_string())
}

/// Operations that empty every cluster table and write `dump`'s rows.
fn replace_ops(dump: &Dump) -> Result<Vec<Op>, String> {
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
    Ok(ops)
}

/// The same cluster data with every value opened with `from` and sealed again with `to`
/// (`None`: plain). A backup carries its data plain inside its own sealed envelope, so it
/// restores on a machine with another system key (EX-17). Rows of the legacy layout move to
/// the current one, as `Stream::migrate_legacy` does at start-up; record rows no stream
/// names are dropped, since no one reads them and they would stay sealed with the old key.
pub fn reseal(dump: &Dump, from: Option<&Keyring>, to: Option<&Keyring>) -> Result<Dump, String> {
    let scratch = MemoryStore::new();
    scratch
        .apply(&replace_ops(dump)?)
        .map_err(|e| format!("reading the cluster data: {e}"))?;
    let streams = Stream::load_all(&scratch, from)
        .map_err(|e| format!("the cluster data cannot be read: {e}"))?;
    let mut ops = vec![
        Op::DeletePrefix {
            table: RECORDS_TABLE,
            prefix: Vec::new(),
        },
        Op::DeletePrefix {
            table: LEGACY_RECORDS_TABLE,
            prefix: Vec::new(),
        },
    ];
    for mut s in streams {
        let all = s.since(0);
        ops.extend(s.store_ops(&all, true, to));
    }
    scratch
        .apply(&ops)
        .map_err(|e| format!("sealing the cluster data again: {e}"))?;
    self::dump(&scratch).map_err(|e| format!("reading the cluster data: {e}"))
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

    #[test]
    fn reseal_opens_with_one_key_and_seals_with_another_or_none() {
        use crate::keyring::KeyFiles;
        use crate::stream::Record;
        use crate::StreamId;
        let key =
            |dir: &tempfile::TempDir| KeyFiles::in_dir(dir.path()).load_or_create().unwrap().0;
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (key(&dir_a), key(&dir_b));
        let id = StreamId::new("config", "cluster");
        let records = vec![
            Record {
                key: "sip.users.alice".into(),
                value: Some(b"Sup3rSecretPw".to_vec()),
                seq: 1,
            },
            Record {
                key: "gone".into(),
                value: Some(b"x".to_vec()),
                seq: 2,
            },
            Record {
                key: "gone".into(),
                value: None,
                seq: 3,
            },
        ];
        let mut s = Stream::new(id.clone());
        s.apply(&records);
        s.header.seq = 4;
        let store = MemoryStore::new();
        store.apply(&s.store_ops(&records, true, Some(&a))).unwrap();
        // A row of the layout before repl_log, sealed with key A too.
        #[derive(Serialize)]
        struct LegacyRow {
            seq: u64,
            value: Option<Vec<u8>>,
            sealed: bool,
        }
        let legacy = LegacyRow {
            seq: 4,
            value: Some(a.seal(b"0ld-Secret-Value")),
            sealed: true,
        };
        store
            .apply(&[Op::Put {
                table: LEGACY_RECORDS_TABLE,
                key: b"config\0cluster\0sip.users.bob".to_vec(),
                value: postcard::to_stdvec(&legacy).unwrap(),
            }])
            .unwrap();
        set_membership(&store, "c|a,b").unwrap();
        let before = Stream::load_all(&store, Some(&a)).unwrap().remove(0);
        let sealed_a = dump(&store).unwrap();
        let holds = |d: &Dump, needle: &[u8]| {
            d.tables
                .iter()
                .flat_map(|(_, rows)| rows)
                .any(|(_, v)| v.windows(needle.len()).any(|w| w == needle))
        };
        assert!(!holds(&sealed_a, b"Sup3rSecretPw"));

        let plain = reseal(&sealed_a, Some(&a), None).unwrap();
        assert!(holds(&plain, b"Sup3rSecretPw") && holds(&plain, b"0ld-Secret-Value"));
        let legacy_rows = |d: &Dump| {
            d.tables
                .iter()
                .find(|(t, _)| t == LEGACY_RECORDS_TABLE)
                .map(|(_, rows)| rows.len())
        };
        assert_eq!(legacy_rows(&plain), Some(0), "legacy rows moved over");
        restore(&MemoryStore::new(), &plain, None).expect("plain data opens without a key");

        let sealed_b = reseal(&plain, None, Some(&b)).unwrap();
        assert!(!holds(&sealed_b, b"Sup3rSecretPw") && !holds(&sealed_b, b"0ld-Secret-Value"));
        let store_b = MemoryStore::new();
        restore(&store_b, &sealed_b, Some(&b)).unwrap();
        let after = Stream::load_all(&store_b, Some(&b)).unwrap().remove(0);
        assert_eq!(after.get("sip.users.alice"), Some(&b"Sup3rSecretPw"[..]));
        assert_eq!(after.get("sip.users.bob"), Some(&b"0ld-Secret-Value"[..]));
        assert_eq!(after.header, before.header, "same position and hash");
        assert_eq!(after.since(0), before.since(0), "tombstones kept");
        assert_eq!(membership(&store_b).unwrap().as_deref(), Some("c|a,b"));

        assert!(restore(&MemoryStore::new(), &sealed_b, Some(&a))
            .unwrap_err()
            .contains("does not have"));
        assert!(reseal(&sealed_a, Some(&b), None)
            .unwrap_err()
            .contains("does not have"));
        assert!(reseal(&sealed_a, None, None)
            .unwrap_err()
            .contains("no system key"));
    }
}
