//! The mesh runtime: one dialer per higher-numbered peer, one acceptor, one session task per
//! established link. The protocol and its failure cases are in `docs/mesh.md`.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use causeway_common::time::unix_ms_now;
use causeway_pki::{CertStatus, TlsMode};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hello::{check_hello, Refusal, RefuseField};
use crate::resolve::Resolver;
use crate::settings::ClusterSettings;
use crate::status::{Clustering, FailureKind, MeshView, PeerStatus};
use crate::transport::{AcceptEvent, DialError, Link, Transport};
use crate::wire::{Hello, Message, MAX_FRAME, PROTOCOL_VERSION};

const LOG: &str = "network.cluster";
/// Links still in their hello at once; the TLS transport has its own, tighter caps.
const MAX_PENDING_HELLOS: usize = 64;
/// How long accepting a peer listed by name waits for the name to resolve.
const RESOLVE_ON_ACCEPT: Duration = Duration::from_secs(1);
/// A session that stayed up this long resets the dialer's backoff.
const STABLE_SESSION: Duration = Duration::from_secs(5);
/// Frames queued towards one peer before `send` reports the queue full.
const OUTBOUND_QUEUE: usize = 4096;
const RTT_SMOOTHING: f64 = 0.2;

/// A message from a peer for a service riding on the mesh.
#[derive(Debug)]
pub struct Inbound {
    pub from: usize,
    pub channel: u16,
    pub payload: Bytes,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("Peer {0} is not connected")]
    NotConnected(usize),
    #[error("the queue towards Peer {0} is full")]
    QueueFull(usize),
    #[error("there is no Peer {0}")]
    NoSuchPeer(usize),
}

struct SessionRef {
    id: u64,
    out: mpsc::Sender<Bytes>,
    stop: CancellationToken,
}

struct PeerSlot {
    status: PeerStatus,
    session: Option<SessionRef>,
}

/// Why a connection attempt or a session ended.
struct Failure {
    kind: FailureKind,
    reason: String,
}

impl Failure {
    fn new(kind: FailureKind, reason: impl Into<String>) -> Self {
        Self {
            kind,
            reason: reason.into(),
        }
    }
}

/// At most `LIMIT` refusal log lines per window, then one line saying how many were not
/// logged: garbage on the cluster port must not flood the log.
struct LogBudget {
    window_start: Instant,
    used: u32,
    suppressed: u32,
}

impl LogBudget {
    const LIMIT: u32 = 20;
    const WINDOW: Duration = Duration::from_secs(10);

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= Self::WINDOW {
            if self.suppressed > 0 {
                tracing::warn!(target: LOG, suppressed = self.suppressed, "Cluster connection refusals not logged in the last 10 s");
            }
            *self = LogBudget {
                window_start: now,
                used: 0,
                suppressed: 0,
            };
        }
        self.used += 1;
        if self.used > Self::LIMIT {
            self.suppressed += 1;
            return false;
        }
        true
    }
}

struct Shared {
    settings: ClusterSettings,
    transport: Arc<dyn Transport>,
    resolver: Arc<dyn Resolver>,
    peers: Mutex<Vec<PeerSlot>>,
    changed: watch::Sender<u64>,
    inbound: mpsc::Sender<Inbound>,
    next_session: AtomicU64,
    refusal_log: Mutex<LogBudget>,
    /// Wakes every dialer at once (EX-10: names retried on demand).
    redial: tokio::sync::Notify,
    /// Wakes `readdress_loop`: the address mapping changed.
    readdress: tokio::sync::Notify,
    cancel: CancellationToken,
}

/// A running mesh. Dropping it does not stop it: call [`Mesh::shutdown`].
pub struct Mesh {
    shared: Arc<Shared>,
    tasks: TaskTracker,
}

