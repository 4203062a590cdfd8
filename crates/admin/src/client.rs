//! The CLI's side of the admin socket: one HTTP/1.1 GET, the JSON body back.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

/// Largest response the CLI reads.
const MAX_RESPONSE: u64 = 16 * 1024 * 1024;

pub fn get_json(socket: &Path, path: &str) -> anyhow::Result<serde_json::Value> {
    request(socket, "GET", path, None)
}

/// POSTs `body`; a refusal (the node's `{"error": …}`) comes back as the error, as the
/// node worded it.
pub fn post_json(
    socket: &Path,
    path: &str,
    body: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    request(socket, "POST", path, Some(body))
}

fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!("connecting to the node's admin socket {}: is the node running? (start it with 'causeway run --config …' or 'causeway lab up')", socket.display())
    })?;
    // Writes wait up to 5 s for a majority, forwarded ones up to 7 s more.
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let content = if body.is_empty() {
        String::new()
    } else {
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )
    };
    // One write: written piece by piece, the node could answer a request whose handler
    // ignores the body and close before the rest arrived (a reset or broken pipe here).
    let request = format!("{method} {path} HTTP/1.1\r\nHost: causeway\r\nConnection: close\r\nAccept: application/json\r\n{content}\r\n{body}");
    stream
        .write_all(request.as_bytes())
        .context("sending the request to the node")?;
    let mut response = Vec::new();
    stream
        .take(MAX_RESPONSE)
        .read_to_end(&mut response)
        .context("reading the node's answer")?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("the node's answer has no HTTP header")?;
    let head = String::from_utf8_lossy(&response[..split]);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("the node's answer has no HTTP status")?;
    let mut body = response[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body).context("the node's answer is badly chunked")?;
    }
    if status != 200 {
        if let Some(why) = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
        {
            anyhow::bail!("{why}");
        }
    }
    if status != 200 {
        anyhow::bail!(
            "the node answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    serde_json::from_slice(&body).context("the node's answer is not JSON")
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(
            std::str::from_utf8(&data[..line_end])
                .ok()?
                .split(';')
                .next()?
                .trim(),
            16,
        )
        .ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}
