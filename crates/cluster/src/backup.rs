//! Backup and restore of one peer, and destroy-and-purge of its cluster data (EX-17).
//!
//! A backup is taken from the running node (a consistent read of its store) and holds its
//! own file and its cluster data. Restore and purge work on a stopped node: they open its
//! store directly.
//!
//! The node's system key (EX-14) is not in a backup, so the values in it cannot stay sealed
//! with that key: a backup ("causeway-backup-2") holds them plain inside an envelope of its
//! own, AES-256-GCM under a key derived from the operator's passphrase (PBKDF2-HMAC-SHA256).
//! A restore opens the envelope and seals every value with the system key of the directory
//! it restores into, so it works on a replacement machine. The header (which system, when,
//! where its file goes) stays readable and is bound to the envelope: an edited header does
//! not open. A "causeway-backup-1" file, from before, still holds values sealed with the
//! key of the node it was taken from, and restores only where that key is.
//!
//! Admin accounts, certificates and keys are not in the backup.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use causeway_replication::keyring::{KeyFiles, Keyring};
use causeway_replication::lifecycle::{self, Dump};
use causeway_store::{RedbStore, Store};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::config::NodeConfig;

/// The format written now: plain header, passphrase-sealed contents.
pub const FORMAT: &str = "causeway-backup-2";
/// The format written before: contents in clear, values sealed with the node's own key.
pub const FORMAT_V1: &str = "causeway-backup-1";

pub const KDF_ALGORITHM: &str = "PBKDF2-HMAC-SHA256";
/// OWASP's figure for PBKDF2-HMAC-SHA256 (2023): a guess costs about a third of a second.
pub const KDF_ITERATIONS: u32 = 600_000;
/// A file asking for more is damaged (or made to keep a restore busy for hours).
const MAX_KDF_ITERATIONS: u32 = 100_000_000;
const SALT_LEN: usize = 16;
pub const MIN_PASSPHRASE_CHARS: usize = 12;

const DOES_NOT_OPEN: &str = "the passphrase does not open this backup, or the file is damaged";

/// A backup as written to its file (format "causeway-backup-2").
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Backup {
    pub format: String,
    pub system_name: String,
    pub software_version: String,
    pub created_unix_ms: u64,
    /// Where the node's file was; a restore writes it back there.
    pub config_path: PathBuf,
    /// Rows of cluster data inside.
    pub rows: usize,
    /// How the key that seals `sealed` is derived from the passphrase.
    pub kdf: Kdf,
    /// base64 of nonce ‖ AES-256-GCM ciphertext and tag of the postcard `Contents`; the
    /// header fields above are its associated data.
    pub sealed: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Kdf {
    pub algorithm: String,
    pub iterations: u32,
    /// base64
    pub salt: String,
}

/// What a backup carries inside its envelope.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Contents {
    /// The node's file, as it was.
    pub config_text: String,
    /// The cluster tables, every value plain.
    pub cluster_data: Dump,
}

/// A backup of format "causeway-backup-1": everything in clear but the values, which are
/// sealed with the system key of the node it was taken from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupV1 {
    pub format: String,
    pub system_name: String,
    pub software_version: String,
    pub created_unix_ms: u64,
    pub config_path: PathBuf,
    pub config_text: String,
    /// The cluster tables, postcard then base64.
    pub cluster_data: String,
    pub rows: usize,
}

/// A backup file of either format, as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackupFile {
    Sealed(Backup),
    V1(BackupV1),
}

/// The passphrase in `path`: the file's content without its trailing newline.
pub fn read_passphrase_file(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the passphrase file {}: {e}", path.display()))?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.is_empty() {
        return Err(format!(
            "the passphrase file {} is empty: write the passphrase in it",
            path.display()
        ));
    }
    Ok(text.to_string())
}

/// A backup holds every secret of the cluster: its passphrase is all that guards them.
pub fn check_passphrase(passphrase: &str) -> Result<(), String> {
    let chars = passphrase.chars().count();
    if chars < MIN_PASSPHRASE_CHARS {
        return Err(format!(
            "the passphrase has {chars} characters; a backup needs at least {MIN_PASSPHRASE_CHARS}: write a longer one in the passphrase file"
        ));
    }
    Ok(())
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn derive_key(passphrase: &str, salt: &[u8], iterations: u32) -> Result<LessSafeKey, String> {
    let iterations = std::num::NonZeroU32::new(iterations)
        .ok_or_else(|| format!("{DOES_NOT_OPEN} (its key derivation asks for 0 iterations)"))?;
    let mut key = [0u8; 32];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt,
        passphrase.as_bytes(),
        &mut key,
    );
    let unbound = UnboundKey::new(&AES_256_GCM, &key)
        .map_err(|_| "making the backup's key failed".to_string())?;
    Ok(LessSafeKey::new(unbound))
}

