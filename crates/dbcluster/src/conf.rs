//! The files PostgreSQL reads, written by Causeway: `postgresql.causeway.conf` (included
//! last by `postgresql.conf`), `pg_hba.conf`, `pg_ident.conf`, `standby.signal`; and where
//! everything lives under the node's data directory.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::tools::Tools;

const INCLUDE: &str = "include 'postgresql.causeway.conf'";
pub const CONF_FILE: &str = "postgresql.causeway.conf";

/// `DIR/db` and what is in it.
#[derive(Clone, Debug)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            root: data_dir.join("db"),
        }
    }
    /// The node's own database (DB-4), used while it is not in a cluster.
    pub fn local(&self) -> PathBuf {
        self.root.join("local")
    }
    /// The cluster's database, while a member.
    pub fn cluster(&self) -> PathBuf {
        self.root.join("cluster")
    }
    /// Unix sockets (0700: only the agent and postgres).
    pub fn run(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn socket(&self, port: u16) -> PathBuf {
        self.run().join(format!(".s.PGSQL.{port}"))
    }
    pub fn certs(&self) -> PathBuf {
        self.root.join("certs")
    }
    pub fn cert(&self, name: &str) -> PathBuf {
        self.certs().join(name)
    }
    pub fn state_file(&self) -> PathBuf {
        self.root.join("state.json")
    }
    pub fn log_file(&self) -> PathBuf {
        self.root.join("postgres.log")
    }
}

/// What `postgresql.causeway.conf` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub listen: IpAddr,
    pub port: u16,
    pub socket_dir: PathBuf,
    /// The certificate directory when `certs` gave server files (`ssl = on`).
    pub tls: Option<PathBuf>,
    /// Empty: no upstream (sealed, or no master known).
    pub primary_conninfo: String,
    pub primary_slot: String,
    pub synchronous_standby_names: String,
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

impl Settings {
    pub fn render(&self) -> String {
        let mut s = String::from(
            "# Written by Causeway (docs/dbcluster.md); changes here are overwritten.\n",
        );
        let mut line = |k: &str, v: String| s.push_str(&format!("{k} = {v}\n"));
        line("listen_addresses", quote(&self.listen.to_string()));
        line("port", self.port.to_string());
        line(
            "unix_socket_directories",
            quote(&self.socket_dir.to_string_lossy()),
        );
        line("unix_socket_permissions", "0700".into());
        match &self.tls {
            Some(dir) => {
                line("ssl", "on".into());
                line(
                    "ssl_cert_file",
                    quote(&dir.join("server.crt").to_string_lossy()),
                );
                line(
                    "ssl_key_file",
                    quote(&dir.join("server.key").to_string_lossy()),
                );
                line("ssl_ca_file", quote(&dir.join("ca.crt").to_string_lossy()));
                line("ssl_min_protocol_version", quote("TLSv1.2"));
            }
            None => line("ssl", "off".into()),
        }
        for (k, v) in [
            ("wal_level", "replica"),
            ("hot_standby", "on"),
            ("hot_standby_feedback", "on"),
            ("wal_log_hints", "on"),
            ("wal_keep_size", "'128MB'"),
            ("max_slot_wal_keep_size", "'4GB'"),
            ("max_wal_senders", "10"),
            ("max_replication_slots", "10"),
            ("wal_receiver_status_interval", "'1s'"),
            ("wal_retrieve_retry_interval", "'200ms'"),
            ("wal_sender_timeout", "'10s'"),
            ("wal_receiver_timeout", "'10s'"),
            ("recovery_target_timeline", "'latest'"),
            ("restart_after_crash", "off"),
            ("synchronous_commit", "on"),
            ("shared_buffers", "'64MB'"),
            ("logging_collector", "off"),
            ("log_line_prefix", "'%m [%p] '"),
        ] {
            line(k, v.into());
        }
        line("primary_conninfo", quote(&self.primary_conninfo));
        line("primary_slot_name", quote(&self.primary_slot));
        line(
            "synchronous_standby_names",
            quote(&self.synchronous_standby_names),
        );
        s
    }
}

/// `pg_hba.conf`: the agent over the Unix socket (peer), everyone else over TLS with a
/// certificate whose CN maps to the role (`cert`, which checks the chain and the CN).
pub fn hba() -> String {
    "# Written by Causeway (docs/dbcluster.md, section 5); first match wins.\n\
     local    all          all                peer  map=agent\n\
     local    replication  all                peer  map=agent\n\
     hostssl  all          postgres   all     cert  map=causeway\n\
     hostssl  replication  postgres   all     cert  map=causeway\n\
     host     all          all        all     reject\n"
        .to_string()
}

/// `pg_ident.conf`: certificate CN `postgres` is role `postgres`, and nothing else; the
/// agent's OS user (root, or its own) and the PostgreSQL OS user are role `postgres` over
/// the Unix socket.
pub fn ident(os_user: &str) -> String {
    let mut s = String::from(
        "# Written by Causeway (docs/dbcluster.md, section 5).\n\
         causeway   postgres   postgres\n\
         agent      root       postgres\n",
    );
    if os_user != "root" {
        s.push_str(&format!("agent      {os_user}   postgres\n"));
    }
    s.push_str("agent      postgres   postgres\n");
    s
}

