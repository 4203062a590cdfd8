//! Where one message ends on a stream (TCP/TLS, RFC 3261 §18.3): the headers, then exactly
//! Content-Length bytes. CRLF keep-alives between messages (RFC 5626 §4.4.1) are skipped.

use crate::limits::Limits;
use crate::message::{HeaderKind, ParseError};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Not a whole message yet: read more.
    Incomplete,
    /// `n` bytes of CRLF keep-alive to consume; `ping` when a double CRLF asks for a pong.
    KeepAlive { len: usize, ping: bool },
    /// The first `len` bytes are one message.
    Message { len: usize },
}

/// Looks at the start of `buf`. An error means the stream cannot be framed any more: answer
/// 400 if a request started it, then close.
pub fn frame(buf: &[u8], limits: &Limits) -> Result<Frame, ParseError> {
    let crlfs = buf.chunks(2).take_while(|c| *c == b"\r\n").count();
    if crlfs > 0 {
        return Ok(Frame::KeepAlive {
            len: crlfs * 2,
            ping: crlfs >= 2,
        });
    }
    if buf.len() == 1 && buf[0] == b'\r' {
        return Ok(Frame::Incomplete);
    }
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > limits.max_message {
            Err(ParseError::TooLarge(limits.max_message))
        } else {
            Ok(Frame::Incomplete)
        };
    };
    let body_start = head_end + 4;
    let mut length = None;
    for line in buf[..head_end].split(|b| *b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.starts_with(b" ") || line.starts_with(b"\t") {
            continue; // a folded continuation of the header before, not a header
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = trim_ascii(&line[..colon]);
        if HeaderKind::of(name) == HeaderKind::ContentLength {
            if length.is_some() {
                // RFC 4475 §3.3.9 (mcl01): which one frames the message cannot be known.
                return Err(ParseError::Field("Content-Length", "more than one"));
            }
            let v = std::str::from_utf8(trim_ascii(&line[colon + 1..]))
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or(ParseError::Field("Content-Length", "not a whole number"))?;
            length = Some(v);
        }
    }
    let length = length.ok_or(ParseError::Missing("Content-Length"))?;
    let len = body_start
        .checked_add(length)
        .filter(|l| *l <= limits.max_message)
        .ok_or(ParseError::TooLarge(limits.max_message))?;
    Ok(if buf.len() >= len {
        Frame::Message { len }
    } else {
        Frame::Incomplete
    })
}

fn trim_ascii(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}