fn push_field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

impl Backup {
    /// Reads the node's file and its cluster data from `store` (values opened with
    /// `keyring`, the node's system key) and seals them with `passphrase`.
    pub fn take(
        config: &NodeConfig,
        store: &dyn Store,
        keyring: Option<&Keyring>,
        passphrase: &str,
    ) -> Result<Backup, String> {
        Self::take_with(config, store, keyring, passphrase, KDF_ITERATIONS)
    }

    fn take_with(
        config: &NodeConfig,
        store: &dyn Store,
        keyring: Option<&Keyring>,
        passphrase: &str,
        iterations: u32,
    ) -> Result<Backup, String> {
        check_passphrase(passphrase)?;
        let sealed = lifecycle::dump(store).map_err(|e| format!("reading the store: {e}"))?;
        let cluster_data = lifecycle::reseal(&sealed, keyring, None)
            .map_err(|e| format!("opening the cluster data with the system key: {e}"))?;
        let config_text = std::fs::read_to_string(&config.source)
            .map_err(|e| format!("reading {}: {e}", config.source.display()))?;
        let contents = Contents {
            config_text,
            cluster_data,
        };
        Self::seal(
            &config.node.system_name,
            &config.source,
            &contents,
            passphrase,
            iterations,
        )
    }

    fn seal(
        system_name: &str,
        config_path: &Path,
        contents: &Contents,
        passphrase: &str,
        iterations: u32,
    ) -> Result<Backup, String> {
        let random = SystemRandom::new();
        let mut salt = [0u8; SALT_LEN];
        let mut nonce = [0u8; NONCE_LEN];
        // No fallback as the keyring has: one backup, one random salt and nonce, or none.
        random
            .fill(&mut salt)
            .and_then(|_| random.fill(&mut nonce))
            .map_err(|_| "no random source to seal the backup with".to_string())?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut backup = Backup {
            format: FORMAT.to_string(),
            system_name: system_name.to_string(),
            software_version: causeway_common::SOFTWARE_VERSION.to_string(),
            created_unix_ms: unix_ms_now(),
            config_path: config_path.to_path_buf(),
            rows: contents.cluster_data.rows(),
            kdf: Kdf {
                algorithm: KDF_ALGORITHM.to_string(),
                iterations,
                salt: b64.encode(salt),
            },
            sealed: String::new(),
        };
        let key = derive_key(passphrase, &salt, iterations)?;
        let mut body = postcard::to_stdvec(contents)
            .map_err(|e| format!("encoding the backup's contents: {e}"))?;
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(backup.associated_data()),
            &mut body,
        )
        .map_err(|_| "sealing the backup failed".to_string())?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&body);
        backup.sealed = b64.encode(sealed);
        Ok(backup)
    }

    /// Every header field, each with its length: a header edited by hand (another system
    /// name, another place for the node's file) makes the envelope fail to open.
    fn associated_data(&self) -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt as _;
        let mut out = Vec::new();
        push_field(&mut out, self.format.as_bytes());
        push_field(&mut out, self.system_name.as_bytes());
        push_field(&mut out, self.software_version.as_bytes());
        push_field(&mut out, &self.created_unix_ms.to_be_bytes());
        push_field(&mut out, self.config_path.as_os_str().as_bytes());
        push_field(&mut out, &(self.rows as u64).to_be_bytes());
        push_field(&mut out, self.kdf.algorithm.as_bytes());
        push_field(&mut out, &self.kdf.iterations.to_be_bytes());
        push_field(&mut out, self.kdf.salt.as_bytes());
        out
    }

    /// Opens the envelope with `passphrase`.
    pub fn open(&self, passphrase: &str) -> Result<Contents, String> {
        if self.format != FORMAT {
            return Err(format!(
                "format '{}' is not '{FORMAT}': this is not a Causeway backup, or one from another version",
                self.format
            ));
        }
        if self.kdf.algorithm != KDF_ALGORITHM {
            return Err(format!(
                "the backup's key derivation is '{}', not '{KDF_ALGORITHM}': the file is damaged, or from another version",
                self.kdf.algorithm
            ));
        }
        if self.kdf.iterations > MAX_KDF_ITERATIONS {
            return Err(format!(
                "the backup's key derivation asks for {} iterations, more than {MAX_KDF_ITERATIONS}: the file is damaged",
                self.kdf.iterations
            ));
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let damaged = |what: &str| format!("{DOES_NOT_OPEN} ({what})");
        let salt = b64
            .decode(&self.kdf.salt)
            .map_err(|_| damaged("the salt is not base64"))?;
        let sealed = b64
            .decode(&self.sealed)
            .map_err(|_| damaged("'sealed' is not base64"))?;
        if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(damaged("'sealed' is too short"));
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let mut nonce_bytes = [0u8; NONCE_LEN];
        nonce_bytes.copy_from_slice(nonce);
        let key = derive_key(passphrase, &salt, self.kdf.iterations)?;
        let mut buf = body.to_vec();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(self.associated_data()),
                &mut buf,
            )
            .map_err(|_| {
                format!("{DOES_NOT_OPEN}: check the passphrase file (a trailing newline is not part of the passphrase) and that the header was not edited")
            })?;
        postcard::from_bytes(plain).map_err(|e| {
            format!("the backup opens but its contents cannot be read ({e}): it was written by another version")
        })
    }
}

