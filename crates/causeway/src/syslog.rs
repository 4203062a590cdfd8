//! `causeway syslog follow`: the node's log lines as they are written.
//!
//! Reads `GET /api/v1/syslog?lines=N&follow=true` on the node's admin socket: the last N
//! lines the node keeps (at most 1,000), then each new one as it is written, until Ctrl-C
//! or the node stops. Each line is flushed as it arrives, so `| grep` sees it at once.

use std::io::Write as _;
use std::path::Path;

pub fn follow(socket: &Path, lines: usize) -> anyhow::Result<()> {
    let path = format!("/api/v1/syslog?lines={lines}&follow=true");
    let stdout = std::io::stdout();
    causeway_admin::client::get_lines(socket, &path, |line| {
        let mut out = stdout.lock();
        match writeln!(out, "{line}").and_then(|()| out.flush()) {
            Ok(()) => Ok(()),
            // The reader went away (`| head`): stop quietly, as a tool stopped by SIGPIPE.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(128 + 13),
            Err(e) => Err(anyhow::Error::new(e).context("writing the log line")),
        }
    })?;
    anyhow::bail!("the node ended the log stream: it is stopping")
}
