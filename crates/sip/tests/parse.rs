//! The parser against hand-written messages in the spirit of RFC 4475 (torture tests), and
//! properties over generated ones: never a panic, typed fields read back, unknown headers
//! kept byte for byte, streams framed exactly, and the same headers as another parser
//! (ezk-sip-types, a test oracle only) reads.

use bytes::Bytes;
use causeway_sip::{frame, Frame, HeaderKind, Limits, Message, ParseError, Transport};
use proptest::prelude::*;

fn parse(text: &str, transport: Transport) -> Result<Message, ParseError> {
    Message::parse(Bytes::from(text.to_string()), transport, &Limits::default())
}

fn udp(text: &str) -> Result<Message, ParseError> {
    parse(text, Transport::Datagram)
}

const REGISTER: &str = "REGISTER sip:lab.example SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.9:5060;branch=z9hG4bK776asdhds\r\n\
Max-Forwards: 70\r\n\
To: Alice <sip:alice@lab.example>\r\n\
From: Alice <sip:alice@lab.example>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@127.0.0.9\r\n\
CSeq: 314159 REGISTER\r\n\
Contact: <sip:alice@127.0.0.9:5060>;expires=3600, \"Al, the 2nd\" <sip:alice@127.0.0.9:5070>\r\n\
X-Vendor-Thing:   kept  as is  \r\n\
Content-Length: 0\r\n\r\n";

#[test]
fn a_register_reads_back_and_unknown_headers_stay_as_they_came() {
    let m = udp(REGISTER).unwrap();
    assert_eq!(m.method(), Some("REGISTER"));
    assert_eq!(m.uri(), Some("sip:lab.example"));
    assert_eq!(m.cseq().unwrap(), (314159, "REGISTER".to_string()));
    assert_eq!(m.call_id().as_deref(), Some("a84b4c76e66710@127.0.0.9"));
    assert_eq!(m.max_forwards().unwrap(), Some(70));
    assert_eq!(
        m.values(HeaderKind::Contact),
        vec![
            "<sip:alice@127.0.0.9:5060>;expires=3600".to_string(),
            "\"Al, the 2nd\" <sip:alice@127.0.0.9:5070>".to_string()
        ],
        "a comma inside quotes does not split"
    );
    let other = m
        .headers()
        .iter()
        .find(|h| h.kind == HeaderKind::Other)
        .unwrap();
    assert_eq!(m.header_name(other), b"X-Vendor-Thing");
    assert_eq!(m.header_value(other), b"kept  as is");
    assert_eq!(
        &m.raw()[..],
        REGISTER.as_bytes(),
        "nothing copied or changed"
    );
}

#[test]
fn compact_forms_folding_and_odd_whitespace_are_accepted() {
    // After RFC 4475 3.1.1.1 (wsinv): compact names, folded values, spaces before colons.
    let text = "OPTIONS sip:bob@lab.example SIP/2.0\r\n\
v: SIP/2.0/TCP 127.0.0.9;branch=z9hG4bKkdjuw\r\n\
f   :   <sip:alice@lab.example>;tag=1\r\n\
t: <sip:bob@lab.example>\r\n\
i: folded-call\r\n\
CSeq: 8\r\n   OPTIONS\r\n\
Subject: one\r\n\ttwo\r\n  three\r\n\
l: 0\r\n\r\n";
    let m = parse(text, Transport::Stream).unwrap();
    assert_eq!(m.cseq().unwrap(), (8, "OPTIONS".into()));
    assert_eq!(
        m.value(HeaderKind::From).as_deref(),
        Some("<sip:alice@lab.example>;tag=1")
    );
    let subject = m
        .headers()
        .iter()
        .find(|h| m.header_name(h) == b"Subject")
        .unwrap();
    assert_eq!(
        causeway_sip::unfold(m.header_value(subject)),
        "one two three"
    );
}

#[test]
fn responses_parse_and_status_ranges_hold() {
    let text = "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.9;branch=z9hG4bK1\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:a@x>;tag=2\r\nCall-ID: c\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n";
    let m = udp(text).unwrap();
    assert_eq!(m.status(), Some(200));
    assert!(!m.is_request());
    assert!(udp(&text.replace("200 OK", "099 Odd")).is_err());
    assert!(udp(&text.replace("200 OK", "20 OK")).is_err());
}

