//! A tiny authoritative DNS server for tests: a fixed zone of NAPTR, SRV, A and AAAA
//! records, served over UDP (and TCP, where a client retries an answer too large for a
//! datagram). Loopback only: it is a test fixture, never a name server for a network.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hickory_resolver::proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA, NAPTR, SRV};
use hickory_resolver::proto::rr::{Name, RData, Record};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::{JoinHandle, JoinSet};

/// The largest datagram read and sent: a query is far smaller, and an EDNS client that
/// offers more still gets at most this (RFC 6891 lets a server send less).
const MAX_DATAGRAM: usize = 4096;
/// Without EDNS a client takes no datagram larger than this (RFC 1035 §4.2.1).
const PLAIN_DATAGRAM: usize = 512;
const TTL: u32 = 60;
/// A TCP client that says nothing for this long is dropped, so a stuck test cannot pile up
/// connections.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// After a socket error, before the next read or accept.
const ERROR_PAUSE: Duration = Duration::from_millis(10);

/// One record of the test zone. Names match case-insensitively, with or without the final dot.
#[derive(Clone, Debug)]
pub enum TestRecord {
    Naptr {
        name: String,
        order: u16,
        preference: u16,
        flags: String,
        services: String,
        regexp: String,
        replacement: String,
    },
    Srv {
        name: String,
        priority: u16,
        weight: u16,
        port: u16,
        target: String,
    },
    A {
        name: String,
        ip: Ipv4Addr,
    },
    Aaaa {
        name: String,
        ip: Ipv6Addr,
    },
}

impl TestRecord {
    /// A NAPTR with an empty regexp, as RFC 3263 uses them.
    pub fn naptr(
        name: &str,
        order: u16,
        preference: u16,
        flags: &str,
        services: &str,
        replacement: &str,
    ) -> TestRecord {
        TestRecord::Naptr {
            name: name.to_owned(),
            order,
            preference,
            flags: flags.to_owned(),
            services: services.to_owned(),
            regexp: String::new(),
            replacement: replacement.to_owned(),
        }
    }

    pub fn srv(name: &str, priority: u16, weight: u16, port: u16, target: &str) -> TestRecord {
        TestRecord::Srv {
            name: name.to_owned(),
            priority,
            weight,
            port,
            target: target.to_owned(),
        }
    }

    pub fn a(name: &str, ip: Ipv4Addr) -> TestRecord {
        TestRecord::A {
            name: name.to_owned(),
            ip,
        }
    }

    pub fn aaaa(name: &str, ip: Ipv6Addr) -> TestRecord {
        TestRecord::Aaaa {
            name: name.to_owned(),
            ip,
        }
    }

    fn name(&self) -> &str {
        match self {
            TestRecord::Naptr { name, .. }
            | TestRecord::Srv { name, .. }
            | TestRecord::A { name, .. }
            | TestRecord::Aaaa { name, .. } => name,
        }
    }

    /// The wire record, answering under `owner` (the name as the client spelled it).
    fn to_record(&self, owner: &Name) -> io::Result<Record> {
        let data = match self {
            TestRecord::Naptr {
                order,
                preference,
                flags,
                services,
                regexp,
                replacement,
                ..
            } => RData::NAPTR(NAPTR::new(
                *order,
                *preference,
                flags.as_bytes().into(),
                services.as_bytes().into(),
                regexp.as_bytes().into(),
                absolute_name(replacement)?,
            )),
            TestRecord::Srv {
                priority,
                weight,
                port,
                target,
                ..
            } => RData::SRV(SRV::new(*priority, *weight, *port, absolute_name(target)?)),
            TestRecord::A { ip, .. } => RData::A(A(*ip)),
            TestRecord::Aaaa { ip, .. } => RData::AAAA(AAAA(*ip)),
        };
        Ok(Record::from_rdata(owner.clone(), TTL, data))
    }
}

fn absolute_name(text: &str) -> io::Result<Name> {
    let mut name = Name::from_ascii(text).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("test record name {text:?}: {e}"),
        )
    })?;
    name.set_fqdn(true);
    Ok(name)
}