impl Mesh {
    /// Starts dialling and accepting. `settings` must already be validated (own index in the
    /// list, no duplicates). Messages from peers arrive on the returned receiver.
    pub fn start(
        settings: ClusterSettings,
        transport: Arc<dyn Transport>,
        resolver: Arc<dyn Resolver>,
    ) -> (Mesh, mpsc::Receiver<Inbound>) {
        let peers = (1..=settings.peers.len())
            .map(|i| {
                let mut status = PeerStatus::new(i, settings.address(i));
                if i == settings.self_index {
                    status.clustering = Clustering::ThisSystem;
                    status.certificate = transport.own_certificate_status(settings.address(i));
                    status.system_name = Some(settings.system_name.clone());
                    status.software_version = Some(settings.software_version.clone());
                }
                PeerSlot {
                    status,
                    session: None,
                }
            })
            .collect();
        let (inbound_tx, inbound_rx) = mpsc::channel(8192);
        let shared = Arc::new(Shared {
            settings,
            transport,
            resolver,
            peers: Mutex::new(peers),
            changed: watch::channel(0).0,
            inbound: inbound_tx,
            next_session: AtomicU64::new(1),
            refusal_log: Mutex::new(LogBudget {
                window_start: Instant::now(),
                used: 0,
                suppressed: 0,
            }),
            redial: tokio::sync::Notify::new(),
            readdress: tokio::sync::Notify::new(),
            cancel: CancellationToken::new(),
        });
        let tasks = TaskTracker::new();
        tasks.spawn(accept_loop(shared.clone(), tasks.clone()));
        tasks.spawn(readdress_loop(shared.clone()));
        let me = shared.settings.self_index;
        for index in me + 1..=shared.settings.peers.len() {
            tasks.spawn(dial_loop(shared.clone(), index));
        }
        tracing::info!(
            target: LOG,
            cluster = %shared.settings.cluster_name,
            peer_index = me,
            peers = shared.settings.peers.len(),
            tls_verification = %shared.settings.tls_mode,
            "Cluster mesh started"
        );
        (Mesh { shared, tasks }, inbound_rx)
    }

    /// Dials every peer that is not connected now, resolving its name again (EX-10: on
    /// demand, e.g. after the cluster address mapping changed). Dialers otherwise retry on
    /// their own with a backoff of at most `timing.backoff_max`.
    pub fn redial_now(&self, why: &str) {
        tracing::info!(target: LOG, reason = why,
            "Triggering forced peer update of peers which failed DNS");
        self.redial_quietly();
    }

    /// As `redial_now`, for a caller that logs in its own words.
    pub fn redial_quietly(&self) {
        self.shared.redial.notify_waiters();
    }

    /// After the address mapping changed (EX-9): every peer listed by name is resolved
    /// again; an Active peer whose name now resolves elsewhere is reconnected there (its
    /// session ends and the dialler takes the new address), and the resolution shown
    /// follows. Peers that are not Active are dialled again now. Callable from any thread.
    pub fn readdress(&self) {
        self.shared.readdress.notify_one();
    }
}

async fn readdress_loop(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = shared.readdress.notified() => {}
        }
        let names: Vec<(usize, String)> = {
            let s = &shared.settings;
            (1..=s.peers.len())
                .filter(|i| *i != s.self_index && s.address(*i).parse::<IpAddr>().is_err())
                .map(|i| (i, s.address(i).to_string()))
                .collect()
        };
        for (index, name) in names {
            let Some(ip) = resolve_briefly(&shared, &name).await else {
                continue;
            };
            let mut moved = None;
            shared.update(index, |slot| {
                // Only a peer known at another address moves; one never resolved before
                // just learns where it is.
                moved = slot.status.resolved.replace(ip).filter(|was| *was != ip);
                if moved.is_some() {
                    if let Some(session) = slot.session.as_ref() {
                        session.stop.cancel();
                    }
                }
            });
            if let Some(was) = moved {
                tracing::info!(target: LOG, peer = %name, peer_index = index, was = %was, now = %ip,
                    "Cluster peer address changed: reconnecting");
            }
        }
        shared.redial.notify_waiters();
    }
}

impl Mesh {
    /// Every peer as this node sees it now.
    pub fn view(&self) -> MeshView {
        let s = &self.shared.settings;
        MeshView {
            cluster_name: s.cluster_name.clone(),
            configuration_primary: s.configuration_primary,
            ip_version: s.ip_version,
            tls_mode: s.tls_mode,
            self_index: s.self_index,
            peers: self
                .shared
                .lock()
                .iter()
                .map(|p| p.status.clone())
                .collect(),
        }
    }

