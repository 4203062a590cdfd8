//! SIP URIs (RFC 3261 §19.1), name-addr values (Contact, To, From, Route, Record-Route,
//! Path) and Via values, parsed from header text. Only what a registrar and proxy read is
//! typed; parameters are kept in order so they can be written back.

use std::fmt;
use std::net::IpAddr;

use crate::message::ParseError;

/// `name` or `name=value`, in the order they appeared.
pub type Params = Vec<(String, Option<String>)>;

fn param<'a>(params: &'a Params, name: &str) -> Option<Option<&'a str>> {
    params
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_deref())
}

fn write_params(f: &mut fmt::Formatter<'_>, params: &Params) -> fmt::Result {
    for (n, v) in params {
        match v {
            Some(v) => write!(f, ";{n}={v}")?,
            None => write!(f, ";{n}")?,
        }
    }
    Ok(())
}

/// Splits `;a=1;b;c="x;y"` at semicolons outside quotes.
fn parse_params(text: &str) -> Params {
    let mut out = Vec::new();
    let mut quoted = false;
    let mut start = 0;
    let bytes = text.as_bytes();
    let mut push = |s: &str| {
        let s = s.trim();
        if s.is_empty() {
            return;
        }
        match s.split_once('=') {
            Some((n, v)) => out.push((n.trim().to_string(), Some(v.trim().to_string()))),
            None => out.push((s.to_string(), None)),
        }
    };
    for (i, b) in bytes.iter().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            b';' if !quoted => {
                push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    push(&text[start..]);
    out
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SipUri {
    pub secure: bool,
    pub user: Option<String>,
    /// As written; IPv6 references keep their brackets.
    pub host: String,
    pub port: Option<u16>,
    pub params: Params,
    /// `?…` headers, kept as written.
    pub headers: Option<String>,
}

impl SipUri {
    pub fn parse(text: &str) -> Result<SipUri, ParseError> {
        let text = text.trim();
        let bad = |why| ParseError::Field("URI", why);
        let (secure, rest) = if text.len() > 4 && text[..4].eq_ignore_ascii_case("sip:") {
            (false, &text[4..])
        } else if text.len() > 5 && text[..5].eq_ignore_ascii_case("sips:") {
            (true, &text[5..])
        } else {
            return Err(bad("not a sip: or sips: URI"));
        };
        if rest
            .bytes()
            .any(|b| b <= b' ' || b == b'<' || b == b'>' || b >= 0x7f)
        {
            return Err(bad("spaces, brackets or control characters"));
        }
        // The user part ends at the '@', which neither the host, the parameters nor the
        // headers may hold unescaped; the user part may hold '?', ';' and ':' (RFC 3261
        // §25.1 user-unreserved, RFC 4475 §3.1.1.2).
        let (user, rest) = match rest.rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        if user.is_some_and(|u| u.is_empty()) {
            return Err(bad("empty user part"));
        }
        let (hostpart, headers) = match rest.split_once('?') {
            Some((r, h)) => (r, Some(h.to_string())),
            None => (rest, None),
        };
        let (hostport, params) = match hostpart.find(';') {
            Some(i) => (&hostpart[..i], parse_params(&hostpart[i + 1..])),
            None => (hostpart, Vec::new()),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let end = v6.find(']').ok_or(bad("IPv6 reference without ']'"))?;
            let after = &v6[end + 1..];
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(bad("text after the IPv6 reference")),
            };
            (&hostport[..end + 2], port)
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b))
        {
            return Err(bad("the host is not a name or an address"));
        }
        let port = match port {
            None => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or(bad("the port is not 1 to 65535"))?,
            ),
        };
        Ok(SipUri {
            secure,
            user: user.map(str::to_string),
            host: host.to_string(),
            port,
            params,
            headers,
        })
    }

    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        param(&self.params, name)
    }

    pub fn has_param(&self, name: &str) -> bool {
        self.param(name).is_some()
    }

    /// The `transport` parameter, lower case; "tls" for sips: URIs without one.
    pub fn transport(&self) -> Option<String> {
        match self.param("transport").flatten() {
            Some(t) => Some(t.to_ascii_lowercase()),
            None if self.secure => Some("tls".into()),
            None => None,
        }
    }

    /// The host as an IP address, when it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()
    }

    /// The address-of-record form: `sip:user@host`, host in lower case, no port or params
    /// (RFC 3261 §10.3 step 5 compares AORs this way).
    pub fn aor(&self) -> String {
        match &self.user {
            Some(u) => format!("sip:{u}@{}", self.host.to_ascii_lowercase()),
            None => format!("sip:{}", self.host.to_ascii_lowercase()),
        }
    }
}

