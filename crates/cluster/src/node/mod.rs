//! A running node: the mesh (when the node is clustered), the replicated configuration on
//! it, and the alarms that follow from both.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use causeway_alarms::AlarmTable;
use causeway_mesh::{
    BoxFuture, Clustering, Inbound, IpVersion, Mesh, PeerStatus, Resolver, TlsMode, Transport,
};
use causeway_replication::keyring::{KeyFiles, Keyring};
use causeway_replication::{
    config_stream, Applied, Change, Engine, EngineSettings, Observer, Origin, PeerLink,
    ReplicationStatus, StreamId, CHANNEL,
};
use causeway_store::{MemoryStore, RedbStore, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

mod alarms;
mod configuration;
mod keys;
mod peers;

pub use alarms::PeerAlarm;
use alarms::{share_alarms, supervise};
use configuration::ConfigObserver;
use keys::settle_membership;
pub use keys::{NodeKeys, NodeStore};
use peers::{route_inbound, AddressMap, MappedResolver, MeshLink, NoPeers};

use crate::config::NodeConfig;
use crate::leases::Leases;
use crate::peer_alarms::{peer_alarms, MANAGED_ALARMS};
use crate::xconfig::{self, ConfigItem};
use crate::NodeError;
use causeway_mesh::rpc::RPC_CHANNEL;

/// Peers that dial us get this long after start before their silence is an alarm.
const SETTLE: Duration = Duration::from_secs(3);
/// RTT and clock skew change on every heartbeat without a state change: re-check this often.
const RECHECK: Duration = Duration::from_secs(1);
/// Replication alarms the supervisor keeps equal to what the engine reports.
const REPLICATION_ALARMS: &[u32] = &[20006, 20009, 20011, 20014, 20016, 20017];
const CONFIG_LOG: &str = "management.configuration";
/// Most replication frames handled (and saved) together.
const INBOUND_BATCH: usize = 256;

/// What `xstatus cluster` prints.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClusterStatus {
    pub system_name: String,
    pub software_version: String,
    pub cluster_name: String,
    pub configuration_primary: usize,
    pub tls_verification: TlsMode,
    pub ip_version: IpVersion,
    /// The cluster port this peer listens on and dials (`[cluster] port`).
    #[serde(default)]
    pub port: u16,
    /// This system's peer number, when it is in the list once.
    pub this_peer: Option<usize>,
    /// Why this node is not clustering, when it is not.
    pub problem: Option<String>,
    pub peers: Vec<PeerStatus>,
    #[serde(default)]
    pub replication: Option<ReplicationStatus>,
    /// A warning to show above everything (a pending leave, EX-15).
    #[serde(default)]
    pub banner: Option<String>,
    /// The lease groups this peer is a member of, and who holds each.
    #[serde(default)]
    pub leases: Vec<crate::LeaseStatus>,
}

pub struct Node {
    config: NodeConfig,
    alarms: Arc<AlarmTable>,
    mesh: Option<Arc<Mesh>>,
    engine: Arc<Engine>,
    store: Arc<dyn Store>,
    leases: Arc<Leases>,
    metrics: crate::metrics::NodeMetrics,
    /// The services hosted on this node, in the order they started.
    services: Mutex<Vec<Arc<dyn crate::Service>>>,
    keys: Mutex<Option<NodeKeys>>,
    observer: Arc<ConfigObserver>,
    /// Why the store was replaced at start (20014), until this peer is back in sync.
    store_problem: Mutex<Option<String>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// Answer to `xconfiguration set`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SetOutcome {
    pub path: String,
    pub value: String,
    /// The revision of the cluster configuration that holds the change (cluster-wide items).
    pub revision: Option<u64>,
    /// Peers that hold the change, of how many (cluster-wide items).
    pub confirmed: Option<(usize, usize)>,
    pub restart_required: bool,
    #[serde(default)]
    pub warning: Option<String>,
}

