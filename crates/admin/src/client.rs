//! The CLI's side of the admin socket: one HTTP/1.1 GET, the JSON body back; or a GET
//! whose body is read as it comes, line by line ([`get_lines`], for `syslog follow`).

use std::io::{BufRead, BufReader, Read, Write};
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

/// Longest line [`get_lines`] gathers before handing it on unfinished.
const MAX_LINE: usize = 1024 * 1024;
/// Largest chunk-size line and header section [`get_lines`] reads.
const MAX_HEAD: u64 = 64 * 1024;

/// GETs `path` and hands each line of the body to `on_line` (without its newline) as it
/// arrives: the body may be chunked and endless (`/api/v1/syslog?follow=true`). No read
/// timeout: it returns when the node ends the body, the connection fails, or `on_line`
/// returns an error. A refusal comes back as the error, as the node worded it.
pub fn get_lines(
    socket: &Path,
    path: &str,
    mut on_line: impl FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!("connecting to the node's admin socket {}: is the node running? (start it with 'causeway run --config …' or 'causeway lab up')", socket.display())
    })?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: causeway\r\nConnection: close\r\nAccept: text/plain\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .context("sending the request to the node")?;
    let mut reader = BufReader::new(stream);
    let (status, head) = read_head(&mut reader)?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    if status != 200 {
        let mut body = Vec::new();
        reader
            .take(MAX_RESPONSE)
            .read_to_end(&mut body)
            .context("reading the node's answer")?;
        if chunked {
            body = dechunk(&body).context("the node's answer is badly chunked")?;
        }
        if let Some(why) = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
        {
            anyhow::bail!("{why}");
        }
        anyhow::bail!(
            "the node answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let mut lines = Lines::default();
    if !chunked {
        // Until the node closes the connection (Connection: close).
        let mut buf = [0u8; 8192];
        loop {
            let n = read_some(&mut reader, &mut buf)?;
            if n == 0 {
                return lines.finish(&mut on_line);
            }
            lines.feed(&buf[..n], &mut on_line)?;
        }
    }
    let mut buf = vec![0u8; 8192];
    loop {
        let size_line = read_line(&mut reader)?.context("the node's answer ended mid-body")?;
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .ok()
            .with_context(|| format!("the node's answer is badly chunked: '{size_line}'"))?;
        if size == 0 {
            // Trailers, if any, do not matter.
            return lines.finish(&mut on_line);
        }
        let mut left = size;
        while left > 0 {
            let want = left.min(buf.len());
            let n = read_some(&mut reader, &mut buf[..want])?;
            if n == 0 {
                anyhow::bail!("the node's answer ended mid-chunk");
            }
            lines.feed(&buf[..n], &mut on_line)?;
            left -= n;
        }
        let end = read_line(&mut reader)?;
        if end.as_deref() != Some("") {
            anyhow::bail!("the node's answer is badly chunked: no line end after a chunk");
        }
    }
}

fn read_some(reader: &mut impl Read, buf: &mut [u8]) -> anyhow::Result<usize> {
    loop {
        match reader.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => return r.context("reading the node's answer"),
        }
    }
}

/// One CRLF- (or LF-) ended line, at most [`MAX_HEAD`] bytes; `None` at the end of input.
fn read_line(reader: &mut impl BufRead) -> anyhow::Result<Option<String>> {
    let mut line = Vec::new();
    let n = reader
        .take(MAX_HEAD)
        .read_until(b'\n', &mut line)
        .context("reading the node's answer")?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        anyhow::bail!("the node's answer has a line too long or cut short");
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// The status and the header lines.
fn read_head(reader: &mut impl BufRead) -> anyhow::Result<(u16, String)> {
    let status_line = read_line(reader)?.context("the node's answer has no HTTP header")?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("the node's answer has no HTTP status")?;
    let mut head = String::new();
    loop {
        let line = read_line(reader)?.context("the node's answer ended in its header")?;
        if line.is_empty() {
            return Ok((status, head));
        }
        if head.len() > MAX_HEAD as usize {
            anyhow::bail!("the node's answer has too long a header");
        }
        head.push_str(&line);
        head.push('\n');
    }
}

/// Bytes in, whole lines out.
#[derive(Default)]
struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    fn feed(
        &mut self,
        mut data: &[u8],
        on_line: &mut impl FnMut(&str) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        while let Some(end) = data.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&data[..end]);
            self.emit(on_line)?;
            data = &data[end + 1..];
        }
        self.partial.extend_from_slice(data);
        if self.partial.len() >= MAX_LINE {
            self.emit(on_line)?;
        }
        Ok(())
    }

    fn emit(&mut self, on_line: &mut impl FnMut(&str) -> anyhow::Result<()>) -> anyhow::Result<()> {
        if self.partial.last() == Some(&b'\r') {
            self.partial.pop();
        }
        let line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        on_line(&line)
    }

    fn finish(
        mut self,
        on_line: &mut impl FnMut(&str) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        if self.partial.is_empty() {
            Ok(())
        } else {
            self.emit(on_line)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A one-shot server on a socket in a temporary directory that writes `answer` in
    /// pieces, with a pause between them.
    fn serve(answer: Vec<Vec<u8>>) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req).unwrap();
            for piece in answer {
                if s.write_all(&piece).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        (dir, path)
    }

    fn collect(path: &Path) -> (anyhow::Result<()>, Vec<String>) {
        let mut got = Vec::new();
        let r = get_lines(path, "/api/v1/syslog?follow=true", |l| {
            got.push(l.to_string());
            Ok(())
        });
        (r, got)
    }

    #[test]
    fn lines_come_whole_across_chunks_and_pieces() {
        let (_dir, path) = serve(vec![
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
                .to_vec(),
            b"6\r\nfirst\n\r\n".to_vec(),
            b"9\r\nsec".to_vec(),
            b"ond\nth\r\n".to_vec(),
            b"4;ext=1\r\nird\n\r\n0\r\n\r\n".to_vec(),
        ]);
        let (r, got) = collect(&path);
        r.unwrap();
        assert_eq!(got, ["first", "second", "third"]);
    }

    #[test]
    fn a_body_without_chunks_is_read_to_its_end() {
        let (_dir, path) = serve(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\none\ntwo".to_vec(),
        ]);
        let (r, got) = collect(&path);
        r.unwrap();
        assert_eq!(got, ["one", "two"]);
    }

    #[test]
    fn a_refusal_is_the_error_and_bad_chunks_are_errors_not_panics() {
        let (_dir, path) = serve(vec![
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 19\r\n\r\n{\"error\":\"no such\"}".to_vec(),
        ]);
        let (r, got) = collect(&path);
        assert_eq!(r.unwrap_err().to_string(), "no such");
        assert!(got.is_empty());
        for bad in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabcd\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            b"garbage",
            b"",
        ] {
            let (_dir, path) = serve(vec![bad.to_vec()]);
            assert!(
                collect(&path).0.is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn the_callback_stops_the_read() {
        let (_dir, path) = serve(vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\none\n\r\n".to_vec(),
            b"4\r\ntwo\n\r\n".to_vec(),
        ]);
        let r = get_lines(&path, "/", |_| anyhow::bail!("enough"));
        assert_eq!(r.unwrap_err().to_string(), "enough");
    }
}
