//! RFC 4475 ("Session Initiation Protocol (SIP) Torture Test Messages") against the real
//! binary: every test message of its §3 (valid, invalid, transaction and application layer,
//! backward compatibility) is sent as one UDP datagram to a running node, and its answer
//! is checked against the table below, which says for each what the RFC expects.
//!
//! The messages in `tests/rfc4475/*.dat` are RFC 4475's own test vectors, byte for byte
//! (its Appendix A archive): they name hosts in example.com and the like, but every
//! datagram goes to the node on 127.0.62.1, and the node answers to where a request came
//! from. It resolves no names, so nothing it could forward to leaves loopback; the test
//! also checks that the node sent nothing but the answers this test received.
//!
//! The node serves example.com, example.net and registrar.example.com (`sip.domains`), so
//! most valid messages reach the registrar or the proxy's lookup: a request for a user
//! nobody registered is answered 480, where RFC 4475 has a proxy answer 404 for a URI it
//! does not know — to a requester nobody authenticated (every request here: `Do not check
//! credentials`) unknown and unregistered users look alike, so a scanner cannot list the
//! users (docs/security.md). chair-dnrc.example.com, example.org and company.com are
//! other domains.
//!
//! What the RFC asks, in short: a valid message is parsed and answered as any other
//! request (never 400, never silence); an invalid one gets 400 (505 for an unknown
//! version) and the node goes on serving; a response nobody asked for is dropped. Where the
//! RFC lets an element be liberal or strict, this node is strict: it forwards headers as
//! they arrived, so being liberal would forward the errors the RFC says must not be
//! forwarded. After every message an OPTIONS to the node itself must get its 200, and
//! nothing else may arrive: a message gets one answer, or none.

mod harness;

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use harness::*;

/// This test's network: 127.0.62.x.
const NET: u8 = 62;
const MESSAGES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/rfc4475");
/// How long to wait for an answer before sending the same bytes again, and how often.
const RESEND_AFTER: Duration = Duration::from_secs(2);
const RESENDS: usize = 3;
/// The Call-IDs of this test's own OPTIONS.
const PROBE: &str = "rfc4475-probe-";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// This final status (any 1xx before it is fine).
    Status(u16),
    /// Nothing at all: a response nobody asked for, or a request that cannot be answered.
    NoAnswer,
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Status(s) => write!(f, "{s}"),
            Expect::NoAnswer => f.write_str("no answer"),
        }
    }
}

struct Row {
    section: &'static str,
    name: &'static str,
    expect: Expect,
    /// Text the answer must hold, and text it must not.
    holds: &'static [&'static str],
    lacks: &'static [&'static str],
}

const fn row(section: &'static str, name: &'static str, expect: Expect) -> Row {
    Row {
        section,
        name,
        expect,
        holds: &[],
        lacks: &[],
    }
}

use Expect::{NoAnswer, Status};

