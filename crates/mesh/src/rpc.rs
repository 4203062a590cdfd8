//! Typed request/response over the mesh: an [`Endpoint`] is named by a path
//! (`consensus/calls/vote`), its request and response are postcard-encoded, and every
//! endpoint shares one mesh channel ([`RPC_CHANNEL`]). One [`Rpc`] per node matches answers
//! to calls by id, runs handlers, and offers a call to one peer or to a quorum of them.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Semaphore};
use tokio_util::task::TaskTracker;

use crate::{BoxFuture, Mesh, SendError};

/// The mesh channel every endpoint travels on (replication is 1, SIP's admission 2).
pub const RPC_CHANNEL: u16 = 3;
/// Requests from peers handled at once; more are answered "busy" at once.
const MAX_HANDLERS_IN_FLIGHT: usize = 1024;
const LOG: &str = "developer.mesh.rpc";

/// Sends a frame to a peer by number: the mesh, or a fake in tests.
pub trait PeerSend: Send + Sync {
    fn send_to(&self, peer: usize, channel: u16, payload: Bytes) -> Result<(), SendError>;
}

impl PeerSend for Mesh {
    fn send_to(&self, peer: usize, channel: u16, payload: Bytes) -> Result<(), SendError> {
        self.send(peer, channel, payload)
    }
}

/// A request/response pair named by `path`. Both sides declare the same constant.
pub struct Endpoint<Req, Resp> {
    path: String,
    _types: PhantomData<fn(Req) -> Resp>,
}

impl<Req, Resp> Endpoint<Req, Resp> {
    pub fn new(path: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            _types: PhantomData,
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }
}

impl<Req, Resp> Clone for Endpoint<Req, Resp> {
    fn clone(&self) -> Self {
        Self::new(self.path.clone())
    }
}

/// Why a call did not bring an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("sending to Peer {peer} failed: {source}")]
    Send { peer: usize, source: SendError },
    #[error("Peer {peer} did not answer {path} within {timeout:?}")]
    Timeout {
        peer: usize,
        path: String,
        timeout: Duration,
    },
    #[error("Peer {peer} refused {path}: {reason}")]
    Remote {
        peer: usize,
        path: String,
        reason: String,
    },
    #[error("the answer of Peer {peer} to {path} is unreadable: {reason}")]
    Decode {
        peer: usize,
        path: String,
        reason: String,
    },
}

impl CallError {
    /// True when the peer could not be reached at all (as opposed to answering badly).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, CallError::Send { .. } | CallError::Timeout { .. })
    }
}

#[derive(Serialize, Deserialize)]
enum Frame {
    Request {
        id: u64,
        path: String,
        body: Vec<u8>,
    },
    Response {
        id: u64,
        result: Answer,
    },
}

/// An answer as it travels: the encoded response, or the handler's refusal.
type Answer = Result<Vec<u8>, String>;
type Waiters = HashMap<u64, oneshot::Sender<Answer>>;

type Handler = Arc<dyn Fn(usize, Bytes) -> BoxFuture<'static, Answer> + Send + Sync>;

/// One node's side of every endpoint.
pub struct Rpc {
    link: Arc<dyn PeerSend>,
    handlers: RwLock<HashMap<String, Handler>>,
    pending: Mutex<Waiters>,
    next_id: AtomicU64,
    in_flight: Arc<Semaphore>,
    tasks: TaskTracker,
}

impl Rpc {
    pub fn new(link: Arc<dyn PeerSend>) -> Arc<Self> {
        Arc::new(Self {
            link,
            handlers: RwLock::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            in_flight: Arc::new(Semaphore::new(MAX_HANDLERS_IN_FLIGHT)),
            tasks: TaskTracker::new(),
        })
    }

    /// Answers `endpoint` with `handler` from now on (replacing an earlier handler).
    pub fn serve<Req, Resp, F, Fut>(&self, endpoint: &Endpoint<Req, Resp>, handler: F)
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        F: Fn(usize, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, String>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let path = endpoint.path().to_string();
        let erased: Handler = Arc::new(move |from, body: Bytes| {
            let handler = handler.clone();
            let path = path.clone();
            Box::pin(async move {
                let req: Req = postcard::from_bytes(&body)
                    .map_err(|e| format!("request to {path} is unreadable: {e}"))?;
                let resp = handler(from, req).await?;
                postcard::to_stdvec(&resp).map_err(|e| format!("encoding the answer failed: {e}"))
            })
        });
        self.handlers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(endpoint.path().to_string(), erased);
    }

    /// Stops answering `path`: calls to it are refused as unknown.
    pub fn unserve(&self, path: &str) {
        self.handlers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(path);
    }

