//! The SIP service of one peer: transports in, registrar or proxy, transports out. It reads
//! the cluster configuration (domains, users, limits) and keeps its bindings in the
//! replication engine through the node.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use causeway_cluster::Node;
use causeway_common::time::unix_ms_now;
use causeway_replication::{config_stream, Applied, Observer, Origin, StreamId};
use causeway_sip::{build, Message, SipUri};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::admission::CallAdmission;
use crate::location::{self, Location};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::transport::{Caps, Incoming, Proto, Source, Target, Transports};

pub(crate) const LOG: &str = "network.sip";

/// How a node runs SIP (the node file's `[sip]` section).
#[derive(Clone, Debug)]
pub struct SipSettings {
    pub listen: IpAddr,
    /// How often every neighbour zone's addresses are sent an OPTIONS keep-alive.
    pub zone_keepalive: Duration,
    /// The name servers DNS zones ask; none: the system's.
    pub dns_servers: Vec<SocketAddr>,
    /// More addresses to answer on, with the same ports: the secondary of two HA pairs
    /// answers on the second pair's virtual IP too.
    pub also_listen: Vec<IpAddr>,
    pub udp_port: u16,
    pub tcp_port: u16,
    /// TLS with the node's certificate; none: no TLS listener.
    pub tls: Option<(u16, Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>)>,
    pub caps: Caps,
    /// Names that count as this cluster's SIP domain besides `sip.domains`: the cluster
    /// name and this peer's own address (EX: "addressed to a peer's IP or the cluster name").
    pub local_names: Vec<String>,
    pub min_expires: u32,
    pub max_expires: u32,
    pub default_expires: u32,
}

/// The cluster configuration items SIP reads, refreshed when they change.
#[derive(Default, Clone, Debug)]
pub(crate) struct SipConfig {
    pub domains: Vec<String>,
    pub users: HashMap<String, String>,
    pub calls_max: u64,
    pub bandwidth_total_kbps: u64,
    pub bandwidth_per_call_kbps: u64,
    pub guard: crate::guard::GuardSettings,
    /// The Default Zone's policy: every source that is not a neighbour zone's.
    pub auth_policy: AuthPolicy,
    /// Neighbour zones with a policy of their own, by the IP of their address.
    pub zone_policies: HashMap<IpAddr, (String, AuthPolicy)>,
    /// Search rules and the zones they send to.
    pub routing: crate::routing::Routing,
}

impl SipConfig {
    /// The authentication policy for a request from `ip`: its zone's, or the Default
    /// Zone's (Expressway's zone setting).
    pub fn policy_for(&self, ip: IpAddr) -> AuthPolicy {
        self.zone_policies
            .get(&ip)
            .map(|(_, p)| *p)
            .unwrap_or(self.auth_policy)
    }
}

impl AuthPolicy {
    fn parse(value: &str) -> AuthPolicy {
        match value {
            "Check credentials" => AuthPolicy::Check,
            "Treat as authenticated" => AuthPolicy::TreatAsAuthenticated,
            _ => AuthPolicy::DoNotCheck,
        }
    }
}

/// How requests other than REGISTER from outside the cluster are authenticated
/// (`sip.authentication.policy`, Expressway's zone setting).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum AuthPolicy {
    /// Challenged (407) for credentials of a configured user.
    Check,
    /// Let through, as unauthenticated: unknown and unregistered users are answered alike.
    #[default]
    DoNotCheck,
    /// Let through, as authenticated.
    TreatAsAuthenticated,
}

pub struct SipService {
    pub(crate) node: Arc<Node>,
    pub(crate) settings: SipSettings,
    pub(crate) transports: Arc<Transports>,
    pub(crate) location: Location,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) config: RwLock<Arc<SipConfig>>,
    pub(crate) proxy: Proxy,
    pub(crate) admission: Arc<CallAdmission>,
    pub(crate) licences: crate::licences::LicencePool,
    pub(crate) self_index: usize,
    /// Makes branches and tags unique across restarts and peers.
    pub(crate) instance: u64,
    pub(crate) counter: AtomicU64,
    pub(crate) auth: crate::authenticator::Authenticator,
    /// The keys that mark requests relayed between peers (this peer's and the others').
    pub(crate) relay: crate::relay::RelayKeys,
    pub(crate) cancel: CancellationToken,
    /// Every task of the service, so `stop` ends them all.
    pub(crate) tasks: TaskTracker,
    /// Requests being handled now.
    in_hand: AtomicUsize,
}

