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

/// The UUIDs the seed quotes (its logs show them for 20004, 20006 and 20007): kept as
/// they are, so a log reader matching on them keeps working.
pub const SEED_UUIDS: [&str; 3] = [
    "3bca6888-f622-11df-93be-07cc953d7b99",
    "0f96695e-d954-4f6f-85c1-2ef1eae6f764",
    "e2b8e3d1-b731-4d7d-b606-4682a8f0c2e6",
];

/// Every other alarm's UUID is Causeway's own, and looks it: a fixed prefix and the alarm's
/// ID in the last group (`ca05e0a1-0000-4000-8000-000000020003`), never a made-up value
/// that could pass for one of the seed's.
pub fn our_uuid(id: u32) -> String {
    format!("ca05e0a1-0000-4000-8000-{id:012}")
}

impl AlarmType {
    /// One of the UUIDs the seed quotes.
    pub fn uuid_is_seeds(&self) -> bool {
        SEED_UUIDS.contains(&self.uuid)
    }

    /// Causeway's own form for this alarm's ID.
    pub fn uuid_is_ours(&self) -> bool {
        self.uuid == our_uuid(self.id)
    }
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
    alarm!(20003, "ca05e0a1-0000-4000-8000-000000020003", Error, "Invalid clustering configuration",
        "Invalid clustering configuration: this system's own address is missing from the peer list, or an address is listed twice",
        "Make the peer list identical on every peer, with this system's address in it exactly once"),
    alarm!(20004, "3bca6888-f622-11df-93be-07cc953d7b99", Warning, "Cluster communication failure",
        "Cluster communication failure: The system is unable to communicate with one or more of the cluster peers",
        "Check that every peer is running and reachable on the cluster port; the peer's clustering status gives the reason"),
    alarm!(20005, "ca05e0a1-0000-4000-8000-000000020005", Warning, "Invalid peer address",
        "Invalid peer address: one or more peer addresses could not be resolved",
        "Correct the peer address, or the DNS records or cluster address mapping for it; resolution is retried on every connection attempt"),
    alarm!(20006, "0f96695e-d954-4f6f-85c1-2ef1eae6f764", Warning, "Cluster database communication failure",
        "Cluster database communication failure: The database is unable to replicate with one or more of the cluster peers",
        "Check the replication status of each peer"),
    alarm!(20007, "e2b8e3d1-b731-4d7d-b606-4682a8f0c2e6", Warning, "Restart required",
        "Restart required: Cluster configuration has been changed, however a restart is required for this to take effect",
        "Restart this peer"),
    alarm!(20008, "ca05e0a1-0000-4000-8000-000000020008", Warning, "Replication paused",
        "Replication paused: upgrade in progress",
        "Finish upgrading every peer to the same software version"),
    alarm!(20009, "ca05e0a1-0000-4000-8000-000000020009", Warning, "Cluster replication error",
        "Cluster replication error: an error occurred during automatic replication; manual synchronization of configuration is required",
        "Fix what the reason names (disk space, permissions of the data directory): saving is retried on every change and the alarm clears once one is saved. On a subordinate, 'xcommand ForceConfigUpdate' also takes the primary's copy whole"),
    alarm!(20030, "ca05e0a1-0000-4000-8000-000000020030", Warning, "Cluster lease error",
        "Cluster lease error: this peer's records of a lease group were unreadable and were reset; it takes part again once it has heard a leader chosen without it",
        "Nothing while the other peers of the group are up: the alarm clears by itself within seconds. If it stays, bring the group's other peers back: until then this peer does not vote in the group"),
    alarm!(20011, "ca05e0a1-0000-4000-8000-000000020011", Warning, "Cluster replication error",
        "Cluster replication error: this peer's configuration conflicts with the primary's configuration, manual synchronization of configuration is required",
        "Run 'xcommand ForceConfigUpdate' on this peer"),
    alarm!(20012, "ca05e0a1-0000-4000-8000-000000020012", Warning, "Cluster replication error",
        "Cluster replication error: the cluster settings of this peer and a peer it talks to differ (the peer and the setting are named in the reason), manual synchronization of configuration is required",
        "Make the setting named in the reason the same on both peers: change it on the one that differs from the rest of the cluster"),
    alarm!(20014, "ca05e0a1-0000-4000-8000-000000020014", Warning, "Cluster replication error",
        "Cluster replication error: the primary or this subordinate peer's configuration file was not found, manual synchronization of configuration is required",
        "Nothing while the other peers are reachable: this peer takes the configuration back from them (a primary from the peers holding its writes) and the alarm clears once it is in sync. The unreadable store is kept beside the new one for a post-mortem"),
    alarm!(20015, "ca05e0a1-0000-4000-8000-000000020015", Warning, "Cluster replication error",
        "Cluster replication error: this peer is not in the peer list, manual synchronization of configuration is required",
        "Add this system's address to the peer list on every peer"),
    alarm!(20016, "ca05e0a1-0000-4000-8000-000000020016", Warning, "Cluster replication error",
        "Cluster replication error: the configuration primary peer is unreachable",
        "Bring the configuration primary back, or make another peer the primary"),
    alarm!(20017, "ca05e0a1-0000-4000-8000-000000020017", Warning, "Cluster replication error",
        "Cluster replication error: the configuration primary ID is inconsistent, manual synchronization of configuration is required",
        "Set the same configuration primary on every peer"),
    alarm!(20019, "ca05e0a1-0000-4000-8000-000000020019", Warning, "Cluster name not configured",
        "Cluster name not configured: a cluster name (FQDN for provisioning) is required",
        "Set the cluster name on the configuration primary"),
    alarm!(20021, "ca05e0a1-0000-4000-8000-000000020021", Warning, "Cluster communication failure",
        "Cluster communication failure: the system is unable to open a TCP connection to one or more cluster peers on the cluster ports",
        "Check that the peer is running, and that no firewall blocks the cluster port between the peers"),
    alarm!(20024, "ca05e0a1-0000-4000-8000-000000020024", Error, "Cluster configuration inconsistent",
        "Cluster configuration inconsistent: rebuild required",
        "Restore this peer from a backup, or purge its cluster data and rejoin it"),
    alarm!(20025, "ca05e0a1-0000-4000-8000-000000020025", Critical, "Database failure",
        "Failed to synchronise the database on a node",
        "Take a snapshot, remove the peer from the cluster, restore it from backup and rejoin it"),
    alarm!(21001, "ca05e0a1-0000-4000-8000-000000021001", Warning, "Cluster peer round trip delay high",
        "Cluster peer round trip delay high: the round trip time to one or more peers is above 80 ms",
        "Move the peers closer together in the network; clustering supports at most 80 ms round trip"),
    alarm!(21002, "ca05e0a1-0000-4000-8000-000000021002", Warning, "Cluster software version mismatch",
        "Cluster software version mismatch: one or more peers run a different software version and are refused",
        "Upgrade every peer to the same software version"),
    alarm!(21003, "ca05e0a1-0000-4000-8000-000000021003", Warning, "Cluster clock skew",
        "Cluster clock skew: the clock of one or more peers differs from this system's clock",
        "Configure the same NTP servers on every peer"),
    alarm!(21004, "ca05e0a1-0000-4000-8000-000000021004", Warning, "Invalid cluster peer certificate",
        "Invalid cluster peer certificate: the certificate of one or more peers does not match their peer address or is not trusted",
        "Issue the peer a certificate whose CN or SAN is its peer address, signed by the cluster's CA"),
    alarm!(21005, "ca05e0a1-0000-4000-8000-000000021005", Warning, "Failed to update key file",
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
    if let Some(bad) = alarms
        .iter()
        .find(|a| !a.uuid_is_seeds() && !a.uuid_is_ours())
    {
        return Err(format!(
            "alarm {} has UUID {}: only the seed's quoted UUIDs look like that; ours are {}",
            bad.id,
            bad.uuid,
            our_uuid(bad.id)
        ));
    }
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

    /// Only the three UUIDs the seed quotes look like the seed's; every other one is ours,
    /// in a form that says so, and a service registering another form is refused.
    #[test]
    fn uuids_are_the_seeds_quoted_ones_or_visibly_ours() {
        let seeds: Vec<u32> = CATALOGUE
            .iter()
            .filter(|a| a.uuid_is_seeds())
            .map(|a| a.id)
            .collect();
        assert_eq!(seeds, [20004, 20006, 20007]);
        for a in CATALOGUE.iter().filter(|a| !a.uuid_is_seeds()) {
            assert!(a.uuid_is_ours(), "alarm {}: {}", a.id, a.uuid);
        }
        static MADE_UP: &[AlarmType] = &[alarm!(
            39999,
            "8f3c3c0e-2a57-4f0e-9d0b-3c1a1f6a2003",
            Warning,
            "t",
            "d",
            "a"
        )];
        assert!(register(MADE_UP)
            .unwrap_err()
            .contains("ca05e0a1-0000-4000-8000-000000039999"));
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