/// Every message of RFC 4475 §3 in the RFC's order, with the answer it expects. The
/// RFC's words are quoted where the answer is not plain from the section's title.
const TABLE: &[Row] = &[
    // 3.1.1 Valid messages: "All elements should treat this as a well-formed request."
    // wsinv has a To tag and a Route to services.example.com, a proxy outside the
    // cluster: an in-dialog request this cluster did not record-route, which it does not
    // relay (403), as any such request (before the fix it got a 400 for its Via).
    row("3.1.1.1", "wsinv", Status(403)),
    // An unknown method (odd token characters) to an odd user: "If this unusual URI has
    // been defined at a proxy, the proxy will forward this request normally. Otherwise, a
    // proxy will generate a 404." The node answers a request for a user it cannot reach
    // 480 when the requester is not authenticated, whether the user exists or not, so a
    // scanner cannot list users (docs/security.md); a 404 would tell. Before the fix: no
    // answer at all.
    row("3.1.1.2", "intmeth", Status(480)),
    row("3.1.1.3", "esc01", Status(480)),
    // "This request registers two distinct contact URIs."
    Row {
        holds: &[
            "Contact: <sip:%00@host5.example.com>",
            "Contact: <sip:%00%00@host5.example.com>",
        ],
        ..row("3.1.1.4", "escnull", Status(200))
    },
    // "The request method is unknown. It is NOT equivalent to REGISTER. ... An endpoint
    // would reject this message with a 501": registrar.example.com is the node itself.
    Row {
        holds: &["Allow: "],
        ..row("3.1.1.5", "esc02", Status(501))
    },
    row("3.1.1.6", "lwsdisp", Status(480)),
    row("3.1.1.7", "longreq", Status(480)),
    // "A SIP element receiving this datagram would handle the REGISTER request normally
    // and ignore the extra bits that look like an INVITE request": one answer, the
    // REGISTER's (an answer to the INVITE would arrive as an unexpected datagram).
    Row {
        holds: &["CSeq: 8 REGISTER", "Contact: <sip:j.user@host.example.com>"],
        ..row("3.1.1.8", "dblreq", Status(200))
    },
    row("3.1.1.9", "semiuri", Status(480)),
    row("3.1.1.10", "transports", Status(480)),
    // A MESSAGE with a pre-loaded Route to another proxy (127.0.0.1:5080): not relayed.
    row("3.1.1.11", "mpart01", Status(403)),
    // Responses: "A parser must accept this message"; it answers no request of the node's
    // and is dropped, as every stray response is.
    row("3.1.1.12", "unreason", NoAnswer),
    row("3.1.1.13", "noreason", NoAnswer),
    // 3.1.2 Invalid messages.
    // "An element receiving this request should respond with a 400 Bad Request error."
    row("3.1.2.1", "badinv01", Status(400)),
    // "When sent over UDP ... should respond with a 400 Bad Request error."
    row("3.1.2.2", "clerr", Status(400)),
    // "An element receiving this message should respond with an error."
    row("3.1.2.3", "ncl", Status(400)),
    // "should respond with a 400 Bad Request due to the CSeq error."
    row("3.1.2.4", "scalar02", Status(400)),
    // "An element receiving this response will simply discard it."
    row("3.1.2.5", "scalarlg", NoAnswer),
    // "An element receiving this request should return a 400 Bad Request error."
    row("3.1.2.6", "quotbal", Status(400)),
    // "It is reasonable always to reject a request with this error with a 400".
    row("3.1.2.7", "ltgtruri", Status(400)),
    // "An element receiving this request should respond with a 400 Bad Request."
    row("3.1.2.8", "lwsruri", Status(400)),
    // "It is acceptable to reject this request as malformed."
    row("3.1.2.9", "lwsstart", Status(400)),
    row("3.1.2.10", "trws", Status(400)),
    // "It is acceptable for an element to reject this request with a 400 Bad Request."
    row("3.1.2.11", "escruri", Status(400)),
    // "an element shouldn't do that unless the contents of the Date header field were
    // actually important to its processing": the node does not read Date, so the INVITE
    // is handled (480: nobody registered).
    row("3.1.2.12", "baddate", Status(480)),
    // "It is reasonable for an element receiving this request to respond with a 400".
    row("3.1.2.13", "regbadct", Status(400)),
    // "It is reasonable to reject this request with a 400 Bad Request response."
    row("3.1.2.14", "badaspec", Status(400)),
    // "It is reasonable always to reject this kind of error with a 400". (The RFC's
    // archive ends this one without the empty line after its headers; the parser refuses
    // its display names too: crates/sip/tests/parse.rs.)
    row("3.1.2.15", "baddn", Status(400)),
    // "The element should respond to the request with a 505 Version Not Supported error."
    row("3.1.2.16", "badvers", Status(505)),
    // "Any element receiving this request will respond with a 400 Bad Request."
    row("3.1.2.17", "mismatch01", Status(400)),
    // "should respond with a 501 Not Implemented. A 400 Bad Request is also acceptable":
    // the CSeq mismatch is a syntax error to the parser, whatever the method.
    row("3.1.2.18", "mismatch02", Status(400)),
    // "An element receiving this response should simply drop it."
    row("3.1.2.19", "bigcode", NoAnswer),
    // 3.2.1: "reject the request with a 400 ... or it could fall back to the RFC 2543-style
    // transaction identifier": handled, the bare z9hG4bK is a branch like any other.
    row("3.2.1", "badbranch", Status(480)),
    // 3.3 Application-layer semantics.
    // insuf has no Call-ID, From or To: "must not break because of the missing
    // information. Ideally, it will respond with a 400". The node answers a broken
    // request only when it can copy all of Via, From, To, Call-ID and CSeq into the
    // answer (RFC 3261 §8.2.6.2; sip_processes.rs holds it to that), so: no answer, and it
    // keeps serving.
    row("3.3.1", "insuf", NoAnswer),
    // "An element receiving this request will reject it with a 416 Unsupported URI Scheme".
    row("3.3.2", "unkscm", Status(416)),
    // "If an element will never accept this scheme as meaningful in a Request-URI, it is
    // appropriate to treat it as unknown and return a 416".
    row("3.3.3", "novelsc", Status(416)),
    // "A registrar would reject this request with a 400 Bad Request response, since the
    // To: header field is required to contain a SIP or SIPS URI as an AOR."
    row("3.3.4", "unksm2", Status(400)),
    // "Any element receiving this request will respond with a 420 Bad Extension response,
    // containing an Unsupported header field listing these features from either the
    // Require or Proxy-Require header field, depending on the role": a proxy here.
    Row {
        holds: &["Unsupported: noProxiesSupportThis, norDoAnyProxiesSupportThis"],
        lacks: &["nothingSupportsThis"],
        ..row("3.3.5", "bext01", Status(420))
    },
    // "A proxy receiving this request would process it just as it would any other INVITE."
    row("3.3.6", "invut", Status(480)),
    // "A registrar that does not care about challenge-response authentication will simply
    // ignore the Authorization header field": no users are configured; no Contact, so the
    // 200 lists the bindings (dblreq's).
    Row {
        holds: &["Contact: <sip:j.user@host.example.com>"],
        ..row("3.3.7", "regaut01", Status(200))
    },
    // "An element receiving this request would respond with a 400 Bad Request error."
    row("3.3.8", "multi01", Status(400)),
    // "Multiple conflicting Content-Length header field values appear in this request":
    // which one frames the message cannot be known, an error as clerr and ncl are.
    row("3.3.9", "mcl01", Status(400)),
    // "If a proxy followed normal response processing rules blindly, it would forward this
    // response to the broadcast address. To protect against this as an avenue of attack,
    // proxies should drop such responses." (The end of the test checks nothing was sent.)
    row("3.3.10", "bcast", NoAnswer),
    // "A proxy should not forward the request and should respond 483 (Too Many Hops)."
    row("3.3.11", "zeromf", Status(483)),
    // "This REGISTER should succeed. The response must not include "unknownparam" as a
    // url-parameter for this binding."
    Row {
        holds: &["Contact: <sip:+19725552222@gw1.example.net>;unknownparam"],
        lacks: &["gw1.example.net;unknownparam>"],
        ..row("3.3.12", "cparam01", Status(200))
    },
    // "The register should succeed, and a subsequent retrieval of the registration must
    // include "unknownparam" as a url-parameter."
    Row {
        holds: &["Contact: <sip:+19725552222@gw1.example.net;unknownparam>"],
        ..row("3.3.13", "cparam02", Status(200))
    },
    // "The register should succeed, and a subsequent retrieval of the registration must
    // include the escaped Route header in the contact URI for this binding."
    Row {
        holds: &["Contact: <sip:user@example.com?Route=%3Csip:sip.example.com%3E>"],
        ..row("3.3.14", "regescrt", Status(200))
    },
    // An INVITE whose Accept has no SDP: the proxy handles it as any INVITE (the 406 or
    // 400 the RFC mentions is the called endpoint's); regescrt's binding names no address
    // the node could reach, so 480.
    row("3.3.15", "sdp01", Status(480)),
    // 3.4.1: "a legal message per RFC 2543 ... that should be accepted by RFC 3261
    // elements that want to maintain backwards compatibility": no branch, no From tag, no
    // Content-Length, no Max-Forwards.
    row("3.4.1", "inv2543", Status(480)),
];

