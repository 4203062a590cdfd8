//! PostgreSQL's programs: where they are, which OS user runs them, and running the short
//! ones (`initdb`, `pg_basebackup`, `pg_rewind`, `pg_controldata`) with a deadline.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use tokio::io::AsyncReadExt;

/// The major version Causeway runs (its configuration and `pg_rewind` rules are for it).
pub const MAJOR: u32 = 15;

/// Where the binaries are and whom they run as.
#[derive(Clone, Debug)]
pub struct Tools {
    pub bin_dir: PathBuf,
    /// (uid, gid) of the `postgres` OS user when the agent runs as root (PostgreSQL refuses
    /// to run as root); `None` runs them as the agent's own user.
    pub run_as: Option<(u32, u32)>,
    /// The OS user name PostgreSQL runs as (`pg_ident.conf` maps it).
    pub os_user: String,
}

impl Tools {
    /// Finds PostgreSQL 15: `bin_dir` when given, else `pg_config --bindir`, else
    /// /usr/lib/postgresql/15/bin. The error names the package to install.
    pub fn find(bin_dir: Option<&Path>) -> anyhow::Result<Tools> {
        let candidates: Vec<PathBuf> = match bin_dir {
            Some(d) => vec![d.to_path_buf()],
            None => {
                let mut c = vec![PathBuf::from(format!("/usr/lib/postgresql/{MAJOR}/bin"))];
                if let Ok(out) = std::process::Command::new("pg_config")
                    .arg("--bindir")
                    .stderr(Stdio::null())
                    .output()
                {
                    let d = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    if out.status.success() && !d.is_empty() {
                        c.push(PathBuf::from(d));
                    }
                }
                c
            }
        };
        let mut found_other = None;
        for dir in &candidates {
            let postgres = dir.join("postgres");
            if !postgres.is_file() {
                continue;
            }
            let out = std::process::Command::new(&postgres)
                .arg("--version")
                .output()
                .with_context(|| format!("running {} --version", postgres.display()))?;
            let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
            // "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
            let major = version
                .split_whitespace()
                .nth(2)
                .and_then(|v| v.split('.').next())
                .and_then(|m| m.parse::<u32>().ok());
            if major == Some(MAJOR) {
                let (run_as, os_user) = os_user()?;
                return Ok(Tools {
                    bin_dir: dir.clone(),
                    run_as,
                    os_user,
                });
            }
            found_other = Some(format!("{} is '{version}'", postgres.display()));
        }
        match found_other {
            Some(other) => bail!(
                "PostgreSQL {MAJOR} is needed and {other}: install the Debian package postgresql-{MAJOR} (apt-get install postgresql-{MAJOR}), or set bin_dir in the [database] section of the node file"
            ),
            None => bail!(
                "PostgreSQL {MAJOR} is not installed on this node (no postgres in {}{}): install the Debian package postgresql-{MAJOR} (apt-get install postgresql-{MAJOR}), or set bin_dir in the [database] section of the node file",
                candidates[0].display(),
                if bin_dir.is_none() { ", and no pg_config on PATH" } else { "" }
            ),
        }
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// A command for `program` as the PostgreSQL OS user, in its own process group, with
    /// no terminal.
    pub fn command(&self, program: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(self.bin(program));
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        c.process_group(0)
            .stdin(Stdio::null())
            .env_remove("NOTIFY_SOCKET")
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .env_remove("PGDATA")
            .env("LC_ALL", "C")
            .kill_on_drop(true);
        c
    }

    /// Gives `path` (a file or a directory) to the PostgreSQL OS user, mode `mode`.
    pub fn own(&self, path: &Path, mode: u32) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("giving {} to the postgres user", path.display()))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", path.display()))
    }

    /// Runs `program args` to its end within `deadline`; `progress` sees each line (or
    /// `\r`-ended piece) of its standard error as it comes. Fails with the tail of stderr.
    pub async fn run(
        &self,
        program: &str,
        args: &[String],
        deadline: Duration,
        mut progress: impl FnMut(&str) + Send,
    ) -> anyhow::Result<String> {
        let mut cmd = self.command(program);
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin(program).display()))?;
        let mut stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let work = async {
            let mut out = Vec::new();
            let mut err_all = String::new();
            let mut buf = [0u8; 4096];
            let read_out = async {
                let _ = stdout.read_to_end(&mut out).await;
                out
            };
            let read_err = async {
                let mut pending = String::new();
                loop {
                    match stderr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            pending.push_str(&String::from_utf8_lossy(&buf[..n]));
                            while let Some(i) = pending.find(['\n', '\r']) {
                                let line: String = pending.drain(..=i).collect();
                                let line = line.trim();
                                if !line.is_empty() {
                                    progress(line);
                                    if err_all.len() < 64 << 10 {
                                        err_all.push_str(line);
                                        err_all.push('\n');
                                    }
                                }
                            }
                        }
                    }
                }
                err_all.push_str(&pending);
                err_all
            };
            let (out, err) = tokio::join!(read_out, read_err);
            let status = child.wait().await;
            (out, err, status)
        };
        let (out, err, status) = tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| anyhow!("{program} did not finish within {} s", deadline.as_secs()))?;
        let status = status.with_context(|| format!("waiting for {program}"))?;
        if !status.success() {
            let tail: Vec<&str> = err.lines().rev().take(4).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("{program} failed ({status}): {}", tail.join(" / "));
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// The `postgres` OS user when running as root; else the agent's own user.
fn os_user() -> anyhow::Result<(Option<(u32, u32)>, String)> {
    let me = nix::unistd::Uid::effective();
    if me.is_root() {
        let user = nix::unistd::User::from_name("postgres")
            .context("looking up the postgres OS user")?
            .ok_or_else(|| {
                anyhow!("there is no postgres OS user (PostgreSQL refuses to run as root): install the Debian package postgresql-{MAJOR}, which creates it")
            })?;
        Ok((
            Some((user.uid.as_raw(), user.gid.as_raw())),
            "postgres".into(),
        ))
    } else {
        let name = nix::unistd::User::from_uid(me)
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| me.to_string());
        Ok((None, name))
    }
}

