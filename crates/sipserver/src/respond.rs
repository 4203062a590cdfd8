//! Answers written without a parsed request: a 400 for a request too broken to parse.

use bytes::Bytes;
use causeway_sip::ParseError;

/// A `400 Bad Request` (or 505/513) naming the reason, for a request whose Via, From, To,
/// Call-ID and CSeq lines can still be found; `None` for responses, ACKs and garbage
/// (RFC 3261 §8.2.2: never answer what cannot be answered). Every Via is copied and the
/// first From, To, Call-ID and CSeq (a request may carry two, RFC 4475 §3.3.8), each with
/// its folded continuation lines.
pub fn to_malformed(raw: &[u8], error: &ParseError) -> Option<Bytes> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(raw.len())
        .min(16 * 1024);
    let head = std::str::from_utf8(&raw[..head_end]).ok()?;
    let mut lines = head.split("\r\n");
    let start = lines.next()?;
    let method = start.split(' ').next()?;
    // Any token is a method (RFC 4475 §3.1.1.2): `!interesting-Method…` is one.
    if method.is_empty()
        || method.starts_with("SIP/")
        || method == "ACK"
        || !method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b))
    {
        return None;
    }
    let mut copied: Vec<String> = Vec::new();
    let mut seen = [false; 5];
    // Whether the header being read is copied: its continuation lines go with it.
    let mut copying = false;
    for line in lines {
        if line.starts_with([' ', '\t']) {
            if copying {
                if line.len() > 1024 || line.bytes().any(|b| b < 0x20 && b != b'\t') {
                    return None;
                }
                if let Some(last) = copied.last_mut() {
                    last.push_str("\r\n");
                    last.push_str(line);
                }
            }
            continue;
        }
        copying = false;
        let Some((name, _)) = line.split_once(':') else {
            continue;
        };
        let slot = match name.trim().to_ascii_lowercase().as_str() {
            "via" | "v" => 0,
            "from" | "f" => 1,
            "to" | "t" => 2,
            "call-id" | "i" => 3,
            "cseq" => 4,
            _ => continue,
        };
        if slot > 0 && seen[slot] {
            continue;
        }
        if line.bytes().any(|b| b < 0x20 && b != b'\t') || line.len() > 1024 {
            return None;
        }
        seen[slot] = true;
        copying = true;
        copied.push(line.to_string());
    }
    if !seen.iter().all(|s| *s) {
        return None;
    }
    let reason: String = format!("Bad Request ({error})")
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    let status = error.status();
    let reason = match status {
        505 => "Version Not Supported".to_string(),
        513 => "Message Too Large".to_string(),
        _ => reason,
    };
    let mut out = format!("SIP/2.0 {status} {reason}\r\n");
    for l in copied {
        out.push_str(&l);
        out.push_str("\r\n");
    }
    out.push_str("Content-Length: 0\r\n\r\n");
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_request_with_its_dialog_headers_gets_a_400_naming_the_reason() {
        let raw = b"INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:x@y>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nMax-Forwards: many\r\n\r\n";
        let e = ParseError::Field("Max-Forwards", "not a whole number");
        let r = String::from_utf8(to_malformed(raw, &e).unwrap().to_vec()).unwrap();
        assert!(
            r.starts_with("SIP/2.0 400 Bad Request (Max-Forwards: not a whole number)\r\n"),
            "{r}"
        );
        assert!(r.contains("Call-ID: c\r\n"));
        assert!(to_malformed(b"SIP/2.0 200 OK\r\n\r\n", &e).is_none());
        assert!(to_malformed(b"\x00\x01garbage", &e).is_none());
        assert!(to_malformed(b"OPTIONS sip:a@b SIP/2.0\r\nVia: x\r\n\r\n", &e).is_none());
    }

    /// RFC 4475 §3.3.8 (multi01) and §3.1.1.1's folding: one From, To, Call-ID and CSeq
    /// copied (the first), every Via, folded lines whole; any token is a method.
    #[test]
    fn the_400_copies_the_first_of_each_header_and_folded_lines_whole() {
        let raw = b"!odd-Method.~ sip:a@b SIP/2.0\r\nVia  : SIP  /   2.0\r\n /UDP\r\n    192.0.2.2;branch=1\r\nv: SIP/2.0/TCP h2\r\nCSeq: 5 !odd-Method.~\r\nCall-ID: one\r\nCSeq: 59 !odd-Method.~\r\nCall-ID: two\r\nFrom: <sip:x@y>;tag=1\r\nTo: <sip:a@b>\r\nTo: <sip:c@d>\r\nFrom: <sip:z@y>;tag=2\r\n\r\n";
        let e = ParseError::Field("CSeq", "more than one");
        let r = String::from_utf8(to_malformed(raw, &e).unwrap().to_vec()).unwrap();
        assert_eq!(
            r,
            "SIP/2.0 400 Bad Request (CSeq: more than one)\r\nVia  : SIP  /   2.0\r\n /UDP\r\n    192.0.2.2;branch=1\r\nv: SIP/2.0/TCP h2\r\nCSeq: 5 !odd-Method.~\r\nCall-ID: one\r\nFrom: <sip:x@y>;tag=1\r\nTo: <sip:a@b>\r\nContent-Length: 0\r\n\r\n"
        );
    }
}
