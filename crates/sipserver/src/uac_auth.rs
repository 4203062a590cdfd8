//! Answering a neighbour zone's digest challenge (`zones.<name>.username|password`;
//! `docs/sip.md`, "Credentials towards a neighbour"). A neighbour that challenges a
//! request this cluster forwards (401 or 407) gets it again with the zone's credentials
//! (RFC 3261 §22.2; MD5 of RFC 2617, SHA-256 of RFC 8760, each with or without `-sess`).
//!
//! The answered request must carry a higher CSeq than the challenged one (§8.1.3.5), but the
//! caller knows only its own number. So the forwarded copy is shifted up by one, every
//! answer going back is shifted down again, and the shift is kept for the dialog in this
//! peer's Record-Route (`cw-cseq=<shift>.<caller's tag hash>`): a later request of the
//! caller's in that dialog is shifted up on its way through, the callee's own are not.

use bytes::{BufMut, Bytes, BytesMut};
use md5::{Digest as _, Md5};

use crate::auth::parse_digest;
use crate::routing::Credentials;

/// The Record-Route parameter that keeps a dialog's CSeq shift.
pub(crate) const CSEQ_PARAM: &str = "cw-cseq";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Algorithm {
    Md5,
    Sha256,
}

impl Algorithm {
    fn hex(self, text: &str) -> String {
        let bytes: Vec<u8> = match self {
            Algorithm::Md5 => Md5::digest(text.as_bytes()).to_vec(),
            Algorithm::Sha256 => ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
                .as_ref()
                .to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The `Authorization` (or `Proxy-Authorization`) value answering the best of `challenges`
/// (the values of a 401's `WWW-Authenticate` or a 407's `Proxy-Authenticate` headers):
/// SHA-256 before MD5, as RFC 8760 asks. Err says why none can be answered.
pub(crate) fn authorization(
    challenges: &[String],
    method: &str,
    uri: &str,
    creds: &Credentials,
    cnonce: &str,
) -> Result<String, String> {
    let mut best: Option<(Algorithm, bool, std::collections::HashMap<String, String>)> = None;
    let mut refused = Vec::new();
    for c in challenges {
        let Some(params) = parse_digest(c) else {
            refused.push("not a Digest challenge".to_string());
            continue;
        };
        let name = params
            .get("algorithm")
            .map_or("MD5".to_string(), |a| a.to_ascii_uppercase());
        let (algorithm, sess) = match name.as_str() {
            "MD5" => (Algorithm::Md5, false),
            "MD5-SESS" => (Algorithm::Md5, true),
            "SHA-256" => (Algorithm::Sha256, false),
            "SHA-256-SESS" => (Algorithm::Sha256, true),
            other => {
                refused.push(format!("algorithm {other} is not supported"));
                continue;
            }
        };
        if let Some(qop) = params.get("qop") {
            if !qop
                .split(',')
                .any(|q| q.trim().eq_ignore_ascii_case("auth"))
            {
                refused.push(format!("qop \"{qop}\" offers no \"auth\""));
                continue;
            }
        }
        if !params.contains_key("nonce") || !params.contains_key("realm") {
            refused.push("the challenge has no nonce or realm".to_string());
            continue;
        }
        if best
            .as_ref()
            .is_none_or(|(a, _, _)| *a == Algorithm::Md5 && algorithm == Algorithm::Sha256)
        {
            best = Some((algorithm, sess, params));
        }
    }
    let Some((algorithm, sess, p)) = best else {
        return Err(if refused.is_empty() {
            "no challenge to answer".to_string()
        } else {
            refused.join("; ")
        });
    };
    let get = |k: &str| p.get(k).map(String::as_str).unwrap_or("");
    let (realm, nonce) = (get("realm"), get("nonce"));
    let mut ha1 = algorithm.hex(&format!("{}:{realm}:{}", creds.user, creds.password));
    if sess {
        ha1 = algorithm.hex(&format!("{ha1}:{nonce}:{cnonce}"));
    }
    let ha2 = algorithm.hex(&format!("{method}:{uri}"));
    let qop = p.contains_key("qop");
    let nc = "00000001";
    let response = if qop {
        algorithm.hex(&format!("{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"))
    } else {
        algorithm.hex(&format!("{ha1}:{nonce}:{ha2}"))
    };
    let mut out = format!(
        "Digest username=\"{}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", response=\"{response}\", algorithm={}",
        creds.user,
        match get("algorithm") {
            "" => "MD5",
            named => named,
        }
    );
    if qop {
        out.push_str(&format!(", qop=auth, nc={nc}, cnonce=\"{cnonce}\""));
    }
    if let Some(opaque) = p.get("opaque") {
        out.push_str(&format!(", opaque=\"{opaque}\""));
    }
    Ok(out)
}

/// What to do with one header line.
pub(crate) enum LineEdit {
    Keep,
    Replace(String),
    Drop,
}

/// The message with `edit` applied to every header line named `name` (any case), given the
/// line's value. Folded lines are left as they are; the body is kept byte for byte. None: no
/// line was changed.
pub(crate) fn edit_headers(
    raw: &[u8],
    name: &str,
    mut edit: impl FnMut(&str) -> LineEdit,
) -> Option<Bytes> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 2;
    let mut out = BytesMut::with_capacity(raw.len() + 64);
    let mut changed = false;
    let mut at = 0;
    while at < end {
        let line_end = raw[at..end]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(end, |p| at + p);
        let line = &raw[at..line_end];
        let named = std::str::from_utf8(line)
            .ok()
            .and_then(|text| text.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name));
        match named.map(|(n, v)| (n, edit(v.trim()))) {
            Some((n, LineEdit::Replace(new))) => {
                out.put_slice(format!("{}: {new}\r\n", n.trim()).as_bytes());
                changed = true;
            }
            Some((_, LineEdit::Drop)) => changed = true,
            _ => {
                out.put_slice(line);
                out.put_slice(b"\r\n");
            }
        }
        at = line_end + 2;
    }
    out.put_slice(&raw[end.min(raw.len())..]);
    changed.then(|| out.freeze())
}

/// The message without any header line named `name` (any case); as it was if none.
pub(crate) fn drop_headers(raw: &Bytes, name: &str) -> Bytes {
    edit_headers(raw, name, |_| LineEdit::Drop).unwrap_or_else(|| raw.clone())
}

/// A `Record-Route` value of this peer's (`<sip:…;lr…>`) with the dialog's shift in it, in
/// place of any it had.
pub(crate) fn with_shift_param(value: &str, shift: u32, caller: &str) -> Option<String> {
    let value = value.trim();
    let close = value.rfind('>')?;
    let inside: Vec<&str> = value[..close]
        .split(';')
        .filter(|p| {
            !p.trim()
                .to_ascii_lowercase()
                .starts_with(&format!("{CSEQ_PARAM}="))
        })
        .collect();
    Some(format!(
        "{};{CSEQ_PARAM}={shift}.{caller}{}",
        inside.join(";"),
        &value[close..]
    ))
}

/// The message with its CSeq number moved by `shift` (down when negative).
pub(crate) fn shift_cseq(raw: &[u8], shift: i64) -> Option<Bytes> {
    let shifted = |v: &str| {
        let (number, method) = v.split_once(char::is_whitespace)?;
        let n = number.parse::<i64>().ok()?.checked_add(shift)?;
        u32::try_from(n)
            .ok()
            .map(|n| format!("{n} {}", method.trim()))
    };
    edit_headers(raw, "CSeq", |v| {
        shifted(v).map_or(LineEdit::Keep, LineEdit::Replace)
    })
}

/// A short, stable name for a dialog party's tag (FNV-1a): which side a later request
/// comes from, without putting the tag itself into a URI.
pub(crate) fn tag_hash(tag: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in tag.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

/// `cw-cseq` as kept in the Record-Route: (shift, caller's tag hash).
pub(crate) fn parse_shift(value: &str) -> Option<(u32, String)> {
    let (shift, tag) = value.split_once('.')?;
    Some((shift.parse().ok()?, tag.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        Credentials {
            user: "Mufasa".into(),
            password: "Circle Of Life".into(),
        }
    }

    #[test]
    fn the_rfc_2617_example_is_answered_with_its_response() {
        let challenge = "Digest realm=\"testrealm@host.com\", qop=\"auth,auth-int\", nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\", opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"";
        let a = authorization(
            &[challenge.to_string()],
            "GET",
            "/dir/index.html",
            &creds(),
            "0a4f113b",
        )
        .unwrap();
        // RFC 2617 §3.5's worked example.
        assert!(
            a.contains("response=\"6629fae49393a05397450978507c4ef1\""),
            "{a}"
        );
        assert!(a.contains("opaque=\"5ccc069c403ebaf9f0171e9517f40e41\""));
        assert!(a.contains("qop=auth, nc=00000001, cnonce=\"0a4f113b\""));
    }

    #[test]
    fn sha_256_is_preferred_and_the_rfc_7616_example_verifies() {
        let md5 = "Digest realm=\"http-auth@example.org\", qop=\"auth\", algorithm=MD5, nonce=\"7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v\", opaque=\"FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS\"";
        let sha = md5.replace("algorithm=MD5", "algorithm=SHA-256");
        let md5 = md5.to_string();
        let c = Credentials {
            user: "Mufasa".into(),
            password: "Circle of Life".into(),
        };
        let cnonce = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ";
        let a = authorization(&[md5, sha], "GET", "/dir/index.html", &c, cnonce).unwrap();
        // RFC 7616 §3.9.1's SHA-256 response.
        assert!(a.contains("algorithm=SHA-256"), "{a}");
        assert!(
            a.contains(
                "response=\"753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1\""
            ),
            "{a}"
        );
    }

    #[test]
    fn a_challenge_that_cannot_be_answered_says_why() {
        let e = authorization(
            &["Digest realm=\"r\", nonce=\"n\", algorithm=SHA-512-256".into()],
            "INVITE",
            "sip:x@y",
            &creds(),
            "c",
        )
        .unwrap_err();
        assert!(e.contains("SHA-512-256"), "{e}");
        let e = authorization(
            &["Digest realm=\"r\", nonce=\"n\", qop=\"auth-int\"".into()],
            "INVITE",
            "sip:x@y",
            &creds(),
            "c",
        )
        .unwrap_err();
        assert!(e.contains("auth-int"), "{e}");
        assert!(authorization(
            &["Basic realm=\"r\"".into()],
            "INVITE",
            "sip:x",
            &creds(),
            "c"
        )
        .is_err());
        assert!(
            !format!("{:?}", creds()).contains("Circle"),
            "no password in logs"
        );
    }

    #[test]
    fn the_cseq_moves_and_nothing_else_does() {
        let raw = b"INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\ncseq: 41 INVITE\r\nContent-Length: 4\r\n\r\nCSeq";
        let up = shift_cseq(raw, 1).unwrap();
        assert_eq!(
            &up[..],
            &b"INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\ncseq: 42 INVITE\r\nContent-Length: 4\r\n\r\nCSeq"[..]
        );
        assert_eq!(&shift_cseq(&up, -1).unwrap()[..], &raw[..]);
        assert!(
            shift_cseq(b"X\r\nCSeq: 0 BYE\r\n\r\n", -1).is_none(),
            "never below 0"
        );
        assert!(shift_cseq(b"no header end", 1).is_none());
    }

    #[test]
    fn an_old_answer_is_dropped_and_the_shift_replaces_any_before() {
        let raw = Bytes::from_static(b"INVITE sip:a@b SIP/2.0\r\nAuthorization: Digest x\r\nVia: v\r\nauthorization : Digest y\r\n\r\nbody");
        assert_eq!(
            &drop_headers(&raw, "Authorization")[..],
            &b"INVITE sip:a@b SIP/2.0\r\nVia: v\r\n\r\nbody"[..]
        );
        let none = Bytes::from_static(b"BYE sip:a SIP/2.0\r\nVia: v\r\n\r\n");
        assert_eq!(drop_headers(&none, "Authorization"), none);
        let rr = "<sip:127.0.0.1:5060;transport=udp;lr;cw-flow=3>";
        let once = with_shift_param(rr, 1, "abcd0123").unwrap();
        assert_eq!(
            once,
            "<sip:127.0.0.1:5060;transport=udp;lr;cw-flow=3;cw-cseq=1.abcd0123>"
        );
        assert_eq!(
            with_shift_param(&once, 2, "abcd0123").unwrap(),
            "<sip:127.0.0.1:5060;transport=udp;lr;cw-flow=3;cw-cseq=2.abcd0123>"
        );
    }

    #[test]
    fn the_dialogs_shift_reads_back() {
        let h = tag_hash("a73kszlfl");
        assert_eq!(h.len(), 8);
        assert_ne!(h, tag_hash("a73kszlfm"));
        assert_eq!(parse_shift(&format!("1.{h}")), Some((1, h)));
        assert_eq!(parse_shift("x.1"), None);
    }
}
