//! One pair instance on one node (docs/ha.md, sections 2–6): the member's state, its
//! heartbeats, and the loop that keeps the virtual IP exactly where the pair's lease is.
//!
//! The loop runs on every lease change, keeper report and every 10 ms. Its rules, first
//! match wins: the address is held only at the lease's generation (anything else releases
//! it at once); a holder extends the keeper's deadline after every confirmed round; a
//! member that may take over and has heard nobody hold for the failover wait asks the other
//! voters (pre-vote) and stands; the rest follows who holds.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use causeway_alarms::AlarmTable;
use causeway_cluster::HaMode;
use causeway_common::error::Refusal;
use causeway_consensus::Holder;

use crate::lease::PairLease;
use causeway_consensus::LeaderLease as _;
use causeway_mesh::rpc::Rpc;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::catalogue::*;
use crate::keeper::{to_monotonic, Keeper, Order, Report};
use crate::pair::{self, Beat, Handover, Members, PairSettings, Prevote};
use crate::transitions::{next, HaState, Side, Trigger};
use crate::vip::Vip;
use crate::LOG;

/// What a node is in one pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Role {
    Primary,
    Secondary,
    Witness,
}

impl Role {
    fn side(self) -> Option<Side> {
        match self {
            Role::Primary => Some(Side::Primary),
            Role::Secondary => Some(Side::Secondary),
            Role::Witness => None,
        }
    }

    pub fn seed_name(self) -> &'static str {
        match self {
            Role::Primary => "Primary",
            Role::Secondary => "Secondary",
            Role::Witness => "Witness",
        }
    }
}

/// Heartbeats are sent this often and a member is `Down` after this long without an answer.
const BEAT: Duration = Duration::from_millis(25);
const DOWN_AFTER: Duration = Duration::from_millis(150);
/// A secondary that has heard no holder since it started waits this long before it takes
/// over: at a cold start of the whole pair the primary stands first.
const START_GRACE: Duration = Duration::from_secs(5);
/// A failback that has not made the primary the holder by then has failed (row 17).
const FAILBACK_LIMIT: Duration = Duration::from_secs(5);
const EVENTS_KEPT: usize = 1000;
/// A member not in sync with a reachable holder for this long raises 21024.
const BEHIND_ALARM: Duration = Duration::from_secs(10);
/// 21026 clears this long after the last claim by another host.
const CONFLICT_QUIET: Duration = Duration::from_secs(30);

/// One line of the events log (the seed's Prime page).
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub description: String,
    pub generated_by: &'static str,
    pub at: SystemTime,
    pub remarks: String,
}

/// Heartbeat state of another member.
#[derive(Clone, Debug, Default)]
struct PeerBeat {
    last_answer: Option<Instant>,
    rtts: VecDeque<Duration>,
    ok_in_row: u32,
    up: bool,
    down_since: Option<Instant>,
    state: Option<HaState>,
    vip_at: Option<u64>,
    in_sync: bool,
    has_copy: bool,
}

struct Shared {
    state: HaState,
    /// The generation the keeper holds the address at (reported `Added`).
    vip_at: Option<u64>,
    /// The generation a `Hold` was last sent at, and its deadline.
    hold_sent: Option<(u64, Instant)>,
    generation: Option<u64>,
    beats: BTreeMap<usize, PeerBeat>,
    events: VecDeque<Event>,
    /// When the last move completed (failover, switchover, failback): the guard window.
    last_move: Option<Instant>,
    /// Stand as soon as the lease can be won: a handover, `ha failover`, `ha failback`.
    take_over: bool,
    /// This holder is handing the address over (since then): release and do not stand
    /// again until the peer holds, or the handover has failed.
    releasing: Option<Instant>,
    failback_started: Option<Instant>,
    /// Why the loop last did nothing, logged when it changes.
    idle_reason: String,
    moves: u64,
    sync: Sync,
    /// This member has held the address since it started.
    held_once: bool,
    /// The generation `on_promote` last ran for.
    promoted_at: Option<u64>,
    /// When another host last claimed the address while this node held it (21026).
    conflict_at: Option<Instant>,
}

/// The copy of the holder's files on the member that does not hold (HA-3).
#[derive(Clone, Debug, Default)]
struct Sync {
    /// A full pass with the current holder has completed and found nothing to do.
    in_sync: bool,
    /// During a pass: bytes to fetch and fetched.
    needed: u64,
    done: u64,
    files: usize,
    last_error: Option<String>,
    /// The seed's event is written once per synchronisation, not per pass.
    announced: bool,
    /// Not in sync with a reachable holder since then (alarm 21024).
    behind_since: Option<Instant>,
}

impl Sync {
    /// `floor(100 × received / total)`, at most 99 until the pass ends.
    fn percent(&self) -> u64 {
        if self.needed == 0 {
            return if self.in_sync { 100 } else { 0 };
        }
        (self.done * 100 / self.needed).min(99)
    }
}

/// What this node keeps for a pair, from its own `[ha]` section and data directory.
pub(crate) struct Local {
    /// The health-monitor interface the virtual IP is added on.
    pub interface: String,
    /// `DIR/ha/state-<pair>.json`: the last state, for `gethainfo` while the node is down.
    pub state_file: PathBuf,
    /// This program, run as `ha-keeper`.
    pub keeper_program: PathBuf,
    /// This node's copy of the pair's files (`[ha] files_dir`), if it keeps one.
    pub files_dir: Option<PathBuf>,
    /// Where this node takes direct-connect heartbeats for the pair (the cable's address).
    pub direct: Option<std::net::SocketAddr>,
    /// Operator commands after the address is added and after it is removed.
    pub on_promote: Option<PathBuf>,
    pub on_demote: Option<PathBuf>,
    /// A primary that lost its data takes it back from the secondary before it serves.
    pub recovery_mode: bool,
    /// The addresses this node's SIP service answers on (none: it runs no SIP).
    pub sip_addresses: Vec<std::net::IpAddr>,
}

