//! A running node: the mesh (when the node is clustered) and the alarms that follow from it.

use std::sync::Arc;
use std::time::Duration;

use causeway_alarms::AlarmTable;
use causeway_mesh::{
    Clustering, Inbound, IpVersion, Mesh, PeerStatus, Resolver, TlsMode, Transport,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::NodeConfig;
use crate::peer_alarms::{peer_alarms, MANAGED_ALARMS};

/// Peers that dial us get this long after start before their silence is an alarm.
const SETTLE: Duration = Duration::from_secs(3);
/// RTT and clock skew change on every heartbeat without a state change: re-check this often.
const RECHECK: Duration = Duration::from_secs(1);

/// What `xstatus cluster` prints.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClusterStatus {
    pub system_name: String,
    pub software_version: String,
    pub cluster_name: String,
    pub configuration_primary: usize,
    pub tls_verification: TlsMode,
    pub ip_version: IpVersion,
    /// This system's peer number, when it is in the list once.
    pub this_peer: Option<usize>,
    /// Why this node is not clustering, when it is not.
    pub problem: Option<String>,
    pub peers: Vec<PeerStatus>,
}

pub struct Node {
    config: NodeConfig,
    alarms: Arc<AlarmTable>,
    mesh: Option<Mesh>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Node {
    /// Starts the cluster role. `transport` is the mesh's transport, already listening; it is
    /// unused when the configuration does not let this node cluster (alarm 20003 then).
    pub fn start(
        config: NodeConfig,
        transport: Option<Arc<dyn Transport>>,
        resolver: Arc<dyn Resolver>,
    ) -> (Arc<Node>, Option<mpsc::Receiver<Inbound>>) {
        let alarms = Arc::new(AlarmTable::new());
        if let Some(problem) = config.membership_problem() {
            alarms.raise(20003, "peer list", &problem);
        }
        if !config.cluster.peers.is_empty() && config.cluster.name.is_empty() {
            alarms.raise(20019, "cluster.name", "cluster.name is empty");
        }
        let (mesh, inbound) = match (config.cluster_settings(), transport) {
            (Some(settings), Some(transport)) => {
                let (mesh, inbound) = Mesh::start(settings, transport, resolver);
                (Some(mesh), Some(inbound))
            }
            _ => (None, None),
        };
        let node = Arc::new(Node {
            config,
            alarms,
            mesh,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        if node.mesh.is_some() {
            node.tasks.spawn(supervise(node.clone()));
        }
        (node, inbound)
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    pub fn alarms(&self) -> &Arc<AlarmTable> {
        &self.alarms
    }

    pub fn mesh(&self) -> Option<&Mesh> {
        self.mesh.as_ref()
    }

    pub fn cluster_status(&self) -> ClusterStatus {
        let c = &self.config.cluster;
        let peers = match &self.mesh {
            Some(mesh) => mesh.view().peers,
            None => c
                .peers
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    let mut p = PeerStatus::new(i + 1, a);
                    if a.eq_ignore_ascii_case(&self.config.node.address) {
                        p.clustering = Clustering::ThisSystem;
                    }
                    p
                })
                .collect(),
        };
        ClusterStatus {
            system_name: self.config.node.system_name.clone(),
            software_version: causeway_common::SOFTWARE_VERSION.to_string(),
            cluster_name: c.name.clone(),
            configuration_primary: c.configuration_primary,
            tls_verification: c.tls_verification,
            ip_version: c.ip_version,
            this_peer: self.mesh.as_ref().map(|m| m.settings().self_index),
            problem: self.config.membership_problem(),
            peers,
        }
    }

    /// Says goodbye to the peers and stops.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        if let Some(mesh) = &self.mesh {
            mesh.shutdown().await;
        }
    }
}

/// Keeps the peer alarms equal to what the mesh view calls for.
async fn supervise(node: Arc<Node>) {
    let Some(mesh) = node.mesh.as_ref() else {
        return;
    };
    let started = Instant::now();
    let mut changes = mesh.changes();
    let mut recheck = tokio::time::interval(RECHECK);
    let timing = mesh.settings().timing.clone();
    loop {
        let view = mesh.view();
        let settled = started.elapsed() >= SETTLE;
        let wanted = peer_alarms(&view, &timing, settled, &|id, subject| {
            node.alarms.is_raised(id, subject)
        });
        node.alarms.reconcile(MANAGED_ALARMS, &wanted);
        tokio::select! {
            _ = node.cancel.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
            _ = recheck.tick() => {}
        }
    }
}
