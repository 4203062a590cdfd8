//! The grammar of the header values every message is checked against (RFC 3261 §25.1):
//! Via, From, To and Contact, whose bytes a proxy copies unchanged into what it forwards,
//! so a malformed one is refused (400) rather than passed on (RFC 4475 §3.1.2). Values
//! may span folded lines: CR and LF count as whitespace here.

/// `token` (RFC 3261 §25.1).
pub(crate) fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn skip_ws(v: &[u8], mut i: usize) -> usize {
    while i < v.len() && is_ws(v[i]) {
        i += 1;
    }
    i
}

fn trim_end(mut v: &[u8]) -> &[u8] {
    while let [rest @ .., b] = v {
        if !is_ws(*b) {
            break;
        }
        v = rest;
    }
    v
}

/// Just past the quoted string that starts at `v[i]` (a `"`); `None` when it never ends.
/// A quoted-pair (`\` and any octet but CR or LF) may hold a control character.
fn quoted_end(v: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < v.len() {
        match v[j] {
            b'"' => return Some(j + 1),
            b'\\' => {
                if matches!(v.get(j + 1), None | Some(b'\r' | b'\n')) {
                    return None;
                }
                j += 2;
            }
            _ => j += 1,
        }
    }
    None
}

/// A list value split at the commas outside quoted strings and `<…>`; an unterminated
/// quote or `<` is an error. Elements keep their surrounding whitespace.
pub(crate) fn split_top(v: &[u8]) -> Result<Vec<&[u8]>, &'static str> {
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < v.len() {
        match v[i] {
            b'"' => i = quoted_end(v, i).ok_or("an unterminated quoted string")?,
            b'<' => {
                i += v[i..]
                    .iter()
                    .position(|b| *b == b'>')
                    .ok_or("'<' without '>'")?
                    + 1
            }
            b',' => {
                out.push(&v[start..i]);
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    out.push(&v[start..]);
    Ok(out)
}

/// `*( SEMI generic-param )`, with whitespace allowed around `;` and `=`: every parameter
/// has a name, and a value when it has `=` (a token, host or quoted string).
pub(crate) fn check_params(v: &[u8]) -> Result<(), &'static str> {
    let mut i = skip_ws(v, 0);
    while i < v.len() {
        if v[i] != b';' {
            return Err("text where a ';' parameter should be");
        }
        i = skip_ws(v, i + 1);
        let name = i;
        while i < v.len() && is_token(v[i]) {
            i += 1;
        }
        if i == name {
            return Err("an empty parameter");
        }
        i = skip_ws(v, i);
        if v.get(i) == Some(&b'=') {
            i = skip_ws(v, i + 1);
            if v.get(i) == Some(&b'"') {
                i = quoted_end(v, i).ok_or("an unterminated quoted parameter value")?;
            } else {
                let value = i;
                while i < v.len() && v[i] > b' ' && v[i] < 0x7f && !b";,\"<>".contains(&v[i]) {
                    i += 1;
                }
                if i == value {
                    return Err("a parameter with '=' and no value");
                }
            }
            i = skip_ws(v, i);
        }
    }
    Ok(())
}

/// A URI as it may stand in a header: `scheme:` and then no whitespace, no `<`, `>` or `"`.
/// Outside `<…>` (`bare`) it must not hold `?` or `,` either (RFC 3261 §20.10).
fn check_uri(u: &[u8], bare: bool) -> Result<(), &'static str> {
    if u.iter()
        .any(|b| *b <= b' ' || *b >= 0x7f || b"<>\"".contains(b))
    {
        return Err("spaces, brackets or quotes inside a URI");
    }
    let colon = u
        .iter()
        .position(|b| *b == b':')
        .ok_or("a URI without a scheme")?;
    let scheme = &u[..colon];
    if !scheme.first().is_some_and(u8::is_ascii_alphabetic)
        || !scheme
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(b))
    {
        return Err("a URI without a scheme");
    }
    if colon + 1 == u.len() {
        return Err("an empty URI");
    }
    if bare && u.iter().any(|b| b"?,".contains(b)) {
        return Err("a URI with '?' or ',' not enclosed in '<>'");
    }
    Ok(())
}

/// A From, To or Contact value: `[display-name] <URI> *(;param)` or `URI *(;param)`. A
/// display name is a quoted string or tokens (UTF-8 letters let through).
pub(crate) fn check_name_addr(v: &[u8]) -> Result<(), &'static str> {
    let mut i = skip_ws(v, 0);
    if i == v.len() {
        return Err("empty");
    }
    if v[i] == b'"' {
        i = quoted_end(v, i).ok_or("an unterminated quoted display name")?;
        i = skip_ws(v, i);
        if v.get(i) != Some(&b'<') {
            return Err("a display name without '<URI>'");
        }
    } else {
        match v[i..].iter().position(|b| *b == b'<') {
            Some(p) => {
                let display = &v[i..i + p];
                if !display
                    .iter()
                    .all(|b| is_token(*b) || is_ws(*b) || *b >= 0x80)
                {
                    return Err("a display name that is neither tokens nor quoted");
                }
                i += p;
            }
            None => {
                let end = v[i..]
                    .iter()
                    .position(|b| *b == b';')
                    .map_or(v.len(), |p| p + i);
                check_uri(trim_end(&v[i..end]), true)?;
                return check_params(&v[end..]);
            }
        }
    }
    let close = v[i..]
        .iter()
        .position(|b| *b == b'>')
        .ok_or("'<' without '>'")?
        + i;
    check_uri(&v[i + 1..close], false)?;
    check_params(&v[close + 1..])
}

