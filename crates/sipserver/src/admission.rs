//! Call and bandwidth admission for the cluster as a whole (SV-4).
//!
//! Every peer records the calls it admitted in its replicated stream `calls/peerN`, so
//! usage per peer and in total is visible everywhere. The decision is the configuration
//! primary's: a peer asks it over the mesh (`Admit`), it checks the sum of every stream
//! plus the grants not yet seen in a stream, and answers. Two peers admitting at once are
//! thus serialised in one place and the limit holds. When the primary cannot be asked, a
//! peer admits only within its share (`limit / peers`), so the sum of the shares still
//! holds the limit while the cluster is split.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use causeway_common::time::unix_ms_now;
use causeway_replication::Change;
use causeway_sip::{HeaderKind, Message, NameAddr};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::service::{SipService, LOG};

pub const NAMESPACE: &str = "calls";
/// The mesh channel SIP's peer messages travel on (replication is 1).
pub const CHANNEL: u16 = 2;
/// A grant not yet seen in the peer's stream counts this long.
const GRANT_TTL_MS: u64 = 10_000;
/// A call with no BYE seen is dropped after this long (its endpoints crashed).
const CALL_MAX_AGE_MS: u64 = 12 * 3600 * 1000;
const ASK_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a lost peer's calls still count against the limit.
const CALL_GRACE: Duration = Duration::from_secs(120);
/// With no call or bandwidth limit set, nothing waits for a call's record: it is written
/// once the call has lasted this long, so a call shorter than this costs no replicated
/// write (neither the record nor its removal).
const RECORD_DELAY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CallRecord {
    pub started_ms: u64,
    pub kbps: u64,
    pub from: String,
    pub to: String,
}

/// A call this peer admitted whose record is not in its stream yet.
#[derive(Debug, PartialEq, Eq)]
enum Unrecorded {
    /// To be written after RECORD_DELAY, if the call is still up then.
    Waiting,
    /// Being written; `ended`: its BYE came meanwhile, so it is removed once written.
    Writing { ended: bool },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerMessage {
    Admit { id: u64, call: String, kbps: u64 },
    Decision { id: u64, admitted: bool },
}

#[derive(Default)]
struct State {
    /// Stream owner → call → record.
    calls: HashMap<usize, HashMap<String, CallRecord>>,
    /// Grants this peer made as primary, not yet in a stream: call → (kbps, expiry).
    grants: HashMap<String, (u64, u64)>,
    waiting: HashMap<u64, oneshot::Sender<bool>>,
    next_id: u64,
    unrecorded: HashMap<String, Unrecorded>,
}

#[derive(Default)]
pub struct Admission {
    state: Mutex<State>,
}

impl Admission {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn apply(&self, owner: usize, key: &str, value: Option<&[u8]>) {
        let mut st = self.lock();
        match value.and_then(|v| postcard::from_bytes::<CallRecord>(v).ok()) {
            Some(r) => {
                st.grants.remove(key);
                st.calls
                    .entry(owner)
                    .or_default()
                    .insert(key.to_string(), r);
            }
            None => {
                if let Some(c) = st.calls.get_mut(&owner) {
                    c.remove(key);
                }
            }
        }
    }

    /// (calls, kbps) per peer.
    pub fn usage(&self) -> Vec<(usize, usize, u64)> {
        let st = self.lock();
        let mut out: Vec<(usize, usize, u64)> = st
            .calls
            .iter()
            .map(|(p, c)| (*p, c.len(), c.values().map(|r| r.kbps).sum()))
            .collect();
        out.sort();
        out
    }

    pub fn calls(&self) -> Vec<(usize, String, CallRecord)> {
        let st = self.lock();
        let mut out: Vec<(usize, String, CallRecord)> = st
            .calls
            .iter()
            .flat_map(|(p, c)| c.iter().map(|(k, r)| (*p, k.clone(), r.clone())))
            .collect();
        out.sort_by_key(|c| c.2.started_ms);
        out
    }

