//! The admin API (OP-3): JSON under `/api/v1`, served on a Unix socket in the data directory
//! (the CLI's channel; file permissions are its authentication) and, when configured, over
//! HTTPS with password authentication. There is no default password.
#![forbid(unsafe_code)]

mod api;
pub mod client;
mod https;
mod syslog;
pub mod users;
pub mod web;

pub use api::{refused, router};
pub use https::serve_https;

use std::path::Path;

use tokio_util::sync::CancellationToken;

/// Serves the API on `socket` until `cancel`. A stale socket file is replaced; a live one
/// (another node on the same data directory) is an error.
pub async fn serve_unix(
    socket: &Path,
    app: axum::Router,
    cancel: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use anyhow::Context as _;
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            anyhow::bail!("another node is already serving {}: stop it first (causeway lab down, or its service)", socket.display());
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing the stale admin socket {}", socket.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("binding the admin socket {}", socket.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", socket.display()))?;
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(target: "management.admin", reason = %e, "Admin socket server stopped");
        }
    }))
}