    /// Calls `endpoint` on `peer` and waits at most `timeout` for the answer.
    pub async fn call<Req, Resp>(
        &self,
        endpoint: &Endpoint<Req, Resp>,
        peer: usize,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let path = endpoint.path();
        let body = postcard::to_stdvec(request).map_err(|e| CallError::Decode {
            peer,
            path: path.to_string(),
            reason: format!("encoding the request failed: {e}"),
        })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending_lock().insert(id, tx);
        // Removes the waiter however this call ends (answer, timeout, or the caller dropped).
        let _cleanup = Cleanup { rpc: self, id };
        let frame = Frame::Request {
            id,
            path: path.to_string(),
            body,
        };
        self.send_frame(peer, &frame)
            .map_err(|source| CallError::Send { peer, source })?;
        let answer = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            _ => {
                return Err(CallError::Timeout {
                    peer,
                    path: path.to_string(),
                    timeout,
                })
            }
        };
        let body = answer.map_err(|reason| CallError::Remote {
            peer,
            path: path.to_string(),
            reason,
        })?;
        postcard::from_bytes(&body).map_err(|e| CallError::Decode {
            peer,
            path: path.to_string(),
            reason: e.to_string(),
        })
    }

    /// Calls `endpoint` on every peer in `peers` at once and returns as soon as `quorum` of
    /// them answered successfully or every call has ended; each result is given with its peer.
    pub async fn call_quorum<Req, Resp>(
        &self,
        endpoint: &Endpoint<Req, Resp>,
        peers: &[usize],
        request: &Req,
        quorum: usize,
        timeout: Duration,
    ) -> Vec<(usize, Result<Resp, CallError>)>
    where
        Req: Serialize + Sync,
        Resp: DeserializeOwned + Send,
    {
        let mut calls: futures_unordered::Set<'_, (usize, Result<Resp, CallError>)> = peers
            .iter()
            .map(|&peer| -> BoxFuture<'_, _> {
                Box::pin(async move { (peer, self.call(endpoint, peer, request, timeout).await) })
            })
            .collect();
        let mut out = Vec::with_capacity(peers.len());
        let mut ok = 0;
        while let Some((peer, result)) = calls.next().await {
            ok += usize::from(result.is_ok());
            out.push((peer, result));
            if ok >= quorum {
                break;
            }
        }
        out
    }

    /// A frame that came on [`RPC_CHANNEL`] from `from`.
    pub fn handle(self: &Arc<Self>, from: usize, payload: &[u8]) {
        let frame = match postcard::from_bytes::<Frame>(payload) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(target: LOG, peer = from, reason = %e, "Unreadable RPC frame dropped");
                return;
            }
        };
        match frame {
            Frame::Response { id, result } => {
                if let Some(tx) = self.pending_lock().remove(&id) {
                    let _ = tx.send(result);
                }
            }
            Frame::Request { id, path, body } => {
                let handler = self
                    .handlers
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&path)
                    .cloned();
                let Some(handler) = handler else {
                    let result = Err(format!("no endpoint {path} here"));
                    let _ = self.send_frame(from, &Frame::Response { id, result });
                    return;
                };
                let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
                    let result = Err("busy: too many requests in progress".to_string());
                    let _ = self.send_frame(from, &Frame::Response { id, result });
                    return;
                };
                let rpc = self.clone();
                self.tasks.spawn(async move {
                    let result = handler(from, Bytes::from(body)).await;
                    drop(permit);
                    let _ = rpc.send_frame(from, &Frame::Response { id, result });
                });
            }
        }
    }

    /// Waits for the handlers still running (after the mesh stopped delivering).
    pub async fn shutdown(&self) {
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
    }

    fn send_frame(&self, peer: usize, frame: &Frame) -> Result<(), SendError> {
        // Encoding an enum of strings and byte vectors cannot fail.
        let payload = Bytes::from(postcard::to_stdvec(frame).unwrap_or_default());
        self.link.send_to(peer, RPC_CHANNEL, payload)
    }

    fn pending_lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Cleanup<'a> {
    rpc: &'a Rpc,
    id: u64,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        self.rpc.pending_lock().remove(&self.id);
    }
}

/// A small set of futures polled together, first finished first out: enough for a quorum
/// call over at most [`crate::MAX_PEERS`] peers without pulling in a futures crate.
mod futures_unordered {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use crate::BoxFuture;

