//! Call and bandwidth admission for the cluster as a whole (SV-4).
//!
//! Every peer records the calls it admitted in its replicated stream `calls/peerN`, so
//! usage per peer and in total is visible everywhere. The decision is made by the holder
//! of the `calls` lease (docs/consensus.md), chosen by a majority of the peers: a peer asks
//! it over the mesh (`sip/admit`), it checks the sum of every stream plus the grants not yet
//! seen in a stream, and answers. Two peers admitting at once are thus serialised in one
//! place and the limit holds; any majority of the cluster keeps a holder, whichever peer
//! is the configuration primary. A peer that cannot reach the holder (no holder known, or
//! no answer) admits only within its share (`limit / peers`), so the sum of the shares
//! still holds the limit while the cluster is split.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use causeway_cluster::Node;
use causeway_common::time::unix_ms_now;
use causeway_consensus::{Holder, LeaderLease, LeaseTiming};
use causeway_mesh::rpc::Endpoint;
use causeway_replication::{Change, StreamId};
use causeway_sip::{HeaderKind, Message, NameAddr};
use serde::{Deserialize, Serialize};
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::service::{SipService, LOG};

pub const NAMESPACE: &str = "calls";
/// The lease whose holder decides admissions.
pub const LEASE: &str = "calls";

/// The `calls` lease's timing: 200 ms heartbeats, held ≈ 1 s after each confirmed round.
/// While no holder is known every peer admits within its share, so a slower hand-over
/// (≈ 2 s after the holder dies, against 0.5 s by default) costs nothing but headroom, and
/// the default's 50 ms heartbeats and renewals were most of an idle peer's CPU (≈ 2 % of a
/// core: 190 wake-ups a second).
pub fn lease_timing() -> LeaseTiming {
    LeaseTiming {
        heartbeat: Duration::from_millis(200),
        election_timeout_min: Duration::from_millis(600),
        election_timeout_max: Duration::from_millis(1200),
        renew: Duration::from_millis(200),
    }
}

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

/// A peer asks the holder of the `calls` lease to admit one call.
#[derive(Debug, Serialize, Deserialize)]
pub struct AdmitRequest {
    pub call: String,
    pub kbps: u64,
    /// The generation the asker believes the holder has: a holder of another generation
    /// answers all the same (it holds the lease now), but says which it holds.
    pub generation: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AdmitAnswer {
    pub admitted: bool,
    pub generation: u64,
}

pub fn admit_endpoint() -> Endpoint<AdmitRequest, AdmitAnswer> {
    Endpoint::new("sip/admit")
}

#[derive(Default)]
struct State {
    /// Stream owner → call → record.
    calls: HashMap<usize, HashMap<String, CallRecord>>,
    /// Grants this peer made as primary, not yet in a stream: call → (kbps, expiry).
    grants: HashMap<String, (u64, u64)>,
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

/// What one decision needs from the rest of the service, read when it is made.
#[derive(Clone, Debug, Default)]
pub(crate) struct Limits {
    /// `limits.calls.max` and the call licences, the lower of those set (0: no limit).
    pub calls_max: u64,
    pub kbps_per_call: u64,
    pub bandwidth_total_kbps: u64,
    /// Peers in the cluster: a peer that cannot reach the decider admits `1 / peers`.
    pub peers: u64,
    /// Peers lost longer than the grace period: their calls no longer count.
    pub stale: Vec<usize>,
}

impl Limits {
    fn limited(&self) -> bool {
        self.calls_max > 0 || self.bandwidth_total_kbps > 0
    }
}

/// The SIP service's call admission (SV-4): its state, the lease whose holder decides, and
/// the stream its calls are recorded in. The service hands it the limits in force.
pub(crate) struct CallAdmission {
    state: Admission,
    node: Arc<Node>,
    self_index: usize,
    /// The `calls` lease: its holder decides (none if the group failed to start).
    lease: Option<Arc<dyn LeaderLease>>,
    metrics: Arc<Metrics>,
    tasks: TaskTracker,
}

impl CallAdmission {
    pub(crate) fn new(
        node: Arc<Node>,
        self_index: usize,
        metrics: Arc<Metrics>,
        tasks: TaskTracker,
    ) -> Self {
        let leases = node.leases();
        let lease = match leases.start_group_with(LEASE, leases.all_peers(), lease_timing()) {
            Ok(g) => Some(g as Arc<dyn LeaderLease>),
            Err(e) => {
                warn!(target: LOG, reason = %e, "Admission lease not started; each peer admits within its share");
                None
            }
        };
        Self {
            state: Admission::default(),
            node,
            self_index,
            lease,
            metrics,
            tasks,
        }
    }

