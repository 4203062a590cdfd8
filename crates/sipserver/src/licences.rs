//! Licences pooled across the cluster (SV-5). Each peer publishes what its file installs
//! (`licences/peerN`); the pool is the sum over the peers that are up, plus those lost for
//! less than the grace period (alarms 30012…30014 meanwhile, 30015…30017 once they have
//! left the pool). The grace is counted from the first time any peer saw the other one go:
//! each peer records when it did as `lost/peerK` in its own stream, so restarting a peer
//! does not start the grace over.
//!
//! Call licences cap concurrent calls (with `limits.calls.max`, the lower wins);
//! registration licences cap the AORs with a binding. No licences installed anywhere: no
//! licence limit (a lab).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use causeway_cluster::Node;
use causeway_replication::{Change, StreamId};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::location::Location;
use crate::service::LOG;

pub const NAMESPACE: &str = "licences";
const KEY: &str = "installed";
/// `lost/peerK`: when the stream's owner first saw peer K lost (unix ms).
const LOST_PREFIX: &str = "lost/";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    pub calls: u32,
    pub registrations: u32,
}

/// What is in the pool now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub calls: u64,
    pub registrations: u64,
}

#[derive(Default)]
pub struct Licences {
    installed: Mutex<HashMap<usize, Installed>>,
    /// Peers seen down, and since when.
    down_since: Mutex<HashMap<usize, Instant>>,
    /// (reporter, lost peer) → when the reporter first saw it lost, unix ms.
    lost_reports: Mutex<HashMap<(usize, usize), u64>>,
}

/// Every licence alarm: for a lost peer's licences, still in the pool and removed.
const ALL_ALARM_IDS: [u32; 6] = [30012, 30013, 30014, 30015, 30016, 30017];

/// The licence alarms peer `peer` calls for, with their reasons: none while it is up;
/// while it is lost, for each kind of licence it installs, "in the pool" during the grace
/// period and "removed" after it.
fn licence_alarms(
    peer: usize,
    i: &Installed,
    down: Option<Duration>,
    grace: Duration,
) -> Vec<(u32, String)> {
    let Some(d) = down else { return vec![] };
    alarm_ids(i)
        .into_iter()
        .map(|(pending, removed)| {
            if d < grace {
                let left = (grace - d).as_secs();
                (pending, format!(
                    "Peer {peer} is lost: its licences ({} call, {} registration) leave the pool in {left} s unless it comes back",
                    i.calls, i.registrations))
            } else {
                (removed, format!(
                    "Peer {peer} has been lost longer than the grace period: its licences ({} call, {} registration) have left the pool",
                    i.calls, i.registrations))
            }
        })
        .collect()
}

/// The alarms for a lost peer's licences: (in the pool, grace running) and (removed).
fn alarm_ids(i: &Installed) -> Vec<(u32, u32)> {
    let mut ids = Vec::new();
    if i.calls > 0 && i.registrations > 0 {
        ids.push((30012, 30015));
    }
    if i.calls > 0 {
        ids.push((30013, 30016));
    }
    if i.registrations > 0 {
        ids.push((30014, 30017));
    }
    ids
}

impl Licences {
    pub fn apply(&self, owner: usize, key: &str, value: Option<&[u8]>) {
        if let Some(lost) = key
            .strip_prefix(LOST_PREFIX)
            .and_then(crate::location::stream_owner)
        {
            let mut reports = self.lost_reports.lock().unwrap_or_else(|p| p.into_inner());
            match value.and_then(|v| postcard::from_bytes::<u64>(v).ok()) {
                Some(ms) => reports.insert((owner, lost), ms),
                None => reports.remove(&(owner, lost)),
            };
            return;
        }
        if key != KEY {
            return;
        }
        let mut installed = self.installed.lock().unwrap_or_else(|p| p.into_inner());
        match value.and_then(|v| postcard::from_bytes::<Installed>(v).ok()) {
            Some(i) => {
                installed.insert(owner, i);
            }
            None => {
                installed.remove(&owner);
            }
        }
    }

    /// The peers down now and for how long; `up` says who is reachable.
    fn observe(&self, up: &[(usize, bool)]) -> HashMap<usize, Duration> {
        let mut down = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        for (peer, is_up) in up {
            if *is_up {
                down.remove(peer);
            } else {
                down.entry(*peer).or_insert(now);
            }
        }
        down.iter().map(|(p, t)| (*p, now - *t)).collect()
    }

    /// How long each peer down now has been lost: since the earliest report of any peer
    /// (this peer's own survives its restarts), at least since this peer saw it go.
    fn lost_for(&self, down: &HashMap<usize, Duration>, now_ms: u64) -> HashMap<usize, Duration> {
        let reports = self.lost_reports.lock().unwrap_or_else(|p| p.into_inner());
        down.iter()
            .map(|(peer, seen)| {
                let reported = reports
                    .iter()
                    .filter(|((_, lost), _)| lost == peer)
                    .map(|(_, ms)| Duration::from_millis(now_ms.saturating_sub(*ms)))
                    .max()
                    .unwrap_or_default();
                (*peer, reported.max(*seen))
            })
            .collect()
    }

