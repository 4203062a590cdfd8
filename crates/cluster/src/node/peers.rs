//! Reaching the peers: frames from the mesh routed to replication and RPC, the links the
//! engine sends on, and the cluster address mapping consulted before DNS (EX-9, EX-10).

use super::*;

impl Node {
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
}

/// How often peers whose name failed to resolve are resolved and dialled again, whatever
/// their backoff (the seed's peer name resolver queues its next run 300 s ahead).
pub(super) const DNS_RETRY: Duration = Duration::from_secs(300);

/// The peers whose last attempt failed to resolve their name.
pub(super) fn failed_dns(view: &causeway_mesh::MeshView) -> Vec<String> {
    view.peers
        .iter()
        .filter(|p| {
            !p.is_active() && matches!(p.failure, Some(causeway_mesh::FailureKind::Resolve))
        })
        .map(|p| format!("Peer {} ({})", p.index, p.address))
        .collect()
}

/// Every `DNS_RETRY`, peers that failed DNS are resolved and dialled again now, logged in
/// the seed's words.
pub(super) async fn retry_failed_names(node: Arc<Node>) {
    let Some(mesh) = node.mesh.clone() else {
        return;
    };
    loop {
        tokio::select! {
            _ = node.cancel.cancelled() => return,
            _ = tokio::time::sleep(DNS_RETRY) => {}
        }
        let failed = failed_dns(&mesh.view());
        if !failed.is_empty() {
            info!(target: "developer.clusterdb.peernameresolver", peers = %failed.join(", "),
                queue_time_ms = DNS_RETRY.as_millis() as u64,
                "Triggering forced peer update of peers which failed DNS and queueing next run");
            mesh.redial_quietly();
        }
    }
}

/// Replication frames to the engine; everything else to the services.
pub(super) async fn route_inbound(
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

pub(super) struct MeshLink(pub(super) Arc<Mesh>);

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

pub(super) struct NoPeers;

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
pub(super) struct AddressMap(pub(super) RwLock<HashMap<String, IpAddr>>);

pub(super) const MAPPING_PREFIX: &str = "cluster.address_mapping.";

impl AddressMap {
    pub(super) fn load(&self, entries: &[(String, Vec<u8>)]) {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        map.clear();
        for (k, v) in entries {
            self.parse_into(&mut map, k, Some(v));
        }
    }

    pub(super) fn update(&self, key: &str, value: Option<&[u8]>) {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        self.parse_into(&mut map, key, value);
    }

    pub(super) fn parse_into(
        &self,
        map: &mut HashMap<String, IpAddr>,
        key: &str,
        value: Option<&[u8]>,
    ) {
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

    pub(super) fn get(&self, host: &str) -> Option<IpAddr> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&host.to_ascii_lowercase())
            .copied()
    }
}

pub(super) struct MappedResolver {
    pub(super) map: Arc<AddressMap>,
    pub(super) inner: Arc<dyn Resolver>,
}

impl Resolver for MappedResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<IpAddr, String>> {
        match self.map.get(host) {
            Some(ip) => Box::pin(async move { Ok(ip) }),
            None => self.inner.resolve(host),
        }
    }
}
