use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Critical => "critical",
        }
    }
}

/// One kind of alarm. `detail` is the seed's `Detail="…"` text; `action` says what to do.
#[derive(Debug, Serialize)]
pub struct AlarmType {
    pub id: u32,
    pub uuid: &'static str,
    pub severity: Severity,
    pub title: &'static str,
    pub detail: &'static str,
    pub action: &'static str,
}

/// One catalogue entry: `alarm!(id, uuid, Severity, title, detail, action)`.
#[macro_export]
macro_rules! alarm {
    ($id:expr, $uuid:expr, $sev:ident, $title:expr, $detail:expr, $action:expr) => {
        $crate::AlarmType {
            id: $id,
            uuid: $uuid,
            severity: $crate::Severity::$sev,
            title: $title,
            detail: $detail,
            action: $action,
        }
    };
}

pub static CATALOGUE: &[AlarmType] = &[
    alarm!(20003, "8f3c3c0e-2a57-4f0e-9d0b-3c1a1f6a2003", Error, "Invalid clustering configuration",
        "Invalid clustering configuration: this system's own address is missing from the peer list, or an address is listed twice",
        "Make the peer list identical on every peer, with this system's address in it exactly once"),
    alarm!(20004, "3bca6888-f622-11df-93be-07cc953d7b99", Warning, "Cluster communication failure",
        "Cluster communication failure: The system is unable to communicate with one or more of the cluster peers",
        "Check that every peer is running and reachable on the cluster port; the peer's clustering status gives the reason"),
    alarm!(20005, "5a8e4f0b-6c2d-4b7e-8a1f-0e9d7c6b2005", Warning, "Invalid peer address",
        "Invalid peer address: one or more peer addresses could not be resolved",
        "Correct the peer address, or the DNS records or cluster address mapping for it; resolution is retried on every connection attempt"),
    alarm!(20006, "0f96695e-d954-4f6f-85c1-2ef1eae6f764", Warning, "Cluster database communication failure",
        "Cluster database communication failure: The database is unable to replicate with one or more of the cluster peers",
        "Check the replication status of each peer"),
    alarm!(20007, "e2b8e3d1-b731-4d7d-b606-4682a8f0c2e6", Warning, "Restart required",
        "Restart required: Cluster configuration has been changed, however a restart is required for this to take effect",
        "Restart this peer"),
    alarm!(20008, "2c7e9a4d-1b3f-4e6a-9c8d-7f0a5b4c2008", Warning, "Replication paused",
        "Replication paused: upgrade in progress",
        "Finish upgrading every peer to the same software version"),
    alarm!(20009, "6d1f8b2e-3a4c-4d5e-8f7a-9b0c1d2e2009", Warning, "Cluster replication error",
        "Cluster replication error: an error occurred during automatic replication; manual synchronization of configuration is required",
        "Run 'xcommand ForceConfigUpdate' on this peer"),
    alarm!(20030, "5c8e2a7d-9b1f-4c3e-8a6d-0f2b4d6e2030", Warning, "Cluster lease error",
        "Cluster lease error: this peer's records of a lease group were unreadable and were reset; it takes part again once it has heard a leader chosen without it",
        "Nothing while the other peers of the group are up: the alarm clears by itself within seconds. If it stays, bring the group's other peers back: until then this peer does not vote in the group"),
    alarm!(20011, "7e2a9c3f-4b5d-4e6f-9a8b-0c1d2e3f2011", Warning, "Cluster replication error",
        "Cluster replication error: this peer's configuration conflicts with the primary's configuration, manual synchronization of configuration is required",
        "Run 'xcommand ForceConfigUpdate' on this peer"),
    alarm!(20012, "8f3b0d4a-5c6e-4f7a-8b9c-1d2e3f4a2012", Warning, "Cluster replication error",
        "Cluster replication error: the cluster settings of this peer and a peer it talks to differ (the peer and the setting are named in the reason), manual synchronization of configuration is required",
        "Make the setting named in the reason the same on both peers: change it on the one that differs from the rest of the cluster"),
    alarm!(20014, "9a4c1e5b-6d7f-4a8b-9c0d-2e3f4a5b2014", Warning, "Cluster replication error",
        "Cluster replication error: the primary or this subordinate peer's configuration file was not found, manual synchronization of configuration is required",
        "Run 'xcommand ForceConfigUpdate' on this peer"),
    alarm!(20015, "0b5d2f6c-7e8a-4b9c-8d1e-3f4a5b6c2015", Warning, "Cluster replication error",
        "Cluster replication error: this peer is not in the peer list, manual synchronization of configuration is required",
        "Add this system's address to the peer list on every peer"),
    alarm!(20016, "1c6e3a7d-8f9b-4c0d-9e2f-4a5b6c7d2016", Warning, "Cluster replication error",
        "Cluster replication error: the configuration primary peer is unreachable",
        "Bring the configuration primary back, or make another peer the primary"),
    alarm!(20017, "2d7f4b8e-9a0c-4d1e-8f3a-5b6c7d8e2017", Warning, "Cluster replication error",
        "Cluster replication error: the configuration primary ID is inconsistent, manual synchronization of configuration is required",
        "Set the same configuration primary on every peer"),
    alarm!(20019, "3e8a5c9f-0b1d-4e2f-9a4b-6c7d8e9f2019", Warning, "Cluster name not configured",
        "Cluster name not configured: a cluster name (FQDN for provisioning) is required",
        "Set the cluster name on the configuration primary"),
    alarm!(20021, "4f9b6d0a-1c2e-4f3a-8b5c-7d8e9f0a2021", Warning, "Cluster communication failure",
        "Cluster communication failure: the system is unable to open a TCP connection to one or more cluster peers on the cluster ports",
        "Check that the peer is running, and that no firewall blocks the cluster port between the peers"),
    alarm!(20024, "5a0c7e1b-2d3f-4a4b-9c6d-8e9f0a1b2024", Error, "Cluster configuration inconsistent",
        "Cluster configuration inconsistent: rebuild required",
        "Restore this peer from a backup, or purge its cluster data and rejoin it"),
    alarm!(20025, "6b1d8f2c-3e4a-4b5c-8d7e-9f0a1b2c2025", Critical, "Database failure",
        "Failed to synchronise the database on a node",
        "Take a snapshot, remove the peer from the cluster, restore it from backup and rejoin it"),
    alarm!(21001, "7c2e9a3d-4f5b-4c6d-9e8f-0a1b2c3d1001", Warning, "Cluster peer round trip delay high",
        "Cluster peer round trip delay high: the round trip time to one or more peers is above 80 ms",
        "Move the peers closer together in the network; clustering supports at most 80 ms round trip"),
    alarm!(21002, "8d3f0b4e-5a6c-4d7e-8f9a-1b2c3d4e1002", Warning, "Cluster software version mismatch",
        "Cluster software version mismatch: one or more peers run a different software version and are refused",
        "Upgrade every peer to the same software version"),
    alarm!(21003, "9e4a1c5f-6b7d-4e8f-9a0b-2c3d4e5f1003", Warning, "Cluster clock skew",
        "Cluster clock skew: the clock of one or more peers differs from this system's clock",
        "Configure the same NTP servers on every peer"),
    alarm!(21004, "0f5b2d6a-7c8e-4f9a-8b1c-3d4e5f6a1004", Warning, "Invalid cluster peer certificate",
        "Invalid cluster peer certificate: the certificate of one or more peers does not match their peer address or is not trusted",
        "Issue the peer a certificate whose CN or SAN is its peer address, signed by the cluster's CA"),
    alarm!(21005, "a97c6d57-6fa1-4f3a-b0b0-26220544dec5", Warning, "Failed to update key file",
        "Failed to update key file: the system key that encrypts this peer's secrets at rest could not be created or changed",
        "Run 'xcommand ForceSystemKeyUpdate' on this peer"),
];

