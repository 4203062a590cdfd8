//! An in-memory network for whole clusters in one test process, with the faults a real
//! network has: partitions (frames silently dropped, new connections time out), one-way
//! delay, random loss, and cutting existing connections.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use causeway_pki::CertStatus;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::transport::{AcceptEvent, BoxFuture, DialError, Link, LinkInfo, Transport};
use crate::wire::MAX_FRAME_BEFORE_HELLO;

#[derive(Default)]
struct Net {
    listeners: HashMap<IpAddr, mpsc::Sender<AcceptEvent>>,
    /// What each node presents instead of a certificate; its IP when not set.
    identities: HashMap<IpAddr, String>,
    partitions: HashSet<(IpAddr, IpAddr)>,
    delays: HashMap<(IpAddr, IpAddr), Duration>,
    loss: HashMap<(IpAddr, IpAddr), f64>,
    links: Vec<(IpAddr, IpAddr, CancellationToken)>,
    rng: u64,
}

fn pair(a: IpAddr, b: IpAddr) -> (IpAddr, IpAddr) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

impl Net {
    fn partitioned(&self, a: IpAddr, b: IpAddr) -> bool {
        self.partitions.contains(&pair(a, b))
    }

    /// Deterministic xorshift, so a failing test fails the same way again.
    fn random(&mut self) -> f64 {
        let mut x = self.rng.max(1);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    fn identity(&self, ip: IpAddr) -> String {
        self.identities
            .get(&ip)
            .cloned()
            .unwrap_or_else(|| ip.to_string())
    }
}

/// The shared network. Cloning gives another handle to the same network.
#[derive(Clone, Default)]
pub struct MemoryNetwork {
    net: Arc<Mutex<Net>>,
}

impl MemoryNetwork {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Net> {
        self.net.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A node's transport at `ip`, listening from now until it is dropped.
    pub fn transport(&self, ip: IpAddr) -> Arc<MemoryTransport> {
        let (tx, rx) = mpsc::channel(64);
        self.lock().listeners.insert(ip, tx.clone());
        Arc::new(MemoryTransport {
            network: self.clone(),
            ip,
            own: tx,
            incoming: tokio::sync::Mutex::new(rx),
        })
    }

    /// Frames between `a` and `b` are dropped both ways and new connections time out.
    pub fn partition(&self, a: IpAddr, b: IpAddr) {
        self.lock().partitions.insert(pair(a, b));
    }

    /// Partitions `a` from every node on the network.
    pub fn isolate(&self, a: IpAddr, all: &[IpAddr]) {
        for &b in all.iter().filter(|&&b| b != a) {
            self.partition(a, b);
        }
    }

    pub fn heal_all(&self) {
        self.lock().partitions.clear();
    }

    /// Frames from `from` to `to` are delayed by `d`.
    pub fn delay(&self, from: IpAddr, to: IpAddr, d: Duration) {
        self.lock().delays.insert((from, to), d);
    }

    /// Each frame from `from` to `to` is lost with probability `p`.
    pub fn loss(&self, from: IpAddr, to: IpAddr, p: f64) {
        self.lock().loss.insert((from, to), p);
    }

    /// Closes every open connection between `a` and `b`, as a reset would.
    pub fn sever(&self, a: IpAddr, b: IpAddr) {
        let mut net = self.lock();
        net.links.retain(|(x, y, close)| {
            let hit = pair(*x, *y) == pair(a, b);
            if hit {
                close.cancel();
            }
            !hit && !close.is_cancelled()
        });
    }

    /// Makes `ip` present `name` instead of its own address (a wrong certificate, or, with
    /// several comma-separated names, a certificate with several SANs).
    pub fn set_identity(&self, ip: IpAddr, name: &str) {
        self.lock().identities.insert(ip, name.to_string());
    }

    /// Decides the fate of one frame: `None` to drop it, else the delay to apply.
    fn fate(&self, from: IpAddr, to: IpAddr) -> Option<Duration> {
        let mut net = self.lock();
        if net.partitioned(from, to) {
            return None;
        }
        let p = net.loss.get(&(from, to)).copied().unwrap_or(0.0);
        if p > 0.0 && net.random() < p {
            return None;
        }
        Some(net.delays.get(&(from, to)).copied().unwrap_or_default())
    }