    /// Ticks whenever a peer's state or certificate status changes (not on every heartbeat).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changed.subscribe()
    }

    pub fn settings(&self) -> &ClusterSettings {
        &self.shared.settings
    }

    /// Queues `payload` for peer `index` on `channel`.
    pub fn send(&self, index: usize, channel: u16, payload: Bytes) -> Result<(), SendError> {
        let frame = Message::App { channel, payload }.encode();
        let peers = self.shared.lock();
        let slot = peers
            .get(index.wrapping_sub(1))
            .ok_or(SendError::NoSuchPeer(index))?;
        let session = slot
            .session
            .as_ref()
            .ok_or(SendError::NotConnected(index))?;
        session.out.try_send(frame).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::QueueFull(index),
            mpsc::error::TrySendError::Closed(_) => SendError::NotConnected(index),
        })
    }

    /// Says goodbye to every peer and stops every task.
    pub async fn shutdown(&self) {
        self.shared.cancel.cancel();
        self.tasks.close();
        let stopped = async {
            self.tasks.wait().await;
            self.shared.transport.shutdown().await;
        };
        if tokio::time::timeout(Duration::from_secs(2), stopped)
            .await
            .is_err()
        {
            tracing::warn!(target: LOG, "Cluster mesh tasks still running 2 s after shutdown");
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<PeerSlot>> {
        // Every update leaves the slots consistent, so a poisoned lock is still usable.
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    fn our_hello(&self) -> Hello {
        let s = &self.settings;
        Hello {
            protocol_version: PROTOCOL_VERSION,
            software_version: s.software_version.clone(),
            cluster_name: s.cluster_name.clone(),
            peer_index: s.self_index as u16,
            system_name: s.system_name.clone(),
            peers: s.peers.clone(),
            configuration_primary: s.configuration_primary as u16,
            ip_version: s.ip_version,
            tls_mode: s.tls_mode,
            wall_ms: unix_ms_now(),
        }
    }

    fn refuse_frame(&self, r: &Refusal) -> Bytes {
        Message::Refuse {
            from_index: self.settings.self_index as u16,
            field: r.field,
            reason: r.reason.clone(),
        }
        .encode()
    }

    /// Applies `f` to a peer's slot; watchers are woken only when its status changed, so a
    /// peer that stays down does not wake the alarm supervisor on every retry.
    fn update(&self, index: usize, f: impl FnOnce(&mut PeerSlot)) {
        let changed = match self.lock().get_mut(index.wrapping_sub(1)) {
            Some(slot) => {
                let before = slot.status.clone();
                f(slot);
                slot.status != before
            }
            None => false,
        };
        if changed {
            self.notify();
        }
    }

    fn set_certificate(&self, index: usize, cert: CertStatus) {
        self.update(index, |slot| slot.status.certificate = cert);
    }

    /// The certificate a refused or failed connection presented, shown for a peer that has
    /// no session; an Active peer keeps what its own session showed: a connection from its
    /// address with another certificate is somebody else (or a stale dial), and must not
    /// raise 21004 against it.
    fn set_certificate_unless_active(&self, index: usize, cert: CertStatus) {
        self.update(index, |slot| {
            if slot.session.is_none() {
                slot.status.certificate = cert;
            }
        });
    }

    /// Records a failed attempt for a peer that has no session (an Active peer keeps its
    /// status: a refused impersonator must not mark the real peer down).
    /// Logs once per distinct reason, so a peer that stays down does not fill the log.
    fn set_failed(&self, index: usize, failure: &Failure) {
        let mut changed = false;
        self.update(index, |slot| {
            let failed = Clustering::Failed(failure.reason.clone());
            if slot.session.is_none() && slot.status.clustering != failed {
                slot.status.clustering = failed;
                slot.status.failure = Some(failure.kind);
                changed = true;
            }
        });
        if changed {
            tracing::warn!(target: LOG, peer = self.settings.address(index), peer_index = index, reason = %failure.reason, "Cluster peer connection failed");
        }
    }

    /// A peer whose hello was refused still shows what it said it is (its name and its
    /// software version, the usual reason), not what it said before.
    fn note_refused_hello(&self, index: usize, theirs: &crate::wire::Hello) {
        self.update(index, |slot| {
            if slot.session.is_none() {
                slot.status.system_name = Some(theirs.system_name.clone());
                slot.status.software_version = Some(theirs.software_version.clone());
                slot.status.tls_mode = Some(theirs.tls_mode);
            }
        });
    }

    fn log_refusal(&self, peer: &str, src: Option<IpAddr>, reason: &str) {
        let allowed = self
            .refusal_log
            .lock()
            .map(|mut b| b.allow())
            .unwrap_or(true);
        if allowed {
            let src = src.map(|ip| ip.to_string()).unwrap_or_default();
            tracing::warn!(target: LOG, peer = peer, src_ip = %src, reason = reason, "Cluster connection refused");
        }
    }

    /// The peer whose address (as an IP literal or as resolved) is `ip`, if any.
    fn index_of_ip(&self, ip: IpAddr) -> Option<usize> {
        let peers = self.lock();
        peers
            .iter()
            .find(|p| {
                p.status.index != self.settings.self_index
                    && (p.status.address.parse() == Ok(ip) || p.status.resolved == Some(ip))
            })
            .map(|p| p.status.index)
    }

    fn record_heartbeat(&self, index: usize, rtt: Option<Duration>, skew_ms: Option<i64>) {
        let mut peers = self.lock();
        let Some(slot) = peers.get_mut(index - 1) else {
            return;
        };
        slot.status.last_contact_ms = Some(unix_ms_now());
        if let Some(rtt) = rtt {
            let sample = rtt.as_secs_f64() * 1000.0;
            slot.status.rtt_ms = Some(match slot.status.rtt_ms {
                Some(old) => old + RTT_SMOOTHING * (sample - old),
                None => sample,
            });
        }
        if skew_ms.is_some() {
            slot.status.clock_skew_ms = skew_ms;
        }
    }
}

/// Dials peer `index` (higher-numbered than us) for as long as the mesh runs.
async fn dial_loop(shared: Arc<Shared>, index: usize) {
    let timing = shared.settings.timing.clone();
    let mut backoff = timing.backoff_min;
    let mut jitter = Jitter::new(index as u64 ^ unix_ms_now());
    while !shared.cancel.is_cancelled() {
        let started = Instant::now();
        match connect_once(&shared, index).await {
            Ok(link_and_hello) => {
                let (link, hello) = link_and_hello;
                run_established(&shared, index, link, hello).await;
                if started.elapsed() >= STABLE_SESSION {
                    backoff = timing.backoff_min;
                }
            }
            Err(failure) => shared.set_failed(index, &failure),
        }
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = sleep(jitter.spread(backoff)) => {}
            _ = shared.redial.notified() => backoff = timing.backoff_min,
        }
        backoff = (backoff * 2).min(timing.backoff_max);
    }
}

/// One attempt: resolve, connect, TLS, certificate check, hello both ways.
async fn connect_once(shared: &Shared, index: usize) -> Result<(Link, Hello), Failure> {
    let s = &shared.settings;
    let address = s.address(index);
    let ip = shared
        .resolver
        .resolve(address)
        .await
        .map_err(|e| Failure::new(FailureKind::Resolve, e))?;
    shared.update(index, |slot| slot.status.resolved = Some(ip));
    let target = SocketAddr::new(ip, s.port);
    let mut link = match shared.transport.dial(target, address).await {
        Ok(link) => link,
        Err(DialError::Connect(reason)) => {
            return Err(Failure::new(
                FailureKind::Connect,
                format!("cannot open TCP connection to {target}: {reason}"),
            ));
        }
        Err(DialError::Tls {
            reason,
            certificate,
        }) => {
            if let Some(cert) = certificate {
                shared.set_certificate_unless_active(index, cert);
            }
            return Err(Failure::new(
                FailureKind::Tls,
                format!("TLS handshake with {target} failed: {reason}"),
            ));
        }
    };
    let cert = shared.transport.certificate_status(&link.info, address);
    shared.set_certificate(index, cert.clone());
    if let (TlsMode::Enforce, CertStatus::Invalid(why)) = (s.tls_mode, &cert) {
        let refusal = Refusal::new(
            RefuseField::Certificate,
            // `why` names the address the certificate was checked against.
            format!("certificate of Peer {index} is invalid: {why}"),
        );
        let _ = link.tx.send(shared.refuse_frame(&refusal)).await;
        shared.log_refusal(address, Some(ip), &refusal.reason);
        return Err(Failure::new(
            FailureKind::Refused(refusal.field),
            refusal.reason,
        ));
    }
    let ours = shared.our_hello();
    if link
        .tx
        .send(Message::Hello(ours.clone()).encode())
        .await
        .is_err()
    {
        return Err(Failure::new(
            FailureKind::Lost,
            "connection closed before the hello",
        ));
    }
    let reply = match tokio::time::timeout(s.timing.handshake_timeout, link.rx.recv()).await {
        Err(_) => {
            return Err(Failure::new(
                FailureKind::Lost,
                format!(
                    "no hello from {target} within {} s",
                    s.timing.handshake_timeout.as_secs()
                ),
            ))
        }
        Ok(None) => {
            let why = link
                .close_reason()
                .unwrap_or_else(|| "closed by the peer".into());
            return Err(Failure::new(
                FailureKind::Lost,
                format!("connection closed during the hello: {why}"),
            ));
        }
        Ok(Some(frame)) => Message::decode(&frame)
            .map_err(|e| Failure::new(FailureKind::Refused(RefuseField::Malformed), e))?,
    };
    match reply {
        Message::Hello(theirs) => {
            let same = same_systems(shared, &ours.peers, &theirs.peers).await;
            let checked = check_hello(&ours, &theirs, &|i| same[i]).and_then(|()| {
                if usize::from(theirs.peer_index) == index {
                    Ok(())
                } else {
                    Err(Refusal::new(
                        RefuseField::PeerIndex,
                        format!(
                            "the peer at Peer {index} address {address} says it is Peer {}",
                            theirs.peer_index
                        ),
                    ))
                }
            });
            if let Err(refusal) = checked {
                if refusal.field != RefuseField::PeerIndex {
                    shared.note_refused_hello(index, &theirs);
                }
                let _ = link.tx.send(shared.refuse_frame(&refusal)).await;
                shared.log_refusal(address, Some(ip), &refusal.reason);
                return Err(Failure::new(
                    FailureKind::Refused(refusal.field),
                    refusal.reason,
                ));
            }
            Ok((link, theirs))
        }
        Message::Refuse { field, reason, .. } => Err(Failure::new(
            FailureKind::Refused(field),
            format!("refused by the peer: {reason}"),
        )),
        other => Err(Failure::new(
            FailureKind::Refused(RefuseField::Malformed),
            format!("expected a hello, got {}", kind_of(&other)),
        )),
    }
}

fn kind_of(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "a hello",
        Message::Refuse { .. } => "a refusal",
        Message::Ping { .. } => "a ping",
        Message::Pong { .. } => "a pong",
        Message::App { .. } => "a service message",
        Message::Goodbye { .. } => "a goodbye",
    }
}

