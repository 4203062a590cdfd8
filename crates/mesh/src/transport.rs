//! The edge between the mesh and the network: a [`Transport`] dials and accepts [`Link`]s,
//! each a pair of frame channels. The TLS transport pumps frames between the channels and a
//! TLS stream; the in-memory one forwards them through fault filters.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use causeway_pki::CertStatus;
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the transport knows about the far end of a link.
#[derive(Clone, Debug, Default)]
pub struct LinkInfo {
    /// The source address the connection came from (the peer's address when it dialled us).
    pub remote_ip: Option<IpAddr>,
    /// The peer's certificate chain, leaf first (TLS).
    pub certificates: Vec<CertificateDer<'static>>,
    /// The name a node presents on the in-memory network (stands in for its certificate).
    pub memory_identity: Option<String>,
}

/// One connection: frames out on `tx`, frames in on `rx` (closed when the connection is).
/// Dropping the link closes the connection.
pub struct Link {
    pub tx: mpsc::Sender<Bytes>,
    pub rx: mpsc::Receiver<Bytes>,
    pub info: LinkInfo,
    max_frame: Arc<AtomicUsize>,
    close_reason: Arc<Mutex<Option<String>>>,
    _close: DropGuard,
}

impl Link {
    pub fn new(
        tx: mpsc::Sender<Bytes>,
        rx: mpsc::Receiver<Bytes>,
        info: LinkInfo,
        max_frame: Arc<AtomicUsize>,
        close_reason: Arc<Mutex<Option<String>>>,
        close: CancellationToken,
    ) -> Self {
        Self {
            tx,
            rx,
            info,
            max_frame,
            close_reason,
            _close: close.drop_guard(),
        }
    }

    /// Why the transport closed the link, when it knows (an oversized frame, a read error).
    pub fn close_reason(&self) -> Option<String> {
        self.close_reason.lock().ok().and_then(|r| r.clone())
    }

    /// Raises (or lowers) the largest frame the link accepts: small until the hello is
    /// accepted, so an unauthenticated caller cannot make us buffer megabytes.
    pub fn set_max_frame(&self, bytes: usize) {
        self.max_frame.store(bytes, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone)]
pub enum DialError {
    /// No TCP connection: refused, unreachable, timed out.
    Connect(String),
    /// TCP connected, the TLS handshake failed. `certificate` is the peer's certificate status
    /// when the failure was ours to judge it.
    Tls {
        reason: String,
        certificate: Option<CertStatus>,
    },
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialError::Connect(r) => write!(f, "cannot open TCP connection: {r}"),
            DialError::Tls { reason, .. } => write!(f, "TLS handshake failed: {reason}"),
        }
    }
}

/// What the listening side reports.
pub enum AcceptEvent {
    Link(Link),
    /// A connection that failed before it could become a link (TLS refused, timed out).
    Refused {
        remote_ip: IpAddr,
        reason: String,
        certificate: Option<CertStatus>,
    },
}

pub trait Transport: Send + Sync + 'static {
    /// Connects to `addr`; `name` is the peer's address as written in the peer list.
    fn dial<'a>(
        &'a self,
        addr: SocketAddr,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Link, DialError>>;
    /// The next accepted connection or refusal; `None` once the listener is closed.
    fn accept(&self) -> BoxFuture<'_, Option<AcceptEvent>>;
    /// Whether the certificate behind `info` is valid for the peer address `address`.
    fn certificate_status(&self, info: &LinkInfo, address: &str) -> CertStatus;
    /// The status of this node's own certificate for its own address.
    fn own_certificate_status(&self, address: &str) -> CertStatus;
    /// Stops accepting; done when the transport's own tasks have ended (called by the
    /// mesh's shutdown, after it closed every link).
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
