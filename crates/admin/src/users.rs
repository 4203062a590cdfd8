//! Admin users for the HTTPS API: `<data_dir>/admin-users.json`, PBKDF2-HMAC-SHA256 hashes.
//! With no file there is no user, and every HTTPS request is refused.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use ring::pbkdf2;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

const ITERATIONS: u32 = 100_000;
const MIN_PASSWORD: usize = 10;

#[derive(Serialize, Deserialize, Clone)]
struct StoredUser {
    salt: String,
    hash: String,
    iterations: u32,
}

#[derive(Serialize, Deserialize, Default)]
struct UsersFile {
    users: BTreeMap<String, StoredUser>,
}

pub fn users_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin-users.json")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// Sets (or replaces) `user`'s password.
pub fn set_password(data_dir: &Path, user: &str, password: &str) -> anyhow::Result<()> {
    if user.is_empty()
        || !user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        anyhow::bail!("user name '{user}' must be letters, digits, '-', '_' or '.'");
    }
    if password.chars().count() < MIN_PASSWORD {
        anyhow::bail!("the password must have at least {MIN_PASSWORD} characters");
    }
    let path = users_path(data_dir);
    let mut file: UsersFile = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("reading {}: not a users file", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => UsersFile::default(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut salt = [0u8; 16];
    SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
    let mut hash = [0u8; 32];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        NonZeroU32::new(ITERATIONS).expect("non-zero"),
        &salt,
        password.as_bytes(),
        &mut hash,
    );
    file.users.insert(
        user.to_string(),
        StoredUser {
            salt: hex(&salt),
            hash: hex(&hash),
            iterations: ITERATIONS,
        },
    );
    let tmp = path.with_extension("json.tmp");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(&file)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))
}

/// The outcome of one login attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Login {
    /// No user is configured on this node (no file, an unreadable one, or an empty one).
    NoUsers,
    Accepted,
    Refused,
}

fn load(data_dir: &Path) -> Option<UsersFile> {
    let bytes = std::fs::read(users_path(data_dir)).ok()?;
    serde_json::from_slice::<UsersFile>(&bytes).ok()
}

impl StoredUser {
    fn matches(&self, password: &str) -> bool {
        let (Some(salt), Some(hash), Some(iterations)) = (
            unhex(&self.salt),
            unhex(&self.hash),
            NonZeroU32::new(self.iterations),
        ) else {
            return false;
        };
        pbkdf2::verify(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            password.as_bytes(),
            &hash,
        )
        .is_ok()
    }
}

/// Checks `user`/`password` with one read of the users file.
pub fn check(data_dir: &Path, user: &str, password: &str) -> Login {
    let Some(file) = load(data_dir).filter(|f| !f.users.is_empty()) else {
        return Login::NoUsers;
    };
    if file.users.get(user).is_some_and(|u| u.matches(password)) {
        Login::Accepted
    } else {
        Login::Refused
    }
}

/// Whether `user`/`password` is valid.
pub fn verify(data_dir: &Path, user: &str, password: &str) -> bool {
    check(data_dir, user, password) == Login::Accepted
}

pub fn has_users(data_dir: &Path) -> bool {
    load(data_dir).is_some_and(|f| !f.users.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_and_weak_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!has_users(dir.path()));
        assert!(!verify(dir.path(), "admin", ""));
        assert!(set_password(dir.path(), "admin", "short")
            .unwrap_err()
            .to_string()
            .contains("at least 10"));
        set_password(dir.path(), "admin", "correct horse battery").unwrap();
        assert!(has_users(dir.path()));
        assert!(verify(dir.path(), "admin", "correct horse battery"));
        assert!(!verify(dir.path(), "admin", "correct horse battery!"));
        assert!(!verify(dir.path(), "root", "correct horse battery"));
    }
}
