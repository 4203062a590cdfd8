//! Does a peer's hello describe the same cluster as ours? (EX-3, EX-11)

use serde::{Deserialize, Serialize};

use crate::wire::Hello;

/// The field a refusal is about, so alarms and tests need not parse the text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseField {
    ProtocolVersion,
    ClusterName,
    SoftwareVersion,
    PeerList,
    /// No longer sent (the primary moves at run time); kept so the variants after it keep
    /// their wire numbers.
    ConfigurationPrimary,
    IpVersion,
    TlsMode,
    PeerIndex,
    SourceAddress,
    Certificate,
    Malformed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub field: RefuseField,
    pub reason: String,
}

impl Refusal {
    pub fn new(field: RefuseField, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// Compares the cluster-wide settings of two hellos, in the order of `docs/mesh.md`. The
/// reason names the field and both values by peer number, so it reads the same on both
/// sides of the link. `same_system(i)` says whether peer-list entry `i` (0-based), spelled
/// differently on the two sides, names one system anyway (EX-8: an address being changed
/// one peer at a time, e.g. from its IP to its name).
pub fn check_hello(
    ours: &Hello,
    theirs: &Hello,
    same_system: &dyn Fn(usize) -> bool,
) -> Result<(), Refusal> {
    // By peer number; when both call themselves the same number (their lists are in
    // another order), by system name too, so the two values are told apart.
    let label = |h: &Hello| {
        if ours.peer_index == theirs.peer_index {
            format!("Peer {} ({})", h.peer_index, h.system_name)
        } else {
            format!("Peer {}", h.peer_index)
        }
    };
    let (me, them) = (label(ours), label(theirs));
    let differs = |field, name: &str, a: &dyn std::fmt::Display, b: &dyn std::fmt::Display| {
        Err(Refusal::new(
            field,
            format!("{name} differs: '{a}' on {me}, '{b}' on {them}"),
        ))
    };
    if ours.protocol_version != theirs.protocol_version {
        return differs(
            RefuseField::ProtocolVersion,
            "protocol version",
            &ours.protocol_version,
            &theirs.protocol_version,
        );
    }
    if ours.cluster_name != theirs.cluster_name {
        return differs(
            RefuseField::ClusterName,
            "cluster name",
            &ours.cluster_name,
            &theirs.cluster_name,
        );
    }
    if ours.software_version != theirs.software_version {
        return differs(
            RefuseField::SoftwareVersion,
            "software version",
            &ours.software_version,
            &theirs.software_version,
        );
    }
    if ours.peers.len() != theirs.peers.len() {
        return Err(Refusal::new(
            RefuseField::PeerList,
            format!(
                "peer list differs: {} peers on {me}, {} on {them}",
                ours.peers.len(),
                theirs.peers.len()
            ),
        ));
    }
    if let Some(i) = ours
        .peers
        .iter()
        .zip(&theirs.peers)
        .enumerate()
        .position(|(i, (a, b))| !a.eq_ignore_ascii_case(b) && !same_system(i))
    {
        return Err(Refusal::new(
            RefuseField::PeerList,
            format!(
                "peer list differs at Peer {} address: '{}' on {me}, '{}' on {them} (every peer must list the same addresses in the same order; a name and an address may differ only when the name resolves to that address)",
                i + 1,
                ours.peers[i],
                theirs.peers[i]
            ),
        ));
    }
    // The configuration primary is not compared: it moves at run time (EX-7) and a peer
    // that missed the move must still get in to learn it. Replication raises 20017 while
    // two peers disagree.
    if ours.ip_version != theirs.ip_version {
        return differs(
            RefuseField::IpVersion,
            "cluster IP version",
            &ours.ip_version,
            &theirs.ip_version,
        );
    }
    if ours.tls_mode != theirs.tls_mode {
        return differs(
            RefuseField::TlsMode,
            "TLS verification mode",
            &ours.tls_mode,
            &theirs.tls_mode,
        );
    }
    let n = ours.peers.len() as u16;
    if theirs.peer_index == 0 || theirs.peer_index > n || theirs.peer_index == ours.peer_index {
        return Err(Refusal::new(
            RefuseField::PeerIndex,
            format!(
                "the caller says it is Peer {}, which is not another peer of this {n}-peer cluster",
                theirs.peer_index
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::IpVersion;
    use causeway_pki::TlsMode;

    fn hello(index: u16) -> Hello {
        Hello {
            protocol_version: 1,
            software_version: "1.0".into(),
            cluster_name: "c.lab".into(),
            peer_index: index,
            system_name: format!("peer{index}"),
            peers: vec!["10.0.0.1".into(), "10.0.0.2".into(), "10.0.0.3".into()],
            configuration_primary: 1,
            ip_version: IpVersion::IPv4,
            tls_mode: TlsMode::Enforce,
            wall_ms: 0,
        }
    }

    #[test]
    fn same_cluster_is_accepted() {
        assert_eq!(check_hello(&hello(1), &hello(2), &|_| false), Ok(()));
    }

    #[test]
    fn each_difference_is_named() {
        type Change = Box<dyn Fn(&mut Hello)>;
        let cases: Vec<(Change, RefuseField, &str)> = vec![
            (
                Box::new(|h| h.cluster_name = "other".into()),
                RefuseField::ClusterName,
                "cluster name differs: 'c.lab' on Peer 1, 'other' on Peer 2",
            ),
            (
                Box::new(|h| h.software_version = "2.0".into()),
                RefuseField::SoftwareVersion,
                "software version differs: '1.0' on Peer 1, '2.0' on Peer 2",
            ),
            (
                Box::new(|h| h.peers.swap(1, 2)),
                RefuseField::PeerList,
                "peer list differs at Peer 2 address: '10.0.0.2' on Peer 1, '10.0.0.3' on Peer 2",
            ),
            (
                Box::new(|h| h.peers.pop().map(drop).unwrap_or(())),
                RefuseField::PeerList,
                "peer list differs: 3 peers on Peer 1, 2 on Peer 2",
            ),
            (
                Box::new(|h| h.ip_version = IpVersion::IPv6),
                RefuseField::IpVersion,
                "cluster IP version differs: 'IPv4' on Peer 1, 'IPv6' on Peer 2",
            ),
            (
                Box::new(|h| h.tls_mode = TlsMode::Permissive),
                RefuseField::TlsMode,
                "TLS verification mode differs: 'Enforce' on Peer 1, 'Permissive' on Peer 2",
            ),
        ];
        for (change, field, text) in cases {
            let mut theirs = hello(2);
            change(&mut theirs);
            let r = check_hello(&hello(1), &theirs, &|_| false).unwrap_err();
            assert_eq!(r.field, field);
            assert!(r.reason.starts_with(text), "{} vs {text}", r.reason);
        }
    }

    /// Lists in another order: both sides call themselves Peer 2; the values are still
    /// told apart, by system name.
    #[test]
    fn peers_with_the_same_number_are_told_apart_by_name() {
        let mut ours = hello(2);
        ours.system_name = "expc02".into();
        let mut theirs = hello(2);
        theirs.system_name = "expc03".into();
        theirs.peers.swap(1, 2);
        let r = check_hello(&ours, &theirs, &|_| false).unwrap_err();
        assert!(
            r.reason.starts_with(
                "peer list differs at Peer 2 address: '10.0.0.2' on Peer 2 (expc02), '10.0.0.3' on Peer 2 (expc03)"
            ),
            "{}",
            r.reason
        );
    }

    #[test]
    fn impossible_indexes_are_refused() {
        for index in [0, 1, 4] {
            let r = check_hello(&hello(1), &hello(index), &|_| false).unwrap_err();
            assert_eq!(r.field, RefuseField::PeerIndex);
        }
    }
}
