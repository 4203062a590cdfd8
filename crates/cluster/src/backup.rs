//! Backup and restore of one peer, and destroy-and-purge of its cluster data (EX-17).
//!
//! A backup is taken from the running node (a consistent read of its store) and holds its
//! own file and its cluster data. Restore and purge work on a stopped node: they open its
//! store directly. Values in the cluster data stay sealed with the node's system key (EX-14),
//! which is not in the backup: a backup restores on the node it was taken from, with the
//! key it had then. Admin accounts, certificates and keys are not in the backup.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use causeway_replication::keyring::KeyFiles;
use causeway_replication::lifecycle::{self, Dump};
use causeway_store::{RedbStore, Store};
use serde::{Deserialize, Serialize};

use crate::config::NodeConfig;

pub const FORMAT: &str = "causeway-backup-1";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Backup {
    pub format: String,
    pub system_name: String,
    pub software_version: String,
    pub created_unix_ms: u64,
    /// The node's file, where it was and what it said.
    pub config_path: PathBuf,
    pub config_text: String,
    /// The cluster tables, postcard then base64.
    pub cluster_data: String,
    pub rows: usize,
}

impl Backup {
    pub fn take(config: &NodeConfig, store: &dyn Store) -> Result<Backup, String> {
        let dump = lifecycle::dump(store).map_err(|e| format!("reading the store: {e}"))?;
        let config_text = std::fs::read_to_string(&config.source)
            .map_err(|e| format!("reading {}: {e}", config.source.display()))?;
        let bytes = postcard::to_stdvec(&dump).map_err(|e| e.to_string())?;
        Ok(Backup {
            format: FORMAT.to_string(),
            system_name: config.node.system_name.clone(),
            software_version: causeway_common::SOFTWARE_VERSION.to_string(),
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            config_path: config.source.clone(),
            config_text,
            cluster_data: base64::engine::general_purpose::STANDARD.encode(bytes),
            rows: dump.rows(),
        })
    }

    fn dump(&self) -> Result<Dump, String> {
        if self.format != FORMAT {
            return Err(format!(
                "format '{}' is not '{FORMAT}': this is not a Causeway backup, or one from another version",
                self.format
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.cluster_data)
            .map_err(|e| format!("cluster_data is not base64: {e}"))?;
        postcard::from_bytes(&bytes).map_err(|e| format!("cluster_data cannot be read: {e}"))
    }
}

/// Opens a stopped node's store; refuses while the node runs.
fn open_stopped(data_dir: &Path) -> Result<RedbStore, String> {
    let socket = data_dir.join("admin.sock");
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        return Err(format!(
            "the node in {} is running: stop it first (by its PID, or `causeway lab down`)",
            data_dir.display()
        ));
    }
    RedbStore::open(&data_dir.join("node.redb")).map_err(|e| e.to_string())
}

/// What a restore did, for the operator.
#[derive(Debug, PartialEq, Eq)]
pub struct Restored {
    pub rows: usize,
    pub config_path: PathBuf,
    /// Where the file it replaced was kept, when it differed.
    pub previous_config: Option<PathBuf>,
}

/// Puts a backup back on a stopped node: its file (the one it replaces is kept beside it)
/// and its cluster data, in one store transaction. When the node starts, peers holding
/// newer configuration bring it up to date.
pub fn restore(data_dir: &Path, backup: &Backup) -> Result<Restored, String> {
    let dump = backup.dump()?;
    let parsed: NodeConfig = toml::from_str(&backup.config_text)
        .map_err(|e| format!("the backup's node file cannot be read: {e}"))?;
    if parsed.node.data_dir != data_dir && !same_dir(&parsed.node.data_dir, data_dir) {
        return Err(format!(
            "the backup is of the node with data directory {}, not {}: restore it there",
            parsed.node.data_dir.display(),
            data_dir.display()
        ));
    }
    let store = open_stopped(data_dir)?;
    // Values are sealed with this node's system key: a backup taken before a key change
    // (or on another node) is refused here, naming the key it needs.
    let (keyring, _) = KeyFiles::in_dir(data_dir).load_or_create()?;
    lifecycle::restore(&store, &dump, Some(&keyring))?;
    let path = backup.config_path.clone();
    let current = std::fs::read_to_string(&path).ok();
    let mut previous_config = None;
    if current.as_deref() != Some(backup.config_text.as_str()) {
        if current.is_some() {
            let kept = path.with_extension("toml.before-restore");
            std::fs::rename(&path, &kept)
                .map_err(|e| format!("keeping {}: {e}", path.display()))?;
            previous_config = Some(kept);
        }
        std::fs::write(&path, &backup.config_text)
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(Restored {
        rows: dump.rows(),
        config_path: path,
        previous_config,
    })
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Destroys a stopped node's cluster data (the replicated configuration, its place in the
/// cluster). Its file, certificates and admin accounts stay; when it starts it rejoins and
/// takes the configuration from the primary. Returns how many rows were removed.
pub fn purge(data_dir: &Path) -> Result<usize, String> {
    let store = open_stopped(data_dir)?;
    let rows = lifecycle::dump(&store).map_err(|e| e.to_string())?.rows();
    lifecycle::factory_reset(&store).map_err(|e| e.to_string())?;
    Ok(rows)
}
