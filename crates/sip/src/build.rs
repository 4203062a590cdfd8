//! Writing messages: a response to a request (RFC 3261 §8.2.6), and a request or response
//! forwarded with a few edits (§16.6) while every other header is copied byte for byte.

use bytes::{BufMut, Bytes, BytesMut};

use crate::message::{split_list, unfold, HeaderKind, Message};

/// A response to `req`: its Via, From, Call-ID and CSeq copied, its To copied with
/// `to_tag` added when it has none (RFC 3261 §8.2.6.2), then `extra` header lines.
pub fn response(
    req: &Message,
    status: u16,
    reason: &str,
    to_tag: Option<&str>,
    extra: &[String],
) -> Bytes {
    let mut out = BytesMut::with_capacity(512 + req.headers().len() * 64);
    out.put_slice(format!("SIP/2.0 {status} {reason}\r\n").as_bytes());
    for h in req.headers() {
        let copy = matches!(
            h.kind,
            HeaderKind::Via | HeaderKind::From | HeaderKind::CallId | HeaderKind::CSeq
        ) || (h.kind == HeaderKind::RecordRoute && (101..300).contains(&status));
        if copy {
            put_header(&mut out, req, h);
        } else if h.kind == HeaderKind::To {
            out.put_slice(b"To: ");
            out.put_slice(req.header_value(h));
            if let Some(tag) = to_tag {
                let value = unfold(req.header_value(h));
                if status > 100 && !has_tag(&value) {
                    out.put_slice(format!(";tag={tag}").as_bytes());
                }
            }
            out.put_slice(b"\r\n");
        }
    }
    for line in extra {
        out.put_slice(line.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"Content-Length: 0\r\n\r\n");
    out.freeze()
}

/// Whether a To/From value carries a tag parameter (outside the URI's brackets, any URI
/// scheme, whitespace allowed around `;` and `=` as in RFC 4475 §3.1.1.1).
pub fn has_tag(value: &str) -> bool {
    crate::uri::header_params(value)
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("tag"))
}

fn put_header(out: &mut BytesMut, msg: &Message, h: &crate::message::Header) {
    out.put_slice(msg.header_name(h));
    out.put_slice(b": ");
    out.put_slice(msg.header_value(h));
    out.put_slice(b"\r\n");
}

/// What a forwarded message changes; everything else is copied as it arrived.
#[derive(Default, Debug, Clone)]
pub struct Edit {
    /// A new Request-URI (requests only).
    pub uri: Option<String>,
    /// Header lines put first (`Via: …`, `Record-Route: …`), in this order.
    pub prepend: Vec<String>,
    /// Drop the first Via value (a proxy forwarding a response, §16.7 step 3).
    pub pop_via: bool,
    /// Drop this many Route values from the front (they named this proxy, §16.4).
    pub pop_routes: usize,
    /// Replace Max-Forwards (or add it) with this value.
    pub max_forwards: Option<u32>,
}