/// Requests being handled at once, at most (each waits up to `ack_timeout` when it writes).
const MAX_REQUESTS_IN_HAND: usize = 16_384;

/// One request in hand, until dropped.
struct InHand<'a>(&'a AtomicUsize);

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The transports' handler: the service, once it exists.
struct Dispatcher(std::sync::Weak<SipService>);

impl crate::transport::Deliver for Dispatcher {
    fn deliver(&self, incoming: Incoming) -> bool {
        match self.0.upgrade() {
            Some(svc) => svc.take(incoming),
            None => false,
        }
    }
}

/// Feeds replicated changes of the SIP streams and the configuration to the service.
struct Watcher(std::sync::Weak<SipService>);

impl Observer for Watcher {
    fn applied(&self, stream: &StreamId, applied: &[Applied], _origin: Origin) {
        let Some(svc) = self.0.upgrade() else { return };
        if *stream == config_stream() {
            if applied.iter().any(|a| {
                ["sip.", "limits.", "zones.", "routing."]
                    .iter()
                    .any(|p| a.key.starts_with(p))
            }) {
                svc.reload_config();
            }
        } else {
            for a in applied {
                svc.apply_record(stream, &a.key, a.new.as_deref());
            }
        }
    }
}

impl SipService {
    /// Binds the SIP ports and starts serving. The node's replicated bindings are loaded
    /// first, so a restarted peer answers from what the cluster holds.
    pub async fn start(
        node: Arc<Node>,
        settings: SipSettings,
        cancel: CancellationToken,
    ) -> anyhow::Result<Arc<SipService>> {
        crate::catalogue::register();
        // Its own token under the process's: stopping SIP stops nothing else.
        let cancel = cancel.child_token();
        let tasks = TaskTracker::new();
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::channel(16_384);
        let addresses: Vec<IpAddr> = std::iter::once(settings.listen)
            .chain(settings.also_listen.iter().copied())
            .collect();
        let transports = Transports::bind(
            &addresses,
            settings.udp_port,
            settings.tcp_port,
            settings.tls.clone(),
            settings.caps.clone(),
            tx,
            metrics.clone(),
            cancel.clone(),
            tasks.clone(),
        )
        .await?;
        let self_index = node.mesh().map(|m| m.settings().self_index).unwrap_or(1);
        let admission = Arc::new(CallAdmission::new(
            node.clone(),
            self_index,
            metrics.clone(),
            tasks.clone(),
        ));
        let resolver = if settings.dns_servers.is_empty() {
            crate::dns::SipResolver::system()
        } else {
            crate::dns::SipResolver::with_servers(&settings.dns_servers)
        };
        if let Some(why) = resolver.unusable() {
            // DNS zones then answer each request 503 with this reason; nothing else needs it.
            warn!(target: LOG, reason = %why,
                "DNS zones cannot resolve: set [sip] dns_servers or fix the system's resolver");
        }
        let svc = Arc::new(SipService {
            node: node.clone(),
            settings,
            transports,
            location: Location::new(self_index),
            metrics,
            config: RwLock::new(Arc::new(SipConfig::default())),
            proxy: Proxy::new(resolver),
            admission,
            licences: crate::licences::LicencePool::new(node.clone(), self_index),
            self_index,
            instance: unix_ms_now() ^ (std::process::id() as u64) << 40,
            counter: AtomicU64::new(1),
            auth: crate::authenticator::Authenticator::new(node.clone()),
            relay: crate::relay::RelayKeys::generate(self_index),
            cancel,
            tasks,
            in_hand: AtomicUsize::new(0),
        });
        node.watch(Arc::new(Watcher(Arc::downgrade(&svc))));
        crate::admission::serve_admissions(&svc);
        node.metrics()
            .register(Box::new(crate::status::SipCollector(Arc::downgrade(&svc))));
        svc.reload_config();
        let engine = node.replication();
        for ns in [
            location::NAMESPACE,
            crate::admission::NAMESPACE,
            crate::licences::NAMESPACE,
            crate::relay::NAMESPACE,
        ] {
            for id in engine.streams(ns) {
                for (key, value) in engine.entries(&id) {
                    svc.apply_record(&id, &key, Some(&value));
                }
            }
        }
        // This peer's relay key, for the others to check the requests it relays.
        let (node_for_key, own, key) = (
            node.clone(),
            svc.own_stream(crate::relay::NAMESPACE),
            svc.relay.own_record(),
        );
        svc.tasks.spawn(async move {
            let change = causeway_replication::Change {
                key: crate::relay::KEY.to_string(),
                value: Some(key),
            };
            if let Err(e) = node_for_key.replication().write(&own, vec![change]).await {
                warn!(target: LOG, reason = %e, "Publishing this peer's relay key failed");
            }
        });
        let publisher = svc.clone();
        svc.tasks
            .spawn(async move { publisher.licences.publish().await });
        // Ready for requests: what was read meanwhile waits in `rx`, the rest goes straight
        // to the handler.
        svc.tasks.spawn(svc.clone().dispatch(rx));
        svc.transports
            .set_handler(Box::new(Dispatcher(Arc::downgrade(&svc))));
        svc.tasks.spawn(svc.clone().housekeeping());
        svc.tasks.spawn(svc.clone().zone_keepalive());
        Ok(svc)
    }

