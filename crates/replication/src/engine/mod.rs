//! The replication engine: streams kept in the store, pushed by their owner, checked by
//! digest every heartbeat, fetched when behind. See `docs/replication.md`.

use std::collections::{BTreeMap, HashMap};

use causeway_common::error::{ErrorCode, Refusal};
use causeway_mesh::rpc::{CallError, Endpoint, PeerSend, Rpc};
use causeway_mesh::SendError;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use causeway_store::{Op, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tracing::{info, warn};

mod primary;
mod receive;
mod saver;
mod status;
mod write;

pub use primary::config_stream;
use primary::{is_config, Takeover};
use saver::Saved;
pub use status::{EngineCounters, PeerReplication, ReplicationStatus};
pub use write::{forward_endpoint, ForwardRequest};
use write::{MajorityWaiters, PendingWrite, RpcOverLink};

use crate::keyring::Keyring;
use crate::stream::{Applied, Header, LoadError, NodeId, Record, Stream, StreamId};
use crate::wire::{Change, Message, RECORDS_PER_FRAME};

pub(crate) const META_TABLE: &str = "repl_meta";
const LOG: &str = "developer.replication";

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
    /// Under load (at least `COMMIT_SIBLINGS` writes in hand), commits start at most this
    /// often: the writes of one interval share one store transaction, one fsync and one
    /// push per peer, for at most this much more latency. A lone writer never waits.
    pub commit_interval: Duration,
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
            commit_interval: Duration::from_millis(10),
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
    /// The store could not be read back after a failed save: `tick` tries again.
    diverged: bool,
    /// Bumped by every reload from the store: batches queued before it are not saved
    /// (see `saver`).
    save_epoch: u64,
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
    /// Held by the writer committing; holds when the last commit started.
    committer: tokio::sync::Mutex<Option<Instant>>,
    /// Writes between their call and their answer (majority wait included).
    writes_in_hand: std::sync::atomic::AtomicUsize,
    /// Bumped on every ack or digest: writes waiting for a majority look again.
    progress: watch::Sender<u64>,
    counters: Arc<EngineCounters>,
    /// Saves the store operations in the order they were queued, off the runtime.
    saver: saver::Saver,
    /// This engine, for the completions of its saves.
    me: Weak<Engine>,
    /// Typed requests to peers, over the link: the forward of a subordinate's write.
    rpc: Arc<Rpc>,
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
            save_epoch: 0,
            rejected: 0,
            primary_lost_since: Some(now),
            last_check: None,
            last_sync: None,
            // The first report once the peers have had a few heartbeats to exchange
            // digests, so a restarted peer says where it stands soon, as the seed does.
            next_report: now + (settings.heartbeat * 25).min(settings.sync_report),
            majority_waiters: HashMap::new(),
        };
        let rpc = Rpc::new(Arc::new(RpcOverLink(link.clone())));
        let counters = Arc::new(EngineCounters::default());
        let saver = saver::Saver::start(store.clone(), counters.clone());
        let engine = Arc::new_cyclic(|me| Engine {
            settings,
            store,
            link,
            observer,
            state: Mutex::new(state),
            keyring: std::sync::RwLock::new(keyring),
            pending: Mutex::new(Vec::new()),
            committer: tokio::sync::Mutex::new(None),
            writes_in_hand: Default::default(),
            progress: watch::channel(0).0,
            counters,
            saver,
            me: me.clone(),
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
        // Behind every save queued so far (sealed with the old key), and before any later
        // one: the new key is in use once this returns.
        let (tx, rx) = std::sync::mpsc::channel();
        let ticket = self.save_then(&st, ops, move |_, saved| {
            let _ = tx.send(saved.clone());
        });
        *self.keyring.write().unwrap_or_else(|p| p.into_inner()) = Some(keyring);
        drop(st);
        ticket.finish();
        match rx.recv() {
            Ok(Saved::Ok) => Ok(records),
            Ok(Saved::Failed(e)) => Err(e),
            Ok(Saved::Skipped) | Err(_) => {
                Err("an earlier save failed; nothing was resealed".into())
            }
        }
    }

    /// Queues `ops` for the store behind every save queued before; `done` runs once they
    /// are saved (or not: it is told which). Call with the lock held (`st`), then
    /// `finish` the ticket after releasing it.
    fn save(&self, st: &State, ops: Vec<Op>, done: saver::Completion) -> saver::Ticket {
        self.saver.queue(st.save_epoch, ops, done)
    }

    /// Runs `then` on this engine once every save queued so far is on disk (not at all if
    /// one of them failed). Frames that describe the streams leave through here, so a
    /// peer is never told of a change this node has not saved.
    fn after_saves(
        &self,
        st: &State,
        then: impl FnOnce(&Arc<Engine>) + Send + 'static,
    ) -> saver::Ticket {
        let me = self.me.clone();
        self.save(
            st,
            Vec::new(),
            Box::new(move |saved: &Saved| {
                if let (Saved::Ok, Some(engine)) = (saved, me.upgrade()) {
                    then(&engine);
                }
            }),
        )
    }

    /// Queues `ops` like `save`. Once they are saved or not, notes how the store is doing
    /// (a failed save sends the engine back to what the store holds), then runs `then`,
    /// without the lock, with the outcome.
    fn save_then(
        &self,
        st: &State,
        ops: Vec<Op>,
        then: impl FnOnce(&Arc<Engine>, &Saved) + Send + 'static,
    ) -> saver::Ticket {
        let me = self.me.clone();
        self.save(
            st,
            ops,
            Box::new(move |saved: &Saved| {
                let Some(engine) = me.upgrade() else { return };
                engine.settle(&mut engine.lock(), saved);
                then(&engine, saved);
            }),
        )
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
        let takeover = self.drive_takeover(&mut st, &active);
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
        // A digest counts as an ack of every position in it: it leaves once they are saved.
        let sent = self.after_saves(&st, move |engine| {
            for p in active {
                engine.link.send(p, digest.clone());
            }
        });
        drop(st);
        if let Some(saved) = takeover {
            saved.finish();
        }
        sent.finish();
    }
}