#[test]
fn torture_messages_are_refused_with_the_right_reason() {
    let cases: Vec<(String, u16, &str)> = vec![
        // 3.1.2.2 (clerr): Content-Length larger than the body.
        (
            REGISTER.replace("Content-Length: 0", "Content-Length: 9999"),
            400,
            "Content-Length 9999",
        ),
        // 3.1.2.3 (ncl): negative Content-Length.
        (
            REGISTER.replace("Content-Length: 0", "Content-Length: -999"),
            400,
            "Content-Length",
        ),
        // 3.1.2.4 (scalar02): a CSeq larger than 32 bits.
        (
            REGISTER.replace("314159 REGISTER", "36893488147419103232 REGISTER"),
            400,
            "larger than",
        ),
        (
            REGISTER.replace("Max-Forwards: 70", "Max-Forwards: 300000000000"),
            400,
            "Max-Forwards",
        ),
        // 3.1.2.16 (badvers): an unknown protocol version.
        (
            REGISTER.replace("sip:lab.example SIP/2.0", "sip:lab.example SIP/7.0"),
            505,
            "SIP/7.0",
        ),
        // 3.1.2.17 (mismatch01): CSeq's method is not the request's.
        (
            REGISTER.replace("314159 REGISTER", "314159 INVITE"),
            400,
            "CSeq",
        ),
        // 3.3.1 (insuf): mandatory headers missing.
        (
            REGISTER.replace("Call-ID: a84b4c76e66710@127.0.0.9\r\n", ""),
            400,
            "Call-ID",
        ),
        (
            REGISTER.replace(
                "Via: SIP/2.0/UDP 127.0.0.9:5060;branch=z9hG4bK776asdhds\r\n",
                "",
            ),
            400,
            "Via",
        ),
        // 3.1.2.8 (lwsruri-ish): spaces inside the Request-URI.
        (
            REGISTER.replace("sip:lab.example SIP", "sip:lab .example SIP"),
            400,
            "Request-URI",
        ),
        // A header line with no colon, and a name that is not a token.
        (
            REGISTER.replace("Max-Forwards: 70", "Max-Forwards 70"),
            400,
            "no ':'",
        ),
        (
            REGISTER.replace("Max-Forwards: 70", "Max Forwards: 70"),
            400,
            "token",
        ),
        // Truncated before the end of the headers.
        (REGISTER[..120].to_string(), 400, "CRLF CRLF"),
        // A NUL in a header.
        (
            REGISTER.replace("kept  as is", "kept\0as is"),
            400,
            "control",
        ),
    ];
    for (text, status, says) in cases {
        let err = udp(&text).unwrap_err();
        assert_eq!(err.status(), status, "{err} for {text:?}");
        assert!(
            err.to_string().contains(says),
            "'{err}' should say '{says}'"
        );
    }
}

/// RFC 4475's own test vectors (its Appendix A archive, shared with the process test in
/// `crates/causeway/tests/rfc4475.rs`).
macro_rules! rfc4475 {
    ($name:literal) => {
        include_bytes!(concat!("../../causeway/tests/rfc4475/", $name, ".dat"))
    };
}