    /// One record of a SIP stream (`<namespace>/peerN`) as it is now, into the index that
    /// follows it; other streams are not SIP's.
    fn apply_record(&self, stream: &StreamId, key: &str, value: Option<&[u8]>) {
        let Some(owner) = location::stream_owner(&stream.name) else {
            return;
        };
        match stream.namespace.as_str() {
            location::NAMESPACE => self.location.apply(owner, key, value),
            crate::admission::NAMESPACE => self.admission.apply(owner, key, value),
            crate::licences::NAMESPACE => self.licences.apply(owner, key, value),
            crate::relay::NAMESPACE => self.relay.apply(owner, key, value),
            _ => {}
        }
    }

    pub(crate) fn reload_config(&self) {
        let entries = self.node.replication().entries(&config_stream());
        let mut c = SipConfig {
            routing: crate::routing::Routing::from_items(
                entries
                    .iter()
                    .filter_map(|(k, v)| Some((k.as_str(), std::str::from_utf8(v).ok()?))),
            ),
            ..SipConfig::default()
        };
        // zone → (address, policy), matched up once every item is read.
        let mut zones: HashMap<String, (Option<String>, Option<AuthPolicy>)> = HashMap::new();
        for (key, value) in entries {
            let value = String::from_utf8_lossy(&value).into_owned();
            match key.as_str() {
                "sip.domains" => {
                    c.domains = value
                        .split(',')
                        .map(|d| d.trim().to_ascii_lowercase())
                        .filter(|d| !d.is_empty())
                        .collect()
                }
                "limits.calls.max" => c.calls_max = value.parse().unwrap_or(0),
                "sip.authentication.policy" => c.auth_policy = AuthPolicy::parse(&value),
                "sip.authentication.window_s" => {
                    c.guard.window = Duration::from_secs(value.parse().unwrap_or(60))
                }
                "sip.authentication.slow_after" => c.guard.slow_after = value.parse().unwrap_or(5),
                "sip.authentication.block_after" => {
                    c.guard.block_after = value.parse().unwrap_or(20)
                }
                "sip.authentication.block_s" => {
                    c.guard.block_for = Duration::from_secs(value.parse().unwrap_or(600))
                }
                "sip.authentication.alarm_after" => {
                    c.guard.alarm_after = value.parse().unwrap_or(50)
                }
                "limits.bandwidth.total_kbps" => {
                    c.bandwidth_total_kbps = value.parse().unwrap_or(0)
                }
                "limits.bandwidth.per_call_kbps" => {
                    c.bandwidth_per_call_kbps = value.parse().unwrap_or(0)
                }
                k => {
                    if let Some(rest) = k.strip_prefix("zones.") {
                        if let Some(zone) = rest.strip_suffix(".address") {
                            zones.entry(zone.to_string()).or_default().0 = Some(value.clone());
                        } else if let Some(zone) = rest.strip_suffix(".authentication_policy") {
                            zones.entry(zone.to_string()).or_default().1 =
                                Some(AuthPolicy::parse(&value));
                        }
                    }
                    if let Some(user) = k.strip_prefix("sip.users.") {
                        c.users.insert(user.to_string(), value);
                    }
                }
            }
        }
        // A zone is recognised by the IP of its address; a zone named by DNS is matched
        // once zones resolve names (issue 16).
        for (zone, (address, policy)) in zones {
            let (Some(address), Some(policy)) = (address, policy) else {
                continue;
            };
            for a in address.split(',') {
                let host = a.rsplit_once(':').map_or(a, |(h, _)| h);
                let ip = host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>();
                if let Ok(ip) = ip {
                    c.zone_policies.insert(ip, (zone.clone(), policy));
                }
            }
        }
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(c);
    }

