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

/// The node's store, its system key, and what went wrong opening them (alarm 20014).
pub struct NodeStore {
    pub store: Arc<dyn Store>,
    pub problem: Option<String>,
    pub keys: Option<NodeKeys>,
}

/// The system key (EX-14) and its files.
pub struct NodeKeys {
    files: KeyFiles,
    keyring: Arc<Keyring>,
    /// A key change was interrupted: reseal with the current key and finish it.
    change_pending: bool,
}

impl NodeStore {
    /// Opens `data_dir/node.redb`. An unreadable store is kept aside (for a post-mortem) and
    /// replaced by an empty one, which the primary then fills: the node heals by itself.
    pub fn open(data_dir: &Path) -> NodeStore {
        let files = KeyFiles::in_dir(data_dir);
        let (keys, key_problem) = match files.load_or_create() {
            Ok((keyring, change_pending)) => (
                Some(NodeKeys {
                    files,
                    keyring: Arc::new(keyring),
                    change_pending,
                }),
                None,
            ),
            Err(e) => (None, Some(format!("the system key: {e}"))),
        };
        let keyring = keys.as_ref().map(|k| k.keyring.clone());
        let path = data_dir.join("node.redb");
        let opened = RedbStore::open(&path)
            .map_err(|e| e.to_string())
            .and_then(|s| {
                causeway_replication::check_store(&s, keyring.as_deref())
                    .map(|_| s)
                    .map_err(|e| e.to_string())
            });
        let why = match opened {
            Ok(s) => {
                return NodeStore {
                    store: Arc::new(s),
                    problem: key_problem,
                    keys,
                }
            }
            Err(why) => why,
        };
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let aside = data_dir.join(format!("node.redb.damaged-{stamp}"));
        let moved = std::fs::rename(&path, &aside).is_ok();
        match RedbStore::open(&path) {
            Ok(s) if moved => NodeStore {
                store: Arc::new(s),
                problem: Some(format!(
                    "the store {} could not be read ({why}); it was kept as {} and this peer takes the configuration from the primary",
                    path.display(),
                    aside.display()
                )),
                keys,
            },
            result => NodeStore {
                store: Arc::new(MemoryStore::new()),
                problem: Some(format!(
                    "the store {} could not be read ({}); this peer runs without one until it is repaired: check the disk, move the file away and restart",
                    path.display(),
                    result.err().map(|e| e.to_string()).unwrap_or(why)
                )),
                keys,
            },
        }
    }

    /// A store in memory (tests; a node that must not touch the disk).
    pub fn memory(store: Arc<MemoryStore>) -> NodeStore {
        NodeStore {
            store,
            problem: None,
            keys: None,
        }
    }
}

pub struct Node {
    config: NodeConfig,
    alarms: Arc<AlarmTable>,
    mesh: Option<Arc<Mesh>>,
    engine: Arc<Engine>,
    store: Arc<dyn Store>,
    leases: Arc<Leases>,
    metrics: crate::metrics::NodeMetrics,
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
        if let Err(e) = settle_membership(&config, store.store.as_ref()) {
            store_problem
                .get_or_insert(format!("reading or resetting the cluster data failed: {e}"));
        }
        let keys = store.keys;
        settings.keyring = keys.as_ref().map(|k| k.keyring.clone());
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

    /// Every configuration item: peer-specific (†) first, then cluster-wide.
    pub fn configuration(&self) -> Vec<ConfigItem> {
        let file = NodeConfig::load(&self.config.source).unwrap_or_else(|_| self.config.clone());
        let entries: Vec<(String, String)> = self
            .engine
            .entries(&config_stream())
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect();
        let mut items = xconfig::peer_items(&self.config, &file, self.engine.primary());
        items.extend(xconfig::cluster_items(&entries, &self.config));
        items
    }

    /// `xconfiguration set` (`value: None` clears a cluster-wide item back to its default).
    pub async fn set_configuration(
        &self,
        path: &str,
        value: Option<&str>,
    ) -> Result<SetOutcome, NodeError> {
        self.set_configuration_with(path, value, false).await
    }