/// One datagram from the node, read as text.
struct Datagram {
    text: String,
    status: Option<u16>,
    call_id: Option<String>,
}

impl Datagram {
    fn read(bytes: &[u8]) -> Datagram {
        let text = String::from_utf8_lossy(bytes).into_owned();
        let status = text
            .strip_prefix("SIP/2.0 ")
            .and_then(|r| r.get(..3))
            .and_then(|s| s.parse().ok());
        Datagram {
            call_id: call_id(bytes),
            status,
            text,
        }
    }

    fn first_line(&self) -> &str {
        self.text.lines().next().unwrap_or("")
    }
}

/// The first Call-ID (or `i`) of a message's headers.
fn call_id(message: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(message);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    head.split("\r\n").skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        let name = name.trim();
        (name.eq_ignore_ascii_case("call-id") || name.eq_ignore_ascii_case("i"))
            .then(|| value.trim().to_string())
    })
}

struct Client {
    sock: UdpSocket,
    node: SocketAddr,
    me: SocketAddr,
    /// Every datagram the node sent this socket.
    received: u64,
    probes: u32,
}

impl Client {
    /// Sends `bytes`, then reads datagrams until one satisfies `done`; the same bytes go
    /// again after `RESEND_AFTER` without it, `RESENDS` times at most. Everything read is
    /// returned, and whether `done` was met.
    fn exchange(
        &mut self,
        bytes: &[u8],
        done: impl Fn(&Datagram) -> bool,
    ) -> (Vec<Datagram>, bool) {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65_536];
        for _ in 0..=RESENDS {
            self.sock.send_to(bytes, self.node).unwrap();
            let deadline = Instant::now() + RESEND_AFTER;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                self.sock
                    .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                    .unwrap();
                let Ok(n) = self.sock.recv(&mut buf) else {
                    break;
                };
                self.received += 1;
                let d = Datagram::read(&buf[..n]);
                let finished = done(&d);
                got.push(d);
                if finished {
                    return (got, true);
                }
            }
        }
        (got, false)
    }

    /// An OPTIONS to `uri`, with a Call-ID of its own.
    fn options(&mut self, uri: &str) -> (Vec<u8>, String) {
        self.probes += 1;
        let (n, me) = (self.probes, self.me);
        let id = format!("{PROBE}{n}");
        let msg = format!("OPTIONS {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-probe-{n}\r\nMax-Forwards: 70\r\nFrom: <sip:tester@example.com>;tag=p{n}\r\nTo: <{uri}>\r\nCall-ID: {id}\r\nCSeq: {n} OPTIONS\r\nContent-Length: 0\r\n\r\n");
        (msg.into_bytes(), id)
    }

    /// An OPTIONS to the node itself until its 200 arrives; the datagrams that came before
    /// it, or `Err` when it never came.
    fn probe(&mut self) -> Result<Vec<Datagram>, String> {
        let uri = format!("sip:{}", self.node.ip());
        let (msg, id) = self.options(&uri);
        let is_answer = |d: &Datagram| d.call_id.as_deref() == Some(id.as_str());
        let (mut got, ok) = self.exchange(&msg, |d| is_answer(d) && d.status == Some(200));
        if !ok {
            return Err(format!(
                "the OPTIONS to the node itself got no 200: {:?}",
                got.iter().map(Datagram::first_line).collect::<Vec<_>>()
            ));
        }
        got.retain(|d| !is_answer(d));
        Ok(got)
    }
}

