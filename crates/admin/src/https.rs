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
use causeway_pki::NodeIdentity;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::users;

const MAX_PENDING_HANDSHAKES: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Failed logins from one address before it is told to wait.
const MAX_FAILURES: u32 = 5;
const NO_USERS: &str =
    "no admin user is configured: run 'causeway --node <data dir> admin passwd <user>' on the node";
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Completed TLS connections, handed to axum. Handshakes run concurrently (and time out) in
/// their own tasks, so a slow client cannot hold up the others.
struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
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
struct AuthState {
    data_dir: PathBuf,
    failures: Arc<Mutex<HashMap<IpAddr, (u32, Instant)>>>,
}

pub async fn serve_https(
    listen: SocketAddr,
    identity: &NodeIdentity,
    data_dir: PathBuf,
    app: Router,
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
    tokio::spawn(async move {
        let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
        loop {
            let (stream, from) = tokio::select! {
                _ = stop.cancelled() => return,
                r = tcp.accept() => match r {
                    Ok(x) => x,
                    Err(_) => { tokio::time::sleep(Duration::from_millis(100)).await; continue }
                },
            };
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(Ok(tls)) =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                {
                    drop(permit);
                    let _ = tx.send((tls, from)).await;
                }
            });
        }
    });
    let auth = AuthState {
        data_dir,
        failures: Arc::default(),
    };
    let app = app.layer(axum::middleware::from_fn_with_state(auth, authenticate));
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

async fn authenticate(
    State(auth): State<AuthState>,
    ConnectInfo(ClientAddr(from)): ConnectInfo<ClientAddr>,
    request: Request,
    next: Next,
) -> Response {
    let ip = from.ip();
    {
        let mut failures = auth.failures.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((count, since)) = failures.get(&ip).copied() {
            if since.elapsed() > FAILURE_WINDOW {
                failures.remove(&ip);
            } else if count >= MAX_FAILURES {
                return refuse(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many failed logins from this address: wait a minute",
                );
            }
        }
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
        // Only the file's existence matters here: no password hashing without credentials.
        if !users::has_users(&auth.data_dir) {
            return refuse(StatusCode::UNAUTHORIZED, NO_USERS);
        }
        return refuse(StatusCode::UNAUTHORIZED, "authentication required");
    };
    // PBKDF2 is deliberately slow: keep it off the async workers.
    let (dir, u, p) = (
        auth.data_dir.clone(),
        user.to_string(),
        password.to_string(),
    );
    let login = tokio::task::spawn_blocking(move || users::check(&dir, &u, &p))
        .await
        .unwrap_or(users::Login::Refused);
    if login == users::Login::NoUsers {
        return refuse(StatusCode::UNAUTHORIZED, NO_USERS);
    }
    if login != users::Login::Accepted {
        let mut failures = auth.failures.lock().unwrap_or_else(|e| e.into_inner());
        let entry = failures.entry(ip).or_insert((0, Instant::now()));
        entry.0 += 1;
        tracing::warn!(target: "management.admin", src_ip = %ip, user = user, "Admin login failed");
        return refuse(StatusCode::UNAUTHORIZED, "wrong user name or password");
    }
    next.run(request).await
}
