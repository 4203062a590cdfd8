//! Requests one peer relays to another carry a mark only the peers can make (issue 17,
//! defect 13). Before, a request whose source address was a peer's skipped call admission
//! and the relay check, so one datagram with a peer's address forged passed both.
//!
//! `X-Causeway-Relay: <peer>.<HMAC-SHA256>` over the request's Call-ID, CSeq and top Via
//! branch (the relaying peer's own, new for every relay), under a key each peer draws at
//! start and shares in its own replicated stream `relay/peerN` — carried by the mesh's
//! mutual TLS, sealed at rest. A request from a peer's address without a valid mark is an
//! ordinary client's.

use std::collections::HashMap;
use std::sync::RwLock;

use causeway_sip::{HeaderKind, Message, Via};
use ring::hmac;

pub const NAMESPACE: &str = "relay";
/// The record in each peer's `relay/peerN` stream that holds its key.
pub const KEY: &str = "key";
pub const HEADER: &str = "X-Causeway-Relay";

pub struct RelayKeys {
    me: usize,
    own: hmac::Key,
    own_raw: Vec<u8>,
    peers: RwLock<HashMap<usize, hmac::Key>>,
}

fn top_branch(msg: &Message) -> Option<String> {
    let first = causeway_sip::split_list(&msg.value(HeaderKind::Via)?)
        .into_iter()
        .next()?;
    Some(Via::parse(&first).ok()?.branch()?.to_string())
}

fn signed_text(call_id: &str, cseq: &str, branch: &str) -> String {
    format!("{call_id}\n{cseq}\n{branch}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl RelayKeys {
    /// A fresh key for peer `me`.
    pub fn generate(me: usize) -> RelayKeys {
        let rng = ring::rand::SystemRandom::new();
        let mut raw = [0u8; 32];
        if ring::rand::SecureRandom::fill(&rng, &mut raw).is_err() {
            // No OS randomness: the clock and the process keep the key unguessable enough
            // for its life (it is drawn again at every start).
            let seed = format!("{:?}{}", std::time::SystemTime::now(), std::process::id());
            raw.copy_from_slice(
                ring::digest::digest(&ring::digest::SHA256, seed.as_bytes()).as_ref(),
            );
        }
        RelayKeys {
            me,
            own: hmac::Key::new(hmac::HMAC_SHA256, &raw),
            own_raw: raw.to_vec(),
            peers: RwLock::new(HashMap::new()),
        }
    }

    /// This peer's key, to write to its stream.
    pub fn own_record(&self) -> Vec<u8> {
        self.own_raw.clone()
    }

    /// A record of a `relay/peerN` stream as it is now.
    pub fn apply(&self, owner: usize, key: &str, value: Option<&[u8]>) {
        if key != KEY || owner == self.me {
            return;
        }
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        match value.filter(|v| v.len() >= 16) {
            Some(v) => {
                peers.insert(owner, hmac::Key::new(hmac::HMAC_SHA256, v));
            }
            None => {
                peers.remove(&owner);
            }
        }
    }

    /// The header line that marks a request this peer relays with top Via branch `branch`.
    pub fn mark(&self, msg: &Message, branch: &str) -> String {
        let call_id = msg.call_id().unwrap_or_default();
        let cseq = msg.value(HeaderKind::CSeq).unwrap_or_default();
        let tag = hmac::sign(&self.own, signed_text(&call_id, &cseq, branch).as_bytes());
        format!("{HEADER}: {}.{}", self.me, hex(tag.as_ref()))
    }

    /// Whether `msg` carries a valid mark of peer `peer` (the one at its source address).
    pub fn verify(&self, msg: &Message, peer: usize) -> bool {
        let Some(value) = msg.headers().iter().find_map(|h| {
            msg.header_name(h)
                .eq_ignore_ascii_case(HEADER.as_bytes())
                .then(|| {
                    String::from_utf8_lossy(msg.header_value(h))
                        .trim()
                        .to_string()
                })
        }) else {
            return false;
        };
        let Some((who, tag)) = value.split_once('.') else {
            return false;
        };
        if who.parse::<usize>().ok() != Some(peer) {
            return false;
        }
        let Some(tag) = (0..tag.len())
            .step_by(2)
            .map(|i| {
                tag.get(i..i + 2)
                    .and_then(|b| u8::from_str_radix(b, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
        else {
            return false;
        };
        let (Some(call_id), Some(cseq), Some(branch)) =
            (msg.call_id(), msg.value(HeaderKind::CSeq), top_branch(msg))
        else {
            return false;
        };
        let peers = self.peers.read().unwrap_or_else(|p| p.into_inner());
        let Some(key) = peers.get(&peer) else {
            return false;
        };
        hmac::verify(key, signed_text(&call_id, &cseq, &branch).as_bytes(), &tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use causeway_sip::{Limits, Transport};

    fn invite(branch: &str, extra: &str) -> Message {
        let text = format!("INVITE sip:b@example.com SIP/2.0\r\nVia: SIP/2.0/TCP 198.18.0.1:5060;branch={branch}\r\nVia: SIP/2.0/UDP 198.18.9.9;branch=z9hG4bKcaller\r\nFrom: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\n{extra}Content-Length: 0\r\n\r\n");
        Message::parse(Bytes::from(text), Transport::Stream, &Limits::default()).unwrap()
    }

    #[test]
    fn a_mark_verifies_for_its_peer_only_and_not_on_another_request() {
        let (one, two) = (RelayKeys::generate(1), RelayKeys::generate(2));
        two.apply(1, KEY, Some(&one.own_record()));
        let plain = invite("z9hG4bKrelay1", "");
        let mark = one.mark(&plain, "z9hG4bKrelay1");
        let marked = invite("z9hG4bKrelay1", &format!("{mark}\r\n"));
        assert!(two.verify(&marked, 1));
        assert!(!two.verify(&marked, 3), "claimed by another peer's address");
        assert!(!two.verify(&plain, 1), "no mark");
        let moved = invite("z9hG4bKother", &format!("{mark}\r\n"));
        assert!(!two.verify(&moved, 1), "a mark copied onto another request");
        let forged = invite("z9hG4bKrelay1", "X-Causeway-Relay: 1.00ff\r\n");
        assert!(!two.verify(&forged, 1));
        two.apply(1, KEY, None);
        assert!(!two.verify(&marked, 1), "a peer's key removed");
    }
}