async fn accept_loop(shared: Arc<Shared>, tasks: TaskTracker) {
    let hellos = Arc::new(Semaphore::new(MAX_PENDING_HELLOS));
    loop {
        let event = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            e = shared.transport.accept() => match e { Some(e) => e, None => return },
        };
        match event {
            AcceptEvent::Link(link) => {
                let Ok(permit) = hellos.clone().try_acquire_owned() else {
                    shared.log_refusal(
                        "",
                        link.info.remote_ip,
                        "too many connections waiting for their hello",
                    );
                    continue;
                };
                let shared = shared.clone();
                tasks.spawn(async move {
                    let established = accept_hello(&shared, link).await;
                    drop(permit);
                    if let Some((index, link, hello)) = established {
                        run_established(&shared, index, link, hello).await;
                    }
                });
            }
            AcceptEvent::Refused {
                remote_ip,
                reason,
                certificate,
            } => {
                let index = shared.index_of_ip(remote_ip);
                let peer = index
                    .map(|i| shared.settings.address(i).to_string())
                    .unwrap_or_default();
                shared.log_refusal(&peer, Some(remote_ip), &reason);
                if let Some(index) = index {
                    if let Some(cert) = certificate {
                        shared.set_certificate_unless_active(index, cert);
                    }
                    shared.set_failed(index, &Failure::new(FailureKind::Tls, reason));
                }
            }
        }
    }
}

