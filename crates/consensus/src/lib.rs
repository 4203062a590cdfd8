//! Leader leases chosen by a majority (see `docs/consensus.md`).
//!
//! A lease group is a Raft group (openraft, wrapped here so a move to 0.10 touches one
//! crate) whose leader holds the lease while a majority has confirmed it within the lease
//! time. Services see two small traits, [`LeaderLease`] and [`Membership`], with a fake in
//! [`fake`] for their own tests.
#![forbid(unsafe_code)]

mod group;
mod network;
mod storage;

pub mod fake;
pub mod observer;

use std::fmt;
// Named by the default snapshot type `declare_raft_types!` fills in.
use std::io::Cursor;

use tokio::sync::watch;
use tokio::time::Instant;

pub use group::{LeaseGroup, LeaseTiming};

/// A member of a lease group: its peer number in the peer list.
pub type MemberId = u64;

openraft::declare_raft_types!(
    /// No application data rides in a lease group: only elections, membership and the
    /// blank entry each new leader writes.
    pub TypeConfig:
        D = (),
        R = (),
        Node = openraft::EmptyNode,
);

/// Who holds a lease, as one member sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// This member holds it; every fenced action carries `generation`.
    Me { generation: u64 },
    /// Another member led the group when last heard from (it may have lost the lease since).
    Peer { peer: usize, generation: u64 },
    /// No holder is known: an election is running, or this member cannot reach a majority.
    Nobody,
}

/// The lease as published to a service: who holds it and since when (tokio's clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseState {
    pub holder: Holder,
    pub since: Instant,
}

impl LeaseState {
    pub fn nobody() -> Self {
        Self {
            holder: Holder::Nobody,
            since: Instant::now(),
        }
    }

    pub fn is_mine(&self) -> bool {
        matches!(self.holder, Holder::Me { .. })
    }

    /// The generation this member may act with, when it holds the lease.
    pub fn my_generation(&self) -> Option<u64> {
        match self.holder {
            Holder::Me { generation } => Some(generation),
            _ => None,
        }
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Me { generation } => write!(f, "this peer (generation {generation})"),
            Holder::Peer { peer, generation } => {
                write!(f, "Peer {peer} (generation {generation})")
            }
            Holder::Nobody => f.write_str("none"),
        }
    }
}

/// One named lease. "Lost" is published before the lease can be held anywhere else.
pub trait LeaderLease: Send + Sync {
    fn name(&self) -> &str;
    fn state(&self) -> LeaseState;
    fn watch(&self) -> watch::Receiver<LeaseState>;
    /// An ineligible member votes but never stands for election (a witness, a database node
    /// out of sync). Taking eligibility away from the holder does not end its lease.
    fn set_eligible(&self, eligible: bool);
    /// Gives the lease up if this member holds it ("lost" is delivered at once): it stops
    /// renewing, and its Raft member starts again with a quiet start, so another member is
    /// elected once the lease has run out. It stands again afterwards only if eligible:
    /// take eligibility away first to step aside for good (a switchover, a database node
    /// whose PostgreSQL failed). Nothing happens if it does not hold the lease.
    fn resign(&self);
}

/// Which peers take part in a group.
pub trait Membership: Send + Sync {
    /// The voters, by peer number, in order.
    fn members(&self) -> Vec<usize>;
}

/// Why a lease group could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    #[error("lease group {group}: {member} is not one of its members {members:?}")]
    NotAMember {
        group: String,
        member: usize,
        members: Vec<usize>,
    },
    #[error("lease group {group}: the timing is invalid: {reason}")]
    Timing { group: String, reason: String },
    #[error("lease group {group}: starting Raft failed: {reason}")]
    Start { group: String, reason: String },
    #[error("lease group {group}: reading its records from the store failed: {reason}")]
    Store { group: String, reason: String },
}
