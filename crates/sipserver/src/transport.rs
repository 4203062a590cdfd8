//! SIP transports (RFC 3261 §18): on each of the system's SIP addresses a UDP socket, TCP
//! and TLS listeners; and the table of open connections (accepted or dialled) that requests
//! and responses are written on. Every listener caps sizes, connections per source and
//! messages per source per second.
//!
//! Most systems have one SIP address. The secondary of two HA pairs has two, one virtual IP
//! per pair: what arrives on one address is answered from it and forwarded from it, so a
//! client and the next hop see the address they used (`Source::local`, `Target::local`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use causeway_common::slots::{SourceSlot, SourceSlots};
use causeway_sip::{frame, Frame, Limits, Message, Transport as Framing};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;

const LOG: &str = "network.sip";
/// Sources with a rate bucket of their own.
const MAX_SOURCES: usize = 65_536;
/// TLS handshakes in progress at once; more wait their turn in the accept queue.
const MAX_HANDSHAKES: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Proto {
    Udp,
    Tcp,
    Tls,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Udp => "UDP",
            Proto::Tcp => "TCP",
            Proto::Tls => "TLS",
        }
    }

    /// From a Via transport or a URI's `transport` parameter.
    pub fn parse(text: &str) -> Option<Proto> {
        match text.to_ascii_lowercase().as_str() {
            "udp" => Some(Proto::Udp),
            "tcp" => Some(Proto::Tcp),
            "tls" => Some(Proto::Tls),
            _ => None,
        }
    }
}

/// Where a message came from; responses go back the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Source {
    pub proto: Proto,
    pub remote: SocketAddr,
    /// The connection it arrived on (TCP/TLS).
    pub conn: Option<u64>,
    /// This system's address it arrived at.
    pub local: IpAddr,
}

pub struct Incoming {
    pub msg: Message,
    pub source: Source,
}

/// Takes each message as it is read, on the thread that read it: a UDP request is then
/// handled on its reader's thread, with no hand-off to another before it is answered
/// (each costs a wake-up, a large part of a REGISTER's cost; bench/RESULTS.md).
pub trait Deliver: Send + Sync {
    /// False when the message is refused because the service is behind (counted as dropped).
    fn deliver(&self, incoming: Incoming) -> bool;
}

/// Where to send: an open connection when there is one, else a new one (or a datagram).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub proto: Proto,
    pub addr: SocketAddr,
    pub conn: Option<u64>,
    /// The address of this system to send a datagram or dial a connection from; none: the
    /// first.
    pub local: Option<IpAddr>,
}

