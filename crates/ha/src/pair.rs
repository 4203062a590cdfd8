//! What pair members and the witness say to each other on the mesh (docs/ha.md, sections 1,
//! 2 and 8), and the pair's settings as the primary gives them to its secondary.

use std::net::IpAddr;

use causeway_cluster::{CapacityClass, HaMode, HaSection};
use causeway_mesh::rpc::Endpoint;
use serde::{Deserialize, Serialize};

use crate::transitions::HaState;

/// The lease of a pair: 25 ms heartbeats, held 100 ms after each confirmed round, no vote
/// for another holder before 150 ms of silence (docs/ha.md, section 3).
pub fn lease_timing() -> causeway_consensus::LeaseTiming {
    use std::time::Duration;
    causeway_consensus::LeaseTiming {
        heartbeat: Duration::from_millis(25),
        election_timeout_min: Duration::from_millis(100),
        election_timeout_max: Duration::from_millis(150),
        renew: Duration::from_millis(25),
    }
}

/// The primary's settings for its pair: the secondary learns them at pairing and keeps them,
/// so it can take over a primary it can no longer reach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairSettings {
    pub vip: IpAddr,
    pub prefix: u8,
    pub failover: HaMode,
    pub failback: HaMode,
    pub failover_wait_ms: u64,
    pub guard_window_s: u64,
}

impl PairSettings {
    /// From a primary's `[ha]` section (checked at load, so the netmask parses).
    pub fn of_primary(section: &HaSection) -> Option<Self> {
        let vip = section.virtual_ip?;
        let prefix = causeway_cluster::ha_prefix_len(section.netmask.as_deref()?, vip).ok()?;
        Some(Self {
            vip,
            prefix,
            failover: section.failover,
            failback: section.failback,
            failover_wait_ms: section.failover_wait_ms,
            guard_window_s: section.guard_window_s,
        })
    }
}

/// Who is in a pair, by peer number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    pub primary: usize,
    pub secondary: usize,
    /// A peer number; 0: the pair has no witness; [`CLUSTER_WITNESS`]: every other peer of
    /// the cluster votes (`witness = "cluster"`).
    pub witness: usize,
    /// The number of peers in the cluster (for a cluster witness).
    #[serde(default)]
    pub cluster: usize,
}

/// `witness = "cluster"`: the pair's majority is the whole peer cluster's.
pub const CLUSTER_WITNESS: usize = usize::MAX;

impl Members {
    /// The lease group's voters (a pair without a witness has `witness` 0).
    pub fn voters(&self) -> Vec<usize> {
        if self.witness == CLUSTER_WITNESS {
            return (1..=self.cluster).collect();
        }
        [self.primary, self.secondary, self.witness]
            .into_iter()
            .filter(|&m| m != 0)
            .collect()
    }

    /// Whether `peer` witnesses this pair (a voter that is not a member).
    pub fn is_witness(&self, peer: usize) -> bool {
        peer != self.primary && peer != self.secondary && self.voters().contains(&peer)
    }

    /// A primary after `unpair`: no secondary, no witness; it keeps its address alone.
    pub fn standalone(primary: usize) -> Self {
        Self {
            primary,
            secondary: 0,
            witness: 0,
            cluster: 0,
        }
    }

    /// The lease group's name: `ha/<primary's peer number>`.
    pub fn group(&self) -> String {
        format!("ha/{}", self.primary)
    }
}

/// The witness a pair uses when the section names none: the lowest peer outside the pair.
pub fn default_witness(peers: usize, primary: usize, secondary: usize) -> Option<usize> {
    (1..=peers).find(|&p| p != primary && p != secondary)
}

/// `ha/hello`: a pair member introduces the pair to the other member and to the witness.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    pub members: Members,
    pub version: String,
    pub capacity: CapacityClass,
    /// Where the sender takes direct-connect heartbeats for this pair, if it has a cable.
    pub direct: Option<std::net::SocketAddr>,
    /// The primary's settings, when the primary says hello (after `ha configure`, at once).
    pub settings: Option<PairSettings>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HelloAnswer {
    /// The primary's settings, when the answer comes from the primary.
    pub settings: Option<PairSettings>,
    pub capacity: CapacityClass,
    pub direct: Option<std::net::SocketAddr>,
}