impl BackupV1 {
    fn contents(&self) -> Result<Contents, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.cluster_data)
            .map_err(|e| format!("cluster_data is not base64: {e}"))?;
        let cluster_data = postcard::from_bytes(&bytes)
            .map_err(|e| format!("cluster_data cannot be read: {e}"))?;
        Ok(Contents {
            config_text: self.config_text.clone(),
            cluster_data,
        })
    }
}

impl BackupFile {
    /// Reads a backup file of either format.
    pub fn parse(text: &str) -> Result<BackupFile, String> {
        #[derive(Deserialize)]
        struct Format {
            format: String,
        }
        let found: Format = serde_json::from_str(text)
            .map_err(|e| format!("this is not a Causeway backup ({e})"))?;
        let read = |e: serde_json::Error| format!("the {} file cannot be read: {e}", found.format);
        match found.format.as_str() {
            FORMAT => serde_json::from_str(text)
                .map(BackupFile::Sealed)
                .map_err(read),
            FORMAT_V1 => serde_json::from_str(text).map(BackupFile::V1).map_err(read),
            other => Err(format!(
                "format '{other}' is neither '{FORMAT}' nor '{FORMAT_V1}': this is not a Causeway backup, or one from a newer version (restore it with that version)"
            )),
        }
    }

    pub fn format(&self) -> &str {
        match self {
            BackupFile::Sealed(b) => &b.format,
            BackupFile::V1(b) => &b.format,
        }
    }

    pub fn system_name(&self) -> &str {
        match self {
            BackupFile::Sealed(b) => &b.system_name,
            BackupFile::V1(b) => &b.system_name,
        }
    }

    pub fn config_path(&self) -> &Path {
        match self {
            BackupFile::Sealed(b) => &b.config_path,
            BackupFile::V1(b) => &b.config_path,
        }
    }
}

/// Refuses while the node in `data_dir` runs: its admin socket answers.
fn refuse_if_running(data_dir: &Path) -> Result<(), String> {
    let socket = data_dir.join("admin.sock");
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        return Err(format!(
            "the node in {} is running: stop it first (by its PID, or `causeway lab down`)",
            data_dir.display()
        ));
    }
    Ok(())
}

/// Opens a stopped node's store; refuses while the node runs.
fn open_stopped(data_dir: &Path) -> Result<RedbStore, String> {
    refuse_if_running(data_dir)?;
    RedbStore::open(&data_dir.join("node.redb")).map_err(|e| e.to_string())
}

/// What a restore did, for the operator.
#[derive(Debug, PartialEq, Eq)]
pub struct Restored {
    pub rows: usize,
    pub config_path: PathBuf,
    /// Where the file it replaced was kept, when it differed.
    pub previous_config: Option<PathBuf>,
    /// The directory had no system key: this restore made one.
    pub created_system_key: Option<PathBuf>,
    /// The directory had no store: this restore made one.
    pub created_store: Option<PathBuf>,
    /// The node's certificate, key or CA that are not there: the node needs them before it
    /// starts (they are not in a backup).
    pub missing_identity: Vec<PathBuf>,
}

/// What a restore changed so far: undone in reverse order when a later step fails, so a
/// failed restore leaves the directory as it found it.
#[derive(Default)]
struct Undo {
    steps: Vec<UndoStep>,
}

enum UndoStep {
    /// A file this restore created.
    Remove(PathBuf),
    /// A file this restore moved aside.
    MoveBack { from: PathBuf, to: PathBuf },
    /// A file this restore overwrote, with what it held.
    Rewrite { path: PathBuf, bytes: Vec<u8> },
    /// A store that was there already, with the cluster tables it held.
    PutBack { store: Arc<RedbStore>, rows: Dump },
}