/// Caps every listener applies.
#[derive(Clone, Debug)]
pub struct Caps {
    pub limits: Limits,
    /// Messages per second from one source address (all transports), and the burst allowed.
    pub rate_per_source: u32,
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    /// A connection must complete a message this long after it starts one (slow senders).
    pub message_timeout: Duration,
    /// A connection with no traffic at all for this long is closed (RFC 5626 keep-alives
    /// are traffic).
    pub idle_timeout: Duration,
    /// A connection that has not yet sent one whole SIP message is closed after this long:
    /// idle connections that never speak do not wait for `idle_timeout`.
    pub first_message_timeout: Duration,
    /// TLS handshakes in progress from one source address (the global cap is
    /// `MAX_HANDSHAKES`): one address cannot take every handshake slot.
    pub max_handshakes_per_source: usize,
    /// A TLS handshake must finish within this.
    pub handshake_timeout: Duration,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            limits: Limits::default(),
            rate_per_source: 50_000,
            max_connections: 10_000,
            max_connections_per_source: 512,
            message_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(7_300),
            first_message_timeout: Duration::from_secs(20),
            max_handshakes_per_source: 8,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// The ports every SIP address of this system listens on, and its first address.
pub struct Bound {
    pub ip: IpAddr,
    pub udp_port: u16,
    pub tcp_port: u16,
    pub tls_port: Option<u16>,
}

struct Conn {
    proto: Proto,
    remote: SocketAddr,
    local: IpAddr,
    out: mpsc::Sender<Bytes>,
}

/// One SIP address of this system and the queue of its UDP sender.
struct Face {
    ip: IpAddr,
    /// Datagrams to send, paced per destination, sent by a task on this address's reader
    /// thread (`udp_send_loop`).
    udp_out: Arc<UdpOut>,
}

/// Datagrams waiting to be sent from one address, and the sender's wake-up.
struct UdpOut {
    pacer: Mutex<crate::pacer::Pacer>,
    queued: tokio::sync::Notify,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

pub struct Transports {
    pub bound: Bound,
    caps: Caps,
    /// The first is `bound.ip`.
    faces: Vec<Face>,
    conns: Mutex<HashMap<u64, Conn>>,
    /// Open connections by (transport, remote): requests to an address reuse one (§18.1.1).
    by_remote: Mutex<HashMap<(Proto, SocketAddr), u64>>,
    next_conn: AtomicU64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    /// The name a TLS server at an address must prove (a zone address written as a name,
    /// the domain a DNS zone resolved: RFC 5922 §4). An address not here must be named by
    /// its certificate as the IP address.
    tls_names: Mutex<HashMap<SocketAddr, Arc<str>>>,
    /// Until the service sets `handler` (it exists only after its transports), messages
    /// wait in this queue.
    incoming: mpsc::Sender<Incoming>,
    handler: std::sync::OnceLock<Box<dyn Deliver>>,
    handshakes: Arc<tokio::sync::Semaphore>,
    tls: Option<(tokio_rustls::TlsAcceptor, tokio_rustls::TlsConnector)>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    /// The SIP service's tasks: connections and loops end with it.
    tasks: TaskTracker,
    /// TLS handshakes in progress per source address.
    handshaking: SourceSlots,
}

/// A second handle on a tokio UDP socket, for a reader on another runtime.
fn clone_std(socket: &UdpSocket) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::AsFd as _;
    Ok(std::net::UdpSocket::from(
        socket.as_fd().try_clone_to_owned()?,
    ))
}

/// What the SIP UDP socket asks the kernel to buffer. Responses and requests arrive in
/// bursts (a group commit answers a batch at once, a client retransmits a batch); the
/// usual default (208 KiB) holds about 150 datagrams, a few milliseconds of load when the
/// reader is not scheduled.
const UDP_RECEIVE_BUFFER: usize = 4 << 20;

/// Asks for `bytes` of receive buffer and returns what the kernel granted (it caps the
/// request at `net.core.rmem_max`).
fn enlarge_receive_buffer(socket: &UdpSocket, bytes: usize) -> usize {
    let sock = socket2::SockRef::from(socket);
    if let Err(e) = sock.set_recv_buffer_size(bytes) {
        warn!(target: LOG, reason = %e, "SIP UDP receive buffer could not be enlarged");
    }
    // Linux reports twice what it accounts for payload (the rest is bookkeeping).
    let granted = sock.recv_buffer_size().unwrap_or(0) / 2;
    if granted < bytes {
        warn!(target: LOG, asked = bytes, granted = granted,
            "SIP UDP receive buffer is smaller than asked: raise net.core.rmem_max to absorb bursts");
    }
    granted
}

/// Addresses whose TLS name is remembered, at most.
const MAX_TLS_NAMES: usize = 4_096;

/// Datagrams waiting for the sender; beyond, they are dropped (and counted) like a full
/// socket buffer would: UDP senders retransmit.
const UDP_QUEUE: usize = 65_536;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A socket bound to `ip:port` even when `ip` is not on an interface yet (`IP_FREEBIND`):
/// an HA pair's virtual IP, which only the lease holder has. Nothing reaches the socket
/// until the address arrives, and no bind is needed on the failover path.
fn bind_freely(ip: IpAddr, port: u16, kind: socket2::Type) -> std::io::Result<socket2::Socket> {
    let addr = std::net::SocketAddr::new(ip, port);
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), kind, None)?;
    if ip.is_ipv4() {
        socket.set_freebind_v4(true)?;
    } else {
        socket.set_freebind_v6(true)?;
    }
    if kind == socket2::Type::STREAM {
        socket.set_reuse_address(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

fn listen_freely(ip: IpAddr, port: u16) -> std::io::Result<TcpListener> {
    let socket = bind_freely(ip, port, socket2::Type::STREAM)?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// The sockets of one SIP address, bound and not yet served.
struct Sockets {
    ip: IpAddr,
    udp: UdpSocket,
    tcp: TcpListener,
    tls: Option<TcpListener>,
}

impl Sockets {
    /// Binds `ip`'s UDP, TCP and (with `tls_port`) TLS ports; port 0 picks a free one.
    fn bind(
        ip: IpAddr,
        udp_port: u16,
        tcp_port: u16,
        tls_port: Option<u16>,
    ) -> anyhow::Result<Sockets> {
        use anyhow::Context as _;
        let udp = bind_freely(ip, udp_port, socket2::Type::DGRAM)
            .and_then(|s| UdpSocket::from_std(s.into()))
            .with_context(|| format!("binding SIP UDP on {ip}:{udp_port}"))?;
        let tcp = listen_freely(ip, tcp_port)
            .with_context(|| format!("binding SIP TCP on {ip}:{tcp_port}"))?;
        let tls = match tls_port {
            Some(port) => Some(
                listen_freely(ip, port)
                    .with_context(|| format!("binding SIP TLS on {ip}:{port}"))?,
            ),
            None => None,
        };
        Ok(Sockets { ip, udp, tcp, tls })
    }
}

impl Transports {
    /// Binds UDP and TCP on `ip:udp_port`/`ip:tcp_port`, and TLS on `tls_port` when given a
    /// TLS configuration, for each of `ips` (the first is the system's SIP address). Port 0
    /// picks a free port (tests); the other addresses take the ports the first got.
    #[allow(clippy::too_many_arguments)]
    pub async fn bind(
        ips: &[IpAddr],
        udp_port: u16,
        tcp_port: u16,
        tls: Option<(u16, Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>)>,
        caps: Caps,
        incoming: mpsc::Sender<Incoming>,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
        tasks: TaskTracker,
    ) -> anyhow::Result<Arc<Transports>> {
        use anyhow::Context as _;
        let (&ip, more) = ips
            .split_first()
            .context("SIP needs at least one address to listen on")?;
        let first = Sockets::bind(ip, udp_port, tcp_port, tls.as_ref().map(|t| t.0))?;
        let udp_port = first.udp.local_addr()?.port();
        let tcp_port = first.tcp.local_addr()?.port();
        let tls_port = match &first.tls {
            Some(l) => Some(l.local_addr()?.port()),
            None => None,
        };
        let mut sockets = vec![first];
        for &ip in more {
            sockets.push(Sockets::bind(ip, udp_port, tcp_port, tls_port)?);
        }
        let mut faces = Vec::with_capacity(sockets.len());
        let mut udp_buffer = 0;
        for s in &sockets {
            udp_buffer = enlarge_receive_buffer(&s.udp, UDP_RECEIVE_BUFFER);
            faces.push(Face {
                ip: s.ip,
                udp_out: Arc::new(UdpOut {
                    pacer: Mutex::new(crate::pacer::Pacer::new(UDP_QUEUE)),
                    queued: tokio::sync::Notify::new(),
                }),
            });
        }
        let handshaking = SourceSlots::new(caps.max_handshakes_per_source);
        let t = Arc::new(Transports {
            bound: Bound {
                ip,
                udp_port,
                tcp_port,
                tls_port,
            },
            caps,
            faces,
            conns: Mutex::new(HashMap::new()),
            by_remote: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            buckets: Mutex::new(HashMap::new()),
            tls_names: Mutex::new(HashMap::new()),
            incoming,
            handler: std::sync::OnceLock::new(),
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
            tls: tls.map(|(_, server, client)| {
                (
                    tokio_rustls::TlsAcceptor::from(server),
                    tokio_rustls::TlsConnector::from(client),
                )
            }),
            metrics,
            cancel,
            tasks,
            handshaking,
        });
        for s in sockets {
            t.spawn_udp_reader(&s.udp, s.ip)?;
            t.tasks
                .spawn(t.clone().accept_loop(s.tcp, Proto::Tcp, s.ip));
            if let Some(l) = s.tls {
                t.tasks.spawn(t.clone().accept_loop(l, Proto::Tls, s.ip));
            }
        }
        t.tasks.spawn(t.clone().forget_buckets());
        let ips = ips
            .iter()
            .map(|ip| ip.to_string())
            .collect::<Vec<_>>()
            .join(",");
        info!(target: LOG, ip = %ips, udp = udp_port, tcp = tcp_port, udp_buffer = udp_buffer,
            tls = tls_port.map(|p| p.to_string()).unwrap_or_else(|| "off".into()),
            "SIP listening");
        Ok(t)
    }

    /// Reads `udp` (bound to `local`) on a thread of its own: a worker busy elsewhere (a
    /// store write, a burst of tasks) must not leave datagrams to overflow the socket's
    /// receive buffer. The requests it reads are handled there too (`Deliver`), and their
    /// answers sent from there: a REGISTER crosses to another thread only to be saved.
    fn spawn_udp_reader(self: &Arc<Self>, udp: &UdpSocket, local: IpAddr) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let reader = clone_std(udp).context("starting the SIP UDP reader")?;
        let receiver = self.clone();
        std::thread::Builder::new()
            .name("sip-udp".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        warn!(target: LOG, reason = %e, "SIP UDP reader could not start");
                        return;
                    }
                };
                rt.block_on(async move {
                    // Registered with this thread's reactor.
                    match UdpSocket::from_std(reader) {
                        Ok(sock) => {
                            let sock = Arc::new(sock);
                            let out = receiver.face(Some(local)).udp_out.clone();
                            // Ends with this runtime, when the reader returns.
                            tokio::spawn(receiver.clone().udp_send_loop(out, sock.clone()));
                            receiver.udp_loop(sock, local).await
                        }
                        Err(e) => warn!(target: LOG, reason = %e, "SIP UDP reader could not start"),
                    }
                });
            })
            .context("starting the SIP UDP reader")?;
        Ok(())
    }

    /// A TLS connection to `addr` opened from now on must prove `name` (a DNS name; an IP
    /// address in text is checked as one).
    pub fn expect_tls_name(&self, addr: SocketAddr, name: &str) {
        let mut names = lock(&self.tls_names);
        if names.get(&addr).is_some_and(|n| **n == *name) {
            return;
        }
        // Zone addresses and DNS targets, re-set before each use: a table this full is
        // hostile DNS, and starting it over only costs the names not used since.
        if names.len() >= MAX_TLS_NAMES {
            names.clear();
        }
        names.insert(addr, name.into());
    }

    /// What a TLS server at `addr` must prove it is.
    fn tls_name(&self, addr: SocketAddr) -> rustls::pki_types::ServerName<'static> {
        let ip = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        match lock(&self.tls_names).get(&addr) {
            Some(name) => rustls::pki_types::ServerName::try_from(name.to_string()).unwrap_or(ip),
            None => ip,
        }
    }

    /// From now on every message read goes to `handler` (the first one set stays).
    pub fn set_handler(&self, handler: Box<dyn Deliver>) {
        let _ = self.handler.set(handler);
    }

    /// This system's SIP addresses, the first first.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.faces.iter().map(|f| f.ip)
    }

    /// The port this system's messages say it listens on for `proto`.
    pub fn port(&self, proto: Proto) -> u16 {
        match proto {
            Proto::Udp => self.bound.udp_port,
            Proto::Tcp => self.bound.tcp_port,
            Proto::Tls => self.bound.tls_port.unwrap_or(self.bound.tcp_port),
        }
    }

    pub fn has_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn connection_alive(&self, conn: u64) -> bool {
        lock(&self.conns).contains_key(&conn)
    }

    /// An open connection's transport and remote address.
    pub fn connection(&self, conn: u64) -> Option<Target> {
        lock(&self.conns).get(&conn).map(|c| Target {
            proto: c.proto,
            addr: c.remote,
            conn: Some(conn),
            local: Some(c.local),
        })
    }

    pub fn connection_count(&self) -> usize {
        lock(&self.conns).len()
    }

    /// Takes one token from `ip`'s bucket; false when it is over its rate.
    fn admit(&self, ip: IpAddr) -> bool {
        let rate = f64::from(self.caps.rate_per_source.max(1));
        let now = Instant::now();
        let mut buckets = lock(&self.buckets);
        // Beyond MAX_SOURCES (a flood from spoofed addresses), new sources share one
        // bucket, so the table cannot grow without bound.
        let key = if buckets.len() >= MAX_SOURCES && !buckets.contains_key(&ip) {
            IpAddr::from([0, 0, 0, 0])
        } else {
            ip
        };
        let b = buckets.entry(key).or_insert(Bucket {
            tokens: rate,
            last: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(rate);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Buckets of sources that went quiet are dropped, so spoofed sources cannot grow it.
    async fn forget_buckets(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            }
            let now = Instant::now();
            lock(&self.buckets).retain(|_, b| now.duration_since(b.last) < Duration::from_secs(10));
        }
    }

    fn deliver(&self, raw: Bytes, source: Source, framing: Framing) -> Result<(), u16> {
        self.metrics.received.fetch_add(1, Ordering::Relaxed);
        match Message::parse(raw.clone(), framing, &self.caps.limits) {
            Ok(mut msg) => {
                // RFC 3581 / §18.2.1: a request carries where it really came from, in every
                // answer to it and every copy forwarded.
                if msg.is_request() {
                    if let Some(stamped) = causeway_sip::build::stamp_via(&msg, source.remote) {
                        match Message::parse(stamped, framing, &self.caps.limits) {
                            Ok(m) => msg = m,
                            Err(e) => debug!(target: LOG, src = %source.remote, reason = %e,
                                "Via not stamped: the stamped request does not parse"),
                        }
                    }
                }
                let incoming = Incoming { msg, source };
                let taken = match self.handler.get() {
                    Some(handler) => handler.deliver(incoming),
                    None => self.incoming.try_send(incoming).is_ok(),
                };
                if !taken {
                    // The core is behind: drop; UDP senders retransmit, and a stream's
                    // sender gets no answer and times out rather than blocking every peer.
                    self.metrics.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            Err(e) => {
                self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                debug!(target: LOG, src = %source.remote, reason = %e, "Malformed SIP message");
                // A request whose start line we could read gets a 400 naming the reason,
                // counted with every other message and response this system sends.
                if let Some(resp) = crate::respond::to_malformed(&raw, &e) {
                    self.metrics.sent.fetch_add(1, Ordering::Relaxed);
                    self.metrics.response(e.status());
                    match source.conn {
                        Some(c) => {
                            self.send_on(c, resp);
                        }
                        None => self.send_datagram(resp, source.remote, Some(source.local)),
                    }
                }
                Err(e.status())
            }
        }
    }

    async fn udp_loop(self: Arc<Self>, udp: Arc<UdpSocket>, local: IpAddr) {
        let mut buf = vec![0u8; 65_536];
        loop {
            let (n, from) = tokio::select! {
                _ = self.cancel.cancelled() => return,
                r = udp.recv_from(&mut buf) => match r {
                    Ok(r) => r,
                    Err(e) => {
                        // ICMP errors surface here on some systems; never fatal.
                        debug!(target: LOG, reason = %e, "UDP receive error");
                        continue;
                    }
                },
            };
            let data = &buf[..n];
            // RFC 5626 keep-alive: CRLF CRLF gets CRLF back; a lone CRLF is ignored.
            if data.iter().all(|b| *b == b'\r' || *b == b'\n') {
                if data == b"\r\n\r\n" {
                    self.send_datagram(Bytes::from_static(b"\r\n"), from, Some(local));
                }
                continue;
            }
            if !self.admit(from.ip()) {
                self.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if n > self.caps.limits.max_message {
                self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let source = Source {
                proto: Proto::Udp,
                remote: from,
                conn: None,
                local,
            };
            let _ = self.deliver(Bytes::copy_from_slice(data), source, Framing::Datagram);
        }
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, proto: Proto, local: IpAddr) {
        loop {
            let (stream, remote) = tokio::select! {
                _ = self.cancel.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(target: LOG, reason = %e, "Accepting a SIP connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            if let Some(why) = self.refuse_connection(remote.ip()) {
                self.metrics
                    .refused_connections
                    .fetch_add(1, Ordering::Relaxed);
                debug!(target: LOG, src = %remote, reason = why, "SIP connection refused");
                continue;
            }
            let _ = stream.set_nodelay(true);
            let t = self.clone();
            self.tasks.spawn(async move {
                match proto {
                    Proto::Tls => {
                        let Some((acceptor, _)) = &t.tls else { return };
                        // Handshakes are not connections yet: bounded on their own, so slow
                        // or silent clients cannot hold unbounded memory and CPU.
                        let Some(slot) = t.handshake_slot(remote.ip()) else {
                            t.metrics
                                .refused_connections
                                .fetch_add(1, Ordering::Relaxed);
                            debug!(target: LOG, src = %remote, "SIP TLS handshake refused: too many in progress");
                            return;
                        };
                        let accepted =
                            tokio::time::timeout(t.caps.handshake_timeout, acceptor.accept(stream))
                                .await;
                        drop(slot);
                        match accepted {
                            Ok(Ok(s)) => t.run_connection(s, proto, remote, local, None).await,
                            _ => {
                                t.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                                debug!(target: LOG, src = %remote, "SIP TLS handshake failed");
                            }
                        }
                    }
                    _ => t.run_connection(stream, proto, remote, local, None).await,
                }
            });
        }
    }

    /// A slot for one TLS handshake from `ip`, if neither the global nor the per-source cap
    /// is reached; released when dropped.
    fn handshake_slot(&self, ip: IpAddr) -> Option<(OwnedSemaphorePermit, SourceSlot)> {
        let permit = self.handshakes.clone().try_acquire_owned().ok()?;
        Some((permit, self.handshaking.take(ip)?))
    }

    fn refuse_connection(&self, ip: IpAddr) -> Option<&'static str> {
        let conns = lock(&self.conns);
        if conns.len() >= self.caps.max_connections {
            return Some("too many connections");
        }
        let from_ip = conns.values().filter(|c| c.remote.ip() == ip).count();
        (from_ip >= self.caps.max_connections_per_source)
            .then_some("too many connections from this source")
    }

    fn register_connection(
        &self,
        proto: Proto,
        remote: SocketAddr,
        local: IpAddr,
    ) -> (u64, mpsc::Receiver<Bytes>) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(1024);
        lock(&self.conns).insert(
            id,
            Conn {
                proto,
                remote,
                local,
                out: tx,
            },
        );
        lock(&self.by_remote).insert((proto, remote), id);
        (id, rx)
    }

    fn forget_connection(&self, id: u64, proto: Proto, remote: SocketAddr) {
        lock(&self.conns).remove(&id);
        let mut by_remote = lock(&self.by_remote);
        if by_remote.get(&(proto, remote)) == Some(&id) {
            by_remote.remove(&(proto, remote));
        }
    }

    /// Reads framed messages and writes what is queued for the connection, until either
    /// side closes, a cap is hit, or the node stops.
    async fn run_connection<S>(
        self: Arc<Self>,
        stream: S,
        proto: Proto,
        remote: SocketAddr,
        local: IpAddr,
        registered: Option<(u64, mpsc::Receiver<Bytes>)>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // A connection this peer dialled has something to carry; one it accepted must
        // show it has, by a first message, within `first_message_timeout`.
        let dialled = registered.is_some();
        let (id, mut out) = match registered {
            Some(r) => r,
            None => self.register_connection(proto, remote, local),
        };
        let (mut reader, mut writer) = tokio::io::split(stream);
        let cancel = self.cancel.child_token();
        let writer_cancel = cancel.clone();
        let writer_task = self.tasks.spawn(async move {
            loop {
                let bytes = tokio::select! {
                    _ = writer_cancel.cancelled() => break,
                    b = out.recv() => match b { Some(b) => b, None => break },
                };
                if writer.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            writer_cancel.cancel();
            let _ = writer.shutdown().await;
        });
        let mut buf = BytesMut::with_capacity(8 * 1024);
        let mut message_started: Option<Instant> = None;
        let opened = Instant::now();
        let mut spoke = dialled;
        let why = loop {
            let deadline = match message_started {
                Some(t) => t + self.caps.message_timeout,
                None if !spoke => opened + self.caps.first_message_timeout,
                None => Instant::now() + self.caps.idle_timeout,
            };
            let read = tokio::select! {
                _ = cancel.cancelled() => break "closed",
                _ = tokio::time::sleep_until(deadline) => break if message_started.is_some() { "message not completed in time" } else { "idle" },
                r = reader.read_buf(&mut buf) => r,
            };
            match read {
                Ok(0) => break "closed by the remote end",
                Err(_) => break "read error",
                Ok(_) => {}
            }
            let mut broken = None;
            loop {
                match frame(&buf, &self.caps.limits) {
                    Ok(Frame::Incomplete) => break,
                    Ok(Frame::KeepAlive { len, ping }) => {
                        let _ = buf.split_to(len);
                        if ping {
                            self.send_on(id, Bytes::from_static(b"\r\n"));
                        }
                    }
                    Ok(Frame::Message { len }) => {
                        spoke = true;
                        let raw = buf.split_to(len).freeze();
                        if !self.admit(remote.ip()) {
                            self.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let source = Source {
                            proto,
                            remote,
                            conn: Some(id),
                            local,
                        };
                        if self.deliver(raw, source, Framing::Stream).is_err() {
                            broken = Some("malformed message");
                            break;
                        }
                    }
                    Err(e) => {
                        self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                        let raw = buf.split().freeze();
                        if let Some(resp) = crate::respond::to_malformed(&raw, &e) {
                            self.metrics.sent.fetch_add(1, Ordering::Relaxed);
                            self.metrics.response(e.status());
                            self.send_on(id, resp);
                        }
                        broken = Some("message cannot be framed");
                        break;
                    }
                }
            }
            if let Some(why) = broken {
                // Framing is lost after a bad message: the answer goes out, then we close.
                tokio::time::sleep(Duration::from_millis(50)).await;
                break why;
            }
            message_started = if buf.is_empty() {
                None
            } else {
                message_started.or(Some(Instant::now()))
            };
        };
        debug!(target: LOG, src = %remote, transport = proto.name(), reason = why, "SIP connection closed");
        self.forget_connection(id, proto, remote);
        cancel.cancel();
        let _ = writer_task.await;
    }

    async fn dial(&self, to: SocketAddr, from: IpAddr) -> std::io::Result<TcpStream> {
        let socket = match to {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        if from.is_ipv4() == to.is_ipv4() && !from.is_unspecified() {
            socket.bind(SocketAddr::new(from, 0))?;
        }
        socket.connect(to).await
    }

    /// This system's address `local` names, if it is one of them; else the first.
    fn face(&self, local: Option<IpAddr>) -> &Face {
        local
            .and_then(|ip| self.faces.iter().find(|f| f.ip == ip))
            .unwrap_or(&self.faces[0])
    }

    /// Queues a datagram for the sender of `from`; a full queue drops it, counted.
    fn send_datagram(&self, bytes: Bytes, to: SocketAddr, from: Option<IpAddr>) {
        let out = &self.face(from).udp_out;
        if lock(&out.pacer).push(to, bytes, std::time::Instant::now()) {
            // From the reader's own thread (an answer to a request it read), this only
            // schedules the sender there: no other thread wakes up.
            out.queued.notify_one();
        } else {
            self.metrics.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends `out`'s datagrams as the pacer lets them go, on the reader's runtime.
    async fn udp_send_loop(self: Arc<Self>, out: Arc<UdpOut>, sock: Arc<UdpSocket>) {
        use crate::pacer::Next;
        loop {
            let next = lock(&out.pacer).next(std::time::Instant::now());
            let wait = match next {
                Next::Send(to, bytes) => {
                    loop {
                        match sock.try_send_to(&bytes, to) {
                            // The socket's send buffer is full: wait for room.
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                if sock.writable().await.is_err() {
                                    break;
                                }
                            }
                            Err(e) => {
                                debug!(target: LOG, dst = %to, reason = %e, "UDP send failed");
                                break;
                            }
                            Ok(_) => break,
                        }
                    }
                    continue;
                }
                Next::WaitUntil(t) => Some(tokio::time::Instant::from_std(t)),
                Next::Idle => None,
            };
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = out.queued.notified() => {}
                _ = async {
                    match wait {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    }

    fn send_on(&self, conn: u64, bytes: Bytes) -> bool {
        let conns = lock(&self.conns);
        match conns.get(&conn) {
            Some(c) => c.out.try_send(bytes).is_ok(),
            None => false,
        }
    }

    /// Sends without waiting: on `target.conn` if it is open, else on any open connection
    /// to the address, else on a new one (dialled in the background), or as a datagram.
    pub fn send(self: &Arc<Self>, target: &Target, bytes: Bytes) {
        self.send_or(target, bytes, || {});
    }

    /// As `send`; `failed` runs when a new connection cannot be opened (a transport error,
    /// which the proxy answers at once rather than after a timeout).
    pub fn send_or(
        self: &Arc<Self>,
        target: &Target,
        bytes: Bytes,
        failed: impl FnOnce() + Send + 'static,
    ) {
        self.metrics.sent.fetch_add(1, Ordering::Relaxed);
        if target.proto == Proto::Udp {
            self.send_datagram(bytes, target.addr, target.local);
            return;
        }
        if let Some(c) = target.conn {
            if self.send_on(c, bytes.clone()) {
                return;
            }
        }
        let existing = lock(&self.by_remote)
            .get(&(target.proto, target.addr))
            .copied();
        if let Some(c) = existing {
            if self.send_on(c, bytes.clone()) {
                return;
            }
        }
        if lock(&self.conns).len() >= self.caps.max_connections {
            failed();
            return;
        }
        let from = self.face(target.local).ip;
        let (id, rx) = self.register_connection(target.proto, target.addr, from);
        self.send_on(id, bytes);
        let t = self.clone();
        let target = *target;
        self.tasks.spawn(async move {
            // From this system's SIP address, so the far end (another peer above all) sees
            // where the connection comes from.
            let connected =
                tokio::time::timeout(Duration::from_secs(5), t.dial(target.addr, from)).await;
            let stream = match connected {
                Ok(Ok(s)) => s,
                _ => {
                    debug!(target: LOG, dst = %target.addr, "SIP connection could not be opened");
                    t.forget_connection(id, target.proto, target.addr);
                    failed();
                    return;
                }
            };
            let _ = stream.set_nodelay(true);
            match target.proto {
                Proto::Tls => {
                    let Some((_, connector)) = &t.tls else {
                        t.forget_connection(id, target.proto, target.addr);
                        failed();
                        return;
                    };
                    let name = t.tls_name(target.addr);
                    match connector.connect(name, stream).await {
                        Ok(s) => {
                            t.clone()
                                .run_connection(s, target.proto, target.addr, from, Some((id, rx)))
                                .await
                        }
                        Err(e) => {
                            debug!(target: LOG, dst = %target.addr, reason = %e, "SIP TLS connection failed");
                            t.forget_connection(id, target.proto, target.addr);
                            failed();
                        }
                    }
                }
                _ => {
                    t.clone()
                        .run_connection(stream, target.proto, target.addr, from, Some((id, rx)))
                        .await
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel grants what was asked, up to `net.core.rmem_max`, and says so.
    #[tokio::test]
    async fn the_udp_receive_buffer_is_enlarged_up_to_the_kernel_limit() {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let default = socket2::SockRef::from(&sock).recv_buffer_size().unwrap() / 2;
        let max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let asked = default * 4;
        assert_eq!(enlarge_receive_buffer(&sock, asked), asked.min(max));
    }

    /// A zone address written as a name (or a DNS zone's domain) is checked against the
    /// name: a certificate that names only "localhost" is refused for 127.0.0.1 until
    /// the transports are told the server there must prove "localhost", then accepted.
    #[tokio::test]
    async fn a_tls_server_must_prove_the_name_it_is_expected_to() {
        use tokio::io::AsyncReadExt as _;
        causeway_pki::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = causeway_pki::ca_init(dir.path(), "Test CA").unwrap();
        let subject = causeway_pki::CsrSubject {
            common_name: Some("localhost".into()),
            fields: vec![],
            alt_names: vec!["localhost".into()],
        };
        let (key, csr) = causeway_pki::csr(dir.path(), "neighbour", &subject).unwrap();
        let crt = dir.path().join("neighbour.crt");
        causeway_pki::sign_csr(&csr, &ca, 30, &crt).unwrap();
        let server = Arc::new(
            rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(
                    causeway_pki::load_certs(&crt).unwrap(),
                    causeway_pki::load_key(&key).unwrap(),
                )
                .unwrap(),
        );
        let mut roots = rustls::RootCertStore::empty();
        for c in causeway_pki::load_certs(&ca.cert).unwrap() {
            roots.add(c).unwrap();
        }
        let client = Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );

        // The neighbour: each connection's first bytes, once its handshake succeeds.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let neighbour = listener.local_addr().unwrap();
        let (got_tx, mut got) = mpsc::unbounded_channel::<Vec<u8>>();
        let acceptor = tokio_rustls::TlsAcceptor::from(server.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, got_tx) = (acceptor.clone(), got_tx.clone());
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(stream).await {
                        let mut buf = vec![0u8; 4096];
                        if let Ok(n) = tls.read(&mut buf).await {
                            let _ = got_tx.send(buf[..n].to_vec());
                        }
                    }
                });
            }
        });

        let cancel = CancellationToken::new();
        let (incoming, _rx) = mpsc::channel(16);
        let transports = Transports::bind(
            &["127.0.0.1".parse().unwrap()],
            0,
            0,
            Some((0, server, client)),
            Caps::default(),
            incoming,
            Arc::default(),
            cancel.clone(),
            TaskTracker::new(),
        )
        .await
        .unwrap();
        let target = Target {
            proto: Proto::Tls,
            addr: neighbour,
            conn: None,
            local: None,
        };
        let options = Bytes::from_static(b"OPTIONS sip:localhost SIP/2.0\r\n\r\n");
        transports.send(&target, options.clone());
        let refused = tokio::time::timeout(Duration::from_secs(2), got.recv()).await;
        assert!(
            refused.is_err(),
            "a certificate that does not name 127.0.0.1 was accepted for it"
        );

        transports.expect_tls_name(neighbour, "localhost");
        transports.send(&target, options);
        let first = tokio::time::timeout(Duration::from_secs(5), got.recv())
            .await
            .expect("the server proving the expected name was reached")
            .unwrap();
        assert!(
            first.starts_with(b"OPTIONS"),
            "{:?}",
            String::from_utf8_lossy(&first)
        );
        cancel.cancel();
    }
}