    fn forward(
        &self,
        from: IpAddr,
        to: IpAddr,
        mut rx: mpsc::Receiver<Bytes>,
        tx: mpsc::Sender<Bytes>,
        sever: CancellationToken,
    ) {
        let network = self.clone();
        tokio::spawn(async move {
            // Frames in flight with the instant each is due: a delay holds every frame for
            // that long after it was sent, as a longer wire would, in order, and does not
            // add up frame after frame.
            let mut in_flight: std::collections::VecDeque<(tokio::time::Instant, Bytes)> =
                Default::default();
            loop {
                let due = in_flight.front().map(|(d, _)| *d);
                tokio::select! {
                    _ = sever.cancelled() => return,
                    _ = tx.closed() => return,
                    f = rx.recv() => match f {
                        Some(frame) => {
                            if let Some(delay) = network.fate(from, to) {
                                in_flight.push_back((tokio::time::Instant::now() + delay, frame));
                            }
                        }
                        None if in_flight.is_empty() => return,
                        None => {
                            if let Some(due) = due {
                                tokio::time::sleep_until(due).await;
                            }
                        }
                    },
                    _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {}
                }
                let now = tokio::time::Instant::now();
                while in_flight.front().is_some_and(|(d, _)| *d <= now) {
                    let Some((_, frame)) = in_flight.pop_front() else {
                        break;
                    };
                    if tx.send(frame).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

pub struct MemoryTransport {
    network: MemoryNetwork,
    ip: IpAddr,
    own: mpsc::Sender<AcceptEvent>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<AcceptEvent>>,
}

impl Drop for MemoryTransport {
    fn drop(&mut self) {
        let mut net = self.network.lock();
        if net
            .listeners
            .get(&self.ip)
            .is_some_and(|l| l.same_channel(&self.own))
        {
            net.listeners.remove(&self.ip);
        }
    }
}

impl Transport for MemoryTransport {
    fn dial<'a>(
        &'a self,
        addr: SocketAddr,
        _name: &'a str,
    ) -> BoxFuture<'a, Result<Link, DialError>> {
        Box::pin(async move {
            let to = addr.ip();
            let (partitioned, listener, my_identity, their_identity) = {
                let net = self.network.lock();
                (
                    net.partitioned(self.ip, to),
                    net.listeners.get(&to).cloned(),
                    net.identity(self.ip),
                    net.identity(to),
                )
            };
            if partitioned {
                tokio::time::sleep(Duration::from_secs(1)).await;
                return Err(DialError::Connect("connection timed out".into()));
            }
            let refused = || DialError::Connect("connection refused".into());
            let listener = listener.ok_or_else(refused)?;
            // Forwarders stop abruptly only on `sever` (a reset); when a side drops its link, its
            // sender closes and what it queued is still delivered, as TCP delivers before FIN.
            let sever = CancellationToken::new();
            let (a_tx, ab_rx) = mpsc::channel(1024);
            let (ab_tx, b_rx) = mpsc::channel(1024);
            let (b_tx, ba_rx) = mpsc::channel(1024);
            let (ba_tx, a_rx) = mpsc::channel(1024);
            self.network
                .forward(self.ip, to, ab_rx, ab_tx, sever.clone());
            self.network
                .forward(to, self.ip, ba_rx, ba_tx, sever.clone());
            self.network.lock().links.push((self.ip, to, sever));
            let link = |tx, rx, ip, identity| {
                let info = LinkInfo {
                    remote_ip: Some(ip),
                    certificates: Vec::new(),
                    memory_identity: Some(identity),
                };
                Link::new(
                    tx,
                    rx,
                    info,
                    Arc::new(AtomicUsize::new(MAX_FRAME_BEFORE_HELLO)),
                    Arc::default(),
                    CancellationToken::new(),
                )
            };
            let theirs = link(b_tx, b_rx, self.ip, my_identity);
            listener
                .send(AcceptEvent::Link(theirs))
                .await
                .map_err(|_| refused())?;
            Ok(link(a_tx, a_rx, to, their_identity))
        })
    }

    fn accept(&self) -> BoxFuture<'_, Option<AcceptEvent>> {
        Box::pin(async move { self.incoming.lock().await.recv().await })
    }

    fn certificate_status(&self, info: &LinkInfo, address: &str) -> CertStatus {
        match &info.memory_identity {
            // Several names, comma-separated, stand for a certificate's SANs.
            Some(name) if name.split(',').any(|n| n == address) => CertStatus::Valid,
            Some(name) => CertStatus::Invalid(format!(
                "Common Name in certificate does not match: peer address is '{address}', certificate names '{name}'"
            )),
            None => CertStatus::Invalid("no certificate presented".into()),
        }
    }

    fn own_certificate_status(&self, address: &str) -> CertStatus {
        let identity = self.network.lock().identity(self.ip);
        self.certificate_status(
            &LinkInfo {
                memory_identity: Some(identity),
                ..LinkInfo::default()
            },
            address,
        )
    }
}
