//! Alarms that follow from the mesh and replication, and every peer's alarms shared
//! cluster-wide (OP-1).

use super::*;

impl Node {
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
}

pub(super) const ALARM_NAMESPACE: &str = "alarms";

/// One alarm as a peer shares it: the catalogue gives the rest.
#[derive(Serialize, Deserialize)]
pub(super) struct SharedAlarm {
    pub(super) id: u32,
    pub(super) subject: String,
    pub(super) reason: String,
    pub(super) raised_at_ms: u64,
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
pub(super) async fn share_alarms(node: Arc<Node>) {
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

/// Keeps the peer and replication alarms equal to what the mesh and the engine call for.
pub(super) async fn supervise(node: Arc<Node>) {
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
        node.follow_primary_tls_mode(&view);
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
