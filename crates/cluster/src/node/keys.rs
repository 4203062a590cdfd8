//! The node's store and system key: opening them, backups, key rotation (EX-14, EX-15, EX-17).

use super::*;

impl Node {
    pub(super) fn keys_lock(&self) -> std::sync::MutexGuard<'_, Option<NodeKeys>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// EX-14 `xcommand ForceSystemKeyUpdate`: a new system key, every value resealed with it.
    pub fn force_system_key_update(&self) -> Result<String, NodeError> {
        self.change_system_key(true).map_err(NodeError::internal)
    }

    /// `fresh`: make a new key; otherwise finish the change to the key already current.
    pub(super) fn change_system_key(&self, fresh: bool) -> Result<String, String> {
        let mut keys = self.keys_lock();
        let Some(k) = keys.as_mut() else {
            return Err("this node has no system key file (its store is in memory)".into());
        };
        let result = (|| {
            let keyring = if fresh {
                Arc::new(k.files.begin_change()?)
            } else {
                k.keyring.clone()
            };
            let records = self.engine.reseal(keyring.clone())?;
            k.files.finish_change()?;
            k.keyring = keyring;
            k.change_pending = false;
            Ok::<_, String>(records)
        })();
        match result {
            Ok(records) => {
                self.alarms.lower(21005, "system key");
                info!(target: "management.node", event = "System key updated", key = %k.keyring.current_id(),
                    records = records, "System key updated");
                Ok(format!(
                    "system key {} now seals {records} records",
                    k.keyring.current_id()
                ))
            }
            Err(why) => {
                self.alarms.raise(21005, "system key", &why);
                Err(format!(
                    "{why}: fix the cause, then run `causeway xcommand ForceSystemKeyUpdate` again"
                ))
            }
        }
    }

    /// EX-17: this node's file and cluster data, read consistently from the running node.
    pub fn backup(&self) -> Result<crate::backup::Backup, NodeError> {
        crate::backup::Backup::take(&self.config, self.store.as_ref()).map_err(NodeError::internal)
    }
}

/// The node's store, its system key, and what went wrong opening them (alarm 20014).
pub struct NodeStore {
    pub store: Arc<dyn Store>,
    pub problem: Option<String>,
    pub keys: Option<NodeKeys>,
}

/// The system key (EX-14) and its files.
pub struct NodeKeys {
    pub(super) files: KeyFiles,
    pub(super) keyring: Arc<Keyring>,
    /// A key change was interrupted: reseal with the current key and finish it.
    pub(super) change_pending: bool,
}

impl NodeStore {
    /// Opens `data_dir/node.redb`. An unreadable store is kept aside (for a post-mortem) and
    /// replaced by an empty one, which the primary then fills: the node heals by itself.
    pub fn open(data_dir: &Path) -> NodeStore {
        let files = KeyFiles::in_dir(data_dir);
        let (keys, key_problem) = match files.load_or_create() {
            Ok((keyring, change_pending)) => (
                Some(NodeKeys {
                    files,
                    keyring: Arc::new(keyring),
                    change_pending,
                }),
                None,
            ),
            Err(e) => (None, Some(format!("the system key: {e}"))),
        };
        let keyring = keys.as_ref().map(|k| k.keyring.clone());
        let path = data_dir.join("node.redb");
        let opened = RedbStore::open(&path)
            .map_err(|e| e.to_string())
            .and_then(|s| {
                causeway_replication::check_store(&s, keyring.as_deref())
                    .map(|_| s)
                    .map_err(|e| e.to_string())
            });
        let why = match opened {
            Ok(s) => {
                return NodeStore {
                    store: Arc::new(s),
                    problem: key_problem,
                    keys,
                }
            }
            Err(why) => why,
        };
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let aside = data_dir.join(format!("node.redb.damaged-{stamp}"));
        let moved = std::fs::rename(&path, &aside).is_ok();
        match RedbStore::open(&path) {
            Ok(s) if moved => NodeStore {
                store: Arc::new(s),
                problem: Some(format!(
                    "the store {} could not be read ({why}); it was kept as {} and this peer takes the configuration from the primary",
                    path.display(),
                    aside.display()
                )),
                keys,
            },
            result => NodeStore {
                store: Arc::new(MemoryStore::new()),
                problem: Some(format!(
                    "the store {} could not be read ({}); this peer runs without one until it is repaired: check the disk, move the file away and restart",
                    path.display(),
                    result.err().map(|e| e.to_string()).unwrap_or(why)
                )),
                keys,
            },
        }
    }

    /// A store in memory (tests; a node that must not touch the disk).
    pub fn memory(store: Arc<MemoryStore>) -> NodeStore {
        NodeStore {
            store,
            problem: None,
            keys: None,
        }
    }
}

/// EX-15: a store that belonged to a cluster, on a node whose peer list is now empty, is
/// reset to factory defaults (the operator cleared the list and restarted). A standalone
/// node joining a cluster as a subordinate is reset too: it takes the primary's
/// configuration, never offers its own. Otherwise the store remembers its cluster.
pub(super) fn settle_membership(
    config: &NodeConfig,
    store: &dyn Store,
) -> Result<(), causeway_store::StoreError> {
    use causeway_replication::lifecycle;
    let stored = lifecycle::membership(store)?;
    if config.cluster.peers.is_empty() {
        if let Some(was) = stored {
            lifecycle::factory_reset(store)?;
            warn!(target: "management.node", event = "Cluster data reset", previous_cluster = %was,
                "This peer left the cluster: its cluster data was reset to factory defaults");
        }
        return Ok(());
    }
    let now = format!("{}|{}", config.cluster.name, config.cluster.peers.join(","));
    let joining_as_subordinate = stored.is_none()
        && config
            .self_index()
            .is_some_and(|i| i != config.cluster.configuration_primary);
    if joining_as_subordinate
        && !lifecycle::dump(store)?
            .tables
            .iter()
            .all(|(_, r)| r.is_empty())
    {
        lifecycle::factory_reset(store)?;
        info!(target: "management.node", event = "Cluster data reset", cluster = %config.cluster.name,
            "This peer joined the cluster as a subordinate: its own configuration was replaced by the primary's");
    }
    if stored.as_deref() != Some(now.as_str()) {
        lifecycle::set_membership(store, &now)?;
    }
    Ok(())
}