/// The message with `edit` applied. A message without Content-Length gets one, so it can go
/// out on a stream whatever it came in on.
pub fn rewrite(msg: &Message, edit: &Edit) -> Bytes {
    let raw = msg.raw();
    let mut out = BytesMut::with_capacity(raw.len() + 256);
    match (msg.method(), &edit.uri) {
        (Some(method), Some(uri)) => {
            out.put_slice(format!("{method} {uri} SIP/2.0\r\n").as_bytes());
        }
        _ => {
            let end = raw
                .windows(2)
                .position(|w| w == b"\r\n")
                .unwrap_or(raw.len());
            out.put_slice(&raw[..end]);
            out.put_slice(b"\r\n");
        }
    }
    for line in &edit.prepend {
        out.put_slice(line.as_bytes());
        out.put_slice(b"\r\n");
    }
    let mut via_done = !edit.pop_via;
    let mut routes_to_drop = edit.pop_routes;
    let mut has_length = false;
    let mut has_max_forwards = false;
    for h in msg.headers() {
        match h.kind {
            HeaderKind::Via if !via_done => {
                via_done = true;
                let values = split_list(&unfold(msg.header_value(h)));
                if values.len() > 1 {
                    out.put_slice(format!("Via: {}\r\n", values[1..].join(", ")).as_bytes());
                }
            }
            HeaderKind::Route if routes_to_drop > 0 => {
                let values = split_list(&unfold(msg.header_value(h)));
                let dropped = routes_to_drop.min(values.len());
                routes_to_drop -= dropped;
                if dropped < values.len() {
                    out.put_slice(
                        format!("Route: {}\r\n", values[dropped..].join(", ")).as_bytes(),
                    );
                }
            }
            HeaderKind::MaxForwards if edit.max_forwards.is_some() => {
                if !has_max_forwards {
                    let n = edit.max_forwards.unwrap_or(70);
                    out.put_slice(format!("Max-Forwards: {n}\r\n").as_bytes());
                }
                has_max_forwards = true;
            }
            _ => {
                has_length |= h.kind == HeaderKind::ContentLength;
                put_header(&mut out, msg, h);
            }
        }
    }
    if let (Some(n), false) = (edit.max_forwards, has_max_forwards) {
        out.put_slice(format!("Max-Forwards: {n}\r\n").as_bytes());
    }
    let body = msg.body();
    if !has_length {
        out.put_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.put_slice(b"\r\n");
    out.put_slice(&body);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Limits, Transport};

    fn parse(text: &str) -> Message {
        Message::parse(
            Bytes::from(text.replace('\n', "\r\n")),
            Transport::Datagram,
            &Limits::default(),
        )
        .unwrap()
    }

    const INVITE: &str = "INVITE sip:bob@example.com SIP/2.0\nVia: SIP/2.0/UDP a.example;branch=z9hG4bK1, SIP/2.0/UDP b.example;branch=z9hG4bK2\nVia: SIP/2.0/UDP c.example;branch=z9hG4bK3\nRoute: <sip:p1.example;lr>, <sip:p2.example;lr>\nMax-Forwards: 70\nFrom: <sip:alice@example.com>;tag=1\nTo: <sip:bob@example.com>\nCall-ID: c1\nCSeq: 1 INVITE\nX-Custom:   kept  as is\n\nbody";

    #[test]
    fn a_response_copies_the_dialog_headers_and_tags_to() {
        let req = parse(INVITE);
        let resp = response(
            &req,
            180,
            "Ringing",
            Some("t9"),
            &["Contact: <sip:b@h>".into()],
        );
        let text = String::from_utf8(resp.to_vec()).unwrap();
        assert!(text.starts_with("SIP/2.0 180 Ringing\r\n"));
        assert!(text.contains("To: <sip:bob@example.com>;tag=t9\r\n"));
        assert!(text.contains("Via: SIP/2.0/UDP c.example;branch=z9hG4bK3\r\n"));
        assert!(text.contains("Contact: <sip:b@h>\r\n"));
        assert!(!text.contains("Route"));
        let parsed = Message::parse(resp, Transport::Stream, &Limits::default()).unwrap();
        assert_eq!(parsed.status(), Some(180));
        assert!(has_tag("<sip:a@b;tag=x>;tag=y"));
        assert!(!has_tag("<sip:a@b;tag=x>"));
        assert!(has_tag(
            "sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n"
        ));
        assert!(has_tag("<tel:+1234>;tag=1"));
        assert!(has_tag("<sip:a@b>;+sip.instance=\"<urn:x>\";tag=2"));
        assert!(!has_tag("sip:a@b;user=phone"));
        assert!(!has_tag("\"tag=1;\" <sip:a@b>"));
    }

    #[test]
    fn rewrite_pops_the_first_list_value_and_keeps_the_rest_verbatim() {
        let req = parse(INVITE);
        let out = rewrite(
            &req,
            &Edit {
                uri: Some("sip:bob@10.0.0.9:5062".into()),
                prepend: vec!["Via: SIP/2.0/UDP me;branch=z9hG4bKme".into()],
                pop_via: false,
                pop_routes: 1,
                max_forwards: Some(69),
            },
        );
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.starts_with(
            "INVITE sip:bob@10.0.0.9:5062 SIP/2.0\r\nVia: SIP/2.0/UDP me;branch=z9hG4bKme\r\n"
        ));
        assert!(text.contains("Route: <sip:p2.example;lr>\r\n"));
        assert!(!text.contains("p1.example"));
        assert!(text.contains("Max-Forwards: 69\r\n"));
        assert!(text.contains("X-Custom: kept  as is\r\n"));
        assert!(text.ends_with("Content-Length: 4\r\n\r\nbody"));
        let parsed = Message::parse(out, Transport::Stream, &Limits::default()).unwrap();
        assert_eq!(parsed.values(HeaderKind::Via).len(), 4);

        let resp = parse("SIP/2.0 200 OK\nVia: SIP/2.0/UDP me;branch=z9hG4bKme, SIP/2.0/UDP a;branch=z9hG4bK1\nFrom: <sip:a@b>;tag=1\nTo: <sip:b@b>;tag=2\nCall-ID: c\nCSeq: 1 INVITE\nContent-Length: 0\n\n");
        let out = rewrite(
            &resp,
            &Edit {
                pop_via: true,
                ..Edit::default()
            },
        );
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.contains("Via: SIP/2.0/UDP a;branch=z9hG4bK1\r\n"));
        assert!(!text.contains("me;"));
    }
}

