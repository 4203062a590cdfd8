//! Digest authentication of REGISTER (RFC 3261 §22, RFC 2617 MD5 with qop=auth), users
//! from the cluster configuration (`sip.users.<name>`). Nonces are a timestamp and an HMAC
//! under a key each peer draws at start, so a peer checks its own nonces without storing
//! them, and another peer never accepts them (an endpoint that moves is challenged again).
//! What is stored is their use: each nonce is good once per `nc` (RFC 7616 §3.4.5), so a
//! captured Authorization header cannot be replayed — only the same request retransmitted
//! from the same place is answered again.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Mutex;

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

    /// When we issued `nonce` (if we did), and whether it is still fresh.
    fn check(&self, nonce: &str, now_ms: u64) -> Option<(u64, bool)> {
        let (at, _) = nonce.split_once('.')?;
        let at = u64::from_str_radix(at, 16).ok()?;
        (self.nonce(at) == nonce).then_some((at, now_ms.saturating_sub(at) <= NONCE_LIFETIME_MS))
    }
}

/// Most nonces whose use is remembered; past it the oldest are forgotten, and a forgotten
/// nonce is refused as stale (its client simply authenticates again).
const MAX_TRACKED_NONCES: usize = 100_000;

/// The highest `nc` each of this peer's nonces was used with, and which request used it.
#[derive(Default)]
pub struct NonceUses {
    used: Mutex<HashMap<String, Use>>,
}

struct Use {
    nc: u64,
    /// The request that used `nc`: its bytes and source. A retransmission is identical.
    request: u64,
    issued_ms: u64,
}

impl NonceUses {
    /// Records `nc` of `nonce` for `request`; false for a replay (an `nc` not above the
    /// highest seen, unless it is the very request that used it, retransmitted).
    fn accept(&self, nonce: &str, issued_ms: u64, nc: u64, request: u64, now_ms: u64) -> bool {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if used.len() >= MAX_TRACKED_NONCES && !used.contains_key(nonce) {
            used.retain(|_, u| now_ms.saturating_sub(u.issued_ms) <= NONCE_LIFETIME_MS);
            if used.len() >= MAX_TRACKED_NONCES {
                return false;
            }
        }
        match used.get_mut(nonce) {
            Some(u) if nc > u.nc => {
                u.nc = nc;
                u.request = request;
                true
            }
            Some(u) => nc == u.nc && request == u.request,
            None => {
                used.insert(
                    nonce.to_string(),
                    Use {
                        nc,
                        request,
                        issued_ms,
                    },
                );
                true
            }
        }
    }

    /// Forgets nonces past their life (they are refused as stale anyway).
    pub fn sweep(&self, now_ms: u64) {
        self.used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, u| now_ms.saturating_sub(u.issued_ms) <= NONCE_LIFETIME_MS);
    }
}

/// What makes a request itself: its bytes and where it came from.
pub fn request_fingerprint(req: &Message, source: SocketAddr) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    req.raw().hash(&mut h);
    source.hash(&mut h);
    h.finish()
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
pub(crate) fn parse_digest(value: &str) -> Option<HashMap<String, String>> {
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

fn challenge(c: &Checker, stale: bool) -> Verdict {
    let nonce = c.key.nonce(unix_ms_now());
    let stale = if stale { ", stale=true" } else { "" };
    let header = if c.proxy {
        "Proxy-Authenticate"
    } else {
        "WWW-Authenticate"
    };
    Verdict::Challenge(format!(
        "{header}: Digest realm=\"{}\", nonce=\"{nonce}\", algorithm=MD5, qop=\"auth\"{stale}",
        c.realm
    ))
}

/// The secrets and memory a check needs.
pub struct Checker<'a> {
    pub users: &'a HashMap<String, String>,
    pub realm: &'a str,
    pub key: &'a NonceKey,
    pub uses: &'a NonceUses,
    /// A proxy's challenge (407, `Proxy-Authorization`) rather than a registrar's (401).
    pub proxy: bool,
}

