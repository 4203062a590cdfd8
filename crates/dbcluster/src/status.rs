//! `database cluster status` (the seed's layout and `--json`), the certificate checks of
//! `certs`, and the service's Prometheus metrics.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use anyhow::Context as _;
use causeway_cluster::metrics::{counter, gauge};
use prometheus_client::encoding::DescriptorEncoder;
use serde::{Deserialize, Serialize};

use crate::agent::{DbService, FRESH, IN_SYNC_BYTES};
use crate::model::*;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLine {
    pub address: String,
    pub peer: usize,
    pub me: bool,
    /// `Connected Master`, `Connected Slave ( In Sync )`, `Connected Slave ( Out Of Sync )`,
    /// `Unreachable`.
    pub state: String,
    pub role: String,
    pub timeline: u32,
    pub lsn: String,
    pub lag_bytes: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastCommandView {
    pub command: String,
    pub result: String,
    pub at_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// `Enabled` (a member), `Disabled` (the node's own database), `Error`.
    pub status: String,
    pub error: Option<String>,
    pub nodes: Vec<NodeLine>,
    pub node_in_use: Option<String>,
    pub generation: Option<u64>,
    pub interface: Option<String>,
    /// (label, file name) in the seed's order.
    pub certificates: Vec<(String, String)>,
    pub last_command: Option<LastCommandView>,
    pub warnings: Vec<String>,
}

impl DbService {
    pub fn status_json(&self) -> Status {
        let synchronous = self.synchronous();
        let saved = self.saved();
        let me = self.my_report();
        let mut reports: Vec<(Report, bool)> = self
            .reports()
            .into_iter()
            .map(|(r, age)| {
                let fresh = age < FRESH;
                (r, fresh)
            })
            .collect();
        reports.push((me.clone(), true));
        let master = reports
            .iter()
            .filter(|(r, fresh)| *fresh && r.is_ready_master())
            .max_by_key(|(r, _)| r.generation)
            .map(|(r, _)| r.clone());
        // The member list: the master's, else this node's own, else any fresh member's.
        let members: Vec<Member> = master
            .as_ref()
            .map(|m| m.members.clone())
            .filter(|m| !m.is_empty())
            .or_else(|| (!me.members.is_empty()).then(|| me.members.clone()))
            .unwrap_or_default();
        let mut nodes = vec![];
        if saved.member || !members.is_empty() {
            for m in &members {
                let report = reports.iter().find(|(r, _)| r.peer == m.peer);
                let (state, role, timeline, position) = match report {
                    Some((r, true))
                        if r.is_ready_master()
                            && Some(r.peer) == master.as_ref().map(|x| x.peer) =>
                    {
                        (
                            "Connected Master".to_string(),
                            r.role,
                            r.timeline,
                            r.position,
                        )
                    }
                    Some((r, true)) => {
                        let replica = master
                            .as_ref()
                            .and_then(|mm| mm.replicas.iter().find(|x| x.peer == r.peer));
                        // Synchronous replication: "In Sync" only once the master counts
                        // this standby for its commits (sync_state sync or quorum). Caught
                        // up is not enough: until the master has reloaded with it in
                        // synchronous_standby_names, a commit there waits for nobody.
                        let counted = !synchronous
                            || replica.is_some_and(|x| {
                                matches!(x.sync_state.as_str(), "sync" | "quorum")
                            });
                        let in_sync = r.role == Role::Standby
                            && r.streaming
                            && counted
                            && replica.is_some_and(|x| x.flush_lag <= IN_SYNC_BYTES);
                        let state = match r.role {
                            Role::Standby if in_sync => "Connected Slave ( In Sync )",
                            Role::Standby | Role::Busy => "Connected Slave ( Out Of Sync )",
                            Role::Master => "Connected Master ( Not Ready )",
                            Role::Stopped => "Connected ( PostgreSQL Stopped )",
                            Role::Local => "Connected ( Not In Cluster )",
                        };
                        (state.to_string(), r.role, r.timeline, r.position)
                    }
                    _ => ("Unreachable".to_string(), Role::Stopped, 0, 0),
                };
                let lag_bytes = master.as_ref().and_then(|mm| {
                    if mm.peer == m.peer {
                        Some(0)
                    } else {
                        mm.replicas
                            .iter()
                            .find(|x| x.peer == m.peer)
                            .map(|x| x.flush_lag)
                    }
                });
                nodes.push(NodeLine {
                    address: m.address.ip().to_string(),
                    peer: m.peer,
                    me: m.peer == self.me,
                    state,
                    role: role.as_str().to_string(),
                    timeline,
                    lsn: lsn(position),
                    lag_bytes,
                });
            }
        }
        let error = me
            .error
            .clone()
            .or_else(|| master.as_ref().and_then(|m| m.error.clone()));
        let status = if !saved.member {
            "Disabled"
        } else if error.is_some() {
            "Error"
        } else {
            "Enabled"
        };
        let node_in_use = if saved.member {
            self.route.borrow().map(|(a, _)| a.ip().to_string())
        } else {
            Some(format!(
                "{} (this node's own database)",
                self.pg_address().ip()
            ))
        };
        let labels = [
            "Server Key",
            "Server Certificate",
            "Client Key",
            "Client Certificate",
            "CA Certificate",
        ];
        let certificates = match saved.certs.len() {
            5 => labels
                .iter()
                .zip(&saved.certs)
                .map(|(l, f)| (l.to_string(), f.clone()))
                .collect(),
            3 => labels[2..]
                .iter()
                .zip(&saved.certs)
                .map(|(l, f)| (l.to_string(), f.clone()))
                .collect(),
            _ => vec![],
        };
        let mut warnings = vec![];
        if members.len() == 2 || members.len() == 4 {
            warnings.push(format!(
                "the database cluster has {} nodes: an even number stops writes when half are lost; add or remove one",
                members.len()
            ));
        }
        if let Err(e) = &self.tools {
            warnings.push(e.clone());
        }
        Status {
            status: status.into(),
            error,
            nodes,
            node_in_use,
            generation: master.as_ref().map(|m| m.generation),
            interface: saved.localnode.clone(),
            certificates,
            last_command: saved.last_command.map(|l| LastCommandView {
                command: l.command,
                result: l.result,
                at_ms: l.at_ms,
            }),
            warnings,
        }
    }
}

/// The seed's layout, widths included (22, 23 and 24 columns before the colon).
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    out.push_str(&format!("{:<22}: {}\n", "Status", s.status));
    if let Some(e) = &s.error {
        out.push_str(&format!("{:<22}: {}\n", "Error", e));
    }
    out.push_str("Nodes:\n");
    for n in &s.nodes {
        let name = if n.me {
            format!("{} (me)", n.address)
        } else {
            n.address.clone()
        };
        out.push_str(&format!("  {name:<21}: {}\n", n.state));
    }
    out.push_str(&format!(
        "{:<22}: {}\n",
        "Node in use",
        s.node_in_use.as_deref().unwrap_or("none (no master)")
    ));
    out.push('\n');
    out.push_str(&format!(
        "{:<23}: {}\n",
        "Interface",
        s.interface.as_deref().unwrap_or("")
    ));
    out.push('\n');
    out.push_str("Certificates\n");
    for (label, file) in &s.certificates {
        out.push_str(&format!("{label:<24}: {file}\n"));
    }
    if let Some(l) = &s.last_command {
        out.push_str(&format!(
            "{:<23}: '{}' ({})\n",
            "Last command", l.command, l.result
        ));
    }
    for w in &s.warnings {
        out.push_str(&format!("Warning: {w}\n"));
    }
    out
}