    /// The configuration as it is now (replaced whole when it changes).
    pub(crate) fn config(&self) -> Arc<SipConfig> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn transports(&self) -> &Arc<Transports> {
        &self.transports
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether `ip` is one of this system's SIP addresses.
    pub(crate) fn is_own_address(&self, ip: IpAddr) -> bool {
        self.transports.addresses().any(|a| a == ip)
    }

    /// Whether `host` names this cluster's SIP service: a configured domain, the cluster
    /// name, or one of this peer's own addresses.
    pub(crate) fn is_local_domain(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host
            .parse::<IpAddr>()
            .is_ok_and(|ip| self.is_own_address(ip))
        {
            return true;
        }
        self.settings
            .local_names
            .iter()
            .any(|n| n.eq_ignore_ascii_case(host))
            || self
                .config()
                .domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(host))
    }

    /// Whether a URI names this very peer (a Route or Record-Route it wrote).
    pub(crate) fn is_me(&self, uri: &SipUri) -> bool {
        let host_is_me = uri.ip().is_some_and(|ip| self.is_own_address(ip));
        let port_is_mine = match uri.port {
            None => true,
            Some(p) => {
                p == self.transports.bound.udp_port
                    || p == self.transports.bound.tcp_port
                    || Some(p) == self.transports.bound.tls_port
            }
        };
        host_is_me && port_is_mine
    }

    /// Cluster peers by index with their address (this peer included) and whether each is
    /// reachable now.
    pub(crate) fn peers(&self) -> Vec<(usize, Option<IpAddr>, bool)> {
        let Some(mesh) = self.node.mesh() else {
            return vec![(self.self_index, Some(self.settings.listen), true)];
        };
        let view = mesh.view();
        view.peers
            .iter()
            .map(|p| {
                if p.index == view.self_index {
                    (p.index, Some(self.settings.listen), true)
                } else {
                    let ip = p.resolved.or_else(|| p.address.parse().ok());
                    (p.index, ip, p.is_active())
                }
            })
            .collect()
    }

    pub(crate) fn peer_address(&self, index: usize) -> Option<(IpAddr, bool)> {
        self.peers()
            .into_iter()
            .find(|(i, _, _)| *i == index)
            .and_then(|(_, ip, up)| ip.map(|ip| (ip, up)))
    }

    /// Whether `msg` was relayed by another peer of the cluster: it comes from a peer's
    /// address *and* carries that peer's mark. A client at a peer's address is a client.
    pub(crate) fn relayed_by_peer(&self, msg: &causeway_sip::Message, source: &Source) -> bool {
        let ip = source.remote.ip();
        !self.is_own_address(ip)
            && self.peers().iter().any(|(i, a, _)| {
                *i != self.self_index && *a == Some(ip) && self.relay.verify(msg, *i)
            })
    }

    pub(crate) fn is_cluster_peer(&self, ip: IpAddr) -> bool {
        !self.is_own_address(ip)
            && self
                .peers()
                .iter()
                .any(|(i, a, _)| *i != self.self_index && *a == Some(ip))
    }

    pub(crate) fn unique(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{:x}{:x}{n:x}", self.self_index, self.instance)
    }