/// Alarm types added by the services hosted on the node (their own catalogues), beside the
/// node's own `CATALOGUE`.
static REGISTERED: std::sync::RwLock<Vec<&'static [AlarmType]>> =
    std::sync::RwLock::new(Vec::new());

/// Adds a service's alarm types. Registering the same list again changes nothing; an ID
/// already taken by another type is refused with the ID named.
pub fn register(alarms: &'static [AlarmType]) -> Result<(), String> {
    let mut registered = REGISTERED.write().unwrap_or_else(|p| p.into_inner());
    if registered.iter().any(|r| std::ptr::eq(*r, alarms)) {
        return Ok(());
    }
    if let Some(taken) = alarms.iter().find(|a| {
        CATALOGUE
            .iter()
            .chain(registered.iter().flat_map(|r| r.iter()))
            .any(|b| b.id == a.id)
    }) {
        return Err(format!("alarm {} is already in the catalogue", taken.id));
    }
    registered.push(alarms);
    Ok(())
}

pub fn lookup(id: u32) -> Option<&'static AlarmType> {
    if let Some(a) = CATALOGUE.iter().find(|a| a.id == id) {
        return Some(a);
    }
    let registered = REGISTERED.read().unwrap_or_else(|p| p.into_inner());
    registered
        .iter()
        .flat_map(|r| r.iter())
        .find(|a| a.id == id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_and_uuids_are_unique_and_well_formed() {
        let mut ids = HashSet::new();
        let mut uuids = HashSet::new();
        for a in CATALOGUE {
            assert!(ids.insert(a.id), "duplicate id {}", a.id);
            assert!(uuids.insert(a.uuid), "duplicate uuid {}", a.uuid);
            let parts: Vec<_> = a.uuid.split('-').map(str::len).collect();
            assert_eq!(parts, [8, 4, 4, 4, 12], "uuid of {}", a.id);
            assert!(a.uuid.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
        }
    }

    /// 20012 is raised on whichever peer refuses another for differing cluster settings,
    /// the configuration primary included: its text must read true there too.
    #[test]
    fn the_cluster_settings_alarm_reads_true_on_the_primary() {
        let a = lookup(20012).unwrap();
        assert_eq!(a.title, "Cluster replication error");
        for text in [a.detail, a.action] {
            assert!(!text.contains("primary"), "{text}");
        }
        assert!(
            a.detail.contains("this peer and a peer it talks to differ"),
            "{}",
            a.detail
        );
        assert!(a.detail.contains("named in the reason"), "{}", a.detail);
    }

    #[test]
    fn seed_texts_are_kept() {
        let a = lookup(20004).unwrap();
        assert_eq!(a.uuid, "3bca6888-f622-11df-93be-07cc953d7b99");
        assert_eq!(
            a.detail,
            "Cluster communication failure: The system is unable to communicate with one or more of the cluster peers"
        );
        assert_eq!(
            lookup(20006).unwrap().uuid,
            "0f96695e-d954-4f6f-85c1-2ef1eae6f764"
        );
        assert_eq!(
            lookup(20007).unwrap().uuid,
            "e2b8e3d1-b731-4d7d-b606-4682a8f0c2e6"
        );
    }
}
