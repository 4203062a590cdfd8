//! The pair's files directory (HA-3, docs/ha.md section 9): the member that does not hold
//! the address keeps a copy of the holder's `files_dir`, pulled over the mesh in 64 KiB
//! chunks, each file written to a temporary name, synced and renamed into place. The
//! configuration and the SIP registrations need no copy of their own: both members are
//! peers of one cluster, whose replication already gives every peer both.
//!
//! Paths from the other side are checked before use: relative, no `..`, no symlinks
//! followed on either side. Caps (beyond them the scan fails and names the file): 256 MiB a
//! file, 100,000 files, 4 GiB in all.

use std::collections::BTreeMap;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use causeway_mesh::rpc::Endpoint;
use serde::{Deserialize, Serialize};

pub const CHUNK: u64 = 64 * 1024;
const MAX_FILE: u64 = 256 << 20;
const MAX_FILES: usize = 100_000;
const MAX_TOTAL: u64 = 4 << 30;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the files directory, `/`-separated.
    pub path: String,
    pub size: u64,
    pub mode: u32,
    pub sha256: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChunkRequest {
    pub path: String,
    pub offset: u64,
}

/// "Your files, please." Answered only by the holder of the pair's lease, or, for a
/// primary in recovery mode, by its secondary: a member that merely held the address once
/// (a primary restarted empty) must never be copied from.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct IndexRequest {
    pub recovery: bool,
}

pub fn index(pair: usize) -> Endpoint<IndexRequest, Vec<FileEntry>> {
    Endpoint::new(format!("ha/files/{pair}/index"))
}

pub fn chunk(pair: usize) -> Endpoint<ChunkRequest, Vec<u8>> {
    Endpoint::new(format!("ha/files/{pair}/chunk"))
}

/// A path from the other side, made safe to join onto the files directory.
pub fn safe_relative(path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    if path.is_empty() || p.is_absolute() {
        return Err(format!("'{path}' is not a relative path"));
    }
    for c in p.components() {
        if !matches!(c, Component::Normal(_)) {
            return Err(format!("'{path}' leaves the files directory"));
        }
    }
    Ok(p.to_path_buf())
}

fn hex(digest: ring::digest::Digest) -> String {
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of `bytes`, as the index writes it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes))
}

fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; CHUNK as usize];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex(ctx.finish()))
}

/// Scans a files directory, hashing only files whose size or modification time changed
/// since the last scan.
#[derive(Default)]
pub struct Scanner {
    cache: Mutex<BTreeMap<String, (u64, SystemTime, String)>>,
}

impl Scanner {
    pub fn scan(&self, dir: &Path) -> Result<Vec<FileEntry>, String> {
        use std::os::unix::fs::PermissionsExt as _;
        let mut out = vec![];
        let mut total = 0u64;
        let mut stack = vec![PathBuf::new()];
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = BTreeMap::new();
        while let Some(rel) = stack.pop() {
            let entries = match std::fs::read_dir(dir.join(&rel)) {
                Ok(e) => e,
                Err(e)
                    if rel.as_os_str().is_empty() && e.kind() == std::io::ErrorKind::NotFound =>
                {
                    return Ok(vec![]);
                }
                Err(e) => return Err(format!("reading {}: {e}", dir.join(&rel).display())),
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                // Our own temporary files, mid-copy.
                if name.ends_with(".cw-tmp") {
                    continue;
                }
                let rel_path = rel.join(&*name);
                // symlink_metadata: a link is neither followed nor copied.
                let Ok(meta) = entry.path().symlink_metadata() else {
                    continue;
                };
                if meta.is_dir() {
                    stack.push(rel_path);
                    continue;
                }
                if !meta.is_file() {
                    continue;
                }
                let key = rel_path.to_string_lossy().to_string();
                if meta.len() > MAX_FILE {
                    return Err(format!(
                        "{key} is {} bytes: over the 256 MiB a file that HA replicates",
                        meta.len()
                    ));
                }
                total += meta.len();
                if total > MAX_TOTAL || out.len() >= MAX_FILES {
                    return Err(format!(
                        "the files directory passes 4 GiB or 100,000 files at {key}"
                    ));
                }
                let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                let sha = match cache.get(&key) {
                    Some((size, t, sha)) if *size == meta.len() && *t == mtime => sha.clone(),
                    _ => sha256_of(&entry.path())
                        .map_err(|e| format!("reading {}: {e}", entry.path().display()))?,
                };
                seen.insert(key.clone(), (meta.len(), mtime, sha.clone()));
                out.push(FileEntry {
                    path: key,
                    size: meta.len(),
                    mode: meta.permissions().mode() & 0o7777,
                    sha256: sha,
                });
            }
        }
        *cache = seen;
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }
}

