//! What members tell each other (`dbcluster/*` mesh endpoints) and what a node keeps.

use std::net::SocketAddr;

use causeway_mesh::rpc::Endpoint;
use serde::{Deserialize, Serialize};

/// A member's role as it reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Not in the cluster: its own database runs (DB-4).
    Local,
    Master,
    Standby,
    /// Postgres is not running (fenced, starting, failed).
    Stopped,
    /// A command (join, initialize, rewind, base backup) is changing its data.
    Busy,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Local => "local",
            Role::Master => "master",
            Role::Standby => "standby",
            Role::Stopped => "stopped",
            Role::Busy => "busy",
        }
    }
}

/// A standby as the master sees it (`pg_stat_replication`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub peer: usize,
    pub state: String,
    pub sync_state: String,
    /// Bytes behind the master's position at the time of the report.
    pub flush_lag: u64,
}

/// A member of the database cluster (`causeway.members` in the cluster's own database, so
/// membership travels with the data and the timeline that wins carries its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub peer: usize,
    /// Where its PostgreSQL listens.
    pub address: SocketAddr,
    /// In the synchronous set (caught up once since it joined).
    pub in_set: bool,
}

/// Pushed by every node running the service to every peer, every 250 ms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub peer: usize,
    pub member: bool,
    pub role: Role,
    /// Master: the generation it promoted at. Standby: the generation it follows.
    pub generation: u64,
    /// Master: promoted at the lease it holds and configured.
    pub ready: bool,
    /// Master: a checkpoint has completed since the promotion (`pg_rewind` needs it).
    pub checkpointed: bool,
    /// Where its PostgreSQL listens (`localnode`:port), once `localnode` is known.
    pub address: Option<SocketAddr>,
    pub timeline: u32,
    /// WAL position in bytes: the master's insert position, a standby's furthest of
    /// received and replayed.
    pub position: u64,
    pub upstream: Option<usize>,
    pub streaming: bool,
    pub sealed_at: u64,
    pub eligible: bool,
    /// The member list as this node's database has it.
    pub members: Vec<Member>,
    /// Master only.
    pub replicas: Vec<Replica>,
    /// The cluster's error state (a failed `upgrade_schema`), as its database has it.
    pub error: Option<String>,
}

impl Report {
    pub fn is_ready_master(&self) -> bool {
        self.role == Role::Master && self.ready
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SealRequest {
    pub generation: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sealed {
    pub position: u64,
    pub timeline: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub address: SocketAddr,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoveRequest {}

pub fn report_endpoint() -> Endpoint<Report, ()> {
    Endpoint::new("dbcluster/report")
}
pub fn seal_endpoint() -> Endpoint<SealRequest, Sealed> {
    Endpoint::new("dbcluster/seal")
}
pub fn join_endpoint() -> Endpoint<JoinRequest, ()> {
    Endpoint::new("dbcluster/join")
}
pub fn remove_endpoint() -> Endpoint<RemoveRequest, ()> {
    Endpoint::new("dbcluster/remove")
}

/// What a node keeps across restarts (`DIR/db/state.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    /// The interface given to `localnode`.
    pub localnode: Option<String>,
    /// The file names given to `certs`, in the order given.
    pub certs: Vec<String>,
    /// In the database cluster (its instance is the cluster's, not the local one).
    pub member: bool,
    /// The generation this node last promoted at; cleared once it follows a newer master.
    pub promoted_at: Option<u64>,
    /// No WAL from a master below this generation (section 3's seal).
    pub sealed_at: u64,
    pub last_command: Option<LastCommand>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastCommand {
    pub command: String,
    /// `In progress: …`, `Success` or `Failed: …`.
    pub result: String,
    pub at_ms: u64,
}

/// Bytes → `X/Y`, PostgreSQL's LSN notation.
pub fn lsn(bytes: u64) -> String {
    format!("{:X}/{:X}", bytes >> 32, bytes & 0xffff_ffff)
}
