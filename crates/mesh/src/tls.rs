//! Cluster links over mutual TLS on TCP (4372 by default).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use causeway_pki::{check_certificate, describe_tls_error, CertStatus, NodeIdentity, TlsMode};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::settings::Timing;
use crate::transport::{AcceptEvent, BoxFuture, DialError, Link, LinkInfo, Transport};
use causeway_common::slots::SourceSlots;

use crate::wire::{read_frame, write_frame, MAX_FRAME_BEFORE_HELLO};

/// Handshakes in progress at once, in all and from one source address. Past these, new
/// connections are closed at once: a flood cannot starve the real peers' reconnects for long.
const MAX_PENDING_HANDSHAKES: usize = 64;
const MAX_PENDING_PER_SOURCE: usize = 8;
/// Handshakes kept for the peers' own addresses: a flood from strangers that fills the
/// others never keeps a peer out.
const MAX_PENDING_FROM_PEERS: usize = 16;

pub struct TlsTransport {
    identity: NodeIdentity,
    connector: TlsConnector,
    /// The address outgoing connections are bound to, so the acceptor sees our peer address.
    local_ip: Option<IpAddr>,
    timing: Timing,
    incoming: tokio::sync::Mutex<mpsc::Receiver<AcceptEvent>>,
    /// The accept loop, handshakes in progress and every link's pumps.
    tasks: TaskTracker,
    /// Stops the accept loop: the caller's token, or this transport's shutdown.
    stop_accepting: CancellationToken,
}

fn tls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// The certificate status implied by a failed handshake, when it was our verifier that failed.
fn refused_certificate(e: &std::io::Error) -> Option<CertStatus> {
    match tls_error(e)? {
        err @ (rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) => {
            Some(CertStatus::Invalid(describe_tls_error(err)))
        }
        _ => None,
    }
}

fn describe_io(e: &std::io::Error) -> String {
    match tls_error(e) {
        Some(t) => describe_tls_error(t),
        None => e.to_string(),
    }
}

impl TlsTransport {
    /// Binds the cluster port and starts accepting. Fails only when the port cannot be bound.
    /// `peer_ips`: the peers' addresses (the IP literals of the peer list), whose
    /// handshakes have slots of their own.
    pub async fn bind(
        listen: SocketAddr,
        local_ip: Option<IpAddr>,
        mode: TlsMode,
        identity: NodeIdentity,
        timing: Timing,
        peer_ips: Vec<IpAddr>,
        cancel: CancellationToken,
    ) -> std::io::Result<Arc<Self>> {
        let server = causeway_pki::server_config(mode, &identity).map_err(std::io::Error::other)?;
        let client = causeway_pki::client_config(mode, &identity).map_err(std::io::Error::other)?;
        let listener = TcpListener::bind(listen).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("binding the cluster port {listen}: {e}"))
        })?;
        let (tx, rx) = mpsc::channel(64);
        let tasks = TaskTracker::new();
        let stop_accepting = cancel.child_token();
        tasks.spawn(accept_loop(
            listener,
            TlsAcceptor::from(server),
            tx,
            timing.handshake_timeout,
            peer_ips,
            stop_accepting.clone(),
            tasks.clone(),
        ));
        Ok(Arc::new(Self {
            identity,
            connector: TlsConnector::from(client),
            local_ip,
            timing,
            incoming: tokio::sync::Mutex::new(rx),
            tasks,
            stop_accepting,
        }))
    }

    async fn connect_tcp(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = self.local_ip.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = tokio::time::timeout(self.timing.connect_timeout, socket.connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connection timed out")
            })??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Transport for TlsTransport {
    fn dial<'a>(
        &'a self,
        addr: SocketAddr,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Link, DialError>> {
        Box::pin(async move {
            let tcp = self
                .connect_tcp(addr)
                .await
                .map_err(|e| DialError::Connect(e.to_string()))?;
            let server_name = ServerName::try_from(name.to_string())
                .unwrap_or_else(|_| ServerName::from(addr.ip()));
            let tls = tokio::time::timeout(
                self.timing.handshake_timeout,
                self.connector.connect(server_name, tcp),
            )
            .await
            .map_err(|_| DialError::Tls {
                reason: format!(
                    "no TLS handshake within {} s",
                    self.timing.handshake_timeout.as_secs()
                ),
                certificate: None,
            })?
            .map_err(|e| DialError::Tls {
                reason: describe_io(&e),
                certificate: refused_certificate(&e),
            })?;
            let certificates = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.to_vec())
                .unwrap_or_default();
            let info = LinkInfo {
                remote_ip: Some(addr.ip()),
                certificates,
                memory_identity: None,
            };
            Ok(spawn_pumps(tls, info, &self.tasks))
        })
    }

    fn accept(&self) -> BoxFuture<'_, Option<AcceptEvent>> {
        Box::pin(async move { self.incoming.lock().await.recv().await })
    }

    fn certificate_status(&self, info: &LinkInfo, address: &str) -> CertStatus {
        check_certificate(&info.certificates, address, &self.identity.roots)
    }

    fn own_certificate_status(&self, address: &str) -> CertStatus {
        check_certificate(&self.identity.chain, address, &self.identity.roots)
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        // Handshakes in progress end within their timeout, pumps when their link closes.
        self.stop_accepting.cancel();
        self.tasks.close();
        Box::pin(self.tasks.wait())
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    events: mpsc::Sender<AcceptEvent>,
    handshake_timeout: Duration,
    peer_ips: Vec<IpAddr>,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    let from_peers = Arc::new(Semaphore::new(MAX_PENDING_FROM_PEERS));
    let per_source = SourceSlots::new(MAX_PENDING_PER_SOURCE);
    loop {
        let (stream, from) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and the like: wait instead of spinning.
                    tracing::warn!(target: "network.cluster", reason = %e, "Cannot accept cluster connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let refuse = move |reason: String| AcceptEvent::Refused {
            remote_ip: from.ip(),
            reason,
            certificate: None,
        };
        let slots = if peer_ips.contains(&from.ip()) {
            &from_peers
        } else {
            &pending
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            let _ = events.try_send(refuse(format!(
                "more than {MAX_PENDING_HANDSHAKES} handshakes in progress"
            )));
            continue;
        };
        let Some(slot) = per_source.take(from.ip()) else {
            let _ = events.try_send(refuse(format!(
                "more than {MAX_PENDING_PER_SOURCE} handshakes in progress from this address"
            )));
            continue;
        };
        let acceptor = acceptor.clone();
        let events = events.clone();
        let pumps = tasks.clone();
        tasks.spawn(async move {
            let _ = stream.set_nodelay(true);
            let result = tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await;
            drop((permit, slot));
            let event = match result {
                Err(_) => refuse(format!(
                    "no TLS handshake within {} s",
                    handshake_timeout.as_secs()
                )),
                Ok(Err(e)) => AcceptEvent::Refused {
                    remote_ip: from.ip(),
                    reason: format!("TLS handshake failed: {}", describe_io(&e)),
                    certificate: refused_certificate(&e),
                },
                Ok(Ok(tls)) => {
                    let certificates = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(|c| c.to_vec())
                        .unwrap_or_default();
                    AcceptEvent::Link(spawn_pumps(
                        tls,
                        LinkInfo {
                            remote_ip: Some(from.ip()),
                            certificates,
                            memory_identity: None,
                        },
                        &pumps,
                    ))
                }
            };
            let _ = events.send(event).await;
        });
    }
}