    /// `force`: set it even when a check says it would break something (switching to
    /// Enforce while a peer's certificate would be refused).
    pub async fn set_configuration_with(
        &self,
        path: &str,
        value: Option<&str>,
        force: bool,
    ) -> Result<SetOutcome, NodeError> {
        if xconfig::is_peer_specific(path) {
            let value =
                value.ok_or_else(|| format!("{path} is peer-specific (†): give a value"))?;
            return self.set_peer_item(path, value);
        }
        let canonical = xconfig::canonical(path, value)?;
        if path == "cluster.tls_verification" && canonical.as_deref() == Some("Enforce") && !force {
            self.check_enforce_would_hold()?;
        }
        if self.mesh.is_none() && !self.config.cluster.peers.is_empty() {
            return Err(NodeError::unavailable(format!(
                "this peer is not clustering ({}): fix cluster.peers first",
                self.config.membership_problem().unwrap_or_default()
            )));
        }
        let change = Change {
            key: path.to_string(),
            value: canonical.clone().map(String::into_bytes),
        };
        let out = self.engine.write(&config_stream(), vec![change]).await?;
        Ok(SetOutcome {
            path: path.to_string(),
            value: canonical
                .map(|v| xconfig::shown(path, &v))
                .unwrap_or_default(),
            revision: Some(out.seq),
            confirmed: Some((out.confirmed, out.peers)),
            restart_required: xconfig::restart_required(path),
            warning: None,
        })
    }

    /// EX-6: before switching to Enforce, every certificate this peer has seen must pass.
    fn check_enforce_would_hold(&self) -> Result<(), NodeError> {
        let Some(mesh) = &self.mesh else {
            return Ok(());
        };
        let failing: Vec<String> = mesh
            .view()
            .peers
            .iter()
            .filter_map(|p| match &p.certificate {
                causeway_mesh::CertStatus::Invalid(why) => {
                    Some(format!("Peer {} ({}): {why}", p.index, p.address))
                }
                _ => None,
            })
            .collect();
        if failing.is_empty() {
            return Ok(());
        }
        Err(NodeError::conflict(format!(
            "cluster.tls_verification: under Enforce these certificates would be refused: {}. Issue certificates that name each peer's address, or set it anyway with --force",
            failing.join("; ")
        )))
    }

    fn set_peer_item(&self, path: &str, value: &str) -> Result<SetOutcome, NodeError> {
        let _guard = self.observer.lock_file();
        let mut file = NodeConfig::load(&self.config.source).map_err(|e| {
            NodeError::internal(format!("{path}: reading the node file failed: {e}"))
        })?;
        let before = item_value(&file, path, self.engine.primary());
        xconfig::set_peer_item(&mut file, path, value)?;
        file.save()
            .map_err(|e| NodeError::internal(format!("{path}: saving the change failed: {e}")))?;
        let after = item_value(&file, path, self.engine.primary());
        log_change(path, &before, &after);
        // Back to what is running (a cancelled leave, an undone edit): nothing to restart for.
        let restart_required = after != item_value(&self.config, path, self.engine.primary());
        if restart_required {
            self.alarms.raise(
                20007,
                path,
                &format!("{path} changed from '{before}' to '{after}': restart this peer for it to take effect"),
            );
        } else {
            self.alarms.lower(20007, path);
        }
        Ok(SetOutcome {
            path: path.to_string(),
            value: after,
            revision: None,
            confirmed: None,
            restart_required,
            warning: self.leave_banner(),
        })
    }

    /// EX-17: this node's file and cluster data, read consistently from the running node.
    pub fn backup(&self) -> Result<crate::backup::Backup, NodeError> {
        crate::backup::Backup::take(&self.config, self.store.as_ref()).map_err(NodeError::internal)
    }