/// Lower case, without the final dot: how zone names and asked names are compared.
fn zone_key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

struct Zone {
    records: Vec<TestRecord>,
    /// (name, record type) per question, in arrival order.
    asked: Mutex<Vec<(String, String)>>,
}

impl Zone {
    fn note(&self, name: String, record_type: String) {
        self.asked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((name, record_type));
    }

    fn asked(&self) -> Vec<(String, String)> {
        self.asked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The answer to one request, encoded; none for what is not a query at all (garbage, a
    /// response): a server that answers those can be made to reflect traffic.
    fn answer(&self, request: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let query = Message::from_vec(request).ok()?;
        if query.metadata.message_type != MessageType::Query {
            return None;
        }
        let mut response = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
        response.metadata = Metadata::response_from_request(&query.metadata);
        response.metadata.authoritative = true;
        response.add_queries(query.queries.iter().cloned());
        let [question] = query.queries.as_slice() else {
            response.metadata.response_code = ResponseCode::FormErr;
            return response.to_vec().ok();
        };
        if query.metadata.op_code != OpCode::Query {
            response.metadata.response_code = ResponseCode::NotImp;
            return response.to_vec().ok();
        }
        let asked = zone_key(&question.name.to_ascii());
        self.note(asked.clone(), question.query_type.to_string());

        // A name with records only below it (other.test under _sip._udp.other.test) exists
        // all the same (an empty non-terminal): NOERROR, no answer, as a real server says.
        let below = format!(".{asked}");
        let known = self.records.iter().any(|record| {
            let name = zone_key(record.name());
            name == asked || name.ends_with(&below)
        });
        for record in &self.records {
            if zone_key(record.name()) != asked {
                continue;
            }
            let Ok(answer) = record.to_record(&question.name) else {
                continue;
            };
            if answer.record_type() == question.query_type {
                response.add_answer(answer);
            }
        }
        if !known {
            response.metadata.response_code = ResponseCode::NXDomain;
        }
        if query.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(MAX_DATAGRAM as u16);
            response.set_edns(edns);
        }

        let encoded = response.to_vec().ok()?;
        let limit = match transport {
            Transport::Tcp => usize::from(u16::MAX),
            Transport::Udp => usize::from(query.max_payload()).clamp(PLAIN_DATAGRAM, MAX_DATAGRAM),
        };
        if encoded.len() > limit {
            // Header and question only, TC set: the client asks again over TCP.
            response.truncate().to_vec().ok()
        } else {
            Some(encoded)
        }
    }
}

#[derive(Clone, Copy)]
enum Transport {
    Udp,
    Tcp,
}

/// A running test DNS server; it stops when dropped.
pub struct DnsResponder {
    pub addr: SocketAddr,
    zone: Arc<Zone>,
    udp: JoinHandle<()>,
    tcp: JoinHandle<()>,
}

impl DnsResponder {
    /// Serves `records` on `bind` (UDP and TCP, same port; port 0 picks one). Refuses an
    /// address outside loopback.
    pub async fn start(bind: SocketAddr, records: Vec<TestRecord>) -> io::Result<DnsResponder> {
        if !bind.ip().is_loopback() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the test DNS responder listens on loopback only, not {bind}"),
            ));
        }
        for record in &records {
            // A bad name is the test's mistake: say so now rather than answer without it.
            record.to_record(&Name::root())?;
        }
        let (udp, tcp) = bind_udp_and_tcp(bind).await?;
        let addr = udp.local_addr()?;
        let zone = Arc::new(Zone {
            records,
            asked: Mutex::new(Vec::new()),
        });
        Ok(DnsResponder {
            addr,
            udp: tokio::spawn(serve_udp(udp, zone.clone())),
            tcp: tokio::spawn(serve_tcp(tcp, zone.clone())),
            zone,
        })
    }

    /// Every question asked so far, in order: (name in lower case without the final dot,
    /// record type such as "NAPTR"). A truncated UDP answer retried over TCP counts twice.
    pub fn queries(&self) -> Vec<(String, String)> {
        self.zone.asked()
    }

    /// Stops it now, as dropping it does.
    pub fn stop(self) {}
}

