//! HA pairs (HA-1…HA-11, `docs/ha.md`): a primary and a secondary with a virtual IP that
//! the holder of the pair's lease has, the seed's states, failover and failback.
//!
//! The service ([`HaService`]) runs one [`instance::Instance`] per pair the node is in; the
//! address itself is added and removed by a keeper process ([`keeper`]) that takes it away
//! on its own when the agent stops extending its hold.

pub mod arp;
pub mod catalogue;
pub mod files;
pub mod instance;
pub mod keeper;
mod lease;
pub mod pair;
mod service;
pub mod status;
pub mod transitions;
pub mod vip;

pub use service::HaService;

pub(crate) const LOG: &str = "developer.ha";

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct CommandRequest {
    words: Vec<String>,
    #[serde(default)]
    pair: Option<usize>,
    #[serde(default)]
    force: bool,
}

/// The HA status page of the web interface: the seed's status page with the events log.
pub const WEB_PAGE: causeway_admin::web::ServicePage = causeway_admin::web::ServicePage {
    slug: "ha",
    title: "HA status",
    status_api: "/api/v1/ha/status",
    text_key: "ha_status",
};

/// `GET /api/v1/ha/status` (the JSON and the seed's `gethainfo` and `getserverinfo` text)
/// and `POST /api/v1/ha/command` (`{"words": ["switchover"], "pair": 1, "force": false}`).
pub fn router(svc: Arc<HaService>) -> Router {
    Router::new()
        .route(
            "/api/v1/ha/status",
            get(|State(s): State<Arc<HaService>>| async move {
                let status = s.status_json();
                Json(json!({
                    "status": status,
                    "gethainfo": status::gethainfo(&status),
                    "getserverinfo": status::getserverinfo(&status),
                    "ha_status": status::ha_status(&status),
                }))
            }),
        )
        .route(
            "/api/v1/ha/command",
            post(
                |State(s): State<Arc<HaService>>, Json(req): Json<CommandRequest>| async move {
                    match s.command(&req.words, req.pair, req.force).await {
                        Ok(message) => Ok(Json(json!({ "message": message }))),
                        Err(r) => Err(causeway_admin::refused(r)),
                    }
                },
            ),
        )
        .with_state(svc)
}
