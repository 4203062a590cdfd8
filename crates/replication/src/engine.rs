//! The replication engine: streams kept in the store, pushed by their owner, checked by
//! digest every heartbeat, fetched when behind. See `docs/replication.md`.

use std::collections::{BTreeMap, HashMap};

use causeway_common::error::{ErrorCode, Refusal};
use causeway_mesh::rpc::{CallError, Endpoint, PeerSend, Rpc};
use causeway_mesh::SendError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use causeway_store::{Op, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::keyring::Keyring;
use crate::stream::{Applied, Header, LoadError, NodeId, Record, Stream, StreamId};
use crate::wire::{Change, Message, RECORDS_PER_FRAME};

pub(crate) const META_TABLE: &str = "repl_meta";
const LOG: &str = "developer.replication";

/// The configuration stream: owned by the configuration primary.
pub fn config_stream() -> StreamId {
    StreamId::new("config", "cluster")
}

fn is_config(id: &StreamId) -> bool {
    id.namespace == "config"
}

/// The network edge: the mesh in the product, anything in tests.
pub trait PeerLink: Send + Sync {
    /// Queues a frame for peer `index`; false when it cannot be queued (not connected).
    fn send(&self, peer: usize, payload: Bytes) -> bool;
    /// Peers connected now (never this system).
    fn active_peers(&self) -> Vec<usize>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Written on this node (by an operator, or forwarded to it as primary).
    Local,
    /// Received from peer `n`.
    Peer(usize),
}

/// What the engine tells the node about, and asks it.
pub trait Observer: Send + Sync {
    /// Checks changes before the owner commits them; the error names the field.
    fn validate(&self, _stream: &StreamId, _changes: &[Change]) -> Result<(), String> {
        Ok(())
    }
    /// Called after changes are committed locally, in commit order.
    fn applied(&self, _stream: &StreamId, _applied: &[Applied], _origin: Origin) {}
    /// The configuration primary moved (EX-7): persist it in the node's own file.
    fn primary_changed(&self, _primary: usize, _epoch: u64) {}
}

pub struct NoObserver;
impl Observer for NoObserver {}

#[derive(Clone, Debug)]
pub struct EngineSettings {
    pub self_index: usize,
    pub peer_count: usize,
    /// The primary from the node's file; the store's wins once a `SetPrimary` happened.
    pub primary: usize,
    pub heartbeat: Duration,
    /// How long a write waits for a majority before it answers anyway.
    pub ack_timeout: Duration,
    /// Seals values at rest (EX-14); none in tests that look at the raw store.
    pub keyring: Option<Arc<Keyring>>,
    /// How often the synchronisation check is reported in the log, as the seed does (the
    /// check itself runs on every heartbeat).
    pub sync_report: Duration,
    /// How long a group commit waits for more writers once several are queued.
    pub gather: Duration,
}

impl EngineSettings {
    pub fn new(self_index: usize, peer_count: usize, primary: usize) -> Self {
        Self {
            self_index,
            peer_count,
            primary,
            heartbeat: Duration::from_millis(200),
            ack_timeout: Duration::from_secs(5),
            keyring: None,
            sync_report: Duration::from_secs(120),
            gather: Duration::from_millis(1),
        }
    }
}

impl From<WriteError> for Refusal {
    fn from(e: WriteError) -> Self {
        let code = match &e {
            WriteError::Invalid(why) => return Refusal::invalid(why.clone()),
            WriteError::PrimaryUnreachable(_) | WriteError::TakingOver(_) => ErrorCode::Unavailable,
            WriteError::NotPrimary(_) => ErrorCode::Conflict,
            WriteError::NoAnswer(..) => ErrorCode::Timeout,
            WriteError::Store(_) => ErrorCode::Internal,
        };
        Refusal::new(code, e.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum WriteError {
    #[error("{0}")]
    Invalid(String),
    #[error("the configuration primary (Peer {0}) is unreachable: make the change on Peer {0} when it is back, or move the primary with `causeway xcommand SetPrimary <peer>`")]
    PrimaryUnreachable(usize),
    #[error("Peer {0} is taking over as configuration primary; retry in a moment")]
    TakingOver(usize),
    #[error("this peer is not the configuration primary (Peer {0} is)")]
    NotPrimary(usize),
    #[error("the configuration primary (Peer {0}) did not answer within {1:?}; the change may still be applied there: check with `xconfiguration get`")]
    NoAnswer(usize, Duration),
    #[error("saving the change failed: {0}")]
    Store(String),
}

/// A committed write: its position, and how many peers (this one included) hold it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteOutcome {
    pub generation: u64,
    pub seq: u64,
    pub confirmed: usize,
    pub peers: usize,
}

impl WriteOutcome {
    pub fn majority(&self) -> bool {
        self.confirmed > self.peers / 2
    }
}

#[derive(Default)]
struct PeerState {
    node_id: Option<NodeId>,
    primary: usize,
    epoch: u64,
    headers: BTreeMap<StreamId, Header>,
    acked: BTreeMap<StreamId, (u64, u64)>,
    last_digest: Option<Instant>,
    last_digest_wall: Option<SystemTime>,
    active_since: Option<Instant>,
    /// Since when this peer's digests name another primary or epoch (20017 after a while,
    /// so the moment of a `SetPrimary` is not an alarm).
    mismatch_since: Option<Instant>,
}

struct Fetching {
    from: usize,
    since: Instant,
}

/// What a batch of pushes saves and answers once, after one store transaction.
#[derive(Default)]
struct Deferred {
    ops: Vec<Op>,
    acks: Vec<(usize, Message)>,
    applied: Vec<(StreamId, Vec<Applied>, usize)>,
}

/// A write waiting for the next group commit.
struct PendingWrite {
    id: StreamId,
    changes: Vec<Change>,
    origin: Origin,
    done: oneshot::Sender<Result<Header, WriteError>>,
}

/// Writes of one stream waiting for a majority, by position.
type MajorityWaiters = BTreeMap<(u64, u64), Vec<oneshot::Sender<()>>>;

struct Takeover {
    epoch: u64,
    started: Instant,
}

struct State {
    node_id: NodeId,
    primary: usize,
    epoch: u64,
    streams: BTreeMap<StreamId, Stream>,
    peers: Vec<PeerState>,
    fetching: HashMap<StreamId, Fetching>,
    /// Stream → why it differs from its owner's copy (20011).
    conflicts: BTreeMap<StreamId, String>,
    takeover: Option<Takeover>,
    store_error: Option<String>,
    /// A save failed after the change was applied in memory (see `persist`).
    diverged: bool,
    rejected: u64,
    primary_lost_since: Option<Instant>,
    last_check: Option<SystemTime>,
    last_sync: Option<SystemTime>,
    next_report: Instant,
    /// Writes waiting for a majority, per stream by position: woken when an ack or digest
    /// brings enough peers to their position (not every waiter on every ack).
    majority_waiters: HashMap<StreamId, MajorityWaiters>,
}

pub struct Engine {
    settings: EngineSettings,
    store: Arc<dyn Store>,
    link: Arc<dyn PeerLink>,
    observer: Arc<dyn Observer>,
    state: Mutex<State>,
    /// Replaced whole by a key change.
    keyring: std::sync::RwLock<Option<Arc<Keyring>>>,
    /// Writes queued for the next group commit, and who commits them.
    pending: Mutex<Vec<PendingWrite>>,
    committer: tokio::sync::Mutex<()>,
    /// Bumped on every ack or digest: writes waiting for a majority look again.
    progress: watch::Sender<u64>,
    counters: EngineCounters,
    /// Typed requests to peers, over the link: the forward of a subordinate's write.
    rpc: Arc<Rpc>,
}

/// A write made on a subordinate, for the primary (EX-2).
#[derive(Debug, Serialize, Deserialize)]
pub struct ForwardRequest {
    pub stream: StreamId,
    pub changes: Vec<Change>,
}

/// The primary's answer: the seq its change landed at, once a majority holds it.
pub type ForwardAnswer = Result<u64, WriteError>;

pub fn forward_endpoint() -> Endpoint<ForwardRequest, ForwardAnswer> {
    Endpoint::new("replication/forward")
}

/// The engine's RPC frames ride on its own link, wrapped in `Message::Rpc`.
struct RpcOverLink(Arc<dyn PeerLink>);

impl PeerSend for RpcOverLink {
    fn send_to(&self, peer: usize, _channel: u16, payload: Bytes) -> Result<(), SendError> {
        let frame = Message::Rpc {
            frame: payload.to_vec(),
        };
        if self.0.send(peer, frame.encode()) {
            Ok(())
        } else {
            Err(SendError::NotConnected(peer))
        }
    }
}

/// What the engine has done since start, for `/metrics`.
#[derive(Debug, Default)]
pub struct EngineCounters {
    /// Store transactions committed (each one fsync).
    pub commits: AtomicU64,
    /// Time spent committing them, in microseconds.
    pub commit_micros: AtomicU64,
    /// Push frames sent, one per peer.
    pub pushes_sent: AtomicU64,
    /// Push frames received.
    pub pushes_received: AtomicU64,
}

/// `xstatus cluster`'s replication part.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplicationStatus {
    pub node_id: String,
    pub primary: usize,
    pub epoch: u64,
    /// `Active`, or what is wrong and with which peers (EX-5).
    pub database_status: String,
    pub revision: u64,
    pub generation: u64,
    pub digest: String,
    pub records: usize,
    pub peers: Vec<PeerReplication>,
    pub last_check_unix_ms: Option<u64>,
    pub next_check_unix_ms: Option<u64>,
    pub last_synchronisation_unix_ms: Option<u64>,
    pub rejected_messages: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerReplication {
    pub index: usize,
    pub revision: Option<u64>,
    pub generation: Option<u64>,
    pub digest: Option<String>,
    pub primary: Option<usize>,
    /// `In sync`, `Behind by N`, `Ahead by N`, `Differs`, `No digest`.
    pub state: String,
    pub last_digest_unix_ms: Option<u64>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn meta_u64(store: &dyn Store, key: &str) -> Result<Option<u64>, LoadError> {
    Ok(store
        .get(META_TABLE, key.as_bytes())?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(u64::from_be_bytes))
}

fn put_meta(key: &str, v: u64) -> Op {
    Op::Put {
        table: META_TABLE,
        key: key.as_bytes().to_vec(),
        value: v.to_be_bytes().to_vec(),
    }
}

fn random_node_id() -> NodeId {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    // An all-zero id would read as "no owner"; SystemRandom only fails without an OS RNG.
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    u64::from_be_bytes(b).max(1)
}

impl Engine {
    /// Loads (or creates) this node's replication state from the store.
    pub fn open(
        settings: EngineSettings,
        store: Arc<dyn Store>,
        link: Arc<dyn PeerLink>,
        observer: Arc<dyn Observer>,
    ) -> Result<Arc<Engine>, LoadError> {
        let node_id = match meta_u64(store.as_ref(), "node_id")? {
            Some(id) => id,
            None => {
                let id = random_node_id();
                store.apply(&[put_meta("node_id", id)])?;
                id
            }
        };
        let epoch = meta_u64(store.as_ref(), "epoch")?.unwrap_or(0);
        let primary = match meta_u64(store.as_ref(), "primary")? {
            Some(p) if epoch > 0 && (1..=settings.peer_count as u64).contains(&p) => p as usize,
            _ => settings.primary,
        };
        let keyring = settings.keyring.clone();
        let moved = Stream::migrate_legacy(store.as_ref(), keyring.as_deref())?;
        if moved > 0 {
            info!(target: LOG, event = "Store layout upgraded", records = moved,
                "Replicated records moved to the layout ordered by sequence number");
        }
        let streams = Stream::load_all(store.as_ref(), keyring.as_deref())?
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect();
        let now = Instant::now();
        let state = State {
            node_id,
            primary,
            epoch,
            streams,
            peers: (0..settings.peer_count)
                .map(|_| PeerState::default())
                .collect(),
            fetching: HashMap::new(),
            conflicts: BTreeMap::new(),
            takeover: None,
            store_error: None,
            diverged: false,
            rejected: 0,
            primary_lost_since: Some(now),
            last_check: None,
            last_sync: None,
            next_report: now + settings.sync_report,
            majority_waiters: HashMap::new(),
        };
        let rpc = Rpc::new(Arc::new(RpcOverLink(link.clone())));
        let engine = Arc::new(Engine {
            settings,
            store,
            link,
            observer,
            state: Mutex::new(state),
            keyring: std::sync::RwLock::new(keyring),
            pending: Mutex::new(Vec::new()),
            committer: tokio::sync::Mutex::new(()),
            progress: watch::channel(0).0,
            counters: EngineCounters::default(),
            rpc,
        });
        let weak = Arc::downgrade(&engine);
        engine
            .rpc
            .serve(&forward_endpoint(), move |from, req: ForwardRequest| {
                let engine = weak.upgrade();
                async move {
                    let engine = engine.ok_or("the replication engine has stopped")?;
                    Ok(engine
                        .write_local(&req.stream, req.changes, Origin::Peer(from))
                        .await
                        .map(|o| o.seq))
                }
            });
        Ok(engine)
    }

    fn keyring(&self) -> Option<Arc<Keyring>> {
        self.keyring
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// EX-14: seals every value again with `keyring` in one store transaction, then uses it
    /// for every later write. Returns how many records were sealed.
    pub fn reseal(&self, keyring: Arc<Keyring>) -> Result<usize, String> {
        let mut st = self.lock();
        let mut ops = Vec::new();
        let mut records = 0;
        for stream in st.streams.values_mut() {
            let all = stream.since(0);
            records += all.len();
            ops.extend(stream.store_ops(&all, true, Some(&keyring)));
        }
        self.store.apply(&ops).map_err(|e| e.to_string())?;
        *self.keyring.write().unwrap_or_else(|p| p.into_inner()) = Some(keyring);
        drop(st);
        Ok(records)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, peer: usize, msg: &Message) {
        self.link.send(peer, msg.encode());
    }

    pub fn node_id(&self) -> NodeId {
        self.lock().node_id
    }

    pub fn primary(&self) -> usize {
        self.lock().primary
    }

    pub fn is_primary(&self) -> bool {
        self.lock().primary == self.settings.self_index
    }

    pub fn header(&self, stream: &StreamId) -> Header {
        self.lock()
            .streams
            .get(stream)
            .map(|s| s.header)
            .unwrap_or_default()
    }

    pub fn get(&self, stream: &StreamId, key: &str) -> Option<Vec<u8>> {
        self.lock()
            .streams
            .get(stream)
            .and_then(|s| s.get(key).map(<[u8]>::to_vec))
    }

    /// The streams of a namespace this node holds (its own and its peers').
    pub fn streams(&self, namespace: &str) -> Vec<StreamId> {
        self.lock()
            .streams
            .keys()
            .filter(|id| id.namespace == namespace)
            .cloned()
            .collect()
    }

    /// Every live entry of a stream, in key order.
    pub fn entries(&self, stream: &StreamId) -> Vec<(String, Vec<u8>)> {
        self.lock()
            .streams
            .get(stream)
            .map(|s| {
                s.entries()
                    .map(|(k, v)| (k.to_string(), v.to_vec()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Runs the heartbeat: digests out, fetch timeouts, primary takeover. Until `stop`.
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let mut tick = tokio::time::interval(self.settings.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => self.tick(),
            }
        }
    }

    /// One heartbeat's work.
    pub fn tick(&self) {
        let active = self.link.active_peers();
        let mut st = self.lock();
        let now = Instant::now();
        st.last_check = Some(SystemTime::now());
        for (i, p) in st.peers.iter_mut().enumerate() {
            let on = active.contains(&(i + 1));
            match (on, p.active_since) {
                (true, None) => p.active_since = Some(now),
                (false, Some(_)) => p.active_since = None,
                _ => {}
            }
        }
        let primary_up = st.primary == self.settings.self_index || active.contains(&st.primary);
        match (primary_up, st.primary_lost_since) {
            (true, _) => st.primary_lost_since = None,
            (false, None) => st.primary_lost_since = Some(now),
            _ => {}
        }
        // A fetch that got no complete answer is asked again by the next digest.
        let stale = self.settings.heartbeat * 10;
        st.fetching
            .retain(|_, f| now.duration_since(f.since) < stale);
        if st.diverged {
            self.reload(&mut st);
        }
        self.drive_takeover(&mut st, &active);
        if now >= st.next_report {
            st.next_report = now + self.settings.sync_report;
            self.report_sync(&st, &active);
        }
        let digest = Message::Digest {
            node_id: st.node_id,
            primary: st.primary as u16,
            epoch: st.epoch,
            headers: st
                .streams
                .iter()
                .map(|(id, s)| (id.clone(), s.header))
                .collect(),
        }
        .encode();
        drop(st);
        for p in active {
            self.link.send(p, digest.clone());
        }
    }

    /// The seed's periodic synchronisation lines: what this peer's configuration is doing.
    fn report_sync(&self, st: &State, active: &[usize]) {
        let id = config_stream();
        let mine = st.streams.get(&id).map(|s| s.header).unwrap_or_default();
        let me = self.settings.self_index;
        info!(target: LOG, "Starting synchronisation");
        info!(target: LOG, configuration_master_index = st.primary - 1, local_peer_index = me - 1,
            revision = mine.seq, digest = %mine.short_hash(), "Cluster configuration");
        let behind = |p: &usize| {
            let ps = &st.peers[p - 1];
            let acked = ps.acked.get(&id).copied().unwrap_or_default();
            let seen = ps
                .headers
                .get(&id)
                .map(|h| h.position())
                .unwrap_or_default();
            acked.max(seen) < mine.position()
        };
        let outcome = if st.primary == me {
            let lagging: Vec<String> = active
                .iter()
                .filter(|p| behind(p))
                .map(|p| format!("Peer {p}"))
                .collect();
            if lagging.is_empty() {
                Ok("This peer is the cluster master, local configuration has already been replicated to the other peers".to_string())
            } else {
                Ok(format!(
                    "This peer is the cluster master, bringing {} up to date",
                    lagging.join(", ")
                ))
            }
        } else if !active.contains(&st.primary) {
            Err(format!(
                "This peer is not the cluster master, and the cluster master (Peer {}) is unreachable",
                st.primary
            ))
        } else if let Some(why) = st.conflicts.get(&id) {
            Err(format!("This peer is not the cluster master, and {why}"))
        } else {
            let theirs = st.peers[st.primary - 1]
                .headers
                .get(&id)
                .map(|h| h.position())
                .unwrap_or_default();
            if theirs <= mine.position() {
                Ok("This peer is not the cluster master, local configuration is already up to date".to_string())
            } else {
                Ok(format!(
                    "This peer is not the cluster master, fetching the configuration from Peer {}",
                    st.primary
                ))
            }
        };
        match outcome {
            Ok(detail) => {
                info!(target: LOG, "{detail}");
                info!(target: LOG, "Synchronisation completed successfully");
            }
            Err(detail) => {
                warn!(target: LOG, "{detail}");
                warn!(target: LOG, "Synchronisation failed");
            }
        }
    }

    /// Handles one frame from peer `from`. Malformed frames are dropped and logged.
    pub fn handle(self: &Arc<Self>, from: usize, payload: &[u8]) {
        self.handle_one(from, payload, None);
    }

    /// Handles frames that arrived together: the pushes among them are saved in one store
    /// transaction (one fsync) and acknowledged after it, so a receiver keeps up with a
    /// primary that commits in groups.
    pub fn handle_batch(self: &Arc<Self>, frames: &[(usize, Bytes)]) {
        let mut deferred = Deferred::default();
        for (from, payload) in frames {
            self.handle_one(*from, payload, Some(&mut deferred));
        }
        if deferred.ops.is_empty() {
            return;
        }
        let saved = {
            let mut st = self.lock();
            self.persist(&mut st, &deferred.ops)
        };
        if !saved {
            return;
        }
        for (to, ack) in &deferred.acks {
            self.send(*to, ack);
        }
        for (id, applied, from) in &deferred.applied {
            self.observer.applied(id, applied, Origin::Peer(*from));
        }
    }

    fn handle_one(self: &Arc<Self>, from: usize, payload: &[u8], defer: Option<&mut Deferred>) {
        if from == 0 || from > self.settings.peer_count || from == self.settings.self_index {
            return;
        }
        let msg = match Message::decode(payload) {
            Ok(m) => m,
            Err(e) => {
                self.reject(from, "a malformed replication message", &e.to_string());
                return;
            }
        };
        match msg {
            Message::Digest {
                node_id,
                primary,
                epoch,
                headers,
            } => self.on_digest(from, node_id, primary as usize, epoch, headers),
            Message::Push {
                stream,
                prev,
                header,
                records,
            } => {
                self.counters
                    .pushes_received
                    .fetch_add(1, Ordering::Relaxed);
                self.on_push(from, stream, prev, header, records, defer)
            }
            Message::Fetch {
                stream,
                generation,
                after_seq,
                snapshot,
            } => self.on_fetch(from, stream, generation, after_seq, snapshot),
            Message::Records {
                stream,
                header,
                replace,
                after_seq,
                upto,
                records,
            } => self.on_records(from, stream, header, replace, after_seq, upto, records),
            Message::Ack {
                stream,
                generation,
                seq,
            } => {
                let mut st = self.lock();
                let acked = st.peers[from - 1].acked.entry(stream.clone()).or_default();
                *acked = (*acked).max((generation, seq));
                self.wake_majority(&mut st, &stream);
                drop(st);
                self.progress.send_modify(|n| *n += 1);
            }
            Message::Rpc { frame } => self.rpc.handle(from, &frame),
            Message::SetPrimary { primary, epoch } => {
                if primary == 0 || primary as usize > self.settings.peer_count {
                    self.reject(from, "set primary", &format!("there is no Peer {primary}"));
                    return;
                }
                let mut st = self.lock();
                self.adopt_primary(&mut st, primary as usize, epoch, from);
            }
        }
    }

    fn reject(&self, from: usize, what: &str, reason: &str) {
        self.lock().rejected += 1;
        warn!(target: LOG, event = "Replication message rejected", peer = from, message = what,
            reason = reason, "Replication message rejected");
    }

    fn on_digest(
        &self,
        from: usize,
        node_id: NodeId,
        primary: usize,
        epoch: u64,
        headers: Vec<(StreamId, Header)>,
    ) {
        let mut st = self.lock();
        {
            let p = &mut st.peers[from - 1];
            p.node_id = Some(node_id);
            p.primary = primary;
            p.epoch = epoch;
            p.last_digest = Some(Instant::now());
            p.last_digest_wall = Some(SystemTime::now());
            for (id, h) in &headers {
                let a = p.acked.entry(id.clone()).or_default();
                *a = (*a).max(h.position());
            }
            p.headers = headers.into_iter().collect();
        }
        let waiting: Vec<StreamId> = st.majority_waiters.keys().cloned().collect();
        for id in waiting {
            self.wake_majority(&mut st, &id);
        }
        // A newer epoch, or the same epoch naming a higher peer (two SetPrimary commands at
        // once), wins. Epoch 0 is the peers' own files: a disagreement there is 20017 until
        // an operator settles it.
        if (1..=self.settings.peer_count).contains(&primary)
            && (epoch > st.epoch || (epoch == st.epoch && epoch > 0 && primary > st.primary))
        {
            self.adopt_primary(&mut st, primary, epoch, from);
        }
        let differs = primary != st.primary || epoch != st.epoch;
        let p = &mut st.peers[from - 1];
        p.mismatch_since = if differs {
            p.mismatch_since.or(Some(Instant::now()))
        } else {
            None
        };
        let heads: Vec<(StreamId, Header)> = st.peers[from - 1]
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        for (id, theirs) in heads {
            let mine = st.streams.get(&id).map(|s| s.header).unwrap_or_default();
            let from_owner = if is_config(&id) {
                from == st.primary
            } else {
                Some(theirs.owner) == st.peers[from - 1].node_id
            };
            if from_owner && theirs.position() == mine.position() && mine.position() != (0, 0) {
                if theirs.hash != mine.hash {
                    if !st.conflicts.contains_key(&id) {
                        warn!(target: LOG, stream = %id, peer = from, revision = mine.seq,
                            "Configuration differs from the primary's at the same revision: run `causeway xcommand ForceConfigUpdate` on this peer");
                    }
                    st.conflicts.insert(
                        id.clone(),
                        format!(
                            "{id} differs from Peer {from}'s at revision {} (digest {} here, {} there): run `causeway xcommand ForceConfigUpdate`",
                            mine.seq,
                            mine.short_hash(),
                            theirs.short_hash()
                        ),
                    );
                } else {
                    st.conflicts.remove(&id);
                }
            }
            if st.fetching.contains_key(&id) {
                continue;
            }
            // A stream whose writer started over (a peer that lost its store, with a new
            // node id): take the new writer's copy whole, whatever its position.
            if !is_config(&id) && from_owner && mine.owner != 0 && theirs.owner != mine.owner {
                self.start_fetch(&mut st, from, &id, mine, true);
                continue;
            }
            if theirs.position() <= mine.position() {
                continue;
            }
            // Who may bring this stream up to date: its owner (the primary, for the
            // configuration) or, when this node is the primary and has lost what it wrote
            // (an empty store, or one restored from a backup), a peer holding more of this
            // node's own writes. Taking over from another primary is `drive_takeover`'s.
            let eligible = if is_config(&id) {
                from == st.primary
                    || (st.primary == self.settings.self_index
                        && (mine.position() == (0, 0)
                            || (theirs.owner == st.node_id
                                && theirs.generation == mine.generation)))
            } else {
                from_owner
            };
            if eligible {
                self.start_fetch(&mut st, from, &id, mine, false);
            }
        }
        drop(st);
        self.progress.send_modify(|n| *n += 1);
    }

    fn start_fetch(
        &self,
        st: &mut State,
        from: usize,
        id: &StreamId,
        mine: Header,
        snapshot: bool,
    ) {
        info!(target: LOG, peer = from, stream = %id, revision = mine.seq, "Starting synchronisation");
        st.fetching.insert(
            id.clone(),
            Fetching {
                from,
                since: Instant::now(),
            },
        );
        self.send(
            from,
            &Message::Fetch {
                stream: id.clone(),
                generation: mine.generation,
                after_seq: mine.seq,
                snapshot,
            },
        );
    }

    fn adopt_primary(&self, st: &mut State, primary: usize, epoch: u64, from: usize) {
        if epoch < st.epoch || (epoch == st.epoch && primary <= st.primary) {
            return;
        }
        let old = st.primary;
        st.primary = primary;
        st.epoch = epoch;
        if let Err(e) = self.store.apply(&[
            put_meta("epoch", epoch),
            put_meta("primary", primary as u64),
        ]) {
            st.store_error = Some(e.to_string());
        }
        info!(target: LOG, event = "Configuration primary changed", old_primary = old,
            new_primary = primary, epoch = epoch, told_by = from,
            "Configuration primary changed");
        st.takeover = (primary == self.settings.self_index).then(|| Takeover {
            epoch,
            started: Instant::now(),
        });
        st.primary_lost_since = None;
        self.observer.primary_changed(primary, epoch);
    }

    /// A new primary first takes the newest configuration any reachable peer holds, then
    /// starts its generation (EX-7).
    fn drive_takeover(&self, st: &mut State, active: &[usize]) {
        let Some(t) = &st.takeover else { return };
        let (epoch, started) = (t.epoch, t.started);
        let id = config_stream();
        if st.fetching.contains_key(&id) {
            return;
        }
        let mine = st.streams.get(&id).map(|s| s.header).unwrap_or_default();
        // Every reachable peer must follow this epoch (so it takes no more pushes from the
        // old primary) and have said so in a digest, which also carries its newest header.
        let heard_all = active.iter().all(|p| st.peers[p - 1].epoch >= epoch);
        if !heard_all && started.elapsed() < self.settings.heartbeat * 10 {
            return;
        }
        let newest = active
            .iter()
            .filter_map(|p| st.peers[p - 1].headers.get(&id).map(|h| (*p, *h)))
            .filter(|(_, h)| h.position() > mine.position())
            .max_by_key(|(_, h)| h.position());
        if let Some((p, _)) = newest {
            self.start_fetch(st, p, &id, mine, false);
            return;
        }
        let stream = st
            .streams
            .entry(id.clone())
            .or_insert_with(|| Stream::new(id.clone()));
        let prev = stream.header.position();
        stream.header.owner = st.node_id;
        stream.header.generation = epoch.max(stream.header.generation);
        let header = stream.header;
        let ops = stream.store_ops(&[], false, self.keyring().as_deref());
        st.takeover = None;
        self.persist(st, &ops);
        info!(target: LOG, event = "Configuration primary takeover completed", epoch = epoch,
            revision = header.seq, "This peer is now the configuration primary");
        let push = Message::Push {
            stream: id,
            prev,
            header,
            records: Vec::new(),
        };
        for p in active {
            self.send(*p, &push);
        }
    }

    fn reload(&self, st: &mut State) {
        if let Ok(streams) = Stream::load_all(self.store.as_ref(), self.keyring().as_deref()) {
            st.streams = streams.into_iter().map(|s| (s.id.clone(), s)).collect();
            st.diverged = false;
        }
    }

    fn persist(&self, st: &mut State, ops: &[Op]) -> bool {
        // A real duration for the metric, not logic: std's clock on purpose.
        let started = std::time::Instant::now();
        match self.store.apply(ops) {
            Ok(()) => {
                let c = &self.counters;
                c.commits.fetch_add(1, Ordering::Relaxed);
                c.commit_micros
                    .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                st.store_error = None;
                true
            }
            Err(e) => {
                warn!(target: LOG, reason = %e, "Saving replicated changes failed");
                st.store_error = Some(e.to_string());
                // Memory now holds changes the store does not: go back to what the store
                // holds, so digests show what is really saved and it is fetched again. If the
                // store cannot even be read, the next heartbeat tries again.
                st.diverged = true;
                self.reload(st);
                false
            }
        }
    }

    fn on_push(
        &self,
        from: usize,
        id: StreamId,
        prev: (u64, u64),
        header: Header,
        records: Vec<Record>,
        defer: Option<&mut Deferred>,
    ) {
        let mut st = self.lock();
        let sender_ok = if is_config(&id) {
            from == st.primary
        } else {
            true
        };
        let id_ok = st.peers[from - 1].node_id.is_none_or(|n| n == header.owner);
        let mine = st.streams.get(&id).map(|s| s.header).unwrap_or_default();
        if !sender_ok || !id_ok {
            drop(st);
            return self.reject(
                from,
                "push",
                &format!(
                    "Peer {from} is not the owner of {id} (the configuration primary is Peer {})",
                    self.primary()
                ),
            );
        }
        if header.generation < mine.generation {
            drop(st);
            return self.reject(
                from,
                "push",
                &format!(
                    "{id} generation {} is older than this peer's generation {}",
                    header.generation, mine.generation
                ),
            );
        }
        if prev != mine.position() {
            if header.position() > mine.position() && !st.fetching.contains_key(&id) {
                self.start_fetch(&mut st, from, &id, mine, false);
            }
            return;
        }
        let stream = st
            .streams
            .entry(id.clone())
            .or_insert_with(|| Stream::new(id.clone()));
        let applied = stream.apply(&records);
        stream.header.owner = header.owner;
        stream.header.generation = header.generation;
        stream.header.seq = header.seq;
        let hash_ok = stream.header.hash == header.hash;
        let ops = stream.store_ops(&records, false, self.keyring().as_deref());
        let ack = Message::Ack {
            stream: id.clone(),
            generation: header.generation,
            seq: header.seq,
        };
        if let Some(d) = defer {
            // Saved, acknowledged and reported with the rest of the batch.
            d.ops.extend(ops);
            self.note_hash(&mut st, &id, from, hash_ok);
            d.acks.push((from, ack));
            if !applied.is_empty() {
                d.applied.push((id, applied, from));
            }
            return;
        }
        if !self.persist(&mut st, &ops) {
            return;
        }
        self.note_hash(&mut st, &id, from, hash_ok);
        drop(st);
        self.send(from, &ack);
        if !applied.is_empty() {
            self.observer.applied(&id, &applied, Origin::Peer(from));
        }
    }

    fn note_hash(&self, st: &mut State, id: &StreamId, from: usize, hash_ok: bool) {
        if hash_ok {
            st.conflicts.remove(id);
        } else {
            let seq = st.streams.get(id).map(|s| s.header.seq).unwrap_or(0);
            warn!(target: LOG, stream = %id, peer = from, revision = seq,
                "Configuration differs from the primary's: run `causeway xcommand ForceConfigUpdate` on this peer");
            st.conflicts.insert(
                id.clone(),
                format!("{id} differs from Peer {from}'s at revision {seq}: run `causeway xcommand ForceConfigUpdate`"),
            );
        }
    }

    fn on_fetch(&self, from: usize, id: StreamId, generation: u64, after_seq: u64, snapshot: bool) {
        let st = self.lock();
        let empty = Stream::new(id.clone());
        let s = st.streams.get(&id).unwrap_or(&empty);
        let header = s.header;
        let range = !snapshot && generation == header.generation && after_seq <= header.seq;
        let (records, mut after) = if range {
            (s.since(after_seq), after_seq)
        } else {
            (s.snapshot(), 0)
        };
        drop(st);
        let mut chunks = records.chunks(RECORDS_PER_FRAME).peekable();
        let mut replace = !range;
        if chunks.peek().is_none() {
            return self.send(
                from,
                &Message::Records {
                    stream: id,
                    header,
                    replace,
                    after_seq: after,
                    upto: header.seq,
                    records: Vec::new(),
                },
            );
        }
        while let Some(chunk) = chunks.next() {
            let upto = if chunks.peek().is_none() {
                header.seq
            } else {
                chunk.last().map(|r| r.seq).unwrap_or(header.seq)
            };
            self.send(
                from,
                &Message::Records {
                    stream: id.clone(),
                    header,
                    replace,
                    after_seq: after,
                    upto,
                    records: chunk.to_vec(),
                },
            );
            replace = false;
            after = upto;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_records(
        &self,
        from: usize,
        id: StreamId,
        header: Header,
        replace: bool,
        after_seq: u64,
        upto: u64,
        records: Vec<Record>,
    ) {
        let mut st = self.lock();
        if st.fetching.get(&id).map(|f| f.from) != Some(from) {
            drop(st);
            return self.reject(
                from,
                "records",
                &format!("{id} was not asked of Peer {from}"),
            );
        }
        let mine = st.streams.get(&id).map(|s| s.header).unwrap_or_default();
        if header.generation < mine.generation && !replace {
            st.fetching.remove(&id);
            drop(st);
            return self.reject(
                from,
                "records",
                &format!(
                    "{id} generation {} is older than this peer's {}",
                    header.generation, mine.generation
                ),
            );
        }
        if !replace && mine.position() != (header.generation, after_seq) {
            // A stale answer (the stream moved meanwhile): the next digest asks again.
            st.fetching.remove(&id);
            return;
        }
        let stream = st
            .streams
            .entry(id.clone())
            .or_insert_with(|| Stream::new(id.clone()));
        let applied = if replace {
            let before: BTreeMap<String, Vec<u8>> = stream
                .entries()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect();
            stream.clear();
            stream.apply(&records);
            let mut diff: Vec<Applied> = Vec::new();
            for (k, old) in &before {
                let new = stream.get(k).map(<[u8]>::to_vec);
                if new.as_ref() != Some(old) {
                    diff.push(Applied {
                        key: k.clone(),
                        old: Some(old.clone()),
                        new,
                    });
                }
            }
            for (k, v) in stream.entries() {
                if !before.contains_key(k) {
                    diff.push(Applied {
                        key: k.to_string(),
                        old: None,
                        new: Some(v.to_vec()),
                    });
                }
            }
            diff
        } else {
            stream.apply(&records)
        };
        stream.header.owner = header.owner;
        stream.header.generation = header.generation;
        stream.header.seq = upto;
        let done = upto == header.seq;
        let hash_ok = stream.header.hash == header.hash;
        let ops = stream.store_ops(&records, replace, self.keyring().as_deref());
        if !self.persist(&mut st, &ops) {
            st.fetching.remove(&id);
            return;
        }
        if done {
            st.fetching.remove(&id);
            st.last_sync = Some(SystemTime::now());
            // Only the owner's copy is the reference for "differs" (20011).
            let from_owner = !is_config(&id) || from == st.primary;
            if from_owner {
                self.note_hash(&mut st, &id, from, hash_ok);
            }
            info!(target: LOG, peer = from, stream = %id, revision = upto,
                records = records.len(), "Synchronisation completed successfully");
        }
        let owner_peer = if is_config(&id) { st.primary } else { from };
        drop(st);
        if done && owner_peer != self.settings.self_index {
            self.send(
                owner_peer,
                &Message::Ack {
                    stream: id.clone(),
                    generation: header.generation,
                    seq: upto,
                },
            );
        }
        if !applied.is_empty() {
            self.observer.applied(&id, &applied, Origin::Peer(from));
        }
    }

    /// Writes changes to a stream this node owns, or, for the configuration on a
    /// subordinate, forwards them to the primary (EX-2). Answers once a majority holds the
    /// change, or after `ack_timeout` with how many do.
    pub async fn write(
        self: &Arc<Self>,
        stream: &StreamId,
        changes: Vec<Change>,
    ) -> Result<WriteOutcome, WriteError> {
        let primary = self.primary();
        if !is_config(stream) || primary == self.settings.self_index {
            return self.write_local(stream, changes, Origin::Local).await;
        }
        self.observer
            .validate(stream, &changes)
            .map_err(WriteError::Invalid)?;
        if !self.link.active_peers().contains(&primary) {
            return Err(WriteError::PrimaryUnreachable(primary));
        }
        // The primary waits up to ack_timeout for its majority; allow for that and the trip.
        let wait = self.settings.ack_timeout + Duration::from_secs(2);
        let request = ForwardRequest {
            stream: stream.clone(),
            changes,
        };
        let seq = match self
            .rpc
            .call(&forward_endpoint(), primary, &request, wait)
            .await
        {
            Ok(answer) => answer?,
            Err(CallError::Send { .. }) => return Err(WriteError::PrimaryUnreachable(primary)),
            Err(CallError::Timeout { .. }) => return Err(WriteError::NoAnswer(primary, wait)),
            Err(other) => return Err(WriteError::Invalid(other.to_string())),
        };
        // The primary answered after its majority; the change reaches this peer by push.
        let generation = self.header(stream).generation;
        let (confirmed, peers) = self.wait_majority(stream, generation, seq).await;
        Ok(WriteOutcome {
            generation,
            seq,
            confirmed,
            peers,
        })
    }

    async fn write_local(
        &self,
        id: &StreamId,
        changes: Vec<Change>,
        origin: Origin,
    ) -> Result<WriteOutcome, WriteError> {
        self.observer
            .validate(id, &changes)
            .map_err(WriteError::Invalid)?;
        if is_config(id) {
            self.wait_for_digests().await;
        }
        let (done, mut result) = oneshot::channel();
        self.pending_lock().push(PendingWrite {
            id: id.clone(),
            changes,
            origin,
            done,
        });
        // Group commit: whoever holds the committer lock commits every write queued so
        // far in one store transaction (one fsync); the others find theirs done.
        let header = loop {
            if let Ok(r) = result.try_recv() {
                break r?;
            }
            let _committer = self.committer.lock().await;
            if let Ok(r) = result.try_recv() {
                break r?;
            }
            // Let writers that are ready now join this commit. Under load (writes already
            // queued behind this one), wait a moment longer for more: every commit costs a
            // store transaction and a push to every peer, whatever its size.
            tokio::task::yield_now().await;
            if self.pending_lock().len() > 1 && !self.settings.gather.is_zero() {
                tokio::time::sleep(self.settings.gather).await;
            }
            self.commit_pending();
        };
        let (confirmed, peers) = self.wait_majority(id, header.generation, header.seq).await;
        Ok(WriteOutcome {
            generation: header.generation,
            seq: header.seq,
            confirmed,
            peers,
        })
    }

    fn pending_lock(&self) -> MutexGuard<'_, Vec<PendingWrite>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits every queued write: applied in queue order, persisted in one transaction,
    /// pushed as one frame per stream, then each writer told where its change landed.
    fn commit_pending(&self) {
        let batch = std::mem::take(&mut *self.pending_lock());
        if batch.is_empty() {
            return;
        }
        let active = self.link.active_peers();
        let keyring = self.keyring();
        let mut st = self.lock();
        let node_id = st.node_id;
        let me = self.settings.self_index;
        let mut ops = Vec::new();
        // Per stream: the position the batch continues from, where it ends, its records.
        type Batch = ((u64, u64), Header, Vec<Record>);
        let mut pushes: BTreeMap<StreamId, Batch> = BTreeMap::new();
        let mut results = Vec::with_capacity(batch.len());
        for w in batch {
            if is_config(&w.id) {
                if st.primary != me {
                    let e = WriteError::NotPrimary(st.primary);
                    results.push((w, Err(e)));
                    continue;
                }
                if st.takeover.is_some() || st.fetching.contains_key(&w.id) {
                    results.push((w, Err(WriteError::TakingOver(me))));
                    continue;
                }
            }
            let stream = st
                .streams
                .entry(w.id.clone())
                .or_insert_with(|| Stream::new(w.id.clone()));
            let prev = stream.header.position();
            let records: Vec<Record> = w
                .changes
                .iter()
                .enumerate()
                .map(|(i, c)| Record {
                    key: c.key.clone(),
                    value: c.value.clone(),
                    seq: prev.1 + 1 + i as u64,
                })
                .collect();
            let applied = stream.apply(&records);
            stream.header.owner = node_id;
            stream.header.seq = prev.1 + records.len() as u64;
            let header = stream.header;
            ops.extend(stream.store_ops(&records, false, keyring.as_deref()));
            let push = pushes
                .entry(w.id.clone())
                .or_insert_with(|| (prev, header, Vec::new()));
            push.1 = header;
            push.2.extend(records);
            results.push((w, Ok((header, applied))));
        }
        let saved = self.persist(&mut st, &ops);
        if saved {
            // Pushed under the lock: pushes of one stream leave in seq order.
            for (id, (prev, header, records)) in pushes {
                let push = Message::Push {
                    stream: id,
                    prev,
                    header,
                    records,
                }
                .encode();
                for p in &active {
                    self.link.send(*p, push.clone());
                }
                self.counters
                    .pushes_sent
                    .fetch_add(active.len() as u64, Ordering::Relaxed);
            }
        }
        let store_error = st.store_error.clone().unwrap_or_default();
        drop(st);
        for (w, result) in results {
            let answer = match result {
                Ok((header, applied)) if saved => {
                    if !applied.is_empty() {
                        self.observer.applied(&w.id, &applied, w.origin);
                    }
                    Ok(header)
                }
                Ok(_) => Err(WriteError::Store(store_error.clone())),
                Err(e) => Err(e),
            };
            let _ = w.done.send(answer);
        }
    }

    /// A primary that just started may have lost writes the peers hold (a store restored
    /// from a backup): before its first write it hears every reachable peer's digest, which
    /// starts that fetch, and waits for the fetch. Bounded by a few heartbeats.
    async fn wait_for_digests(&self) {
        let deadline = Instant::now() + self.settings.heartbeat * 5;
        let mut progress = self.progress.subscribe();
        loop {
            let active = self.link.active_peers();
            let ready = {
                let st = self.lock();
                active.iter().all(|p| st.peers[p - 1].last_digest.is_some())
                    && !st.fetching.contains_key(&config_stream())
            };
            if ready {
                return;
            }
            tokio::select! {
                _ = progress.changed() => {}
                _ = tokio::time::sleep(self.settings.heartbeat / 4) => {}
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// Waits until a majority (this node included) holds `(generation, seq)` of `id`, or
    /// `ack_timeout`. Returns how many do, of how many.
    /// How many peers (this one included) hold `id` at `position` or later.
    fn confirmed(&self, st: &State, id: &StreamId, position: (u64, u64)) -> usize {
        1 + st
            .peers
            .iter()
            .filter(|p| p.acked.get(id).is_some_and(|a| *a >= position))
            .count()
    }

    /// Wakes the writes of `id` that a majority now holds.
    fn wake_majority(&self, st: &mut State, id: &StreamId) {
        let need = self.settings.peer_count / 2;
        let Some(waiters) = st.majority_waiters.get_mut(id) else {
            return;
        };
        // The position held by at least `need` other peers: the need-th highest ack.
        let mut acks: Vec<(u64, u64)> = st
            .peers
            .iter()
            .map(|p| p.acked.get(id).copied().unwrap_or_default())
            .collect();
        acks.sort_unstable_by(|a, b| b.cmp(a));
        let Some(held) = need.checked_sub(1).and_then(|i| acks.get(i)).copied() else {
            return;
        };
        while let Some(entry) = waiters.first_entry() {
            if *entry.key() > held {
                break;
            }
            for tx in entry.remove() {
                let _ = tx.send(());
            }
        }
        if waiters.is_empty() {
            st.majority_waiters.remove(id);
        }
    }

    async fn wait_majority(&self, id: &StreamId, generation: u64, seq: u64) -> (usize, usize) {
        let peers = self.settings.peer_count;
        let deadline = Instant::now() + self.settings.ack_timeout;
        let position = (generation, seq);
        let woken = {
            let mut st = self.lock();
            let confirmed = self.confirmed(&st, id, position);
            if confirmed > peers / 2 {
                return (confirmed, peers);
            }
            let (tx, rx) = oneshot::channel();
            st.majority_waiters
                .entry(id.clone())
                .or_default()
                .entry(position)
                .or_default()
                .push(tx);
            rx
        };
        let _ = tokio::time::timeout_at(deadline, woken).await;
        let confirmed = self.confirmed(&self.lock(), id, position);
        (confirmed, peers)
    }

    /// EX-13: discard this subordinate's copy of the configuration and take the primary's.
    pub async fn force_config_update(&self) -> Result<Header, Refusal> {
        let id = config_stream();
        {
            let mut st = self.lock();
            let primary = st.primary;
            if primary == self.settings.self_index {
                return Err(Refusal::conflict("this peer is the configuration primary: ForceConfigUpdate runs on a subordinate"));
            }
            if !self.link.active_peers().contains(&primary) {
                return Err(Refusal::unavailable(format!(
                    "the configuration primary (Peer {primary}) is unreachable: run this again when it is back"
                )));
            }
            let mine = st.streams.get(&id).map(|s| s.header).unwrap_or_default();
            self.start_fetch(&mut st, primary, &id, mine, true);
        }
        let deadline = Instant::now() + self.settings.ack_timeout;
        let mut progress = self.progress.subscribe();
        loop {
            {
                let st = self.lock();
                if !st.fetching.contains_key(&id) {
                    let h = st.streams.get(&id).map(|s| s.header).unwrap_or_default();
                    return match st.conflicts.get(&id) {
                        None => Ok(h),
                        Some(c) => Err(Refusal::conflict(c.clone())),
                    };
                }
            }
            tokio::select! {
                _ = progress.changed() => {}
                _ = tokio::time::sleep(self.settings.heartbeat) => {}
                _ = tokio::time::sleep_until(deadline) => return Err(Refusal::timeout("the primary did not send its configuration in time; run this again")),
            }
        }
    }

    /// EX-7: make `primary` the configuration primary on every reachable peer. Returns the
    /// new epoch once the new primary has taken over, or says why it has not yet.
    pub async fn set_primary(self: &Arc<Self>, primary: usize) -> Result<u64, Refusal> {
        if primary == 0 || primary > self.settings.peer_count {
            return Err(Refusal::invalid(format!(
                "there is no Peer {primary}: the peer list has {} peers",
                self.settings.peer_count
            )));
        }
        let active = self.link.active_peers();
        let epoch = {
            let mut st = self.lock();
            let known = st.peers.iter().map(|p| p.epoch).max().unwrap_or(0);
            let gen = st
                .streams
                .get(&config_stream())
                .map(|s| s.header.generation)
                .unwrap_or(0);
            let epoch = st.epoch.max(known).max(gen) + 1;
            self.adopt_primary(&mut st, primary, epoch, self.settings.self_index);
            epoch
        };
        let msg = Message::SetPrimary {
            primary: primary as u16,
            epoch,
        };
        for p in &active {
            self.send(*p, &msg);
        }
        if primary != self.settings.self_index && !active.contains(&primary) {
            return Err(Refusal::unavailable(format!(
                "every reachable peer now follows Peer {primary}, which is unreachable: it takes over when it is back"
            )));
        }
        let deadline = Instant::now() + self.settings.ack_timeout;
        let mut progress = self.progress.subscribe();
        loop {
            let done = {
                let st = self.lock();
                if primary == self.settings.self_index {
                    st.takeover.is_none()
                } else {
                    st.peers[primary - 1]
                        .headers
                        .get(&config_stream())
                        .is_some_and(|h| h.generation >= epoch)
                        || st.peers[primary - 1].epoch > epoch
                }
            };
            if done {
                return Ok(epoch);
            }
            tokio::select! {
                _ = progress.changed() => {}
                _ = tokio::time::sleep(self.settings.heartbeat) => {}
                _ = tokio::time::sleep_until(deadline) => return Err(Refusal::timeout(format!("Peer {primary} has not finished taking over yet; check `causeway xstatus cluster`"))),
            }
        }
    }

    /// `(id, subject, reason)` of the replication alarms this node's state calls for.
    pub fn alarms(&self, settled: bool) -> Vec<(u32, String, String)> {
        let active = self.link.active_peers();
        let st = self.lock();
        let mut out = Vec::new();
        let grace = self.settings.heartbeat * 15;
        if let Some(e) = &st.store_error {
            out.push((20009, "store".to_string(), e.clone()));
        }
        for (id, why) in &st.conflicts {
            out.push((20011, id.to_string(), why.clone()));
        }
        if settled && st.primary != self.settings.self_index {
            if let Some(since) = st.primary_lost_since {
                if since.elapsed() >= grace {
                    out.push((
                        20016,
                        format!("Peer {}", st.primary),
                        format!(
                            "the configuration primary (Peer {}) is unreachable",
                            st.primary
                        ),
                    ));
                }
            }
        }
        for p in &active {
            let ps = &st.peers[p - 1];
            let quiet = match (ps.last_digest, ps.active_since) {
                (Some(t), _) => t.elapsed() >= grace,
                (None, Some(since)) => since.elapsed() >= grace,
                (None, None) => false,
            };
            if quiet {
                out.push((
                    20006,
                    format!("Peer {p}"),
                    format!("no replication digest from Peer {p} for {grace:?}"),
                ));
            }
            if ps
                .mismatch_since
                .is_some_and(|t| t.elapsed() >= self.settings.heartbeat * 5)
            {
                out.push((
                    20017,
                    format!("Peer {p}"),
                    format!(
                        "Peer {p} says the configuration primary is Peer {}, this peer says Peer {}: run `causeway xcommand SetPrimary <peer>` to settle it",
                        ps.primary, st.primary
                    ),
                ));
            }
        }
        out
    }

    pub fn counters(&self) -> &EngineCounters {
        &self.counters
    }

    pub fn status(&self) -> ReplicationStatus {
        let active = self.link.active_peers();
        let st = self.lock();
        let id = config_stream();
        let mine = st.streams.get(&id).map(|s| s.header).unwrap_or_default();
        let records = st.streams.get(&id).map(|s| s.live_len()).unwrap_or(0);
        let mut problems: Vec<String> = Vec::new();
        let mut peers = Vec::new();
        for (i, p) in st.peers.iter().enumerate() {
            let index = i + 1;
            if index == self.settings.self_index {
                continue;
            }
            let h = p.headers.get(&id).copied();
            let reachable = active.contains(&index);
            // An ack is newer than the last digest: a peer that acked the latest push is in
            // sync though its digest still shows the revision before.
            let acked = p.acked.get(&id).copied().unwrap_or_default();
            let state = match (reachable, p.last_digest.is_some(), h) {
                (false, _, _) => "Unreachable".to_string(),
                (true, false, _) => "No digest".to_string(),
                (true, true, h) => {
                    let h = h.unwrap_or_default();
                    if h.position() == mine.position() && h.hash != mine.hash {
                        "Differs".to_string()
                    } else if h.position() == mine.position() || acked == mine.position() {
                        "In sync".to_string()
                    } else if h.generation != mine.generation {
                        format!(
                            "Generation {} (this peer: {})",
                            h.generation, mine.generation
                        )
                    } else if h.seq < mine.seq {
                        format!("Behind by {}", mine.seq - h.seq)
                    } else {
                        format!("Ahead by {}", h.seq - mine.seq)
                    }
                }
            };
            if state != "In sync" {
                problems.push(format!("Peer {index}: {state}"));
            }
            peers.push(PeerReplication {
                index,
                revision: h.map(|h| h.seq),
                generation: h.map(|h| h.generation),
                digest: h.map(|h| h.short_hash()),
                primary: p.last_digest.map(|_| p.primary),
                state,
                last_digest_unix_ms: p.last_digest_wall.map(unix_ms),
            });
        }
        for why in st.conflicts.values() {
            problems.push(why.clone());
        }
        let database_status = if problems.is_empty() {
            "Active".to_string()
        } else {
            format!("Not synchronised ({})", problems.join("; "))
        };
        let last_check = st.last_check.map(unix_ms);
        ReplicationStatus {
            node_id: format!("{:016x}", st.node_id),
            primary: st.primary,
            epoch: st.epoch,
            database_status,
            revision: mine.seq,
            generation: mine.generation,
            digest: mine.short_hash(),
            records,
            peers,
            last_check_unix_ms: last_check,
            next_check_unix_ms: last_check.map(|t| t + self.settings.heartbeat.as_millis() as u64),
            last_synchronisation_unix_ms: st.last_sync.map(unix_ms),
            rejected_messages: st.rejected,
        }
    }
}
