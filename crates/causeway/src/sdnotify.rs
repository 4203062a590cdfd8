//! systemd's readiness and watchdog notifications (sd_notify), when run as a Type=notify unit.
//!
//! The protocol is one datagram per message to the Unix socket named by `$NOTIFY_SOCKET`
//! (a path, or an abstract name when it starts with '@'). Outside systemd the variable is
//! absent and nothing is sent. A failure is logged once and never stops the node.

use std::ffi::OsStr;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Set after the first failure was logged: a watchdog failing every 15 s says it once.
static FAILURE_LOGGED: AtomicBool = AtomicBool::new(false);

/// READY=1: the node has bound its ports and serves.
pub fn ready() {
    let status = format!(
        "READY=1\nSTATUS=Serving (causeway {})\nMAINPID={}",
        causeway_common::SOFTWARE_VERSION,
        std::process::id()
    );
    notify_env(&status);
}

/// STOPPING=1: the node is shutting down.
pub fn stopping() {
    notify_env("STOPPING=1\nSTATUS=Shutting down");
}

/// WATCHDOG=1 every half WATCHDOG_USEC while the runtime runs, until `cancel`.
pub fn spawn_watchdog(cancel: CancellationToken) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    let Some(every) = watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id()) else {
        return;
    };
    tokio::spawn(watchdog(socket, every, cancel));
}

/// The watchdog loop: a first ping at once, then one every `every`.
async fn watchdog(socket: std::ffi::OsString, every: Duration, cancel: CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticks.tick() => report(notify(&socket, "WATCHDOG=1")),
        }
    }
}

/// How often to ping: half of `WATCHDOG_USEC`, when it is set, valid and meant for `own_pid`
/// (`WATCHDOG_PID` absent or equal to it).
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(own_pid) {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

fn notify_env(message: &str) {
    if let Some(socket) = std::env::var_os("NOTIFY_SOCKET") {
        report(notify(&socket, message));
    }
}

fn report(result: std::io::Result<()>) {
    if let Err(e) = result {
        if !FAILURE_LOGGED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                target: "management.node",
                error = %e,
                "Cannot notify systemd (NOTIFY_SOCKET); readiness and watchdog messages are not sent"
            );
        }
    }
}

/// The socket's address: a path, or an abstract name after '@'.
fn address(socket: &OsStr) -> std::io::Result<SocketAddr> {
    use std::os::unix::ffi::OsStrExt as _;
    let bytes = socket.as_bytes();
    match bytes.first() {
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(&bytes[1..])
        }
        Some(b'/') => SocketAddr::from_pathname(socket),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "NOTIFY_SOCKET '{}' is neither an absolute path nor an abstract name",
                socket.to_string_lossy()
            ),
        )),
    }
}

/// Sends one message (newline-separated assignments) to the socket.
fn notify(socket: &OsStr, message: &str) -> std::io::Result<()> {
    let address = address(socket)?;
    let sender = UnixDatagram::unbound()?;
    let sent = sender.send_to_addr(message.as_bytes(), &address)?;
    if sent != message.len() {
        return Err(std::io::Error::other(format!(
            "sent {sent} of {} bytes",
            message.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> (tempfile::TempDir, std::path::PathBuf, UnixDatagram) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (dir, path, socket)
    }

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn a_message_reaches_a_socket_named_by_its_path() {
        let (_dir, path, socket) = listener();
        notify(path.as_os_str(), "READY=1\nSTATUS=x").unwrap();
        assert_eq!(receive(&socket), "READY=1\nSTATUS=x");
    }

    #[test]
    fn a_message_reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("causeway-sdnotify-test-{}", std::process::id());
        let socket =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        notify(OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        assert_eq!(receive(&socket), "STOPPING=1");
    }

    #[test]
    fn a_missing_socket_or_a_relative_name_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        assert!(notify(dir.path().join("absent").as_os_str(), "READY=1").is_err());
        assert!(notify(OsStr::new("relative.sock"), "READY=1").is_err());
        assert!(notify(OsStr::new(""), "READY=1").is_err());
        report(Err(std::io::Error::other("logged once")));
        report(Err(std::io::Error::other("not logged again")));
    }

    #[test]
    fn the_watchdog_pings_at_half_the_interval_for_our_pid_only() {
        let me = 4242;
        assert_eq!(
            watchdog_interval(Some("30000000"), None, me),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("4242"), me),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_interval(Some("30000000"), Some("1"), me), None);
        assert_eq!(watchdog_interval(None, None, me), None);
        assert_eq!(watchdog_interval(Some("0"), None, me), None);
        assert_eq!(watchdog_interval(Some("soon"), None, me), None);
    }

    #[tokio::test]
    async fn the_watchdog_pings_until_cancelled() {
        let (_dir, path, socket) = listener();
        socket.set_nonblocking(true).unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(watchdog(
            path.clone().into_os_string(),
            Duration::from_millis(50),
            cancel.clone(),
        ));
        // The first ping at once, then one per interval (about 10 in 500 ms).
        tokio::time::sleep(Duration::from_millis(500)).await;
        cancel.cancel();
        task.await.unwrap();
        let mut pings = 0;
        let mut buf = [0u8; 64];
        while let Ok(n) = socket.recv(&mut buf) {
            assert_eq!(&buf[..n], b"WATCHDOG=1");
            pings += 1;
        }
        assert!(pings >= 2, "{pings} pings in 500 ms at one per 50 ms");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(socket.recv(&mut buf).is_err(), "no ping after the cancel");
    }
}
