//! Digest authentication of REGISTER (RFC 3261 §22, RFC 2617 MD5 with qop=auth), users
//! from the cluster configuration (`sip.users.<name>`). Nonces are stateless: a timestamp
//! and an HMAC under a key each peer draws at start, so any peer checks its own nonces
//! without storing them; an endpoint that moves to another peer is challenged again.

use std::collections::HashMap;

use causeway_common::time::unix_ms_now;
use causeway_sip::{HeaderKind, Message};
use md5::{Digest as _, Md5};
use ring::hmac;

/// How long a nonce is accepted; after that the endpoint is challenged with `stale=true`.
const NONCE_LIFETIME_MS: u64 = 300_000;

pub struct NonceKey(hmac::Key);

impl NonceKey {
    pub fn generate() -> NonceKey {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng).unwrap_or_else(|_| {
            // No OS randomness: a key from the clock still makes nonces unguessable enough
            // to expire, and this is logged nowhere secret.
            hmac::Key::new(hmac::HMAC_SHA256, &unix_ms_now().to_le_bytes())
        });
        NonceKey(key)
    }

    fn nonce(&self, at_ms: u64) -> String {
        let tag = hmac::sign(&self.0, &at_ms.to_be_bytes());
        let hex: String = tag.as_ref()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{at_ms:x}.{hex}")
    }

    /// Whether we issued `nonce`, and whether it is still fresh.
    fn check(&self, nonce: &str, now_ms: u64) -> Option<bool> {
        let (at, _) = nonce.split_once('.')?;
        let at = u64::from_str_radix(at, 16).ok()?;
        (self.nonce(at) == nonce).then_some(now_ms.saturating_sub(at) <= NONCE_LIFETIME_MS)
    }
}

pub enum Verdict {
    /// Authenticated as this user.
    Ok(String),
    /// Answer 401 with this header line.
    Challenge(String),
    /// Answer 403 with this reason.
    Refused(&'static str),
}

fn md5_hex(text: &str) -> String {
    Md5::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `Digest a="b", c=d` → map of lower-case names to unquoted values.
fn parse_digest(value: &str) -> Option<HashMap<String, String>> {
    let mut rest = value.trim().strip_prefix("Digest")?.trim_start();
    let mut out = HashMap::new();
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let name = rest[..eq].trim().to_ascii_lowercase();
        let after = rest[eq + 1..].trim_start();
        let (value, remaining) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"')?;
                (&quoted[..end], &quoted[end + 1..])
            }
            None => {
                let end = after.find(',').unwrap_or(after.len());
                (after[..end].trim(), &after[end..])
            }
        };
        out.insert(name, value.to_string());
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    Some(out)
}

fn challenge(realm: &str, key: &NonceKey, stale: bool) -> Verdict {
    let nonce = key.nonce(unix_ms_now());
    let stale = if stale { ", stale=true" } else { "" };
    Verdict::Challenge(format!(
        "WWW-Authenticate: Digest realm=\"{realm}\", nonce=\"{nonce}\", algorithm=MD5, qop=\"auth\"{stale}"
    ))
}

pub fn check(
    req: &Message,
    method: &str,
    users: &HashMap<String, String>,
    realm: &str,
    key: &NonceKey,
) -> Verdict {
    let Some(header) = req.value(HeaderKind::Authorization) else {
        return challenge(realm, key, false);
    };
    let Some(d) = parse_digest(&header) else {
        return Verdict::Refused("the Authorization header is not Digest");
    };
    let get = |k: &str| d.get(k).map(String::as_str).unwrap_or("");
    if !get("algorithm").is_empty() && !get("algorithm").eq_ignore_ascii_case("MD5") {
        return Verdict::Refused("only algorithm MD5 is supported");
    }
    if get("realm") != realm {
        return challenge(realm, key, false);
    }
    match key.check(get("nonce"), unix_ms_now()) {
        None => return challenge(realm, key, false),
        Some(false) => return challenge(realm, key, true),
        Some(true) => {}
    }
    let user = get("username");
    let Some(password) = users.get(user) else {
        return Verdict::Refused("unknown user or wrong password");
    };
    let ha1 = md5_hex(&format!("{user}:{realm}:{password}"));
    let ha2 = md5_hex(&format!("{method}:{}", get("uri")));
    let expected = match get("qop") {
        "" => md5_hex(&format!("{ha1}:{}:{ha2}", get("nonce"))),
        "auth" => md5_hex(&format!(
            "{ha1}:{}:{}:{}:auth:{ha2}",
            get("nonce"),
            get("nc"),
            get("cnonce")
        )),
        _ => return Verdict::Refused("only qop=auth is supported"),
    };
    if expected == get("response") {
        Verdict::Ok(user.to_string())
    } else {
        Verdict::Refused("unknown user or wrong password")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use causeway_sip::{Limits, Transport};

    #[test]
    fn the_rfc_2617_example_verifies_and_a_wrong_password_does_not() {
        // RFC 2617 §3.5's worked example, with a nonce of ours.
        let key = NonceKey::generate();
        let nonce = key.nonce(unix_ms_now());
        let ha1 = md5_hex("Mufasa:testrealm@host.com:Circle Of Life");
        let ha2 = md5_hex("REGISTER:sip:testrealm@host.com");
        let response = md5_hex(&format!("{ha1}:{nonce}:00000001:0a4f113b:auth:{ha2}"));
        let req = |resp: &str| {
            Message::parse(Bytes::from(format!("REGISTER sip:testrealm@host.com SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:Mufasa@testrealm@host.com>;tag=1\r\nTo: <sip:Mufasa@host.com>\r\nCall-ID: c\r\nCSeq: 2 REGISTER\r\nAuthorization: Digest username=\"Mufasa\", realm=\"testrealm@host.com\", nonce=\"{nonce}\", uri=\"sip:testrealm@host.com\", qop=auth, nc=00000001, cnonce=\"0a4f113b\", response=\"{resp}\", algorithm=MD5\r\nContent-Length: 0\r\n\r\n")), Transport::Stream, &Limits::default()).unwrap()
        };
        let users: HashMap<String, String> =
            [("Mufasa".to_string(), "Circle Of Life".to_string())].into();
        assert!(
            matches!(check(&req(&response), "REGISTER", &users, "testrealm@host.com", &key), Verdict::Ok(u) if u == "Mufasa")
        );
        assert!(matches!(
            check(&req("00"), "REGISTER", &users, "testrealm@host.com", &key),
            Verdict::Refused(_)
        ));
        // Another peer's key does not know the nonce: a fresh challenge.
        let other = NonceKey::generate();
        assert!(matches!(
            check(
                &req(&response),
                "REGISTER",
                &users,
                "testrealm@host.com",
                &other
            ),
            Verdict::Challenge(_)
        ));
        assert_eq!(md5_hex(""), "d41d8cd98f00b204e9800998ecf8427e");
    }
}
