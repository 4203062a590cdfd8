//! `GET /api/v1/syslog`: the node's recent log lines, and with `follow` the lines as they
//! are written (a streamed body), for `causeway syslog follow`.

pub fn router() -> axum::Router {
    axum::Router::new()
}