/// `causeway_sip_messages_sent` in peer `k`'s `/metrics` (its admin socket).
fn messages_sent(c: &TestCluster, k: usize) -> u64 {
    let out = metrics(c, k);
    out.lines()
        .find(|l| l.starts_with("causeway_sip_messages_sent"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no causeway_sip_messages_sent in {out}"))
}

/// What the node did with one message, against its row: `Err` says how it differs.
fn check(
    row: &Row,
    message: &[u8],
    client: &mut Client,
    earlier: &HashSet<String>,
) -> Result<(), String> {
    let id = call_id(message);
    let ours = |d: &Datagram| id.is_some() && d.call_id == id;
    let mut got = match row.expect {
        Status(_) => {
            client
                .exchange(message, |d| ours(d) && d.status.is_some_and(|s| s >= 200))
                .0
        }
        NoAnswer => {
            client.sock.send_to(message, client.node).unwrap();
            Vec::new()
        }
    };
    // Everything that comes before the node's 200 to an OPTIONS sent after it belongs to
    // this message (the node handles one source's datagrams in order).
    got.extend(client.probe().map_err(|e| format!("after it, {e}"))?);
    let finals: Vec<&Datagram> = got
        .iter()
        .filter(|d| ours(d) && d.status.is_some_and(|s| s >= 200))
        .collect();
    let stray: Vec<&str> = got
        .iter()
        .filter(|d| {
            // A late copy of an answer to an earlier message or probe is not this one's.
            let late = d
                .call_id
                .as_ref()
                .is_some_and(|c| earlier.contains(c) || c.starts_with(PROBE));
            !ours(d) && !late
        })
        .map(Datagram::first_line)
        .collect();
    let answer = finals.first().map_or("no answer", |d| d.first_line());
    match row.expect {
        Status(s) if finals.first().and_then(|d| d.status) != Some(s) => {
            return Err(format!("expected {s}, got {answer}"));
        }
        NoAnswer if !finals.is_empty() => return Err(format!("expected no answer, got {answer}")),
        _ => {}
    }
    if finals.iter().any(|d| d.status != finals[0].status) {
        return Err(format!(
            "answered differently more than once: {:?}",
            finals.iter().map(|d| d.first_line()).collect::<Vec<_>>()
        ));
    }
    if !stray.is_empty() {
        return Err(format!(
            "expected {}, and got other datagrams too: {stray:?}",
            row.expect
        ));
    }
    if let Some(d) = finals.first() {
        for text in row.holds {
            if !d.text.contains(text) {
                return Err(format!("the {answer} should hold '{text}':\n{}", d.text));
            }
        }
        for text in row.lacks {
            if d.text.contains(text) {
                return Err(format!(
                    "the {answer} should not hold '{text}':\n{}",
                    d.text
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn every_rfc4475_torture_message_gets_the_answer_the_rfc_expects() {
    assert_eq!(TABLE.len(), 49, "RFC 4475 §3 has 49 messages");
    let c = TestCluster::start(NET, 2, "Enforce", |_, config, _, _| {
        config.push_str("\n[sip]\n");
    });
    wait_for(30, "cluster formed", || c.formed());
    set(
        &c,
        1,
        "sip.domains",
        "example.com,example.net,registrar.example.com",
    );
    let node: SocketAddr = format!("{}:5060", addr(NET, 1)).parse().unwrap();
    let sock = UdpSocket::bind(format!("{}:0", addr(NET, 20))).unwrap();
    let me = sock.local_addr().unwrap();
    let mut client = Client {
        sock,
        node,
        me,
        received: 0,
        probes: 0,
    };
    // The domains are in force once registrar.example.com is the node itself.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (msg, id) = client.options("sip:registrar.example.com");
        let (got, _) = client.exchange(&msg, |d| {
            d.call_id.as_deref() == Some(id.as_str()) && d.status.is_some_and(|s| s >= 200)
        });
        if got
            .iter()
            .any(|d| d.call_id.as_deref() == Some(id.as_str()) && d.status == Some(200))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sip.domains not in force after 20 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let sent_before = [messages_sent(&c, 1), messages_sent(&c, 2)];
    let received_before = client.received;

    let mut failures = Vec::new();
    let mut earlier = HashSet::new();
    for row in TABLE {
        let path = format!("{MESSAGES}/{}.dat", row.name);
        let message = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        if let Err(why) = check(row, &message, &mut client, &earlier) {
            failures.push(format!("{} {}: {why}", row.section, row.name));
        }
        earlier.extend(call_id(&message));
    }

    // Still serving, and it sent nothing but what this socket received: no answer went
    // elsewhere and nothing was forwarded anywhere (255.255.255.255, the messages' hosts).
    client
        .probe()
        .expect("the node answers an OPTIONS at the end");
    let sent = [
        messages_sent(&c, 1) - sent_before[0],
        messages_sent(&c, 2) - sent_before[1],
    ];
    let received = client.received - received_before;
    assert!(
        failures.is_empty(),
        "{} of {} RFC 4475 messages were not answered as the RFC expects:\n{}",
        failures.len(),
        TABLE.len(),
        failures.join("\n")
    );
    assert_eq!(
        sent,
        [received, 0],
        "SIP messages peer 1 and peer 2 sent, against what this test's socket received"
    );
}
