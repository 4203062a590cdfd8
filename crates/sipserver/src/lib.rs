//! The clustered SIP registrar and proxy (SV-1…SV-4; see `docs/sip.md`).
#![forbid(unsafe_code)]

pub mod admission;
mod auth;
mod authenticator;
pub mod catalogue;
pub mod dns;
pub mod dns_responder;
mod guard;
pub mod licences;
pub mod location;
pub mod metrics;
mod pacer;
mod proxy;
mod registrar;
mod relay;
mod respond;
pub mod routing;
mod service;
pub mod status;
pub mod transport;
mod uac_auth;
mod zones;

pub use service::{SipService, SipSettings};
pub use transport::{Caps, Proto};

/// On a peer without a `[sip]` section: a member of the `calls` lease group that votes and
/// never stands, so the peers that do run SIP keep a majority (and their admission lease)
/// whichever peers carry SIP.
pub fn start_witness(node: &causeway_cluster::Node) {
    use causeway_consensus::LeaderLease as _;
    let leases = node.leases();
    match leases.start_group(admission::LEASE, leases.all_peers()) {
        Ok(group) => group.set_eligible(false),
        Err(e) => tracing::warn!(target: "developer.sip", reason = %e,
            "The calls lease group did not start on this peer"),
    }
}
