//! The node's lease groups (docs/consensus.md): services start the groups they need here
//! and share the node's store, its mesh RPC and one shutdown.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use causeway_alarms::AlarmTable;
use causeway_consensus::{
    ConsensusError, Holder, LeaderLease, LeaseGroup, LeaseTiming, Membership,
};
use causeway_mesh::rpc::{PeerSend, Rpc};
use causeway_mesh::{Mesh, SendError};
use causeway_store::Store;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One group as `xstatus cluster` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseStatus {
    pub name: String,
    pub members: Vec<usize>,
    /// Peer number of the holder as this peer knows it; none during an election.
    pub holder: Option<usize>,
    pub generation: Option<u64>,
    pub held_here: bool,
}

pub struct Leases {
    alarms: Arc<AlarmTable>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    rpc: Arc<Rpc>,
    store: Arc<dyn Store>,
    me: usize,
    /// Peer addresses, Peer 1 first: a group's voters are named by them.
    peers: Vec<String>,
    timing: LeaseTiming,
    groups: Mutex<Vec<Arc<LeaseGroup>>>,
}

/// A node without a mesh (standalone, or outside its own peer list) reaches no one.
struct Nobody;

impl PeerSend for Nobody {
    fn send_to(&self, peer: usize, _: u16, _: Bytes) -> Result<(), SendError> {
        Err(SendError::NotConnected(peer))
    }
}

impl Leases {
    pub(crate) fn new(
        mesh: Option<&Arc<Mesh>>,
        store: Arc<dyn Store>,
        alarms: Arc<AlarmTable>,
    ) -> Self {
        let (rpc, me, peers) = match mesh {
            Some(m) => (
                Rpc::new(m.clone()),
                m.settings().self_index,
                m.settings().peers.clone(),
            ),
            None => (
                Rpc::new(Arc::new(Nobody)),
                1,
                vec!["this system".to_string()],
            ),
        };
        Self {
            alarms,
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            rpc,
            store,
            me,
            peers,
            timing: LeaseTiming::default(),
            groups: Mutex::new(Vec::new()),
        }
    }

    pub fn rpc(&self) -> &Arc<Rpc> {
        &self.rpc
    }

    /// Every peer of the peer list by number (a standalone system is Peer 1 of 1).
    pub fn all_peers(&self) -> Vec<usize> {
        (1..=self.peers.len()).collect()
    }

    pub fn self_index(&self) -> usize {
        self.me
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<LeaseGroup>>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts group `name` with `members` (peer numbers) on the node's lease timing, or
    /// returns it when it runs.
    pub fn start_group(
        &self,
        name: &str,
        members: Vec<usize>,
    ) -> Result<Arc<LeaseGroup>, ConsensusError> {
        self.start_group_with(name, members, self.timing)
    }

    /// As `start_group`, with timing of its own: a service whose fencing takes longer than
    /// the default lease allows (stopping PostgreSQL) runs a longer lease.
    pub fn start_group_with(
        &self,
        name: &str,
        members: Vec<usize>,
        timing: LeaseTiming,
    ) -> Result<Arc<LeaseGroup>, ConsensusError> {
        let mut groups = self.lock();
        if let Some(g) = groups.iter().find(|g| g.name() == name) {
            return Ok(g.clone());
        }
        let voters: Vec<&str> = members
            .iter()
            .map(|&m| {
                self.peers
                    .get(m.wrapping_sub(1))
                    .map_or("?", String::as_str)
            })
            .collect();
        let group = LeaseGroup::start(
            name,
            self.me,
            members,
            &voters.join(","),
            self.store.clone(),
            self.rpc.clone(),
            timing,
        )?;
        groups.push(group.clone());
        // Alarm 20030 follows the group's "records reset" state.
        let (mut reset, alarms, subject, cancel) = (
            group.records_reset(),
            self.alarms.clone(),
            format!("lease group {name}"),
            self.cancel.clone(),
        );
        self.tasks.spawn(async move {
            loop {
                match reset.borrow_and_update().as_ref() {
                    Some(why) => alarms.raise(20030, &subject, why),
                    None => alarms.lower(20030, &subject),
                };
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = reset.changed() => if r.is_err() { return },
                }
            }
        });
        Ok(group)
    }

    /// Every group started, in order.
    pub fn groups(&self) -> Vec<Arc<LeaseGroup>> {
        self.lock().clone()
    }

    pub fn group(&self, name: &str) -> Option<Arc<LeaseGroup>> {
        self.lock().iter().find(|g| g.name() == name).cloned()
    }

    pub fn status(&self) -> Vec<LeaseStatus> {
        self.lock()
            .iter()
            .map(|g| {
                let (holder, generation) = match g.state().holder {
                    Holder::Me { generation } => (Some(self.me), Some(generation)),
                    Holder::Peer { peer, generation } => (Some(peer), Some(generation)),
                    Holder::Nobody => (None, None),
                };
                LeaseStatus {
                    name: g.name().to_string(),
                    members: g.members(),
                    holder,
                    generation,
                    held_here: holder == Some(self.me),
                }
            })
            .collect()
    }

    /// Lets go of every lease, then stops answering RPCs.
    pub(crate) async fn shutdown(&self) {
        let groups: Vec<_> = self.lock().drain(..).collect();
        for g in groups {
            g.shutdown().await;
        }
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.rpc.shutdown().await;
    }
}