    /// The alarms the other peers reported (OP-1: alarms visible cluster-wide), each with
    /// whether that peer is reachable now (if not, they are as it last reported them).
    pub fn peer_alarms(&self) -> Vec<PeerAlarm> {
        let Some(mesh) = &self.mesh else {
            return Vec::new();
        };
        let me = mesh.settings().self_index;
        let view = mesh.view();
        let mut out = Vec::new();
        for id in self.engine.streams(ALARM_NAMESPACE) {
            let Some(peer) = id
                .name
                .strip_prefix("peer")
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue;
            };
            if peer == me || peer == 0 || peer > view.peers.len() {
                continue;
            }
            let reachable = view.peer(peer).is_active();
            for (_, value) in self.engine.entries(&id) {
                let Ok(a) = postcard::from_bytes::<SharedAlarm>(&value) else {
                    continue;
                };
                let Some(kind) = causeway_alarms::lookup(a.id) else {
                    continue;
                };
                out.push(PeerAlarm {
                    peer,
                    reachable,
                    id: a.id,
                    title: kind.title.to_string(),
                    severity: format!("{:?}", kind.severity).to_lowercase(),
                    subject: a.subject,
                    reason: a.reason,
                    raised_at_ms: a.raised_at_ms,
                });
            }
        }
        out
    }

    fn keys_lock(&self) -> std::sync::MutexGuard<'_, Option<NodeKeys>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// EX-14 `xcommand ForceSystemKeyUpdate`: a new system key, every value resealed with it.
    pub fn force_system_key_update(&self) -> Result<String, NodeError> {
        self.change_system_key(true).map_err(NodeError::internal)
    }

    /// `fresh`: make a new key; otherwise finish the change to the key already current.
    fn change_system_key(&self, fresh: bool) -> Result<String, String> {
        let mut keys = self.keys_lock();
        let Some(k) = keys.as_mut() else {
            return Err("this node has no system key file (its store is in memory)".into());
        };
        let result = (|| {
            let keyring = if fresh {
                Arc::new(k.files.begin_change()?)
            } else {
                k.keyring.clone()
            };
            let records = self.engine.reseal(keyring.clone())?;
            k.files.finish_change()?;
            k.keyring = keyring;
            k.change_pending = false;
            Ok::<_, String>(records)
        })();
        match result {
            Ok(records) => {
                self.alarms.lower(21005, "system key");
                info!(target: "management.node", event = "System key updated", key = %k.keyring.current_id(),
                    records = records, "System key updated");
                Ok(format!(
                    "system key {} now seals {records} records",
                    k.keyring.current_id()
                ))
            }
            Err(why) => {
                self.alarms.raise(21005, "system key", &why);
                Err(format!(
                    "{why}: fix the cause, then run `causeway xcommand ForceSystemKeyUpdate` again"
                ))
            }
        }
    }

    /// EX-10 on demand: resolve and dial again, now, every peer that is not Active.
    pub fn resolve_peers(&self) -> Result<String, NodeError> {
        self.clustered()?;
        let mesh = self
            .mesh
            .as_ref()
            .ok_or_else(|| NodeError::unavailable("this peer is not clustering"))?;
        let waiting: Vec<String> = mesh
            .view()
            .peers
            .iter()
            .filter(|p| p.clustering != Clustering::ThisSystem && !p.is_active())
            .map(|p| format!("Peer {} ({})", p.index, p.address))
            .collect();
        mesh.redial_now("operator request");
        Ok(if waiting.is_empty() {
            "every peer is Active: nothing to resolve".to_string()
        } else {
            format!("resolving and dialling again: {}", waiting.join(", "))
        })
    }

    /// EX-13 on a subordinate.
    pub async fn force_config_update(&self) -> Result<ReplicationStatus, NodeError> {
        self.clustered()?;
        self.engine.force_config_update().await?;
        Ok(self.engine.status())
    }

    /// EX-7: make `peer` the configuration primary on every reachable peer.
    pub async fn set_primary(&self, peer: usize) -> Result<ReplicationStatus, NodeError> {
        self.clustered()?;
        self.engine.set_primary(peer).await?;
        Ok(self.engine.status())
    }

    fn clustered(&self) -> Result<(), NodeError> {
        match &self.mesh {
            Some(_) => Ok(()),
            None => Err(NodeError::conflict(
                match self.config.membership_problem() {
                    Some(p) => {
                        format!("this peer is not clustering ({p}): fix cluster.peers first")
                    }
                    None => "this system is not in a cluster (cluster.peers is empty)".to_string(),
                },
            )),
        }
    }

    /// Says goodbye to the peers and stops.
    pub async fn shutdown(&self) {
        // Leases first: "lost" is said while the mesh can still carry the last RPCs.
        self.leases.shutdown().await;
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        if let Some(mesh) = &self.mesh {
            mesh.shutdown().await;
        }
    }
}

fn item_value(config: &NodeConfig, path: &str, primary: usize) -> String {
    xconfig::peer_items(config, config, primary)
        .into_iter()
        .find(|i| i.path == path)
        .map(|i| i.value)
        .unwrap_or_default()
}