impl fmt::Display for SipUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.secure { "sips:" } else { "sip:" })?;
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        f.write_str(&self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        write_params(f, &self.params)?;
        if let Some(h) = &self.headers {
            write!(f, "?{h}")?;
        }
        Ok(())
    }
}

/// `"Display" <uri>;params` or `uri;params` (then the params belong to the header).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameAddr {
    pub display: Option<String>,
    pub uri: SipUri,
    pub params: Params,
}

impl NameAddr {
    pub fn parse(text: &str) -> Result<NameAddr, ParseError> {
        let text = text.trim();
        let bad = |why| ParseError::Field("name-addr", why);
        if let Some(open) = find_unquoted(text, b'<') {
            let close = text[open..]
                .find('>')
                .map(|c| c + open)
                .ok_or(bad("'<' without '>'"))?;
            let display = text[..open].trim();
            let after = text[close + 1..].trim();
            if !after.is_empty() && !after.starts_with(';') {
                return Err(bad("text after '>'"));
            }
            Ok(NameAddr {
                display: (!display.is_empty()).then(|| display.to_string()),
                uri: SipUri::parse(&text[open + 1..close])?,
                params: parse_params(after.trim_start_matches(';')),
            })
        } else {
            let (uri, params) = match text.find(';') {
                Some(i) => (&text[..i], parse_params(&text[i + 1..])),
                None => (text, Vec::new()),
            };
            Ok(NameAddr {
                display: None,
                uri: SipUri::parse(uri)?,
                params,
            })
        }
    }

    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        param(&self.params, name)
    }

    pub fn tag(&self) -> Option<&str> {
        self.param("tag").flatten()
    }
}

impl fmt::Display for NameAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = &self.display {
            write!(f, "{d} ")?;
        }
        write!(f, "<{}>", self.uri)?;
        write_params(f, &self.params)
    }
}

/// The header parameters of a From, To or Contact value, whatever its URI's scheme: those
/// after `<…>`, or after the first `;` of a URI not in brackets (RFC 3261 §20.10).
pub fn header_params(value: &str) -> Params {
    let after = match find_unquoted(value, b'<') {
        Some(open) => match value[open..].find('>') {
            Some(close) => &value[open + close + 1..],
            None => return Vec::new(),
        },
        None => match value.find(';') {
            Some(i) => &value[i..],
            None => return Vec::new(),
        },
    };
    parse_params(after)
}

fn find_unquoted(text: &str, c: u8) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, b) in text.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            _ if b == c && !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// One Via value: `SIP/2.0/UDP host:port;branch=…`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Via {
    /// Upper case: UDP, TCP, TLS, SCTP, WS, WSS.
    pub transport: String,
    pub host: String,
    pub port: Option<u16>,
    pub params: Params,
}