/// What the parser makes of every RFC 4475 message: the valid ones (and the invalid ones
/// whose fault is not syntax, which the proxy or registrar answers) parse; the syntactically
/// invalid ones are refused with the status and reason the answer will carry.
#[test]
fn every_rfc4475_message_is_parsed_or_refused_as_the_rfc_says() {
    use std::result::Result::{Err as Refused, Ok as Parsed};
    // Ok, or the status and a part of the reason it is refused with.
    type Outcome = Result<(), (u16, &'static str)>;
    let cases: Vec<(&str, &str, &[u8], Outcome)> = vec![
        ("3.1.1.1", "wsinv", rfc4475!("wsinv"), Parsed(())),
        ("3.1.1.2", "intmeth", rfc4475!("intmeth"), Parsed(())),
        ("3.1.1.3", "esc01", rfc4475!("esc01"), Parsed(())),
        ("3.1.1.4", "escnull", rfc4475!("escnull"), Parsed(())),
        ("3.1.1.5", "esc02", rfc4475!("esc02"), Parsed(())),
        ("3.1.1.6", "lwsdisp", rfc4475!("lwsdisp"), Parsed(())),
        ("3.1.1.7", "longreq", rfc4475!("longreq"), Parsed(())),
        ("3.1.1.8", "dblreq", rfc4475!("dblreq"), Parsed(())),
        ("3.1.1.9", "semiuri", rfc4475!("semiuri"), Parsed(())),
        ("3.1.1.10", "transports", rfc4475!("transports"), Parsed(())),
        ("3.1.1.11", "mpart01", rfc4475!("mpart01"), Parsed(())),
        ("3.1.1.12", "unreason", rfc4475!("unreason"), Parsed(())),
        ("3.1.1.13", "noreason", rfc4475!("noreason"), Parsed(())),
        (
            "3.1.2.1",
            "badinv01",
            rfc4475!("badinv01"),
            Refused((400, "Via: an empty parameter")),
        ),
        (
            "3.1.2.2",
            "clerr",
            rfc4475!("clerr"),
            Refused((400, "Content-Length 9999")),
        ),
        (
            "3.1.2.3",
            "ncl",
            rfc4475!("ncl"),
            Refused((400, "Content-Length")),
        ),
        (
            "3.1.2.4",
            "scalar02",
            rfc4475!("scalar02"),
            Refused((400, "CSeq: larger than")),
        ),
        (
            "3.1.2.5",
            "scalarlg",
            rfc4475!("scalarlg"),
            Refused((400, "CSeq: larger than")),
        ),
        (
            "3.1.2.6",
            "quotbal",
            rfc4475!("quotbal"),
            Refused((400, "To: an unterminated quoted")),
        ),
        (
            "3.1.2.7",
            "ltgtruri",
            rfc4475!("ltgtruri"),
            Refused((400, "no URI may hold")),
        ),
        (
            "3.1.2.8",
            "lwsruri",
            rfc4475!("lwsruri"),
            Refused((400, "has spaces")),
        ),
        (
            "3.1.2.9",
            "lwsstart",
            rfc4475!("lwsstart"),
            Refused((400, "has spaces")),
        ),
        (
            "3.1.2.10",
            "trws",
            rfc4475!("trws"),
            Refused((400, "spaces after the SIP version")),
        ),
        (
            "3.1.2.11",
            "escruri",
            rfc4475!("escruri"),
            Refused((400, "has headers")),
        ),
        // Not refused: the node does not read Date, and the RFC asks not to refuse it then.
        ("3.1.2.12", "baddate", rfc4475!("baddate"), Parsed(())),
        (
            "3.1.2.13",
            "regbadct",
            rfc4475!("regbadct"),
            Refused((400, "Contact: a URI with '?'")),
        ),
        (
            "3.1.2.14",
            "badaspec",
            rfc4475!("badaspec"),
            Refused((400, "To: spaces")),
        ),
        // The archive's copy has no empty line after its headers; see the complete one below.
        (
            "3.1.2.15",
            "baddn",
            rfc4475!("baddn"),
            Refused((400, "no end of headers")),
        ),
        (
            "3.1.2.16",
            "badvers",
            rfc4475!("badvers"),
            Refused((505, "SIP/7.0")),
        ),
        (
            "3.1.2.17",
            "mismatch01",
            rfc4475!("mismatch01"),
            Refused((400, "CSeq: its method")),
        ),
        (
            "3.1.2.18",
            "mismatch02",
            rfc4475!("mismatch02"),
            Refused((400, "CSeq: its method")),
        ),
        (
            "3.1.2.19",
            "bigcode",
            rfc4475!("bigcode"),
            Refused((400, "status code")),
        ),
        ("3.2.1", "badbranch", rfc4475!("badbranch"), Parsed(())),
        (
            "3.3.1",
            "insuf",
            rfc4475!("insuf"),
            Refused((400, "missing mandatory header")),
        ),
        ("3.3.2", "unkscm", rfc4475!("unkscm"), Parsed(())),
        ("3.3.3", "novelsc", rfc4475!("novelsc"), Parsed(())),
        ("3.3.4", "unksm2", rfc4475!("unksm2"), Parsed(())),
        ("3.3.5", "bext01", rfc4475!("bext01"), Parsed(())),
        ("3.3.6", "invut", rfc4475!("invut"), Parsed(())),
        ("3.3.7", "regaut01", rfc4475!("regaut01"), Parsed(())),
        (
            "3.3.8",
            "multi01",
            rfc4475!("multi01"),
            Refused((400, "more than one")),
        ),
        (
            "3.3.9",
            "mcl01",
            rfc4475!("mcl01"),
            Refused((400, "Content-Length: more than one")),
        ),
        ("3.3.10", "bcast", rfc4475!("bcast"), Parsed(())),
        ("3.3.11", "zeromf", rfc4475!("zeromf"), Parsed(())),
        ("3.3.12", "cparam01", rfc4475!("cparam01"), Parsed(())),
        ("3.3.13", "cparam02", rfc4475!("cparam02"), Parsed(())),
        ("3.3.14", "regescrt", rfc4475!("regescrt"), Parsed(())),
        ("3.3.15", "sdp01", rfc4475!("sdp01"), Parsed(())),
        ("3.4.1", "inv2543", rfc4475!("inv2543"), Parsed(())),
    ];
    assert_eq!(cases.len(), 49, "RFC 4475 §3 has 49 messages");
    for (section, name, raw, expected) in cases {
        let got = Message::parse(
            Bytes::from_static(raw),
            Transport::Datagram,
            &Limits::default(),
        );
        match (&got, expected) {
            (Ok(_), Ok(())) => {}
            (Err(e), Err((status, says))) => assert!(
                e.status() == status && e.to_string().contains(says),
                "{section} {name}: expected {status} saying '{says}', got {} '{e}'",
                e.status()
            ),
            (Ok(_), Err((status, _))) => panic!("{section} {name}: expected {status}, it parsed"),
            (Err(e), Ok(())) => panic!("{section} {name}: a valid message was refused: {e}"),
        }
    }
    // baddn as the RFC's text shows it, its header section ended: the display names.
    let mut baddn = rfc4475!("baddn").to_vec();
    baddn.extend_from_slice(b"\r\n");
    let err = udp(std::str::from_utf8(&baddn).unwrap()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "From: a display name that is neither tokens nor quoted"
    );
    // What the valid ones read as (RFC 4475's notes on each).
    let m = |raw: &'static [u8]| {
        Message::parse(
            Bytes::from_static(raw),
            Transport::Datagram,
            &Limits::default(),
        )
        .unwrap()
    };
    let wsinv = m(rfc4475!("wsinv"));
    assert_eq!(wsinv.cseq().unwrap(), (9, "INVITE".into()));
    assert_eq!(wsinv.max_forwards().unwrap(), Some(68));
    assert_eq!(wsinv.values(HeaderKind::Via).len(), 3);
    assert!(causeway_sip::build::has_tag(
        &wsinv.value(HeaderKind::To).unwrap()
    ));
    let top = causeway_sip::Via::parse(&wsinv.values(HeaderKind::Via)[0]).unwrap();
    assert_eq!(
        (top.host.as_str(), top.branch()),
        ("192.0.2.2", Some("390skdjuw"))
    );
    assert_eq!(wsinv.body().len(), 150);
    let intmeth = m(rfc4475!("intmeth"));
    assert_eq!(
        intmeth.method(),
        Some("!interesting-Method0123456789_*+`.%indeed'~")
    );
    let to = intmeth.first(HeaderKind::To).unwrap();
    assert!(intmeth
        .header_value(to)
        .starts_with(b"\"BEL:\\\x07 NUL:\\\x00 DEL:\\\x7f\""));
    let esc02 = m(rfc4475!("esc02"));
    assert_eq!(esc02.method(), Some("RE%47IST%45R"), "not REGISTER");
    assert_eq!(
        esc02.values(HeaderKind::Contact).len(),
        2,
        "C%6Fntact is not Contact"
    );
    let dblreq = m(rfc4475!("dblreq"));
    assert!(
        dblreq.body().is_empty(),
        "the INVITE after it is noise (RFC 3261 §18.3)"
    );
    let mpart = m(rfc4475!("mpart01"));
    assert_eq!(mpart.body().len(), 553);
    assert_eq!(m(rfc4475!("noreason")).status(), Some(100));
    let inv2543 = m(rfc4475!("inv2543"));
    assert!(
        inv2543.body().ends_with(b"RTP/AVP 0\r\n"),
        "no Content-Length: the rest of the datagram"
    );
    // Over a stream, wsinv (`Content-Length   : 150`) is framed whole; a folded line that
    // looks like a header is not one.
    let raw = rfc4475!("wsinv");
    assert_eq!(
        frame(raw, &Limits::default()).unwrap(),
        Frame::Message { len: raw.len() }
    );
    let folded = REGISTER.replace("X-Vendor-Thing:", "X-Vendor-Thing: a\r\n l: 99\r\n");
    assert_eq!(
        frame(folded.as_bytes(), &Limits::default()).unwrap(),
        Frame::Message { len: folded.len() }
    );
    // Over a stream, a second Content-Length cannot frame the message either (§3.3.9).
    assert_eq!(
        frame(rfc4475!("mcl01"), &Limits::default()).unwrap_err(),
        ParseError::Field("Content-Length", "more than one")
    );
}