/// The checks `certs` runs before copying (section 5): readable, key matches certificate,
/// both chain to the CA, in their validity period, client CN `postgres`.
pub fn check_certs(
    server: Option<(&PathBuf, &PathBuf)>,
    client: (&PathBuf, &PathBuf, &PathBuf),
) -> Option<String> {
    let (client_key, client_crt, ca) = client;
    let roots = match causeway_pki::NodeIdentity::load(client_crt, client_key, ca) {
        Ok(id) => id.roots,
        Err(e) => return Some(format!("{}: {e}", client_crt.display())),
    };
    let check = |crt: &Path, key: &Path, want_cn: Option<&str>| -> Option<String> {
        let chain = match causeway_pki::load_certs(crt) {
            Ok(c) => c,
            Err(e) => return Some(format!("{}: {e}", crt.display())),
        };
        if let Err(e) = causeway_pki::NodeIdentity::load(crt, key, ca) {
            return Some(format!("{} and {}: {e}", crt.display(), key.display()));
        }
        let leaf = chain.first()?;
        let (_, cert) = match x509_parser::parse_x509_certificate(leaf.as_ref()) {
            Ok(c) => c,
            Err(e) => return Some(format!("{}: unreadable certificate: {e}", crt.display())),
        };
        let now = x509_parser::time::ASN1Time::now();
        if now > cert.validity().not_after {
            return Some(format!(
                "{}: expired on {}",
                crt.display(),
                cert.validity().not_after
            ));
        }
        let parsed = match rustls::server::ParsedCertificate::try_from(leaf) {
            Ok(p) => p,
            Err(e) => return Some(format!("{}: {e}", crt.display())),
        };
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        if let Err(e) = rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            rustls::pki_types::UnixTime::now(),
            algs.all,
        ) {
            return Some(format!(
                "{} is not signed by the CA in {}: {}",
                crt.display(),
                ca.display(),
                causeway_pki::describe_tls_error(&e)
            ));
        }
        if let Some(want) = want_cn {
            let cn: Vec<String> = cert
                .subject()
                .iter_common_name()
                .filter_map(|c| c.as_str().ok().map(String::from))
                .collect();
            if cn.first().map(String::as_str) != Some(want) {
                return Some(format!(
                    "the client certificate's CN is '{}'; it must be '{want}'",
                    cn.first().cloned().unwrap_or_default()
                ));
            }
        }
        None
    };
    if let Some((key, crt)) = server {
        if let Some(p) = check(crt, key, None) {
            return Some(p);
        }
    }
    check(client_crt, client_key, Some("postgres"))
}