impl Via {
    pub fn parse(text: &str) -> Result<Via, ParseError> {
        let bad = |why| ParseError::Field("Via", why);
        let text = text.trim();
        // `SIP / 2.0 / UDP host`: whitespace may stand around the slashes (RFC 3261 §25.1
        // SLASH, RFC 4475 §3.1.1.1), so the protocol ends at the whitespace after the
        // transport.
        let not_sip = bad("the protocol is not SIP/2.0/<transport>");
        let (name, rest) = text.split_once('/').ok_or(not_sip.clone())?;
        let (version, rest) = rest.split_once('/').ok_or(not_sip.clone())?;
        let rest = rest.trim_start();
        let (transport, rest) = rest
            .split_once(|c: char| c.is_ascii_whitespace())
            .ok_or(bad("not 'SIP/2.0/<transport> <host>'"))?;
        let (name, version) = (name.trim(), version.trim());
        if !name.eq_ignore_ascii_case("SIP") || version != "2.0" || transport.is_empty() {
            return Err(not_sip);
        }
        let rest = rest.trim();
        let (sent_by, params) = match rest.find(';') {
            Some(i) => (rest[..i].trim(), parse_params(&rest[i + 1..])),
            None => (rest, Vec::new()),
        };
        let uri = SipUri::parse(&format!("sip:{sent_by}")).map_err(|_| bad("bad sent-by"))?;
        if uri.user.is_some() || !uri.params.is_empty() {
            return Err(bad("bad sent-by"));
        }
        Ok(Via {
            transport: transport.to_ascii_uppercase(),
            host: uri.host,
            port: uri.port,
            params,
        })
    }

    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        param(&self.params, name)
    }

    pub fn branch(&self) -> Option<&str> {
        self.param("branch").flatten()
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIP/2.0/{} {}", self.transport, self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        write_params(f, &self.params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_and_print_back() {
        let u =
            SipUri::parse("sip:alice;x=1@Example.COM:5070;transport=TCP;lr?subject=hi").unwrap();
        assert_eq!(u.user.as_deref(), Some("alice;x=1"));
        assert_eq!(u.host, "Example.COM");
        assert_eq!(u.port, Some(5070));
        assert_eq!(u.transport().as_deref(), Some("tcp"));
        assert!(u.has_param("lr"));
        assert_eq!(u.aor(), "sip:alice;x=1@example.com");
        assert_eq!(
            u.to_string(),
            "sip:alice;x=1@Example.COM:5070;transport=TCP;lr?subject=hi"
        );
        let v6 = SipUri::parse("sips:[2001:db8::1]:5061").unwrap();
        assert_eq!(v6.ip(), "2001:db8::1".parse().ok());
        assert_eq!(v6.transport().as_deref(), Some("tls"));
        for bad in [
            "tel:+123",
            "sip:",
            "sip:a@",
            "sip:a@b:0",
            "sip:a@b:99999",
            "sip:a b@c",
            "sip:@h",
        ] {
            assert!(SipUri::parse(bad).is_err(), "{bad} was accepted");
        }
        // RFC 4475 §3.1.1.2 (intmeth): '?', ';' and ':' in the user part.
        let odd = SipUri::parse("sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com").unwrap();
        assert_eq!(odd.host, "example.com");
        assert!(odd.headers.is_none() && odd.params.is_empty());
        assert!(odd
            .user
            .unwrap()
            .starts_with("1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:"));
        let semi = SipUri::parse("sip:user;par=u%40example.net@example.com").unwrap();
        assert_eq!(semi.user.as_deref(), Some("user;par=u%40example.net"));
    }

    #[test]
    fn name_addrs_keep_header_params_apart_from_uri_params() {
        let n = NameAddr::parse(
            r#""A, <b>" <sip:a@h;transport=tcp>;expires=60;+sip.instance="<urn:uuid:1>""#,
        )
        .unwrap();
        assert_eq!(n.display.as_deref(), Some(r#""A, <b>""#));
        assert_eq!(n.uri.transport().as_deref(), Some("tcp"));
        assert_eq!(n.param("expires"), Some(Some("60")));
        assert_eq!(n.param("+sip.instance"), Some(Some(r#""<urn:uuid:1>""#)));
        let bare = NameAddr::parse("sip:a@h;tag=x").unwrap();
        assert_eq!(bare.tag(), Some("x"));
        assert!(bare.uri.params.is_empty());
        assert!(NameAddr::parse("<sip:a@h").is_err());
    }

    #[test]
    fn vias_parse() {
        let v = Via::parse("SIP/2.0/udp 10.0.0.1:5060 ;branch=z9hG4bK1;rport").unwrap();
        assert_eq!(v.transport, "UDP");
        assert_eq!(v.host, "10.0.0.1");
        assert_eq!(v.port, Some(5060));
        assert_eq!(v.branch(), Some("z9hG4bK1"));
        assert_eq!(v.param("rport"), Some(None));
        assert!(Via::parse("SIP/3.0/UDP h").is_err());
        assert!(Via::parse("SIP/2.0/UDP").is_err());
        // RFC 4475 §3.1.1.1 (wsinv), unfolded: whitespace around the slashes.
        let v = Via::parse("SIP  /   2.0 /UDP    192.0.2.2;branch=390skdjuw").unwrap();
        assert_eq!(
            (v.transport.as_str(), v.host.as_str()),
            ("UDP", "192.0.2.2")
        );
        assert_eq!(v.branch(), Some("390skdjuw"));
        let v =
            Via::parse("SIP  / 2.0  / TCP     spindle.example.com   ;  branch  =   z9hG4bK9ikj8")
                .unwrap();
        assert_eq!(
            (v.transport.as_str(), v.branch()),
            ("TCP", Some("z9hG4bK9ikj8"))
        );
    }
}
