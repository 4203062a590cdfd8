//! The node's configuration file (TOML). Everything is checked before any port is bound;
//! an error names the field (`cluster.peers[2]`) and what is wrong with it.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use causeway_common::logging::LogFormat;
use causeway_mesh::{ClusterSettings, IpVersion, Timing, TlsMode, MAX_PEERS};
use serde::{Deserialize, Serialize};

mod ha;
pub use ha::{prefix_len, CapacityClass, HaMode, HaRole, HaSection, MIN_FAILOVER_WAIT_MS};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: String, message: String },
    #[error("{path}: {field}: {message}")]
    Field {
        path: String,
        field: String,
        message: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node: NodeSection,
    #[serde(default)]
    pub cluster: ClusterSection,
    #[serde(default)]
    pub tls: TlsSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub licences: LicenceSection,
    /// The SIP registrar and proxy; off when the section is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sip: Option<SipSection>,
    /// The database cluster (DB-1…DB-7); off when the section is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseSection>,
    /// This node's part in an HA pair (HA-1…HA-11); none when the section is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<HaSection>,
    /// Where the file was read from; relative paths in it are relative to `node.data_dir`.
    #[serde(skip)]
    pub source: PathBuf,
    /// The version announced to peers; the build's own unless overridden to rehearse a
    /// mixed-version cluster (`CAUSEWAY_ANNOUNCE_VERSION`).
    #[serde(skip)]
    pub announce_version: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// † This system's name, shown by the other peers as "Active as <name>".
    pub system_name: String,
    /// † This system's address exactly as written in the peer list.
    #[serde(default)]
    pub address: String,
    /// Everything the node keeps: certificates, keys, the admin socket, its store.
    pub data_dir: PathBuf,
    #[serde(default)]
    pub log_format: LogFormat,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Cluster name (FQDN for provisioning).
    #[serde(default)]
    pub name: String,
    /// Configuration primary, by peer number.
    #[serde(default = "one")]
    pub configuration_primary: usize,
    #[serde(default)]
    pub ip_version: IpVersion,
    #[serde(default)]
    pub tls_verification: TlsMode,
    /// Peer 1 … Peer N addresses, in order; empty for a node that is not clustered.
    #[serde(default)]
    pub peers: Vec<String>,
    #[serde(default = "cluster_port")]
    pub port: u16,
    /// Address to listen on; this system's address when it is an IP, else every address.
    #[serde(default)]
    pub listen: Option<IpAddr>,
    #[serde(default)]
    pub timing: TimingSection,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            name: String::new(),
            configuration_primary: 1,
            ip_version: IpVersion::IPv4,
            tls_verification: TlsMode::Permissive,
            peers: Vec::new(),
            port: cluster_port(),
            listen: None,
            timing: TimingSection::default(),
        }
    }
}

impl ClusterSection {
    /// What leaving the cluster resets (as the seed does): its name, configuration primary
    /// and TLS verification mode. The network (peers, port, IP version, timing) stays.
    pub fn forget_cluster(&mut self) {
        let defaults = ClusterSection::default();
        self.name = defaults.name;
        self.configuration_primary = defaults.configuration_primary;
        self.tls_verification = defaults.tls_verification;
    }
}

fn one() -> usize {
    1
}

/// The cluster port when `[cluster] port` is not set (the seed's TCP 4372).
pub const DEFAULT_CLUSTER_PORT: u16 = 4372;

