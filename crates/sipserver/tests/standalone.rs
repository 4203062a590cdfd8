//! The registrar and proxy of one standalone node, in process, driven over real UDP sockets
//! on loopback: RFC 3261 §10 registrar rules, digest authentication, forking, CANCEL.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use causeway_cluster::{Node, NodeConfig, NodeStore};
use causeway_sip::{build, HeaderKind, Limits, Message, Transport};
use causeway_sipserver::{Caps, SipService, SipSettings};
use md5::{Digest as _, Md5};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

struct Solo {
    svc: Arc<SipService>,
    node: Arc<Node>,
    addr: SocketAddr,
    _tmp: tempfile::TempDir,
    cancel: CancellationToken,
}

impl Drop for Solo {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn solo(net: u8) -> Solo {
    solo_with(net, &[], &[]).await
}

async fn solo_also_on(net: u8, also_listen: &[&str]) -> Solo {
    solo_with(net, also_listen, &[]).await
}

/// A standalone node on `127.0.{net}.1` that answers on `also_listen` too and asks
/// `dns_servers` for DNS zones.
async fn solo_with(net: u8, also_listen: &[&str], dns_servers: &[SocketAddr]) -> Solo {
    let tmp = tempfile::tempdir().unwrap();
    let ip = format!("127.0.{net}.1");
    let path = tmp.path().join("causeway.toml");
    std::fs::write(
        &path,
        format!(
            "[node]\nsystem_name = \"solo\"\naddress = \"{ip}\"\ndata_dir = \"{}\"\n",
            tmp.path().display()
        ),
    )
    .unwrap();
    let config = NodeConfig::load(&path).unwrap();
    let store = NodeStore::memory(Arc::new(causeway_store::MemoryStore::new()));
    let resolver = Arc::new(causeway_mesh::SystemResolver {
        ip_version: causeway_mesh::IpVersion::IPv4,
    });
    // As the binary does: SIP's items are known before anything is configured.
    causeway_sipserver::catalogue::register();
    let (node, _) = Node::start(config, None, resolver, store);
    node.set_configuration("sip.domains", Some("test.example"))
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let settings = SipSettings {
        listen: ip.parse().unwrap(),
        also_listen: also_listen.iter().map(|a| a.parse().unwrap()).collect(),
        udp_port: 0,
        tcp_port: 0,
        tls: None,
        caps: Caps::default(),
        local_names: vec![],
        min_expires: 60,
        max_expires: 7200,
        default_expires: 3600,
        // Fast, so a zone's address is found down within a second.
        zone_keepalive: Duration::from_millis(200),
        dns_servers: dns_servers.to_vec(),
    };
    let svc = SipService::start(node.clone(), settings, cancel.clone())
        .await
        .unwrap();
    let addr = svc.local_address(causeway_sipserver::Proto::Udp);
    Solo {
        svc,
        node,
        addr,
        _tmp: tmp,
        cancel,
    }
}

/// An endpoint: one UDP socket.
struct Ep {
    sock: UdpSocket,
    server: SocketAddr,
}

impl Ep {
    async fn new(ip: &str, server: SocketAddr) -> Ep {
        Ep {
            sock: UdpSocket::bind(format!("{ip}:0")).await.unwrap(),
            server,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    async fn send(&self, text: &str) {
        let text = text.replace("{me}", &self.addr().to_string());
        self.sock
            .send_to(text.as_bytes(), self.server)
            .await
            .unwrap();
    }

    async fn send_bytes(&self, b: &[u8]) {
        self.sock.send_to(b, self.server).await.unwrap();
    }

    async fn recv(&self) -> Message {
        self.recv_from().await.0
    }

    /// The next message and the address it came from.
    async fn recv_from(&self) -> (Message, SocketAddr) {
        self.recv_within(Duration::from_secs(5)).await
    }

    /// The next message within `wait`, and the address it came from.
    async fn recv_within(&self, wait: Duration) -> (Message, SocketAddr) {
        let mut buf = vec![0u8; 65_536];
        let (n, from) = tokio::time::timeout(wait, self.sock.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no message within {wait:?}"))
            .unwrap();
        buf.truncate(n);
        let raw = Bytes::from(buf);
        let msg = Message::parse(raw.clone(), Transport::Datagram, &Limits::default())
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&raw)));
        (msg, from)
    }

    /// The next message that is not a 100 Trying.
    async fn recv_final(&self) -> Message {
        loop {
            let m = self.recv().await;
            if m.status() != Some(100) {
                return m;
            }
        }
    }

