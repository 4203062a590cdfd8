//! What the database cluster adds to the node's catalogues: its alarms (21010–21017) and
//! its cluster-wide configuration items.

use causeway_alarms::{alarm, AlarmType};
use causeway_cluster::xconfig::{ItemDef, Kind};

pub const REPLICATION_MODES: &[&str] = &["Synchronous", "Asynchronous"];

pub static ITEMS: &[ItemDef] = &[ItemDef {
    path: "database.replication",
    kind: Kind::Choice(REPLICATION_MODES),
    restart: false,
    about: "Synchronous: a commit is acknowledged once enough standbys hold it, and a failover loses none; Asynchronous: faster commits, and a failover can lose the last ones",
    default: "Synchronous",
}];

pub const NO_MASTER: u32 = 21010;
pub const OUT_OF_SYNC: u32 = 21011;
pub const LAGGING: u32 = 21012;
pub const FENCED: u32 = 21013;
pub const CERTIFICATES: u32 = 21014;
pub const EVEN: u32 = 21015;
pub const SCHEMA: u32 = 21016;
pub const NO_POSTGRES: u32 = 21017;
/// The seed's "Database failure": neither a rewind nor a fresh copy brought a node back.
pub const DATABASE_FAILURE: u32 = 20025;
/// Flush lag that raises 21012; it is lowered below half of it.
pub const LAG_ALARM_BYTES: u64 = 16 << 20;

pub static ALARMS: &[AlarmType] = &[
    alarm!(21010, "ca05e0a1-0000-4000-8000-000000021010", Error, "Database cluster has no master",
        "Database cluster has no master: no node of the database cluster is a ready master",
        "Bring back a majority of the cluster's peers; 'database cluster status' shows each node"),
    alarm!(21011, "ca05e0a1-0000-4000-8000-000000021011", Warning, "Database cluster standby out of sync",
        "Database cluster standby out of sync: a standby is not streaming from the master",
        "Check the standby's PostgreSQL log (DIR/db/postgres.log) and its certificates; it rewinds or copies the database again by itself"),
    alarm!(21012, "ca05e0a1-0000-4000-8000-000000021012", Warning, "Database cluster standby lagging",
        "Database cluster standby lagging: a standby is more than 16 MiB behind the master",
        "Check the standby's disk and network; commits use the other standbys meanwhile"),
    alarm!(21013, "ca05e0a1-0000-4000-8000-000000021013", Error, "Database cluster master fenced",
        "Database cluster master fenced: this node was master and lost its lease; its PostgreSQL was stopped",
        "Nothing: it comes back as a standby of the new master by itself; check why it lost the majority"),
    alarm!(21014, "ca05e0a1-0000-4000-8000-000000021014", Error, "Database cluster certificate problem",
        "Database cluster certificate problem: a certificate of the database cluster is invalid or expires soon",
        "Give valid files with 'database cluster certs'"),
    alarm!(21015, "ca05e0a1-0000-4000-8000-000000021015", Warning, "Database cluster has an even number of nodes",
        "Database cluster has an even number of nodes: losing half of them stops writes",
        "Join or remove a node so that the database cluster has an odd number of nodes"),
    alarm!(21016, "ca05e0a1-0000-4000-8000-000000021016", Error, "Database cluster schema error",
        "Database cluster schema error: a schema upgrade failed",
        "Correct the file named, then run 'database cluster clear error' and 'database cluster upgrade_schema'"),
    alarm!(21017, "ca05e0a1-0000-4000-8000-000000021017", Error, "Database cluster node cannot run PostgreSQL",
        "Database cluster node cannot run PostgreSQL: PostgreSQL is missing or fails to start on this node",
        "Install the Debian package postgresql-15, or see DIR/db/postgres.log"),
];

/// Adds the items and alarms to the node's catalogues (idempotent).
pub fn register() {
    // Only a clash of IDs or paths between compiled-in catalogues can fail: a programming
    // error the test below catches.
    if let Err(e) = causeway_cluster::xconfig::register(ITEMS) {
        tracing::error!(target: crate::LOG, reason = %e, "Database configuration items not registered");
    }
    if let Err(e) = causeway_alarms::register(ALARMS) {
        tracing::error!(target: crate::LOG, reason = %e, "Database alarms not registered");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn items_and_alarms_register_without_clashes() {
        causeway_cluster::xconfig::register(super::ITEMS).unwrap();
        causeway_alarms::register(super::ALARMS).unwrap();
    }
}