/// EX-15: a store that belonged to a cluster, on a node whose peer list is now empty, is
/// reset to factory defaults (the operator cleared the list and restarted). A standalone
/// node joining a cluster as a subordinate is reset too: it takes the primary's
/// configuration, never offers its own. Otherwise the store remembers its cluster.
fn settle_membership(
    config: &NodeConfig,
    store: &dyn Store,
) -> Result<(), causeway_store::StoreError> {
    use causeway_replication::lifecycle;
    let stored = lifecycle::membership(store)?;
    if config.cluster.peers.is_empty() {
        if let Some(was) = stored {
            lifecycle::factory_reset(store)?;
            warn!(target: "management.node", event = "Cluster data reset", previous_cluster = %was,
                "This peer left the cluster: its cluster data was reset to factory defaults");
        }
        return Ok(());
    }
    let now = format!("{}|{}", config.cluster.name, config.cluster.peers.join(","));
    let joining_as_subordinate = stored.is_none()
        && config
            .self_index()
            .is_some_and(|i| i != config.cluster.configuration_primary);
    if joining_as_subordinate
        && !lifecycle::dump(store)?
            .tables
            .iter()
            .all(|(_, r)| r.is_empty())
    {
        lifecycle::factory_reset(store)?;
        info!(target: "management.node", event = "Cluster data reset", cluster = %config.cluster.name,
            "This peer joined the cluster as a subordinate: its own configuration was replaced by the primary's");
    }
    if stored.as_deref() != Some(now.as_str()) {
        lifecycle::set_membership(store, &now)?;
    }
    Ok(())
}

const ALARM_NAMESPACE: &str = "alarms";

/// One alarm as a peer shares it: the catalogue gives the rest.
#[derive(Serialize, Deserialize)]
struct SharedAlarm {
    id: u32,
    subject: String,
    reason: String,
    raised_at_ms: u64,
}

/// An alarm raised on another peer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerAlarm {
    pub peer: usize,
    /// False: the peer is unreachable and this is what it last reported.
    pub reachable: bool,
    pub id: u32,
    pub title: String,
    pub severity: String,
    pub subject: String,
    pub reason: String,
    pub raised_at_ms: u64,
}

/// Keeps this peer's alarm stream equal to its alarm table, so every peer shows them.
async fn share_alarms(node: Arc<Node>) {
    let Some(mesh) = &node.mesh else { return };
    let own = StreamId::new(
        ALARM_NAMESPACE,
        &format!("peer{}", mesh.settings().self_index),
    );
    loop {
        let wanted: BTreeMap<String, Vec<u8>> = node
            .alarms
            .active()
            .into_iter()
            .map(|a| {
                let shared = SharedAlarm {
                    id: a.id,
                    subject: a.subject.clone(),
                    reason: a.reason,
                    raised_at_ms: a.raised_at_ms,
                };
                (
                    format!("{}|{}", a.id, a.subject),
                    postcard::to_stdvec(&shared).unwrap_or_default(),
                )
            })
            .collect();
        let have: BTreeMap<String, Vec<u8>> = node.engine.entries(&own).into_iter().collect();
        let mut changes: Vec<Change> = wanted
            .iter()
            .filter(|(k, v)| have.get(*k) != Some(*v))
            .map(|(k, v)| Change {
                key: k.clone(),
                value: Some(v.clone()),
            })
            .collect();
        changes.extend(
            have.keys()
                .filter(|k| !wanted.contains_key(*k))
                .map(|k| Change {
                    key: k.clone(),
                    value: None,
                }),
        );
        if !changes.is_empty() {
            // Pushed at once; the answer (a majority or not) does not matter here.
            let _ = node.engine.write(&own, changes).await;
        }
        tokio::select! {
            _ = node.cancel.cancelled() => return,
            _ = tokio::time::sleep(RECHECK) => {}
        }
    }
}