    /// The primary's decision: room for one more call of `kbps` under both limits?
    fn decide(
        &self,
        call: &str,
        kbps: u64,
        max_calls: u64,
        max_kbps: u64,
        stale: &[usize],
    ) -> bool {
        let mut st = self.lock();
        let now = unix_ms_now();
        st.grants.retain(|_, (_, exp)| *exp > now);
        if st.calls.values().any(|c| c.contains_key(call)) || st.grants.contains_key(call) {
            return true;
        }
        let counted: Vec<&HashMap<String, CallRecord>> = st
            .calls
            .iter()
            .filter(|(p, _)| !stale.contains(p))
            .map(|(_, c)| c)
            .collect();
        let calls = counted.iter().map(|c| c.len()).sum::<usize>() + st.grants.len();
        let used: u64 = counted
            .iter()
            .flat_map(|c| c.values())
            .map(|r| r.kbps)
            .sum::<u64>()
            + st.grants.values().map(|(k, _)| *k).sum::<u64>();
        let ok = (max_calls == 0 || (calls as u64) < max_calls)
            && (max_kbps == 0 || used + kbps <= max_kbps);
        if ok {
            st.grants
                .insert(call.to_string(), (kbps, now + GRANT_TTL_MS));
        }
        ok
    }

    /// A call admitted here, its record not written yet.
    fn admitted(&self, call: &str) {
        self.lock()
            .unrecorded
            .insert(call.to_string(), Unrecorded::Waiting);
    }

    /// The record is due: true if it is to be written (the call has not ended).
    fn start_writing(&self, call: &str) -> bool {
        match self.lock().unrecorded.get_mut(call) {
            Some(state @ Unrecorded::Waiting) => {
                *state = Unrecorded::Writing { ended: false };
                true
            }
            _ => false,
        }
    }

    /// The record is written: true if the call ended meanwhile (remove the record now).
    fn written(&self, call: &str) -> bool {
        self.lock().unrecorded.remove(call) == Some(Unrecorded::Writing { ended: true })
    }

    /// The call ended: (admitted here, its record is in the stream and is to be removed).
    fn ended(&self, call: &str, me: usize) -> (bool, bool) {
        let mut st = self.lock();
        match st.unrecorded.get_mut(call) {
            Some(Unrecorded::Waiting) => {
                st.unrecorded.remove(call);
                (true, false)
            }
            Some(Unrecorded::Writing { ended }) => {
                *ended = true;
                (true, false)
            }
            None => {
                let recorded = st.calls.get(&me).is_some_and(|c| c.contains_key(call));
                (recorded, recorded)
            }
        }
    }

    fn own_count(&self, me: usize) -> (usize, u64) {
        let st = self.lock();
        st.calls
            .get(&me)
            .map(|c| (c.len(), c.values().map(|r| r.kbps).sum()))
            .unwrap_or((0, 0))
    }
}

/// The key a call is known by: Call-ID and the caller's tag.
pub fn call_key(msg: &Message) -> Option<String> {
    let call_id = msg.call_id()?;
    let from = msg.value(HeaderKind::From)?;
    let tag = NameAddr::parse(&from).ok()?.tag()?.to_string();
    Some(format!("{call_id}|{tag}"))
}

/// The other side's tag for a request in the dialog: BYE may come from either end.
fn call_keys_for_bye(msg: &Message) -> Vec<String> {
    let Some(call_id) = msg.call_id() else {
        return vec![];
    };
    [HeaderKind::From, HeaderKind::To]
        .into_iter()
        .filter_map(|k| msg.value(k))
        .filter_map(|v| NameAddr::parse(&v).ok()?.tag().map(str::to_string))
        .map(|tag| format!("{call_id}|{tag}"))
        .collect()
}

impl SipService {
    /// Admits an initial INVITE under the cluster-wide limits; `Err(seconds)` to retry after.
    pub(crate) async fn admit_call(self: &Arc<Self>, msg: &Message) -> Result<String, u32> {
        let Some(call) = call_key(msg) else {
            return Err(5);
        };
        let config = self.config();
        let kbps = config.bandwidth_per_call_kbps;
        let calls_max = self.calls_max(&config);
        let limited = calls_max > 0 || config.bandwidth_total_kbps > 0;
        if limited {
            let admitted = self.ask_primary(&call, kbps, calls_max, &config).await;
            if !admitted {
                self.metrics.calls_refused.fetch_add(1, Ordering::Relaxed);
                info!(target: LOG, event = "Call Rejected", call = %call,
                    reason = "call or bandwidth limit reached", "");
                return Err(5);
            }
        }
        let record = CallRecord {
            started_ms: unix_ms_now(),
            kbps,
            from: msg.value(HeaderKind::From).unwrap_or_default(),
            to: msg.value(HeaderKind::To).unwrap_or_default(),
        };
        // Recorded in the background: the decision is made, the INVITE need not wait for
        // the record to reach the other peers (until it does, the primary counts its grant).
        let delay = if limited {
            Duration::ZERO
        } else {
            RECORD_DELAY
        };
        self.admission.admitted(&call);
        let (svc, key) = (self.clone(), call.clone());
        tokio::spawn(async move { svc.record_call(key, record, delay).await });
        self.metrics.calls_admitted.fetch_add(1, Ordering::Relaxed);
        info!(target: LOG, event = "Call Admitted", call = %call, kbps = kbps, "");
        Ok(call)
    }