/// A path the PostgreSQL OS user cannot reach: the first ancestor of `dir` without search
/// permission for others, when PostgreSQL runs as another user.
pub fn unreachable_ancestor(tools: &Tools, dir: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let (uid, _) = tools.run_as?;
    let mut p = dir.to_path_buf();
    let mut ancestors = vec![];
    while let Some(parent) = p.parent() {
        ancestors.push(parent.to_path_buf());
        p = parent.to_path_buf();
    }
    ancestors
        .into_iter()
        .rev()
        .find(|a| std::fs::metadata(a).is_ok_and(|m| m.uid() != uid && m.mode() & 0o001 == 0))
}

/// Interface name or address → the IPv4/IPv6 address PostgreSQL listens on.
pub fn interface_address(interface: &str) -> anyhow::Result<std::net::IpAddr> {
    if let Ok(ip) = interface
        .trim_matches(['<', '>'])
        .parse::<std::net::IpAddr>()
    {
        let ours = nix::ifaddrs::getifaddrs()
            .map(|addrs| {
                addrs.filter_map(|a| a.address).any(|sa| {
                    sa.as_sockaddr_in().map(|s| std::net::IpAddr::V4(s.ip())) == Some(ip)
                        || sa.as_sockaddr_in6().map(|s| std::net::IpAddr::V6(s.ip())) == Some(ip)
                })
            })
            .unwrap_or(false);
        // Loopback addresses other than 127.0.0.1 are all this host's (the lab uses them).
        if ours || ip.is_loopback() {
            return Ok(ip);
        }
        bail!("address '{interface}' is not one of this node's interfaces");
    }
    let addrs = nix::ifaddrs::getifaddrs().context("listing the interfaces")?;
    let mut v6 = None;
    for a in addrs.filter(|a| a.interface_name == interface) {
        if let Some(sa) = a.address {
            if let Some(s) = sa.as_sockaddr_in() {
                return Ok(std::net::IpAddr::V4(s.ip()));
            }
            if let Some(s) = sa.as_sockaddr_in6() {
                v6.get_or_insert(std::net::IpAddr::V6(s.ip()));
            }
        }
    }
    v6.ok_or_else(|| anyhow!("interface '{interface}' does not exist on this node"))
}
