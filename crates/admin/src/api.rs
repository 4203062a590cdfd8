use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use causeway_cluster::{ClusterStatus, Node};
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
        .route("/api/v1/status/alarms", get(alarms))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(node)
}

async fn cluster(State(node): State<Arc<Node>>) -> Json<ClusterStatus> {
    Json(node.cluster_status())
}

async fn alarms(State(node): State<Arc<Node>>) -> Json<Value> {
    Json(json!({
        "system_name": node.config().node.system_name,
        "active": node.alarms().active(),
        "events": node.alarms().events(),
    }))
}
