//! The node's system key (EX-14): every replicated value is sealed with it at rest
//! (AES-256-GCM), so a copy of the store file reveals no secret without the key (a backup
//! holds the values sealed with the operator's passphrase instead, `causeway_cluster::backup`). The hash peers compare is over the plain values, so peers with different keys agree.
//!
//! Sealed value: `[key id: 4][nonce: 12][ciphertext + tag]`. The key id (the first bytes of
//! the key's SHA-256) picks the key, so a store half-way through a key change stays readable.

use std::fmt;
use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

pub type KeyId = [u8; 4];

pub struct SystemKey {
    id: KeyId,
    key: LessSafeKey,
}

impl SystemKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<SystemKey, String> {
        let unbound = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| format!("a system key is 32 bytes, this one is {}", bytes.len()))?;
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let mut id = [0u8; 4];
        id.copy_from_slice(&digest.as_ref()[..4]);
        Ok(SystemKey {
            id,
            key: LessSafeKey::new(unbound),
        })
    }

    pub fn id(&self) -> KeyId {
        self.id
    }
}

/// The key values are sealed with, and older keys still accepted when reading.
pub struct Keyring {
    current: SystemKey,
    older: Vec<SystemKey>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keyring(current {})", hex(&self.current.id))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Keyring {
    pub fn new(current: SystemKey, older: Vec<SystemKey>) -> Keyring {
        Keyring { current, older }
    }

    pub fn current_id(&self) -> String {
        hex(&self.current.id)
    }

    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let nonce = fresh_nonce();
        let mut out = Vec::with_capacity(4 + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&self.current.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        match self.current.key.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::empty(),
            &mut out[4 + NONCE_LEN..],
        ) {
            Ok(tag) => out.extend_from_slice(tag.as_ref()),
            Err(_) => out.truncate(0),
        }
        out
    }

    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, String> {
        if sealed.len() < 4 + NONCE_LEN + 16 {
            return Err("a sealed value is too short".into());
        }
        let (id, rest) = sealed.split_at(4);
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let key = std::iter::once(&self.current)
            .chain(&self.older)
            .find(|k| k.id == id)
            .ok_or_else(|| {
                format!(
                    "a value is sealed with system key {}, which this node does not have",
                    hex(id)
                )
            })?;
        let mut nonce_bytes = [0u8; NONCE_LEN];
        nonce_bytes.copy_from_slice(nonce);
        let mut buf = body.to_vec();
        let plain = key
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::empty(),
                &mut buf,
            )
            .map_err(|_| "a sealed value fails its integrity check".to_string())?;
        Ok(plain.to_vec())
    }
}

/// Random bytes drawn from the OS a pool at a time: one `getrandom` call per value sealed
/// was a system call per REGISTER (each binding is sealed at rest). The pool is as random
/// as the OS source; each nonce is taken out of it once.
const NONCE_POOL: usize = 85 * NONCE_LEN;

thread_local! {
    static NONCES: std::cell::RefCell<([u8; NONCE_POOL], usize)> =
        const { std::cell::RefCell::new(([0; NONCE_POOL], NONCE_POOL)) };
}

/// A nonce never used before under any key: a nonce must never repeat under one key.
fn fresh_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    let drawn = NONCES.with(|pool| {
        let (bytes, used) = &mut *pool.borrow_mut();
        if *used + NONCE_LEN > NONCE_POOL {
            SystemRandom::new().fill(bytes).ok()?;
            *used = 0;
        }
        nonce.copy_from_slice(&bytes[*used..*used + NONCE_LEN]);
        // Taken bytes are wiped, so a failed refill can never hand them out again.
        bytes[*used..*used + NONCE_LEN].fill(0);
        *used += NONCE_LEN;
        Some(())
    });
    if drawn.is_none() {
        // SystemRandom fails only without an OS random source; then the clock and a
        // counter still make the nonce unique.
        tracing::error!(target: "developer.replication", "No random source: sealing with a clock-and-counter nonce");
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        nonce[..8].copy_from_slice(&nanos.to_be_bytes());
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        nonce[8..].copy_from_slice(&n.to_be_bytes());
    }
    nonce
}

/// `data_dir/system.key`, and `system.key.new` while a key change is under way.
pub struct KeyFiles {
    pub current: PathBuf,
    pub next: PathBuf,
}

impl KeyFiles {
    pub fn in_dir(data_dir: &Path) -> KeyFiles {
        KeyFiles {
            current: data_dir.join("system.key"),
            next: data_dir.join("system.key.new"),
        }
    }