fn cluster_port() -> u16 {
    DEFAULT_CLUSTER_PORT
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimingSection {
    pub heartbeat_interval_ms: u64,
    pub failure_timeout_ms: u64,
    /// Under load, replication commits start at most this often: the CPU a commit costs is
    /// shared by every write of the interval, and each waits up to this much longer
    /// (docs/replication.md, "The commit interval"). 0: back to back.
    #[serde(default = "commit_interval_ms")]
    pub commit_interval_ms: u64,
}

fn commit_interval_ms() -> u64 {
    causeway_replication::EngineSettings::new(1, 1, 1)
        .commit_interval
        .as_millis() as u64
}

impl Default for TimingSection {
    fn default() -> Self {
        let t = Timing::default();
        Self {
            heartbeat_interval_ms: t.heartbeat_interval.as_millis() as u64,
            failure_timeout_ms: t.failure_timeout.as_millis() as u64,
            commit_interval_ms: commit_interval_ms(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    pub ca: PathBuf,
}

impl Default for TlsSection {
    fn default() -> Self {
        Self {
            certificate: "node.crt".into(),
            private_key: "node.key".into(),
            ca: "ca.crt".into(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// HTTPS admin API, e.g. "127.0.0.1:8443"; off when absent. Users: `causeway admin passwd`.
    #[serde(default)]
    pub https_listen: Option<SocketAddr>,
}

/// † Licences installed on this peer; the cluster's capacity is their sum (SV-5). None
/// installed anywhere: no licence limit.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LicenceSection {
    /// Call licences.
    #[serde(default)]
    pub rich_media_sessions: u32,
    /// Registration licences (AORs with a binding).
    #[serde(default)]
    pub room_systems: u32,
    /// How long a lost peer's licences stay in the pool (alarms 30012…30014), after which
    /// they leave it (30015…30017). Two weeks.
    #[serde(default = "licence_grace_s")]
    pub grace_period_s: u64,
}

impl Default for LicenceSection {
    fn default() -> Self {
        Self {
            rich_media_sessions: 0,
            room_systems: 0,
            grace_period_s: licence_grace_s(),
        }
    }
}

fn licence_grace_s() -> u64 {
    14 * 24 * 3600
}

/// † The SIP service on this peer (SV-1…SV-5). Every peer of a cluster uses the same
/// ports: a peer relays to another on that peer's address and these ports.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SipSection {
    /// Address to listen on; this system's address when it is an IP.
    #[serde(default)]
    pub listen: Option<IpAddr>,
    /// More addresses SIP answers on, with the same ports: the secondary of two HA pairs
    /// lists the second primary's virtual IP here.
    #[serde(default)]
    pub also_listen: Vec<IpAddr>,
    #[serde(default = "sip_port")]
    pub udp_port: u16,
    #[serde(default = "sip_port")]
    pub tcp_port: u16,
    /// 0 turns TLS off.
    #[serde(default = "sips_port")]
    pub tls_port: u16,
    /// Messages per second accepted from one source address.
    #[serde(default = "rate_per_source")]
    pub rate_per_source: u32,
    #[serde(default = "max_connections")]
    pub max_connections: usize,
    #[serde(default = "max_connections_per_source")]
    pub max_connections_per_source: usize,
    /// Registration intervals (seconds): shorter is refused with 423, longer is cut.
    #[serde(default = "min_expires")]
    pub min_expires: u32,
    #[serde(default = "max_expires")]
    pub max_expires: u32,
    /// How often each neighbour zone's addresses get an OPTIONS keep-alive (two unanswered
    /// in a row: down).
    #[serde(default = "zone_keepalive_ms")]
    pub zone_keepalive_ms: u64,
    /// Name servers for DNS zones (`ip:port`, at most 4); none: the system's
    /// (/etc/resolv.conf).
    #[serde(default)]
    pub dns_servers: Vec<String>,
}

impl Default for SipSection {
    fn default() -> Self {
        Self {
            listen: None,
            also_listen: vec![],
            udp_port: sip_port(),
            tcp_port: sip_port(),
            tls_port: sips_port(),
            rate_per_source: rate_per_source(),
            max_connections: max_connections(),
            max_connections_per_source: max_connections_per_source(),
            min_expires: min_expires(),
            max_expires: max_expires(),
            zone_keepalive_ms: zone_keepalive_ms(),
            dns_servers: vec![],
        }
    }
}

/// † The database cluster on this node (`docs/dbcluster.md`): a PostgreSQL 15 of its own,
/// supervised by Causeway, kept aside until the node joins a database cluster.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSection {
    /// PostgreSQL 15's `bin` directory; `pg_config --bindir`, then
    /// /usr/lib/postgresql/15/bin, when absent.
    #[serde(default)]
    pub bin_dir: Option<PathBuf>,
    /// The port PostgreSQL listens on, on the `localnode` address.
    #[serde(default = "pg_port")]
    pub port: u16,
    /// The interface (or one of its addresses) PostgreSQL listens on until
    /// `database cluster localnode` names another.
    #[serde(default)]
    pub localnode: Option<String>,
    /// The local endpoint that leads to the current master (DB-6).
    #[serde(default = "db_endpoint")]
    pub endpoint: SocketAddr,
    /// The HTTP health port (`/primary`, `/replica`, `/health`), on the `localnode` address.
    #[serde(default = "db_health_port")]
    pub health_port: u16,
    /// The versioned SQL files `upgrade_schema` applies (`NNNN_<name>.sql`).
    #[serde(default)]
    pub schema_dir: Option<PathBuf>,
}

impl Default for DatabaseSection {
    fn default() -> Self {
        Self {
            bin_dir: None,
            port: pg_port(),
            localnode: None,
            endpoint: db_endpoint(),
            health_port: db_health_port(),
            schema_dir: None,
        }
    }
}

fn pg_port() -> u16 {
    5432
}
fn db_endpoint() -> SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 9899))
}
fn db_health_port() -> u16 {
    8008
}

fn sip_port() -> u16 {
    5060
}
fn sips_port() -> u16 {
    5061
}
fn rate_per_source() -> u32 {
    50_000
}
fn max_connections() -> usize {
    10_000
}
fn max_connections_per_source() -> usize {
    512
}
fn min_expires() -> u32 {
    60
}
fn max_expires() -> u32 {
    7_200
}

fn zone_keepalive_ms() -> u64 {
    10_000
}

/// A syntactically valid IP address or DNS name (RFC 1123 labels).
pub fn valid_address(a: &str) -> bool {
    if a.parse::<IpAddr>().is_ok() {
        return true;
    }
    let name = a.strip_suffix('.').unwrap_or(a);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut config: NodeConfig = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
            path: path.display().to_string(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        config.source = path.to_path_buf();
        config.validate()?;
        Ok(config)
    }

    /// Writes the file back where it was read from (whole-file replace, so a crash leaves
    /// the old or the new file, never half of one). Comments in the file are not kept.
    pub fn save(&self) -> Result<(), String> {
        let text = toml::to_string(self).map_err(|e| e.to_string())?;
        let tmp = self.source.with_extension("toml.new");
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &self.source))
            .map_err(|e| format!("writing {}: {e}", self.source.display()))
    }

    fn field(&self, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Field {
            path: self.source.display().to_string(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// Checks every value. Problems an operator fixes on the running cluster (own address
    /// missing from the list, duplicates) are alarms (20003), not start-up errors.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let n = &self.node;
        if n.system_name.is_empty()
            || n.system_name.len() > 64
            || !n
                .system_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(self.field(
                "node.system_name",
                format!(
                    "'{}' must be 1 to 64 letters, digits, '-', '_' or '.'",
                    n.system_name
                ),
            ));
        }
        if !n.address.is_empty() && !valid_address(&n.address) {
            return Err(self.field(
                "node.address",
                format!("'{}' is not an IP address or FQDN", n.address),
            ));
        }
        if n.data_dir.as_os_str().is_empty() {
            return Err(self.field("node.data_dir", "must name a directory"));
        }
        let c = &self.cluster;
        if !c.name.is_empty() && !valid_address(&c.name) {
            return Err(self.field("cluster.name", format!("'{}' is not an FQDN", c.name)));
        }
        if c.peers.len() > MAX_PEERS {
            return Err(self.field(
                "cluster.peers",
                format!("{} peers listed; at most {MAX_PEERS}", c.peers.len()),
            ));
        }
        for (i, p) in c.peers.iter().enumerate() {
            let field = format!("cluster.peers[{i}] (Peer {} address)", i + 1);
            if !valid_address(p) {
                return Err(self.field(field, format!("'{p}' is not an IP address or FQDN")));
            }
            if let Ok(ip) = p.parse::<IpAddr>() {
                if ip.is_ipv4() != (c.ip_version == IpVersion::IPv4) {
                    return Err(self.field(
                        field,
                        format!(
                            "'{p}' is not an {} address (cluster.ip_version)",
                            c.ip_version
                        ),
                    ));
                }
            }
        }
        if !c.peers.is_empty() {
            if n.address.is_empty() {
                return Err(self.field("node.address", "required when cluster.peers is set: this system's address as written in the peer list"));
            }
            if c.configuration_primary == 0 || c.configuration_primary > c.peers.len() {
                return Err(self.field(
                    "cluster.configuration_primary",
                    format!(
                        "{} is not a peer number (1 to {})",
                        c.configuration_primary,
                        c.peers.len()
                    ),
                ));
            }
        }
        if c.port == 0 {
            return Err(self.field("cluster.port", "0 is not a port"));
        }
        let t = &c.timing;
        if t.heartbeat_interval_ms < 10 || t.heartbeat_interval_ms > 10_000 {
            return Err(self.field(
                "cluster.timing.heartbeat_interval_ms",
                format!("{} is outside 10 to 10000", t.heartbeat_interval_ms),
            ));
        }
        if t.failure_timeout_ms < 2 * t.heartbeat_interval_ms || t.failure_timeout_ms > 60_000 {
            return Err(self.field(
                "cluster.timing.failure_timeout_ms",
                format!(
                    "{} must be at least twice the heartbeat interval and at most 60000",
                    t.failure_timeout_ms
                ),
            ));
        }
        if t.commit_interval_ms > 100 {
            return Err(self.field(
                "cluster.timing.commit_interval_ms",
                format!(
                    "{} is outside 0 to 100: every write under load waits up to this long",
                    t.commit_interval_ms
                ),
            ));
        }
        if let Some(sip) = &self.sip {
            if sip.udp_port == 0 || sip.tcp_port == 0 {
                return Err(self.field("sip.udp_port", "SIP ports must be 1 to 65535"));
            }
            if sip.tls_port != 0 && sip.tls_port == sip.tcp_port {
                return Err(self.field(
                    "sip.tls_port",
                    format!(
                        "{} is also sip.tcp_port: TLS needs a port of its own",
                        sip.tls_port
                    ),
                ));
            }
            if !(200..=600_000).contains(&sip.zone_keepalive_ms) {
                return Err(self.field(
                    "sip.zone_keepalive_ms",
                    "must be from 200 (0.2 s) to 600000 (10 minutes)".to_string(),
                ));
            }
            if sip.dns_servers.len() > 4 {
                return Err(self.field(
                    "sip.dns_servers",
                    format!("{} servers: at most 4", sip.dns_servers.len()),
                ));
            }
            if let Some(bad) = sip
                .dns_servers
                .iter()
                .find(|s| s.parse::<std::net::SocketAddr>().is_err())
            {
                return Err(self.field(
                    "sip.dns_servers",
                    format!("'{bad}' is not ip:port (for example \"192.0.2.53:53\")"),
                ));
            }
            if sip.min_expires == 0 || sip.min_expires > sip.max_expires {
                return Err(self.field(
                    "sip.min_expires",
                    format!(
                        "must be at least 1 and at most sip.max_expires ({})",
                        sip.max_expires
                    ),
                ));
            }
            if sip.rate_per_source == 0
                || sip.max_connections == 0
                || sip.max_connections_per_source == 0
            {
                return Err(self.field(
                    "sip.rate_per_source",
                    "rates and connection caps must be at least 1",
                ));
            }
            if sip.listen.is_none() && self.node.address.parse::<IpAddr>().is_err() {
                return Err(self.field(
                    "sip.listen",
                    "node.address is not an IP address: set sip.listen to the address SIP listens on",
                ));
            }
            let addresses = self.sip_addresses();
            if let Some(twice) = addresses
                .iter()
                .enumerate()
                .find(|(i, a)| addresses[..*i].contains(a))
                .map(|(_, a)| a)
            {
                return Err(self.field(
                    "sip.also_listen",
                    format!("{twice} is listed twice (sip.listen, or node.address without it, is the first address)"),
                ));
            }
        }
        if let Some(ha) = &self.ha {
            let me = self
                .cluster
                .peers
                .iter()
                .position(|p| *p == self.node.address)
                .map_or(0, |i| i + 1);
            ha.check(&self.node.address, &self.cluster.peers, me)
                .map_err(|(field, message)| self.field(field, message))?;
        }
        Ok(())
    }

    /// `path` resolved against the data directory.
    pub fn data_path(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.node.data_dir.join(path)
        }
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.node.data_dir.join("admin.sock")
    }

    /// Problems with this system's place in the peer list (alarm 20003), if any.
    pub fn membership_problem(&self) -> Option<String> {
        let peers = &self.cluster.peers;
        if peers.is_empty() {
            return None;
        }
        let mut seen = HashSet::new();
        for p in peers {
            if !seen.insert(p.to_ascii_lowercase()) {
                return Some(format!(
                    "address '{p}' is listed more than once in the peer list"
                ));
            }
        }
        if self.self_index().is_none() {
            return Some(format!(
                "this system's address '{}' is not in the peer list",
                self.node.address
            ));
        }
        None
    }

    /// This system's peer number (1-based).
    pub fn self_index(&self) -> Option<usize> {
        self.cluster
            .peers
            .iter()
            .position(|p| p.eq_ignore_ascii_case(&self.node.address))
            .map(|i| i + 1)
    }

    /// The mesh settings, when this node can cluster.
    pub fn cluster_settings(&self) -> Option<ClusterSettings> {
        if self.membership_problem().is_some() {
            return None;
        }
        let self_index = self.self_index()?;
        let c = &self.cluster;
        Some(ClusterSettings {
            cluster_name: c.name.clone(),
            peers: c.peers.clone(),
            self_index,
            configuration_primary: c.configuration_primary,
            ip_version: c.ip_version,
            tls_mode: c.tls_verification,
            port: c.port,
            system_name: self.node.system_name.clone(),
            software_version: self
                .announce_version
                .clone()
                .unwrap_or_else(|| causeway_common::SOFTWARE_VERSION.to_string()),
            timing: Timing {
                heartbeat_interval: Duration::from_millis(c.timing.heartbeat_interval_ms),
                failure_timeout: Duration::from_millis(c.timing.failure_timeout_ms),
                ..Timing::default()
            },
        })
    }

    /// The addresses SIP answers on, the first first (`sip.listen`, else the node's
    /// address); empty when this node runs no SIP.
    pub fn sip_addresses(&self) -> Vec<IpAddr> {
        let Some(sip) = &self.sip else { return vec![] };
        sip.listen
            .or_else(|| self.node.address.parse().ok())
            .into_iter()
            .chain(sip.also_listen.iter().copied())
            .collect()
    }

    /// The address the cluster port listens on.
    pub fn listen_ip(&self) -> IpAddr {
        self.cluster
            .listen
            .or_else(|| self.node.address.parse().ok())
            .unwrap_or(match self.cluster.ip_version {
                IpVersion::IPv4 => IpAddr::from([0, 0, 0, 0]),
                IpVersion::IPv6 => IpAddr::from([0u16; 8]),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        NodeConfig::load(&path)
    }

    const GOOD: &str = r#"
[node]
system_name = "peer1"
address = "127.0.0.1"
data_dir = "/tmp/p1"
[cluster]
name = "cluster.lab.example"
peers = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
tls_verification = "Enforce"
"#;

    #[test]
    fn sip_answers_on_its_address_and_the_ones_also_listed_each_once() {
        let two = parse(&format!(
            "{GOOD}[sip]\nlisten = \"198.18.0.10\"\nalso_listen = [\"198.18.0.20\"]\n"
        ))
        .unwrap();
        let want: Vec<IpAddr> = vec![
            "198.18.0.10".parse().unwrap(),
            "198.18.0.20".parse().unwrap(),
        ];
        assert_eq!(two.sip_addresses(), want);
        let node_address =
            parse(&format!("{GOOD}[sip]\nalso_listen = [\"198.18.0.20\"]\n")).unwrap();
        assert_eq!(
            node_address.sip_addresses()[0],
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert!(
            parse(GOOD).unwrap().sip_addresses().is_empty(),
            "no [sip]: no SIP"
        );
        let e = parse(&format!("{GOOD}[sip]\nalso_listen = [\"127.0.0.1\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sip.also_listen") && e.contains("127.0.0.1 is listed twice"),
            "{e}"
        );
    }

    #[test]
    fn dns_servers_are_ip_and_port_and_at_most_four() {
        let ok = parse(&format!(
            "{GOOD}[sip]\ndns_servers = [\"127.0.0.53:53\", \"[::1]:5353\"]\n"
        ))
        .unwrap();
        assert_eq!(ok.sip.unwrap().dns_servers.len(), 2);
        let e = parse(&format!("{GOOD}[sip]\ndns_servers = [\"ns1.example\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sip.dns_servers") && e.contains("'ns1.example' is not ip:port"),
            "{e}"
        );
        let five = (1..=5)
            .map(|k| format!("\"127.0.0.{k}:53\""))
            .collect::<Vec<_>>()
            .join(", ");
        let e = parse(&format!("{GOOD}[sip]\ndns_servers = [{five}]\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 4"), "{e}");
    }

    proptest::proptest! {
        /// A node file damaged anywhere (bytes replaced, cut, inserted) loads or is refused
        /// with an error naming the file; it never panics.
        #[test]
        fn a_damaged_node_file_is_refused_never_a_panic(
            edits in proptest::collection::vec((0usize..400, proptest::prelude::any::<u8>(), 0u8..3), 1..8)
        ) {
            let mut bytes = GOOD.as_bytes().to_vec();
            for (at, byte, how) in edits {
                let at = at % (bytes.len() + 1);
                match how {
                    0 if at < bytes.len() => bytes[at] = byte,
                    1 if at < bytes.len() => { bytes.remove(at); }
                    _ => bytes.insert(at, byte),
                }
            }
            let text = String::from_utf8_lossy(&bytes).to_string();
            if let Err(e) = parse(&text) {
                let message = e.to_string();
                proptest::prop_assert!(!message.is_empty());
            }
        }
    }

    #[test]
    fn a_good_file_loads() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.self_index(), Some(1));
        assert_eq!(c.cluster.port, 4372);
        assert_eq!(c.cluster_settings().unwrap().tls_mode, TlsMode::Enforce);
        assert_eq!(c.cluster.timing.commit_interval_ms, 10, "the default");
        let set = "[cluster.timing]\nheartbeat_interval_ms = 500\nfailure_timeout_ms = 5000\ncommit_interval_ms = 2\n[cluster]";
        let c = parse(&GOOD.replace("[cluster]", set)).unwrap();
        assert_eq!(c.cluster.timing.commit_interval_ms, 2);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (GOOD.replace("tls_verification = \"Enforce\"", "tls_verification = \"Strict\""), "tls_verification"),
            (GOOD.replace("\"127.0.0.3\"]", "\"bad name!\"]"), "cluster.peers[2] (Peer 3 address)"),
            (GOOD.replace("\"127.0.0.3\"]", "\"::1\"]"), "is not an IPv4 address"),
            (GOOD.replace("[cluster]", "[cluster]\nconfiguration_primary = 4"), "cluster.configuration_primary"),
            (GOOD.replace("[cluster]", "[cluster]\nbogus = 1"), "bogus"),
            (GOOD.replace("system_name = \"peer1\"", "system_name = \"\""), "node.system_name"),
            (GOOD.replace("[cluster]", "[cluster.timing]\nheartbeat_interval_ms = 500\nfailure_timeout_ms = 600\n[cluster]"), "failure_timeout_ms"),
            (GOOD.replace("[cluster]", "[cluster.timing]\nheartbeat_interval_ms = 500\nfailure_timeout_ms = 5000\ncommit_interval_ms = 250\n[cluster]"), "cluster.timing.commit_interval_ms"),
        ];
        for (text, field) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(field), "'{err}' does not name '{field}'");
        }
    }

    #[test]
    fn membership_problems_are_alarms_not_errors() {
        let c = parse(&GOOD.replace("address = \"127.0.0.1\"", "address = \"127.0.0.9\"")).unwrap();
        assert!(c
            .membership_problem()
            .unwrap()
            .contains("'127.0.0.9' is not in the peer list"));
        assert!(c.cluster_settings().is_none());
        let c = parse(&GOOD.replace("\"127.0.0.3\"]", "\"127.0.0.2\"]")).unwrap();
        assert!(c.membership_problem().unwrap().contains("more than once"));
    }
}