/// Turns a stream into a [`Link`]: a reader task turning frames into messages on `rx`, a
/// writer task writing what arrives on `tx` (batched, flushed when the queue is empty).
fn spawn_pumps<S>(stream: S, info: LinkInfo, tasks: &TaskTracker) -> Link
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, writer) = tokio::io::split(stream);
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(1024);
    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(1024);
    let close = CancellationToken::new();
    let max_frame = Arc::new(AtomicUsize::new(MAX_FRAME_BEFORE_HELLO));
    let close_reason = Arc::new(Mutex::new(None));

    let (stop, max, why) = (close.clone(), max_frame.clone(), close_reason.clone());
    tasks.spawn(async move {
        loop {
            let frame = tokio::select! {
                _ = stop.cancelled() => return,
                f = read_frame(&mut reader, max.load(Ordering::Relaxed)) => f,
            };
            match frame {
                Ok(Some(f)) => {
                    if in_tx.send(f).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    if let Ok(mut r) = why.lock() {
                        *r = Some(e.to_string());
                    }
                    return;
                }
            }
        }
    });

    let stop = close.clone();
    tasks.spawn(async move {
        let mut w = BufWriter::with_capacity(64 * 1024, writer);
        loop {
            let frame = tokio::select! {
                f = out_rx.recv() => f,
                _ = stop.cancelled() => {
                    // Closing: give what is queued (a Goodbye) a moment to leave.
                    let _ = tokio::time::timeout(Duration::from_millis(100), async {
                        while let Ok(f) = out_rx.try_recv() {
                            write_frame(&mut w, &f).await?;
                        }
                        w.flush().await?;
                        w.shutdown().await
                    }).await;
                    return;
                }
            };
            let Some(frame) = frame else {
                let _ = w.shutdown().await;
                return;
            };
            let mut result = write_frame(&mut w, &frame).await;
            while let (Ok(()), Ok(next)) = (&result, out_rx.try_recv()) {
                result = write_frame(&mut w, &next).await;
            }
            if result.is_err() || w.flush().await.is_err() {
                return;
            }
        }
    });

    Link::new(out_tx, in_rx, info, max_frame, close_reason, close)
}