    /// What this peer's own `lost/` records should become: a report for each peer lost
    /// without one, a removal for each that is back.
    fn report_changes(
        &self,
        me: usize,
        lost: &HashMap<usize, Duration>,
        now_ms: u64,
    ) -> Vec<Change> {
        let reports = self.lost_reports.lock().unwrap_or_else(|p| p.into_inner());
        let key = |peer: usize| format!("{LOST_PREFIX}{}", crate::location::stream_name(peer));
        let mut changes: Vec<Change> = lost
            .iter()
            .filter(|(peer, _)| **peer != me && !reports.contains_key(&(me, **peer)))
            .map(|(peer, d)| Change {
                key: key(*peer),
                value: postcard::to_stdvec(&now_ms.saturating_sub(d.as_millis() as u64)).ok(),
            })
            .collect();
        changes.extend(
            reports
                .keys()
                .filter(|(reporter, peer)| *reporter == me && !lost.contains_key(peer))
                .map(|(_, peer)| Change {
                    key: key(*peer),
                    value: None,
                }),
        );
        changes
    }

    /// Peers seen down for longer than `d`.
    pub fn down_longer_than(&self, d: Duration) -> Vec<usize> {
        let down = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        down.iter()
            .filter(|(_, t)| now - **t > d)
            .map(|(p, _)| *p)
            .collect()
    }

    fn pool(&self, down: &HashMap<usize, Duration>, grace: Duration) -> Pool {
        let installed = self.installed.lock().unwrap_or_else(|p| p.into_inner());
        installed
            .iter()
            .filter(|(p, _)| down.get(p).is_none_or(|d| *d < grace))
            .fold(Pool::default(), |pool, (_, i)| Pool {
                calls: pool.calls + u64::from(i.calls),
                registrations: pool.registrations + u64::from(i.registrations),
            })
    }
}

/// The licence part of the SIP service: what every peer installs, which peers are lost
/// and since when, and the pool that follows (refreshed every second by the service).
pub struct LicencePool {
    node: Arc<Node>,
    self_index: usize,
    /// This peer's `licences/peerN`.
    own: StreamId,
    licences: Licences,
    pool: Mutex<Pool>,
}

impl LicencePool {
    pub fn new(node: Arc<Node>, self_index: usize) -> Self {
        LicencePool {
            node,
            self_index,
            own: StreamId::new(NAMESPACE, &crate::location::stream_name(self_index)),
            licences: Licences::default(),
            pool: Mutex::new(Pool::default()),
        }
    }

    /// One record of a peer's licence stream, as replicated.
    pub fn apply(&self, owner: usize, key: &str, value: Option<&[u8]>) {
        self.licences.apply(owner, key, value);
    }

