//! The in-process cluster harness shared by the cluster crate's tests: nodes over the
//! in-memory network, each with its own store kept across restarts like a disk.
#![allow(dead_code)] // each test binary uses its own part of it

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use causeway_cluster::config::{AdminSection, ClusterSection, NodeSection, TlsSection};
use causeway_cluster::xconfig::{self, ItemDef, Kind};
use causeway_cluster::{Node, NodeConfig, NodeStore};
use causeway_mesh::{MemoryNetwork, SystemResolver, TlsMode};
use causeway_store::MemoryStore;

pub fn ip(k: usize) -> IpAddr {
    format!("198.18.0.{k}").parse().unwrap()
}

/// The items of a service the node's tests write (SIP's own live in its crate).
static SERVICE_ITEMS: &[ItemDef] = &[
    ItemDef {
        path: "sip.domains",
        kind: Kind::Domains,
        restart: false,
        about: "SIP domains",
        default: "",
    },
    ItemDef {
        path: "limits.calls.max",
        kind: Kind::Limit,
        restart: false,
        about: "concurrent calls",
        default: "0",
    },
];

pub fn config(k: usize, n: usize, mode: TlsMode) -> NodeConfig {
    let _ = xconfig::register(SERVICE_ITEMS);
    NodeConfig {
        node: NodeSection {
            system_name: format!("peer{k}"),
            address: ip(k).to_string(),
            data_dir: format!("/nonexistent/peer{k}").into(),
            log_format: Default::default(),
        },
        cluster: ClusterSection {
            name: "cluster.lab.example".into(),
            peers: (1..=n).map(|i| ip(i).to_string()).collect(),
            tls_verification: mode,
            ..ClusterSection::default()
        },
        tls: TlsSection::default(),
        admin: AdminSection::default(),
        licences: Default::default(),
        sip: None,
        database: None,
        ha: None,
        source: "test.toml".into(),
        announce_version: None,
    }
}

pub struct Cluster {
    pub net: MemoryNetwork,
    pub nodes: Vec<Option<Arc<Node>>>,
    /// Each node's store, kept across restarts like its disk.
    pub stores: Vec<Arc<MemoryStore>>,
    pub n: usize,
}

pub fn fresh_store() -> NodeStore {
    NodeStore::memory(Arc::new(MemoryStore::new()))
}

impl Cluster {
    pub fn start(n: usize, mode: TlsMode) -> Self {
        Self::start_with(n, mode, |_, _| {})
    }

    pub fn start_with(n: usize, mode: TlsMode, tweak: impl Fn(usize, &mut NodeConfig)) -> Self {
        let net = MemoryNetwork::new();
        let mut c = Cluster {
            net,
            nodes: Vec::new(),
            stores: (0..n).map(|_| Arc::new(MemoryStore::new())).collect(),
            n,
        };
        for k in 1..=n {
            let mut cfg = config(k, n, mode);
            tweak(k, &mut cfg);
            c.nodes.push(Some(c.boot(k, cfg)));
        }
        c
    }

    pub fn boot(&self, k: usize, cfg: NodeConfig) -> Arc<Node> {
        let transport = self.net.transport(ip(k));
        let resolver = Arc::new(SystemResolver {
            ip_version: Default::default(),
        });
        let store = NodeStore::memory(self.stores[k - 1].clone());
        Node::start(cfg, Some(transport), resolver, store).0
    }

    pub fn node(&self, k: usize) -> &Arc<Node> {
        self.nodes[k - 1].as_ref().expect("node is running")
    }

    pub fn all_ips(&self) -> Vec<IpAddr> {
        (1..=self.n).map(ip).collect()
    }

    pub fn running(&self) -> impl Iterator<Item = (usize, &Arc<Node>)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.as_ref().map(|n| (i + 1, n)))
    }

    pub fn formed(&self) -> bool {
        self.running()
            .all(|(_, n)| n.mesh().unwrap().view().all_active())
    }

    pub async fn crash(&mut self, k: usize) {
        if let Some(node) = self.nodes[k - 1].take() {
            node.shutdown().await;
        }
    }
}

/// Polls `cond` every 50 ms (of paused time) for up to `secs`.
pub async fn wait_for(secs: u64, what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