impl Node {
    /// Starts the cluster role. `transport` is the mesh's transport, already listening; it is
    /// unused when the configuration does not let this node cluster (alarm 20003 then).
    /// Service messages on channels other than replication's come out of the receiver.
    pub fn start(
        config: NodeConfig,
        transport: Option<Arc<dyn Transport>>,
        resolver: Arc<dyn Resolver>,
        store: NodeStore,
    ) -> (Arc<Node>, Option<mpsc::Receiver<Inbound>>) {
        let alarms = Arc::new(AlarmTable::new());
        if let Some(problem) = config.membership_problem() {
            alarms.raise(20003, "peer list", &problem);
            alarms.raise(20015, "peer list", &problem);
        }
        if !config.cluster.peers.is_empty() && config.cluster.name.is_empty() {
            alarms.raise(20019, "cluster.name", "cluster.name is empty");
        }
        let addresses = Arc::new(AddressMap::default());
        let resolver: Arc<dyn Resolver> = Arc::new(MappedResolver {
            map: addresses.clone(),
            inner: resolver,
        });
        let (mesh, inbound) = match (config.cluster_settings(), transport) {
            (Some(settings), Some(transport)) => {
                let (mesh, inbound) = Mesh::start(settings, transport, resolver);
                (Some(Arc::new(mesh)), Some(inbound))
            }
            _ => (None, None),
        };
        // A node outside its own peer list (20003) keeps its configuration but neither
        // replicates nor accepts changes until the list is fixed.
        let (mut settings, link): (EngineSettings, Arc<dyn PeerLink>) = match &mesh {
            Some(m) => {
                let s = m.settings();
                (
                    EngineSettings::new(s.self_index, s.peers.len(), s.configuration_primary),
                    Arc::new(MeshLink(m.clone())),
                )
            }
            None => (EngineSettings::new(1, 1, 1), Arc::new(NoPeers)),
        };
        let observer = Arc::new(ConfigObserver {
            alarms: alarms.clone(),
            file: config.source.clone(),
            file_lock: Mutex::new(()),
            addresses: addresses.clone(),
            mesh: mesh.clone(),
            watchers: RwLock::new(Vec::new()),
        });
        let mut store_problem = store.problem;
        let mut config = config;
        match settle_membership(&config, store.store.as_ref()) {
            // Left: what the node shows follows the file it reset.
            Ok(true) => config.cluster.forget_cluster(),
            Ok(false) => {}
            Err(e) => {
                store_problem
                    .get_or_insert(format!("reading or resetting the cluster data failed: {e}"));
            }
        }
        let keys = store.keys;
        settings.keyring = keys.as_ref().map(|k| k.keyring.clone());
        settings.commit_interval =
            std::time::Duration::from_millis(config.cluster.timing.commit_interval_ms);
        let mut store = store.store;
        let engine = match Engine::open(
            settings.clone(),
            store.clone(),
            link.clone(),
            observer.clone(),
        ) {
            Ok(e) => e,
            Err(e) => {
                // check_store passed or the store is in memory: this is a read error now.
                let why = format!("reading the replicated state failed ({e}); this peer runs on an empty copy until restarted");
                store_problem = Some(why);
                store = Arc::new(MemoryStore::new());
                Engine::open(settings, store.clone(), link, observer.clone())
                    .expect("an empty memory store always opens")
            }
        };
        if let Some(why) = &store_problem {
            warn!(target: "developer.replication", reason = %why, "Replicated store replaced");
            alarms.raise(20014, "store", why);
        }
        addresses.load(&engine.entries(&config_stream()));
        let leases = Arc::new(Leases::new(mesh.as_ref(), store.clone(), alarms.clone()));
        let node = Arc::new(Node {
            config,
            alarms,
            mesh,
            engine,
            store,
            leases,
            metrics: Default::default(),
            services: Mutex::new(Vec::new()),
            keys: Mutex::new(keys),
            observer,
            store_problem: Mutex::new(store_problem),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        node.metrics
            .register(Box::new(crate::metrics::NodeCollector(Arc::downgrade(
                &node,
            ))));
        if node.keys_lock().as_ref().is_some_and(|k| k.change_pending) {
            // Interrupted key change: finish it with the key it was changing to.
            let _ = node.change_system_key(false);
        }
        let services = inbound.map(|inbound| {
            let (tx, rx) = mpsc::channel(1024);
            node.tasks.spawn(route_inbound(node.clone(), inbound, tx));
            rx
        });
        if node.mesh.is_some() {
            let engine = node.engine.clone();
            let cancel = node.cancel.clone();
            node.tasks
                .spawn(async move { engine.run(cancel.cancelled_owned()).await });
            node.tasks.spawn(supervise(node.clone()));
            node.tasks.spawn(share_alarms(node.clone()));
            node.tasks.spawn(peers::retry_failed_names(node.clone()));
        }
        (node, services)
    }

    /// Tells `watcher` of every change applied to any replicated stream from now on (a
    /// service keeps its own index of its streams this way).
    pub fn watch(&self, watcher: Arc<dyn Observer>) {
        self.observer
            .watchers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(watcher);
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    pub fn alarms(&self) -> &Arc<AlarmTable> {
        &self.alarms
    }

    pub fn mesh(&self) -> Option<&Mesh> {
        self.mesh.as_deref()
    }

    /// `/metrics`: a service registers its collector here.
    pub fn metrics(&self) -> &crate::metrics::NodeMetrics {
        &self.metrics
    }

    /// The node's lease groups: a service starts the one it needs here.
    pub fn leases(&self) -> &Arc<Leases> {
        &self.leases
    }

    pub fn replication(&self) -> &Arc<Engine> {
        &self.engine
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
            configuration_primary: match &self.mesh {
                Some(_) => self.engine.primary(),
                None => c.configuration_primary,
            },
            tls_verification: c.tls_verification,
            ip_version: c.ip_version,
            port: c.port,
            this_peer: self.mesh.as_ref().map(|m| m.settings().self_index),
            problem: self.config.membership_problem(),
            peers,
            replication: self.mesh.as_ref().map(|_| self.engine.status()),
            banner: self.leave_banner(),
            leases: self.leases.status(),
        }
    }

    /// The banner shown before a restart that leaves the cluster (EX-15).
    pub fn leave_banner(&self) -> Option<String> {
        let file = NodeConfig::load(&self.config.source).ok()?;
        (file.cluster.peers.is_empty() && !self.config.cluster.peers.is_empty()).then(|| {
            format!(
                "Every peer address has been cleared: when this peer restarts it leaves the cluster and its cluster data is reset to factory defaults (network settings, admin accounts, certificates and licences are kept). To cancel, restore the peer list: causeway xconfiguration set cluster.peers {}",
                self.config.cluster.peers.join(",")
            )
        })
    }

    /// Hosts `service`: the node stops it before itself.
    pub fn host(&self, service: Arc<dyn crate::Service>) {
        info!(target: "management.node", event = "Service started", service = service.name(), "");
        self.services_lock().push(service);
    }

    /// Every hosted service with its status.
    pub fn services(&self) -> Vec<(&'static str, serde_json::Value)> {
        self.services_lock()
            .iter()
            .map(|s| (s.name(), s.status()))
            .collect()
    }

    fn services_lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<dyn crate::Service>>> {
        self.services.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops the hosted services (newest first), then says goodbye to the peers and stops.
    pub async fn shutdown(&self) {
        let services: Vec<_> = self.services_lock().drain(..).rev().collect();
        for service in services {
            service.stop().await;
            info!(target: "management.node", event = "Service stopped", service = service.name(), "");
        }
        // Leases next: "lost" is said while the mesh can still carry the last RPCs.
        self.leases.shutdown().await;
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        if let Some(mesh) = &self.mesh {
            mesh.shutdown().await;
        }
    }
}
