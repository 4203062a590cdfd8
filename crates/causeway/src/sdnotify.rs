//! systemd's readiness and watchdog notifications (sd_notify), when run as a Type=notify unit.

/// READY=1: the node has bound its ports and serves.
pub fn ready() {}

/// STOPPING=1: the node is shutting down.
pub fn stopping() {}

/// WATCHDOG=1 every half WATCHDOG_USEC while the runtime runs, until `cancel`.
pub fn spawn_watchdog(_cancel: tokio_util::sync::CancellationToken) {}