fn write_owned(tools: &Tools, path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    tools.own(&tmp, 0o600)?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Writes Causeway's files into the data directory `data` (the include line once).
pub fn write(tools: &Tools, data: &Path, settings: &Settings) -> anyhow::Result<()> {
    let main = data.join("postgresql.conf");
    let text =
        std::fs::read_to_string(&main).with_context(|| format!("reading {}", main.display()))?;
    if !text.lines().any(|l| l.trim() == INCLUDE) {
        let mut t = text;
        if !t.ends_with('\n') {
            t.push('\n');
        }
        t.push_str(INCLUDE);
        t.push('\n');
        write_owned(tools, &main, &t)?;
    }
    write_owned(tools, &data.join(CONF_FILE), &settings.render())?;
    write_owned(tools, &data.join("pg_hba.conf"), &hba())?;
    write_owned(tools, &data.join("pg_ident.conf"), &ident(&tools.os_user))
}

/// `standby.signal`: written before every start of the cluster's instance, so postgres
/// always starts read-only; only a promotion at a held lease makes it writable.
pub fn write_standby_signal(tools: &Tools, data: &Path) -> anyhow::Result<()> {
    write_owned(tools, &data.join("standby.signal"), "")
}

/// `primary_conninfo` for streaming from (or copying) `host:port`, as `peer`.
pub fn conninfo(host: IpAddr, port: u16, certs: &Path, application_name: &str) -> String {
    format!(
        "host={host} port={port} user=postgres dbname=postgres application_name={application_name} sslmode=verify-ca sslcert={} sslkey={} sslrootcert={} connect_timeout=2",
        certs.join("client.crt").display(),
        certs.join("client.key").display(),
        certs.join("ca.crt").display(),
    )
}

/// The application name (and slot name) of peer `k`'s standby.
pub fn standby_name(peer: usize) -> String {
    format!("causeway_peer{peer}")
}

/// `synchronous_standby_names` for master `me` among `members`: `ANY k (…)` with
/// `k = max(1, ⌈D/2⌉ − 1)` (docs/dbcluster.md, section 3); empty with one member, and in
/// asynchronous mode.
pub fn sync_names(me: usize, members: &[usize], synchronous: bool) -> String {
    let others: Vec<String> = members
        .iter()
        .filter(|&&m| m != me)
        .map(|&m| format!("\"{}\"", standby_name(m)))
        .collect();
    let k = sync_k(members.len());
    if !synchronous || others.is_empty() || k == 0 {
        return String::new();
    }
    format!("ANY {k} ({})", others.join(", "))
}

/// Standbys that must flush a commit before it is acknowledged, with `d` members.
pub fn sync_k(d: usize) -> usize {
    if d < 2 {
        0
    } else {
        (d.div_ceil(2) - 1).max(1)
    }
}

/// Members a candidate must seal (itself included) before promoting, with `d` members.
pub fn seal_quorum(d: usize, synchronous: bool) -> usize {
    if !synchronous || d < 2 {
        1
    } else {
        // |S| − k + 1 with S the d − 1 members other than the old master.
        d - sync_k(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_synchronous_set_follows_the_design_table() {
        assert_eq!(
            [1, 2, 3, 4, 5].map(sync_k),
            [0, 1, 1, 1, 2],
            "k for D = 1…5"
        );
        assert_eq!(
            [1, 2, 3, 4, 5].map(|d| seal_quorum(d, true)),
            [1, 1, 2, 3, 3]
        );
        assert_eq!(sync_names(1, &[1], true), "");
        assert_eq!(
            sync_names(2, &[1, 2, 3], true),
            "ANY 1 (\"causeway_peer1\", \"causeway_peer3\")"
        );
        assert_eq!(
            sync_names(1, &[1, 2, 3, 4, 5], true),
            "ANY 2 (\"causeway_peer2\", \"causeway_peer3\", \"causeway_peer4\", \"causeway_peer5\")"
        );
        assert_eq!(sync_names(1, &[1, 2, 3], false), "");
        // Every set that acknowledges meets every set a candidate seals (q + k > |S|).
        for d in 2..=5 {
            assert!(seal_quorum(d, true) + sync_k(d) > d - 1, "D = {d}");
        }
    }

    #[test]
    fn hba_admits_certificates_only_by_cn_postgres() {
        let hba = hba();
        assert!(hba.contains("hostssl  all          postgres   all     cert  map=causeway"));
        assert!(hba.lines().last().unwrap().contains("reject"));
        assert!(!hba.contains("trust"));
        assert!(!hba.contains("md5") && !hba.contains("scram"));
        assert!(ident("root").contains("causeway   postgres   postgres"));
    }

    #[test]
    fn settings_quote_their_strings() {
        let s = Settings {
            listen: "127.0.0.2".parse().unwrap(),
            port: 5432,
            socket_dir: "/d/db/run".into(),
            tls: Some("/d/db/certs".into()),
            primary_conninfo: "host=127.0.0.1 application_name=x".into(),
            primary_slot: "causeway_peer2".into(),
            synchronous_standby_names: "ANY 1 (\"a\")".into(),
        }
        .render();
        assert!(s.contains("listen_addresses = '127.0.0.2'\n"));
        assert!(s.contains("ssl_key_file = '/d/db/certs/server.key'\n"));
        assert!(s.contains("primary_conninfo = 'host=127.0.0.1 application_name=x'\n"));
        assert!(s.contains("synchronous_standby_names = 'ANY 1 (\"a\")'\n"));
        assert!(s.contains("restart_after_crash = off\n"));
    }
}