impl Undo {
    /// Registers `path` for removal when it does not exist yet. Called before the step that
    /// may create it, so a step that fails half-way is undone too.
    fn remove_if_created(&mut self, path: &Path) -> bool {
        let absent = std::fs::symlink_metadata(path).is_err();
        if absent {
            self.steps.push(UndoStep::Remove(path.to_path_buf()));
        }
        absent
    }

    fn push(&mut self, step: UndoStep) {
        self.steps.push(step);
    }

    /// Undoes every step; returns `why` with what could not be undone.
    fn run(self, why: String) -> String {
        let mut failed = Vec::new();
        for step in self.steps.into_iter().rev() {
            let result = match &step {
                UndoStep::Remove(path) => match std::fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(format!("removing {}: {e}", path.display()))
                    }
                    _ => Ok(()),
                },
                UndoStep::MoveBack { from, to } => std::fs::rename(from, to).map_err(|e| {
                    format!("moving {} back to {}: {e}", from.display(), to.display())
                }),
                UndoStep::Rewrite { path, bytes } => std::fs::write(path, bytes)
                    .map_err(|e| format!("writing {} back: {e}", path.display())),
                UndoStep::PutBack { store, rows } => lifecycle::put_back(store.as_ref(), rows)
                    .map_err(|e| format!("putting the store's cluster data back: {e}")),
            };
            if let Err(e) = result {
                failed.push(e);
            }
        }
        if failed.is_empty() {
            format!("{why} (the restore was undone: nothing in the directory changed)")
        } else {
            format!(
                "{why}; undoing the restore failed too: {}: fix these by hand before starting the node",
                failed.join("; ")
            )
        }
    }
}

/// Puts a backup back on a stopped node: its cluster data, sealed with the system key of
/// `data_dir` (made if there is none), in one store transaction, and its file (the one it
/// replaces is kept beside it). A "causeway-backup-2" file needs its passphrase. When the
/// node starts, peers holding newer configuration bring it up to date. On failure the
/// directory is left as it was.
pub fn restore(
    data_dir: &Path,
    file: &BackupFile,
    passphrase: Option<&str>,
) -> Result<Restored, String> {
    let (contents, values_sealed_with_node_key) = match file {
        BackupFile::Sealed(b) => {
            let passphrase = passphrase.ok_or(
                "this backup is sealed with a passphrase: give it with --passphrase-file FILE",
            )?;
            (b.open(passphrase)?, false)
        }
        BackupFile::V1(b) => (b.contents()?, true),
    };
    let parsed: NodeConfig = toml::from_str(&contents.config_text)
        .map_err(|e| format!("the backup's node file cannot be read: {e}"))?;
    if parsed.node.data_dir != data_dir && !same_dir(&parsed.node.data_dir, data_dir) {
        return Err(format!(
            "the backup is of the node with data directory {}, not {}: restore it there",
            parsed.node.data_dir.display(),
            data_dir.display()
        ));
    }
    refuse_if_running(data_dir)?;
    let mut undo = Undo::default();
    match restore_steps(
        data_dir,
        file.config_path(),
        &contents,
        values_sealed_with_node_key,
        &mut undo,
    ) {
        Ok(mut done) => {
            done.missing_identity = missing_identity(&parsed);
            Ok(done)
        }
        Err(why) => Err(undo.run(why)),
    }
}

/// The advice for a "causeway-backup-1" file where the key it needs is not.
fn needs_origin_key(data_dir: &Path, reason: &str) -> String {
    format!(
        "this {FORMAT_V1} file holds values sealed with the system key of the node it was taken from, and {reason}: copy that node's system.key into {}, or take a new backup with `causeway --node DIR backup --out FILE --passphrase-file FILE`, which restores on any machine",
        data_dir.display()
    )
}