    /// A record of a `calls/peerN` stream as it is now.
    pub(crate) fn apply(&self, owner: usize, key: &str, value: Option<&[u8]>) {
        self.state.apply(owner, key, value);
    }

    /// (peer, calls, kbps) per peer.
    pub(crate) fn usage(&self) -> Vec<(usize, usize, u64)> {
        self.state.usage()
    }

    pub(crate) fn calls(&self) -> Vec<(usize, String, CallRecord)> {
        self.state.calls()
    }

    /// Admits an initial INVITE under the cluster-wide limits; `Err(seconds)` to retry after.
    pub(crate) async fn admit(
        self: &Arc<Self>,
        msg: &Message,
        limits: Limits,
    ) -> Result<String, u32> {
        let Some(call) = call_key(msg) else {
            return Err(5);
        };
        let kbps = limits.kbps_per_call;
        if limits.limited() && !self.ask_decider(&call, kbps, &limits).await {
            self.metrics.calls_refused.fetch_add(1, Ordering::Relaxed);
            info!(target: LOG, event = "Call Rejected", call = %call,
                reason = "call or bandwidth limit reached", "");
            return Err(5);
        }
        let record = CallRecord {
            started_ms: unix_ms_now(),
            kbps,
            from: msg.value(HeaderKind::From).unwrap_or_default(),
            to: msg.value(HeaderKind::To).unwrap_or_default(),
        };
        // Recorded in the background: the decision is made, the INVITE need not wait for
        // the record to reach the other peers (until it does, the holder counts its grant).
        let delay = if limits.limited() {
            Duration::ZERO
        } else {
            RECORD_DELAY
        };
        self.state.admitted(&call);
        let (me, key) = (self.clone(), call.clone());
        self.tasks
            .spawn(async move { me.record(key, record, delay).await });
        self.metrics.calls_admitted.fetch_add(1, Ordering::Relaxed);
        info!(target: LOG, event = "Call Admitted", call = %call, kbps = kbps, "");
        Ok(call)
    }

    /// The lease holder's decision for one call.
    fn decide_here(&self, call: &str, kbps: u64, limits: &Limits) -> bool {
        self.state.decide(
            call,
            kbps,
            limits.calls_max,
            limits.bandwidth_total_kbps,
            &limits.stale,
        )
    }

    async fn ask_decider(&self, call: &str, kbps: u64, limits: &Limits) -> bool {
        match self.lease.as_ref().map(|l| l.state().holder) {
            Some(Holder::Me { .. }) => return self.decide_here(call, kbps, limits),
            Some(Holder::Peer { peer, generation }) => {
                let request = AdmitRequest {
                    call: call.to_string(),
                    kbps,
                    generation,
                };
                let rpc = self.node.leases().rpc();
                match rpc
                    .call(&admit_endpoint(), peer, &request, ASK_TIMEOUT)
                    .await
                {
                    Ok(answer) => return answer.admitted,
                    Err(e) => debug!(target: LOG, reason = %e, "Admission decider not reached"),
                }
            }
            Some(Holder::Nobody) | None => {}
        }
        // The holder cannot be asked: only this peer's share of the limits.
        let peers = limits.peers.max(1);
        let (calls, used) = self.state.own_count(self.self_index);
        (limits.calls_max == 0 || (calls as u64) < limits.calls_max / peers)
            && (limits.bandwidth_total_kbps == 0
                || used + kbps <= limits.bandwidth_total_kbps / peers)
    }