pub fn hello() -> Endpoint<Hello, HelloAnswer> {
    Endpoint::new("ha/hello")
}

/// `ha/hb/<pair>`: sent every 25 ms to each other member; the answer is the same shape.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Beat {
    pub seq: u64,
    /// The sender's state for the pair (`None` on the witness).
    pub state: Option<HaState>,
    /// The lease generation the sender holds the address at, if it has it.
    pub vip_at: Option<u64>,
    /// The sender's copy of the holder's files is complete (the holder: always).
    pub in_sync: bool,
    /// The sender keeps a copy of the pair's files (it has files in it).
    pub has_copy: bool,
}

pub fn heartbeat(pair: usize) -> Endpoint<Beat, Beat> {
    Endpoint::new(format!("ha/hb/{pair}"))
}

/// `ha/prevote/<pair>`: "may I stand?" Answered yes only by a member that has not heard
/// the holder for the failover wait less 20 ms either.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Prevote {
    pub failover_wait_ms: u64,
}

pub fn prevote(pair: usize) -> Endpoint<Prevote, ()> {
    Endpoint::new(format!("ha/prevote/{pair}"))
}

/// `ha/handover/<pair>`: the holder hands the address over (switchover), or the primary
/// asks the secondary that holds to give it back (failback).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Handover {
    /// "I have released: take it." (switchover, graceful shutdown)
    Take,
    /// "Release it to me." (failback)
    GiveBack { force: bool },
}

pub fn handover(pair: usize) -> Endpoint<Handover, String> {
    Endpoint::new(format!("ha/handover/{pair}"))
}

/// `ha/unpair`: "unpair `pair`": the other member leaves the pair on its side.
pub fn unpair() -> Endpoint<usize, String> {
    Endpoint::new("ha/unpair")
}

/// Direct-connect heartbeats (docs/ha.md, section 8): UDP on the cable between the pair,
/// port `DIRECT_PORT_BASE + pair`. They say only whether the peer is alive (Heartbeat
/// status is Up if either path answers); the lease never rides on them.
pub const DIRECT_PORT_BASE: u16 = 4380;
const DIRECT_MAGIC: &[u8; 4] = b"CWHB";
pub const DIRECT_PING: u8 = 1;
pub const DIRECT_PONG: u8 = 2;

/// One direct heartbeat: magic, kind, pair, sequence: 15 bytes.
pub fn direct_frame(kind: u8, pair: u16, seq: u64) -> [u8; 15] {
    let mut f = [0u8; 15];
    f[0..4].copy_from_slice(DIRECT_MAGIC);
    f[4] = kind;
    f[5..7].copy_from_slice(&pair.to_be_bytes());
    f[7..15].copy_from_slice(&seq.to_be_bytes());
    f
}

/// `(kind, pair, seq)` of a direct heartbeat; anything else is not one.
pub fn parse_direct(frame: &[u8]) -> Option<(u8, u16, u64)> {
    if frame.len() != 15 || &frame[0..4] != DIRECT_MAGIC {
        return None;
    }
    let kind = frame[4];
    if kind != DIRECT_PING && kind != DIRECT_PONG {
        return None;
    }
    let pair = u16::from_be_bytes([frame[5], frame[6]]);
    let seq = u64::from_be_bytes(frame[7..15].try_into().ok()?);
    Some((kind, pair, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_direct_heartbeat_round_trips_and_garbage_is_not_one() {
        let f = direct_frame(DIRECT_PING, 4, 99);
        assert_eq!(parse_direct(&f), Some((DIRECT_PING, 4, 99)));
        assert_eq!(parse_direct(&f[..14]), None);
        let mut bad = f;
        bad[4] = 7;
        assert_eq!(parse_direct(&bad), None);
        assert_eq!(parse_direct(b"GET / HTTP/1.1\r\n\r\n"), None);
    }
}
