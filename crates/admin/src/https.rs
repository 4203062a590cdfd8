//! The admin API over HTTPS, with HTTP Basic authentication against `admin-users.json`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine as _;
use causeway_common::slots::{SourceSlot, SourceSlots};
use causeway_pki::NodeIdentity;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::users;

const MAX_PENDING_HANDSHAKES: usize = 64;
/// Handshakes in progress from one address: one address cannot take every slot.
const MAX_PENDING_PER_SOURCE: usize = 4;
/// Open connections from one address (an admin needs a few, a browser six at most).
const MAX_CONNECTIONS_PER_SOURCE: usize = 16;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Failed logins from one address before it is told to wait.
const MAX_FAILURES: u32 = 5;
const NO_USERS: &str =
    "no admin user is configured: run 'causeway --node <data dir> admin passwd <user>' on the node";
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// A served connection that keeps its source's connection slot while it lives.
struct Counted {
    inner: TlsStream<TcpStream>,
    _slot: SourceSlot,
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Completed TLS connections, handed to axum. Handshakes run concurrently (and time out) in
/// their own tasks, so a slow client cannot hold up the others.
struct TlsListener {
    rx: mpsc::Receiver<(Counted, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = Counted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The acceptor stopped (shutdown): never yield another connection.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// The client's address, for the failed-login throttle.
#[derive(Clone, Copy)]
struct ClientAddr(SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}

#[derive(Clone)]
pub(crate) struct AuthState {
    data_dir: PathBuf,
    failures: Arc<Mutex<HashMap<IpAddr, (u32, Instant)>>>,
}

pub async fn serve_https(
    listen: SocketAddr,
    identity: &NodeIdentity,
    data_dir: PathBuf,
    app: Router,
    pages: Vec<crate::web::ServicePage>,
    cancel: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let config =
        causeway_pki::https_server_config(identity).context("building the HTTPS configuration")?;
    let acceptor = TlsAcceptor::from(config);
    let tcp = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the HTTPS admin port {listen}"))?;
    let local = tcp.local_addr()?;
    let (tx, rx) = mpsc::channel(64);
    let stop = cancel.clone();
    // The accept loop and its handshakes; the server's task waits for them at the end.
    let tasks = tokio_util::task::TaskTracker::new();
    let handshakes = tasks.clone();
    tasks.spawn(async move {
        let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
        let handshaking = SourceSlots::new(MAX_PENDING_PER_SOURCE);
        let connected = SourceSlots::new(MAX_CONNECTIONS_PER_SOURCE);
        loop {
            let (stream, from) = tokio::select! {
                _ = stop.cancelled() => return,
                r = tcp.accept() => match r {
                    Ok(x) => x,
                    Err(_) => { tokio::time::sleep(Duration::from_millis(100)).await; continue }
                },
            };
            // Caps per source before the global one: an address that already holds its
            // share is refused without taking a slot anyone else could use.
            let Some(connection) = connected.take(from.ip()) else {
                continue;
            };
            let Some(handshake) = handshaking.take(from.ip()) else {
                continue;
            };
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            handshakes.spawn(async move {
                let accepted =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                drop((permit, handshake));
                if let Ok(Ok(tls)) = accepted {
                    let conn = Counted {
                        inner: tls,
                        _slot: connection,
                    };
                    let _ = tx.send((conn, from)).await;
                }
            });
        }
    });
    let auth = AuthState::new(data_dir);
    let pages_router = crate::web::router(app.clone(), auth.clone(), pages);
    let app = app
        .merge(pages_router)
        .layer(axum::middleware::from_fn_with_state(auth, authenticate));
    let listener = TlsListener { rx, local };
    tracing::info!(target: "management.admin", listen = %local, "HTTPS admin API listening");
    Ok(tokio::spawn(async move {
        let served = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<ClientAddr>(),
        )
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
        if let Err(e) = served {
            tracing::error!(target: "management.admin", reason = %e, "HTTPS admin server stopped");
        }
        tasks.close();
        tasks.wait().await;
    }))
}

fn refuse(status: StatusCode, message: &str) -> Response {
    let mut r = (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"causeway\""),
        );
    }
    r
}

