//! What `xstatus cluster` shows for each peer (EX-4).

use std::fmt;
use std::net::IpAddr;

use causeway_pki::{CertStatus, TlsMode};
use serde::{Deserialize, Serialize};

use crate::hello::RefuseField;
use crate::settings::IpVersion;

/// Clustering status as the Clustering page shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "state", content = "reason")]
pub enum Clustering {
    #[serde(rename = "This system")]
    ThisSystem,
    Active,
    /// Never reached yet.
    #[default]
    Unknown,
    Failed(String),
}

/// Why a peer is not Active, for the alarms; the words are in [`Clustering::Failed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    Resolve,
    Connect,
    Tls,
    Refused(RefuseField),
    Lost,
    ShutDown,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    /// Peer number, 1-based.
    pub index: usize,
    pub address: String,
    pub certificate: CertStatus,
    pub clustering: Clustering,
    pub failure: Option<FailureKind>,
    /// The peer's system name, from its hello.
    pub system_name: Option<String>,
    /// The IP the address resolved to, when it is not an IP already.
    pub resolved: Option<IpAddr>,
    pub rtt_ms: Option<f64>,
    pub software_version: Option<String>,
    /// Wall clock of the last frame from the peer, Unix milliseconds.
    pub last_contact_ms: Option<u64>,
    /// The peer's clock minus ours, estimated from heartbeats.
    pub clock_skew_ms: Option<i64>,
    /// The TLS verification mode the peer's last hello said it runs.
    #[serde(default)]
    pub tls_mode: Option<TlsMode>,
}

impl PeerStatus {
    pub fn new(index: usize, address: &str) -> Self {
        Self {
            index,
            address: address.to_string(),
            certificate: CertStatus::Unknown,
            clustering: Clustering::Unknown,
            failure: None,
            system_name: None,
            resolved: None,
            rtt_ms: None,
            software_version: None,
            last_contact_ms: None,
            clock_skew_ms: None,
            tls_mode: None,
        }
    }

    pub fn is_active(&self) -> bool {
        self.clustering == Clustering::Active
    }

    /// `Active as expc01 (Resolved 'expc01.apolo.local' as '10.15.13.15')`, `Failed (…)`.
    pub fn clustering_text(&self) -> String {
        match &self.clustering {
            Clustering::ThisSystem => "This system".into(),
            Clustering::Unknown => "Unknown".into(),
            Clustering::Failed(reason) => format!("Failed ({reason})"),
            Clustering::Active => {
                let name = self.system_name.as_deref().unwrap_or(&self.address);
                match self.resolved {
                    Some(ip) if self.address.parse::<IpAddr>().is_err() => {
                        format!("Active as {name} (Resolved '{}' as '{ip}')", self.address)
                    }
                    _ => format!("Active as {name}"),
                }
            }
        }
    }
}

/// A snapshot of the whole mesh as this node sees it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MeshView {
    pub cluster_name: String,
    pub configuration_primary: usize,
    pub ip_version: IpVersion,
    pub tls_mode: TlsMode,
    pub self_index: usize,
    pub peers: Vec<PeerStatus>,
}

impl MeshView {
    pub fn peer(&self, index: usize) -> &PeerStatus {
        &self.peers[index - 1]
    }

    /// Every other peer is Active.
    pub fn all_active(&self) -> bool {
        self.peers
            .iter()
            .all(|p| p.index == self.self_index || p.is_active())
    }
}

impl fmt::Display for PeerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Certificate: {} Clustering: {}",
            self.certificate,
            self.clustering_text()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_follow_the_seed() {
        let mut p = PeerStatus::new(1, "expc01.apolo.local");
        p.clustering = Clustering::Active;
        p.system_name = Some("expc01".into());
        p.resolved = Some("10.15.13.15".parse().unwrap());
        p.certificate = CertStatus::Valid;
        assert_eq!(
            p.to_string(),
            "Certificate: Valid Clustering: Active as expc01 (Resolved 'expc01.apolo.local' as '10.15.13.15')"
        );
        let mut q = PeerStatus::new(2, "127.0.0.2");
        q.clustering = Clustering::Active;
        q.system_name = Some("peer2".into());
        q.resolved = Some("127.0.0.2".parse().unwrap());
        assert_eq!(q.clustering_text(), "Active as peer2");
        q.clustering = Clustering::Failed("no heartbeat for 800 ms".into());
        assert_eq!(q.clustering_text(), "Failed (no heartbeat for 800 ms)");
    }
}
