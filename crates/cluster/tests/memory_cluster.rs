//! Whole clusters in one process over the in-memory network, with tokio's clock paused so
//! minutes of heartbeats take milliseconds.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use causeway_cluster::{Node, NodeConfig, NodeStore};
use causeway_common::error::ErrorCode;
use causeway_mesh::{Clustering, MemoryNetwork, SystemResolver, TlsMode};
use causeway_store::MemoryStore;
use common::*;

fn raised(node: &Node, id: u32, subject: &str) -> bool {
    node.alarms().is_raised(id, subject)
}

#[tokio::test(start_paused = true)]
async fn three_and_six_peers_form_and_isolation_raises_and_lowers_20004() {
    for n in [3, 6] {
        let c = Cluster::start(n, TlsMode::Enforce);
        wait_for(10, "cluster formed", || c.formed()).await;
        for (_, node) in c.running() {
            assert!(
                node.alarms().active().is_empty(),
                "alarms in a healthy cluster: {:?}",
                node.alarms().active()
            );
        }
        let victim = ip(2).to_string();
        c.net.isolate(ip(2), &c.all_ips());
        wait_for(5, "20004 raised for peer 2 on every other peer", || {
            c.running()
                .filter(|(k, _)| *k != 2)
                .all(|(_, node)| raised(node, 20004, &victim))
        })
        .await;
        for (k, node) in c.running().filter(|(k, _)| *k != 2) {
            let status = node.cluster_status();
            assert!(
                matches!(&status.peers[1].clustering, Clustering::Failed(r) if r.contains("no heartbeat")),
                "peer {k} sees {:?}",
                status.peers[1].clustering
            );
        }
        // The isolated peer sees every other peer gone.
        wait_for(5, "isolated peer alarms every other peer", || {
            (1..=n)
                .filter(|&k| k != 2)
                .all(|k| raised(c.node(2), 20004, &ip(k).to_string()))
        })
        .await;
        c.net.heal_all();
        wait_for(10, "cluster re-formed after the partition healed", || {
            c.formed()
        })
        .await;
        wait_for(3, "20004 lowered everywhere", || {
            c.running()
                .all(|(_, node)| node.alarms().active().is_empty())
        })
        .await;
        for (_, node) in c.running() {
            node.shutdown().await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn no_alarm_flaps_in_ten_minutes_of_steady_state_with_jitter() {
    let c = Cluster::start(3, TlsMode::Enforce);
    wait_for(10, "cluster formed", || c.formed()).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Some delay (well under the failure timeout) on every link.
    for a in 1..=3 {
        for b in 1..=3 {
            if a != b {
                c.net.delay(ip(a), ip(b), Duration::from_millis(20));
            }
        }
    }
    let before: Vec<usize> = c
        .running()
        .map(|(_, n)| n.alarms().events().len())
        .collect();
    tokio::time::sleep(Duration::from_secs(600)).await;
    let after: Vec<usize> = c
        .running()
        .map(|(_, n)| n.alarms().events().len())
        .collect();
    assert_eq!(before, after, "alarm events during steady state");
    assert!(c.formed());
    // RTT is measured: 2 × 20 ms of delay.
    let rtt = c.node(1).cluster_status().peers[1].rtt_ms.unwrap();
    assert!((35.0..80.0).contains(&rtt), "rtt {rtt}");
}

#[tokio::test(start_paused = true)]
async fn lost_heartbeats_under_the_timeout_do_not_fail_a_peer_but_a_dead_one_does() {
    let mut c = Cluster::start(3, TlsMode::Permissive);
    wait_for(10, "cluster formed", || c.formed()).await;
    // 30 % of frames lost one way: heartbeats every 200 ms, timeout 800 ms, so a loss run
    // long enough to fail the peer is rare but possible; the invariant is convergence.
    c.net.loss(ip(1), ip(3), 0.3);
    tokio::time::sleep(Duration::from_secs(30)).await;
    c.net.loss(ip(1), ip(3), 0.0);
    wait_for(10, "converged after loss", || c.formed()).await;
    // A crash (sockets closed) is seen at once, and the restart rejoins by itself.
    c.crash(3).await;
    wait_for(2, "crash seen", || {
        raised(c.node(1), 20004, "198.18.0.3") && raised(c.node(2), 20004, "198.18.0.3")
    })
    .await;
    let node = c.boot(3, config(3, 3, TlsMode::Permissive));
    c.nodes[2] = Some(node);
    wait_for(10, "restarted peer active again", || c.formed()).await;
    wait_for(3, "alarms lowered", || {
        c.running().all(|(_, n)| n.alarms().active().is_empty())
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_certificate_that_does_not_name_the_peer_is_refused_in_enforce_only() {
    for mode in [TlsMode::Enforce, TlsMode::Permissive] {
        let net = MemoryNetwork::new();
        net.set_identity(ip(3), "198.18.0.99");
        let c = Cluster {
            net,
            nodes: Vec::new(),
            stores: (0..3).map(|_| Arc::new(MemoryStore::new())).collect(),
            n: 3,
        };
        let mut c = c;
        for k in 1..=3 {
            let node = c.boot(k, config(k, 3, mode));
            c.nodes.push(Some(node));
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let p1 = c.node(1).cluster_status();
        let cert = p1.peers[2].certificate.to_string();
        assert!(
            cert.starts_with("Invalid (Common Name in certificate does not match"),
            "{cert}"
        );
        match mode {
            TlsMode::Enforce => {
                assert!(
                    matches!(&p1.peers[2].clustering, Clustering::Failed(r) if r.contains("certificate")),
                    "{:?}",
                    p1.peers[2]
                );
                assert!(raised(c.node(1), 20004, "198.18.0.3"));
                // Peer 3 is told why.
                let p3 = c.node(3).cluster_status();
                assert!(
                    matches!(&p3.peers[0].clustering, Clustering::Failed(r) if r.contains("refused by the peer")),
                    "{:?}",
                    p3.peers[0]
                );
                // Peers 1 and 2 are unaffected.
                assert!(p1.peers[1].is_active());
            }
            TlsMode::Permissive => {
                assert!(p1.peers[2].is_active(), "{:?}", p1.peers[2]);
                assert!(
                    raised(c.node(1), 21004, "198.18.0.3"),
                    "certificate warning in Permissive"
                );
            }
        }
        for k in 1..=3 {
            c.crash(k).await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn configuration_drift_is_refused_with_the_field_named() {
    type Tweak = Box<dyn Fn(&mut NodeConfig)>;
    let cases: Vec<(Tweak, &str, u32)> = vec![
        (
            Box::new(|c| c.cluster.name = "other.lab.example".into()),
            "cluster name differs",
            20012,
        ),
        (
            Box::new(|c| c.cluster.peers.swap(0, 1)),
            "peer list differs at Peer 1 address",
            20012,
        ),
        (
            Box::new(|c| c.cluster.tls_verification = TlsMode::Permissive),
            "TLS verification mode differs",
            20012,
        ),
        (
            Box::new(|c| c.announce_version = Some("9.9.9".into())),
            "software version differs",
            21002,
        ),
    ];
    for (tweak, text, alarm) in cases {
        let c = Cluster::start_with(3, TlsMode::Enforce, |k, cfg| {
            if k == 3 {
                tweak(cfg)
            }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        let p1 = c.node(1).cluster_status();
        assert!(p1.peers[1].is_active(), "peers 1 and 2 agree");
        match &p1.peers[2].clustering {
            Clustering::Failed(r) => assert!(r.contains(text), "'{r}' should say '{text}'"),
            other => panic!("peer 3 should be refused ({text}), is {other:?}"),
        }
        assert!(
            raised(c.node(1), alarm, "198.18.0.3"),
            "alarm {alarm} for {text}"
        );
        assert!(raised(c.node(1), 20004, "198.18.0.3"));
        // The refused peer shows the version it says it runs now.
        if alarm == 21002 {
            assert_eq!(p1.peers[2].software_version.as_deref(), Some("9.9.9"));
        }
        for (_, n) in c.running() {
            n.shutdown().await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn own_address_missing_raises_20003_and_does_not_cluster() {
    let c = Cluster::start_with(3, TlsMode::Enforce, |k, cfg| {
        if k == 3 {
            cfg.node.address = "198.18.0.77".into();
        }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    let node = c.node(3);
    assert!(node.mesh().is_none());
    assert!(raised(node, 20003, "peer list"));
    assert!(node
        .cluster_status()
        .problem
        .unwrap()
        .contains("'198.18.0.77' is not in the peer list"));
    // The others alarm the silent peer 3.
    assert!(raised(c.node(1), 20004, "198.18.0.3"));
    assert!(
        raised(c.node(1), 20021, "198.18.0.3"),
        "nothing listens at peer 3's address"
    );
}

#[tokio::test(start_paused = true)]
async fn a_node_claiming_another_peers_number_is_refused_and_the_real_peer_stays_active() {
    let c = Cluster::start(3, TlsMode::Permissive);
    wait_for(10, "cluster formed", || c.formed()).await;
    // A fourth machine, 198.18.0.4, configured as Peer 2: it dials Peer 3 as Peer 2.
    let mut cfg = config(2, 3, TlsMode::Permissive);
    cfg.node.system_name = "impostor".into();
    let resolver = Arc::new(SystemResolver {
        ip_version: Default::default(),
    });
    let impostor = Node::start(cfg, Some(c.net.transport(ip(4))), resolver, fresh_store()).0;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let seen_by_impostor = impostor.cluster_status();
    match &seen_by_impostor.peers[2].clustering {
        Clustering::Failed(r) => assert!(
            r.contains("claiming to be Peer 2 (198.18.0.2) came from 198.18.0.4"),
            "the refusal names the source: {r}"
        ),
        other => panic!("the impostor must be refused, is {other:?}"),
    }
    let p3 = c.node(3).cluster_status();
    assert!(
        p3.peers[1].is_active(),
        "the real Peer 2 stays Active: {:?}",
        p3.peers[1]
    );
    assert_eq!(p3.peers[1].system_name.as_deref(), Some("peer2"));
    assert!(c.formed());
    impostor.shutdown().await;
}

/// A connection from an Active peer's own address with a certificate that does not name
/// it (a rogue CA, another machine behind the same NAT) is refused, and changes nothing
/// about the real peer: still Active, its certificate still valid, no 21004 against it.
#[tokio::test(start_paused = true)]
async fn a_rogue_certificate_from_an_active_peers_address_raises_nothing_against_it() {
    let c = Cluster::start(3, TlsMode::Enforce);
    wait_for(10, "cluster formed", || c.formed()).await;
    // Another machine on Peer 2's address, presenting a certificate for another name.
    let rogue_transport = c.net.transport(ip(2));
    c.net.set_identity(ip(2), "rogue.example");
    let mut cfg = config(2, 3, TlsMode::Enforce);
    cfg.node.system_name = "rogue".into();
    let resolver = Arc::new(SystemResolver {
        ip_version: Default::default(),
    });
    let rogue = Node::start(cfg, Some(rogue_transport), resolver, fresh_store()).0;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let p3 = c.node(3).cluster_status();
    assert!(p3.peers[1].is_active(), "{:?}", p3.peers[1]);
    assert_eq!(
        p3.peers[1].certificate,
        causeway_mesh::CertStatus::Valid,
        "{:?}",
        p3.peers[1]
    );
    assert!(
        !raised(c.node(3), 21004, "198.18.0.2"),
        "{:?}",
        c.node(3).alarms().active()
    );
    rogue.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn service_messages_reach_the_peer_in_order_and_sending_to_a_dead_peer_fails() {
    let net = MemoryNetwork::new();
    let resolver = Arc::new(SystemResolver {
        ip_version: Default::default(),
    });
    let (a, _) = Node::start(
        config(1, 2, TlsMode::Enforce),
        Some(net.transport(ip(1))),
        resolver.clone(),
        fresh_store(),
    );
    let (b, inbound) = Node::start(
        config(2, 2, TlsMode::Enforce),
        Some(net.transport(ip(2))),
        resolver,
        fresh_store(),
    );
    let mut inbound = inbound.unwrap();
    wait_for(10, "formed", || a.mesh().unwrap().view().all_active()).await;
    for i in 0..100u32 {
        a.mesh()
            .unwrap()
            .send(2, 7, bytes::Bytes::from(i.to_be_bytes().to_vec()))
            .unwrap();
    }
    for i in 0..100u32 {
        let m = inbound.recv().await.unwrap();
        assert_eq!((m.from, m.channel), (1, 7));
        assert_eq!(&m.payload[..], &i.to_be_bytes());
    }
    b.shutdown().await;
    wait_for(2, "peer 2 gone", || {
        !a.mesh().unwrap().view().peer(2).is_active()
    })
    .await;
    let err = a
        .mesh()
        .unwrap()
        .send(2, 7, bytes::Bytes::from_static(b"x"))
        .unwrap_err();
    assert_eq!(err.to_string(), "Peer 2 is not connected");
    // A goodbye, not a timeout: the reason says the peer shut down.
    let p2 = a.cluster_status().peers[1].clone();
    assert!(
        matches!(&p2.clustering, Clustering::Failed(r) if r.contains("shut down")),
        "{:?}",
        p2.clustering
    );
}

fn value_on(node: &Node, path: &str) -> String {
    node.configuration()
        .into_iter()
        .find(|i| i.path == path)
        .map(|i| i.value)
        .unwrap_or_else(|| panic!("{path} is listed"))
}

#[tokio::test(start_paused = true)]
async fn a_cluster_wide_change_through_a_subordinate_reaches_every_peer_and_survives_restart() {
    let mut c = Cluster::start(3, TlsMode::Enforce);
    wait_for(10, "cluster formed", || c.formed()).await;
    let out = c
        .node(2)
        .set_configuration("sip.domains", Some("Example.com, example.org"))
        .await
        .unwrap();
    assert_eq!(out.value, "example.com,example.org");
    assert_eq!(out.confirmed.map(|(n, of)| n * 2 > of), Some(true));
    for (k, n) in c.running() {
        assert_eq!(
            value_on(n, "sip.domains"),
            "example.com,example.org",
            "Peer {k}"
        );
    }
    // Invalid values are refused on any peer, naming the field; nothing changes.
    let err = c
        .node(3)
        .set_configuration("limits.calls.max", Some("lots"))
        .await
        .unwrap_err();
    assert!(err.message.starts_with("limits.calls.max:"), "{err}");
    assert_eq!(err.code, ErrorCode::InvalidArgument, "a bad value: 400");
    assert_eq!(value_on(c.node(1), "limits.calls.max"), "0");
    // Peer-specific items are not replicated; the primary is shown from replication.
    let items = c.node(3).configuration();
    let name = items.iter().find(|i| i.path == "system.name").unwrap();
    assert!(name.peer_specific && name.value == "peer3");
    // Restart Peer 3 on its store: it has the configuration before it hears from anyone.
    c.nodes[2].take().unwrap().shutdown().await;
    c.node(1)
        .set_configuration("sip.domains", Some("example.net"))
        .await
        .unwrap();
    c.nodes[2] = Some(c.boot(3, config(3, 3, TlsMode::Enforce)));
    assert_eq!(
        value_on(c.node(3), "sip.domains"),
        "example.com,example.org"
    );
    wait_for(10, "Peer 3 catches up", || {
        value_on(c.node(3), "sip.domains") == "example.net"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (k, n) in c.running() {
        let r = n.cluster_status().replication.unwrap();
        assert_eq!(r.database_status, "Active", "Peer {k}: {r:?}");
        assert!(
            n.alarms().active().is_empty(),
            "Peer {k}: {:?}",
            n.alarms().active()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn peers_that_disagree_on_the_primary_still_cluster_raise_20017_and_set_primary_settles_it() {
    let c = Cluster::start_with(3, TlsMode::Enforce, |k, cfg| {
        if k == 3 {
            cfg.cluster.configuration_primary = 2;
        }
    });
    wait_for(10, "cluster formed", || c.formed()).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        raised(c.node(1), 20017, "Peer 3"),
        "{:?}",
        c.node(1).alarms().active()
    );
    assert!(
        raised(c.node(3), 20017, "Peer 1"),
        "{:?}",
        c.node(3).alarms().active()
    );
    c.node(3).set_primary(1).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (k, n) in c.running() {
        assert_eq!(n.cluster_status().configuration_primary, 1, "Peer {k}");
        assert!(
            !n.alarms().active().iter().any(|a| a.id == 20017),
            "Peer {k}: {:?}",
            n.alarms().active()
        );
    }
    // A change now goes through the agreed primary.
    c.node(3)
        .set_configuration("limits.calls.max", Some("100"))
        .await
        .unwrap();
    assert_eq!(value_on(c.node(2), "limits.calls.max"), "100");
}

/// Resolves IP literals only: names resolve through the cluster address mapping or not at
/// all, and no test query leaves the machine.
struct NoDns;

impl causeway_mesh::Resolver for NoDns {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> causeway_mesh::BoxFuture<'a, Result<IpAddr, String>> {
        Box::pin(async move {
            host.parse()
                .map_err(|_| format!("'{host}' does not resolve"))
        })
    }
}

#[tokio::test(start_paused = true)]
async fn peers_listed_by_name_join_once_the_address_mapping_names_them_and_an_impostor_is_refused()
{
    let net = MemoryNetwork::new();
    let (name1, name3) = ("peer1.test.invalid", "peer3.test.invalid");
    net.set_identity(ip(1), name1);
    net.set_identity(ip(3), name3);
    let cfg = |k: usize| {
        let mut c = config(k, 3, TlsMode::Enforce);
        c.cluster.peers = vec![name1.into(), ip(2).to_string(), name3.into()];
        c.node.address = c.cluster.peers[k - 1].clone();
        c
    };
    let boot = |k: usize, at: usize| {
        Node::start(
            cfg(k),
            Some(net.transport(ip(at))),
            Arc::new(NoDns),
            fresh_store(),
        )
        .0
    };
    let nodes: Vec<Arc<Node>> = (1..=3).map(|k| boot(k, k)).collect();
    wait_for(10, "Peers 1 and 2 connected", || {
        nodes[0].cluster_status().peers[1].is_active()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        raised(&nodes[0], 20005, name3),
        "{name3} does not resolve: {:?}",
        nodes[0].alarms().active()
    );
    for (path, at) in [(name3, 3), (name1, 1)] {
        nodes[0]
            .set_configuration(
                &format!("cluster.address_mapping.{path}"),
                Some(&ip(at).to_string()),
            )
            .await
            .unwrap();
    }
    wait_for(10, "every peer Active through the mapping", || {
        nodes.iter().all(|n| n.mesh().unwrap().view().all_active())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!raised(&nodes[0], 20005, name3));
    // A system at another address with a certificate for Peer 1's name: refused, because
    // the mapping says where Peer 1 is.
    net.set_identity(ip(4), name1);
    let impostor = boot(1, 4);
    tokio::time::sleep(Duration::from_secs(5)).await;
    match &impostor.cluster_status().peers[1].clustering {
        Clustering::Failed(r) => assert!(
            r.contains("which resolves to 198.18.0.1") && r.contains("came from 198.18.0.4"),
            "{r}"
        ),
        other => panic!("the impostor must be refused, is {other:?}"),
    }
    assert!(
        nodes[1].cluster_status().peers[0].is_active(),
        "the real Peer 1 stays"
    );
    impostor.shutdown().await;
    // The mapping of an Active peer changed to another address: it is resolved again at
    // once, the shown resolution follows, and the peer is reconnected there (nothing
    // answers at .9, so it fails); mapped back, it is Active again.
    let peer3_on_1 = |n: &Node| n.cluster_status().peers[2].clone();
    for (to, active) in [(9, false), (3, true)] {
        nodes[0]
            .set_configuration(
                &format!("cluster.address_mapping.{name3}"),
                Some(&ip(to).to_string()),
            )
            .await
            .ok();
        wait_for(10, "the resolution follows the mapping", || {
            let p = peer3_on_1(&nodes[0]);
            p.resolved == Some(ip(to)) && p.is_active() == active
        })
        .await;
    }
    for n in nodes {
        n.shutdown().await;
    }
}

/// A peer whose list names another peer before the address mapping for that name exists
/// is not locked out: the difference is accepted while the name does not resolve, so the
/// mapping can reach it; once it does, every peer is Active.
#[tokio::test(start_paused = true)]
async fn a_list_that_names_a_peer_before_its_mapping_exists_is_accepted_until_the_mapping_arrives()
{
    let name2 = "peer2.test.invalid";
    let net = MemoryNetwork::new();
    let cfg = |k: usize| {
        let mut c = config(k, 3, TlsMode::Permissive);
        if k == 3 {
            c.cluster.peers[1] = name2.into();
        }
        c
    };
    let nodes: Vec<Arc<Node>> = (1..=3)
        .map(|k| {
            Node::start(
                cfg(k),
                Some(net.transport(ip(k))),
                Arc::new(NoDns),
                fresh_store(),
            )
            .0
        })
        .collect();
    wait_for(
        10,
        "Peer 3 clusters with Peer 1 before the mapping exists",
        || {
            nodes[2].cluster_status().peers[0].is_active()
                && nodes[0].cluster_status().peers[2].is_active()
        },
    )
    .await;
    nodes[0]
        .set_configuration(
            &format!("cluster.address_mapping.{name2}"),
            Some(&ip(2).to_string()),
        )
        .await
        .unwrap();
    wait_for(
        10,
        "every peer Active once the mapping reached Peer 3",
        || nodes.iter().all(|n| n.mesh().unwrap().view().all_active()),
    )
    .await;
    assert_eq!(nodes[2].cluster_status().peers[1].resolved, Some(ip(2)));
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn restarting_every_peer_in_any_order_converges_with_no_alarm_left() {
    let mut c = Cluster::start(3, TlsMode::Enforce);
    wait_for(10, "cluster formed", || c.formed()).await;
    c.node(1)
        .set_configuration("sip.domains", Some("example.com"))
        .await
        .unwrap();
    for order in [[3, 2, 1], [2, 1, 3], [1, 3, 2]] {
        for k in 1..=3 {
            if let Some(n) = c.nodes[k - 1].take() {
                n.shutdown().await;
            }
        }
        for (step, k) in order.into_iter().enumerate() {
            c.nodes[k - 1] = Some(c.boot(k, config(k, 3, TlsMode::Enforce)));
            // Every restarted peer has the configuration from its own store at once.
            assert_eq!(value_on(c.node(k), "sip.domains"), "example.com");
            if step == 0 && k != 1 {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let err = c
                    .node(k)
                    .set_configuration("limits.calls.max", Some("5"))
                    .await
                    .unwrap_err();
                assert!(
                    err.message.contains("Peer 1"),
                    "the unreachable primary is named: {err}"
                );
                assert_eq!(err.code, ErrorCode::Unavailable, "retry later: 503");
                assert!(raised(c.node(k), 20016, "Peer 1"));
            }
        }
        wait_for(10, "formed again", || c.formed()).await;
        c.node(order[0])
            .set_configuration("limits.calls.max", Some(&format!("{}", order[0])))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        for (k, n) in c.running() {
            assert_eq!(
                value_on(n, "limits.calls.max"),
                order[0].to_string(),
                "Peer {k}"
            );
            assert!(
                n.alarms().active().is_empty(),
                "Peer {k} after {order:?}: {:?}",
                n.alarms().active()
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_peer_address_changes_from_ip_to_name_one_peer_at_a_time_without_losing_the_cluster() {
    let net = MemoryNetwork::new();
    let names: Vec<String> = (1..=3).map(|k| format!("peer{k}.test.invalid")).collect();
    // Certificates that name both the IP and the name, as an operator issues them for this.
    for k in 1..=3 {
        net.set_identity(ip(k), &format!("{},{}", ip(k), names[k - 1]));
    }
    let stores: Vec<Arc<MemoryStore>> = (0..3).map(|_| Arc::new(MemoryStore::new())).collect();
    // `renamed`: the peers whose entry this node's list already spells by name.
    let boot = |k: usize, renamed: &[usize]| {
        let mut c = config(k, 3, TlsMode::Enforce);
        for r in renamed {
            c.cluster.peers[r - 1] = names[r - 1].clone();
        }
        c.node.address = c.cluster.peers[k - 1].clone();
        let store = NodeStore::memory(stores[k - 1].clone());
        Node::start(c, Some(net.transport(ip(k))), Arc::new(NoDns), store).0
    };
    let mut nodes: Vec<Arc<Node>> = (1..=3).map(|k| boot(k, &[])).collect();
    let formed = |nodes: &[Arc<Node>]| nodes.iter().all(|n| n.mesh().unwrap().view().all_active());
    wait_for(10, "formed on IPs", || formed(&nodes)).await;
    for k in 1..=3 {
        nodes[0]
            .set_configuration(
                &format!("cluster.address_mapping.{}", names[k - 1]),
                Some(&ip(k).to_string()),
            )
            .await
            .unwrap();
    }
    // Every peer in turn: its list changed to names for all three, restarted. The others
    // still spell the entries as IPs and keep talking to it.
    for k in 1..=3 {
        nodes[k - 1].shutdown().await;
        nodes[k - 1] = boot(k, &[1, 2, 3]);
        wait_for(10, &format!("formed after Peer {k} moved to names"), || {
            formed(&nodes)
        })
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        for (i, n) in nodes.iter().enumerate() {
            assert!(
                !n.alarms()
                    .active()
                    .iter()
                    .any(|a| a.id == 20012 || a.id == 20004),
                "Peer {}: {:?}",
                i + 1,
                n.alarms().active()
            );
        }
    }
    // A name that does not resolve to Peer 2's address is still a different peer list.
    nodes[2].shutdown().await;
    let mut c = config(3, 3, TlsMode::Enforce);
    c.cluster.peers = names.clone();
    c.cluster.peers[1] = "peer9.test.invalid".into();
    c.node.address = names[2].clone();
    let odd = Node::start(
        c,
        Some(net.transport(ip(3))),
        Arc::new(NoDns),
        NodeStore::memory(stores[2].clone()),
    )
    .0;
    tokio::time::sleep(Duration::from_secs(5)).await;
    match &nodes[0].cluster_status().peers[2].clustering {
        Clustering::Failed(r) => assert!(r.contains("peer list differs at Peer 2"), "{r}"),
        other => panic!("a list naming another system must be refused, is {other:?}"),
    }
    odd.shutdown().await;
    for n in nodes.iter().take(2) {
        n.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_fourth_peer_is_added_and_a_standalone_system_joining_takes_the_primarys_configuration() {
    let mut c = Cluster::start(3, TlsMode::Enforce);
    wait_for(10, "cluster formed", || c.formed()).await;
    c.node(1)
        .set_configuration("sip.domains", Some("example.com"))
        .await
        .unwrap();
    // The new system ran on its own first and has a configuration of its own.
    let newcomer_store = Arc::new(MemoryStore::new());
    {
        let mut alone = config(4, 4, TlsMode::Enforce);
        alone.cluster.peers.clear();
        let n = Node::start(
            alone,
            None,
            Arc::new(NoDns),
            NodeStore::memory(newcomer_store.clone()),
        )
        .0;
        n.set_configuration("sip.domains", Some("standalone.example"))
            .await
            .unwrap();
        n.set_configuration("limits.calls.max", Some("7"))
            .await
            .unwrap();
        n.shutdown().await;
    }
    // Every existing peer gets the four-peer list and is restarted, then the newcomer starts.
    c.n = 4;
    c.stores.push(newcomer_store);
    for k in 1..=3 {
        c.nodes[k - 1].take().unwrap().shutdown().await;
        c.nodes[k - 1] = Some(c.boot(k, config(k, 4, TlsMode::Enforce)));
    }
    c.nodes
        .push(Some(c.boot(4, config(4, 4, TlsMode::Enforce))));
    wait_for(10, "four peers formed", || c.formed()).await;
    wait_for(10, "the newcomer holds the primary's configuration", || {
        value_on(c.node(4), "sip.domains") == "example.com"
    })
    .await;
    assert_eq!(
        value_on(c.node(4), "limits.calls.max"),
        "0",
        "its own items are gone, not merged"
    );
    assert_eq!(
        value_on(c.node(1), "sip.domains"),
        "example.com",
        "the primary never takes the newcomer's copy"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (k, n) in c.running() {
        assert!(
            n.alarms().active().is_empty(),
            "Peer {k}: {:?}",
            n.alarms().active()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn alarms_are_visible_on_every_peer_and_cleared_everywhere() {
    let mut c = Cluster::start(3, TlsMode::Enforce);
    wait_for(10, "cluster formed", || c.formed()).await;
    let victim = ip(3).to_string();
    c.nodes[2].take().unwrap().shutdown().await;
    let seen_on_1 = |c: &Cluster| {
        c.node(1)
            .peer_alarms()
            .into_iter()
            .any(|a| a.peer == 2 && a.id == 20004 && a.subject == victim && a.reachable)
    };
    wait_for(10, "Peer 2's 20004 shown on Peer 1", || seen_on_1(&c)).await;
    // A peer that was clustered and is lost: 20004 with 20006, as in the seed (20021 is
    // for a peer never reached).
    assert!(raised(c.node(1), 20006, "Peer 3"));
    assert!(!raised(c.node(1), 20021, &victim));
    assert!(c.node(2).peer_alarms().iter().any(|a| a.peer == 1
        && a.id == 20004
        && a.title.contains("Cluster communication failure")));
    c.nodes[2] = Some(c.boot(3, config(3, 3, TlsMode::Enforce)));
    wait_for(10, "cluster formed again", || c.formed()).await;
    wait_for(10, "cleared on every peer", || {
        c.running().all(|(_, n)| n.peer_alarms().is_empty())
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn switching_to_enforce_warns_first_when_a_certificate_would_be_refused() {
    let net = MemoryNetwork::new();
    net.set_identity(ip(3), "198.18.0.99");
    let mut c = Cluster {
        net,
        nodes: Vec::new(),
        stores: (0..3).map(|_| Arc::new(MemoryStore::new())).collect(),
        n: 3,
    };
    for k in 1..=3 {
        let node = c.boot(k, config(k, 3, TlsMode::Permissive));
        c.nodes.push(Some(node));
    }
    wait_for(10, "formed under Permissive", || c.formed()).await;
    let err = c
        .node(2)
        .set_configuration("cluster.tls_verification", Some("Enforce"))
        .await
        .unwrap_err();
    assert!(
        err.message.contains("Peer 3 (198.18.0.3)") && err.message.contains("--force"),
        "{err}"
    );
    assert_eq!(err.code, ErrorCode::Conflict, "a check on the state: 409");
    assert_eq!(
        value_on(c.node(1), "cluster.tls_verification"),
        "Permissive"
    );
    let out = c
        .node(2)
        .set_configuration_with("cluster.tls_verification", Some("Enforce"), true)
        .await
        .unwrap();
    assert!(out.restart_required);
    assert_eq!(value_on(c.node(1), "cluster.tls_verification"), "Enforce");
}

/// Resolves one name only once `known` is set: a DNS record that appears later.
struct LateDns {
    name: &'static str,
    ip: IpAddr,
    known: std::sync::atomic::AtomicBool,
}

impl causeway_mesh::Resolver for LateDns {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> causeway_mesh::BoxFuture<'a, Result<IpAddr, String>> {
        Box::pin(async move {
            if host == self.name && self.known.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(self.ip);
            }
            host.parse()
                .map_err(|_| format!("'{host}' does not resolve"))
        })
    }
}

#[tokio::test(start_paused = true)]
async fn resolve_peers_dials_a_name_that_resolves_now_without_waiting_for_the_backoff() {
    let net = MemoryNetwork::new();
    let name3 = "peer3.test.invalid";
    net.set_identity(ip(3), name3);
    let dns = Arc::new(LateDns {
        name: name3,
        ip: ip(3),
        known: false.into(),
    });
    let nodes: Vec<Arc<Node>> = (1..=3)
        .map(|k| {
            let mut c = config(k, 3, TlsMode::Enforce);
            c.cluster.peers[2] = name3.into();
            c.node.address = c.cluster.peers[k - 1].clone();
            Node::start(c, Some(net.transport(ip(k))), dns.clone(), fresh_store()).0
        })
        .collect();
    // Long enough for every dialer to be at its longest backoff.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(!nodes[0].cluster_status().peers[2].is_active());
    dns.known.store(true, std::sync::atomic::Ordering::SeqCst);
    for n in &nodes[..2] {
        let said = n.resolve_peers().unwrap();
        assert!(said.contains("Peer 3 (peer3.test.invalid)"), "{said}");
    }
    // Well under the 0.8 s a dialer at its longest backoff would still wait.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for n in &nodes {
        assert!(
            n.mesh().unwrap().view().all_active(),
            "{:?}",
            n.cluster_status().peers
        );
    }
    assert!(nodes[0]
        .resolve_peers()
        .unwrap()
        .contains("nothing to resolve"));
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_peer_is_removed_by_shortening_every_remaining_peers_list() {
    let mut c = Cluster::start(3, TlsMode::Enforce);
    wait_for(10, "cluster formed", || c.formed()).await;
    c.node(1)
        .set_configuration("sip.domains", Some("example.com"))
        .await
        .unwrap();
    c.nodes[2].take().unwrap().shutdown().await;
    c.n = 2;
    for k in 1..=2 {
        c.nodes[k - 1].take().unwrap().shutdown().await;
        c.nodes[k - 1] = Some(c.boot(k, config(k, 2, TlsMode::Enforce)));
    }
    c.nodes.truncate(2);
    wait_for(10, "two peers formed", || c.formed()).await;
    c.node(2)
        .set_configuration("limits.calls.max", Some("3"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (k, n) in c.running() {
        assert_eq!(n.cluster_status().peers.len(), 2);
        assert_eq!(value_on(n, "sip.domains"), "example.com", "Peer {k}");
        assert_eq!(value_on(n, "limits.calls.max"), "3", "Peer {k}");
        assert!(
            n.alarms().active().is_empty(),
            "Peer {k}: {:?}",
            n.alarms().active()
        );
    }
}

/// A peer restored from a backup goes back on its own streams. Its owner is their authority:
/// the others take its copy whole, so its alarms raised after the backup are not kept on
/// show elsewhere (and no 20011 asks for a command that cannot help).
#[tokio::test(start_paused = true)]
async fn a_peer_restored_to_an_older_copy_of_its_own_streams_is_followed_by_the_others() {
    for purge in [false, true] {
        restored_or_purged_peer_is_followed(purge).await;
    }
}

/// Peer 2 goes back to a backup (or, purged, to nothing, under a new node id) after it
/// raised alarms the others show.
async fn restored_or_purged_peer_is_followed(purge: bool) {
    use causeway_replication::lifecycle;
    let mut c = Cluster::start(3, TlsMode::Enforce);
    wait_for(10, "cluster formed", || c.formed()).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let backup = lifecycle::dump(c.stores[1].as_ref()).unwrap();
    // After the backup, Peer 2 raises alarms for Peer 3 and Peer 1 shows them.
    c.crash(3).await;
    let from_2_on_1 = |c: &Cluster| {
        c.node(1)
            .peer_alarms()
            .into_iter()
            .filter(|a| a.peer == 2)
            .map(|a| a.id)
            .collect::<Vec<_>>()
    };
    wait_for(10, "Peer 2's 20004 shown on Peer 1", || {
        from_2_on_1(&c).contains(&20004)
    })
    .await;
    // Peer 2 is lost and restored from the backup; Peer 3 comes back first.
    c.crash(2).await;
    if purge {
        lifecycle::factory_reset(c.stores[1].as_ref()).unwrap();
    } else {
        lifecycle::restore(c.stores[1].as_ref(), &backup, None).unwrap();
    }
    c.nodes[2] = Some(c.boot(3, config(3, 3, TlsMode::Enforce)));
    c.nodes[1] = Some(c.boot(2, config(2, 3, TlsMode::Enforce)));
    wait_for(10, "cluster formed again", || c.formed()).await;
    wait_for(10, "Peer 2's old alarms gone from Peer 1", || {
        from_2_on_1(&c).is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (k, n) in c.running() {
        assert!(
            n.alarms().active().is_empty() && n.peer_alarms().is_empty(),
            "Peer {k}: {:?} {:?}",
            n.alarms().active(),
            n.peer_alarms()
        );
        let digest = |n: &Node| n.replication().status().digest;
        assert_eq!(digest(n), digest(c.node(2)), "Peer {k} converged");
    }
    for k in 1..=3 {
        c.crash(k).await;
    }
}

/// A peer that was down when the TLS verification mode changed is refused by the others
/// for its old mode, and cannot learn the change by replication. It takes the configuration
/// primary's mode from its hello into its file (20007), and rejoins when restarted: no file
/// edited by hand.
#[tokio::test(start_paused = true)]
async fn a_peer_that_missed_a_tls_mode_change_takes_the_primarys_mode_and_rejoins_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("peer3.toml");
    let mut c = Cluster::start_with(3, TlsMode::Enforce, |k, cfg| {
        if k == 3 {
            cfg.cluster.tls_verification = TlsMode::Permissive;
            cfg.source = file.clone();
            cfg.save().unwrap();
        }
    });
    wait_for(10, "Peer 3 takes the primary's mode into its file", || {
        NodeConfig::load(&file).unwrap().cluster.tls_verification == TlsMode::Enforce
    })
    .await;
    assert!(raised(c.node(3), 20007, "cluster.tls_verification"));
    assert!(!c.node(1).mesh().unwrap().view().peer(3).is_active());
    c.crash(3).await;
    c.nodes[2] = Some(c.boot(3, NodeConfig::load(&file).unwrap()));
    wait_for(10, "Peer 3 rejoins", || c.formed()).await;
}