/// One port for both: with port 0 the UDP port picked may be taken for TCP, so a few tries.
async fn bind_udp_and_tcp(bind: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    let tries = if bind.port() == 0 { 8 } else { 1 };
    let mut last_error = None;
    for _ in 0..tries {
        let udp = UdpSocket::bind(bind).await?;
        match TcpListener::bind(udp.local_addr()?).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| io::Error::other("no port free for both UDP and TCP")))
}

impl Drop for DnsResponder {
    fn drop(&mut self) {
        self.udp.abort();
        self.tcp.abort();
    }
}

async fn serve_udp(socket: UdpSocket, zone: Arc<Zone>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        // A longer datagram is cut to the buffer's length and then fails to parse: ignored.
        let Ok((len, from)) = socket.recv_from(&mut buf).await else {
            // ICMP errors from an earlier reply show up here on some systems; the pause keeps
            // an error that persists from spinning a core.
            tokio::time::sleep(ERROR_PAUSE).await;
            continue;
        };
        let Some(request) = buf.get(..len) else {
            continue;
        };
        if let Some(reply) = zone.answer(request, Transport::Udp) {
            let _ = socket.send_to(&reply, from).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, zone: Arc<Zone>) {
    // Dropped with this task when the responder stops, which aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                match accepted {
                    Ok((stream, _)) => {
                        connections.spawn(serve_tcp_connection(stream, zone.clone()));
                    }
                    // Out of descriptors, say: wait rather than spin.
                    Err(_) => tokio::time::sleep(ERROR_PAUSE).await,
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_tcp_connection(mut stream: TcpStream, zone: Arc<Zone>) {
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    loop {
        let Ok(Ok(len)) = tokio::time::timeout(TCP_IDLE, stream.read_u16()).await else {
            return;
        };
        let Some(request) = buf.get_mut(..usize::from(len)) else {
            return;
        };
        if !matches!(
            tokio::time::timeout(TCP_IDLE, stream.read_exact(request)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let Some(reply) = zone.answer(request, Transport::Tcp) else {
            return;
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&reply_len.to_be_bytes());
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

/// A responder on a thread of its own with its own runtime, for a plain `#[test]` (one that
/// drives the real binary, say). It stops when dropped.
pub struct StopHandle {
    zone: Arc<Zone>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StopHandle {
    /// As [`DnsResponder::queries`].
    pub fn queries(&self) -> Vec<(String, String)> {
        self.zone.asked()
    }

    /// Stops the responder and waits for its thread to end.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for StopHandle {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Starts a responder on a new thread running a current-thread tokio runtime; returns once it
/// listens, with its address.
pub fn spawn_blocking_runtime(
    bind: SocketAddr,
    records: Vec<TestRecord>,
) -> io::Result<(SocketAddr, StopHandle)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("test-dns".into())
        .spawn(move || {
            runtime.block_on(async move {
                match DnsResponder::start(bind, records).await {
                    Ok(responder) => {
                        let _ = started_tx.send(Ok((responder.addr, responder.zone.clone())));
                        // Either a stop or a dropped handle ends it.
                        let _ = stop_rx.await;
                        drop(responder);
                    }
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                    }
                }
            });
        })?;
    let started = started_rx
        .recv()
        .map_err(|_| io::Error::other("the test DNS responder's thread ended before it listened"));
    let (addr, zone) = match started.and_then(|r| r) {
        Ok(listening) => listening,
        Err(e) => {
            let _ = thread.join();
            return Err(e);
        }
    };
    Ok((
        addr,
        StopHandle {
            zone,
            stop: Some(stop_tx),
            thread: Some(thread),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::SipResolver;
    use crate::transport::Proto;
    use hickory_resolver::proto::op::Query;
    use hickory_resolver::proto::rr::RecordType;

    fn zone() -> Vec<TestRecord> {
        vec![
            TestRecord::srv("_sip._udp.other.test", 10, 10, 5060, "sip1.other.test"),
            TestRecord::a("sip1.other.test", Ipv4Addr::new(127, 0, 0, 1)),
        ]
    }

    #[tokio::test]
    async fn dns_responder_ignores_garbage_and_keeps_answering() {
        let responder = DnsResponder::start("127.0.0.1:0".parse().expect("address"), zone())
            .await
            .expect("starts");
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        client.connect(responder.addr).await.expect("connect");
        // Not DNS; a response (must not be answered: no reflection); an oversized datagram.
        client.send(b"\x00\x01garbage").await.expect("send");
        let mut response = Message::new(7, MessageType::Response, OpCode::Query);
        response.add_query(Query::query(
            Name::from_ascii("sip1.other.test.").expect("name"),
            RecordType::A,
        ));
        client
            .send(&response.to_vec().expect("encode"))
            .await
            .expect("send");
        client.send(&[0xffu8; 9000]).await.expect("send");

        let mut query = Message::new(42, MessageType::Query, OpCode::Query);
        query.add_query(Query::query(
            Name::from_ascii("SIP1.other.test.").expect("name"),
            RecordType::A,
        ));
        client
            .send(&query.to_vec().expect("encode"))
            .await
            .expect("send");
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let len = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
            .await
            .expect("an answer to the real query")
            .expect("recv");
        let answer = Message::from_vec(&buf[..len]).expect("a DNS message");
        assert_eq!(answer.metadata.id, 42, "the first reply answers the query");
        assert_eq!(answer.answers.len(), 1);
        assert_eq!(
            responder.queries(),
            [("sip1.other.test".to_owned(), "A".to_owned())]
        );
    }

    #[tokio::test]
    async fn dns_responder_says_nxdomain_or_no_data() {
        let responder = DnsResponder::start("127.0.0.1:0".parse().expect("address"), zone())
            .await
            .expect("starts");
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        client.connect(responder.addr).await.expect("connect");
        let mut buf = vec![0u8; MAX_DATAGRAM];
        for (name, record_type, code) in [
            ("nowhere.test.", RecordType::A, ResponseCode::NXDomain),
            ("sip1.other.test.", RecordType::AAAA, ResponseCode::NoError),
            // Only names below it: it exists all the same.
            ("other.test.", RecordType::NAPTR, ResponseCode::NoError),
        ] {
            let mut query = Message::new(1, MessageType::Query, OpCode::Query);
            query.add_query(Query::query(
                Name::from_ascii(name).expect("name"),
                record_type,
            ));
            client
                .send(&query.to_vec().expect("encode"))
                .await
                .expect("send");
            let len = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
                .await
                .expect("answered")
                .expect("recv");
            let answer = Message::from_vec(&buf[..len]).expect("a DNS message");
            assert_eq!(answer.metadata.response_code, code, "{name} {record_type}");
            assert!(answer.answers.is_empty(), "{name} {record_type}");
        }
    }

    #[tokio::test]
    async fn dns_responder_refuses_a_non_loopback_address() {
        let refused = DnsResponder::start("0.0.0.0:0".parse().expect("address"), zone()).await;
        assert!(refused.is_err());
    }

    /// A plain `#[test]`, as a black-box test of the binary has: the responder runs on a
    /// thread of its own, the resolver on another runtime, and stopping it is felt.
    #[test]
    fn dns_responder_runs_on_its_own_thread() {
        let (addr, handle) =
            spawn_blocking_runtime("127.0.0.1:0".parse().expect("address"), zone())
                .expect("starts");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let resolver = SipResolver::with_servers_and_timeout(&[addr], Duration::from_millis(400));
        let found = runtime
            .block_on(resolver.targets("other.test", None, Some(Proto::Udp), false))
            .expect("resolves");
        assert_eq!(found.len(), 1);
        assert!(handle
            .queries()
            .iter()
            .any(|(n, t)| n == "_sip._udp.other.test" && t == "SRV"));

        handle.stop();
        let after = runtime.block_on(resolver.targets("else.test", None, None, false));
        assert!(after.is_err(), "{after:?}");
    }
}