    async fn quiet(&self) -> bool {
        let mut buf = vec![0u8; 65_536];
        tokio::time::timeout(Duration::from_millis(300), self.sock.recv_from(&mut buf))
            .await
            .is_err()
    }
}

/// A neighbour system behind a zone: answers the OPTIONS keep-alive with 200 while
/// `answering`, and hands every other message (with where it came from) to the test.
struct Neighbour {
    sock: Arc<UdpSocket>,
    rx: tokio::sync::mpsc::UnboundedReceiver<(Message, SocketAddr)>,
    answering: Arc<std::sync::atomic::AtomicBool>,
}

impl Neighbour {
    async fn new(ip: &str) -> Neighbour {
        let sock = Arc::new(UdpSocket::bind(format!("{ip}:0")).await.unwrap());
        let answering = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (s, a) = (sock.clone(), answering.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let raw = Bytes::copy_from_slice(&buf[..n]);
                let Ok(m) = Message::parse(raw, Transport::Datagram, &Limits::default()) else {
                    continue;
                };
                if m.method() == Some("OPTIONS") {
                    if a.load(std::sync::atomic::Ordering::Relaxed) {
                        let ok = build::response(&m, 200, "OK", Some("ka"), &[]);
                        let _ = s.send_to(&ok, from).await;
                    }
                } else if tx.send((m, from)).is_err() {
                    return;
                }
            }
        });
        Neighbour {
            sock,
            rx,
            answering,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    fn answer_keepalives(&self, yes: bool) {
        self.answering
            .store(yes, std::sync::atomic::Ordering::Relaxed);
    }

    async fn next(&mut self) -> (Message, SocketAddr) {
        tokio::time::timeout(Duration::from_secs(5), self.rx.recv())
            .await
            .expect("nothing reached the neighbour within 5 s")
            .unwrap()
    }

    async fn quiet(&mut self) -> bool {
        tokio::time::timeout(Duration::from_millis(300), self.rx.recv())
            .await
            .is_err()
    }
}

impl Ep {
    /// Registers `user` with this endpoint's own address as its contact; expects the 200.
    async fn register_as(&self, user: &str, call_id: &str) {
        let contact = format!("<sip:{user}@{}>", self.addr());
        self.send(&register(user, call_id, 1, &[&contact], ""))
            .await;
        assert_eq!(self.recv().await.status(), Some(200));
    }
}

fn register(user: &str, call_id: &str, cseq: u32, contacts: &[&str], extra: &str) -> String {
    let contacts: String = contacts
        .iter()
        .map(|c| format!("Contact: {c}\r\n"))
        .collect();
    format!("REGISTER sip:test.example SIP/2.0\r\nVia: SIP/2.0/UDP {{me}};branch=z9hG4bK{call_id}{cseq}\r\nMax-Forwards: 70\r\nFrom: <sip:{user}@test.example>;tag=f{cseq}\r\nTo: <sip:{user}@test.example>\r\nCall-ID: {call_id}\r\nCSeq: {cseq} REGISTER\r\n{contacts}{extra}Content-Length: 0\r\n\r\n")
}

#[tokio::test]
async fn the_registrar_follows_rfc_3261_section_10() {
    let s = solo(60).await;
    let ep = Ep::new("127.0.60.10", s.addr).await;
    let a = "<sip:alice@127.0.60.10:5070>";
    let b = "<sip:alice@127.0.60.11:5070>;+sip.instance=\"<urn:uuid:00000000-0000-0000-0000-000000000001>\";reg-id=1;q=0.5";

    ep.send(&register(
        "alice",
        "c1",
        1,
        &[&format!("{a};expires=30")],
        "",
    ))
    .await;
    let r = ep.recv().await;
    assert_eq!(r.status(), Some(423));
    assert_eq!(r.value(HeaderKind::MinExpires).as_deref(), Some("60"));

    ep.send(&register(
        "alice",
        "c1",
        2,
        &[a, b],
        "Expires: 600\r\nPath: <sip:edge.example;lr>\r\n",
    ))
    .await;
    let r = ep.recv().await;
    assert_eq!(r.status(), Some(200));
    let contacts = r.values(HeaderKind::Contact);
    assert_eq!(contacts.len(), 2, "{contacts:?}");
    assert!(contacts
        .iter()
        .all(|c| c.contains("expires=600") || c.contains("expires=599")));
    assert!(contacts.iter().any(|c| c
        .contains("+sip.instance=\"<urn:uuid:00000000-0000-0000-0000-000000000001>\"")
        && c.contains("reg-id=1")));
    assert_eq!(
        r.value(HeaderKind::Path).as_deref(),
        Some("<sip:edge.example;lr>")
    );
    assert!(r.raw().windows(6).any(|w| w == b"\nDate:"), "a Date header");

    // The same request again (a UDP retransmission) is answered the same way, and not
    // saved again.
    let stream = causeway_replication::StreamId::new("registrations", "peer1");
    let saved = s.node.replication().header(&stream).seq;
    ep.send(&register(
        "alice",
        "c1",
        2,
        &[a, b],
        "Expires: 600\r\nPath: <sip:edge.example;lr>\r\n",
    ))
    .await;
    let again = ep.recv().await;
    assert_eq!(again.status(), Some(200));
    assert_eq!(again.values(HeaderKind::Contact).len(), 2);
    assert_eq!(
        s.node.replication().header(&stream).seq,
        saved,
        "a retransmission is not saved again"
    );
    // An older CSeq of the same Call-ID is refused.
    ep.send(&register("alice", "c1", 1, &[a], "Expires: 600\r\n"))
        .await;
    assert_eq!(ep.recv().await.status(), Some(500));

    // Removing one contact leaves the other.
    ep.send(&register(
        "alice",
        "c1",
        3,
        &[&format!("{a};expires=0")],
        "",
    ))
    .await;
    let r = ep.recv().await;
    assert_eq!(r.status(), Some(200));
    let contacts = r.values(HeaderKind::Contact);
    assert_eq!(contacts.len(), 1);
    assert!(contacts[0].contains("127.0.60.11"));
    assert_eq!(
        s.svc
            .registrations_status(&causeway_sipserver::status::ListQuery::first(10))
            .bindings,
        1
    );

    // '*' needs Expires: 0; then every binding goes.
    ep.send(&register("alice", "c1", 4, &["*"], "")).await;
    assert_eq!(ep.recv().await.status(), Some(400));
    ep.send(&register("alice", "c1", 5, &["*"], "Expires: 0\r\n"))
        .await;
    let r = ep.recv().await;
    assert_eq!(r.status(), Some(200));
    assert!(r.values(HeaderKind::Contact).is_empty());
    assert_eq!(
        s.svc
            .registrations_status(&causeway_sipserver::status::ListQuery::first(10))
            .bindings,
        0
    );

    // A query (no Contact) lists what is there; another domain is not served here.
    ep.send(&register("alice", "c2", 1, &[], "")).await;
    assert_eq!(ep.recv().await.status(), Some(200));
    ep.send(&register("alice", "c3", 1, &[a], "").replace("@test.example", "@other.example"))
        .await;
    assert_eq!(ep.recv().await.status(), Some(404));
    // An AOR named by this peer's address is the same user as in the cluster's domain.
    ep.send(&register("bob", "c4", 1, &[a], "").replace("bob@test.example", "bob@127.0.60.1"))
        .await;
    assert_eq!(ep.recv().await.status(), Some(200));
    assert_eq!(
        s.svc
            .registrations_status(&causeway_sipserver::status::ListQuery::first(10))
            .rows[0]
            .aor,
        "sip:bob@test.example"
    );
    // Filtered by peer: this one's rows, none of a peer that holds nothing; a text found
    // only in the contact (its address) still finds the binding.
    let of_peer = |peer: &str, q: &str| {
        s.svc
            .registrations_status(&causeway_sipserver::status::ListQuery {
                q: q.into(),
                peer: peer.into(),
                offset: 0,
                limit: 10,
            })
            .matched
    };
    assert_eq!(of_peer("1", ""), 1);
    assert_eq!(of_peer("2", ""), 0);
    assert_eq!(of_peer("1", "127.0.60.10:5070"), 1);
    assert_eq!(of_peer("1", "nobody"), 0);
}

fn md5_hex(t: &str) -> String {
    Md5::digest(t.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn digest_params(header: &str) -> HashMap<String, String> {
    header
        .trim_start_matches("Digest")
        .split(',')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

#[tokio::test]
async fn registration_needs_digest_credentials_once_users_are_configured() {
    let s = solo(61).await;
    s.node
        .set_configuration("sip.users.carol", Some("s3cret"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let ep = Ep::new("127.0.61.10", s.addr).await;
    let contact = "<sip:carol@127.0.61.10:5070>";
    ep.send(&register("carol", "a1", 1, &[contact], "")).await;
    let r = ep.recv().await;
    assert_eq!(r.status(), Some(401));
    let challenge = r
        .headers()
        .iter()
        .find(|h| r.header_name(h).eq_ignore_ascii_case(b"WWW-Authenticate"))
        .map(|h| String::from_utf8_lossy(r.header_value(h)).into_owned())
        .expect("a challenge");
    let p = digest_params(&challenge);
    assert_eq!(p["realm"], "test.example");
    let answer = |password: &str| {
        let ha1 = md5_hex(&format!("carol:test.example:{password}"));
        let ha2 = md5_hex("REGISTER:sip:test.example");
        let response = md5_hex(&format!("{ha1}:{}:00000001:abc:auth:{ha2}", p["nonce"]));
        format!("Authorization: Digest username=\"carol\", realm=\"test.example\", nonce=\"{}\", uri=\"sip:test.example\", response=\"{response}\", qop=auth, nc=00000001, cnonce=\"abc\", algorithm=MD5\r\n", p["nonce"])
    };
    ep.send(&register("carol", "a1", 2, &[contact], &answer("wrong")))
        .await;
    assert_eq!(ep.recv().await.status(), Some(403));
    ep.send(&register("carol", "a1", 3, &[contact], &answer("s3cret")))
        .await;
    assert_eq!(ep.recv().await.status(), Some(200));
    // A user that is not configured cannot register at all.
    ep.send(&register(
        "mallory",
        "a2",
        1,
        &[contact],
        &answer("s3cret").replace("username=\"carol\"", "username=\"mallory\""),
    ))
    .await;
    assert_eq!(ep.recv().await.status(), Some(403));
}

fn invite(to: &str, call_id: &str) -> String {
    format!("INVITE sip:{to}@test.example SIP/2.0\r\nVia: SIP/2.0/UDP {{me}};branch=z9hG4bKinv{call_id}\r\nMax-Forwards: 70\r\nFrom: <sip:caller@test.example>;tag=caller1\r\nTo: <sip:{to}@test.example>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:caller@{{me}}>\r\nContent-Length: 0\r\n\r\n")
}

#[tokio::test]
async fn an_invite_forks_to_every_contact_and_the_best_answer_wins() {
    let s = solo(62).await;
    let caller = Ep::new("127.0.62.10", s.addr).await;
    let busy = Ep::new("127.0.62.11", s.addr).await;
    let answers = Ep::new("127.0.62.12", s.addr).await;
    for (i, ep) in [&busy, &answers].iter().enumerate() {
        let contact = format!("<sip:dan@{}>", ep.addr());
        ep.send(&register("dan", &format!("r{i}"), 1, &[&contact], ""))
            .await;
        assert_eq!(ep.recv().await.status(), Some(200));
    }
    caller.send(&invite("dan", "fork1")).await;
    assert_eq!(caller.recv().await.status(), Some(100));
    let to_busy = busy.recv().await;
    let to_answer = answers.recv().await;
    for m in [&to_busy, &to_answer] {
        assert_eq!(m.method(), Some("INVITE"));
        assert!(
            m.values(HeaderKind::RecordRoute)[0].contains(&format!("{};transport=udp;lr", s.addr))
        );
        assert_eq!(m.max_forwards().unwrap(), Some(69));
    }
    busy.send_bytes(&build::response(&to_busy, 486, "Busy Here", Some("b"), &[]))
        .await;
    // The proxy ACKs the 486 itself; it does not reach the caller.
    let ack = busy.recv().await;
    assert_eq!(ack.method(), Some("ACK"));
    assert!(caller.quiet().await);
    answers
        .send_bytes(&build::response(
            &to_answer,
            200,
            "OK",
            Some("a"),
            &["Contact: <sip:dan@127.0.62.12>".into()],
        ))
        .await;
    let ok = caller.recv_final().await;
    assert_eq!(ok.status(), Some(200));
    assert_eq!(
        ok.values(HeaderKind::Via).len(),
        1,
        "the proxy's own Via was removed"
    );
    assert!(ok.value(HeaderKind::To).unwrap().contains("tag=a"));

    // Nobody answers 2xx: the best final answer goes up (486 beats 500).
    caller.send(&invite("dan", "fork2")).await;
    let to_busy = busy.recv().await;
    let to_answer = answers.recv().await;
    busy.send_bytes(&build::response(&to_busy, 486, "Busy Here", Some("b"), &[]))
        .await;
    answers
        .send_bytes(&build::response(&to_answer, 500, "Oops", Some("a"), &[]))
        .await;
    assert_eq!(caller.recv_final().await.status(), Some(486));

    // An unknown user, to a caller nobody authenticated: 480, as for a known user with no
    // binding (a scanner cannot list the users).
    caller.send(&invite("nobody", "fork3")).await;
    assert_eq!(caller.recv_final().await.status(), Some(480));
    // Not an open relay: another domain, or a Route this cluster did not record, is refused.
    caller
        .send(&invite("x", "relay1").replace("sip:x@test.example SIP", "sip:x@198.18.0.1 SIP"))
        .await;
    assert_eq!(caller.recv_final().await.status(), Some(403));
    caller
        .send(
            &invite("dan", "relay2")
                .replace("Max-Forwards", "Route: <sip:198.18.0.1;lr>\r\nMax-Forwards"),
        )
        .await;
    assert_eq!(caller.recv_final().await.status(), Some(403));
}

/// The secondary of two HA pairs answers on both virtual IPs. What comes to the second
/// address is answered from it and forwarded from it, with it in Via and Record-Route:
/// the first may be held by the other pair's primary at that very moment.
#[tokio::test]
async fn a_request_to_the_second_address_is_answered_and_forwarded_from_it() {
    let s = solo_also_on(65, &["127.0.65.2"]).await;
    let second = SocketAddr::new("127.0.65.2".parse().unwrap(), s.addr.port());
    let callee = Ep::new("127.0.65.11", s.addr).await;
    let contact = format!("<sip:erin@{}>", callee.addr());
    callee
        .send(&register("erin", "r65", 1, &[&contact], ""))
        .await;
    let (ok, from) = callee.recv_from().await;
    assert_eq!((ok.status(), from), (Some(200), s.addr));

    let caller = Ep::new("127.0.65.10", second).await;
    caller.send(&invite("erin", "second1")).await;
    let (trying, from) = caller.recv_from().await;
    assert_eq!((trying.status(), from), (Some(100), second));
    let (inv, from) = callee.recv_from().await;
    assert_eq!(inv.method(), Some("INVITE"));
    assert_eq!(
        from, second,
        "forwarded from the address the request came to"
    );
    let via = &inv.values(HeaderKind::Via)[0];
    assert!(via.contains(&second.to_string()), "{via}");
    let rr = &inv.values(HeaderKind::RecordRoute)[0];
    assert!(rr.contains(&format!("{second};transport=udp;lr")), "{rr}");
    // The answer goes back to the caller from the second address too.
    callee
        .send_bytes(&build::response(
            &inv,
            200,
            "OK",
            Some("e"),
            &["Contact: <sip:erin@127.0.65.11>".into()],
        ))
        .await;
    let (ok, from) = caller.recv_from().await;
    assert_eq!((ok.status(), from), (Some(200), second));
    // The second address is this system's own: a request for it is for its domain.
    caller
        .send(&invite("erin", "second2").replace("erin@test.example SIP", "erin@127.0.65.2 SIP"))
        .await;
    assert_eq!(caller.recv().await.status(), Some(100));
    assert_eq!(callee.recv().await.method(), Some("INVITE"));
}

/// A callee that never answers (not even 100 Trying): the proxy retransmits the INVITE
/// (timer A) and, after timer B (64·T1 = 32 s), answers the caller 408 itself (RFC 3261
/// §16.7 step 5 / §17.1.1.2). Real time: the transport threads do not follow a paused clock.
#[tokio::test]
async fn a_caller_gets_408_after_timer_b_when_the_callee_never_answers() {
    let s = solo(66).await;
    let caller = Ep::new("127.0.66.10", s.addr).await;
    let silent = Ep::new("127.0.66.11", s.addr).await;
    silent.register_as("quiet", "r66").await;
    let started = std::time::Instant::now();
    caller.send(&invite("quiet", "timerb1")).await;
    assert_eq!(caller.recv().await.status(), Some(100));
    // The INVITE reaches the callee, and again (timer A) while it stays silent.
    assert_eq!(silent.recv().await.method(), Some("INVITE"));
    assert_eq!(silent.recv().await.method(), Some("INVITE"));
    let final_answer = loop {
        let (m, _) = caller.recv_within(Duration::from_secs(40)).await;
        if m.status() != Some(100) {
            break m;
        }
    };
    assert_eq!(final_answer.status(), Some(408));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(31),
        "408 only once timer B has run: {waited:?}"
    );
}

/// Search rules send what no binding of this cluster takes to a neighbour zone: a number
/// of the cluster's own domain, and another domain's address a rule names. What no rule
/// takes is still 480 (own domain) or 403 (another domain: not an open relay).
#[tokio::test]
async fn search_rules_send_what_no_binding_takes_to_a_neighbour_zone() {
    let s = solo(67).await;
    let mut neighbour = Neighbour::new("127.0.67.20").await;
    configure(
        &s,
        &[
            ("routing.rules.10", "+4420* london".to_string()),
            (
                "routing.rules.20",
                "carol@partner.example london".to_string(),
            ),
            // The neighbour dials international numbers as 00…
            (
                "routing.rules.30",
                "+1* london strip=1 prepend=00".to_string(),
            ),
            ("zones.london.address", neighbour.addr().to_string()),
        ],
    )
    .await;
    let caller = Ep::new("127.0.67.10", s.addr).await;
    for (to, call, arrives_as) in [
        (
            "+442071234567@test.example",
            "z1",
            "sip:+442071234567@test.example",
        ),
        ("carol@partner.example", "z2", "sip:carol@partner.example"),
        (
            "+15551234@test.example",
            "z5",
            "sip:0015551234@test.example",
        ),
    ] {
        let user = to.split_once('@').unwrap().0;
        caller
            .send(
                &invite(user, call)
                    .replace(&format!("{user}@test.example SIP"), &format!("{to} SIP")),
            )
            .await;
        assert_eq!(caller.recv().await.status(), Some(100));
        let (inv, from) = neighbour.next().await;
        assert_eq!(inv.method(), Some("INVITE"));
        assert_eq!(from, s.addr, "through this cluster's proxy");
        assert_eq!(inv.uri(), Some(arrives_as), "rewritten by the rule");
        neighbour
            .sock
            .send_to(&build::response(&inv, 200, "OK", Some("n"), &[]), s.addr)
            .await
            .unwrap();
        assert_eq!(caller.recv_final().await.status(), Some(200));
    }
    // No rule: the own domain's number is unavailable, another domain refused.
    caller.send(&invite("+33155", "z3")).await;
    assert_eq!(caller.recv_final().await.status(), Some(480));
    caller
        .send(&invite("dave", "z4").replace("dave@test.example SIP", "dave@partner.example SIP"))
        .await;
    assert_eq!(caller.recv_final().await.status(), Some(403));
    assert!(
        neighbour.quiet().await,
        "nothing else reached the neighbour"
    );

    // Locate shows the same path, sending nothing.
    let london = s.svc.locate("+442071234567", true).await;
    assert_eq!(
        london.steps,
        [
            "Local registrations of sip:+442071234567@test.example: 0 binding(s)".to_string(),
            format!(
                "Search rule 10 '+4420* london': matches: to zone london at {}",
                neighbour.addr()
            ),
        ]
    );
    assert!(
        london
            .result
            .starts_with("Found: search rule 10 sends it to zone london"),
        "{}",
        london.result
    );
    let partner = s.svc.locate("carol@partner.example", true).await;
    assert_eq!(
        partner.steps[0],
        "partner.example is not a domain of this cluster"
    );
    assert!(partner.result.contains("rule 20"), "{}", partner.result);
    let rewritten = s.svc.locate("+15551234", true).await;
    assert_eq!(
        rewritten.steps[3],
        format!(
            "Search rule 30 '+1* london strip=1 prepend=00': matches, rewritten to 0015551234@test.example: to zone london at {}",
            neighbour.addr()
        )
    );
    assert!(
        rewritten.result.ends_with("as 0015551234@test.example"),
        "{}",
        rewritten.result
    );
    let nowhere = s.svc.locate("dave@partner.example", true).await;
    assert_eq!(
        nowhere.steps.len(),
        4,
        "every rule tried: {:?}",
        nowhere.steps
    );
    assert!(
        nowhere.result.starts_with("Not found: 403"),
        "{}",
        nowhere.result
    );
    let registered = Ep::new("127.0.67.11", s.addr).await;
    registered.register_as("+4420999", "r67").await;
    assert!(s
        .svc
        .locate("+4420999", true)
        .await
        .result
        .starts_with("Found: 1 local binding(s)"));
    assert!(s
        .svc
        .locate("+33155", true)
        .await
        .result
        .starts_with("Not found: 480"));
}

/// Waits (up to 5 s) for Locate of +442071234567 to start with `want`.
async fn wait_located(s: &Solo, want: &str) {
    for _ in 0..50 {
        if s.svc
            .locate("+442071234567", true)
            .await
            .result
            .starts_with(want)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "Locate never said '{want}': {}",
        s.svc.locate("+442071234567", true).await.result
    );
}

/// A zone with two addresses: while the first does not answer its keep-alive the second
/// takes the calls; with neither answering, the zone is down (30020) and a call gets a
/// clear 503; at the next answer the alarm goes.
#[tokio::test]
async fn a_zone_whose_first_address_is_down_is_reached_at_the_second_and_alarmed_when_none_answers()
{
    let s = solo(68).await;
    let first = Neighbour::new("127.0.68.20").await;
    let mut second = Neighbour::new("127.0.68.21").await;
    first.answer_keepalives(false);
    london_zone(&s, &first, &second).await;
    wait_located(
        &s,
        "Found: search rule 10 sends it to zone london at 127.0.68.21",
    )
    .await;
    let caller = Ep::new("127.0.68.10", s.addr).await;
    caller.send(&invite("+442071234567", "f1")).await;
    let (inv, _) = second.next().await;
    assert_eq!(inv.method(), Some("INVITE"));
    second
        .sock
        .send_to(
            &build::response(&inv, 486, "Busy Here", Some("b"), &[]),
            s.addr,
        )
        .await
        .unwrap();
    assert_eq!(caller.recv_final().await.status(), Some(486));
    // Neither answers: the zone is down, said by 30020 and by a 503.
    second.answer_keepalives(false);
    wait_located(&s, "Not found: 503").await;
    let zone_down = |s: &Solo| s.node.alarms().is_raised(30020, "zone london");
    assert!(zone_down(&s));
    caller.send(&invite("+442071234567", "f2")).await;
    let failed = caller.recv_final().await;
    assert_eq!(failed.status(), Some(503));
    // The second answers again: up, and the alarm goes.
    second.answer_keepalives(true);
    wait_located(&s, "Found").await;
    for _ in 0..50 {
        if !zone_down(&s) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("30020 still raised after the zone answered again");
}

/// Sets the cluster-wide items, each as an operator would.
async fn configure(s: &Solo, items: &[(&str, String)]) {
    for (path, value) in items {
        s.node.set_configuration(path, Some(value)).await.unwrap();
    }
}

/// Rule 10 sends `+4420…` to zone london, whose addresses are `first`, then `second`.
async fn london_zone(s: &Solo, first: &Neighbour, second: &Neighbour) {
    configure(
        s,
        &[
            ("routing.rules.10", "+4420* london".to_string()),
            (
                "zones.london.address",
                format!("{},{}", first.addr(), second.addr()),
            ),
        ],
    )
    .await;
}

impl Neighbour {
    /// The next INVITE of call `call_id` (ACKs and retransmissions of others passed over).
    async fn invite_of(&mut self, call_id: &str) -> Message {
        loop {
            let (m, _) = self.next().await;
            if m.method() == Some("INVITE") && m.call_id().as_deref() == Some(call_id) {
                return m;
            }
        }
    }
}

/// Both addresses of a zone answer their keep-alive; within one call, the first refusing
/// (503) or not answering at all hands the INVITE to the second (RFC 3263 §4.3).
#[tokio::test]
async fn within_one_call_a_zone_address_that_refuses_or_stays_silent_hands_it_to_the_next() {
    let s = solo(69).await;
    let mut first = Neighbour::new("127.0.69.20").await;
    let mut second = Neighbour::new("127.0.69.21").await;
    london_zone(&s, &first, &second).await;
    wait_located(
        &s,
        "Found: search rule 10 sends it to zone london at 127.0.69.20",
    )
    .await;
    let caller = Ep::new("127.0.69.10", s.addr).await;
    let answer = |inv: &Message| build::response(inv, 200, "OK", Some("n"), &[]);

    caller.send(&invite("+442071234567", "n1")).await;
    let refused = first.invite_of("n1").await;
    first
        .sock
        .send_to(
            &build::response(&refused, 503, "Service Unavailable", Some("a"), &[]),
            s.addr,
        )
        .await
        .unwrap();
    let retried = second.invite_of("n1").await;
    let branch = |m: &Message| m.value(HeaderKind::Via).unwrap_or_default();
    assert_ne!(
        branch(&retried),
        branch(&refused),
        "a new branch of the same call"
    );
    second
        .sock
        .send_to(&answer(&retried), s.addr)
        .await
        .unwrap();
    assert_eq!(caller.recv_final().await.status(), Some(200));

    caller.send(&invite("+442071234567", "n2")).await;
    let sent = std::time::Instant::now();
    first.invite_of("n2").await;
    let retried = second.invite_of("n2").await;
    assert!(
        sent.elapsed() >= Duration::from_secs(3),
        "the silent first address had its time: {:?}",
        sent.elapsed()
    );
    second
        .sock
        .send_to(&answer(&retried), s.addr)
        .await
        .unwrap();
    assert_eq!(caller.recv_final().await.status(), Some(200));
}

#[tokio::test]
async fn cancel_reaches_every_ringing_branch_and_the_caller_gets_487() {
    let s = solo(63).await;
    let caller = Ep::new("127.0.63.10", s.addr).await;
    let callee = Ep::new("127.0.63.11", s.addr).await;
    callee
        .send(&register(
            "erin",
            "r1",
            1,
            &[&format!("<sip:erin@{}>", callee.addr())],
            "",
        ))
        .await;
    assert_eq!(callee.recv().await.status(), Some(200));
    caller.send(&invite("erin", "cx1")).await;
    assert_eq!(caller.recv().await.status(), Some(100));
    let inv = callee.recv().await;
    callee
        .send_bytes(&build::response(&inv, 180, "Ringing", Some("e"), &[]))
        .await;
    assert_eq!(caller.recv().await.status(), Some(180));
    caller
        .send(
            &invite("erin", "cx1")
                .replace("INVITE sip:", "CANCEL sip:")
                .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL"),
        )
        .await;
    let ok = caller.recv().await;
    assert_eq!(
        (ok.status(), ok.cseq().unwrap().1.as_str()),
        (Some(200), "CANCEL")
    );
    let cancel = callee.recv().await;
    assert_eq!(cancel.method(), Some("CANCEL"));
    assert_eq!(
        cancel.values(HeaderKind::Via)[0],
        inv.values(HeaderKind::Via)[0],
        "same branch as the INVITE"
    );
    callee
        .send_bytes(&build::response(&cancel, 200, "OK", Some("e"), &[]))
        .await;
    callee
        .send_bytes(&build::response(
            &inv,
            487,
            "Request Terminated",
            Some("e"),
            &[],
        ))
        .await;
    assert_eq!(caller.recv().await.status(), Some(487));
    assert_eq!(callee.recv().await.method(), Some("ACK"));
    // A CANCEL for nothing: 481.
    caller
        .send(
            &invite("erin", "cx2")
                .replace("INVITE sip:", "CANCEL sip:")
                .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL"),
        )
        .await;
    assert_eq!(caller.recv().await.status(), Some(481));
}

/// Copies of one INVITE that arrive together (a retransmission that waited in the queue
/// with its original) run on different workers at once: the callee still gets it once (its
/// copies all carry the one branch of one client transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_of_an_invite_handled_at_once_are_forwarded_once() {
    let s = solo(64).await;
    let caller = Ep::new("127.0.64.10", s.addr).await;
    let callee = Ep::new("127.0.64.11", s.addr).await;
    callee.register_as("eve", "r1").await;
    let calls = 50;
    for call in 0..calls {
        let text = invite("eve", &format!("dup{call}")).replace("{me}", &caller.addr().to_string());
        for _ in 0..40 {
            caller.send_bytes(text.as_bytes()).await;
        }
    }
    let mut branches: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_millis(700), callee.sock.recv_from(&mut buf)).await
    {
        let m = Message::parse(
            Bytes::copy_from_slice(&buf[..n]),
            Transport::Datagram,
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(m.method(), Some("INVITE"));
        let top_via = m.values(HeaderKind::Via)[0].clone();
        let call_id = m.call_id().unwrap().to_string();
        branches.entry(call_id).or_default().insert(top_via);
    }
    assert_eq!(branches.len(), calls, "every call reached the callee");
    for (call_id, b) in &branches {
        assert_eq!(
            b.len(),
            1,
            "{call_id} was forwarded {} times: {b:?}",
            b.len()
        );
    }
}

/// The `name="value"` (or `name=value`) parameter of a Digest header.
fn digest_param(header: &str, name: &str) -> String {
    let at = header
        .find(&format!("{name}="))
        .unwrap_or_else(|| panic!("no {name} in {header}"));
    let rest = &header[at + name.len() + 1..];
    match rest.strip_prefix('"') {
        Some(q) => q[..q.find('"').unwrap()].to_string(),
        None => rest.split(',').next().unwrap().trim().to_string(),
    }
}

/// A neighbour zone that challenges (407) gets the INVITE again with the zone's credentials
/// and one CSeq higher. The caller sees its own CSeq on every answer; its ACK and BYE in the
/// dialog reach the neighbour shifted like the INVITE, and the neighbour's own BYE is not
/// shifted. With a wrong password the second challenge goes to the caller.
#[tokio::test]
async fn a_neighbours_challenge_is_answered_with_the_zones_credentials() {
    let s = solo(78).await;
    let mut trunk = Neighbour::new("127.0.78.20").await;
    configure(
        &s,
        &[
            ("routing.rules.10", "+4420* trunk".to_string()),
            ("zones.trunk.address", trunk.addr().to_string()),
            ("zones.trunk.username", "cluster1".to_string()),
            ("zones.trunk.password", "s3cret".to_string()),
        ],
    )
    .await;
    wait_located(
        &s,
        "Found: search rule 10 sends it to zone trunk at 127.0.78.20",
    )
    .await;
    let caller = Ep::new("127.0.78.10", s.addr).await;
    let challenge = |m: &Message, nonce: &str| {
        build::response(
            m,
            407,
            "Proxy Authentication Required",
            Some("t"),
            &[format!(
                "Proxy-Authenticate: Digest realm=\"trunk.example\", nonce=\"{nonce}\", qop=\"auth\", algorithm=MD5"
            )],
        )
    };
    // The next INVITE of `call`, ACKs of challenges passed over.
    async fn next_invite(trunk: &mut Neighbour, call: &str) -> Message {
        loop {
            let (m, _) = trunk.next().await;
            match m.method() {
                Some("INVITE") if m.call_id().as_deref() == Some(call) => return m,
                Some("ACK") => continue,
                other => panic!("unexpected {other:?} at the neighbour"),
            }
        }
    }

    caller.send(&invite("+442071234567", "d1")).await;
    let first = next_invite(&mut trunk, "d1").await;
    assert_eq!(first.cseq().unwrap().0, 1);
    assert!(first.value(HeaderKind::ProxyAuthorization).is_none());
    trunk
        .sock
        .send_to(&challenge(&first, "n0nce1"), s.addr)
        .await
        .unwrap();
    let answered = next_invite(&mut trunk, "d1").await;
    assert_eq!(
        answered.cseq().unwrap().0,
        2,
        "one higher than the challenged one"
    );
    let auth = answered
        .value(HeaderKind::ProxyAuthorization)
        .expect("the zone's credentials");
    assert_eq!(digest_param(&auth, "username"), "cluster1");
    let ha1 = md5_hex("cluster1:trunk.example:s3cret");
    let ha2 = md5_hex(&format!("INVITE:{}", digest_param(&auth, "uri")));
    let expected = md5_hex(&format!(
        "{ha1}:n0nce1:{}:{}:auth:{ha2}",
        digest_param(&auth, "nc"),
        digest_param(&auth, "cnonce")
    ));
    assert_eq!(digest_param(&auth, "response"), expected, "{auth}");
    // Accepted: the caller gets the 200 with its own CSeq and this peer's Record-Route.
    let trunk_contact = format!("<sip:trunk@{}>", trunk.addr());
    trunk
        .sock
        .send_to(
            &build::response(
                &answered,
                200,
                "OK",
                Some("t"),
                &[format!("Contact: {trunk_contact}")],
            ),
            s.addr,
        )
        .await
        .unwrap();
    let ok = caller.recv_final().await;
    assert_eq!((ok.status(), ok.cseq().unwrap().0), (Some(200), 1));
    let route = ok.values(HeaderKind::RecordRoute).join(", ");
    assert!(route.contains("cw-cseq=1."), "{route}");
    // The caller's ACK and BYE go up by one; the answer to its BYE comes back down.
    let trunk_addr = trunk.addr();
    let in_dialog = |method: &str, cseq: u32| {
        format!(
            "{method} sip:trunk@{} SIP/2.0\r\nVia: SIP/2.0/UDP {{me}};branch=z9hG4bKd1{method}\r\nMax-Forwards: 70\r\nRoute: {route}\r\nFrom: <sip:caller@test.example>;tag=caller1\r\nTo: <sip:+442071234567@test.example>;tag=t\r\nCall-ID: d1\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n",
            trunk_addr
        )
    };
    caller.send(&in_dialog("ACK", 1)).await;
    let (ack, _) = trunk.next().await;
    assert_eq!(
        (ack.method(), ack.cseq().unwrap().0),
        (Some("ACK"), 2),
        "the ACK of the 2xx carries the answered INVITE's number"
    );
    caller.send(&in_dialog("BYE", 2)).await;
    let (bye, _) = trunk.next().await;
    assert_eq!((bye.method(), bye.cseq().unwrap().0), (Some("BYE"), 3));
    trunk
        .sock
        .send_to(&build::response(&bye, 200, "OK", None, &[]), s.addr)
        .await
        .unwrap();
    let bye_ok = caller.recv_final().await;
    assert_eq!((bye_ok.status(), bye_ok.cseq().unwrap().0), (Some(200), 2));

    // Wrong credentials: challenged again, the challenge reaches the caller.
    caller.send(&invite("+442071234567", "d2")).await;
    let first = next_invite(&mut trunk, "d2").await;
    trunk
        .sock
        .send_to(&challenge(&first, "n0nce2"), s.addr)
        .await
        .unwrap();
    let again = next_invite(&mut trunk, "d2").await;
    trunk
        .sock
        .send_to(&challenge(&again, "n0nce3"), s.addr)
        .await
        .unwrap();
    let refused = caller.recv_final().await;
    assert_eq!(
        (refused.status(), refused.cseq().unwrap().0),
        (Some(407), 1)
    );
}

/// A DNS zone: a call to `sip:x@other.test` goes where RFC 3263 finds it (NAPTR → SRV →
/// A, served by an in-process DNS server): first to the SRV target of the lowest
/// priority, then, when that one does not answer, to the next. A domain DNS knows nothing
/// of gets a 404 naming it. Locate shows the targets in order.
#[tokio::test]
async fn a_dns_zone_sends_a_call_to_the_srv_targets_in_priority_order() {
    use causeway_sipserver::dns_responder::{DnsResponder, TestRecord};
    let mut first = Neighbour::new("127.0.79.21").await;
    let mut second = Neighbour::new("127.0.79.22").await;
    let dns = DnsResponder::start(
        "127.0.79.53:0".parse().unwrap(),
        vec![
            TestRecord::naptr("other.test", 10, 10, "s", "SIP+D2U", "_sip._udp.other.test"),
            TestRecord::srv(
                "_sip._udp.other.test",
                20,
                10,
                second.addr().port(),
                "sip2.other.test",
            ),
            TestRecord::srv(
                "_sip._udp.other.test",
                10,
                10,
                first.addr().port(),
                "sip1.other.test",
            ),
            TestRecord::a("sip1.other.test", "127.0.79.21".parse().unwrap()),
            TestRecord::a("sip2.other.test", "127.0.79.22".parse().unwrap()),
            // Found only when a port is given (RFC 3263 §4.2: then no NAPTR or SRV).
            TestRecord::a("other.test", "127.0.79.22".parse().unwrap()),
            // DNS that names this very node: a loop, refused.
            TestRecord::a("loop.test", "127.0.79.1".parse().unwrap()),
        ],
    )
    .await
    .unwrap();
    let s = solo_with(79, &[], &[dns.addr]).await;
    configure(
        &s,
        &[
            (
                "routing.rules.10",
                r"/.+@(other|none|loop)\.test/ dns".to_string(),
            ),
            ("zones.dns.type", "DNS".to_string()),
        ],
    )
    .await;
    let located = s.svc.locate("x@other.test", false).await;
    assert!(
        located.result.starts_with(&format!(
            "Found: search rule 10 sends it to zone dns (DNS) at {}",
            first.addr()
        )),
        "{located:?}"
    );
    let targets: Vec<&String> = located
        .steps
        .iter()
        .filter(|l| l.contains("target"))
        .collect();
    assert_eq!(targets.len(), 2, "{located:?}");
    assert!(targets[0].contains(&first.addr().to_string()) && targets[0].contains("SRV"));
    assert!(targets[1].contains(&second.addr().to_string()));
    // The alias is read as a Request-URI, as the proxy reads one. With a port, RFC 3263
    // looks up the host's address only (no NAPTR, no SRV):
    let second_port = second.addr().port();
    let with_port = s
        .svc
        .locate(&format!("x@other.test:{second_port}"), false)
        .await;
    assert!(
        with_port.result.starts_with(&format!(
            "Found: search rule 10 sends it to zone dns (DNS) at {}",
            second.addr()
        )),
        "{with_port:?}"
    );
    // Over TCP, no NAPTR or SRV record applies (they are for UDP): the address record, on
    // SIP's default port.
    let over_tcp = s.svc.locate("x@other.test;transport=tcp", false).await;
    assert!(
        over_tcp.result.starts_with(
            "Found: search rule 10 sends it to zone dns (DNS) at 127.0.79.22:5060 (TCP)"
        ),
        "{over_tcp:?}"
    );

    let caller = Ep::new("127.0.79.10", s.addr).await;
    caller
        .send(&invite("x", "dns1").replace("x@test.example", "x@other.test"))
        .await;
    let sent = std::time::Instant::now();
    let silent = first.invite_of("dns1").await;
    assert_eq!(silent.uri(), Some("sip:x@other.test"));
    assert!(
        sent.elapsed() < Duration::from_secs(2) && second.quiet().await,
        "the lowest priority first, the other only after it: {:?}",
        sent.elapsed()
    );
    let answered = second.invite_of("dns1").await;
    assert!(
        sent.elapsed() >= Duration::from_secs(3),
        "the first target had its time: {:?}",
        sent.elapsed()
    );
    second
        .sock
        .send_to(
            &build::response(&answered, 200, "OK", Some("o"), &[]),
            s.addr,
        )
        .await
        .unwrap();
    assert_eq!(caller.recv_final().await.status(), Some(200));

    caller
        .send(&invite("y", "dns2").replace("y@test.example", "y@none.test"))
        .await;
    let nowhere = caller.recv_final().await;
    assert_eq!(nowhere.status(), Some(404));
    let reason = String::from_utf8_lossy(nowhere.raw())
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    assert!(reason.contains("none.test"), "{reason}");
    caller
        .send(&invite("z", "dns3").replace("z@test.example", "z@loop.test"))
        .await;
    assert_eq!(
        caller.recv_final().await.status(),
        Some(482),
        "not sent to itself"
    );
    assert!(
        dns.queries()
            .iter()
            .any(|(name, kind)| name.starts_with("other.test") && kind == "NAPTR"),
        "{:?}",
        dns.queries()
    );
}
