//! The alarms HA pairs add to the node's catalogue (docs/ha.md, section 11): 21020–21029.

use causeway_alarms::{alarm, AlarmType};

pub const HEARTBEAT_LOST: u32 = 21020;
pub const FAILED_OVER: u32 = 21021;
pub const NO_WITNESS: u32 = 21022;
pub const WITNESS_UNREACHABLE: u32 = 21023;
pub const REPLICATION_BEHIND: u32 = 21024;
pub const TWO_HOLDERS: u32 = 21025;
pub const ADDRESS_CONFLICT: u32 = 21026;
pub const CANNOT_MOVE: u32 = 21027;
pub const PAIRING_REFUSED: u32 = 21028;
pub const MANUAL_FAILOVER: u32 = 21029;

pub static ALARMS: &[AlarmType] = &[
    alarm!(21020, "ca05e0a1-0000-4000-8000-000000021020", Warning, "HA heartbeat lost",
        "HA heartbeat lost: the other member of the pair has not answered heartbeats for a second",
        "Check that the pair peer runs and that the health-monitor network between the two works"),
    alarm!(21021, "ca05e0a1-0000-4000-8000-000000021021", Warning, "HA failover done",
        "HA failover done: the secondary serves the virtual IP",
        "Bring the primary back and run 'causeway ha failback' (or wait for an automatic failback)"),
    alarm!(21022, "ca05e0a1-0000-4000-8000-000000021022", Warning, "HA pair has no witness",
        "HA pair has no witness: split brain cannot be ruled out",
        "Name a third peer as the pair's witness (ha.witness)"),
    alarm!(21023, "ca05e0a1-0000-4000-8000-000000021023", Warning, "HA witness unreachable",
        "HA witness unreachable: one more failure stops the virtual IP",
        "Check that the witness peer runs and is reachable on the cluster port"),
    alarm!(21024, "ca05e0a1-0000-4000-8000-000000021024", Warning, "HA replication behind",
        "HA replication behind: the member that does not hold has not copied the holder's files for 10 s, or a file cannot be copied",
        "See the reason; a file over 256 MiB, or more than 4 GiB or 100,000 files, is not replicated: move it out of the files directory"),
    alarm!(21025, "ca05e0a1-0000-4000-8000-000000021025", Critical, "HA virtual IP held by two nodes",
        "HA virtual IP held by two nodes: both members of the pair report the virtual IP on an interface",
        "Check for an address added by hand ('ip address show'); the member without the lease removes it by itself"),
    alarm!(21026, "ca05e0a1-0000-4000-8000-000000021026", Error, "HA virtual IP in use by another host",
        "HA virtual IP in use by another host: while this node holds the virtual IP, another machine on the link claims it in ARP",
        "Find the host with the MAC address named in the reason and remove the address from it: clients may be reaching it instead of the pair. The alarm clears 30 s after the last claim"),
    alarm!(21027, "ca05e0a1-0000-4000-8000-000000021027", Error, "HA virtual IP cannot be moved",
        "HA virtual IP cannot be moved: adding or removing the address failed, or the address keeper cannot run",
        "Run the node as root (or grant CAP_NET_ADMIN and CAP_NET_RAW) and check the health-monitor interface"),
    alarm!(21028, "ca05e0a1-0000-4000-8000-000000021028", Error, "HA pairing refused",
        "HA pairing refused: the pair's settings, versions or capacity classes do not match",
        "Correct the [ha] section named in the reason on one of the two nodes and restart it"),
    alarm!(21029, "ca05e0a1-0000-4000-8000-000000021029", Warning, "HA primary down: manual failover required",
        "HA primary down: manual failover required: the failover type is Manual and the primary is silent",
        "Run 'causeway ha failover' on the secondary, or bring the primary back"),
];

/// Adds the alarms to the node's catalogue (idempotent).
pub fn register() {
    if let Err(e) = causeway_alarms::register(ALARMS) {
        tracing::error!(target: crate::LOG, reason = %e, "HA alarms not registered");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn alarms_register_without_clashes() {
        causeway_alarms::register(super::ALARMS).unwrap();
    }
}