    /// A peer's `sip/admit`: decided here only while this peer holds the lease.
    pub(crate) fn answer(
        &self,
        from: usize,
        req: AdmitRequest,
        limits: &Limits,
    ) -> Result<AdmitAnswer, String> {
        let generation = self
            .lease
            .as_ref()
            .and_then(|l| l.state().my_generation())
            .ok_or_else(|| format!("Peer {} does not hold the admission lease", self.self_index))?;
        let admitted = self.decide_here(&req.call, req.kbps, limits);
        debug!(target: LOG, peer = from, call = %req.call, admitted = admitted,
            generation = generation, "Admission decided for a peer");
        Ok(AdmitAnswer {
            admitted,
            generation,
        })
    }

    /// A BYE ends the call it belongs to, whichever side sent it.
    pub(crate) async fn release(&self, msg: &Message) {
        for key in call_keys_for_bye(msg) {
            self.release_id(&key, "BYE").await;
        }
    }

    /// Writes an admitted call's record after `delay`, unless its BYE came first; a BYE
    /// that comes while it is being written removes it right after.
    async fn record(&self, call: String, record: CallRecord, delay: Duration) {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if !self.state.start_writing(&call) {
            return; // ended before it was due: nothing to write, nothing to remove
        }
        let value = postcard::to_stdvec(&record).unwrap_or_default();
        self.write_record(&call, Some(value)).await;
        if self.state.written(&call) {
            self.write_record(&call, None).await;
        }
    }

    pub(crate) async fn release_id(&self, call: &str, why: &str) {
        let (admitted, recorded) = self.state.ended(call, self.self_index);
        if admitted {
            info!(target: LOG, event = "Call Ended", call = %call, reason = why, "");
        }
        if recorded {
            self.write_record(call, None).await;
        }
    }

    /// Writes a call's record to this peer's stream (`None`: removes it).
    async fn write_record(&self, call: &str, value: Option<Vec<u8>>) {
        let doing = if value.is_some() {
            "Recording an admitted call failed"
        } else {
            "Releasing a call failed"
        };
        let stream = StreamId::new(NAMESPACE, &crate::location::stream_name(self.self_index));
        let change = Change {
            key: call.to_string(),
            value,
        };
        if let Err(e) = self.node.replication().write(&stream, vec![change]).await {
            warn!(target: LOG, reason = %e, "{doing}");
        }
    }

    /// Calls far older than any real call are dropped (their BYE never passed here).
    pub(crate) async fn housekeeping(&self) {
        let now = unix_ms_now();
        let old: Vec<String> = self
            .state
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
            self.release_id(&call, "no BYE seen in 12 hours").await;
        }
    }
}

impl SipService {
    /// The limits in force now, for an admission decision.
    pub(crate) fn admission_limits(&self) -> Limits {
        let config = self.config();
        let licensed = self.licences.current().calls;
        let calls_max = match (config.calls_max, licensed) {
            (0, l) => l,
            (m, 0) => m,
            (m, l) => m.min(l),
        };
        Limits {
            calls_max,
            kbps_per_call: config.bandwidth_per_call_kbps,
            bandwidth_total_kbps: config.bandwidth_total_kbps,
            peers: self.peers().len() as u64,
            // Peers lost longer than CALL_GRACE no longer count their calls: signalling
            // through them is gone, and their calls would hold the limit until they came back.
            stale: self.licences.down_longer_than(CALL_GRACE),
        }
    }
}

/// Answers peers' `sip/admit` for `svc` from now on.
pub(crate) fn serve_admissions(svc: &Arc<SipService>) {
    let weak: Weak<SipService> = Arc::downgrade(svc);
    svc.node
        .leases()
        .rpc()
        .serve(&admit_endpoint(), move |from, req: AdmitRequest| {
            let svc = weak.upgrade();
            async move {
                let svc = svc.ok_or_else(|| "the SIP service has stopped".to_string())?;
                let limits = svc.admission_limits();
                svc.admission.answer(from, req, &limits)
            }
        });
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