/// The acceptor's side of the hello. Returns the peer's index when it is accepted.
async fn accept_hello(shared: &Shared, mut link: Link) -> Option<(usize, Link, Hello)> {
    let s = &shared.settings;
    let src = link.info.remote_ip;
    let first = match tokio::time::timeout(s.timing.handshake_timeout, link.rx.recv()).await {
        Err(_) => {
            shared.log_refusal(
                "",
                src,
                &format!("no hello within {} s", s.timing.handshake_timeout.as_secs()),
            );
            return None;
        }
        Ok(None) => {
            let why = link
                .close_reason()
                .unwrap_or_else(|| "closed before the hello".into());
            shared.log_refusal("", src, &why);
            return None;
        }
        Ok(Some(frame)) => frame,
    };
    let theirs = match Message::decode(&first) {
        Ok(Message::Hello(h)) => h,
        Ok(Message::Refuse {
            from_index,
            field,
            reason,
        }) => {
            // The dialer refused us (our certificate, say): show it on that peer.
            let index = usize::from(from_index);
            if index >= 1 && index <= s.peers.len() && index != s.self_index {
                shared.log_refusal(s.address(index), src, &reason);
                shared.set_failed(
                    index,
                    &Failure::new(
                        FailureKind::Refused(field),
                        format!("refused by the peer: {reason}"),
                    ),
                );
            }
            return None;
        }
        Ok(other) => {
            shared.log_refusal(
                "",
                src,
                &format!("expected a hello, got {}", kind_of(&other)),
            );
            return None;
        }
        Err(e) => {
            shared.log_refusal("", src, &e);
            return None;
        }
    };
    let ours = shared.our_hello();
    let index = usize::from(theirs.peer_index);
    let in_range = index >= 1 && index <= s.peers.len() && index != s.self_index;
    // A peer listed by name: where the name points now (the address mapping, then DNS).
    let expected = match in_range.then(|| s.address(index).parse::<IpAddr>()) {
        Some(Err(_)) => {
            let lookup = shared.resolver.resolve(s.address(index));
            match tokio::time::timeout(RESOLVE_ON_ACCEPT, lookup).await {
                Ok(Ok(ip)) => {
                    shared.update(index, |slot| slot.status.resolved = Some(ip));
                    Some(ip)
                }
                _ => None,
            }
        }
        _ => None,
    };
    let same = same_systems(shared, &ours.peers, &theirs.peers).await;
    let checked = check_hello(&ours, &theirs, &|i| same[i])
        .and_then(|()| check_source(s, index, src, expected))
        .and_then(|()| {
            let cert = shared
                .transport
                .certificate_status(&link.info, s.address(index));
            shared.set_certificate_unless_active(index, cert.clone());
            match (s.tls_mode, cert) {
                (TlsMode::Enforce, CertStatus::Invalid(why)) => Err(Refusal::new(
                    RefuseField::Certificate,
                    // `why` names the address the certificate was checked against.
                    format!("certificate of Peer {index} is invalid: {why}"),
                )),
                _ => Ok(()),
            }
        });
    if let Err(refusal) = checked {
        // What it says it is is shown only for a caller from the peer's own address with a
        // certificate this system's mode accepts (the hello was refused before those
        // checks ran): an impostor's words must not stand for the peer's.
        let vouched = in_range
            && !matches!(
                refusal.field,
                RefuseField::SourceAddress | RefuseField::Certificate | RefuseField::PeerIndex
            )
            && check_source(s, index, src, expected).is_ok()
            && (s.tls_mode == TlsMode::Permissive
                || shared
                    .transport
                    .certificate_status(&link.info, s.address(index))
                    .is_valid());
        if vouched {
            shared.note_refused_hello(index, &theirs);
        }
        // Our hello first, so the dialler finds the difference itself and shows what this
        // system is (its version above all), not only our words for it. Only for a setting
        // both sides compare alike: a peer-list entry may resolve here and not there, and a
        // dialler that accepted our hello would count the link Active until the refusal.
        let symmetric = matches!(
            refusal.field,
            RefuseField::ProtocolVersion
                | RefuseField::ClusterName
                | RefuseField::SoftwareVersion
                | RefuseField::IpVersion
                | RefuseField::TlsMode
        );
        if vouched && symmetric {
            let _ = link.tx.send(Message::Hello(ours.clone()).encode()).await;
        }
        let _ = link.tx.send(shared.refuse_frame(&refusal)).await;
        let peer = if in_range { s.address(index) } else { "" };
        shared.log_refusal(peer, src, &refusal.reason);
        if in_range && refusal.field != RefuseField::SourceAddress {
            shared.set_failed(
                index,
                &Failure::new(FailureKind::Refused(refusal.field), refusal.reason),
            );
        }
        return None;
    }
    if link.tx.send(Message::Hello(ours).encode()).await.is_err() {
        return None;
    }
    Some((index, link, theirs))
}

