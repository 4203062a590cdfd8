//! One SIP message over one `Bytes`: the start line and an index of header byte ranges.
//! Nothing is copied while parsing; typed accessors read the few headers a registrar and
//! proxy need, and every header (known or not) stays as the bytes that arrived.

use std::ops::Range;

use bytes::Bytes;

use crate::limits::Limits;
use crate::syntax::{check_name_addr, check_via, is_token, split_top};
use crate::uri::SipUri;

/// Why a message was refused. `status()` is the response a request gets (RFC 3261 §21).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("message larger than {0} bytes")]
    TooLarge(usize),
    #[error("no end of headers (CRLF CRLF)")]
    NoHeaderEnd,
    #[error("start line: {0}")]
    StartLine(&'static str),
    #[error("SIP version '{0}' is not supported")]
    Version(String),
    #[error("header line {0}: {1}")]
    Header(usize, &'static str),
    #[error("more than {0} headers")]
    TooManyHeaders(usize),
    #[error("{0}: {1}")]
    Field(&'static str, &'static str),
    #[error("missing mandatory header {0}")]
    Missing(&'static str),
    #[error("Content-Length {declared} but {available} body bytes")]
    ContentLength { declared: usize, available: usize },
}

impl ParseError {
    /// The response to a request that failed this way.
    pub fn status(&self) -> u16 {
        match self {
            ParseError::Version(_) => 505,
            ParseError::TooLarge(_) => 513,
            _ => 400,
        }
    }
}

/// The headers the registrar and proxy read, by their full and compact names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderKind {
    Via,
    From,
    To,
    CallId,
    CSeq,
    Contact,
    Expires,
    MinExpires,
    MaxForwards,
    ContentLength,
    ContentType,
    Route,
    RecordRoute,
    Path,
    Authorization,
    ProxyAuthorization,
    Supported,
    Require,
    ProxyRequire,
    Other,
}

impl HeaderKind {
    pub fn of(name: &[u8]) -> HeaderKind {
        let eq = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
        match name.len() {
            1 => match name[0].to_ascii_lowercase() {
                b'v' => HeaderKind::Via,
                b'f' => HeaderKind::From,
                b't' => HeaderKind::To,
                b'i' => HeaderKind::CallId,
                b'm' => HeaderKind::Contact,
                b'l' => HeaderKind::ContentLength,
                b'c' => HeaderKind::ContentType,
                b'k' => HeaderKind::Supported,
                _ => HeaderKind::Other,
            },
            _ if eq("via") => HeaderKind::Via,
            _ if eq("from") => HeaderKind::From,
            _ if eq("to") => HeaderKind::To,
            _ if eq("call-id") => HeaderKind::CallId,
            _ if eq("cseq") => HeaderKind::CSeq,
            _ if eq("contact") => HeaderKind::Contact,
            _ if eq("expires") => HeaderKind::Expires,
            _ if eq("min-expires") => HeaderKind::MinExpires,
            _ if eq("max-forwards") => HeaderKind::MaxForwards,
            _ if eq("content-length") => HeaderKind::ContentLength,
            _ if eq("content-type") => HeaderKind::ContentType,
            _ if eq("route") => HeaderKind::Route,
            _ if eq("record-route") => HeaderKind::RecordRoute,
            _ if eq("path") => HeaderKind::Path,
            _ if eq("authorization") => HeaderKind::Authorization,
            _ if eq("proxy-authorization") => HeaderKind::ProxyAuthorization,
            _ if eq("supported") => HeaderKind::Supported,
            _ if eq("require") => HeaderKind::Require,
            _ if eq("proxy-require") => HeaderKind::ProxyRequire,
            _ => HeaderKind::Other,
        }
    }

    /// Headers whose value may be a comma-separated list of several (RFC 3261 §7.3.1).
    pub fn is_list(self) -> bool {
        matches!(
            self,
            HeaderKind::Via
                | HeaderKind::Contact
                | HeaderKind::Route
                | HeaderKind::RecordRoute
                | HeaderKind::Path
                | HeaderKind::Supported
                | HeaderKind::Require
                | HeaderKind::ProxyRequire
        )
    }

    /// Headers a message may carry once at most: their value is not a list (RFC 3261
    /// §7.3.1), so a second row is an error (RFC 4475 §3.3.8, §3.3.9), with the name to
    /// say so.
    fn single(self) -> Option<&'static str> {
        Some(match self {
            HeaderKind::From => "From",
            HeaderKind::To => "To",
            HeaderKind::CallId => "Call-ID",
            HeaderKind::CSeq => "CSeq",
            HeaderKind::MaxForwards => "Max-Forwards",
            HeaderKind::ContentLength => "Content-Length",
            HeaderKind::ContentType => "Content-Type",
            HeaderKind::Expires => "Expires",
            HeaderKind::MinExpires => "Min-Expires",
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: HeaderKind,
    pub name: Range<usize>,
    /// Trimmed; may span folded lines.
    pub value: Range<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartLine {
    Request {
        method: Range<usize>,
        uri: Range<usize>,
    },
    Response {
        status: u16,
        reason: Range<usize>,
    },
}

/// Whether the message came over a datagram (UDP) or a stream (TCP/TLS): streams need a
/// Content-Length (RFC 3261 §18.3), datagrams may leave it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Datagram,
    Stream,
}

#[derive(Clone, Debug)]
pub struct Message {
    raw: Bytes,
    start: StartLine,
    headers: Vec<Header>,
    body: Range<usize>,
}

fn trim(raw: &[u8], mut r: Range<usize>) -> Range<usize> {
    while r.start < r.end && matches!(raw[r.start], b' ' | b'\t' | b'\r' | b'\n') {
        r.start += 1;
    }
    while r.end > r.start && matches!(raw[r.end - 1], b' ' | b'\t' | b'\r' | b'\n') {
        r.end -= 1;
    }
    r
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

impl Message {
    /// Parses one whole message. On a datagram, bytes after Content-Length are dropped
    /// (RFC 3261 §18.3); on a stream, the caller has framed exactly one message.
    pub fn parse(raw: Bytes, transport: Transport, limits: &Limits) -> Result<Message, ParseError> {
        if raw.len() > limits.max_message {
            return Err(ParseError::TooLarge(limits.max_message));
        }
        let head_end = find(&raw, b"\r\n\r\n", 0).ok_or(ParseError::NoHeaderEnd)?;
        let line_end = find(&raw, b"\r\n", 0).unwrap_or(head_end);
        if line_end > limits.max_start_line {
            return Err(ParseError::StartLine("longer than the limit"));
        }
        let start = parse_start_line(&raw, 0..line_end)?;
        let headers = parse_headers(&raw, line_end + 2, head_end + 2, limits)?;
        let body_start = head_end + 4;
        let available = raw.len() - body_start;
        let declared = headers
            .iter()
            .find(|h| h.kind == HeaderKind::ContentLength)
            .map(|h| parse_u32(&raw[h.value.clone()]).map(|n| n as usize))
            .transpose()
            .map_err(|e| ParseError::Field("Content-Length", e))?;
        let body = match (declared, transport) {
            (Some(n), _) if n > available => {
                return Err(ParseError::ContentLength {
                    declared: n,
                    available,
                })
            }
            (Some(n), Transport::Stream) if n != available => {
                return Err(ParseError::ContentLength {
                    declared: n,
                    available,
                })
            }
            (Some(n), _) => body_start..body_start + n,
            (None, Transport::Datagram) => body_start..raw.len(),
            (None, Transport::Stream) => return Err(ParseError::Missing("Content-Length")),
        };
        let msg = Message {
            raw,
            start,
            headers,
            body,
        };
        msg.check()?;
        Ok(msg)
    }

    /// The mandatory headers are there and readable (RFC 3261 §8.1.1); a request's CSeq
    /// method is its own.
    fn check(&self) -> Result<(), ParseError> {
        for (kind, name) in [
            (HeaderKind::Via, "Via"),
            (HeaderKind::From, "From"),
            (HeaderKind::To, "To"),
            (HeaderKind::CallId, "Call-ID"),
            (HeaderKind::CSeq, "CSeq"),
        ] {
            if self.first(kind).is_none() {
                return Err(ParseError::Missing(name));
            }
        }
        let (_, cseq_method) = self.cseq()?;
        if let Some(method) = self.method() {
            if cseq_method != method {
                return Err(ParseError::Field(
                    "CSeq",
                    "its method differs from the request's",
                ));
            }
        }
        if self.first(HeaderKind::MaxForwards).is_some() {
            self.max_forwards()?;
        }
        if self.first(HeaderKind::Expires).is_some() {
            self.expires()?;
        }
        self.check_structure()
    }

    /// One row at most of a header whose value is not a list, and Via, From, To and
    /// Contact values as the grammar has them: a proxy copies their bytes unchanged into
    /// what it forwards, so a malformed one is refused rather than passed on.
    fn check_structure(&self) -> Result<(), ParseError> {
        let mut seen: Vec<HeaderKind> = Vec::with_capacity(8);
        for h in &self.headers {
            let Some(name) = h.kind.single() else {
                continue;
            };
            if seen.contains(&h.kind) {
                return Err(ParseError::Field(name, "more than one"));
            }
            seen.push(h.kind);
        }
        for h in &self.headers {
            let value = &self.raw[h.value.clone()];
            let (name, result) = match h.kind {
                HeaderKind::Via => (
                    "Via",
                    split_top(value).and_then(|vias| vias.into_iter().try_for_each(check_via)),
                ),
                HeaderKind::From => ("From", check_name_addr(value)),
                HeaderKind::To => ("To", check_name_addr(value)),
                HeaderKind::Contact => (
                    "Contact",
                    split_top(value).and_then(|contacts| match contacts[..] {
                        [one] if one.trim_ascii() == b"*" => Ok(()),
                        _ => contacts.into_iter().try_for_each(check_name_addr),
                    }),
                ),
                _ => continue,
            };
            result.map_err(|why| ParseError::Field(name, why))?;
        }
        Ok(())
    }

    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    pub fn start_line(&self) -> &StartLine {
        &self.start
    }

    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    fn str_at(&self, r: &Range<usize>) -> &str {
        // Start-line parts and header names are checked to be tokens or ASCII.
        std::str::from_utf8(&self.raw[r.clone()]).unwrap_or("")
    }

    pub fn method(&self) -> Option<&str> {
        match &self.start {
            StartLine::Request { method, .. } => Some(self.str_at(method)),
            StartLine::Response { .. } => None,
        }
    }

    pub fn uri(&self) -> Option<&str> {
        match &self.start {
            StartLine::Request { uri, .. } => Some(self.str_at(uri)),
            StartLine::Response { .. } => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match &self.start {
            StartLine::Response { status, .. } => Some(*status),
            StartLine::Request { .. } => None,
        }
    }

    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    pub fn header_name(&self, h: &Header) -> &[u8] {
        &self.raw[h.name.clone()]
    }

    /// A header's value as it arrived (folded lines included).
    pub fn header_value(&self, h: &Header) -> &[u8] {
        &self.raw[h.value.clone()]
    }

    pub fn first(&self, kind: HeaderKind) -> Option<&Header> {
        self.headers.iter().find(|h| h.kind == kind)
    }

    /// Every value of a header kind in order, list headers split at top-level commas.
    pub fn values(&self, kind: HeaderKind) -> Vec<String> {
        let mut out = Vec::new();
        for h in self.headers.iter().filter(|h| h.kind == kind) {
            let text = unfold(self.header_value(h));
            if kind.is_list() {
                out.extend(split_list(&text));
            } else {
                out.push(text);
            }
        }
        out
    }

    pub fn value(&self, kind: HeaderKind) -> Option<String> {
        self.first(kind).map(|h| unfold(self.header_value(h)))
    }

    pub fn call_id(&self) -> Option<String> {
        self.value(HeaderKind::CallId)
    }

    /// CSeq's number and method.
    pub fn cseq(&self) -> Result<(u32, String), ParseError> {
        let v = self
            .value(HeaderKind::CSeq)
            .ok_or(ParseError::Missing("CSeq"))?;
        let mut parts = v.split_ascii_whitespace();
        let (Some(n), Some(m), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(ParseError::Field("CSeq", "not '<number> <method>'"));
        };
        let n = parse_u32(n.as_bytes()).map_err(|e| ParseError::Field("CSeq", e))?;
        if !m.bytes().all(is_token) {
            return Err(ParseError::Field("CSeq", "the method is not a token"));
        }
        Ok((n, m.to_string()))
    }

    pub fn max_forwards(&self) -> Result<Option<u32>, ParseError> {
        self.number(HeaderKind::MaxForwards, "Max-Forwards")
    }

    pub fn expires(&self) -> Result<Option<u32>, ParseError> {
        self.number(HeaderKind::Expires, "Expires")
    }

    pub fn min_expires(&self) -> Result<Option<u32>, ParseError> {
        self.number(HeaderKind::MinExpires, "Min-Expires")
    }

    fn number(&self, kind: HeaderKind, name: &'static str) -> Result<Option<u32>, ParseError> {
        match self.first(kind) {
            None => Ok(None),
            Some(h) => parse_u32(&self.raw[h.value.clone()])
                .map(Some)
                .map_err(|e| ParseError::Field(name, e)),
        }
    }

    pub fn body(&self) -> Bytes {
        self.raw.slice(self.body.clone())
    }
}

fn parse_start_line(raw: &[u8], line: Range<usize>) -> Result<StartLine, ParseError> {
    let text = &raw[line.clone()];
    if text.iter().any(|b| *b < 0x20 && *b != b'\t') {
        return Err(ParseError::StartLine("control characters"));
    }
    let sp1 = text
        .iter()
        .position(|b| *b == b' ')
        .ok_or(ParseError::StartLine("no spaces"))?;
    let first = &text[..sp1];
    if first.len() > 4 && first[..4].eq_ignore_ascii_case(b"SIP/") {
        if !first.eq_ignore_ascii_case(b"SIP/2.0") {
            return Err(ParseError::Version(
                String::from_utf8_lossy(first).into_owned(),
            ));
        }
        let rest = &text[sp1 + 1..];
        let code = rest
            .get(..3)
            .ok_or(ParseError::StartLine("no status code"))?;
        if !code.iter().all(u8::is_ascii_digit) || rest.get(3).is_some_and(|b| *b != b' ') {
            return Err(ParseError::StartLine("the status code is not three digits"));
        }
        let status = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
        if !(100..=699).contains(&status) {
            return Err(ParseError::StartLine("the status code is not 100 to 699"));
        }
        let reason_start = line.start + sp1 + 1 + 3 + usize::from(rest.len() > 3);
        return Ok(StartLine::Response {
            status,
            reason: reason_start.min(line.end)..line.end,
        });
    }
    if first.is_empty() || !first.iter().all(|b| is_token(*b)) {
        return Err(ParseError::StartLine("the method is not a token"));
    }
    // RFC 4475 §3.1.2.10 (trws): one SP between the elements and none after the version.
    if matches!(text.last(), Some(b' ' | b'\t')) {
        return Err(ParseError::StartLine(
            "spaces after the SIP version at the end of the request line",
        ));
    }
    let sp2 = text
        .iter()
        .rposition(|b| *b == b' ')
        .filter(|p| *p > sp1)
        .ok_or(ParseError::StartLine("not 'METHOD URI SIP/2.0'"))?;
    let version = &text[sp2 + 1..];
    if !version.eq_ignore_ascii_case(b"SIP/2.0") {
        return Err(ParseError::Version(
            String::from_utf8_lossy(version).into_owned(),
        ));
    }
    let uri = &text[sp1 + 1..sp2];
    if uri.is_empty() || uri.iter().any(|b| *b == b' ' || *b == b'\t' || *b >= 0x80) {
        return Err(ParseError::StartLine(
            "the Request-URI is empty or has spaces",
        ));
    }
    // §3.1.2.7 (ltgtruri): characters no URI may hold (RFC 3986 §2), '<' and '>' above all.
    if uri.iter().any(|b| *b == 0x7f || b"<>\"{}|\\^`".contains(b)) {
        return Err(ParseError::StartLine(
            "the Request-URI has characters no URI may hold ('<', '>', '\"' …)",
        ));
    }
    let scheme = &uri[..uri.iter().position(|b| *b == b':').unwrap_or(0)];
    if !scheme.first().is_some_and(u8::is_ascii_alphabetic)
        || !scheme
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(b))
    {
        return Err(ParseError::StartLine("the Request-URI has no scheme"));
    }
    // A SIP or SIPS Request-URI must read as one, without headers (RFC 3261 §19.1.1's
    // table; RFC 4475 §3.1.2.11, escruri). Other schemes are the proxy's to refuse (416).
    if scheme.eq_ignore_ascii_case(b"sip") || scheme.eq_ignore_ascii_case(b"sips") {
        let text = std::str::from_utf8(uri).map_err(|_| ParseError::StartLine("not ASCII"))?;
        if SipUri::parse(text)?.headers.is_some() {
            return Err(ParseError::StartLine(
                "the Request-URI has headers ('?…'), which it may not",
            ));
        }
    }
    Ok(StartLine::Request {
        method: line.start..line.start + sp1,
        uri: line.start + sp1 + 1..line.start + sp2,
    })
}

fn parse_headers(
    raw: &[u8],
    mut pos: usize,
    end: usize,
    limits: &Limits,
) -> Result<Vec<Header>, ParseError> {
    let mut headers: Vec<Header> = Vec::with_capacity(16);
    let mut line_no = 1;
    // Whether the current header's value is inside a quoted string, across folded lines.
    let mut quoted = false;
    while pos < end {
        let eol = find(raw, b"\r\n", pos).filter(|e| *e < end).unwrap_or(end);
        let line = pos..eol;
        line_no += 1;
        if line.len() > limits.max_header_line {
            return Err(ParseError::Header(line_no, "longer than the limit"));
        }
        if matches!(raw.get(pos), Some(b' ' | b'\t')) {
            // A folded continuation of the previous header's value.
            let last = headers
                .last_mut()
                .ok_or(ParseError::Header(line_no, "continuation without a header"))?;
            let folded = trim(raw, last.value.start..eol);
            if folded.len() > limits.max_header_line {
                return Err(ParseError::Header(line_no, "longer than the limit"));
            }
            if !controls_quoted(&raw[line.clone()], &mut quoted) {
                return Err(ParseError::Header(line_no, "control characters"));
            }
            last.value = folded;
        } else {
            let colon = raw[line.clone()]
                .iter()
                .position(|b| *b == b':')
                .ok_or(ParseError::Header(line_no, "no ':'"))?
                + pos;
            let name = trim(raw, pos..colon);
            if name.is_empty() || !raw[name.clone()].iter().all(|b| is_token(*b)) {
                return Err(ParseError::Header(line_no, "the name is not a token"));
            }
            quoted = false;
            if raw[pos..colon].iter().any(|b| *b < 0x20 && *b != b'\t')
                || !controls_quoted(&raw[colon + 1..eol], &mut quoted)
            {
                return Err(ParseError::Header(line_no, "control characters"));
            }
            if headers.len() == limits.max_headers {
                return Err(ParseError::TooManyHeaders(limits.max_headers));
            }
            headers.push(Header {
                kind: HeaderKind::of(&raw[name.clone()]),
                name,
                value: trim(raw, colon + 1..eol),
            });
        }
        pos = eol + 2;
    }
    Ok(headers)
}

/// Whether every control character (tab aside) in `line` is the second octet of a
/// quoted-pair inside a quoted string (RFC 3261 §25.1: `"BEL:\<07>"` is a valid display
/// name, RFC 4475 §3.1.1.2); `quoted` carries the state from line to folded line.
fn controls_quoted(line: &[u8], quoted: &mut bool) -> bool {
    let mut escaped = false;
    for &b in line {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'"' => *quoted = !*quoted,
            b'\\' if *quoted => escaped = true,
            b'\t' => {}
            _ if b < 0x20 || b == 0x7f => return false,
            _ => {}
        }
    }
    true
}

/// A header value with folding (CRLF + whitespace) replaced by one space, as text.
pub fn unfold(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    let mut out = String::with_capacity(text.len());
    let mut lines = text.split("\r\n");
    if let Some(first) = lines.next() {
        out.push_str(first.trim_end());
    }
    for l in lines {
        out.push(' ');
        out.push_str(l.trim());
    }
    out
}

/// Splits a list header's value at commas outside quotes and angle brackets.
pub fn split_list(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut quoted, mut angle, mut escaped) = (false, false, false);
    let mut current = String::new();
    for c in value.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            ',' if !quoted && !angle => {
                out.push(current.trim().to_string());
                current.clear();
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    if !current.trim().is_empty() || !out.is_empty() {
        out.push(current.trim().to_string());
    }
    out
}

/// A decimal number of at most 2^32-1 (RFC 3261's 32-bit fields), nothing else around it.
fn parse_u32(v: &[u8]) -> Result<u32, &'static str> {
    let s = std::str::from_utf8(v).map_err(|_| "not a number")?.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not a whole number");
    }
    s.parse::<u32>().map_err(|_| "larger than 4294967295")
}