    /// The cluster's call limit: `limits.calls.max` and the call licences in the pool, the
    /// lower of those set (0: no limit).
    pub(crate) fn calls_max(&self, config: &crate::service::SipConfig) -> u64 {
        let licensed = self.pool.lock().unwrap_or_else(|p| p.into_inner()).calls;
        match (config.calls_max, licensed) {
            (0, l) => l,
            (m, 0) => m,
            (m, l) => m.min(l),
        }
    }

    /// The primary's decision for one call.
    fn decide_here(&self, call: &str, kbps: u64, calls_max: u64, max_kbps: u64) -> bool {
        // Peers lost longer than CALL_GRACE no longer count their calls: signalling through
        // them is gone, and their calls would hold the limit until they came back.
        let stale = self.licences.down_longer_than(CALL_GRACE);
        self.admission
            .decide(call, kbps, calls_max, max_kbps, &stale)
    }

    async fn ask_primary(
        &self,
        call: &str,
        kbps: u64,
        calls_max: u64,
        config: &crate::service::SipConfig,
    ) -> bool {
        let engine = self.node.replication();
        let primary = engine.primary();
        if primary == self.self_index {
            return self.decide_here(call, kbps, calls_max, config.bandwidth_total_kbps);
        }
        let asked = self.node.mesh().and_then(|mesh| {
            let (tx, rx) = oneshot::channel();
            let id = {
                let mut st = self.admission.lock();
                st.next_id += 1;
                let id = st.next_id;
                st.waiting.insert(id, tx);
                id
            };
            let msg = PeerMessage::Admit {
                id,
                call: call.to_string(),
                kbps,
            };
            let payload = Bytes::from(postcard::to_stdvec(&msg).unwrap_or_default());
            mesh.send(primary, CHANNEL, payload).ok().map(|_| (id, rx))
        });
        if let Some((id, rx)) = asked {
            match tokio::time::timeout(ASK_TIMEOUT, rx).await {
                Ok(Ok(admitted)) => return admitted,
                _ => {
                    self.admission.lock().waiting.remove(&id);
                }
            }
        }
        // The primary cannot be asked: only this peer's share of the limits.
        let peers = self.peers().len().max(1) as u64;
        let (calls, used) = self.admission.own_count(self.self_index);
        (calls_max == 0 || (calls as u64) < calls_max / peers)
            && (config.bandwidth_total_kbps == 0
                || used + kbps <= config.bandwidth_total_kbps / peers)
    }

    /// A peer's admission message (mesh channel 2).
    pub fn handle_peer_message(&self, from: usize, payload: &[u8]) {
        let Ok(msg) = postcard::from_bytes::<PeerMessage>(payload) else {
            warn!(target: LOG, peer = from, "Unreadable SIP peer message dropped");
            return;
        };
        match msg {
            PeerMessage::Admit { id, call, kbps } => {
                let config = self.config();
                let admitted = self.node.replication().is_primary()
                    && self.decide_here(
                        &call,
                        kbps,
                        self.calls_max(&config),
                        config.bandwidth_total_kbps,
                    );
                let reply = PeerMessage::Decision { id, admitted };
                if let Some(mesh) = self.node.mesh() {
                    let payload = Bytes::from(postcard::to_stdvec(&reply).unwrap_or_default());
                    let _ = mesh.send(from, CHANNEL, payload);
                }
            }
            PeerMessage::Decision { id, admitted } => {
                if let Some(tx) = self.admission.lock().waiting.remove(&id) {
                    let _ = tx.send(admitted);
                }
            }
        }
    }