/// For each peer-list entry: spelled differently here and there, but resolving (address
/// mapping, then DNS) to one IP. Entries spelled alike are not looked up.
async fn same_systems(shared: &Shared, ours: &[String], theirs: &[String]) -> Vec<bool> {
    let mut out = vec![false; ours.len()];
    if ours.len() != theirs.len() {
        return out;
    }
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        if a.eq_ignore_ascii_case(b) {
            continue;
        }
        let (x, y) = (
            resolve_briefly(shared, a).await,
            resolve_briefly(shared, b).await,
        );
        // A name that does not resolve here against an address: not provably another
        // system. Refusing would lock out a peer whose list names a peer before the
        // address mapping for the name reached it — which only clustering can bring it.
        let unknown_name_against_ip = |name: &str, n: Option<IpAddr>, other: &str| {
            n.is_none() && name.parse::<IpAddr>().is_err() && other.parse::<IpAddr>().is_ok()
        };
        out[i] = (x.is_some() && x == y)
            || unknown_name_against_ip(a, x, b)
            || unknown_name_against_ip(b, y, a);
        if out[i] && x != y {
            tracing::info!(target: LOG, peer_index = i + 1, here = %a, there = %b,
                "Peer list entries differ by a name that does not resolve yet: accepted until the address mapping or DNS names it");
        }
    }
    out
}