/// One Via value: `protocol-name / version / transport` (whitespace allowed around the
/// slashes), whitespace, `host[:port]`, then parameters.
pub(crate) fn check_via(v: &[u8]) -> Result<(), &'static str> {
    let bad_protocol = "the protocol is not name/version/transport";
    let mut i = skip_ws(v, 0);
    for part in 0..3 {
        let start = i;
        while i < v.len() && is_token(v[i]) {
            i += 1;
        }
        if i == start {
            return Err(bad_protocol);
        }
        if part < 2 {
            i = skip_ws(v, i);
            if v.get(i) != Some(&b'/') {
                return Err(bad_protocol);
            }
            i = skip_ws(v, i + 1);
        }
    }
    if !v.get(i).copied().is_some_and(is_ws) {
        return Err("no sent-by after the protocol");
    }
    i = skip_ws(v, i);
    let end = v[i..]
        .iter()
        .position(|b| *b == b';')
        .map_or(v.len(), |p| p + i);
    let sent_by = trim_end(&v[i..end]);
    if sent_by.is_empty()
        || !sent_by
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:_".contains(b))
    {
        return Err("the sent-by is not host[:port]");
    }
    check_params(&v[end..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_addrs_follow_the_grammar() {
        for ok in [
            "<sip:a@b>",
            "sip:a@b;tag=1",
            " sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n",
            "\"J Rosenberg \\\\\\\"\"       <sip:jdrosen@example.com>\r\n  ;\r\n  tag = 98asjd8",
            "caller<sip:caller@example.com>;tag=323",
            "token1~` token2'+_ token3*%!.- <sip:mundane@example.com>;fromParam''~+*_!.-%=\"\u{0440}\";tag=_token~1'+`*%!-.",
            "\"BEL:\\\x07 NUL:\\\x00 DEL:\\\x7f\" <sip:u@example.com>",
            "isbn:2983792873",
            "<http://www.example.com>;tag=3234233",
            "<sip:user@example.com?Route=%3Csip:sip.example.com%3E>",
            "<sip:a@b>;+sip.instance=\"<urn:uuid:1>\";reg-id=1;expires=60",
            "J\u{f6}rg <sip:j@example.com>",
        ] {
            assert_eq!(check_name_addr(ok.as_bytes()), Ok(()), "{ok:?}");
        }
        for bad in [
            "\"Mr. J. User <sip:j.user@example.com>",
            "Watson, Thomas <sip:t.watson@example.org>",
            "\"Watson, Thomas\" < sip:t.watson@example.org >",
            "\"Joe\" <sip:joe@example.org>;;;;",
            "sip:user@example.com?Route=%3Csip:sip.example.com%3E",
            "<sip:a@b",
            "<sip:a@b>x",
            "<sip:a@b>;tag=",
            "<nocolon>",
            "",
        ] {
            assert!(check_name_addr(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn vias_follow_the_grammar() {
        for ok in [
            "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1;rport",
            "SIP  /   2.0\r\n /UDP\r\n    192.0.2.2;branch=390skdjuw",
            "SIP  / 2.0  / TCP     spindle.example.com   ;\r\n  branch  =   z9hG4bK9ikj8  ",
            " SIP  /    2.0   / UDP  192.168.255.111   ; branch=\r\n z9hG4bK30239",
            "SIP/2.0/UNKNOWN t4.example.com;branch=z9hG4bKasd0f3en",
            "SIP/2.0/TLS [2001:db8::9]:5061;branch=z9hG4bK-.!%66*_+`'~;received=2001:db8::1",
            "SIP/2.0/UDP iftgw.example.com",
        ] {
            assert_eq!(check_via(ok.as_bytes()), Ok(()), "{ok:?}");
        }
        for bad in [
            "SIP/2.0/UDP 192.0.2.15;;",
            "SIP/2.0/UDP",
            "SIP/2.0 host",
            "SIP/2.0/UDP host name",
            "",
        ] {
            assert!(check_via(bad.as_bytes()).is_err(), "{bad:?}");
        }
        let list = split_top(b"SIP/2.0/UDP 192.0.2.15;;,;,,").unwrap();
        assert_eq!(list.len(), 4);
        assert!(split_top(b"\"a, b\" <sip:x>, <sip:y,z>").unwrap().len() == 2);
        assert!(split_top(b"\"open").is_err());
    }
}