pub struct Instance {
    pub role: Role,
    pub members: Members,
    me: usize,
    local: Local,
    lease: PairLease,
    rpc: Arc<Rpc>,
    alarms: Arc<AlarmTable>,
    settings: Mutex<Option<PairSettings>>,
    /// Started with no saved state: this primary may have lost its data.
    fresh: bool,
    /// In recovery mode and not recovered yet.
    recovering: std::sync::atomic::AtomicBool,
    /// The process group of an `on_promote` command still running.
    promoting: Mutex<Option<i32>>,
    /// The pair peer's direct-connect address (from `ha/hello`) and when it last answered.
    direct_peer: Mutex<(Option<std::net::SocketAddr>, Option<Instant>)>,
    scanner: crate::files::Scanner,
    shared: Mutex<Shared>,
    wake: Notify,
    started: Instant,
    cancel: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

impl Instance {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        role: Role,
        members: Members,
        me: usize,
        local: Local,
        lease: PairLease,
        rpc: Arc<Rpc>,
        alarms: Arc<AlarmTable>,
        settings: Option<PairSettings>,
    ) -> Arc<Self> {
        let fresh = role == Role::Primary && !local.state_file.exists();
        let recovering = role == Role::Primary
            && local.recovery_mode
            && !local.state_file.with_extension("recovered").exists();
        // The instance stands only when its own rules say so (stand_now), never on
        // openraft's timer: a member cut off from the holder alone must not raise its term.
        if let PairLease::Group(g) = &lease {
            g.set_eligible(false);
        }
        Arc::new(Self {
            role,
            members,
            me,
            local,
            lease,
            rpc,
            alarms,
            settings: Mutex::new(settings),
            fresh,
            recovering: std::sync::atomic::AtomicBool::new(recovering),
            promoting: Mutex::new(None),
            direct_peer: Mutex::new((None, None)),
            scanner: crate::files::Scanner::default(),
            shared: Mutex::new(Shared {
                state: HaState::GracefulShutdown,
                vip_at: None,
                hold_sent: None,
                generation: None,
                beats: BTreeMap::new(),
                events: VecDeque::new(),
                last_move: None,
                take_over: false,
                releasing: None,
                failback_started: None,
                idle_reason: String::new(),
                moves: 0,
                sync: Sync::default(),
                held_once: false,
                promoted_at: None,
                conflict_at: None,
            }),
            wake: Notify::new(),
            started: Instant::now(),
            cancel: CancellationToken::new(),
            tasks: tokio_util::task::TaskTracker::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn pair(&self) -> usize {
        self.members.primary
    }

    pub fn settings(&self) -> Option<PairSettings> {
        self.settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn set_settings(&self, s: PairSettings) {
        *self.settings.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
        self.wake.notify_one();
    }

    fn others(&self) -> Vec<usize> {
        self.members
            .voters()
            .into_iter()
            .filter(|&m| m != self.me)
            .collect()
    }

    /// The other member of the pair (for the witness: none).
    /// The other member of the pair (none for the witness, or a primary after `unpair`).
    pub(crate) fn pair_peer(&self) -> Option<usize> {
        match self.role {
            Role::Primary if self.members.secondary != 0 => Some(self.members.secondary),
            Role::Secondary => Some(self.members.primary),
            _ => None,
        }
    }

    /// The secondary holds the address (seen from either member).
    pub(crate) fn secondary_serves(&self) -> bool {
        match self.role {
            Role::Secondary => self.lease.state().is_mine(),
            _ => {
                matches!(self.lease.state().holder,
                Holder::Peer { peer, .. } if peer == self.members.secondary)
                    && self.silent_for() < DOWN_AFTER
            }
        }
    }

    /// This member does not know who holds the lease (its quiet start, an election).
    pub(crate) fn holder_unknown(&self) -> bool {
        matches!(self.lease.state().holder, Holder::Nobody)
    }

    fn vip(&self) -> Option<Vip> {
        self.settings().map(|s| Vip {
            interface: self.local.interface.clone(),
            address: s.vip,
            prefix: s.prefix,
        })
    }

    /// Adds a line to the events log (and the node's log).
    pub(crate) fn record(&self, description: &str, remarks: &str) {
        let mut sh = self.lock();
        self.event(&mut sh, description.to_string(), remarks.to_string());
    }

    pub fn state(&self) -> HaState {
        self.lock().state
    }

    fn event(&self, sh: &mut Shared, description: String, remarks: String) {
        info!(target: LOG, event = "HA event", pair = self.pair(), description = %description,
            remarks = %remarks, "");
        if sh.events.len() >= EVENTS_KEPT {
            sh.events.pop_front();
        }
        sh.events.push_back(Event {
            description,
            generated_by: self.role.seed_name(),
            at: SystemTime::now(),
            remarks,
        });
    }

    /// Moves the state by `trigger` when the table allows it; returns whether it moved.
    fn go(&self, sh: &mut Shared, trigger: Trigger) -> bool {
        let Some(side) = self.role.side() else {
            return false;
        };
        let Some((row, to)) = next(side, sh.state, trigger) else {
            return false;
        };
        if to == sh.state {
            return false;
        }
        let from = sh.state;
        sh.state = to;
        info!(target: LOG, event = "HA state changed", pair = self.pair(),
            from = from.seed_name(), to = to.seed_name(), trigger = ?trigger, row = row,
            generation = sh.generation.unwrap_or(0), "");
        let description = match to {
            HaState::PrimaryActive | HaState::SecondaryActive => "Active".to_string(),
            HaState::FailoverInvoked if side == Side::Primary => {
                "Failover invoked; shutting down primary instance".to_string()
            }
            HaState::FailoverInvoked => {
                "Failover invoked; starting application instance".to_string()
            }
            HaState::FailoverActive => "Instance is in failover active state".to_string(),
            HaState::FailbackActive => "Failback in progress; starting primary instance".into(),
            other => other.seed_name().to_string(),
        };
        self.event(
            sh,
            description,
            format!("{} → {}", from.seed_name(), to.seed_name()),
        );
        // A move is the address going to the other member; a holder that re-acquires after a
        // stall (row 10) has not moved it, and starts no guard window.
        if matches!(to, HaState::FailoverActive | HaState::FailbackComplete) {
            sh.last_move = Some(Instant::now());
            sh.moves += 1;
        }
        let _ = std::fs::write(
            &self.local.state_file,
            format!(
                "{{\"state\":\"{}\",\"at\":\"{}\"}}\n",
                to.seed_name(),
                causeway_common::time::iso8601(causeway_common::time::unix_ms_now())
            ),
        );
        true
    }

    /// Starts the loop and the heartbeats.
    pub(crate) fn start(self: &Arc<Self>) {
        self.serve();
        let me = self.clone();
        self.tasks.spawn(async move { me.heartbeats().await });
        if self.role != Role::Witness {
            let me = self.clone();
            self.tasks.spawn(async move { me.run().await });
            let me = self.clone();
            self.tasks.spawn(async move { me.copy_files().await });
            if let Some(local) = self.local.direct {
                let me = self.clone();
                self.tasks
                    .spawn(async move { me.direct_beats(local).await });
            }
        }
    }

    pub(crate) async fn stop(&self) {
        self.cancel.cancel();
        for path in [
            pair::heartbeat(self.pair()).path().to_string(),
            pair::prevote(self.pair()).path().to_string(),
            pair::handover(self.pair()).path().to_string(),
            crate::files::index(self.pair()).path().to_string(),
            crate::files::chunk(self.pair()).path().to_string(),
        ] {
            self.rpc.unserve(&path);
        }
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.tasks.wait()).await;
        self.lease.shutdown().await;
    }

    fn serve(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        self.rpc
            .serve(&pair::heartbeat(self.pair()), move |from, beat: Beat| {
                let answer = me.upgrade().map(|i| {
                    if Some(from) == i.pair_peer() {
                        i.lease.observe_peer(beat.vip_at);
                    }
                    let sh = i.lock();
                    Beat {
                        seq: beat.seq,
                        state: i.role.side().map(|_| sh.state),
                        vip_at: sh.vip_at,
                        in_sync: sh.sync.in_sync,
                        has_copy: sh.sync.files > 0,
                    }
                });
                async move { answer.ok_or_else(|| "stopping".to_string()) }
            });
        let me = Arc::downgrade(self);
        self.rpc
            .serve(&pair::prevote(self.pair()), move |from, p: Prevote| {
                let answer = match me.upgrade() {
                    Some(i) => i.answer_prevote(from, p),
                    None => Err("stopping".to_string()),
                };
                async move { answer }
            });
        let me = Arc::downgrade(self);
        self.rpc.serve(
            &crate::files::index(self.pair()),
            move |_from, req: crate::files::IndexRequest| {
                let answer = match me.upgrade() {
                    Some(i)
                        if !(i.lease.state().is_mine()
                            || (req.recovery && i.role == Role::Secondary)) =>
                    {
                        Err("this member does not hold the pair's lease".to_string())
                    }
                    Some(i) => match &i.local.files_dir {
                        Some(dir) => i.scanner.scan(dir),
                        None => Ok(vec![]),
                    },
                    None => Err("stopping".to_string()),
                };
                async move { answer }
            },
        );
        let me = Arc::downgrade(self);
        self.rpc.serve(
            &crate::files::chunk(self.pair()),
            move |_from, req: crate::files::ChunkRequest| {
                let answer = match me.upgrade() {
                    Some(i) => match &i.local.files_dir {
                        Some(dir) => crate::files::read_chunk(dir, &req),
                        None => Err("this member keeps no files directory".to_string()),
                    },
                    None => Err("stopping".to_string()),
                };
                async move { answer }
            },
        );
        let me = Arc::downgrade(self);
        self.rpc
            .serve(&pair::handover(self.pair()), move |from, h: Handover| {
                let me = me.clone();
                async move {
                    match me.upgrade() {
                        Some(i) => i.answer_handover(from, h).await,
                        None => Err("stopping".to_string()),
                    }
                }
            });
    }

    /// How long this member has not heard a holder (since it started, if never).
    fn silent_for(&self) -> Duration {
        let heard = self.lease.last_heard_holder().unwrap_or(self.started);
        Instant::now().saturating_duration_since(heard)
    }

    fn answer_prevote(&self, from: usize, p: Prevote) -> Result<(), String> {
        if self.lease.state().is_mine() {
            return Err("this member holds the lease".into());
        }
        let wait = Duration::from_millis(p.failover_wait_ms.saturating_sub(20));
        let silent = self.silent_for();
        if silent < wait {
            return Err(format!("heard the holder {} ms ago", silent.as_millis()));
        }
        info!(target: LOG, event = "HA pre-vote granted", pair = self.pair(), candidate = from,
            silent_ms = silent.as_millis() as u64, "");
        Ok(())
    }

    async fn answer_handover(&self, from: usize, h: Handover) -> Result<String, String> {
        if Some(from) != self.pair_peer() {
            return Err(format!(
                "Peer {from} is not the other member of pair {}",
                self.pair()
            ));
        }
        match h {
            Handover::Take => {
                let mut sh = self.lock();
                sh.take_over = true;
                sh.releasing = None;
                self.go(&mut sh, Trigger::TakeOver);
                drop(sh);
                self.wake.notify_one();
                Ok("taking over".into())
            }
            Handover::GiveBack { force } => {
                self.check_guard(force).map_err(|r| r.message)?;
                if !self.lease.state().is_mine() {
                    return Err("this member does not hold the virtual IP".into());
                }
                let mut sh = self.lock();
                sh.releasing = Some(Instant::now());
                match self.role {
                    Role::Secondary => {
                        self.go(&mut sh, Trigger::FailbackAccepted);
                    }
                    _ => {
                        self.go(&mut sh, Trigger::LostLease);
                    }
                }
                drop(sh);
                self.wake.notify_one();
                Ok("releasing".into())
            }
        }
    }

    fn check_guard(&self, force: bool) -> Result<(), Refusal> {
        let guard = Duration::from_secs(self.settings().map_or(300, |s| s.guard_window_s));
        if let Some(at) = self.lock().last_move {
            let ago = at.elapsed();
            if ago < guard && !force {
                return Err(Refusal::conflict(format!(
                        "the last move was {} s ago and the guard window is {} s: use --force to move back now",
                        ago.as_secs(),
                        guard.as_secs()
                    ),
                ));
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- heartbeats

    async fn heartbeats(self: Arc<Self>) {
        let mut seq = 0u64;
        let mut tick = tokio::time::interval(BEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            seq += 1;
            for peer in self.others() {
                let me = self.clone();
                tokio::spawn(async move {
                    let beat = {
                        let sh = me.lock();
                        Beat {
                            seq,
                            state: me.role.side().map(|_| sh.state),
                            vip_at: sh.vip_at,
                            in_sync: sh.sync.in_sync,
                            has_copy: sh.sync.files > 0,
                        }
                    };
                    let sent = Instant::now();
                    let answer = me
                        .rpc
                        .call(&pair::heartbeat(me.pair()), peer, &beat, DOWN_AFTER)
                        .await;
                    let mut sh = me.lock();
                    let b = sh.beats.entry(peer).or_default();
                    if let Ok(a) = answer {
                        b.last_answer = Some(Instant::now());
                        if b.rtts.len() >= 40 {
                            b.rtts.pop_front();
                        }
                        b.rtts.push_back(sent.elapsed());
                        b.ok_in_row += 1;
                        b.state = a.state;
                        b.vip_at = a.vip_at;
                        b.in_sync = a.in_sync;
                        b.has_copy = a.has_copy;
                        if Some(peer) == me.pair_peer() {
                            me.lease.observe_peer(a.vip_at);
                        }
                    } else {
                        b.ok_in_row = 0;
                    }
                });
            }
            self.judge_beats();
        }
    }

    /// Up/Down per member and the alarms that follow them.
    fn judge_beats(&self) {
        let now = Instant::now();
        let mut sh = self.lock();
        let mut changes = vec![];
        for (&peer, b) in sh.beats.iter_mut() {
            let fresh = b
                .last_answer
                .is_some_and(|t| now.saturating_duration_since(t) < DOWN_AFTER);
            let up = if b.up {
                fresh
            } else {
                fresh && b.ok_in_row >= 3
            };
            if up != b.up {
                b.up = up;
                b.down_since = (!up).then_some(now);
                changes.push((peer, up));
            }
            if !up && b.down_since.is_none() {
                b.down_since = Some(self.started);
            }
        }
        for (peer, up) in changes {
            let who = if Some(peer) == self.pair_peer() {
                "pair peer"
            } else {
                "witness"
            };
            let text = if up { "Heartbeat up" } else { "Heartbeat down" };
            self.event(&mut sh, format!("{text}: Peer {peer}"), who.to_string());
        }
        let down_long = |b: &PeerBeat| {
            b.down_since
                .is_some_and(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        };
        let subject = format!("pair {}", self.pair());
        if let Some(p) = self.pair_peer() {
            match sh.beats.get(&p) {
                Some(b) if !down_long(b) => {
                    self.alarms.lower(HEARTBEAT_LOST, &subject);
                }
                _ if self.started.elapsed() >= Duration::from_secs(1) => {
                    self.alarms.raise(
                        HEARTBEAT_LOST,
                        &subject,
                        &format!("Peer {p} has not answered heartbeats for a second"),
                    );
                }
                _ => {}
            }
            let both =
                sh.vip_at.is_some() && sh.beats.get(&p).is_some_and(|b| b.up && b.vip_at.is_some());
            if sh
                .conflict_at
                .is_some_and(|t| t.elapsed() >= CONFLICT_QUIET)
            {
                sh.conflict_at = None;
                self.alarms.lower(ADDRESS_CONFLICT, &subject);
            }
            if both {
                self.alarms.raise(
                    TWO_HOLDERS,
                    &subject,
                    &format!("this node and Peer {p} both report the virtual IP"),
                );
            } else {
                self.alarms.lower(TWO_HOLDERS, &subject);
            }
            let w = self.members.witness;
            match sh.beats.get(&w) {
                // No witness, or the whole cluster: nobody to name.
                _ if w == 0 || w == pair::CLUSTER_WITNESS => {}
                Some(b) if !down_long(b) => {
                    self.alarms.lower(WITNESS_UNREACHABLE, &subject);
                }
                _ if self.started.elapsed() >= Duration::from_secs(1) => {
                    self.alarms.raise(
                        WITNESS_UNREACHABLE,
                        &subject,
                        &format!("the witness, Peer {w}, has not answered for a second"),
                    );
                }
                _ => {}
            }
        }
    }

    // ---------------------------------------------------------------- direct connect

    pub(crate) fn direct_local(&self) -> Option<std::net::SocketAddr> {
        self.local.direct
    }

    pub(crate) fn set_direct_peer(&self, addr: Option<std::net::SocketAddr>) {
        let mut d = self.direct_peer.lock().unwrap_or_else(|p| p.into_inner());
        if d.0 != addr {
            *d = (addr, None);
        }
    }

    /// The direct path answered within the heartbeat's Down time.
    fn direct_up(&self) -> bool {
        self.direct_peer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .is_some_and(|t| t.elapsed() < DOWN_AFTER)
    }

    /// Heartbeats over the cable: a ping every 25 ms to the peer's direct address, a pong for
    /// each ping from it. Frames from any other address, or not ours, are dropped.
    async fn direct_beats(self: Arc<Self>, local: std::net::SocketAddr) {
        let sock = match tokio::net::UdpSocket::bind(local).await {
            Ok(s) => s,
            Err(e) => {
                warn!(target: LOG, event = "HA direct connect not started", pair = self.pair(),
                    address = %local, reason = %e, "");
                return;
            }
        };
        let pair = self.pair() as u16;
        let mut tick = tokio::time::interval(BEAT);
        let mut buf = [0u8; 64];
        let (mut seq, mut was_up_alone) = (0u64, false);
        loop {
            let peer = self.direct_peer.lock().unwrap_or_else(|p| p.into_inner()).0;
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {
                    seq += 1;
                    if let Some(peer) = peer {
                        let _ = sock.send_to(&pair::direct_frame(pair::DIRECT_PING, pair, seq), peer).await;
                    }
                    // An event when only the cable still answers (the HM network is down).
                    let mesh_up = self.pair_peer().is_some_and(|p| self.lock().beats.get(&p).is_some_and(|b| b.up));
                    let alone = self.direct_up() && !mesh_up;
                    if alone != was_up_alone {
                        was_up_alone = alone;
                        let mut sh = self.lock();
                        let text = if alone { "Heartbeats answered on the direct connect path only" } else { "Heartbeats answered on the health-monitor network again" };
                        self.event(&mut sh, text.into(), String::new());
                    }
                }
                r = sock.recv_from(&mut buf) => {
                    let Ok((n, from)) = r else { continue };
                    if Some(from) != peer {
                        continue;
                    }
                    match pair::parse_direct(&buf[..n]) {
                        Some((pair::DIRECT_PING, p, s)) if p == pair => {
                            let _ = sock.send_to(&pair::direct_frame(pair::DIRECT_PONG, pair, s), from).await;
                        }
                        Some((pair::DIRECT_PONG, p, _)) if p == pair => {
                            self.direct_peer.lock().unwrap_or_else(|p| p.into_inner()).1 = Some(Instant::now());
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    // ---------------------------------------------------------------- files

    /// Every second, on the member that does not hold: one pass that makes this node's
    /// files directory equal the holder's.
    async fn copy_files(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut holder_seen: Option<u64> = None;
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let recovering = self.recovering.load(std::sync::atomic::Ordering::Relaxed);
            let (peer, generation) = match (self.lease.state().holder, self.pair_peer()) {
                (Holder::Peer { peer, generation }, Some(p))
                    if peer == p && self.silent_for() < Duration::from_secs(1) =>
                {
                    (peer, generation)
                }
                // Recovery: the secondary's copy is the truth, whoever holds (generation 0
                // stands for "no holder").
                (_, Some(p)) if recovering && self.lock().beats.get(&p).is_some_and(|b| b.up) => {
                    (p, 0)
                }
                (Holder::Me { .. }, _) => {
                    // The holder's own files are the truth.
                    let mut sh = self.lock();
                    sh.sync.in_sync = true;
                    sh.sync.needed = 0;
                    continue;
                }
                _ => continue,
            };
            if holder_seen != Some(generation) {
                // A new holder: in sync again only after a pass against it.
                holder_seen = Some(generation);
                let mut sh = self.lock();
                sh.sync.in_sync = false;
                sh.sync.announced = false;
            }
            let result = self.copy_pass(peer).await;
            let mut sh = self.lock();
            match result {
                Ok(files) => {
                    sh.sync.files = files;
                    sh.sync.needed = 0;
                    sh.sync.done = 0;
                    sh.sync.last_error = None;
                    if !sh.sync.in_sync {
                        sh.sync.in_sync = true;
                        self.event(
                            &mut sh,
                            "Primary and secondary server synchronization completed".into(),
                            format!("{files} files"),
                        );
                    }
                    if recovering {
                        self.recovering
                            .store(false, std::sync::atomic::Ordering::Relaxed);
                        // Once per data directory: the flag in the node file is then spent.
                        let _ =
                            std::fs::write(self.local.state_file.with_extension("recovered"), b"");
                        self.event(
                            &mut sh,
                            format!(
                                "Recovery completed: {files} files restored from the secondary"
                            ),
                            "ha.recovery_mode can be set back to false".into(),
                        );
                    }
                }
                Err(e) => {
                    if sh.sync.last_error.as_deref() != Some(e.as_str()) {
                        warn!(target: LOG, event = "HA files not copied", pair = self.pair(), reason = %e, "");
                    }
                    sh.sync.last_error = Some(e);
                }
            }
            // 21024: behind the holder for 10 s, or a file that cannot be copied at all.
            let subject = format!("pair {}", self.pair());
            let over_caps = sh
                .sync
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("over the 256 MiB") || e.contains("passes 4 GiB"));
            if sh.sync.in_sync && !over_caps {
                sh.sync.behind_since = None;
                self.alarms.lower(REPLICATION_BEHIND, &subject);
            } else {
                let since = *sh.sync.behind_since.get_or_insert(Instant::now());
                if over_caps || since.elapsed() >= BEHIND_ALARM {
                    let why = sh.sync.last_error.clone().unwrap_or_else(|| {
                        format!(
                            "{}% of the holder's files copied after {} s",
                            sh.sync.percent(),
                            since.elapsed().as_secs()
                        )
                    });
                    self.alarms.raise(REPLICATION_BEHIND, &subject, &why);
                }
            }
        }
    }

    /// One pass: the holder's index, what differs, fetched chunk by chunk.
    async fn copy_pass(&self, peer: usize) -> Result<usize, String> {
        let Some(dir) = self.local.files_dir.clone() else {
            return Ok(0);
        };
        let remote = self
            .rpc
            .call(
                &crate::files::index(self.pair()),
                peer,
                &crate::files::IndexRequest {
                    recovery: self.recovering.load(std::sync::atomic::Ordering::Relaxed),
                },
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| e.to_string())?;
        let local = {
            let (scanner, dir) = (&self.scanner, dir.clone());
            scanner.scan(&dir)?
        };
        let (fetch, delete) = crate::files::plan(&remote, &local);
        let needed: u64 = fetch.iter().map(|f| f.size).sum();
        if !fetch.is_empty() {
            let mut sh = self.lock();
            sh.sync.needed = needed.max(1);
            sh.sync.done = 0;
            if !sh.sync.announced && !sh.sync.in_sync {
                sh.sync.announced = true;
                self.event(
                    &mut sh,
                    "Primary and secondary server synchronization in progress".into(),
                    format!("{} files, {needed} bytes", fetch.len()),
                );
            }
        }
        for f in &fetch {
            crate::files::safe_relative(&f.path)?;
            let mut bytes = Vec::with_capacity(f.size as usize);
            while (bytes.len() as u64) < f.size {
                let req = crate::files::ChunkRequest {
                    path: f.path.clone(),
                    offset: bytes.len() as u64,
                };
                let part = self
                    .rpc
                    .call(
                        &crate::files::chunk(self.pair()),
                        peer,
                        &req,
                        Duration::from_secs(10),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                if part.is_empty() {
                    return Err(format!("{} shrank while it was copied", f.path));
                }
                bytes.extend_from_slice(&part);
                self.lock().sync.done += part.len() as u64;
            }
            bytes.truncate(f.size as usize);
            // A file that changed while it was copied is fetched again at the next pass.
            if crate::files::sha256_hex(&bytes) != f.sha256 {
                return Err(format!("{} changed while it was copied", f.path));
            }
            crate::files::install(&dir, f, &bytes)?;
        }
        for p in &delete {
            crate::files::remove(&dir, p)?;
        }
        Ok(remote.len())
    }

    // ---------------------------------------------------------------- the loop

    async fn run(self: Arc<Self>) {
        let mut lease = self.lease.watch();
        let mut hold = self.lease.hold();
        let mut keeper: Option<Keeper> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The keeper is started once the address is known, and again if it died.
            if keeper.is_none() {
                if let Some(vip) = self.vip() {
                    match Keeper::spawn(&self.local.keeper_program, &vip).await {
                        Ok(k) => {
                            info!(target: LOG, event = "HA address keeper started", pair = self.pair(),
                                pid = k.pid().unwrap_or(0), vip = %vip, "");
                            let sip = &self.local.sip_addresses;
                            if !sip.is_empty() && !sip.contains(&vip.address) {
                                // Found only now: a secondary learns a primary's address
                                // from its hello, not from its own node file.
                                warn!(target: LOG, event = "SIP does not answer on the virtual IP",
                                    pair = self.pair(), vip = %vip.address,
                                    detail = "add it to sip.also_listen in the node file and restart", "");
                            }
                            keeper = Some(k);
                        }
                        Err(e) => {
                            self.alarms.raise(
                                CANNOT_MOVE,
                                &format!("pair {}", self.pair()),
                                &format!("starting the address keeper failed: {e}"),
                            );
                        }
                    }
                }
            }
            let report = async {
                match keeper.as_mut() {
                    Some(k) => k.reports.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = lease.changed() => {}
                _ = hold.changed() => {}
                _ = self.wake.notified() => {}
                _ = tick.tick() => {}
                r = report => match r {
                    Some(r) => self.on_report(r),
                    None => {
                        warn!(target: LOG, event = "HA address keeper stopped", pair = self.pair(), "");
                        keeper = None;
                        self.lock().vip_at = None;
                        self.lease.resign();
                        continue;
                    }
                },
            }
            self.step(&mut keeper).await;
        }
        // Stopping (row 18): the address goes first, then the lease; a holder then hands
        // over, so the peer stands at once instead of after the failover wait.
        let g = self.lock().generation.unwrap_or(0);
        let held = self.lease.state().is_mine();
        if let Some(mut k) = keeper {
            let _ = k.send(Order::Release { generation: g }).await;
            k.stop().await;
        }
        self.lease.resign();
        if let (true, Some(peer)) = (held, self.pair_peer()) {
            let _ = self
                .rpc
                .call(
                    &pair::handover(self.pair()),
                    peer,
                    &Handover::Take,
                    Duration::from_millis(200),
                )
                .await;
        }
        let mut sh = self.lock();
        sh.vip_at = None;
        self.go(&mut sh, Trigger::Shutdown);
    }

    fn on_report(&self, r: Report) {
        let subject = format!("pair {}", self.pair());
        let mut sh = self.lock();
        match r {
            Report::Added { generation } => {
                sh.vip_at = Some(generation);
                self.alarms.lower(CANNOT_MOVE, &subject);
                let vip = self.vip().map(|v| v.to_string()).unwrap_or_default();
                self.event(
                    &mut sh,
                    format!("Virtual IP {vip} added (generation {generation})"),
                    String::new(),
                );
            }
            Report::Removed {
                generation,
                expired,
            } => {
                sh.vip_at = None;
                sh.hold_sent = None;
                self.notify(false, sh.state, generation);
                let vip = self.vip().map(|v| v.to_string()).unwrap_or_default();
                let why = if expired {
                    "the hold ran out"
                } else {
                    "released"
                };
                self.event(
                    &mut sh,
                    format!("Virtual IP {vip} removed (generation {generation})"),
                    why.to_string(),
                );
            }
            Report::Failed { reason } => {
                self.alarms.raise(CANNOT_MOVE, &subject, &reason);
                warn!(target: LOG, event = "HA address keeper failed", pair = self.pair(), reason = %reason, "");
            }
            Report::Refused { reason } => {
                sh.hold_sent = None;
                info!(target: LOG, event = "HA hold refused", pair = self.pair(), reason = %reason, "");
            }
            Report::Ready { removed_leftover } => {
                if removed_leftover {
                    self.event(
                        &mut sh,
                        "Virtual IP left by an earlier run removed".into(),
                        String::new(),
                    );
                }
            }
            Report::Announced { .. } => {}
            Report::Conflict { mac } => {
                let vip = self
                    .vip()
                    .map(|v| v.address.to_string())
                    .unwrap_or_default();
                if sh.conflict_at.is_none() {
                    warn!(target: LOG, event = "HA virtual IP in use by another host", pair = self.pair(),
                        vip = %vip, mac = %mac, "");
                }
                sh.conflict_at = Some(Instant::now());
                self.alarms.raise(
                    ADDRESS_CONFLICT,
                    &subject,
                    &format!("the host with MAC {mac} claims {vip}, which this node holds"),
                );
            }
        }
    }

    /// Runs `on_promote` after the address was added, `on_demote` after it was removed
    /// (docs/ha.md, section 7), like keepalived's notify scripts: never awaited here, in
    /// its own process group, killed with its group after 10 s; a promotion command still
    /// running at demotion is killed first.
    fn notify(&self, promote: bool, state: HaState, generation: u64) {
        use nix::sys::signal::{killpg, Signal};
        let mut running = self.promoting.lock().unwrap_or_else(|p| p.into_inner());
        if !promote {
            if let Some(pgid) = running.take() {
                let _ = killpg(nix::unistd::Pid::from_raw(pgid), Signal::SIGKILL);
            }
        }
        let program = if promote {
            &self.local.on_promote
        } else {
            &self.local.on_demote
        };
        let Some(program) = program.clone() else {
            return;
        };
        let vip = self
            .settings()
            .map(|s| s.vip.to_string())
            .unwrap_or_default();
        let pair = self.pair().to_string();
        let spawned = tokio::process::Command::new(&program)
            .args([&pair, state.seed_name(), &vip, &generation.to_string()])
            .env("CAUSEWAY_HA_PAIR", &pair)
            .env("CAUSEWAY_HA_STATE", state.seed_name())
            .env("CAUSEWAY_HA_VIP", &vip)
            .env("CAUSEWAY_HA_GENERATION", generation.to_string())
            .env(
                "CAUSEWAY_HA_EVENT",
                if promote { "promote" } else { "demote" },
            )
            .env(
                "CAUSEWAY_HA_FILES",
                self.local
                    .files_dir
                    .as_ref()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default(),
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(false)
            .process_group(0)
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                warn!(target: LOG, event = "HA notify command failed", pair = self.pair(),
                    command = %program.display(), reason = %e, "");
                return;
            }
        };
        let pgid = child.id().map(|p| p as i32);
        if promote {
            *running = pgid;
        }
        let (pair, what) = (
            self.pair(),
            if promote { "on_promote" } else { "on_demote" },
        );
        tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(10), child.wait_with_output()).await {
                Ok(Ok(out)) => {
                    let text = format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout).trim(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                    info!(target: LOG, event = "HA notify command ended", pair = pair, command = what,
                        status = %out.status, output = %text, "");
                }
                Ok(Err(e)) => warn!(target: LOG, event = "HA notify command failed", pair = pair,
                    command = what, reason = %e, ""),
                Err(_) => {
                    if let Some(pgid) = pgid {
                        let _ = killpg(nix::unistd::Pid::from_raw(pgid), Signal::SIGKILL);
                    }
                    warn!(target: LOG, event = "HA notify command killed", pair = pair, command = what,
                        reason = "still running after 10 s", "");
                }
            }
        });
    }

    async fn step(&self, keeper: &mut Option<Keeper>) {
        let lease = self.lease.state().holder;
        let hold = *self.lease.hold().borrow();
        let now = Instant::now();
        let settings = self.settings();
        let mut orders = vec![];
        let mut stand = false;
        let mut tell_peer: Option<Handover> = None;
        {
            let mut sh = self.lock();
            let sh = &mut *sh;
            let holding = match (lease, hold) {
                (Holder::Me { generation }, Some((g, until)))
                    if g == generation && sh.releasing.is_none() =>
                {
                    sh.generation = Some(g);
                    if sh.hold_sent.is_none_or(|(hg, hu)| hg != g || hu != until) {
                        orders.push(Order::Hold {
                            generation: g,
                            until_ns: to_monotonic(until),
                        });
                        sh.hold_sent = Some((g, until));
                    }
                    true
                }
                _ => false,
            };
            if !holding {
                // Rule 1: the address is never held without the lease at its generation.
                if sh.hold_sent.is_some() || sh.vip_at.is_some() {
                    let g = sh.hold_sent.map(|(g, _)| g).or(sh.vip_at).unwrap_or(0);
                    orders.push(Order::Release { generation: g });
                    sh.hold_sent = None;
                }
                if sh.state.holds_address(self.side()) {
                    if sh.state == HaState::FailbackActive {
                        // The secondary's final step of a failback (row 14).
                        self.go(sh, Trigger::Released);
                    } else {
                        self.go(sh, Trigger::LostLease);
                    }
                }
                if sh.releasing.is_some() && matches!(lease, Holder::Me { .. }) {
                    // Released: now let the lease go, so the peer can win it.
                    self.lease.resign();
                }
            }
            if holding && sh.vip_at == sh.generation {
                self.on_holding(sh);
            }
            if !holding {
                self.follow(sh, lease, &settings, now, &mut stand, &mut tell_peer);
            }
        }
        if let Some(k) = keeper.as_mut() {
            for o in orders {
                if let Err(e) = k.send(o).await {
                    warn!(target: LOG, event = "HA address keeper unreachable", pair = self.pair(), reason = %e, "");
                }
            }
        }
        if let Some(h) = tell_peer {
            if let Some(peer) = self.pair_peer() {
                let r = self
                    .rpc
                    .call(
                        &pair::handover(self.pair()),
                        peer,
                        &h,
                        Duration::from_millis(200),
                    )
                    .await;
                if let Err(e) = r {
                    info!(target: LOG, event = "HA handover not taken", pair = self.pair(), reason = %e, "");
                }
            }
        }
        if stand {
            self.stand(&settings).await;
        }
    }

    fn side(&self) -> Side {
        self.role.side().unwrap_or(Side::Primary)
    }

    /// Holding the lease with the address on: the states of rows 1, 7, 10, 15.
    fn on_holding(&self, sh: &mut Shared) {
        sh.held_once = true;
        sh.take_over = false;
        sh.failback_started = None;
        let subject = format!("pair {}", self.pair());
        self.alarms.lower(MANUAL_FAILOVER, &subject);
        match (self.role, sh.state) {
            (Role::Primary, HaState::FailoverInvoked) => {
                self.go(sh, Trigger::Reacquired);
            }
            (Role::Secondary, HaState::SecondaryActive | HaState::SecondaryAlone) => {
                self.go(sh, Trigger::TakeOver);
                self.go(sh, Trigger::Holding);
            }
            _ => {
                self.go(sh, Trigger::Holding);
            }
        }
        if self.role == Role::Primary && sh.state == HaState::FailbackComplete {
            // No instance streams to realign yet: complete once the secondary is back.
            if sh.beats.get(&self.members.secondary).is_some_and(|b| {
                matches!(
                    b.state,
                    Some(HaState::SecondaryActive | HaState::SecondaryAlone)
                )
            }) {
                self.go(sh, Trigger::InSync);
            }
        }
        if sh.promoted_at != sh.vip_at {
            sh.promoted_at = sh.vip_at;
            self.notify(true, sh.state, sh.vip_at.unwrap_or(0));
        }
        if self.role == Role::Secondary {
            self.alarms.raise(
                FAILED_OVER,
                &subject,
                &format!(
                    "this secondary serves the virtual IP of Peer {}",
                    self.members.primary
                ),
            );
        } else {
            self.alarms.lower(FAILED_OVER, &subject);
        }
    }

    /// Not holding: follow who does, and decide whether to stand.
    fn follow(
        &self,
        sh: &mut Shared,
        lease: Holder,
        settings: &Option<PairSettings>,
        now: Instant,
        stand: &mut bool,
        tell_peer: &mut Option<Handover>,
    ) {
        let silent = self.silent_for();
        let peer_holds = matches!(lease, Holder::Peer { peer, .. } if Some(peer) == self.pair_peer())
            && silent < DOWN_AFTER;
        let Some(s) = settings else {
            self.idle(sh, "waiting for the primary's pair settings (ha/hello)");
            return;
        };
        if let Some(since) = sh.releasing {
            // Handed over, or the peer did not take it: either way this member may stand
            // again by its own rules.
            if peer_holds || now.saturating_duration_since(since) > FAILBACK_LIMIT {
                sh.releasing = None;
            }
            sh.take_over = false;
        }
        match self.role {
            Role::Primary => {
                let recovering = self.recovering.load(std::sync::atomic::Ordering::Relaxed);
                match sh.state {
                    HaState::GracefulShutdown if peer_holds || recovering => {
                        self.go(sh, Trigger::StartedAfterFailover);
                        if recovering {
                            self.event(
                                sh,
                                "Recovery mode: taking the data back from the secondary".into(),
                                String::new(),
                            );
                        }
                    }
                    HaState::FailoverInvoked if peer_holds => {
                        self.go(sh, Trigger::OtherHolds);
                    }
                    HaState::FailbackActive
                        if sh
                            .failback_started
                            .is_some_and(|t| now - t > FAILBACK_LIMIT) =>
                    {
                        sh.failback_started = None;
                        sh.take_over = false;
                        self.go(sh, Trigger::FailbackFailed);
                    }
                    HaState::Terminated => {
                        // The secondary that holds was lost: serve again if failover is automatic.
                        let peer_lost = !peer_holds
                            && silent >= Duration::from_millis(s.failover_wait_ms)
                            && sh.sync.in_sync
                            && !recovering;
                        let auto_back = s.failback == HaMode::Automatic
                            && peer_holds
                            && sh.sync.in_sync
                            && self.check_guard(false).is_ok();
                        if (peer_lost && s.failover == HaMode::Automatic) || auto_back {
                            self.go(sh, Trigger::FailbackRequested);
                            sh.failback_started = Some(now);
                            if auto_back {
                                *tell_peer = Some(Handover::GiveBack { force: false });
                            }
                            sh.take_over = true;
                        }
                    }
                    _ => {}
                }
                if sh.state == HaState::Terminated {
                    self.alarms.raise(
                        FAILED_OVER,
                        &format!("pair {}", self.pair()),
                        &format!(
                            "the secondary, Peer {}, serves the virtual IP",
                            self.members.secondary
                        ),
                    );
                }
                let may = match sh.state {
                    HaState::GracefulShutdown
                    | HaState::PrimaryActive
                    | HaState::FailoverInvoked => sh.releasing.is_none(),
                    HaState::FailbackActive => sh.take_over,
                    _ => false,
                };
                // A primary that starts with nothing saved while its secondary keeps a copy
                // has lost its data: serving now would make the secondary delete its copy.
                let secondary_has_copy = sh
                    .beats
                    .get(&self.members.secondary)
                    .is_some_and(|b| b.up && b.has_copy);
                if may && self.fresh && !sh.held_once && !sh.sync.in_sync && secondary_has_copy {
                    self.alarms.raise(
                        PAIRING_REFUSED,
                        &format!("pair {} data", self.pair()),
                        "the primary has lost its data: restart it in recovery mode (ha.recovery_mode = true, or causeway setup --recovery-mode yes) or unpair the secondary",
                    );
                    self.idle(sh, "lost data: waiting for recovery mode");
                } else if may && !peer_holds {
                    self.alarms
                        .lower(PAIRING_REFUSED, &format!("pair {} data", self.pair()));
                    *stand = sh.take_over || silent >= Duration::from_millis(s.failover_wait_ms);
                }
            }
            Role::Secondary => {
                if !sh.state.holds_address(Side::Secondary) {
                    self.alarms
                        .lower(FAILED_OVER, &format!("pair {}", self.pair()));
                }
                match sh.state {
                    HaState::GracefulShutdown => {
                        self.go(sh, Trigger::Started);
                    }
                    HaState::SecondaryAlone if sh.sync.in_sync => {
                        self.go(sh, Trigger::InSync);
                    }
                    HaState::FailoverInvoked if peer_holds => {
                        sh.take_over = false;
                        self.go(sh, Trigger::OtherHolds);
                    }
                    _ => {}
                }
                let subject = format!("pair {}", self.pair());
                let waited = silent >= Duration::from_millis(s.failover_wait_ms);
                let heard_since_start = self.lease.last_heard_holder().is_some();
                let grace_over = heard_since_start || self.started.elapsed() >= START_GRACE;
                if sh.take_over && !peer_holds {
                    *stand = true;
                } else if waited
                    && !peer_holds
                    && grace_over
                    && sh.releasing.is_none()
                    && matches!(
                        sh.state,
                        HaState::SecondaryActive | HaState::FailoverInvoked
                    )
                {
                    if s.failover == HaMode::Automatic {
                        *stand = true;
                    } else {
                        self.alarms.raise(
                            MANUAL_FAILOVER,
                            &subject,
                            "the primary is silent and the failover type is Manual",
                        );
                        self.idle(sh, "manual failover: waiting for 'causeway ha failover'");
                    }
                } else if !waited {
                    self.alarms.lower(MANUAL_FAILOVER, &subject);
                }
            }
            Role::Witness => {}
        }
    }

    fn idle(&self, sh: &mut Shared, why: &str) {
        if sh.idle_reason != why {
            sh.idle_reason = why.to_string();
            info!(target: LOG, event = "HA waiting", pair = self.pair(), reason = %why, "");
        }
    }

    /// Pre-vote with the other voters, then stand (docs/ha.md, section 2). A handover or a
    /// command (`take_over`) skips the pre-vote: the holder has released.
    async fn stand(&self, settings: &Option<PairSettings>) {
        let Some(s) = settings else { return };
        let asked = self.lock().take_over;
        // Without a witness there is nobody else to ask: silence decides.
        if !asked && self.lease.has_witness() {
            let answers = self
                .rpc
                .call_quorum(
                    &pair::prevote(self.pair()),
                    &self.others(),
                    &Prevote {
                        failover_wait_ms: s.failover_wait_ms,
                    },
                    1,
                    Duration::from_millis(20),
                )
                .await;
            if !answers.iter().any(|(_, r)| r.is_ok()) {
                // Logged once per change of who refused, not per attempt (every 10 ms).
                let refused: Vec<String> = answers
                    .iter()
                    .map(|(p, r)| match r {
                        Err(e) if e.is_unreachable() => format!("Peer {p} unreachable"),
                        _ => format!("Peer {p} still hears the holder"),
                    })
                    .collect();
                let mut sh = self.lock();
                self.idle(
                    &mut sh,
                    &format!("pre-vote refused: {}", refused.join(", ")),
                );
                return;
            }
        }
        {
            let mut sh = self.lock();
            if self.role == Role::Secondary {
                self.go(&mut sh, Trigger::TakeOver);
            }
            self.idle(&mut sh, "standing for the lease");
        }
        if let Err(e) = self.lease.stand_now().await {
            let mut sh = self.lock();
            self.idle(&mut sh, &format!("cannot stand yet: {e}"));
        }
    }

    // ---------------------------------------------------------------- commands

    /// `ha switchover [--force]`: the holder hands the address to the other member.
    pub async fn switchover(&self, force: bool) -> Result<String, Refusal> {
        let peer = self.pair_peer().ok_or_else(|| {
            Refusal::invalid("a witness holds no address: run it on a pair member")
        })?;
        if self.lease.state().is_mine() {
            self.check_guard(force)?;
            let (up, in_sync, state) = self
                .lock()
                .beats
                .get(&peer)
                .map_or((false, false, None), |b| (b.up, b.in_sync, b.state));
            if !up && !force {
                return Err(Refusal::unavailable(format!(
                    "Peer {peer} does not answer heartbeats: it cannot take over (use --force to release anyway)"
                )));
            }
            if !in_sync && !force {
                return Err(Refusal::conflict(format!(
                    "Peer {peer} is not synchronized ({}): wait, or use --force to move anyway and lose what it has not received",
                    state.map_or("unknown", |s| s.seed_name())
                )));
            }
            {
                let mut sh = self.lock();
                sh.releasing = Some(Instant::now());
                if self.role == Role::Secondary {
                    self.go(&mut sh, Trigger::FailbackAccepted);
                } else {
                    self.go(&mut sh, Trigger::LostLease);
                }
            }
            self.wake.notify_one();
            // Wait until this member has let go, then tell the peer to take it.
            let deadline = Instant::now() + Duration::from_secs(1);
            while self.lease.state().is_mine() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            self.rpc
                .call(
                    &pair::handover(self.pair()),
                    peer,
                    &Handover::Take,
                    Duration::from_millis(500),
                )
                .await
                .map_err(|e| Refusal::unavailable(e.to_string()))?;
            Ok(format!(
                "Switchover started: Peer {peer} takes the virtual IP"
            ))
        } else {
            // Not the holder: ask the holder to give it back, and stand.
            self.ask_give_back(peer, force).await?;
            Ok(format!(
                "Switchover started: taking the virtual IP from Peer {peer}"
            ))
        }
    }

    async fn ask_give_back(&self, peer: usize, force: bool) -> Result<(), Refusal> {
        self.rpc
            .call(
                &pair::handover(self.pair()),
                peer,
                &Handover::GiveBack { force },
                Duration::from_millis(500),
            )
            .await
            .map_err(|e| match e {
                causeway_mesh::rpc::CallError::Remote { reason, .. } => Refusal::conflict(reason),
                other => Refusal::unavailable(other.to_string()),
            })?;
        let mut sh = self.lock();
        sh.take_over = true;
        sh.releasing = None;
        drop(sh);
        self.wake.notify_one();
        Ok(())
    }

    fn check_in_sync(&self, force: bool, who: &str) -> Result<(), Refusal> {
        let sync = self.lock().sync.clone();
        if sync.in_sync || force {
            return Ok(());
        }
        Err(Refusal::conflict(format!(
            "the {who} is not synchronized ({}% complete{}): wait, or use --force to move anyway and lose what it has not received",
            sync.percent(),
            sync.last_error.map(|e| format!("; {e}")).unwrap_or_default()
        )))
    }

    /// `ha failover [--force]` on the secondary: stand now (manual failover).
    pub fn failover(&self, force: bool) -> Result<String, Refusal> {
        if self.role != Role::Secondary {
            return Err(Refusal::invalid("'ha failover' is run on the secondary"));
        }
        let primary = self.members.primary;
        let holder_alive = matches!(self.lease.state().holder, Holder::Peer { peer, .. } if peer == primary)
            && self.silent_for() < DOWN_AFTER;
        if holder_alive && !force {
            return Err(Refusal::conflict(format!(
                "the primary, Peer {primary}, holds the virtual IP: use 'ha switchover'"
            )));
        }
        if self.lease.state().is_mine() {
            return Ok("This secondary already holds the virtual IP".into());
        }
        self.check_in_sync(force, "secondary")?;
        let mut sh = self.lock();
        sh.take_over = true;
        drop(sh);
        self.wake.notify_one();
        Ok("Failover invoked: the secondary takes the virtual IP".into())
    }

    /// `ha failback [--force]` on the primary after a failover.
    pub async fn failback(&self, force: bool) -> Result<String, Refusal> {
        if self.role != Role::Primary {
            return Err(Refusal::invalid("'ha failback' is run on the primary"));
        }
        let state = self.state();
        if state != HaState::Terminated {
            return Err(Refusal::conflict(format!(
                "the primary is {}: a failback starts from TERMINATED",
                state.seed_name()
            )));
        }
        self.check_guard(force)?;
        self.check_in_sync(force, "primary")?;
        let log_lost = self.lease.records_reset()
            || (self.fresh && !self.lock().held_once && self.lease.last_heard_holder().is_none());
        if log_lost {
            // With its data went its lease records: the other voters' logs are longer, so
            // it cannot win a vote until it has heard a holder, and with a manual failover
            // nobody holds.
            return Err(Refusal::conflict(
                "this primary's lease records were lost with its data: it can hold the virtual IP only after it has heard a holder. Run 'causeway ha failover' on the secondary first, then 'causeway ha failback --force' here",
            ));
        }
        let secondary_holds = matches!(self.lease.state().holder,
            Holder::Peer { peer, .. } if peer == self.members.secondary)
            && self.silent_for() < DOWN_AFTER;
        if secondary_holds {
            self.ask_give_back(self.members.secondary, force).await?;
        }
        // Nobody holds (after a recovery, or the secondary is down): stand at once.
        let mut sh = self.lock();
        sh.take_over = true;
        self.go(&mut sh, Trigger::FailbackRequested);
        sh.failback_started = Some(Instant::now());
        Ok("Failback started: the primary takes the virtual IP back".into())
    }

    // ---------------------------------------------------------------- status

    pub fn status_json(&self, peer_addresses: &[String]) -> serde_json::Value {
        let sh = self.lock();
        let addr = |p: usize| {
            peer_addresses
                .get(p.wrapping_sub(1))
                .cloned()
                .unwrap_or_default()
        };
        let beats: serde_json::Map<String, serde_json::Value> = sh
            .beats
            .iter()
            .map(|(p, b)| {
                let mean = if b.rtts.is_empty() {
                    None
                } else {
                    Some(
                        b.rtts.iter().sum::<Duration>().as_secs_f64() * 1000.0
                            / b.rtts.len() as f64,
                    )
                };
                (
                    p.to_string(),
                    serde_json::json!({
                        "peer": p,
                        "address": addr(*p),
                        "status": if b.up { "Up" } else { "Down" },
                        "mean_rtt_ms": mean,
                        "state": b.state.map(|s| s.seed_name()),
                        "vip_present": b.vip_at.is_some(),
                    }),
                )
            })
            .collect();
        let settings = self.settings();
        let events: Vec<serde_json::Value> = sh
            .events
            .iter()
            .rev()
            .take(50)
            .map(|e| {
                serde_json::json!({
                    "description": e.description,
                    "generated_by": e.generated_by,
                    "at": causeway_common::time::iso8601(causeway_common::time::unix_ms(e.at)),
                    "at_ms": causeway_common::time::unix_ms(e.at),
                    "remarks": e.remarks,
                })
            })
            .collect();
        serde_json::json!({
            "pair": self.pair(),
            "role": self.role.seed_name(),
            "primary": self.members.primary,
            "secondary": self.members.secondary,
            "witness": self.members.witness,
            "primary_address": addr(self.members.primary),
            "secondary_address": addr(self.members.secondary),
            "witness_address": addr(self.members.witness),
            "state": self.role.side().map(|_| sh.state.seed_name()),
            "virtual_ip": settings.as_ref().map(|s| s.vip.to_string()),
            "prefix": settings.as_ref().map(|s| s.prefix),
            "failover": settings.as_ref().map(|s| format!("{:?}", s.failover)),
            "failback": settings.as_ref().map(|s| format!("{:?}", s.failback)),
            "failover_wait_ms": settings.as_ref().map(|s| s.failover_wait_ms),
            "guard_window_s": settings.as_ref().map(|s| s.guard_window_s),
            "vip_held": sh.vip_at.is_some(),
            "generation": sh.generation,
            "holder": self.lease.state().holder.to_string(),
            "split_brain_protection": if self.lease.has_witness() { "witness" } else { "none" },
            "heartbeats": beats,
            "moves": sh.moves,
            "events": events,
            "waiting_for": sh.idle_reason,
            "holder_silent_ms": self.silent_for().as_millis() as u64,
            "direct_connect": {
                "used": self.local.direct.is_some(),
                "local": self.local.direct.map(|a| a.to_string()),
                "peer": self.direct_peer.lock().unwrap_or_else(|p| p.into_inner()).0.map(|a| a.to_string()),
                "status": if self.direct_up() { "Up" } else { "Down" },
            },
            "data_replication": {
                "state": if sh.sync.in_sync { "Up" } else if sh.sync.needed > 0 { "Setting up" } else { "Down" },
                "percent": sh.sync.percent(),
                "files": sh.sync.files,
                "files_dir": self.local.files_dir.as_ref().map(|d| d.display().to_string()),
                "last_error": sh.sync.last_error,
            },
        })
    }
}