/// RFC 3261 §18.2.1 and RFC 3581 §4: the request as it arrived from `from`, its top Via
/// marked with where it really came from — `received` when that differs from the sent-by
/// host or `rport` is asked for, and `rport` filled in when asked for. `None` when nothing
/// changes (the common case: a client that says where it is).
pub fn stamp_via(msg: &Message, from: std::net::SocketAddr) -> Option<Bytes> {
    let header = msg.headers().iter().find(|h| h.kind == HeaderKind::Via)?;
    let raw = msg.raw();
    let value = raw.get(header.value.clone())?;
    // The first value: up to the first comma, and never across a folded line.
    let end = value.iter().position(|&b| b == b',').unwrap_or(value.len());
    let first = std::str::from_utf8(&value[..end]).ok()?;
    if first.contains('\n') {
        return None;
    }
    let via = crate::Via::parse(first).ok()?;
    let wants_rport = via.param("rport").is_some_and(|v| v.is_none());
    let host = via.host.trim_start_matches('[').trim_end_matches(']');
    let differs = host.parse::<std::net::IpAddr>().ok() != Some(from.ip());
    if !differs && !wants_rport {
        return None;
    }
    let mut pieces: Vec<String> = Vec::new();
    for (i, piece) in first.split(';').enumerate() {
        let name = piece.split('=').next().unwrap_or("").trim();
        if i > 0 && name.eq_ignore_ascii_case("received") {
            continue; // ours replaces whatever was there
        }
        if i > 0 && name.eq_ignore_ascii_case("rport") && !piece.contains('=') {
            pieces.push(format!("rport={}", from.port()));
            continue;
        }
        pieces.push(piece.trim_end().to_string());
    }
    pieces.push(format!("received={}", from.ip()));
    let stamped = pieces.join(";");
    let start = header.value.start;
    let mut out = BytesMut::with_capacity(raw.len() + 48);
    out.put_slice(&raw[..start]);
    out.put_slice(stamped.as_bytes());
    out.put_slice(&raw[start + end..]);
    Some(out.freeze())
}

#[cfg(test)]
mod stamp_tests {
    use super::*;
    use crate::{Limits, Transport};

    fn register(via: &str) -> Message {
        let text = format!("REGISTER sip:example.com SIP/2.0\r\n{via}\r\nFrom: <sip:a@example.com>;tag=1\r\nTo: <sip:a@example.com>\r\nCall-ID: x\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n");
        Message::parse(Bytes::from(text), Transport::Datagram, &Limits::default()).unwrap()
    }

    fn top_via(b: Bytes) -> String {
        let m = Message::parse(b, Transport::Datagram, &Limits::default()).unwrap();
        m.values(HeaderKind::Via).remove(0)
    }

    #[test]
    fn the_top_via_says_where_the_request_came_from() {
        let from: std::net::SocketAddr = "198.51.100.7:40123".parse().unwrap();
        // Behind a NAT, asking for rport: both filled.
        let m = register("Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK1;rport");
        assert_eq!(
            top_via(stamp_via(&m, from).unwrap()),
            "SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK1;rport=40123;received=198.51.100.7"
        );
        // Another host in sent-by, no rport: received only; the second Via untouched.
        let m = register(
            "v: SIP/2.0/TCP client.example;branch=z9hG4bK2, SIP/2.0/UDP 1.2.3.4;branch=z9hG4bK0",
        );
        let b = stamp_via(&m, from).unwrap();
        let vias = Message::parse(b, Transport::Datagram, &Limits::default())
            .unwrap()
            .values(HeaderKind::Via);
        assert_eq!(
            vias[0],
            "SIP/2.0/TCP client.example;branch=z9hG4bK2;received=198.51.100.7"
        );
        assert_eq!(vias[1], "SIP/2.0/UDP 1.2.3.4;branch=z9hG4bK0");
        // A client that says where it is: nothing to do.
        let m = register("Via: SIP/2.0/UDP 198.51.100.7:40123;branch=z9hG4bK3");
        assert!(stamp_via(&m, from).is_none());
        // A forged received is replaced.
        let m = register("Via: SIP/2.0/UDP 10.0.0.5;received=6.6.6.6;branch=z9hG4bK4");
        assert_eq!(
            top_via(stamp_via(&m, from).unwrap()),
            "SIP/2.0/UDP 10.0.0.5;branch=z9hG4bK4;received=198.51.100.7"
        );
    }
}