    pub struct Set<'a, T> {
        futures: Vec<BoxFuture<'a, T>>,
    }

    impl<'a, T> FromIterator<BoxFuture<'a, T>> for Set<'a, T> {
        fn from_iter<I: IntoIterator<Item = BoxFuture<'a, T>>>(iter: I) -> Self {
            Self {
                futures: iter.into_iter().collect(),
            }
        }
    }

    impl<'a, T> Set<'a, T> {
        /// The next future to finish, or `None` when none is left.
        pub fn next(&mut self) -> Next<'_, 'a, T> {
            Next { set: self }
        }
    }

    pub struct Next<'s, 'a, T> {
        set: &'s mut Set<'a, T>,
    }

    impl<T> Future for Next<'_, '_, T> {
        type Output = Option<T>;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            let futures = &mut self.set.futures;
            if futures.is_empty() {
                return Poll::Ready(None);
            }
            for i in 0..futures.len() {
                if let Poll::Ready(out) = futures[i].as_mut().poll(cx) {
                    drop(futures.swap_remove(i));
                    return Poll::Ready(Some(out));
                }
            }
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two Rpcs wired to each other through channels, as two peers over the mesh.
    struct Wire {
        to: Mutex<HashMap<usize, tokio::sync::mpsc::UnboundedSender<(usize, Bytes)>>>,
        me: usize,
    }

    impl PeerSend for Wire {
        fn send_to(&self, peer: usize, _channel: u16, payload: Bytes) -> Result<(), SendError> {
            let to = self.to.lock().unwrap();
            let tx = to.get(&peer).ok_or(SendError::NotConnected(peer))?;
            tx.send((self.me, payload))
                .map_err(|_| SendError::NotConnected(peer))
        }
    }

    fn pair() -> (Arc<Rpc>, Arc<Rpc>, Arc<Wire>) {
        let w1 = Arc::new(Wire {
            to: Mutex::new(HashMap::new()),
            me: 1,
        });
        let w2 = Arc::new(Wire {
            to: Mutex::new(HashMap::new()),
            me: 2,
        });
        let (a, b) = (Rpc::new(w1.clone()), Rpc::new(w2.clone()));
        for (wire, peer, rpc) in [(&w1, 2, b.clone()), (&w2, 1, a.clone())] {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Bytes)>();
            wire.to.lock().unwrap().insert(peer, tx);
            tokio::spawn(async move {
                while let Some((from, p)) = rx.recv().await {
                    rpc.handle(from, &p);
                }
            });
        }
        (a, b, w1)
    }

    #[tokio::test]
    async fn a_call_gets_its_answer_and_an_unknown_endpoint_a_refusal() {
        let (a, b, _) = pair();
        let double: Endpoint<u32, u64> = Endpoint::new("test/double");
        b.serve(&double, |from, x: u32| async move {
            Ok(u64::from(x) * 2 + from as u64)
        });
        let t = Duration::from_secs(1);
        assert_eq!(a.call(&double, 2, &21, t).await, Ok(43));
        let other: Endpoint<u32, u64> = Endpoint::new("test/other");
        let err = a.call(&other, 2, &1, t).await.unwrap_err();
        assert!(err.to_string().contains("no endpoint test/other"), "{err}");
        let err = a.call(&double, 9, &1, t).await.unwrap_err();
        assert!(err.is_unreachable(), "{err}");
        assert!(a.pending_lock().is_empty(), "no waiter left behind");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_times_out_and_a_quorum_call_returns_at_the_quorum() {
        let (a, b, wire) = pair();
        let echo: Endpoint<u32, u32> = Endpoint::new("test/echo");
        b.serve(&echo, |_, x: u32| async move {
            if x == 0 {
                std::future::pending::<()>().await;
            }
            Ok(x)
        });
        let t = Duration::from_millis(300);
        let err = a.call(&echo, 2, &0, t).await.unwrap_err();
        assert!(matches!(err, CallError::Timeout { peer: 2, .. }), "{err:?}");
        // Peer 3 does not exist on the wire: one success of two calls is the quorum.
        let answers = a.call_quorum(&echo, &[3, 2], &7, 1, t).await;
        assert!(
            answers.iter().any(|(p, r)| *p == 2 && r == &Ok(7)),
            "{answers:?}"
        );
        wire.to.lock().unwrap().clear();
        let answers = a.call_quorum(&echo, &[2], &7, 1, t).await;
        assert!(answers[0].1.as_ref().is_err_and(CallError::is_unreachable));
        assert!(a.pending_lock().is_empty());
    }

    proptest::proptest! {
        /// Whatever a peer sends on the channel, the node neither panics nor keeps a
        /// waiter: garbage is dropped, a request to any endpoint gets an answer.
        #[test]
        fn any_frame_is_handled_without_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
                                             path in "[a-z/]{0,24}", id in proptest::prelude::any::<u64>(),
                                             body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (a, b, _) = pair();
                let echo: Endpoint<u32, u32> = Endpoint::new("test/echo");
                b.serve(&echo, |_, x: u32| async move { Ok(x) });
                a.handle(2, &bytes);
                b.handle(1, &bytes);
                let request = postcard::to_stdvec(&Frame::Request { id, path, body: body.clone() }).unwrap();
                b.handle(1, &request);
                let echo_req = postcard::to_stdvec(&Frame::Request { id, path: "test/echo".into(), body }).unwrap();
                b.handle(1, &echo_req);
                tokio::task::yield_now().await;
                assert!(a.pending_lock().is_empty() && b.pending_lock().is_empty());
            });
        }
    }

    #[tokio::test]
    async fn garbage_on_the_channel_is_dropped() {
        let (a, _, _) = pair();
        a.handle(2, b"\xff\xff\xff garbage");
        a.handle(2, &[]);
        assert!(a.pending_lock().is_empty());
    }
}
