//! The database cluster (DB-1…DB-7, `docs/dbcluster.md`): a PostgreSQL 15 supervised on
//! every database node, a master that holds the `dbcluster` lease of the node's lease
//! groups, streaming replication over mutual TLS, the seed's `database cluster …` commands,
//! and a local endpoint on every node that leads to the master.
//!
//! A service of the node ([`causeway_cluster::Service`]), off unless the node file has a
//! `[database]` section. One loop ([`agent`]) drives every postgres state change: it
//! observes, [`decide::decide`]s one action, runs it and says what it did.

mod agent;
pub mod catalogue;
mod commands;
pub mod conf;
pub mod decide;
mod endpoint;
mod failover;
mod health;
pub mod model;
mod observe;
mod peers;
pub mod pgwire;
pub mod status;
mod supervisor;
pub mod tools;

pub use agent::{lease_timing, DbService};

/// On a peer without a `[database]` section: a member of the `dbcluster` lease group that
/// votes and never stands, so the master is chosen by a majority of the whole peer cluster.
pub fn start_witness(node: &causeway_cluster::Node) {
    use causeway_consensus::LeaderLease as _;
    let leases = node.leases();
    match leases.start_group_with("dbcluster", leases.all_peers(), lease_timing()) {
        Ok(group) => group.set_eligible(false),
        Err(e) => {
            tracing::warn!(target: LOG, reason = %e, "The database cluster's lease group did not start on this peer")
        }
    }
}

pub(crate) const LOG: &str = "developer.dbcluster";

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct CommandRequest {
    words: Vec<String>,
}

/// The database cluster's page of the web interface: `database cluster status`.
pub const WEB_PAGE: causeway_admin::web::ServicePage = causeway_admin::web::ServicePage {
    slug: "database",
    title: "Database cluster",
    status_api: "/api/v1/dbcluster/status",
    text_key: "text",
};

/// `GET /api/v1/dbcluster/status` and `POST /api/v1/dbcluster/command` (`{"words": […]}`)
/// on the node's admin API; the CLI's `database cluster …` uses them.
pub fn router(svc: Arc<DbService>) -> Router {
    Router::new()
        .route(
            "/api/v1/dbcluster/status",
            get(|State(s): State<Arc<DbService>>| async move {
                let status = s.status_json();
                Json(json!({ "status": status, "text": status::render(&status) }))
            }),
        )
        .route(
            "/api/v1/dbcluster/command",
            post(
                |State(s): State<Arc<DbService>>, Json(req): Json<CommandRequest>| async move {
                    match s.command(&req.words).await {
                        Ok(message) => Ok(Json(json!({ "message": message }))),
                        Err(r) => Err(causeway_admin::refused(r)),
                    }
                },
            ),
        )
        .with_state(svc)
}