    /// A BYE ends the call it belongs to, whichever side sent it.
    pub(crate) async fn release_call(&self, msg: &Message) {
        for key in call_keys_for_bye(msg) {
            self.release_call_id(&key, "BYE").await;
        }
    }

    /// Writes an admitted call's record after `delay`, unless its BYE came first; a BYE
    /// that comes while it is being written removes it right after.
    async fn record_call(&self, call: String, record: CallRecord, delay: Duration) {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if !self.admission.start_writing(&call) {
            return; // ended before it was due: nothing to write, nothing to remove
        }
        let value = postcard::to_stdvec(&record).unwrap_or_default();
        self.write_call_record(&call, Some(value)).await;
        if self.admission.written(&call) {
            self.write_call_record(&call, None).await;
        }
    }

    pub(crate) async fn release_call_id(&self, call: &str, why: &str) {
        let (admitted, recorded) = self.admission.ended(call, self.self_index);
        if admitted {
            info!(target: LOG, event = "Call Ended", call = %call, reason = why, "");
        }
        if recorded {
            self.write_call_record(call, None).await;
        }
    }

    /// Writes a call's record to this peer's stream (`None`: removes it).
    async fn write_call_record(&self, call: &str, value: Option<Vec<u8>>) {
        let doing = if value.is_some() {
            "Recording an admitted call failed"
        } else {
            "Releasing a call failed"
        };
        let stream = self.own_stream(NAMESPACE);
        let change = Change {
            key: call.to_string(),
            value,
        };
        if let Err(e) = self.node.replication().write(&stream, vec![change]).await {
            warn!(target: LOG, reason = %e, "{doing}");
        }
    }

    /// Calls far older than any real call are dropped (their BYE never passed here).
    pub(crate) async fn admission_housekeeping(&self) {
        let now = unix_ms_now();
        let old: Vec<String> = self
            .admission
            .lock()
            .calls
            .get(&self.self_index)
            .map(|c| {
                c.iter()
                    .filter(|(_, r)| now.saturating_sub(r.started_ms) > CALL_MAX_AGE_MS)
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default();
        for call in old {
            self.release_call_id(&call, "no BYE seen in 12 hours").await;
        }
    }
}

/// Runs the peer-message loop for `svc` (mesh service messages on channel 2).
pub async fn serve_peer_messages(
    svc: Arc<SipService>,
    mut rx: tokio::sync::mpsc::Receiver<causeway_mesh::Inbound>,
) {
    while let Some(m) = rx.recv().await {
        if m.channel == CHANNEL {
            svc.handle_peer_message(m.from, &m.payload);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Vec<u8> {
        let r = CallRecord {
            started_ms: 1,
            kbps: 64,
            from: "a".into(),
            to: "b".into(),
        };
        postcard::to_stdvec(&r).unwrap()
    }

    /// A call that ends before its record is due costs no write; one that ends while its
    /// record is being written has it removed right after; a recorded call is removed.
    #[test]
    fn a_calls_record_is_written_only_if_it_outlives_the_delay_and_always_removed() {
        let (a, me) = (Admission::default(), 2);
        a.admitted("short");
        assert_eq!(a.ended("short", me), (true, false), "ended while waiting");
        assert!(!a.start_writing("short"), "so nothing is written");

        a.admitted("racing");
        assert!(a.start_writing("racing"));
        assert_eq!(
            a.ended("racing", me),
            (true, false),
            "the BYE during the write"
        );
        a.apply(me, "racing", Some(&record()));
        assert!(a.written("racing"), "is removed once written");

        a.admitted("long");
        assert!(a.start_writing("long"));
        a.apply(me, "long", Some(&record()));
        assert!(!a.written("long"), "still up when written");
        assert_eq!(a.usage(), vec![(me, 2, 128)]);
        assert_eq!(a.ended("long", me), (true, true), "its record is removed");
        assert_eq!(
            a.ended("unknown", me),
            (false, false),
            "not a call of this peer"
        );
    }
}