/// Reads one chunk of a file for the other side.
pub fn read_chunk(dir: &Path, req: &ChunkRequest) -> Result<Vec<u8>, String> {
    let rel = safe_relative(&req.path)?;
    let path = dir.join(rel);
    let meta = path
        .symlink_metadata()
        .map_err(|e| format!("{}: {e}", req.path))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", req.path));
    }
    let mut f = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", req.path))?;
    f.seek(std::io::SeekFrom::Start(req.offset))
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(CHUNK as usize);
    f.take(CHUNK)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    Ok(buf)
}

/// What a pass must do to make `local` equal `remote`: files to fetch, files to delete.
pub fn plan(remote: &[FileEntry], local: &[FileEntry]) -> (Vec<FileEntry>, Vec<String>) {
    let mine: BTreeMap<&str, &FileEntry> = local.iter().map(|f| (f.path.as_str(), f)).collect();
    let theirs: BTreeMap<&str, &FileEntry> = remote.iter().map(|f| (f.path.as_str(), f)).collect();
    let fetch = remote
        .iter()
        .filter(|r| {
            mine.get(r.path.as_str())
                .is_none_or(|l| l.sha256 != r.sha256)
        })
        .cloned()
        .collect();
    let delete = local
        .iter()
        .filter(|l| !theirs.contains_key(l.path.as_str()))
        .map(|l| l.path.clone())
        .collect();
    (fetch, delete)
}

/// Writes a fetched file: a temporary name in the same directory, synced, then renamed.
pub fn install(dir: &Path, entry: &FileEntry, bytes: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let rel = safe_relative(&entry.path)?;
    let path = dir.join(&rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    let tmp = path.with_file_name(format!(
        ".{}.cw-tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(entry.mode & 0o777))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Removes a file the holder no longer has.
pub fn remove(dir: &Path, path: &str) -> Result<(), String> {
    let rel = safe_relative(path)?;
    match std::fs::remove_file(dir.join(rel)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("removing {path}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_from_the_other_side_cannot_leave_the_directory() {
        assert!(safe_relative("a/b.txt").is_ok());
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "./a"] {
            assert!(safe_relative(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_copy_follows_the_source_through_adds_changes_and_deletions() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("sub")).unwrap();
        std::fs::write(src.path().join("a.txt"), b"one").unwrap();
        std::fs::write(
            src.path().join("sub/big.bin"),
            vec![7u8; 3 * CHUNK as usize + 5],
        )
        .unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.path().join("link")).unwrap();
        std::fs::write(dst.path().join("stale.txt"), b"old").unwrap();
        let (s, d) = (Scanner::default(), Scanner::default());
        let sync = || {
            let remote = s.scan(src.path()).unwrap();
            let (fetch, delete) = plan(&remote, &d.scan(dst.path()).unwrap());
            for f in &fetch {
                let mut bytes = vec![];
                while (bytes.len() as u64) < f.size {
                    let req = ChunkRequest {
                        path: f.path.clone(),
                        offset: bytes.len() as u64,
                    };
                    bytes.extend(read_chunk(src.path(), &req).unwrap());
                }
                install(dst.path(), f, &bytes).unwrap();
            }
            for p in &delete {
                remove(dst.path(), p).unwrap();
            }
            (fetch.len(), delete.len())
        };
        assert_eq!(sync(), (2, 1));
        assert_eq!(s.scan(src.path()).unwrap(), d.scan(dst.path()).unwrap());
        assert!(!dst.path().join("link").exists(), "a symlink was followed");
        assert_eq!(sync(), (0, 0), "nothing to do once equal");
        std::fs::write(src.path().join("a.txt"), b"two!").unwrap();
        std::fs::remove_file(src.path().join("sub/big.bin")).unwrap();
        assert_eq!(sync(), (1, 1));
        assert_eq!(std::fs::read(dst.path().join("a.txt")).unwrap(), b"two!");
    }
}