/// Replication frames to the engine; everything else to the services.
async fn route_inbound(
    node: Arc<Node>,
    mut inbound: mpsc::Receiver<Inbound>,
    services: mpsc::Sender<Inbound>,
) {
    loop {
        let first = tokio::select! {
            _ = node.cancel.cancelled() => return,
            m = inbound.recv() => match m { Some(m) => m, None => return },
        };
        // Whatever else has arrived goes with it: the engine saves a batch of pushes in one
        // store transaction.
        let mut replication = Vec::new();
        let mut next = Some(first);
        while let Some(message) = next {
            if message.channel == CHANNEL {
                replication.push((message.from, message.payload));
            } else if message.channel == RPC_CHANNEL {
                node.leases.rpc().handle(message.from, &message.payload);
            } else if services.try_send(message).is_err() {
                // Nobody reads service messages yet (or they are behind): drop, never block
                // replication behind them.
            }
            next = if replication.len() < INBOUND_BATCH {
                inbound.try_recv().ok()
            } else {
                None
            };
        }
        if !replication.is_empty() {
            node.engine.handle_batch(&replication);
        }
    }
}

/// Keeps the peer and replication alarms equal to what the mesh and the engine call for.
async fn supervise(node: Arc<Node>) {
    let Some(mesh) = node.mesh.as_ref() else {
        return;
    };
    let started = Instant::now();
    let mut changes = mesh.changes();
    let mut recheck = tokio::time::interval(RECHECK);
    let timing = mesh.settings().timing.clone();
    let mut managed: Vec<u32> = MANAGED_ALARMS.to_vec();
    managed.extend_from_slice(REPLICATION_ALARMS);
    loop {
        let view = mesh.view();
        let settled = started.elapsed() >= SETTLE;
        let mut wanted = peer_alarms(&view, &timing, settled, &|id, subject| {
            node.alarms.is_raised(id, subject)
        });
        wanted.extend(node.engine.alarms(settled));
        // A replaced store stays alarmed until this peer is first in sync again.
        {
            let mut problem = node.store_problem.lock().unwrap_or_else(|p| p.into_inner());
            if problem.is_some() && node.engine.status().database_status == "Active" {
                *problem = None;
            }
            if let Some(why) = problem.as_ref() {
                wanted.push((20014, "store".into(), why.clone()));
            }
        }
        node.alarms.reconcile(&managed, &wanted);
        tokio::select! {
            _ = node.cancel.cancelled() => return,
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
                // A peer came or went: digests now, not at the next heartbeat, so a peer
                // that was away starts catching up at once.
                node.engine.tick();
            }
            _ = recheck.tick() => {}
        }
    }
}

struct MeshLink(Arc<Mesh>);

impl PeerLink for MeshLink {
    fn send(&self, peer: usize, payload: Bytes) -> bool {
        self.0.send(peer, CHANNEL, payload).is_ok()
    }

    fn active_peers(&self) -> Vec<usize> {
        self.0
            .view()
            .peers
            .iter()
            .filter(|p| p.is_active())
            .map(|p| p.index)
            .collect()
    }
}

struct NoPeers;

impl PeerLink for NoPeers {
    fn send(&self, _: usize, _: Bytes) -> bool {
        false
    }
    fn active_peers(&self) -> Vec<usize> {
        Vec::new()
    }
}

/// The cluster address mapping (EX-9): peer names to addresses, consulted before DNS.
#[derive(Default)]
struct AddressMap(RwLock<HashMap<String, IpAddr>>);

const MAPPING_PREFIX: &str = "cluster.address_mapping.";

impl AddressMap {
    fn load(&self, entries: &[(String, Vec<u8>)]) {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        map.clear();
        for (k, v) in entries {
            self.parse_into(&mut map, k, Some(v));
        }
    }

    fn update(&self, key: &str, value: Option<&[u8]>) {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        self.parse_into(&mut map, key, value);
    }

    fn parse_into(&self, map: &mut HashMap<String, IpAddr>, key: &str, value: Option<&[u8]>) {
        let Some(name) = key.strip_prefix(MAPPING_PREFIX) else {
            return;
        };
        let ip = value
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse().ok());
        match ip {
            Some(ip) => map.insert(name.to_ascii_lowercase(), ip),
            None => map.remove(&name.to_ascii_lowercase()),
        };
    }

    fn get(&self, host: &str) -> Option<IpAddr> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&host.to_ascii_lowercase())
            .copied()
    }
}

struct MappedResolver {
    map: Arc<AddressMap>,
    inner: Arc<dyn Resolver>,
}