    /// Loads the keyring, creating the key on first start. A `system.key.new` left by an
    /// interrupted key change becomes the current key (the caller re-seals and finishes).
    /// Returns the keyring and whether a key change must be finished.
    pub fn load_or_create(&self) -> Result<(Keyring, bool), String> {
        // A key being written when the process died is not a key yet (it is used only once
        // renamed into place): what is left of it goes.
        for path in [&self.current, &self.next] {
            let _ = std::fs::remove_file(path.with_extension("tmp"));
        }
        let read = |p: &Path| -> Result<Option<SystemKey>, String> {
            match std::fs::read(p) {
                Ok(b) => SystemKey::from_bytes(&b)
                    .map(Some)
                    .map_err(|e| format!("{}: {e}", p.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("reading {}: {e}", p.display())),
            }
        };
        let current = read(&self.current)?;
        let next = read(&self.next)?;
        match (current, next) {
            (Some(cur), Some(next)) => Ok((Keyring::new(next, vec![cur]), true)),
            (None, Some(next)) => Ok((Keyring::new(next, Vec::new()), true)),
            (Some(cur), None) => Ok((Keyring::new(cur, Vec::new()), false)),
            (None, None) => {
                let key = write_new_key(&self.current)?;
                Ok((Keyring::new(key, Vec::new()), false))
            }
        }
    }

    /// Writes a fresh key to `system.key.new` and returns the keyring to re-seal with.
    pub fn begin_change(&self) -> Result<Keyring, String> {
        let next = write_new_key(&self.next)?;
        let older = match std::fs::read(&self.current) {
            Ok(b) => vec![SystemKey::from_bytes(&b)?],
            Err(_) => Vec::new(),
        };
        Ok(Keyring::new(next, older))
    }

    /// After every value is re-sealed: the new key becomes `system.key`.
    pub fn finish_change(&self) -> Result<(), String> {
        std::fs::rename(&self.next, &self.current).map_err(|e| {
            format!(
                "renaming {} to {}: {e}",
                self.next.display(),
                self.current.display()
            )
        })
    }
}

fn write_new_key(path: &Path) -> Result<SystemKey, String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "no random source to make a system key".to_string())?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    f.write_all(&bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("writing {}: {e}", path.display()))?;
    SystemKey::from_bytes(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_half_written_key_left_by_a_crash_is_removed_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let files = KeyFiles::in_dir(dir.path());
        let (first, _) = files.load_or_create().unwrap();
        let leftovers = [
            files.current.with_extension("tmp"),
            files.next.with_extension("tmp"),
        ];
        for p in &leftovers {
            std::fs::write(p, b"half").unwrap();
        }
        let (again, pending) = files.load_or_create().unwrap();
        assert_eq!(
            again.current_id(),
            first.current_id(),
            "the key is unchanged"
        );
        assert!(!pending);
        for p in &leftovers {
            assert!(!p.exists(), "{} removed", p.display());
        }
    }

    #[test]
    fn sealed_values_open_with_the_same_or_an_older_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let files = KeyFiles::in_dir(dir.path());
        let (ring, pending) = files.load_or_create().unwrap();
        assert!(!pending);
        let sealed = ring.seal(b"s3cret");
        assert!(!sealed.windows(6).any(|w| w == b"s3cret"), "not in clear");
        assert_eq!(ring.open(&sealed).unwrap(), b"s3cret");
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(ring.open(&flipped).unwrap_err().contains("integrity"));

        let next = files.begin_change().unwrap();
        assert_eq!(
            next.open(&sealed).unwrap(),
            b"s3cret",
            "old values stay readable"
        );
        // Interrupted here: the next start takes system.key.new and finishes.
        let (resumed, pending) = files.load_or_create().unwrap();
        assert!(pending);
        assert_eq!(resumed.current_id(), next.current_id());
        files.finish_change().unwrap();
        let (after, pending) = files.load_or_create().unwrap();
        assert!(!pending);
        let resealed = after.seal(b"s3cret");
        assert_eq!(next.open(&resealed).unwrap(), b"s3cret");
        assert!(after.open(&sealed).unwrap_err().contains("does not have"));
    }

    /// Nonces come from a pool refilled from the OS: across refills and threads, none
    /// repeats, and none is the all-zero filler a taken slot is wiped to.
    #[test]
    fn nonces_never_repeat_across_pool_refills_and_threads() {
        let draw = || (0..1000).map(|_| fresh_nonce()).collect::<Vec<_>>();
        let other = std::thread::spawn(draw);
        let mut all = draw();
        all.extend(other.join().unwrap());
        let distinct: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), 2000, "a nonce repeated");
        assert!(!distinct.contains(&[0u8; NONCE_LEN]));
        // The sealed layout is unchanged: [key id][nonce][ciphertext + tag], so values
        // sealed by either build open with the other.
        let dir = tempfile::tempdir().unwrap();
        let (ring, _) = KeyFiles::in_dir(dir.path()).load_or_create().unwrap();
        let sealed = ring.seal(b"value");
        assert_eq!(sealed.len(), 4 + NONCE_LEN + 5 + 16);
        assert_eq!(&sealed[..4], &ring.current.id);
        assert_eq!(ring.open(&sealed).unwrap(), b"value");
    }
}