    /// Sends a response to where `source` says the request came from.
    pub(crate) fn reply(&self, source: &Source, bytes: bytes::Bytes, status: u16) {
        self.metrics.response(status);
        self.transports.send(
            &Target {
                proto: source.proto,
                addr: source.remote,
                conn: source.conn,
                local: Some(source.local),
            },
            bytes,
        );
    }

    /// A response of our own to `req` (no body).
    pub(crate) fn respond(
        &self,
        req: &Message,
        source: &Source,
        status: u16,
        reason: &str,
        extra: &[String],
    ) -> bytes::Bytes {
        let tag = format!("cw{}", self.unique());
        let bytes = build::response(req, status, reason, Some(&tag), extra);
        self.reply(source, bytes.clone(), status);
        bytes
    }

    /// The messages read before `start` set the handler (then none come here).
    async fn dispatch(self: Arc<Self>, mut rx: mpsc::Receiver<Incoming>) {
        loop {
            let incoming = tokio::select! {
                _ = self.cancel.cancelled() => return,
                m = rx.recv() => match m { Some(m) => m, None => return },
            };
            if !self.take(incoming) {
                self.metrics.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A request becomes a task on the runtime of the thread that read it (a UDP reader's
    /// own); a response is handled at once. False when too many requests are in hand.
    fn take(self: &Arc<Self>, incoming: Incoming) -> bool {
        if !incoming.msg.is_request() {
            self.handle_response(incoming);
            return true;
        }
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
        // A REGISTER waits for the cluster to hold it (up to ack_timeout): beyond this many
        // at once, the service is behind, and UDP senders retransmit.
        if self.in_hand.fetch_add(1, Ordering::Relaxed) >= MAX_REQUESTS_IN_HAND {
            self.in_hand.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        let svc = self.clone();
        self.tasks.spawn(async move {
            let _done = InHand(&svc.in_hand);
            svc.clone().handle_request(incoming).await;
        });
        true
    }

    /// Expired and superseded bindings of this peer are deleted, finished transactions
    /// forgotten.
    async fn housekeeping(self: Arc<Self>) {
        let own = StreamId::new(location::NAMESPACE, &location::stream_name(self.self_index));
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            self.sweep_transactions();
            self.auth.sweep(&self.config().guard);
            self.licences.refresh(&self.peers(), &self.tasks);
            // Counts of a large registration table, for the pages and /metrics (a pass over
            // every binding: not on a worker).
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || {
                me.location.refresh_counts_if_wanted(unix_ms_now())
            })
            .await;
            let stale = self.location.stale_own(unix_ms_now());
            if !stale.is_empty() {
                let changes = stale
                    .into_iter()
                    .map(|key| causeway_replication::Change { key, value: None })
                    .collect();
                if let Err(e) = self.node.replication().write(&own, changes).await {
                    warn!(target: LOG, reason = %e, "Removing expired registrations failed");
                }
            }
            self.admission.housekeeping().await;
        }
    }

    pub(crate) fn own_stream(&self, namespace: &str) -> StreamId {
        StreamId::new(namespace, &location::stream_name(self.self_index))
    }

    /// This system's first SIP address and its port for `proto`.
    pub fn local_address(&self, proto: Proto) -> SocketAddr {
        SocketAddr::new(self.settings.listen, self.transports.port(proto))
    }
}

impl causeway_cluster::Service for SipService {
    fn name(&self) -> &'static str {
        "sip"
    }

    fn status(&self) -> serde_json::Value {
        let (per_owner, aors) = self.location.counts_recent(unix_ms_now());
        serde_json::json!({
            "registered_aors": aors,
            "bindings": per_owner.values().sum::<usize>(),
            "calls": self.admission.usage().iter().map(|p| p.1).sum::<usize>(),
            "connections": self.transports.connection_count(),
        })
    }

    fn stop(&self) -> causeway_mesh::BoxFuture<'_, ()> {
        Box::pin(async move {
            self.cancel.cancel();
            self.node
                .leases()
                .rpc()
                .unserve(crate::admission::admit_endpoint().path());
            self.tasks.close();
            // A request handler waits at most for one replicated write (5 s).
            if tokio::time::timeout(Duration::from_secs(6), self.tasks.wait())
                .await
                .is_err()
            {
                warn!(target: LOG, "SIP tasks still running 6 s after stop");
            }
        })
    }
}
