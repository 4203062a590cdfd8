use std::fmt;
use std::time::Duration;

use causeway_pki::TlsMode;
use serde::{Deserialize, Serialize};

/// The most peers one cluster may list. Expressway stops at 6; nothing in Causeway depends on
/// the number beyond this constant.
pub const MAX_PEERS: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum IpVersion {
    #[default]
    IPv4,
    IPv6,
}

impl fmt::Display for IpVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpVersion::IPv4 => "IPv4",
            IpVersion::IPv6 => "IPv6",
        })
    }
}

/// Timings of the mesh. The defaults detect a dead peer within 800 ms (at once when its
/// kernel closes the socket) and survive 3 lost heartbeats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timing {
    pub heartbeat_interval: Duration,
    pub failure_timeout: Duration,
    pub connect_timeout: Duration,
    /// TLS handshake, and separately the hello exchange, must each finish within this.
    pub handshake_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub rtt_warning: Duration,
    pub clock_skew_warning: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(200),
            failure_timeout: Duration::from_millis(800),
            connect_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(50),
            // A restarted peer waits for the others to dial it: at most this long.
            backoff_max: Duration::from_secs(1),
            rtt_warning: Duration::from_millis(80),
            clock_skew_warning: Duration::from_secs(2),
        }
    }
}

/// What a peer must agree on with every other peer (EX-1, EX-3), plus its own place in the
/// list. Validated by the caller (the `cluster` crate) before the mesh starts.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    pub cluster_name: String,
    /// Peer addresses as written on the Clustering page: Peer 1 is `peers[0]`.
    pub peers: Vec<String>,
    /// This system's peer number, 1-based.
    pub self_index: usize,
    /// The configuration primary's peer number, 1-based.
    pub configuration_primary: usize,
    pub ip_version: IpVersion,
    pub tls_mode: TlsMode,
    pub port: u16,
    pub system_name: String,
    pub software_version: String,
    pub timing: Timing,
}

impl ClusterSettings {
    /// The address of peer `index` (1-based).
    pub fn address(&self, index: usize) -> &str {
        &self.peers[index - 1]
    }
}
