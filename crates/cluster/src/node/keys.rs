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

    /// EX-17: this node's file and cluster data, read consistently from the running node,
    /// opened with its system key and sealed with `passphrase`, so the backup restores on a
    /// machine with another key.
    pub fn backup(&self, passphrase: &str) -> Result<crate::backup::Backup, NodeError> {
        crate::backup::check_passphrase(passphrase).map_err(NodeError::invalid)?;
        // Held while the store is read: a key change meanwhile could seal values with a key
        // this copy of the keyring does not hold.
        let keys = self.keys_lock();
        let keyring = keys.as_ref().map(|k| k.keyring.clone());
        crate::backup::Backup::take(
            &self.config,
            self.store.as_ref(),
            keyring.as_deref(),
            passphrase,
        )
        .map_err(NodeError::internal)
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

/// What leaving resets in the node file besides the cluster data, as the seed does: the
/// cluster settings (name, configuration primary, TLS verification mode). The network
/// (addresses, ports, IP version), admin accounts, certificates and keys stay.
pub(super) fn reset_cluster_settings(config: &NodeConfig) {
    let mut file = match NodeConfig::load(&config.source) {
        Ok(f) => f,
        Err(e) => {
            warn!(target: "management.node", reason = %e,
                "Could not reset the cluster settings in the node's file: set cluster.name, cluster.configuration_primary and cluster.tls_verification by hand");
            return;
        }
    };
    file.cluster.forget_cluster();
    if let Err(e) = file.save() {
        warn!(target: "management.node", reason = %e,
            "Could not reset the cluster settings in the node's file");
    }
}

/// EX-15: a store that belonged to a cluster, on a node whose peer list is now empty, is
/// reset to factory defaults (the operator cleared the list and restarted). A standalone
/// node joining a cluster as a subordinate is reset too: it takes the primary's
/// configuration, never offers its own. Otherwise the store remembers its cluster.
/// Returns true when this peer left (its cluster settings were reset).
pub(super) fn settle_membership(
    config: &NodeConfig,
    store: &dyn Store,
) -> Result<bool, causeway_store::StoreError> {
    use causeway_replication::lifecycle;
    let stored = lifecycle::membership(store)?;
    if config.cluster.peers.is_empty() {
        if let Some(was) = stored {
            lifecycle::factory_reset(store)?;
            reset_cluster_settings(config);
            warn!(target: "management.node", event = "Cluster data reset", previous_cluster = %was,
                "This peer left the cluster: its cluster data and cluster settings were reset to factory defaults");
            return Ok(true);
        }
        return Ok(false);
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
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Leaving (an empty peer list on a node whose store belonged to a cluster) resets the
    /// cluster data and the cluster settings in the node file; the network stays.
    #[test]
    fn leaving_resets_the_cluster_settings_in_the_file_and_keeps_the_network() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("causeway.toml");
        std::fs::write(
            &path,
            format!(
                "[node]\nsystem_name = \"p3\"\naddress = \"127.0.0.3\"\ndata_dir = \"{}\"\n\
                 [cluster]\nname = \"old.example\"\nconfiguration_primary = 2\n\
                 tls_verification = \"Enforce\"\nport = 4999\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let config = NodeConfig::load(&path).unwrap();
        let store = causeway_store::MemoryStore::new();
        causeway_replication::lifecycle::set_membership(&store, "old.example|a,b,c").unwrap();
        assert!(settle_membership(&config, &store).unwrap());
        let after = NodeConfig::load(&path).unwrap();
        assert_eq!(after.cluster.name, "");
        assert_eq!(after.cluster.configuration_primary, 1);
        assert_eq!(after.cluster.tls_verification, TlsMode::Permissive);
        assert_eq!(after.cluster.port, 4999, "the network stays");
        assert_eq!(after.node.address, "127.0.0.3");
        assert_eq!(
            causeway_replication::lifecycle::membership(&store).unwrap(),
            None
        );
        // Standalone from then on: nothing more to reset.
        assert!(!settle_membership(&after, &store).unwrap());
    }
}