impl AuthState {
    pub(crate) fn new(data_dir: PathBuf) -> AuthState {
        AuthState {
            data_dir,
            failures: Arc::default(),
        }
    }
}

/// Why a login was refused: the status and the words to show.
pub(crate) struct LoginRefused(pub StatusCode, pub &'static str);

impl AuthState {
    /// Checks a user name and password from `ip`, with the failed-login throttle shared by
    /// the API's Basic authentication and the web pages' login form.
    pub(crate) async fn login(
        &self,
        ip: IpAddr,
        user: &str,
        password: &str,
    ) -> Result<(), LoginRefused> {
        {
            // Counted as a failure before the check and given back if it succeeds: concurrent
            // wrong logins from one address get MAX_FAILURES checks, not one each.
            let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            let entry = failures.entry(ip).or_insert((0, Instant::now()));
            if entry.1.elapsed() > FAILURE_WINDOW {
                *entry = (0, Instant::now());
            }
            if entry.0 >= MAX_FAILURES {
                return Err(LoginRefused(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many failed logins from this address: wait a minute",
                ));
            }
            entry.0 += 1;
        }
        // PBKDF2 is deliberately slow: keep it off the async workers.
        let (dir, u, p) = (
            self.data_dir.clone(),
            user.to_string(),
            password.to_string(),
        );
        let login = tokio::task::spawn_blocking(move || users::check(&dir, &u, &p))
            .await
            .unwrap_or(users::Login::Refused);
        if login == users::Login::Accepted || login == users::Login::NoUsers {
            // Not a failed guess: the attempt counted above is given back.
            let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = failures.get_mut(&ip) {
                entry.0 = entry.0.saturating_sub(1);
            }
        }
        match login {
            users::Login::Accepted => Ok(()),
            users::Login::NoUsers => Err(LoginRefused(StatusCode::UNAUTHORIZED, NO_USERS)),
            _ => {
                tracing::warn!(target: "management.admin", event = "Admin login failed", src_ip = %ip, user = user, "");
                Err(LoginRefused(
                    StatusCode::UNAUTHORIZED,
                    "wrong user name or password",
                ))
            }
        }
    }
}

async fn authenticate(
    State(auth): State<AuthState>,
    ConnectInfo(ClientAddr(from)): ConnectInfo<ClientAddr>,
    mut request: Request,
    next: Next,
) -> Response {
    // The pages keep their own sessions (a login form and a cookie, crate::web).
    if crate::web::is_page_path(request.uri().path()) {
        request
            .extensions_mut()
            .insert(crate::web::ClientIp(from.ip()));
        return next.run(request).await;
    }
    let credentials = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok());
    let Some((user, password)) = credentials.as_deref().and_then(|c| c.split_once(':')) else {
        if request.headers().contains_key(header::AUTHORIZATION) {
            // Garbage credentials count as a failed login.
            if let Err(LoginRefused(status, why)) = auth.login(from.ip(), "", "").await {
                return refuse(status, why);
            }
        }
        // Only the file's existence matters here: no password hashing without credentials.
        if !users::has_users(&auth.data_dir) {
            return refuse(StatusCode::UNAUTHORIZED, NO_USERS);
        }
        return refuse(StatusCode::UNAUTHORIZED, "authentication required");
    };
    if let Err(LoginRefused(status, why)) = auth.login(from.ip(), user, password).await {
        return refuse(status, why);
    }
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let response = next.run(request).await;
    // Every change is logged with the account that made it (the pages log their own).
    if method != axum::http::Method::GET {
        tracing::info!(target: "management.admin", event = "Admin request", user = user, src_ip = %from.ip(), method = %method, path = %path, status = response.status().as_u16(), via = "api", "");
    }
    response
}