/// "expires on …" when `crt` expires within `days`.
pub fn expires_within(crt: &Path, days: i64) -> Option<String> {
    let chain = causeway_pki::load_certs(crt).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(chain.first()?.as_ref()).ok()?;
    let left =
        cert.validity().not_after.timestamp() - x509_parser::time::ASN1Time::now().timestamp();
    (left < days * 86_400).then(|| {
        format!(
            "{} expires on {} ({} days from now)",
            crt.display(),
            cert.validity().not_after,
            left / 86_400
        )
    })
}

/// TLS for connecting to PostgreSQL with the node's client certificate (`verify-ca`).
pub fn client_tls(certs: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let id = causeway_pki::NodeIdentity::load(
        &certs.join("client.crt"),
        &certs.join("client.key"),
        &certs.join("ca.crt"),
    )
    .context("loading the database client certificate (run 'database cluster certs' first)")?;
    causeway_pki::client_config(causeway_pki::TlsMode::Enforce, &id)
        .context("building the database client's TLS configuration")
}

pub(crate) struct Collector(pub Weak<DbService>);

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dbcluster")
    }
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let Some(svc) = self.0.upgrade() else {
            return Ok(());
        };
        let me = svc.my_report();
        let role = match (me.role, me.ready) {
            (Role::Master, true) => "master",
            (Role::Standby, _) => "standby",
            (Role::Local, _) => "local",
            _ => "none",
        };
        let roles: Vec<_> = ["master", "standby", "local", "none"]
            .iter()
            .map(|r| {
                (
                    vec![("role", r.to_string())],
                    f64::from(u8::from(*r == role)),
                )
            })
            .collect();
        gauge(
            &mut enc,
            "causeway_db_role",
            "This node's database role (1 for the current one)",
            &roles,
        )?;
        gauge(
            &mut enc,
            "causeway_db_generation",
            "Generation of the master this node is or follows",
            &[(vec![], me.generation as f64)],
        )?;
        gauge(
            &mut enc,
            "causeway_db_timeline",
            "PostgreSQL timeline",
            &[(vec![], f64::from(me.timeline))],
        )?;
        let lags: Vec<_> = me
            .replicas
            .iter()
            .map(|r| {
                (
                    vec![("standby", format!("peer{}", r.peer))],
                    r.flush_lag as f64,
                )
            })
            .collect();
        gauge(
            &mut enc,
            "causeway_db_replication_lag_bytes",
            "Bytes each standby has not flushed (on the master)",
            &lags,
        )?;
        let c = &svc.counters;
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut enc,
            "causeway_db_failovers",
            "Promotions of this node at a new generation",
            &[(vec![], n(&c.failovers))],
        )?;
        counter(
            &mut enc,
            "causeway_db_fences",
            "Times this node's master was stopped because it lost its lease",
            &[(vec![], n(&c.fences))],
        )?;
        counter(
            &mut enc,
            "causeway_db_rewinds",
            "pg_rewind runs",
            &[
                (vec![("result", "ok".into())], n(&c.rewinds_ok)),
                (vec![("result", "failed".into())], n(&c.rewinds_failed)),
            ],
        )?;
        counter(
            &mut enc,
            "causeway_db_basebackups",
            "Copies of the database from the master",
            &[
                (vec![("result", "ok".into())], n(&c.basebackups_ok)),
                (vec![("result", "failed".into())], n(&c.basebackups_failed)),
            ],
        )?;
        gauge(
            &mut enc,
            "causeway_db_endpoint_connections",
            "Connections open through the local endpoint",
            &[(vec![], n(&c.endpoint_connections) as f64)],
        )?;
        counter(
            &mut enc,
            "causeway_db_endpoint_closed",
            "Endpoint connections closed because the master changed",
            &[(
                vec![("reason", "master_changed".into())],
                n(&c.endpoint_closed_master_changed),
            )],
        )?;
        counter(
            &mut enc,
            "causeway_db_health_check_failures",
            "Failed health checks of the master",
            &[(vec![], n(&c.health_check_failures))],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_has_the_seeds_layout() {
        let s = Status {
            status: "Enabled".into(),
            error: None,
            nodes: vec![
                NodeLine {
                    address: "10.48.36.61".into(),
                    state: "Connected Master".into(),
                    ..Default::default()
                },
                NodeLine {
                    address: "10.48.36.118".into(),
                    state: "Connected Slave ( In Sync )".into(),
                    ..Default::default()
                },
                NodeLine {
                    address: "10.48.36.182".into(),
                    me: true,
                    state: "Connected Slave ( In Sync )".into(),
                    ..Default::default()
                },
            ],
            node_in_use: Some("10.48.36.61".into()),
            generation: Some(3),
            interface: Some("a".into()),
            certificates: vec![
                ("Server Key".into(), "dbclusterserver.key".into()),
                ("Server Certificate".into(), "dbclusterserver.cer".into()),
                ("Client Key".into(), "dbclusterclient.key".into()),
                ("Client Certificate".into(), "dbclusterclient.cer".into()),
                ("CA Certificate".into(), "vngtpRootca.cer".into()),
            ],
            last_command: Some(LastCommandView {
                command: "database cluster join 10.48.36.61".into(),
                result: "Success".into(),
                at_ms: 0,
            }),
            warnings: vec![],
        };
        // Copied from the seed (003), widths and all.
        let seed = "\
Status                : Enabled
Nodes:
  10.48.36.61          : Connected Master
  10.48.36.118         : Connected Slave ( In Sync )
  10.48.36.182 (me)    : Connected Slave ( In Sync )
Node in use           : 10.48.36.61

Interface              : a

Certificates
Server Key              : dbclusterserver.key
Server Certificate      : dbclusterserver.cer
Client Key              : dbclusterclient.key
Client Certificate      : dbclusterclient.cer
CA Certificate          : vngtpRootca.cer
Last command           : 'database cluster join 10.48.36.61' (Success)
";
        assert_eq!(render(&s), seed);
    }
}