    /// The pool as last refreshed.
    pub fn current(&self) -> Pool {
        *self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Peers lost for longer than `d`.
    pub fn down_longer_than(&self, d: Duration) -> Vec<usize> {
        self.licences.down_longer_than(d)
    }

    /// Publishes this peer's licences, once at start (they change with a restart only).
    pub async fn publish(&self) {
        let l = &self.node.config().licences;
        let mine = Installed {
            calls: l.rich_media_sessions,
            registrations: l.room_systems,
        };
        let value = postcard::to_stdvec(&mine).unwrap_or_default();
        if self.node.replication().get(&self.own, KEY).as_deref() == Some(value.as_slice()) {
            return;
        }
        let change = Change {
            key: KEY.to_string(),
            value: Some(value),
        };
        if let Err(e) = self.node.replication().write(&self.own, vec![change]).await {
            warn!(target: LOG, reason = %e, "Publishing this peer's licences failed");
        }
    }

    /// Computes the pool anew from `peers` (index, address, up), keeps the licence alarms
    /// equal to it, and records newly seen losses in this peer's stream (on `tasks`).
    pub fn refresh(&self, peers: &[(usize, Option<IpAddr>, bool)], tasks: &TaskTracker) -> Pool {
        let up: Vec<(usize, bool)> = peers.iter().map(|(i, _, up)| (*i, *up)).collect();
        let now_ms = causeway_common::time::unix_ms_now();
        let down = self.licences.observe(&up);
        let down = self.licences.lost_for(&down, now_ms);
        let changes = self.licences.report_changes(self.self_index, &down, now_ms);
        if !changes.is_empty() {
            let (node, own) = (self.node.clone(), self.own.clone());
            tasks.spawn(async move {
                if let Err(e) = node.replication().write(&own, changes).await {
                    warn!(target: LOG, reason = %e, "Recording when peers were lost failed");
                }
            });
        }
        let grace = Duration::from_secs(self.node.config().licences.grace_period_s);
        let installed = self
            .licences
            .installed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let alarms = self.node.alarms();
        for (peer, address, _) in peers {
            if *peer == self.self_index {
                continue;
            }
            let subject = address
                .map(|a| a.to_string())
                .unwrap_or_else(|| format!("peer{peer}"));
            let i = installed.get(peer).copied().unwrap_or_default();
            let wanted = licence_alarms(*peer, &i, down.get(peer).copied(), grace);
            // Every licence alarm of the peer follows what its licences call for now: one
            // for licences it no longer reports (its stream taken anew) goes too.
            for id in ALL_ALARM_IDS {
                match wanted.iter().find(|(w, _)| *w == id) {
                    Some((_, reason)) => {
                        alarms.raise(id, &subject, reason);
                    }
                    None => {
                        alarms.lower(id, &subject);
                    }
                }
            }
        }
        let pool = self.licences.pool(&down, grace);
        *self.pool.lock().unwrap_or_else(|p| p.into_inner()) = pool;
        pool
    }

    /// Whether `aor` may register under the registration licences: an AOR that has a
    /// binding already always may (looked up only when licences are installed).
    pub fn registration_free(&self, aor: &str, location: &Location, now_ms: u64) -> bool {
        let pool = self.current();
        if pool.registrations == 0 || !location.lookup(aor, now_ms).is_empty() {
            return true;
        }
        (location.aor_count() as u64) < pool.registrations
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn licence_alarms_follow_what_the_lost_peer_installs_and_none_while_it_is_up() {
        let grace = Duration::from_secs(60);
        let both = Installed {
            calls: 5,
            registrations: 7,
        };
        let ids = |v: Vec<(u32, String)>| v.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
        assert!(licence_alarms(1, &both, None, grace).is_empty());
        assert_eq!(
            ids(licence_alarms(
                1,
                &both,
                Some(Duration::from_secs(5)),
                grace
            )),
            [30012, 30013, 30014]
        );
        assert_eq!(
            ids(licence_alarms(
                1,
                &both,
                Some(Duration::from_secs(61)),
                grace
            )),
            [30015, 30016, 30017]
        );
        // A peer whose licence record is gone (its stream taken anew) calls for none, so
        // what was raised for it is lowered.
        assert!(licence_alarms(
            1,
            &Installed::default(),
            Some(Duration::from_secs(5)),
            grace
        )
        .is_empty());
    }

    #[test]
    fn a_lost_peer_stays_in_the_pool_for_the_grace_period_only() {
        let l = Licences::default();
        for (p, calls) in [(1, 10), (2, 20), (3, 30)] {
            let v = postcard::to_stdvec(&Installed {
                calls,
                registrations: 1,
            })
            .unwrap();
            l.apply(p, KEY, Some(&v));
        }
        let grace = Duration::from_secs(60);
        let mut down = HashMap::new();
        assert_eq!(
            l.pool(&down, grace),
            Pool {
                calls: 60,
                registrations: 3
            }
        );
        down.insert(3, Duration::from_secs(59));
        assert_eq!(l.pool(&down, grace).calls, 60);
        down.insert(3, Duration::from_secs(60));
        assert_eq!(
            l.pool(&down, grace),
            Pool {
                calls: 30,
                registrations: 2
            }
        );
        assert_eq!(
            alarm_ids(&Installed {
                calls: 1,
                registrations: 0
            }),
            vec![(30013, 30016)]
        );
        assert_eq!(
            alarm_ids(&Installed {
                calls: 1,
                registrations: 2
            })
            .len(),
            3
        );
        assert!(alarm_ids(&Installed::default()).is_empty());
    }

    /// The grace runs from the earliest report of a peer's loss, whoever made it and
    /// however recently this peer started watching; a peer that is back needs no report.
    #[test]
    fn the_grace_counts_from_the_first_report_of_a_loss() {
        let l = Licences::default();
        let now_ms = 1_000_000;
        let at = |ms: u64| postcard::to_stdvec(&ms).unwrap();
        l.apply(2, "lost/peer3", Some(&at(now_ms - 50_000)));
        l.apply(1, "lost/peer3", Some(&at(now_ms - 20_000)));
        let seen_now = HashMap::from([(3, Duration::from_secs(1))]);
        let lost = l.lost_for(&seen_now, now_ms);
        assert_eq!(
            lost[&3],
            Duration::from_secs(50),
            "peer 2's report is the earliest"
        );
        assert!(
            l.report_changes(1, &lost, now_ms).is_empty(),
            "peer 1 has reported it"
        );
        let back = l.report_changes(1, &HashMap::new(), now_ms);
        assert_eq!(back.len(), 1);
        assert_eq!(
            (back[0].key.as_str(), back[0].value.as_deref()),
            ("lost/peer3", None)
        );
        let fresh = l.report_changes(4, &lost, now_ms);
        assert_eq!(
            fresh[0].value,
            Some(at(now_ms - 50_000)),
            "a new report keeps the first time"
        );
        l.apply(2, "lost/peer3", None);
        l.apply(1, "lost/peer3", None);
        assert_eq!(l.lost_for(&seen_now, now_ms)[&3], Duration::from_secs(1));
    }
}