impl Resolver for MappedResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<IpAddr, String>> {
        match self.map.get(host) {
            Some(ip) => Box::pin(async move { Ok(ip) }),
            None => self.inner.resolve(host),
        }
    }
}

fn log_change(path: &str, old: &str, new: &str) {
    let text = |v: &str| {
        if v.is_empty() {
            "(unset)".to_string()
        } else {
            xconfig::shown(path, v)
        }
    };
    info!(target: CONFIG_LOG, event = "System Configuration Changed",
        "xconfiguration {path} - changed from: {} to: {}", text(old), text(new));
}

/// Checks configuration changes, logs them, applies what can be applied live, and keeps
/// the node's file in step with the replicated items it also holds.
struct ConfigObserver {
    alarms: Arc<AlarmTable>,
    file: std::path::PathBuf,
    /// Every rewrite of the node's file goes through this lock.
    file_lock: Mutex<()>,
    addresses: Arc<AddressMap>,
    /// Redialled when the address mapping changes, so a mapped name is used at once.
    mesh: Option<Arc<Mesh>>,
    /// Services that follow replicated streams of their own (`Node::watch`).
    watchers: RwLock<Vec<Arc<dyn Observer>>>,
}

impl ConfigObserver {
    fn lock_file(&self) -> std::sync::MutexGuard<'_, ()> {
        self.file_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rewrites one setting of the node's file; false (and a log line) when it cannot.
    fn edit_file(&self, what: &str, edit: impl FnOnce(&mut NodeConfig) -> bool) -> bool {
        let _guard = self.lock_file();
        let mut file = match NodeConfig::load(&self.file) {
            Ok(f) => f,
            Err(e) => {
                warn!(target: CONFIG_LOG, reason = %e, setting = what, "Could not update the node's file");
                return false;
            }
        };
        if !edit(&mut file) {
            return false;
        }
        match file.save() {
            Ok(()) => true,
            Err(e) => {
                warn!(target: CONFIG_LOG, reason = %e, setting = what, "Could not update the node's file");
                false
            }
        }
    }
}

impl Observer for ConfigObserver {
    fn validate(&self, stream: &StreamId, changes: &[Change]) -> Result<(), String> {
        if *stream != config_stream() {
            return Ok(());
        }
        for c in changes {
            let value = match &c.value {
                None => None,
                Some(v) => {
                    Some(std::str::from_utf8(v).map_err(|_| format!("{}: not UTF-8 text", c.key))?)
                }
            };
            let canonical = xconfig::canonical(&c.key, value)?;
            if canonical.as_deref() != value {
                return Err(format!("{}: not in canonical form", c.key));
            }
        }
        Ok(())
    }

    fn applied(&self, stream: &StreamId, applied: &[Applied], origin: Origin) {
        for w in self
            .watchers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            w.applied(stream, applied, origin);
        }
        if *stream != config_stream() {
            return;
        }
        for a in applied {
            let text = |v: &Option<Vec<u8>>| {
                v.as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default()
            };
            let (old, new) = (text(&a.old), text(&a.new));
            log_change(&a.key, &old, &new);
            if a.key.starts_with(MAPPING_PREFIX) {
                self.addresses.update(&a.key, a.new.as_deref());
                if let Some(mesh) = &self.mesh {
                    mesh.redial_now("cluster address mapping changed");
                }
            }
            if a.key == "cluster.tls_verification" {
                let mode = match new.as_str() {
                    "Enforce" => TlsMode::Enforce,
                    _ => TlsMode::Permissive,
                };
                let changed = self.edit_file(&a.key, |f| {
                    let changed = f.cluster.tls_verification != mode;
                    f.cluster.tls_verification = mode;
                    changed
                });
                if changed {
                    self.alarms.raise(
                        20007,
                        &a.key,
                        &format!("{} changed from '{old}' to '{new}': restart this peer for it to take effect", a.key),
                    );
                }
            }
        }
    }

    fn primary_changed(&self, primary: usize, epoch: u64) {
        info!(target: CONFIG_LOG, event = "System Configuration Changed", epoch = epoch,
            "xconfiguration cluster.configuration_primary - changed to: {primary}");
        self.edit_file("cluster.configuration_primary", |f| {
            let changed = f.cluster.configuration_primary != primary;
            f.cluster.configuration_primary = primary;
            changed
        });
    }
}