async fn resolve_briefly(shared: &Shared, host: &str) -> Option<IpAddr> {
    tokio::time::timeout(RESOLVE_ON_ACCEPT, shared.resolver.resolve(host))
        .await
        .ok()?
        .ok()
}

/// A connection claiming peer `index` must come from that peer's address: its IP literal,
/// or what its name resolves to now (`resolved`; a name that does not resolve is left to
/// the certificate check). Otherwise there is NAT between the peers (EX-11) or an
/// impersonator.
fn check_source(
    s: &ClusterSettings,
    index: usize,
    src: Option<IpAddr>,
    resolved: Option<IpAddr>,
) -> Result<(), Refusal> {
    let address = s.address(index);
    let (expected, how) = match (address.parse::<IpAddr>(), resolved) {
        (Ok(ip), _) => (ip, String::new()),
        (Err(_), Some(ip)) => (ip, format!(", which resolves to {ip}")),
        (Err(_), None) => return Ok(()),
    };
    match src {
        Some(actual) if actual != expected => Err(Refusal::new(
            RefuseField::SourceAddress,
            format!("a connection claiming to be Peer {index} ({address}{how}) came from {actual}: NAT between the peers, or another system using Peer {index}'s number"),
        )),
        _ => Ok(()),
    }
}

/// Runs an accepted link until it ends, keeping the peer's status.
async fn run_established(shared: &Shared, index: usize, link: Link, theirs: Hello) {
    link.set_max_frame(MAX_FRAME);
    let (out_tx, out_rx) = mpsc::channel(OUTBOUND_QUEUE);
    let stop = shared.cancel.child_token();
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let address = shared.settings.address(index).to_string();
    let skew = theirs.wall_ms as i64 - unix_ms_now() as i64;
    shared.update(index, |slot| {
        if let Some(old) = slot.session.replace(SessionRef {
            id,
            out: out_tx,
            stop: stop.clone(),
        }) {
            old.stop.cancel();
        }
        let st = &mut slot.status;
        st.clustering = Clustering::Active;
        st.failure = None;
        st.system_name = Some(theirs.system_name.clone());
        st.software_version = Some(theirs.software_version.clone());
        st.tls_mode = Some(theirs.tls_mode);
        st.last_contact_ms = Some(unix_ms_now());
        st.clock_skew_ms = Some(skew);
        st.rtt_ms = None;
    });
    tracing::info!(target: LOG, peer = %address, peer_index = index, name = %theirs.system_name, "Cluster peer connected");
    let end = session(shared, index, link, out_rx, &stop).await;
    let mut current = false;
    shared.update(index, |slot| {
        if slot.session.as_ref().is_some_and(|s| s.id == id) {
            current = true;
            slot.session = None;
            slot.status.clustering = Clustering::Failed(end.reason.clone());
            slot.status.failure = Some(end.kind);
            slot.status.rtt_ms = None;
        }
    });
    if current && !shared.cancel.is_cancelled() {
        tracing::warn!(target: LOG, peer = %address, peer_index = index, reason = %end.reason, "Cluster peer connection lost");
    }
}