#[test]
fn a_stream_message_needs_an_exact_content_length_and_a_datagram_drops_extra_bytes() {
    let without = REGISTER.replace("Content-Length: 0\r\n", "");
    assert_eq!(
        parse(&without, Transport::Stream).unwrap_err(),
        ParseError::Missing("Content-Length")
    );
    assert!(parse(&without, Transport::Datagram).is_ok());
    let with_extra = format!("{REGISTER}junk after the message");
    let m = udp(&with_extra).unwrap();
    assert!(
        m.body().is_empty(),
        "RFC 3261 18.3: bytes past Content-Length are not the body"
    );
    assert!(parse(&with_extra, Transport::Stream).is_err());
}

#[test]
fn limits_are_enforced() {
    let limits = Limits::default();
    let big = format!(
        "{}X-Big: {}\r\n\r\n",
        REGISTER.trim_end_matches("\r\n"),
        "a".repeat(limits.max_header_line + 1)
    );
    assert!(udp(&big)
        .unwrap_err()
        .to_string()
        .contains("longer than the limit"));
    let many: String = (0..300).map(|i| format!("X-H{i}: v\r\n")).collect();
    let text = REGISTER.replace(
        "Content-Length: 0\r\n",
        &format!("{many}Content-Length: 0\r\n"),
    );
    assert_eq!(udp(&text).unwrap_err(), ParseError::TooManyHeaders(256));
    let huge = "a".repeat(limits.max_message + 1);
    assert_eq!(udp(&huge).unwrap_err().status(), 513);
}

