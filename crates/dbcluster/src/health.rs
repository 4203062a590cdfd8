//! The health port (Patroni's 8008, so load-balancer checks carry over): `GET /primary` is
//! 200 on the ready master, `GET /replica` 200 on a standby streaming in sync, `GET
//! /health` 200 while postgres runs; 503 otherwise, the node's report as the body. Plain
//! HTTP/1.0 answers, one request per connection, requests capped at 4 KiB.
//!
//! Also the health checks of the master each node runs, logged in the seed's words.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::agent::{DbService, IN_SYNC_BYTES};
use crate::model::Role;
use crate::LOG;

const MAX_CHECKS_IN_FLIGHT: usize = 64;

pub(crate) async fn serve(
    svc: Arc<DbService>,
) -> anyhow::Result<Option<impl std::future::Future<Output = ()> + Send + 'static>> {
    if svc.section.health_port == 0 {
        return Ok(None);
    }
    let listen = SocketAddr::new(svc.listen_ip(), svc.section.health_port);
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the database health port {listen}"))?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CHECKS_IN_FLIGHT));
    let checker = svc.clone();
    svc.tasks.spawn(async move { check_master(checker).await });
    Ok(Some(async move {
        loop {
            let accepted = tokio::select! {
                _ = svc.cancel.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((mut s, _)) = accepted else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            // Load balancers check every second or so: a few dozen at once is plenty.
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let svc2 = svc.clone();
            svc.tasks.spawn(async move {
                let _permit = permit;
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                let read = tokio::time::timeout(Duration::from_secs(2), async {
                    while n < buf.len() {
                        match s.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => n += k,
                        }
                        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                })
                .await;
                if read.is_err() {
                    return;
                }
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                let (code, body) = answer(&svc2, &head);
                let reason = match code {
                    200 => "OK",
                    404 => "Not Found",
                    405 => "Method Not Allowed",
                    _ => "Service Unavailable",
                };
                let head_only = head.starts_with("HEAD ");
                let reply = format!(
                    "HTTP/1.0 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                    body.len(),
                    if head_only { "" } else { &body }
                );
                let _ = s.write_all(reply.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    }))
}

fn answer(svc: &DbService, head: &str) -> (u16, String) {
    let mut words = head.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    if !matches!(method, "GET" | "HEAD" | "OPTIONS") {
        return (405, "{}".into());
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let report = svc.my_report();
    let body = serde_json::to_string(&report).unwrap_or_default();
    let ok = match path {
        "/primary" | "/master" | "/leader" => report.is_ready_master(),
        "/replica" | "/standby" => {
            let limit = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("lag="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(IN_SYNC_BYTES);
            let master = svc
                .reports()
                .into_iter()
                .filter(|(r, age)| *age < crate::agent::FRESH && r.is_ready_master())
                .max_by_key(|(r, _)| r.generation);
            report.role == Role::Standby
                && report.streaming
                && master.is_some_and(|(m, _)| {
                    report.upstream == Some(m.peer)
                        && m.replicas
                            .iter()
                            .any(|r| r.peer == report.peer && r.flush_lag <= limit)
                })
        }
        "/health" | "/" => matches!(report.role, Role::Master | Role::Standby | Role::Local),
        _ => return (404, "{}".into()),
    };
    (if ok { 200 } else { 503 }, body)
}

/// Checks the master each second on its direct path with the client certificate, and logs
/// on a change (and once a minute while failing) in the seed's words.
async fn check_master(svc: Arc<DbService>) {
    let mut up: Option<bool> = None;
    let mut last_log = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = svc.cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if !svc.saved().member {
            up = None;
            continue;
        }
        let Some((addr, _)) = *svc.route.borrow() else {
            continue;
        };
        let result = async {
            let tls =
                crate::status::client_tls(&svc.layout.certs()).map_err(|e| format!("{e:#}"))?;
            let mut c = crate::pgwire::PgConn::tls(
                addr,
                tls,
                &crate::pgwire::Login {
                    application_name: "causeway-health",
                    ..Default::default()
                },
                Duration::from_secs(4),
            )
            .await
            .map_err(|e| e.to_string())?;
            let r = c.query("SELECT 1").await.map_err(|e| e.to_string());
            c.close().await;
            r.map(|_| ())
        }
        .await;
        let ip = addr.ip();
        match result {
            Ok(()) => {
                if up != Some(true) {
                    tracing::info!(target: LOG, detail = %format!("Health check {ip}: ok"), "");
                }
                up = Some(true);
            }
            Err(e) => {
                svc.counters
                    .health_check_failures
                    .fetch_add(1, Ordering::Relaxed);
                if up != Some(false) || last_log.elapsed() > Duration::from_secs(60) {
                    let was_up = u8::from(up == Some(true));
                    tracing::warn!(target: LOG, detail = %format!("Health check {ip}: error (up = {was_up}): {e}"), "");
                    last_log = tokio::time::Instant::now();
                }
                up = Some(false);
            }
        }
    }
}