pub fn check(req: &Message, method: &str, request: u64, c: &Checker) -> Verdict {
    let (users, realm, key) = (c.users, c.realm, c.key);
    let kind = if c.proxy {
        HeaderKind::ProxyAuthorization
    } else {
        HeaderKind::Authorization
    };
    let Some(header) = req.value(kind) else {
        return challenge(c, false);
    };
    let Some(d) = parse_digest(&header) else {
        return Verdict::Refused("the Authorization header is not Digest");
    };
    let get = |k: &str| d.get(k).map(String::as_str).unwrap_or("");
    if !get("algorithm").is_empty() && !get("algorithm").eq_ignore_ascii_case("MD5") {
        return Verdict::Refused("only algorithm MD5 is supported");
    }
    if get("realm") != realm {
        return challenge(c, false);
    }
    let now = unix_ms_now();
    let issued = match key.check(get("nonce"), now) {
        None => return challenge(c, false),
        Some((_, false)) => return challenge(c, true),
        Some((issued, true)) => issued,
    };
    let user = get("username");
    let Some(password) = users.get(user) else {
        return Verdict::Refused("unknown user or wrong password");
    };
    let ha1 = md5_hex(&format!("{user}:{realm}:{password}"));
    let ha2 = md5_hex(&format!("{method}:{}", get("uri")));
    // Without qop there is no nc: such a nonce is good for one request.
    let nc = match get("qop") {
        "" => 1,
        _ => match u64::from_str_radix(get("nc"), 16) {
            Ok(nc) if nc > 0 => nc,
            _ => return Verdict::Refused("nc is missing or not a hexadecimal count"),
        },
    };
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
    if expected != get("response") {
        return Verdict::Refused("unknown user or wrong password");
    }
    // Right credentials: now the nonce's use is spent. A replay is challenged afresh.
    if !c.uses.accept(get("nonce"), issued, nc, request, now) {
        return challenge(c, false);
    }
    Verdict::Ok(user.to_string())
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
        let uses = NonceUses::default();
        let c = Checker {
            users: &users,
            realm: "testrealm@host.com",
            key: &key,
            uses: &uses,
            proxy: false,
        };
        assert!(matches!(
            check(&req("00"), "REGISTER", 1, &c),
            Verdict::Refused(_)
        ));
        assert!(
            matches!(check(&req(&response), "REGISTER", 1, &c), Verdict::Ok(u) if u == "Mufasa")
        );
        // The same request again (a retransmission) is answered; the same credentials in
        // another request (a replay) are challenged afresh.
        assert!(matches!(
            check(&req(&response), "REGISTER", 1, &c),
            Verdict::Ok(_)
        ));
        assert!(matches!(
            check(&req(&response), "REGISTER", 2, &c),
            Verdict::Challenge(h) if !h.contains("stale")
        ));
        // Another peer's key does not know the nonce: a fresh challenge.
        let other = NonceKey::generate();
        let elsewhere = Checker { key: &other, ..c };
        assert!(matches!(
            check(&req(&response), "REGISTER", 3, &elsewhere),
            Verdict::Challenge(_)
        ));
        assert_eq!(md5_hex(""), "d41d8cd98f00b204e9800998ecf8427e");
    }

    #[test]
    fn each_nc_of_a_nonce_is_good_once_and_a_higher_nc_is_good_again() {
        let uses = NonceUses::default();
        assert!(uses.accept("n", 0, 1, 10, 1));
        assert!(uses.accept("n", 0, 1, 10, 1), "a retransmission");
        assert!(!uses.accept("n", 0, 1, 11, 1), "another request with nc 1");
        assert!(uses.accept("n", 0, 2, 11, 1), "the client counted on");
        assert!(!uses.accept("n", 0, 1, 10, 1), "an old count");
        uses.sweep(NONCE_LIFETIME_MS + 1);
        assert!(uses.used.lock().unwrap().is_empty());
    }
}