#[test]
fn streams_are_framed_with_keepalives_between_messages() {
    let limits = Limits::default();
    let body_msg = REGISTER.replace("Content-Length: 0", "Content-Length: 5") + "hello";
    let stream = format!("\r\n\r\n{REGISTER}\r\n{body_msg}");
    let b = stream.as_bytes();
    assert_eq!(
        frame(b, &limits).unwrap(),
        Frame::KeepAlive { len: 4, ping: true }
    );
    let rest = &b[4..];
    let Frame::Message { len } = frame(rest, &limits).unwrap() else {
        panic!("a message")
    };
    assert_eq!(&rest[..len], REGISTER.as_bytes());
    let rest = &rest[len..];
    assert_eq!(
        frame(rest, &limits).unwrap(),
        Frame::KeepAlive {
            len: 2,
            ping: false
        }
    );
    let rest = &rest[2..];
    assert_eq!(
        frame(&rest[..rest.len() - 1], &limits).unwrap(),
        Frame::Incomplete
    );
    assert_eq!(
        frame(rest, &limits).unwrap(),
        Frame::Message { len: rest.len() }
    );
    let m = parse(std::str::from_utf8(rest).unwrap(), Transport::Stream).unwrap();
    assert_eq!(&m.body()[..], b"hello");
    // A stream that never ends its headers is cut at the limit.
    let endless = "X".repeat(limits.max_message + 1);
    assert!(frame(endless.as_bytes(), &limits).is_err());
}

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z][A-Za-z0-9.!%*_+`'~-]{0,15}"
}

/// A valid request with random method, extra headers (known or not) and body.
fn request() -> impl Strategy<Value = (String, String, u32, Vec<(String, String)>, String)> {
    (
        "[A-Z]{3,9}",
        "[a-z0-9]{1,12}",
        any::<u32>(),
        prop::collection::vec((token(), "[ -~]{0,40}"), 0..12),
        "[ -~]{0,200}",
    )
}

fn render(method: &str, call: &str, cseq: u32, extra: &[(String, String)], body: &str) -> String {
    let mut s = format!(
        "{method} sip:u@lab.example SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.9;branch=z9hG4bK{call}\r\nFrom: <sip:a@lab.example>;tag=x\r\nTo: <sip:u@lab.example>\r\nCall-ID: {call}\r\nCSeq: {cseq} {method}\r\n"
    );
    for (name, value) in extra {
        s.push_str(&format!("X-{name}: {value}\r\n"));
    }
    s.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Message::parse(Bytes::from(data.clone()), Transport::Datagram, &Limits::default());
        let _ = Message::parse(Bytes::from(data.clone()), Transport::Stream, &Limits::default());
        let _ = frame(&data, &Limits::default());
    }

    #[test]
    fn a_mutated_valid_message_never_panics(
        (method, call, cseq, extra, body) in request(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut raw = render(&method, &call, cseq, &extra, &body).into_bytes();
        let i = at.index(raw.len());
        raw[i] = byte;
        let _ = Message::parse(Bytes::from(raw), Transport::Datagram, &Limits::default());
    }

    #[test]
    fn generated_requests_read_back_exactly(
        (method, call, cseq, extra, body) in request()
    ) {
        let text = render(&method, &call, cseq, &extra, &body);
        let m = parse(&text, Transport::Stream).unwrap();
        prop_assert_eq!(m.method(), Some(method.as_str()));
        prop_assert_eq!(m.cseq().unwrap(), (cseq, method.clone()));
        prop_assert_eq!(m.call_id(), Some(call.clone()));
        prop_assert_eq!(&m.body()[..], body.as_bytes());
        let others: Vec<(Vec<u8>, Vec<u8>)> = m
            .headers()
            .iter()
            .filter(|h| h.kind == HeaderKind::Other)
            .map(|h| (m.header_name(h).to_vec(), m.header_value(h).to_vec()))
            .collect();
        let expected: Vec<(Vec<u8>, Vec<u8>)> = extra
            .iter()
            .map(|(n, v)| (format!("X-{n}").into_bytes(), v.trim_matches([' ', '\t']).as_bytes().to_vec()))
            .collect();
        prop_assert_eq!(others, expected);
    }

    #[test]
    fn a_stream_cut_anywhere_frames_into_the_same_messages(
        msgs in prop::collection::vec(request(), 1..5),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let texts: Vec<String> = msgs.iter().map(|(m, c, s, e, b)| render(m, c, *s, e, b)).collect();
        let stream: Vec<u8> = texts.iter().flat_map(|t| format!("\r\n{t}").into_bytes()).collect();
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len())).collect();
        points.push(stream.len());
        points.sort();
        // Feed the stream in pieces as a socket would deliver it.
        let (mut buf, mut got, mut fed) = (Vec::new(), Vec::new(), 0);
        for p in points {
            buf.extend_from_slice(&stream[fed..p]);
            fed = p;
            loop {
                match frame(&buf, &Limits::default()).unwrap() {
                    Frame::Incomplete => break,
                    Frame::KeepAlive { len, .. } => { buf.drain(..len); }
                    Frame::Message { len } => {
                        got.push(String::from_utf8(buf[..len].to_vec()).unwrap());
                        buf.drain(..len);
                    }
                }
            }
        }
        prop_assert_eq!(got, texts);
    }

    /// Differential: ezk-sip-types splits the same message into the same start line and the
    /// same header names and values, folded lines included.
    #[test]
    fn another_parser_reads_the_same_start_line_and_headers(
        (method, call, cseq, extra, body) in request(),
        fold in any::<prop::sample::Index>(),
    ) {
        let mut text = render(&method, &call, cseq, &extra, &body);
        if !extra.is_empty() {
            // Fold one extension header's value onto a continuation line (RFC 3261 §7.3.1).
            let name = format!("X-{}: ", extra[fold.index(extra.len())].0);
            text = text.replacen(&name, &format!("{name}folded\r\n  "), 1);
        }
        let ours = parse(&text, Transport::Stream).unwrap();
        let raw = Bytes::from(text.clone());
        let mut lines = ezk_sip_types::msg::PullParser::new(&raw, 0);
        let start = std::str::from_utf8(lines.next().unwrap().unwrap()).unwrap();
        prop_assert_eq!(start, format!("{method} sip:u@lab.example SIP/2.0"));
        prop_assert_eq!(ours.method(), Some(method.as_str()));
        let squash = |v: &str| v.split_whitespace().collect::<Vec<_>>().join(" ");
        let theirs: Vec<(String, String)> = lines
            .map(|l| {
                let l = std::str::from_utf8(l.unwrap()).unwrap();
                let (_, line) = ezk_sip_types::msg::Line::parse(&raw, l).unwrap();
                (line.name.as_print_str().to_ascii_lowercase(), squash(&line.value))
            })
            .collect();
        let mine: Vec<(String, String)> = ours
            .headers()
            .iter()
            .map(|h| {
                let name = String::from_utf8_lossy(ours.header_name(h)).to_ascii_lowercase();
                (name, squash(&causeway_sip::unfold(ours.header_value(h))))
            })
            .collect();
        prop_assert_eq!(mine, theirs);
    }
}
