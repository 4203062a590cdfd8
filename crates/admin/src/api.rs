use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use causeway_cluster::{ClusterStatus, Node, NodeError};
use serde::Deserialize;
use serde_json::{json, Value};

/// Largest request body the API reads.
const MAX_BODY: usize = 64 * 1024;

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route(
            "/api/v1/health",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/api/v1/status/cluster", get(cluster))
        .route("/metrics", get(metrics))
        .route("/api/v1/status/services", get(services))
        .route("/api/v1/status/alarms", get(alarms))
        .route(
            "/api/v1/configuration",
            get(configuration).post(set_configuration),
        )
        .route(
            "/api/v1/command/forceconfigupdate",
            post(force_config_update),
        )
        .route("/api/v1/command/setprimary", post(set_primary))
        .route("/api/v1/backup", post(backup))
        .route("/api/v1/command/resolvepeers", post(resolve_peers))
        .route(
            "/api/v1/command/forcesystemkeyupdate",
            post(force_system_key_update),
        )
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(node)
        .merge(crate::syslog::router())
}

async fn cluster(State(node): State<Arc<Node>>) -> Json<ClusterStatus> {
    Json(node.cluster_status())
}

/// The services the node hosts, each with its own status.
async fn services(State(node): State<Arc<Node>>) -> Json<Value> {
    let services: serde_json::Map<String, Value> = node
        .services()
        .into_iter()
        .map(|(name, status)| (name.to_string(), status))
        .collect();
    Json(Value::Object(services))
}

/// Every collector the node and its services registered, read now.
async fn metrics(State(node): State<Arc<Node>>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        node.metrics().render(),
    )
}

async fn alarms(State(node): State<Arc<Node>>) -> Json<Value> {
    Json(json!({
        "system_name": node.config().node.system_name,
        "active": node.alarms().active(),
        "events": node.alarms().events(),
        "peers": node.peer_alarms(),
    }))
}

/// A refusal: the status its code maps to, with `{"error": "...", "code": "..."}`, the
/// message naming what to do (docs/errors.md).
type Answer = Result<Json<Value>, (StatusCode, Json<Value>)>;

pub fn refused(why: NodeError) -> (StatusCode, Json<Value>) {
    let status =
        StatusCode::from_u16(why.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        Json(json!({ "error": why.message, "code": why.code })),
    )
}

async fn configuration(State(node): State<Arc<Node>>) -> Json<Value> {
    Json(json!({
        "system_name": node.config().node.system_name,
        "items": node.configuration(),
    }))
}

#[derive(Deserialize)]
struct SetRequest {
    path: String,
    /// Absent or null: back to the default.
    value: Option<String>,
    /// Set it even when a check warns against it.
    #[serde(default)]
    force: bool,
}

async fn set_configuration(State(node): State<Arc<Node>>, Json(req): Json<SetRequest>) -> Answer {
    node.set_configuration_with(&req.path, req.value.as_deref(), req.force)
        .await
        .map(|out| Json(json!(out)))
        .map_err(refused)
}

async fn force_config_update(State(node): State<Arc<Node>>) -> Answer {
    node.force_config_update()
        .await
        .map(|s| Json(json!(s)))
        .map_err(refused)
}

#[derive(Deserialize)]
struct SetPrimaryRequest {
    peer: usize,
}

async fn set_primary(State(node): State<Arc<Node>>, Json(req): Json<SetPrimaryRequest>) -> Answer {
    node.set_primary(req.peer)
        .await
        .map(|s| Json(json!(s)))
        .map_err(refused)
}

#[derive(Deserialize)]
struct BackupRequest {
    passphrase: Option<String>,
}

/// A backup is sealed with the operator's passphrase (EX-17). The body is read by hand so a
/// request without one is answered with what to do, not a JSON parser's complaint.
async fn backup(State(node): State<Arc<Node>>, body: axum::body::Bytes) -> Answer {
    let passphrase = serde_json::from_slice::<BackupRequest>(&body)
        .ok()
        .and_then(|r| r.passphrase)
        .filter(|p| !p.is_empty());
    let Some(passphrase) = passphrase else {
        return Err(refused(NodeError::invalid(
            "a backup is sealed with a passphrase: run `causeway --node DIR backup --out FILE --passphrase-file FILE` (over the API, POST {\"passphrase\": \"…\"})",
        )));
    };
    // Deriving the backup's key takes a good part of a second: not on a runtime worker.
    tokio::task::spawn_blocking(move || node.backup(&passphrase))
        .await
        .map_err(|e| refused(NodeError::internal(format!("taking the backup: {e}"))))?
        .map(|b| Json(json!(b)))
        .map_err(refused)
}

async fn force_system_key_update(State(node): State<Arc<Node>>) -> Answer {
    node.force_system_key_update()
        .map(|done| Json(json!({ "result": done })))
        .map_err(refused)
}

async fn resolve_peers(State(node): State<Arc<Node>>) -> Answer {
    node.resolve_peers()
        .map(|done| Json(json!({ "result": done })))
        .map_err(refused)
}
