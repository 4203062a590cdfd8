//! The local endpoint (DB-6): every node listens (127.0.0.1:9899 by default) and copies
//! bytes to the current master, parsing nothing. A PostgreSQL client opens with an
//! SSLRequest and then TLS, so TLS stays end to end: the master checks the application's
//! client certificate and the endpoint holds no key.
//!
//! Each connection remembers the generation it was routed at; when the route moves to
//! another generation it is closed both ways, so no client keeps talking to an old master.
//! During a failover a new connection waits for a route (up to [`WAIT_FOR_ROUTE`]) instead
//! of being refused.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::agent::DbService;
use crate::LOG;

const WAIT_FOR_ROUTE: Duration = Duration::from_millis(4000);
const MAX_CONNECTIONS: usize = 1000;

pub(crate) async fn serve(
    svc: Arc<DbService>,
) -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let listen = svc.section.endpoint;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the database endpoint {listen}"))?;
    tracing::info!(target: LOG, listen = %listen, "Database endpoint listening");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    Ok(async move {
        loop {
            let accepted = tokio::select! {
                _ = svc.cancel.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((client, from)) = accepted else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::warn!(target: LOG, from = %from, limit = MAX_CONNECTIONS, "Database endpoint full: connection refused");
                continue;
            };
            let svc2 = svc.clone();
            svc.tasks.spawn(async move {
                svc2.counters
                    .endpoint_connections
                    .fetch_add(1, Ordering::Relaxed);
                relay(&svc2, client).await;
                svc2.counters
                    .endpoint_connections
                    .fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
        }
    })
}

async fn relay(svc: &DbService, mut client: TcpStream) {
    let _ = client.set_nodelay(true);
    let mut route = svc.route.subscribe();
    let deadline = tokio::time::Instant::now() + WAIT_FOR_ROUTE;
    // Nothing has been forwarded yet: a failed connect waits for a newer route.
    let (mut upstream, generation) = loop {
        let current = *route.borrow_and_update();
        if let Some((addr, generation)) = current {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(1000), TcpStream::connect(addr)).await
            {
                break (s, generation);
            }
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return;
        }
        tokio::select! {
            _ = svc.cancel.cancelled() => return,
            _ = route.changed() => {}
            _ = tokio::time::sleep(left.min(Duration::from_millis(100))) => {}
        }
    };
    let _ = upstream.set_nodelay(true);
    let moved = async {
        loop {
            if route.changed().await.is_err() {
                return;
            }
            let now = *route.borrow_and_update();
            if now.map(|(_, g)| g) != Some(generation) {
                return;
            }
        }
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, 64 << 10, 64 << 10) => {}
        _ = moved => {
            svc.counters.endpoint_closed_master_changed.fetch_add(1, Ordering::Relaxed);
        }
        _ = svc.cancel.cancelled() => {}
    }
}
