//! Which alarms the mesh view calls for. A pure function of the view (and, for the
//! hysteresis of the warnings, of what is raised now), so a steady state cannot flap.

use causeway_mesh::{CertStatus, Clustering, FailureKind, MeshView, RefuseField, Timing};

/// The alarm IDs this module decides; the node leaves every other ID alone.
pub const MANAGED_ALARMS: &[u32] = &[
    20004, 20005, 20006, 20012, 20021, 21001, 21002, 21003, 21004,
];

/// `(id, subject, reason)` for every alarm the view calls for. `raised(id, subject)` says
/// whether an alarm is raised now. `settled` is false during the first seconds after start,
/// when peers that dial us have not had time to do so.
pub fn peer_alarms(
    view: &MeshView,
    timing: &Timing,
    settled: bool,
    raised: &dyn Fn(u32, &str) -> bool,
) -> Vec<(u32, String, String)> {
    let mut out = Vec::new();
    let rtt_warn = timing.rtt_warning.as_secs_f64() * 1000.0;
    let skew_warn = timing.clock_skew_warning.as_millis() as i64;
    for p in &view.peers {
        let subject = p.address.clone();
        if let CertStatus::Invalid(why) = &p.certificate {
            let whose = if p.index == view.self_index {
                "this system, "
            } else {
                ""
            };
            out.push((
                21004,
                subject.clone(),
                format!("{whose}Peer {} ({}): {why}", p.index, p.address),
            ));
        }
        if p.index == view.self_index {
            continue;
        }
        match &p.clustering {
            // Peers started together refuse each other's first dials for a moment: until the
            // start-up window has passed, connection failures of a peer that never connected
            // (no hello yet, so no system name) are not alarms. A peer that was up and died is.
            Clustering::Failed(_)
                if !settled
                    && p.system_name.is_none()
                    && matches!(p.failure, Some(FailureKind::Connect | FailureKind::Resolve)) => {}
            Clustering::Failed(reason) => {
                out.push((
                    20004,
                    subject.clone(),
                    format!("Peer {} ({}): {reason}", p.index, p.address),
                ));
                match p.failure {
                    // A peer this system has clustered with and lost: the seed's pair, with
                    // replication unable to reach it (20006). One never reached since this
                    // system started: nothing opens a TCP connection to its cluster port
                    // (a firewall, or it is not running), 20021.
                    Some(FailureKind::Connect) if p.system_name.is_some() => out.push((
                        20006,
                        format!("Peer {}", p.index),
                        format!(
                            "cannot replicate with Peer {} ({}): {reason}",
                            p.index, p.address
                        ),
                    )),
                    Some(FailureKind::Connect) => {
                        out.push((20021, subject.clone(), reason.clone()))
                    }
                    Some(FailureKind::Resolve) => {
                        out.push((20005, subject.clone(), reason.clone()))
                    }
                    Some(FailureKind::Refused(
                        RefuseField::SoftwareVersion | RefuseField::ProtocolVersion,
                    )) => out.push((21002, subject.clone(), reason.clone())),
                    Some(FailureKind::Refused(
                        RefuseField::ClusterName
                        | RefuseField::PeerList
                        | RefuseField::IpVersion
                        | RefuseField::TlsMode,
                    )) => out.push((20012, subject.clone(), reason.clone())),
                    _ => {}
                }
            }
            Clustering::Unknown if settled => {
                out.push((
                    20004,
                    subject.clone(),
                    format!(
                        "Peer {} ({}): no connection since this system started",
                        p.index, p.address
                    ),
                ));
            }
            _ => {}
        }
        if p.is_active() {
            if let Some(rtt) = p.rtt_ms {
                let limit = if raised(21001, &subject) {
                    rtt_warn * 0.9
                } else {
                    rtt_warn
                };
                if rtt > limit {
                    out.push((21001, subject.clone(), format!("round trip to Peer {} ({}) is {rtt:.0} ms; at most {rtt_warn:.0} ms is supported", p.index, p.address)));
                }
            }
            if let Some(skew) = p.clock_skew_ms {
                let limit = if raised(21003, &subject) {
                    skew_warn / 2
                } else {
                    skew_warn
                };
                if skew.abs() > limit {
                    out.push((
                        21003,
                        subject.clone(),
                        format!(
                            "clock of Peer {} ({}) differs from this system's by {skew} ms",
                            p.index, p.address
                        ),
                    ));
                }
            }
        }
    }
    out
}