/// Heartbeats, application frames and failure detection for one established link.
async fn session(
    shared: &Shared,
    index: usize,
    mut link: Link,
    mut out: mpsc::Receiver<Bytes>,
    stop: &CancellationToken,
) -> Failure {
    let timing = &shared.settings.timing;
    let mut ticker = tokio::time::interval(timing.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_rx = Instant::now();
    let mut seq = 0u64;
    // Pings awaiting their pong: (seq, sent at, our wall clock then).
    let mut pending: VecDeque<(u64, Instant, u64)> = VecDeque::with_capacity(16);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                if shared.cancel.is_cancelled() {
                    let _ = link.tx.try_send(Message::Goodbye { reason: "peer is shutting down".into() }.encode());
                    return Failure::new(FailureKind::ShutDown, "this system is shutting down");
                }
                return Failure::new(FailureKind::Lost, "replaced by a newer connection");
            }
            frame = link.rx.recv() => {
                let Some(frame) = frame else {
                    let why = link.close_reason().map(|r| format!("connection dropped: {r}"));
                    return Failure::new(FailureKind::Lost, why.unwrap_or_else(|| "connection closed by the peer".into()));
                };
                last_rx = Instant::now();
                let message = match Message::decode(&frame) {
                    Ok(m) => m,
                    Err(e) => return Failure::new(FailureKind::Lost, format!("connection dropped: {e}")),
                };
                match message {
                    Message::Ping { seq, .. } => {
                        shared.record_heartbeat(index, None, None);
                        let pong = Message::Pong { seq, wall_ms: unix_ms_now() }.encode();
                        if link.tx.send(pong).await.is_err() {
                            return Failure::new(FailureKind::Lost, "connection closed");
                        }
                    }
                    Message::Pong { seq, wall_ms } => {
                        while pending.front().is_some_and(|(s, _, _)| *s < seq) {
                            pending.pop_front();
                        }
                        if let Some((_, sent, our_wall)) = pending.pop_front().filter(|(s, _, _)| *s == seq) {
                            let rtt = sent.elapsed();
                            let skew = wall_ms as i64 - (our_wall as i64 + rtt.as_millis() as i64 / 2);
                            shared.record_heartbeat(index, Some(rtt), Some(skew));
                        }
                    }
                    Message::App { channel, payload } => {
                        // A consumer that went away (tests, shutdown) is not the peer's fault.
                        let _ = shared.inbound.send(Inbound { from: index, channel, payload }).await;
                    }
                    Message::Goodbye { reason } => {
                        return Failure::new(FailureKind::ShutDown, format!("the peer shut down: {reason}"));
                    }
                    other @ (Message::Hello(_) | Message::Refuse { .. }) => {
                        return Failure::new(FailureKind::Lost, format!("connection dropped: {} on an established link", kind_of(&other)));
                    }
                }
            }
            Some(frame) = out.recv() => {
                if link.tx.send(frame).await.is_err() {
                    return Failure::new(FailureKind::Lost, "connection closed");
                }
            }
            _ = ticker.tick() => {
                seq += 1;
                if pending.len() == pending.capacity() {
                    pending.pop_front();
                }
                let wall = unix_ms_now();
                pending.push_back((seq, Instant::now(), wall));
                if link.tx.send(Message::Ping { seq, wall_ms: wall }.encode()).await.is_err() {
                    return Failure::new(FailureKind::Lost, "connection closed");
                }
            }
            _ = sleep_until(last_rx + timing.failure_timeout) => {
                return Failure::new(FailureKind::Lost, format!("no heartbeat for {} ms", timing.failure_timeout.as_millis()));
            }
        }
    }
}

/// ±20 % spread on backoff delays, so peers that failed together do not retry together.
struct Jitter(u64);

impl Jitter {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    fn spread(&mut self, d: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let factor = 0.8 + 0.4 * ((self.0 >> 11) as f64 / (1u64 << 53) as f64);
        d.mul_f64(factor)
    }
}
