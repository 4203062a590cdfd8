//! `/metrics`: one prometheus-client registry per node. The node's own collector reads the
//! mesh, replication and lease groups at scrape time; each service registers its own
//! collector ([`NodeMetrics::register`]).

use std::fmt;
use std::sync::{Mutex, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::Node;

/// Label pairs of one sample.
pub type Labels = Vec<(&'static str, String)>;

#[derive(Default)]
pub struct NodeMetrics {
    registry: Mutex<Registry>,
}

impl NodeMetrics {
    pub fn register(&self, collector: Box<dyn Collector>) {
        self.lock().register_collector(collector);
    }

    /// The text exposition (OpenMetrics), as `/metrics` serves it.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; a collector's own error ends the text early.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.lock());
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Writes one gauge family; a single sample without labels is written bare.
pub fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, f64)],
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    if let [(labels, v)] = samples {
        if labels.is_empty() {
            return ConstGauge::new(*v).encode(family);
        }
    }
    for (labels, v) in samples {
        ConstGauge::new(*v).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// Writes one counter family (the exposition adds `_total` to `name`).
pub fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, u64)],
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    if let [(labels, v)] = samples {
        if labels.is_empty() {
            return ConstCounter::new(*v).encode(family);
        }
    }
    for (labels, v) in samples {
        ConstCounter::new(*v).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// The node's own metrics: mesh, replication, consensus.
pub(crate) struct NodeCollector(pub(crate) Weak<Node>);

impl fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeCollector")
    }
}

fn peer(index: usize) -> Labels {
    vec![("peer", index.to_string())]
}

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let Some(node) = self.0.upgrade() else {
            return Ok(());
        };
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(mesh) = node.mesh() {
            let view = mesh.view();
            let others: Vec<_> = view
                .peers
                .iter()
                .filter(|p| p.index != view.self_index)
                .collect();
            let up: Vec<_> = others
                .iter()
                .map(|p| (peer(p.index), f64::from(u8::from(p.is_active()))))
                .collect();
            gauge(
                &mut enc,
                "causeway_mesh_peer_up",
                "1 while the session to the peer is up",
                &up,
            )?;
            let rtt: Vec<_> = others
                .iter()
                .filter_map(|p| Some((peer(p.index), p.rtt_ms? / 1000.0)))
                .collect();
            gauge(
                &mut enc,
                "causeway_mesh_peer_rtt_seconds",
                "heartbeat round trip to the peer (smoothed)",
                &rtt,
            )?;
            let skew: Vec<_> = others
                .iter()
                .filter_map(|p| Some((peer(p.index), p.clock_skew_ms? as f64 / 1000.0)))
                .collect();
            gauge(
                &mut enc,
                "causeway_mesh_peer_clock_skew_seconds",
                "the peer's wall clock minus this one's",
                &skew,
            )?;

            let engine = node.replication();
            let c = engine.counters();
            counter(
                &mut enc,
                "causeway_replication_commits",
                "store transactions committed (one fsync each)",
                &[(vec![], c.commits.load(Relaxed))],
            )?;
            gauge(
                &mut enc,
                "causeway_replication_commit_seconds_sum",
                "time spent committing them",
                &[(vec![], c.commit_micros.load(Relaxed) as f64 / 1e6)],
            )?;
            counter(
                &mut enc,
                "causeway_replication_pushes_sent",
                "push frames sent, one per peer",
                &[(vec![], c.pushes_sent.load(Relaxed))],
            )?;
            counter(
                &mut enc,
                "causeway_replication_pushes_received",
                "push frames received",
                &[(vec![], c.pushes_received.load(Relaxed))],
            )?;
            let status = engine.status();
            gauge(
                &mut enc,
                "causeway_replication_revision",
                "the configuration's revision on this peer",
                &[(vec![], status.revision as f64)],
            )?;
            let lag: Vec<_> = status
                .peers
                .iter()
                .filter(|p| p.index != view.self_index)
                .map(|p| {
                    let behind = p
                        .state
                        .strip_prefix("Behind by ")
                        .and_then(|n| n.parse::<f64>().ok());
                    (peer(p.index), behind.unwrap_or(0.0))
                })
                .collect();
            gauge(
                &mut enc,
                "causeway_replication_peer_lag_records",
                "changes of the configuration the peer lacks",
                &lag,
            )?;
        }
        let groups = node.leases().groups();
        let group = |g: &causeway_consensus::LeaseGroup| {
            vec![(
                "group",
                causeway_consensus::LeaderLease::name(g).to_string(),
            )]
        };
        let held: Vec<_> = groups
            .iter()
            .map(|g| {
                (
                    group(g),
                    f64::from(u8::from(
                        causeway_consensus::LeaderLease::state(g.as_ref()).is_mine(),
                    )),
                )
            })
            .collect();
        gauge(
            &mut enc,
            "causeway_consensus_lease_held",
            "1 while this peer holds the lease",
            &held,
        )?;
        let term: Vec<_> = groups
            .iter()
            .map(|g| (group(g), g.counters().term.load(Relaxed) as f64))
            .collect();
        gauge(
            &mut enc,
            "causeway_consensus_term",
            "the newest Raft term (generation) seen",
            &term,
        )?;
        let leaderships: Vec<_> = groups
            .iter()
            .map(|g| (group(g), g.counters().leaderships.load(Relaxed)))
            .collect();
        counter(
            &mut enc,
            "causeway_consensus_acquisitions",
            "times this peer acquired the lease",
            &leaderships,
        )?;
        let changes: Vec<_> = groups
            .iter()
            .map(|g| (group(g), g.counters().lease_changes.load(Relaxed)))
            .collect();
        counter(
            &mut enc,
            "causeway_consensus_lease_changes",
            "changes of the holder as this peer saw them",
            &changes,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed;

    impl Collector for Fixed {
        fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
            counter(&mut enc, "x_commits", "commits", &[(vec![], 7)])?;
            gauge(&mut enc, "x_up", "up", &[(peer(2), 1.0), (peer(3), 0.0)])?;
            gauge(&mut enc, "x_none", "nothing yet", &[])
        }
    }

    #[test]
    fn families_render_with_their_labels_and_counters_get_total() {
        let m = NodeMetrics::default();
        m.register(Box::new(Fixed));
        let text = m.render();
        assert!(
            text.contains("# TYPE x_commits counter\nx_commits_total 7\n"),
            "{text}"
        );
        assert!(text.contains("x_up{peer=\"2\"} 1"), "{text}");
        assert!(text.contains("x_up{peer=\"3\"} 0"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