fn restore_steps(
    data_dir: &Path,
    config_path: &Path,
    contents: &Contents,
    values_sealed_with_node_key: bool,
    undo: &mut Undo,
) -> Result<Restored, String> {
    // 1. The directory's system key, made when there is none.
    let key_files = KeyFiles::in_dir(data_dir);
    let had_key = key_files.current.exists() || key_files.next.exists();
    if values_sealed_with_node_key && !had_key {
        return Err(needs_origin_key(
            data_dir,
            &format!("{} has no system.key", data_dir.display()),
        ));
    }
    let created_key = undo.remove_if_created(&key_files.current);
    // Where `KeyFiles` writes a new key before renaming it into place.
    undo.remove_if_created(&key_files.current.with_extension("tmp"));
    let (keyring, _) = key_files
        .load_or_create()
        .map_err(|e| format!("loading the system key of {}: {e}", data_dir.display()))?;

    // 2. The cluster data, sealed with that key.
    let cluster_data = if values_sealed_with_node_key {
        lifecycle::reseal(&contents.cluster_data, Some(&keyring), Some(&keyring)).map_err(|e| {
            needs_origin_key(
                data_dir,
                &format!(
                    "they do not open with the key in {} ({e})",
                    key_files.current.display()
                ),
            )
        })?
    } else {
        lifecycle::reseal(&contents.cluster_data, None, Some(&keyring))?
    };

    // 3. The store, in one transaction. redb keeps one file, no journal or lock files.
    let store_path = data_dir.join("node.redb");
    let created_store = undo.remove_if_created(&store_path);
    let store =
        Arc::new(RedbStore::open(&store_path).map_err(|e| format!("opening the store: {e}"))?);
    if !created_store {
        let rows = lifecycle::dump(store.as_ref())
            .map_err(|e| format!("reading the store before replacing its cluster data: {e}"))?;
        undo.push(UndoStep::PutBack {
            store: store.clone(),
            rows,
        });
    }
    lifecycle::restore(store.as_ref(), &cluster_data, Some(&keyring))?;
    drop(store);

    // 4. The node's file; the one it replaces is kept beside it.
    let path = config_path.to_path_buf();
    let current = match std::fs::read(&path) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let mut previous_config = None;
    if current.as_deref() != Some(contents.config_text.as_bytes()) {
        if current.is_some() {
            let kept = path.with_extension("toml.before-restore");
            match std::fs::read(&kept) {
                Ok(bytes) => undo.push(UndoStep::Rewrite {
                    path: kept.clone(),
                    bytes,
                }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("reading {}: {e}", kept.display())),
            }
            std::fs::rename(&path, &kept)
                .map_err(|e| format!("keeping {} as {}: {e}", path.display(), kept.display()))?;
            undo.push(UndoStep::MoveBack {
                from: kept.clone(),
                to: path.clone(),
            });
            previous_config = Some(kept);
        }
        undo.remove_if_created(&path);
        std::fs::write(&path, &contents.config_text)
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(Restored {
        rows: cluster_data.rows(),
        config_path: path,
        previous_config,
        created_system_key: created_key.then(|| key_files.current.clone()),
        created_store: created_store.then_some(store_path),
        missing_identity: Vec::new(),
    })
}

/// The certificate, key and CA the node's file names that are not on disk, when the node
/// needs them (it clusters, or serves HTTPS): it refuses to start without them.
fn missing_identity(config: &NodeConfig) -> Vec<PathBuf> {
    let needs_tls = !config.cluster.peers.is_empty() || config.admin.https_listen.is_some();
    if !needs_tls {
        return Vec::new();
    }
    [
        &config.tls.certificate,
        &config.tls.private_key,
        &config.tls.ca,
    ]
    .into_iter()
    .map(|p| config.data_path(p))
    .filter(|p| !p.exists())
    .collect()
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use causeway_replication::{
        config_stream, Change, Engine, EngineSettings, NoObserver, PeerLink,
    };
    use causeway_store::MemoryStore;

    use super::*;

    const PASSPHRASE: &str = "correct horse battery staple";
    /// Tests derive with fewer iterations than a real backup: the count is read from the
    /// file, so the code that opens it is the same.
    const FAST: u32 = 1_000;
    const VALUES: &[(&str, &[u8])] = &[
        ("sip.domains", b"example.com"),
        ("sip.users.alice", b"Sup3rSecretPw"),
        ("limits.calls.max", b"9"),
    ];

    struct Alone;
    impl PeerLink for Alone {
        fn send(&self, _: usize, _: bytes::Bytes) -> bool {
            false
        }
        fn active_peers(&self) -> Vec<usize> {
            Vec::new()
        }
    }

    /// The node a backup is taken from: its file in `data_dir`, a store holding `VALUES`
    /// sealed with its system key (key A).
    struct Origin {
        _tmp: tempfile::TempDir,
        data_dir: PathBuf,
        config: NodeConfig,
        store: Arc<MemoryStore>,
        keyring: Arc<Keyring>,
        node_id: u64,
    }

    async fn origin() -> Origin {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("node");
        std::fs::create_dir(&data_dir).unwrap();
        let source = data_dir.join("causeway.toml");
        let text = format!(
            "[node]\nsystem_name = \"peer2\"\naddress = \"127.0.0.2\"\ndata_dir = \"{}\"\n\n[cluster]\nname = \"test.lab.example\"\npeers = [\"127.0.0.1\", \"127.0.0.2\"]\n",
            data_dir.display()
        );
        std::fs::write(&source, &text).unwrap();
        let mut config: NodeConfig = toml::from_str(&text).unwrap();
        config.source = source;
        let keyring = Arc::new(KeyFiles::in_dir(&data_dir).load_or_create().unwrap().0);
        let store = Arc::new(MemoryStore::new());
        let mut settings = EngineSettings::new(1, 1, 1);
        settings.keyring = Some(keyring.clone());
        let engine = Engine::open(
            settings,
            store.clone(),
            Arc::new(Alone),
            Arc::new(NoObserver),
        )
        .unwrap();
        let changes = VALUES
            .iter()
            .map(|(k, v)| Change {
                key: k.to_string(),
                value: Some(v.to_vec()),
            })
            .collect();
        engine.write(&config_stream(), changes).await.unwrap();
        let raw = lifecycle::dump(store.as_ref()).unwrap();
        assert!(!holds(&raw, b"Sup3rSecretPw"), "sealed with key A");
        Origin {
            _tmp: tmp,
            data_dir,
            config,
            store,
            keyring,
            node_id: engine.node_id(),
        }
    }

    impl Origin {
        fn backup(&self) -> Backup {
            Backup::take_with(
                &self.config,
                self.store.as_ref(),
                Some(&self.keyring),
                PASSPHRASE,
                FAST,
            )
            .unwrap()
        }

        /// The replacement machine: the same data directory, holding only the node's
        /// certificate, key and CA.
        fn replace_machine(&self) {
            std::fs::remove_dir_all(&self.data_dir).unwrap();
            std::fs::create_dir(&self.data_dir).unwrap();
            for name in ["node.crt", "node.key", "ca.crt"] {
                std::fs::write(self.data_dir.join(name), format!("PEM of {name}")).unwrap();
            }
        }
    }

    fn holds(dump: &Dump, needle: &[u8]) -> bool {
        dump.tables
            .iter()
            .flat_map(|(_, rows)| rows)
            .any(|(_, v)| v.windows(needle.len()).any(|w| w == needle))
    }

    /// Every file in `dir`, with its bytes (`None` for a directory).
    fn listing(dir: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let bytes = e
                    .file_type()
                    .unwrap()
                    .is_file()
                    .then(|| std::fs::read(e.path()).unwrap());
                (e.file_name().to_string_lossy().into_owned(), bytes)
            })
            .collect()
    }

    fn as_file(backup: &Backup) -> BackupFile {
        BackupFile::parse(&serde_json::to_string_pretty(backup).unwrap()).unwrap()
    }

    /// The values a store holds and its node id, read as the node does, with `keyring`.
    /// The engine keeps the store open after: call it last.
    fn read_as_node(data_dir: &Path, keyring: Arc<Keyring>) -> (Vec<Option<Vec<u8>>>, u64) {
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&data_dir.join("node.redb")).unwrap());
        let mut settings = EngineSettings::new(1, 1, 1);
        settings.keyring = Some(keyring);
        let engine = Engine::open(settings, store, Arc::new(Alone), Arc::new(NoObserver)).unwrap();
        let values = VALUES
            .iter()
            .map(|(k, _)| engine.get(&config_stream(), k))
            .collect();
        (values, engine.node_id())
    }

    fn expected_values() -> Vec<Option<Vec<u8>>> {
        VALUES.iter().map(|(_, v)| Some(v.to_vec())).collect()
    }

    #[tokio::test]
    async fn a_backup_restores_on_a_fresh_directory_with_another_key_and_every_value_reads_back() {
        let o = origin().await;
        let node_file = std::fs::read_to_string(&o.config.source).unwrap();
        let backup =
            Backup::take(&o.config, o.store.as_ref(), Some(&o.keyring), PASSPHRASE).unwrap();
        assert_eq!(backup.format, FORMAT);
        assert_eq!(backup.kdf.iterations, KDF_ITERATIONS);
        let text = serde_json::to_string_pretty(&backup).unwrap();
        for clear in ["Sup3rSecretPw", "example.com", "test.lab.example"] {
            assert!(!text.contains(clear), "{clear} is in the file in clear");
        }
        o.replace_machine();

        let done = restore(&o.data_dir, &as_file(&backup), Some(PASSPHRASE)).unwrap();
        assert_eq!(done.config_path, o.config.source);
        assert_eq!(done.previous_config, None);
        assert_eq!(done.created_system_key, Some(o.data_dir.join("system.key")));
        assert_eq!(done.created_store, Some(o.data_dir.join("node.redb")));
        assert_eq!(done.missing_identity, Vec::<PathBuf>::new());
        assert_eq!(
            std::fs::read_to_string(&o.config.source).unwrap(),
            node_file
        );
        let key_b = Arc::new(KeyFiles::in_dir(&o.data_dir).load_or_create().unwrap().0);
        assert_ne!(key_b.current_id(), o.keyring.current_id(), "a new key");
        let store = RedbStore::open(&o.data_dir.join("node.redb")).unwrap();
        let raw = lifecycle::dump(&store).unwrap();
        assert!(!holds(&raw, b"Sup3rSecretPw"), "sealed at rest again");
        assert!(
            causeway_replication::check_store(&store, Some(&o.keyring)).is_err(),
            "sealed with key B, not A"
        );
        drop(store);
        let (values, node_id) = read_as_node(&o.data_dir, key_b);
        assert_eq!(values, expected_values());
        assert_eq!(node_id, o.node_id, "the node's identity in the cluster too");
    }

    #[tokio::test]
    async fn a_wrong_passphrase_an_edited_header_or_a_damaged_file_changes_nothing() {
        let o = origin().await;
        let backup = o.backup();
        o.replace_machine();
        let before = listing(&o.data_dir);
        let refused = |file: &BackupFile, passphrase: Option<&str>| {
            let err = restore(&o.data_dir, file, passphrase).unwrap_err();
            assert_eq!(listing(&o.data_dir), before, "{err}");
            err
        };
        let err = refused(&as_file(&backup), Some("not the passphrase at all"));
        assert!(err.contains(DOES_NOT_OPEN), "{err}");
        assert!(!o.data_dir.join("system.key").exists());
        assert!(!o.data_dir.join("node.redb").exists());

        let err = refused(&as_file(&backup), None);
        assert!(err.contains("--passphrase-file"), "{err}");

        let edits: Vec<fn(&mut Backup)> = vec![
            |b| b.system_name = "peer9".into(),
            |b| b.created_unix_ms += 1,
            |b| b.config_path = "/etc/passwd".into(),
            |b| b.rows += 1,
            |b| {
                let mut bytes = base64::engine::general_purpose::STANDARD
                    .decode(&b.sealed)
                    .unwrap();
                let middle = bytes.len() / 2;
                bytes[middle] ^= 1;
                b.sealed = base64::engine::general_purpose::STANDARD.encode(bytes);
            },
            |b| b.sealed = "not base64!".into(),
        ];
        for edit in edits {
            let mut edited = backup.clone();
            edit(&mut edited);
            let err = refused(&as_file(&edited), Some(PASSPHRASE));
            assert!(err.contains(DOES_NOT_OPEN), "{err}");
        }

        // The right passphrase into a directory without the node's certificate and key:
        // restored, with word that the node needs them.
        std::fs::remove_dir_all(&o.data_dir).unwrap();
        std::fs::create_dir(&o.data_dir).unwrap();
        let done = restore(&o.data_dir, &as_file(&backup), Some(PASSPHRASE)).unwrap();
        assert_eq!(
            done.missing_identity,
            ["node.crt", "node.key", "ca.crt"]
                .map(|n| o.data_dir.join(n))
                .to_vec()
        );
    }

    #[tokio::test]
    async fn a_restore_that_fails_late_removes_what_it_made_and_puts_back_what_it_replaced() {
        let o = origin().await;
        let backup = o.backup();
        o.replace_machine();
        // The node file cannot be written: a directory stands where it goes.
        std::fs::create_dir(&o.config.source).unwrap();
        let before = listing(&o.data_dir);
        let err = restore(&o.data_dir, &as_file(&backup), Some(PASSPHRASE)).unwrap_err();
        assert!(
            err.contains(&o.config.source.display().to_string()) && err.contains("undone"),
            "{err}"
        );
        assert_eq!(listing(&o.data_dir), before, "no system.key, no node.redb");

        // On a directory that has a key and a store: they stay as they were.
        std::fs::remove_dir(&o.config.source).unwrap();
        restore(&o.data_dir, &as_file(&backup), Some(PASSPHRASE)).unwrap();
        std::fs::remove_file(&o.config.source).unwrap();
        std::fs::create_dir(&o.config.source).unwrap();
        let rows_before = || {
            let store = RedbStore::open(&o.data_dir.join("node.redb")).unwrap();
            lifecycle::dump(&store).unwrap()
        };
        let (before, rows) = (listing(&o.data_dir), rows_before());
        restore(&o.data_dir, &as_file(&backup), Some(PASSPHRASE)).unwrap_err();
        assert_eq!(
            listing(&o.data_dir).get("system.key"),
            before.get("system.key")
        );
        assert_eq!(rows_before(), rows, "the store's rows are put back");

        // A differing node file is kept aside, and moved back (with an older copy kept
        // aside before) when a later step fails. Here nothing fails: it stays aside.
        std::fs::remove_dir(&o.config.source).unwrap();
        std::fs::write(&o.config.source, "# edited\n").unwrap();
        let done = restore(&o.data_dir, &as_file(&backup), Some(PASSPHRASE)).unwrap();
        let kept = o.config.source.with_extension("toml.before-restore");
        assert_eq!(done.previous_config.as_ref(), Some(&kept));
        assert_eq!(std::fs::read_to_string(&kept).unwrap(), "# edited\n");
    }

    #[test]
    fn undo_moves_a_node_file_back_and_rewrites_the_copy_it_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let (file, kept, made) = (
            tmp.path().join("causeway.toml"),
            tmp.path().join("causeway.toml.before-restore"),
            tmp.path().join("system.key"),
        );
        std::fs::write(&file, "current").unwrap();
        std::fs::write(&kept, "older").unwrap();
        let before = listing(tmp.path());
        let mut undo = Undo::default();
        assert!(undo.remove_if_created(&made));
        std::fs::write(&made, "key").unwrap();
        undo.push(UndoStep::Rewrite {
            path: kept.clone(),
            bytes: b"older".to_vec(),
        });
        std::fs::rename(&file, &kept).unwrap();
        undo.push(UndoStep::MoveBack {
            from: kept.clone(),
            to: file.clone(),
        });
        assert!(undo.remove_if_created(&file));
        std::fs::write(&file, "restored").unwrap();
        let said = undo.run("writing failed".into());
        assert!(said.contains("nothing in the directory changed"), "{said}");
        assert_eq!(listing(tmp.path()), before);
    }

    #[tokio::test]
    async fn a_v1_backup_restores_only_where_its_key_is_and_says_what_to_do() {
        let o = origin().await;
        let sealed = lifecycle::dump(o.store.as_ref()).unwrap();
        let v1 = BackupFile::V1(BackupV1 {
            format: FORMAT_V1.into(),
            system_name: "peer2".into(),
            software_version: causeway_common::SOFTWARE_VERSION.into(),
            created_unix_ms: 1,
            config_path: o.config.source.clone(),
            config_text: std::fs::read_to_string(&o.config.source).unwrap(),
            cluster_data: base64::engine::general_purpose::STANDARD
                .encode(postcard::to_stdvec(&sealed).unwrap()),
            rows: sealed.rows(),
        });
        let key_a = std::fs::read(o.data_dir.join("system.key")).unwrap();
        o.replace_machine();
        let what_to_do = |err: &str| {
            err.contains("copy that node's system.key")
                && err.contains("--passphrase-file")
                && err.contains(FORMAT_V1)
        };
        // No key here: none is made.
        let before = listing(&o.data_dir);
        let err = restore(&o.data_dir, &v1, None).unwrap_err();
        assert!(what_to_do(&err), "{err}");
        assert_eq!(listing(&o.data_dir), before);
        // Another key: refused, and the directory keeps it.
        KeyFiles::in_dir(&o.data_dir).load_or_create().unwrap();
        let before = listing(&o.data_dir);
        let err = restore(&o.data_dir, &v1, None).unwrap_err();
        assert!(what_to_do(&err), "{err}");
        assert_eq!(listing(&o.data_dir), before);
        // The key of the node it came from: restored.
        std::fs::write(o.data_dir.join("system.key"), key_a).unwrap();
        let done = restore(&o.data_dir, &v1, None).unwrap();
        assert_eq!(done.created_system_key, None);
        let (values, _) = read_as_node(&o.data_dir, o.keyring.clone());
        assert_eq!(values, expected_values());
    }

    #[test]
    fn a_passphrase_is_read_without_its_newline_and_a_short_one_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("pass");
        std::fs::write(&path, "correct horse battery\n").unwrap();
        assert_eq!(
            read_passphrase_file(&path).unwrap(),
            "correct horse battery"
        );
        std::fs::write(&path, "  spaces kept  \r\n").unwrap();
        assert_eq!(read_passphrase_file(&path).unwrap(), "  spaces kept  ");
        std::fs::write(&path, "\n").unwrap();
        assert!(read_passphrase_file(&path).unwrap_err().contains("empty"));
        let err = check_passphrase("short pass!").unwrap_err();
        assert!(err.contains("11 characters") && err.contains("12"), "{err}");
        assert!(check_passphrase("twelve chars").is_ok());
        assert!(BackupFile::parse("{\"format\": \"causeway-backup-9\"}")
            .unwrap_err()
            .contains("newer version"));
    }
}
