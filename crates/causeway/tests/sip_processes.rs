//! Black-box tests of the clustered registrar and proxy (SV-1…SV-4): real `causeway run`
//! processes, real SIP clients (SIPp, from Debian's sip-tester), and an endpoint written
//! here where SIPp cannot play the part (one that is reachable only on its own connection).

mod harness;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use causeway_sip::{build, frame, Frame, HeaderKind, Limits, Message, Transport};
use harness::*;

const SCENARIOS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sip");

/// A cluster of `n` peers on 127.0.`net`.k, each with SIP on 5060 (UDP, TCP) and 5061
/// (TLS), serving the domain `test.example`.
fn sip_cluster(net: u8, n: usize) -> TestCluster {
    let c = TestCluster::start(net, n, "Enforce", |_, config, _, _| {
        config.push_str("\n[sip]\n");
    });
    wait_for(30, "cluster formed", || c.formed());
    set(&c, 1, "sip.domains", "test.example");
    c
}

/// A SIPp process this test started; killed by its PID if still running at the end.
struct Sipp {
    child: Option<Child>,
    out: std::path::PathBuf,
}

impl Sipp {
    /// Starts `sipp` with `args` in `dir`, scenario files taken from `tests/sip`.
    fn start(dir: &Path, name: &str, args: &[&str]) -> Sipp {
        let out = dir.join(format!("{name}.out"));
        let file = std::fs::File::create(&out).unwrap();
        let child = Command::new("sipp")
            .args(args)
            .args(["-nostdin", "-trace_err", "-trace_msg"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("sipp is installed (apt-get install sip-tester)");
        Sipp {
            child: Some(child),
            out,
        }
    }

    /// Waits for the run to end (at most `secs`); (successful, failed) calls.
    fn finish(mut self, secs: u64) -> (u64, u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut child = self.child.take().unwrap();
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("sipp did not finish within {secs} s: {}", self.output());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = self.output();
        (
            counter(&text, "Successful call"),
            counter(&text, "Failed call"),
        )
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

impl Drop for Sipp {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The cumulative column of one line of SIPp's final statistics screen.
fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .rev()
        .find(|l| l.trim_start().starts_with(name))
        .and_then(|l| l.split('|').next_back())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Every file SIPp wrote in `dir` whose name contains `part`, concatenated.
fn sipp_logs(dir: &Path, part: &str) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_name().to_string_lossy().contains(part) {
            out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    out
}

fn registrations(c: &TestCluster, k: usize) -> serde_json::Value {
    c.xstatus(k, "registrations").unwrap_or_default()
}

/// The peer that holds `aor`'s binding, as peer `k` sees it.
fn binding_owner(c: &TestCluster, k: usize, aor: &str) -> Option<u64> {
    registrations(c, k)["rows"]
        .as_array()?
        .iter()
        .find(|r| r["aor"] == aor)
        .and_then(|r| r["peer"].as_u64())
}

fn csv(dir: &Path, name: &str, users: &[&str]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("SEQUENTIAL\n{}\n", users.join("\n"))).unwrap();
    path.display().to_string()
}

fn scenario(name: &str) -> String {
    format!("{SCENARIOS}/{name}")
}

/// Registers `users` (from `csv`) through `peer` with contacts at `ip:uas_port`.
fn register(
    ip: &str,
    peer: &str,
    csv: &str,
    uas_port: u16,
    local_port: u16,
    transport: &str,
    dir: &Path,
) {
    let n = std::fs::read_to_string(csv).unwrap().lines().count() - 1;
    let (uas_port, n_text) = (uas_port.to_string(), n.to_string());
    let extra = [
        "-key", "uas_port", &uas_port, "-m", &n_text, "-timeout", "10",
    ];
    let (ok, failed) = client(
        dir,
        "register",
        peer,
        csv,
        (ip, local_port),
        transport,
        &extra,
    )
    .finish(20);
    assert_eq!((ok, failed), (n as u64, 0), "registration through {peer}");
}

/// Registers the user in `csv` for the UAS at 127.0.`net`.20:5090 (UDP) through peer 1,
/// then waits until every peer holds `aor` as peer 1's.
fn register_through_peer1(c: &TestCluster, net: u8, csv: &str, aor: &str, dir: &Path) {
    register(
        &format!("127.0.{net}.20"),
        &format!("127.0.{net}.1"),
        csv,
        5090,
        5091,
        "u1",
        dir,
    );
    wait_for(5, &format!("{aor} held by every peer"), || {
        (1..=c.peers.len()).all(|k| binding_owner(c, k, aor) == Some(1))
    });
}

/// Calls the user in `csv` through `peer`, `calls` times, holding each `hold_ms`.
fn call(
    (ip, local_port): (&str, u16),
    peer: &str,
    csv: &str,
    transport: &str,
    calls: usize,
    hold_ms: u64,
    dir: &Path,
) -> Sipp {
    let (hold, calls) = (hold_ms.to_string(), calls.to_string());
    let extra = ["-d", &hold, "-m", &calls, "-r", "50", "-timeout", "30"];
    client(dir, "call", peer, csv, (ip, local_port), transport, &extra)
}

/// A SIPp client running `tests/sip/<name>.xml` through `peer` with the users in `csv`.
fn client(
    dir: &Path,
    name: &str,
    peer: &str,
    csv: &str,
    (ip, local_port): (&str, u16),
    transport: &str,
    extra: &[&str],
) -> Sipp {
    let (target, file, port) = (
        format!("{peer}:5060"),
        scenario(&format!("{name}.xml")),
        local_port.to_string(),
    );
    let mut args = vec![
        target.as_str(),
        "-sf",
        &file,
        "-inf",
        csv,
        "-i",
        ip,
        "-p",
        &port,
        "-t",
        transport,
    ];
    args.extend_from_slice(extra);
    Sipp::start(dir, &format!("{name}-{local_port}"), &args)
}

/// One call through `peer` that must succeed.
fn call_ok(local: (&str, u16), peer: &str, users: &str, dir: &Path) {
    let (ok, failed) = call(local, peer, users, "u1", 1, 100, dir).finish(30);
    assert_eq!(
        (ok, failed),
        (1, 0),
        "a call through {peer}: {}",
        sipp_logs(dir, "errors")
    );
}

fn uas(ip: &str, port: u16, transport: &str, calls: usize, dir: &Path) -> Sipp {
    let s = Sipp::start(
        dir,
        &format!("uas-{port}"),
        &[
            "-sf",
            &scenario("uas.xml"),
            "-i",
            ip,
            "-p",
            &port.to_string(),
            "-t",
            transport,
            "-m",
            &calls.to_string(),
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    s
}

#[test]
fn a_call_crosses_peers_over_udp_and_tcp_and_its_signalling_follows_the_record_route() {
    let c = sip_cluster(40, 3);
    let tmp = tempfile::tempdir().unwrap();
    for (transport, base) in [("u1", 5090u16), ("t1", 5190)] {
        let dir = tmp.path().join(transport);
        std::fs::create_dir_all(&dir).unwrap();
        let user = format!("bob-{transport}");
        let users = csv(&dir, "callee.csv", &[&user]);
        let callee = uas("127.0.40.20", base, transport, 1, &dir);
        register(
            "127.0.40.20",
            "127.0.40.1",
            &users,
            base,
            base + 1,
            transport,
            &dir,
        );
        let aor = format!("sip:{user}@test.example");
        wait_for(5, "the binding replicated to peer 3", || {
            binding_owner(&c, 3, &aor) == Some(1)
        });
        let (ok, failed) = call(
            ("127.0.40.21", base + 2),
            "127.0.40.2",
            &users,
            transport,
            1,
            200,
            &dir,
        )
        .finish(30);
        assert_eq!(
            (ok, failed),
            (1, 0),
            "{transport}: {}",
            sipp_logs(&dir, "errors")
        );
        let (answered, _) = callee.finish(10);
        assert_eq!(answered, 1);
        let seen = sipp_logs(&dir, "uas_");
        // Peer 2 took the call and record-routed it; on TCP the binding's connection is on
        // peer 1, so the INVITE went through peer 1 as well.
        let proto = if transport == "u1" { "udp" } else { "tcp" };
        assert!(
            seen.contains(&format!("<sip:127.0.40.2:5060;transport={proto};lr")),
            "no Record-Route of peer 2 at the callee:\n{seen}"
        );
        assert!(seen.contains(&format!("SIP/2.0/{} 127.0.40.2:5060", proto.to_uppercase())));
        if transport == "t1" {
            assert!(seen.contains("SIP/2.0/TCP 127.0.40.1:5060"), "{seen}");
        } else {
            assert!(!seen.contains("127.0.40.1:5060"), "{seen}");
        }
        // The BYE reached the callee through the route set, not straight from the caller.
        let bye = seen.split("BYE sip:").nth(1).unwrap_or_default();
        assert!(
            bye.contains("127.0.40.2:5060;branch=z9hG4bKcw"),
            "BYE did not pass peer 2:\n{seen}"
        );
    }
    let calls = c.xstatus(1, "calls").unwrap();
    assert_eq!(calls["calls"], 0, "every call ended: {calls}");
}

/// With no limit set, a call's record is written once it has lasted a second (a shorter
/// call costs no replicated write): a held call is then listed on every peer, and its BYE
/// removes it everywhere.
#[test]
fn with_no_limit_a_held_call_is_listed_on_every_peer_and_its_bye_removes_it() {
    let c = sip_cluster(47, 3);
    let tmp = tempfile::tempdir().unwrap();
    let users = csv(tmp.path(), "gina.csv", &["gina"]);
    let callee = uas("127.0.47.20", 5090, "u1", 2, tmp.path());
    register_through_peer1(&c, 47, &users, "sip:gina@test.example", tmp.path());
    call_ok(("127.0.47.21", 5100), "127.0.47.2", &users, tmp.path());
    let listed = |n: u64| (1..=3).all(|k| c.xstatus(k, "calls").is_some_and(|s| s["calls"] == n));
    assert!(listed(0), "the short call is not listed anywhere");
    let held = call(
        ("127.0.47.21", 5101),
        "127.0.47.2",
        &users,
        "u1",
        1,
        4000,
        tmp.path(),
    );
    wait_for(3, "the held call listed on every peer", || listed(1));
    assert_eq!(
        held.finish(30),
        (1, 0),
        "{}",
        sipp_logs(tmp.path(), "errors")
    );
    wait_for(5, "the call gone from every peer after its BYE", || {
        listed(0)
    });
    assert_eq!(callee.finish(10).0, 2);
}

/// Reads one SIP message from a stream endpoint.
fn read_message(stream: &mut impl Read, buf: &mut Vec<u8>) -> Message {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match frame(buf, &Limits::default()).unwrap() {
            Frame::Message { len } => {
                let raw: Vec<u8> = buf.drain(..len).collect();
                return Message::parse(Bytes::from(raw), Transport::Stream, &Limits::default())
                    .unwrap();
            }
            Frame::KeepAlive { len, .. } => {
                buf.drain(..len);
            }
            Frame::Incomplete => {
                assert!(Instant::now() < deadline, "no message within 10 s");
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).unwrap();
                assert!(n > 0, "connection closed");
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

/// A connection to a peer's SIP port, plain or TLS (the peer's certificate checked against
/// the cluster's CA).
trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

fn connect(c: &TestCluster, ip: &str, tls: bool) -> Box<dyn Stream> {
    let port = if tls { 5061 } else { 5060 };
    let tcp = TcpStream::connect((ip, port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if !tls {
        return Box::new(tcp);
    }
    Box::new(tls_over(c, tcp, ip))
}

#[test]
fn an_endpoint_reachable_only_on_its_own_connection_is_called_through_the_peer_that_holds_it() {
    endpoint_on_its_own_connection(41, false);
}

#[test]
fn an_endpoint_registered_over_tls_is_called_through_the_peer_that_holds_its_connection() {
    endpoint_on_its_own_connection(46, true);
}

fn endpoint_on_its_own_connection(net: u8, tls: bool) {
    let c = sip_cluster(net, 3);
    let tmp = tempfile::tempdir().unwrap();
    let peer = |k: usize| format!("127.0.{net}.{k}");
    // The endpoint registers with peer 1 over TCP or TLS and gives a contact nobody can
    // dial: only its connection to peer 1 reaches it.
    let mut ep = connect(&c, &peer(1), tls);
    let proto = if tls { "TLS" } else { "TCP" };
    let contact = format!(
        "<sip:dave@127.0.{net}.99:9;transport={}>",
        proto.to_lowercase()
    );
    let local = format!("127.0.{net}.98:9");
    write!(ep, "REGISTER sip:test.example SIP/2.0\r\nVia: SIP/2.0/{proto} {local};branch=z9hG4bKdave1\r\nMax-Forwards: 70\r\nFrom: <sip:dave@test.example>;tag=d1\r\nTo: <sip:dave@test.example>\r\nCall-ID: dave-reg\r\nCSeq: 1 REGISTER\r\nContact: {contact}\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let ok = read_message(&mut ep, &mut buf);
    assert_eq!(ok.status(), Some(200));
    assert!(ok.value(HeaderKind::Contact).unwrap().contains("expires="));
    wait_for(5, "dave's binding on peer 2", || {
        binding_owner(&c, 2, "sip:dave@test.example") == Some(1)
    });
    let users = csv(tmp.path(), "dave.csv", &["dave"]);
    let caller = call(
        (&peer(21), 5092),
        &peer(2),
        &users,
        "u1",
        1,
        300,
        tmp.path(),
    );
    // The endpoint's side of the call, on its own connection.
    let invite = read_message(&mut ep, &mut buf);
    assert_eq!(invite.method(), Some("INVITE"));
    let vias = invite.values(HeaderKind::Via);
    let port = if tls { 5061 } else { 5060 };
    assert!(
        vias[0].starts_with(&format!("SIP/2.0/{proto} {}:{port}", peer(1))),
        "{vias:?}"
    );
    assert!(vias[1].contains(&format!("{}:5060", peer(2))), "{vias:?}");
    let rr = invite.values(HeaderKind::RecordRoute);
    assert!(
        rr[0].contains(&format!("{}:{port}", peer(1))) && rr[0].contains("cw-flow="),
        "{rr:?}"
    );
    let answer = |req: &Message, status: u16, reason: &str| {
        build::response(
            req,
            status,
            reason,
            Some("dave-tag"),
            &[format!("Contact: {contact}")],
        )
    };
    ep.write_all(&answer(&invite, 180, "Ringing")).unwrap();
    ep.write_all(&answer(&invite, 200, "OK")).unwrap();
    // ACK and BYE reach the endpoint on the same connection, through peer 1's flow token.
    let ack = read_message(&mut ep, &mut buf);
    assert_eq!(ack.method(), Some("ACK"));
    let bye = read_message(&mut ep, &mut buf);
    assert_eq!(bye.method(), Some("BYE"));
    ep.write_all(&answer(&bye, 200, "OK")).unwrap();
    let (ok, failed) = caller.finish(20);
    assert_eq!((ok, failed), (1, 0), "{}", sipp_logs(tmp.path(), "errors"));
    // Gone with its connection: a call now gets an error, not a hang.
    drop(ep);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed) = call((&peer(21), 5093), &peer(3), &users, "u1", 1, 0, tmp.path()).finish(40);
    assert_eq!((ok, failed), (0, 1));
}

#[test]
fn kill_9_of_the_registrar_keeps_its_udp_endpoint_callable_and_re_registering_moves_it() {
    let mut c = sip_cluster(42, 3);
    let tmp = tempfile::tempdir().unwrap();
    let users = csv(tmp.path(), "erin.csv", &["erin"]);
    let aor = "sip:erin@test.example";
    let callee = uas("127.0.42.20", 5090, "u1", 4, tmp.path());
    register_through_peer1(&c, 42, &users, aor, tmp.path());
    c.kill9(1);
    // Peer 1's binding stays usable: the contact is reachable directly.
    call_ok(("127.0.42.21", 5092), "127.0.42.2", &users, tmp.path());
    // The endpoint re-registers elsewhere: the binding moves to peer 3 everywhere.
    register(
        "127.0.42.20",
        "127.0.42.3",
        &users,
        5090,
        5094,
        "u1",
        tmp.path(),
    );
    wait_for(5, "erin's binding moved to peer 3", || {
        binding_owner(&c, 2, aor) == Some(3) && binding_owner(&c, 3, aor) == Some(3)
    });
    for (peer, port) in [("127.0.42.2", 5095), ("127.0.42.3", 5096)] {
        call_ok(("127.0.42.21", port), peer, &users, tmp.path());
    }
    // Peer 1 comes back, resynchronises, drops its superseded copy, and routes too.
    c.launch(1);
    wait_for(30, "cluster formed again", || c.formed());
    wait_for(10, "peer 1 sees erin on peer 3", || {
        binding_owner(&c, 1, aor) == Some(3)
    });
    let regs = registrations(&c, 2);
    let erins = regs["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["aor"] == aor)
        .count();
    assert_eq!(erins, 1, "one binding of erin's after the move: {regs}");
    call_ok(("127.0.42.21", 5097), "127.0.42.1", &users, tmp.path());
    assert_eq!(callee.finish(10).0, 4);
}

#[test]
fn the_call_limit_holds_for_the_cluster_when_calls_arrive_on_every_peer_at_once() {
    let c = sip_cluster(43, 3);
    set(&c, 2, "limits.calls.max", "2");
    // Until a holder is elected each peer admits only its share (2 / 3 peers: none).
    wait_for(10, "a lease holder", || admission_holder(&c, 1).is_some());
    let tmp = tempfile::tempdir().unwrap();
    let users = csv(tmp.path(), "frank.csv", &["frank"]);
    let callee = uas("127.0.43.20", 5090, "u1", 3, tmp.path());
    register_through_peer1(&c, 43, &users, "sip:frank@test.example", tmp.path());
    // Six calls at once, two through each peer, each held for 3 s.
    let callers: Vec<Sipp> = (1..=3)
        .map(|k| {
            call(
                ("127.0.43.21", 5100 + k as u16),
                &format!("127.0.43.{k}"),
                &users,
                "u1",
                2,
                3000,
                tmp.path(),
            )
        })
        .collect();
    wait_for(5, "two calls up", || {
        c.xstatus(3, "calls").is_some_and(|s| s["calls"] == 2)
    });
    std::thread::sleep(Duration::from_millis(1000));
    let during = c.xstatus(2, "calls").unwrap();
    assert_eq!(
        during["calls"],
        2,
        "{during}\n{}\n{}\n{}\n{}",
        sipp_logs(tmp.path(), "errors"),
        c.log(1),
        c.log(2),
        c.log(3)
    );
    let (mut ok, mut failed) = (0, 0);
    for caller in callers {
        let (o, f) = caller.finish(40);
        ok += o;
        failed += f;
    }
    assert_eq!((ok, failed), (2, 4), "{}", sipp_logs(tmp.path(), "errors"));
    assert!(sipp_logs(tmp.path(), "errors").contains("503 Service Unavailable"));
    wait_for(5, "the calls ended", || {
        c.xstatus(1, "calls").is_some_and(|s| s["calls"] == 0)
    });
    // Room again: a new call goes through.
    call_ok(("127.0.43.21", 5110), "127.0.43.3", &users, tmp.path());
    assert_eq!(callee.finish(10).0, 3);
}

/// The peer holding the `calls` lease as peer `k` sees it.
fn admission_holder(c: &TestCluster, k: usize) -> Option<u64> {
    let status = c.xstatus(k, "cluster")?;
    let lease = status["leases"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == "calls")?
        .clone();
    lease["holder"].as_u64()
}

/// The decider is the holder of a lease, not the configuration primary: with Peer 1 (the
/// primary) killed, Peers 2 and 3 are a majority, one of them holds the lease, and calls
/// through both are admitted up to the whole limit (3), not each peer's share (1), and
/// refused past it.
#[test]
fn kill_9_of_the_configuration_primary_leaves_the_survivors_admitting_up_to_the_limit() {
    let mut c = sip_cluster(48, 3);
    set(&c, 1, "limits.calls.max", "3");
    let tmp = tempfile::tempdir().unwrap();
    let users = csv(tmp.path(), "gina.csv", &["gina"]);
    let aor = "sip:gina@test.example";
    let callee = uas("127.0.48.20", 5090, "u1", 3, tmp.path());
    register(
        "127.0.48.20",
        "127.0.48.2",
        &users,
        5090,
        5091,
        "u1",
        tmp.path(),
    );
    wait_for(5, "gina's binding on peer 3", || {
        binding_owner(&c, 3, aor) == Some(2)
    });
    wait_for(10, "a lease holder", || admission_holder(&c, 2).is_some());
    // The node's metrics and SIP's on one /metrics.
    let m = metrics(&c, 2);
    for line in [
        "causeway_mesh_peer_up{peer=\"1\"} 1",
        "causeway_consensus_lease_held{group=\"calls\"}",
        "causeway_replication_commits_total ",
        "causeway_sip_bindings 1",
    ] {
        assert!(m.contains(line), "{line} in /metrics:\n{m}");
    }
    let services = c.xstatus(2, "services").expect("xstatus services");
    assert_eq!(services["sip"]["bindings"], 1, "{services}");
    c.kill9(1);
    wait_for(5, "the survivors agree on a holder among them", || {
        let (h2, h3) = (admission_holder(&c, 2), admission_holder(&c, 3));
        h2.is_some() && h2 == h3 && h2 != Some(1)
    });
    wait_for(5, "Peer 1 shown down", || {
        metrics(&c, 2).contains("causeway_mesh_peer_up{peer=\"1\"} 0")
    });
    // Four calls at once, two through each survivor, each held for 4 s.
    let callers: Vec<Sipp> = (2..=3)
        .map(|k| {
            call(
                ("127.0.48.21", 5100 + k as u16),
                &format!("127.0.48.{k}"),
                &users,
                "u1",
                2,
                4000,
                tmp.path(),
            )
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for caller in callers {
        let (o, f) = caller.finish(40);
        ok += o;
        failed += f;
    }
    assert_eq!(
        (ok, failed),
        (3, 1),
        "{}\n{}\n{}",
        sipp_logs(tmp.path(), "errors"),
        c.log(2),
        c.log(3)
    );
    assert!(sipp_logs(tmp.path(), "errors").contains("503 Service Unavailable"));
    assert_eq!(callee.finish(10).0, 3);
}

/// Sends `msg` over UDP to `to` and returns the first line of the answer, if any.
fn udp_exchange(sock: &UdpSocket, to: SocketAddr, msg: &[u8]) -> Option<String> {
    sock.send_to(msg, to).unwrap();
    let mut buf = [0u8; 65_536];
    let n = sock.recv(&mut buf).ok()?;
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .map(str::to_string)
}

#[test]
fn malformed_sip_on_every_port_gets_an_error_or_is_dropped_and_the_service_keeps_working() {
    let c = sip_cluster(44, 2);
    let peer: SocketAddr = "127.0.44.1:5060".parse().unwrap();
    let sock = UdpSocket::bind("127.0.44.30:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let head = "Via: SIP/2.0/UDP 127.0.44.30:9;branch=z9hG4bKt\r\nFrom: <sip:t@test.example>;tag=1\r\nTo: <sip:u@test.example>\r\nCall-ID: torture\r\nCSeq: 1 OPTIONS\r\n";
    let answers = [
        (format!("OPTIONS sip:test.example SIP/7.0\r\n{head}\r\n"), Some("SIP/2.0 505")),
        (format!("OPTIONS sip:test.example SIP/2.0\r\n{head}Max-Forwards: lots\r\n\r\n"), Some("SIP/2.0 400 Bad Request (Max-Forwards")),
        (format!("OPTIONS sip:test.example SIP/2.0\r\n{head}Content-Length: 500\r\n\r\nshort"), Some("SIP/2.0 400 Bad Request (Content-Length")),
        (format!("OPTIONS sip:test.example SIP/2.0\r\n{head}X-Long: {}\r\n\r\n", "a".repeat(9_000)), Some("SIP/2.0 400 Bad Request (header line")),
        (format!("OPTIONS sip:test.example SIP/2.0\r\n{}\r\n\r\n", head.replace("Call-ID: torture\r\n", "")), None),
        ("\u{0}\u{1}\u{2}garbage that is not SIP at all".to_string(), None),
        (format!("SIP/2.0 200 OK\r\n{head}\r\n"), None),
        (format!("OPTIONS sip:test.example SIP/2.0\r\n{head}Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"), Some("SIP/2.0 200 OK")),
    ];
    for (msg, expected) in &answers {
        let got = udp_exchange(&sock, peer, msg.as_bytes());
        match expected {
            Some(prefix) => assert!(
                got.as_deref().is_some_and(|g| g.starts_with(prefix)),
                "{msg:?}: expected {prefix}, got {got:?}"
            ),
            None => assert_eq!(got, None, "{msg:?} was answered"),
        }
    }
    // A bounded flood of garbage from one source: dropped, counted, nothing breaks.
    let started = Instant::now();
    for i in 0..20_000u32 {
        let _ = sock.send_to(&i.to_le_bytes().repeat(50), peer);
        if started.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    // TCP: garbage, an endless header section, a message cut short; TLS: plain text.
    for (port, payload) in [
        (5060u16, b"\x16\x03\x01garbage\r\n\r\n".to_vec()),
        (
            5060,
            format!("OPTIONS sip:x SIP/2.0\r\nX: {}", "b".repeat(70_000)).into_bytes(),
        ),
        (
            5060,
            format!("OPTIONS sip:test.example SIP/2.0\r\n{head}\r\n").into_bytes(),
        ),
        (5061, b"OPTIONS sip:test.example SIP/2.0\r\n\r\n".to_vec()),
    ] {
        let mut s = TcpStream::connect(("127.0.44.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let _ = s.write_all(&payload);
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        let text = String::from_utf8_lossy(&reply);
        // Nothing, a 4xx naming the problem, or (TLS) an alert record: then closed.
        let alert = port == 5061 && reply.first() == Some(&0x15);
        assert!(
            text.is_empty() || text.starts_with("SIP/2.0 4") || alert,
            "port {port}: {text}"
        );
    }
    // The peer is still serving: OPTIONS answered, a registration works on both peers.
    assert_eq!(
        udp_exchange(&sock, peer, answers[7].0.as_bytes()).as_deref(),
        Some("SIP/2.0 200 OK")
    );
    let tmp = tempfile::tempdir().unwrap();
    let users = csv(tmp.path(), "gina.csv", &["gina"]);
    register_through_peer1(&c, 44, &users, "sip:gina@test.example", tmp.path());
    let metrics = c.xstatus(1, "registrations").unwrap();
    assert_eq!(metrics["bindings"], 1);
}

fn licence_pool(c: &TestCluster, k: usize) -> Option<u64> {
    c.xstatus(k, "registrations")?["licences"].as_u64()
}

#[test]
fn licences_pool_across_peers_and_a_lost_peers_licences_leave_the_pool_after_the_grace_period() {
    let mut c = TestCluster::start(45, 3, "Enforce", |_, config, _, _| {
        config.push_str("\n[sip]\n\n[licences]\nroom_systems = 1\ngrace_period_s = 3\n");
    });
    wait_for(30, "cluster formed", || c.formed());
    set(&c, 1, "sip.domains", "test.example");
    wait_for(5, "three registration licences pooled", || {
        licence_pool(&c, 2) == Some(3)
    });
    let tmp = tempfile::tempdir().unwrap();
    let users = csv(tmp.path(), "three.csv", &["u1", "u2", "u3"]);
    register(
        "127.0.45.20",
        "127.0.45.1",
        &users,
        5090,
        5091,
        "u1",
        tmp.path(),
    );
    // A fourth AOR finds no licence free, on any peer.
    let sock = UdpSocket::bind("127.0.45.30:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let fourth = |peer: &str| {
        let msg = format!("REGISTER sip:test.example SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.45.30:9;branch=z9hG4bK4{peer}\r\nMax-Forwards: 70\r\nFrom: <sip:u4@test.example>;tag=4\r\nTo: <sip:u4@test.example>\r\nCall-ID: u4-{peer}\r\nCSeq: 1 REGISTER\r\nContact: <sip:u4@127.0.45.30:9>\r\nContent-Length: 0\r\n\r\n");
        udp_exchange(
            &sock,
            format!("{peer}:5060").parse().unwrap(),
            msg.as_bytes(),
        )
    };
    wait_for(5, "u1…u3 seen by peer 3", || {
        c.xstatus(3, "registrations")
            .is_some_and(|r| r["aors"] == 3)
    });
    for peer in ["127.0.45.1", "127.0.45.3"] {
        let answer = fourth(peer).unwrap_or_default();
        assert!(answer.starts_with("SIP/2.0 503"), "{peer}: {answer}");
    }
    // Peer 3 is lost: its licence stays in the pool for the grace period (30014), then
    // leaves it (30017); when it is back, both alarms clear.
    c.kill9(3);
    wait_for(5, "30014 on peer 1 for peer 3", || {
        c.alarm_raised(1, 30014, "127.0.45.3")
    });
    assert_eq!(licence_pool(&c, 1), Some(3));
    wait_for(10, "30017 once the grace period is over", || {
        c.alarm_raised(1, 30017, "127.0.45.3") && !c.alarm_raised(1, 30014, "127.0.45.3")
    });
    assert_eq!(licence_pool(&c, 1), Some(2));
    // Peer 2 counts on its own once-a-second refresh: it may see it a moment later.
    wait_for(3, "30017 on peer 2 too", || {
        c.alarm_raised(2, 30017, "127.0.45.3")
    });
    // Peer 1 restarts while peer 3 is still lost: the grace does not start over (the
    // peers recorded when they first saw peer 3 go), so 30014 never comes back.
    c.kill9(1);
    c.launch(1);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        assert!(
            !c.alarm_raised(1, 30014, "127.0.45.3"),
            "the restarted peer 1 started peer 3's grace over"
        );
        if c.alarm_raised(1, 30017, "127.0.45.3") && licence_pool(&c, 1) == Some(2) {
            break;
        }
        assert!(Instant::now() < deadline, "peer 1 never showed 30017 again");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Long enough for a grace that had started over to be seen.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!c.alarm_raised(1, 30014, "127.0.45.3"));
    c.launch(3);
    wait_for(30, "cluster formed again", || c.formed());
    wait_for(5, "the licence back in the pool, alarms cleared", || {
        licence_pool(&c, 1) == Some(3)
            && !c.alarm_raised(1, 30017, "127.0.45.3")
            && !c.alarm_raised(2, 30017, "127.0.45.3")
    });
}

fn md5_hex(text: &str) -> String {
    use md5::Digest as _;
    md5::Md5::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `name="value"` out of a WWW-Authenticate line.
fn digest_param(answer: &str, name: &str) -> String {
    let start = answer.find(&format!("{name}=\"")).expect(name) + name.len() + 2;
    answer[start..].split('"').next().unwrap().to_string()
}

/// RFC 7616 §3.4.5: a captured Authorization header, replayed from another address with
/// another Call-ID and Contact (to bind the attacker's contact, or to remove every binding
/// with `Contact: *`), is challenged again; the client's own retransmission is answered.
#[test]
fn a_captured_authorization_is_not_accepted_again_in_another_request() {
    let c = sip_cluster(49, 2);
    set(&c, 1, "sip.users.dave", "Pa55word!");
    let peer: SocketAddr = "127.0.49.1:5060".parse().unwrap();
    let open = |ip: &str| {
        let s = UdpSocket::bind((ip, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s
    };
    let (victim, attacker) = (open("127.0.49.20"), open("127.0.49.21"));
    // As a UDP client does: the same bytes again when no answer comes (a retransmission,
    // which the peer answers again).
    let exchange = |sock: &UdpSocket, msg: &str| -> String {
        let mut buf = [0u8; 65_536];
        for _ in 0..5 {
            sock.send_to(msg.as_bytes(), peer).unwrap();
            if let Ok(n) = sock.recv(&mut buf) {
                return String::from_utf8_lossy(&buf[..n]).to_string();
            }
        }
        panic!("no answer to five sends");
    };
    let register = |sock: &UdpSocket, call: &str, cseq: u32, contact: &str, extra: &str| {
        let me = sock.local_addr().unwrap();
        format!(
            "REGISTER sip:test.example SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-{call}-{cseq}\r\nFrom: <sip:dave@test.example>;tag={call}\r\nTo: <sip:dave@test.example>\r\nCall-ID: {call}\r\nCSeq: {cseq} REGISTER\r\nContact: {contact}\r\nExpires: 300\r\n{extra}Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
    };
    let victim_contact = format!("<sip:dave@{}>", victim.local_addr().unwrap());
    let first = exchange(&victim, &register(&victim, "v1", 1, &victim_contact, ""));
    assert!(first.starts_with("SIP/2.0 401"), "{first}");
    let (realm, nonce) = (digest_param(&first, "realm"), digest_param(&first, "nonce"));
    let ha1 = md5_hex(&format!("dave:{realm}:Pa55word!"));
    let ha2 = md5_hex("REGISTER:sip:test.example");
    let response = md5_hex(&format!("{ha1}:{nonce}:00000001:c0ffee:auth:{ha2}"));
    let authorization = format!(
        "Authorization: Digest username=\"dave\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"sip:test.example\", qop=auth, nc=00000001, cnonce=\"c0ffee\", response=\"{response}\", algorithm=MD5\r\n"
    );
    let signed = register(&victim, "v1", 2, &victim_contact, &authorization);
    let ok = exchange(&victim, &signed);
    assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
    let again = exchange(&victim, &signed);
    assert!(
        again.starts_with("SIP/2.0 200"),
        "a retransmission: {again}"
    );
    // The attacker's replays: its own contact, then every binding removed.
    let evil = format!("<sip:dave@{}>", attacker.local_addr().unwrap());
    let bind = exchange(
        &attacker,
        &register(&attacker, "a1", 2, &evil, &authorization),
    );
    assert!(bind.starts_with("SIP/2.0 401"), "replayed to bind: {bind}");
    let wipe =
        register(&attacker, "a2", 2, "*", &authorization).replace("Expires: 300", "Expires: 0");
    let wiped = exchange(&attacker, &wipe);
    assert!(
        wiped.starts_with("SIP/2.0 401"),
        "replayed to remove: {wiped}"
    );
    let regs = registrations(&c, 1);
    let daves: Vec<_> = regs["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["aor"] == "sip:dave@test.example")
        .collect();
    assert_eq!(daves.len(), 1, "only the victim's binding: {regs}");
    assert!(
        daves[0]
            .to_string()
            .contains(&victim.local_addr().unwrap().to_string()),
        "{regs}"
    );
}

/// A response that answers no transaction of the peer's (a stray, forged to name the peer
/// in its top Via and a victim in the next) is dropped, not relayed: the peer is no UDP
/// reflector.
#[test]
fn a_stray_response_is_not_relayed_to_its_second_via() {
    let _c = sip_cluster(51, 2);
    let attacker = UdpSocket::bind("127.0.51.21:0").unwrap();
    let victim = UdpSocket::bind("127.0.51.22:0").unwrap();
    victim
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let v = victim.local_addr().unwrap();
    for (i, status) in ["200 OK", "180 Ringing", "486 Busy Here"]
        .iter()
        .enumerate()
    {
        let stray = format!(
            "SIP/2.0 {status}\r\nVia: SIP/2.0/UDP 127.0.51.1:5060;branch=z9hG4bKstray{i}\r\nVia: SIP/2.0/UDP {v};branch=z9hG4bKvictim{i}\r\nFrom: <sip:a@test.example>;tag=1\r\nTo: <sip:b@test.example>;tag=2\r\nCall-ID: stray-{i}\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
        );
        attacker
            .send_to(stray.as_bytes(), "127.0.51.1:5060")
            .unwrap();
    }
    let mut buf = [0u8; 65_536];
    let relayed = victim.recv(&mut buf);
    assert!(
        relayed.is_err(),
        "relayed to the victim: {}",
        String::from_utf8_lossy(&buf[..relayed.unwrap_or(0)])
    );
}

/// Password guessing (svcrack's way: REGISTER, challenge, a guess) is logged, slowed and
/// then refused for the guessing address, with alarm 40001; the real user, from another
/// address, registers all the while.
#[test]
fn password_guesses_are_throttled_and_blocked_while_the_real_user_registers_elsewhere() {
    let c = sip_cluster(52, 2);
    set(&c, 1, "sip.users.erin", "Right-Pa55");
    set(&c, 1, "sip.authentication.slow_after", "3");
    set(&c, 1, "sip.authentication.block_after", "6");
    let peer: SocketAddr = "127.0.52.1:5060".parse().unwrap();
    let open = |ip: &str| {
        let s = UdpSocket::bind((ip, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
        s
    };
    let exchange = |sock: &UdpSocket, msg: &str| -> String {
        sock.send_to(msg.as_bytes(), peer).unwrap();
        let mut buf = [0u8; 65_536];
        let n = sock.recv(&mut buf).expect("an answer");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    // One REGISTER round: challenge, then the answer computed with `password`.
    let attempt = |sock: &UdpSocket, n: u32, password: &str| -> String {
        let me = sock.local_addr().unwrap();
        let msg = |cseq: u32, extra: &str| {
            format!("REGISTER sip:test.example SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-g{n}-{cseq}\r\nFrom: <sip:erin@test.example>;tag=g{n}\r\nTo: <sip:erin@test.example>\r\nCall-ID: guess-{me}-{n}\r\nCSeq: {cseq} REGISTER\r\nContact: <sip:erin@{me}>\r\nExpires: 300\r\n{extra}Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
        };
        let first = exchange(sock, &msg(1, ""));
        if !first.starts_with("SIP/2.0 401") {
            return first;
        }
        let (realm, nonce) = (digest_param(&first, "realm"), digest_param(&first, "nonce"));
        let ha1 = md5_hex(&format!("erin:{realm}:{password}"));
        let ha2 = md5_hex("REGISTER:sip:test.example");
        let response = md5_hex(&format!("{ha1}:{nonce}:00000001:beef:auth:{ha2}"));
        let auth = format!("Authorization: Digest username=\"erin\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"sip:test.example\", qop=auth, nc=00000001, cnonce=\"beef\", response=\"{response}\", algorithm=MD5\r\n");
        exchange(sock, &msg(2, &auth))
    };
    let (guesser, erin) = (open("127.0.52.21"), open("127.0.52.20"));
    let mut answers = Vec::new();
    for n in 0..8 {
        let started = std::time::Instant::now();
        let answer = attempt(&guesser, n, &format!("guess{n}"));
        answers.push((
            answer.lines().next().unwrap_or("").to_string(),
            started.elapsed(),
        ));
    }
    // Guesses 1-6 are wrong passwords, the 4th on answered late, then refused unchecked.
    assert!(
        answers[..6]
            .iter()
            .all(|(a, _)| a.starts_with("SIP/2.0 403 Forbidden (unknown user or wrong password)")),
        "{answers:?}"
    );
    assert!(
        answers[4].1 >= Duration::from_millis(400),
        "slowed: {answers:?}"
    );
    assert!(
        answers[6..]
            .iter()
            .all(|(a, _)| a.contains("too many failed authentications")),
        "{answers:?}"
    );
    // The right password from the guessing address is refused too (nothing is revealed) ...
    assert!(attempt(&guesser, 99, "Right-Pa55").contains("too many failed authentications"));
    // ... while erin, elsewhere, registers.
    let ok = attempt(&erin, 0, "Right-Pa55");
    assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
    assert!(c.alarm_raised(1, 40001, "source 127.0.52.21"));
    let log = c.log(1);
    assert!(
        log.contains("Authentication Failed")
            && log.contains("127.0.52.21")
            && log.contains("erin"),
        "{log}"
    );
}

/// One address holding hundreds of silent connections (TLS ClientHello never sent, TCP
/// never a message) closes the TLS port for nobody else: handshakes are capped per source
/// and time out, and a connection that never speaks is closed after its first-message
/// time, not after the two-hour idle time.
#[test]
fn one_address_holding_silent_connections_does_not_close_sip_tls_for_others() {
    let c = sip_cluster(53, 2);
    let silent: Vec<TcpStream> = (0..300)
        .map(|_| tcp_from("127.0.53.21", "127.0.53.1:5061"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // A normal TLS client from another address is served at once.
    let options = "OPTIONS sip:127.0.53.1 SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.53.20:5999;branch=z9hG4bKtlsflood\r\nFrom: <sip:probe@test.example>;tag=1\r\nTo: <sip:127.0.53.1>\r\nCall-ID: tls-flood\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n";
    let tcp = tcp_from("127.0.53.20", "127.0.53.1:5061");
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = tls_over(&c, tcp, "127.0.53.1");
    tls.write_all(options.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let answer = read_message(&mut tls, &mut buf);
    assert_eq!(
        answer.status(),
        Some(200),
        "a TLS client from elsewhere is served"
    );
    // Plain TCP connections that never send a message are closed by the peer.
    let idle: Vec<TcpStream> = (0..20)
        .map(|_| tcp_from("127.0.53.22", "127.0.53.1:5060"))
        .collect();
    for s in idle.iter().chain(silent.iter().take(20)) {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    }
    let started = Instant::now();
    for mut s in idle.into_iter().chain(silent.into_iter().take(20)) {
        let mut one = [0u8; 1];
        // EOF (0) or a reset: closed by the peer, not by our timeout.
        match s.read(&mut one) {
            Ok(0) | Err(_) if started.elapsed() < Duration::from_secs(29) => {}
            other => panic!("still open after {:?}: {other:?}", started.elapsed()),
        }
    }
}

/// RFC 3581 and §18.2.1: a client behind a NAT (its Via names a private address and asks
/// for `rport`) is answered, and the answer's Via says where it really came from.
#[test]
fn a_request_from_behind_a_nat_gets_received_and_rport_in_its_answer() {
    let _c = sip_cluster(57, 2);
    let sock = UdpSocket::bind("127.0.57.20:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let port = sock.local_addr().unwrap().port();
    let options = "OPTIONS sip:127.0.57.1 SIP/2.0\r\nVia: SIP/2.0/UDP 10.1.2.3:5060;branch=z9hG4bKnat1;rport\r\nFrom: <sip:nat@test.example>;tag=1\r\nTo: <sip:127.0.57.1>\r\nCall-ID: nat-1\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n";
    sock.send_to(options.as_bytes(), "127.0.57.1:5060").unwrap();
    let mut buf = [0u8; 65_536];
    let n = sock.recv(&mut buf).expect("an answer at the real source");
    let answer = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(answer.starts_with("SIP/2.0 200"), "{answer}");
    let via = answer
        .lines()
        .find(|l| l.starts_with("Via:"))
        .unwrap_or_default()
        .to_string();
    assert!(
        via.contains(&format!("rport={port}")) && via.contains("received=127.0.57.20"),
        "{via}"
    );
}

/// RFC 5626: two flows of one phone (same +sip.instance, reg-id 1 and 2) are ways to one
/// device, not two devices: an INVITE reaches the phone once, on its newest flow; the
/// 200 OK to an outbound REGISTER carries `Require: outbound`.
#[test]
fn an_invite_reaches_a_phone_with_two_flows_once() {
    let _c = sip_cluster(58, 2);
    let peer = "127.0.58.1:5060";
    let open = || {
        let s = UdpSocket::bind("127.0.58.20:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        s
    };
    let (flow1, flow2, caller) = (open(), open(), open());
    for (sock, reg_id) in [(&flow1, 1), (&flow2, 2)] {
        let me = sock.local_addr().unwrap();
        let register = format!("REGISTER sip:test.example SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-flow{reg_id}\r\nFrom: <sip:fay@test.example>;tag=f{reg_id}\r\nTo: <sip:fay@test.example>\r\nCall-ID: flows-{reg_id}\r\nCSeq: 1 REGISTER\r\nSupported: outbound, path\r\nContact: <sip:fay@{me};ob>;+sip.instance=\"<urn:uuid:00000000-0000-1000-8000-000a95a0e128>\";reg-id={reg_id}\r\nExpires: 300\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n");
        sock.send_to(register.as_bytes(), peer).unwrap();
        let mut buf = [0u8; 65_536];
        let n = sock.recv(&mut buf).expect("an answer to the REGISTER");
        let answer = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(answer.starts_with("SIP/2.0 200"), "{answer}");
        assert!(answer.contains("Require: outbound"), "{answer}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let me = caller.local_addr().unwrap();
    let invite = format!("INVITE sip:fay@test.example SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-inv-flows\r\nFrom: <sip:gus@test.example>;tag=g1\r\nTo: <sip:fay@test.example>\r\nCall-ID: flows-invite\r\nCSeq: 1 INVITE\r\nContact: <sip:gus@{me}>\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n");
    caller.send_to(invite.as_bytes(), peer).unwrap();
    let got = |sock: &UdpSocket| {
        let mut buf = [0u8; 65_536];
        let mut invites = 0;
        while let Ok(n) = sock.recv(&mut buf) {
            if buf[..n].starts_with(b"INVITE ") {
                invites += 1;
            }
        }
        invites
    };
    let (on1, on2) = (got(&flow1), got(&flow2));
    assert_eq!(on1, 0, "the older flow gets no copy");
    assert!(on2 >= 1, "the newest flow carries the INVITE");
}

/// The authentication policy (`sip.authentication.policy`): under `Check credentials` an
/// INVITE from outside is challenged (407) before anything is looked up, whoever it is for;
/// under `Do not check credentials` an unknown user and a known one with no binding are
/// answered alike (480), so a scanner cannot list the users.
#[test]
fn the_authentication_policy_challenges_invites_and_hides_which_users_exist() {
    let c = sip_cluster(59, 2);
    set(&c, 1, "sip.users.hal", "Pod-Bay-Doors");
    let peer = "127.0.59.1:5060";
    let sock = UdpSocket::bind("127.0.59.20:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let me = sock.local_addr().unwrap();
    let mut n = 0;
    let mut invite = |to: &str, extra: &str| -> String {
        n += 1;
        let msg = format!("INVITE sip:{to}@test.example SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-pol{n}\r\nFrom: <sip:hal@test.example>;tag=p{n}\r\nTo: <sip:{to}@test.example>\r\nCall-ID: policy-{n}\r\nCSeq: 1 INVITE\r\nContact: <sip:hal@{me}>\r\n{extra}Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n");
        sock.send_to(msg.as_bytes(), peer).unwrap();
        let mut buf = [0u8; 65_536];
        loop {
            let k = sock.recv(&mut buf).expect("an answer");
            let text = String::from_utf8_lossy(&buf[..k]).to_string();
            if !text.starts_with("SIP/2.0 100") {
                return text;
            }
        }
    };
    let first = |t: &str| t.lines().next().unwrap_or("").to_string();
    // Not checked (the default): unknown and unregistered look alike.
    assert!(first(&invite("nobody", "")).starts_with("SIP/2.0 480"));
    assert!(first(&invite("hal", "")).starts_with("SIP/2.0 480"));
    set(&c, 1, "sip.authentication.policy", "Check credentials");
    std::thread::sleep(Duration::from_millis(200));
    let challenge = invite("nobody", "");
    assert!(challenge.starts_with("SIP/2.0 407"), "{challenge}");
    assert!(
        challenge.contains("Proxy-Authenticate: Digest"),
        "{challenge}"
    );
    let (realm, nonce) = (
        digest_param(&challenge, "realm"),
        digest_param(&challenge, "nonce"),
    );
    let ha1 = md5_hex(&format!("hal:{realm}:Pod-Bay-Doors"));
    let ha2 = md5_hex("INVITE:sip:nobody@test.example");
    let response = md5_hex(&format!("{ha1}:{nonce}:00000001:d00d:auth:{ha2}"));
    let credentials = format!("Proxy-Authorization: Digest username=\"hal\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"sip:nobody@test.example\", qop=auth, nc=00000001, cnonce=\"d00d\", response=\"{response}\", algorithm=MD5\r\n");
    let authenticated = invite("nobody", &credentials);
    assert!(
        first(&authenticated).starts_with("SIP/2.0 404"),
        "{authenticated}"
    );
    let wrong = invite("nobody", &credentials.replace(&response, &md5_hex("wrong")));
    assert!(first(&wrong).starts_with("SIP/2.0 403"), "{wrong}");
}

/// The policy is set per neighbour zone, as on Expressway: requests from a zone's address
/// follow its policy, every other source the Default Zone's (`sip.authentication.policy`).
#[test]
fn each_zone_has_its_own_authentication_policy_and_other_sources_the_default_zones() {
    let c = sip_cluster(63, 2);
    set(&c, 1, "sip.users.hal", "Pod-Bay-Doors");
    let peer = "127.0.63.1:5060";
    let neighbour = UdpSocket::bind("127.0.63.20:0").unwrap();
    let stranger = UdpSocket::bind("127.0.63.30:0").unwrap();
    let mut n = 0;
    let mut invite = |sock: &UdpSocket| -> String {
        n += 1;
        let me = sock.local_addr().unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let msg = format!("INVITE sip:nobody@test.example SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-zone{n}\r\nFrom: <sip:hal@test.example>;tag=z{n}\r\nTo: <sip:nobody@test.example>\r\nCall-ID: zone-{n}\r\nCSeq: 1 INVITE\r\nContact: <sip:hal@{me}>\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n");
        let mut buf = [0u8; 65_536];
        // UDP: send again (same bytes) if an answer is lost under load.
        for _ in 0..3 {
            sock.send_to(msg.as_bytes(), peer).unwrap();
            while let Ok(k) = sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..k]).to_string();
                if !text.starts_with("SIP/2.0 100") {
                    return text.lines().next().unwrap_or("").to_string();
                }
            }
        }
        panic!("no answer to INVITE {n}");
    };
    // The neighbour zone checks credentials; the Default Zone does not (the default).
    set(&c, 1, "zones.neighbour.address", "127.0.63.20:5060");
    set(&c, 1, "zones.neighbour.authentication_policy", "check");
    std::thread::sleep(Duration::from_millis(200));
    let zone = invite(&neighbour);
    assert!(zone.starts_with("SIP/2.0 407"), "from the zone: {zone}");
    let other = invite(&stranger);
    assert!(other.starts_with("SIP/2.0 480"), "from elsewhere: {other}");
    // The other way round: the Default Zone checks, the zone is treated as authenticated
    // (so it is told 404 for a user that does not exist).
    set(&c, 1, "sip.authentication.policy", "Check credentials");
    set(
        &c,
        1,
        "zones.neighbour.authentication_policy",
        "Treat as authenticated",
    );
    std::thread::sleep(Duration::from_millis(200));
    let zone = invite(&neighbour);
    assert!(zone.starts_with("SIP/2.0 404"), "from the zone: {zone}");
    let other = invite(&stranger);
    assert!(other.starts_with("SIP/2.0 407"), "from elsewhere: {other}");
    // The zone's own policy removed: it follows the Default Zone again.
    let out = Command::new(env!("CARGO_BIN_EXE_causeway"))
        .arg("--node")
        .arg(&c.peers[0].dir)
        .args([
            "xconfiguration",
            "unset",
            "zones.neighbour.authentication_policy",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(200));
    let zone = invite(&neighbour);
    assert!(
        zone.starts_with("SIP/2.0 407"),
        "from the zone, no policy of its own: {zone}"
    );
}

/// A SIP client at a peer's address (or one forging it) is an ordinary client: requests
/// relayed between peers carry a mark only the peers can make, so a request from Peer 2's
/// address without it is not relayed outside the cluster (no open relay, no toll fraud).
#[test]
fn a_request_from_a_peers_address_without_the_peers_mark_is_not_relayed() {
    let _c = sip_cluster(60, 2);
    let outside = UdpSocket::bind("127.0.60.30:0").unwrap();
    outside
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let target = outside.local_addr().unwrap();
    // Bound to Peer 2's own address, on another port.
    let forger = UdpSocket::bind("127.0.60.2:0").unwrap();
    forger
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let me = forger.local_addr().unwrap();
    let invite = format!("INVITE sip:victim@{target} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-forged1\r\nRoute: <sip:127.0.60.1:5060;lr>\r\nFrom: <sip:fraud@test.example>;tag=f1\r\nTo: <sip:victim@{target}>\r\nCall-ID: forged-relay\r\nCSeq: 1 INVITE\r\nContact: <sip:fraud@{me}>\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n");
    forger
        .send_to(invite.as_bytes(), "127.0.60.1:5060")
        .unwrap();
    let mut buf = [0u8; 65_536];
    let n = forger.recv(&mut buf).expect("an answer");
    let answer = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(answer.starts_with("SIP/2.0 403"), "{answer}");
    assert!(
        outside.recv(&mut buf).is_err(),
        "relayed outside the cluster"
    );
}

/// RFC 4475's `bext01` and an unknown method, to the system itself: an extension it is
/// required to know and does not is answered 420 with Unsupported; a method it does not
/// know, 501 (never a false 403).
#[test]
fn a_required_extension_and_an_unknown_method_to_the_system_get_their_rfc_answers() {
    let _c = sip_cluster(61, 2);
    let sock = UdpSocket::bind("127.0.61.20:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let me = sock.local_addr().unwrap();
    let ask = |text: String| -> String {
        sock.send_to(text.as_bytes(), "127.0.61.1:5060").unwrap();
        let mut buf = [0u8; 65_536];
        let n = sock.recv(&mut buf).expect("an answer");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let bext = ask(format!("OPTIONS sip:127.0.61.1 SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-bext01\r\nFrom: <sip:t@test.example>;tag=1\r\nTo: <sip:127.0.61.1>\r\nCall-ID: bext01\r\nCSeq: 8 OPTIONS\r\nRequire: newfeature1, newfeature2\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"));
    assert!(bext.starts_with("SIP/2.0 420"), "{bext}");
    assert!(
        bext.contains("Unsupported: newfeature1, newfeature2"),
        "{bext}"
    );
    let known = ask(format!("OPTIONS sip:127.0.61.1 SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-req-ok\r\nFrom: <sip:t@test.example>;tag=1\r\nTo: <sip:127.0.61.1>\r\nCall-ID: req-ok\r\nCSeq: 9 OPTIONS\r\nRequire: path, outbound\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"));
    assert!(known.starts_with("SIP/2.0 200"), "{known}");
    let unknown = ask(format!("NEWMETHOD sip:test.example SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-newmethod\r\nFrom: <sip:t@test.example>;tag=1\r\nTo: <sip:test.example>\r\nCall-ID: newmethod\r\nCSeq: 1 NEWMETHOD\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"));
    assert!(unknown.starts_with("SIP/2.0 501"), "{unknown}");
}

/// `xstatus zones --json` of peer `k`: (zone up, [(address, up)]) of zone `name`.
fn zone_state(c: &TestCluster, k: usize, name: &str) -> Option<(bool, Vec<(String, bool)>)> {
    let s = c.xstatus(k, "zones")?;
    let z = s["zones"]
        .as_array()?
        .iter()
        .find(|z| z["name"] == name)?
        .clone();
    let addresses = z["addresses"]
        .as_array()?
        .iter()
        .map(|a| {
            (
                a["address"].as_str().unwrap_or("").to_string(),
                a["up"] == true,
            )
        })
        .collect();
    Some((z["up"] == true, addresses))
}

/// A SIPp UAS stands for a neighbour system (a call manager) on the second address of zone
/// `trunk`; nothing answers on the first. A rule sends `+44…` there: a call reaches it
/// through whichever peer the caller used, over the address that answers its keep-alive;
/// with the neighbour gone, every peer shows the zone down and a call gets 503.
#[test]
fn a_call_by_search_rule_reaches_the_neighbour_through_any_peer_and_fails_clearly_when_it_is_gone()
{
    const NET: u8 = 92;
    let c = TestCluster::start(NET, 3, "Enforce", |_, config, _, _| {
        config.push_str("\n[sip]\nzone_keepalive_ms = 300\n");
    });
    wait_for(30, "cluster formed", || c.formed());
    set(&c, 1, "sip.domains", "test.example");
    let (silent, neighbour_ip) = (addr(NET, 30), addr(NET, 31));
    set(
        &c,
        2,
        "zones.trunk.address",
        &format!("{silent}:5090,{neighbour_ip}:5090"),
    );
    set(&c, 3, "routing.rules.10", "+44* trunk");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let neighbour = Sipp::start(
        dir,
        "neighbour",
        &[
            "-sf",
            &scenario("neighbour.xml"),
            "-i",
            &neighbour_ip,
            "-p",
            "5090",
            "-t",
            "u1",
        ],
    );
    let first_down_second_up = |k: usize| {
        zone_state(&c, k, "trunk").is_some_and(|(up, a)| {
            up && a
                == [
                    (format!("{silent}:5090"), false),
                    (format!("{neighbour_ip}:5090"), true),
                ]
        })
    };
    for k in 1..=3 {
        wait_for(
            15,
            "every peer to see the first address down, the second up",
            || first_down_second_up(k),
        );
    }
    let users = csv(dir, "number.csv", &["+442071234567"]);
    for (k, port) in [(2usize, 5100u16), (3, 5102)] {
        let (ok, failed) = call(
            (&addr(NET, 20), port),
            &addr(NET, k),
            &users,
            "u1",
            1,
            100,
            dir,
        )
        .finish(30);
        assert_eq!(
            (ok, failed),
            (1, 0),
            "a call through peer {k}: {}",
            sipp_logs(dir, "errors")
        );
    }
    let seen = sipp_logs(dir, "neighbour_");
    assert_eq!(
        seen.matches("INVITE sip:+442071234567@").count(),
        2,
        "both calls reached the neighbour, once each"
    );
    // Zones page and CLI say the same as the JSON.
    let (ok, text, _) = c.cli(1, &["xstatus", "zones"]);
    assert!(ok && text.contains("trunk  (UDP)  Up"), "{text}");
    assert!(text.contains("Search rules: 10 '+44* trunk'"), "{text}");

    drop(neighbour);
    for k in 1..=3 {
        wait_for(15, "every peer to see the zone down", || {
            zone_state(&c, k, "trunk").is_some_and(|(up, _)| !up)
        });
    }
    wait_for(5, "30020 for the zone with no address answering", || {
        c.alarm_raised(1, 30020, "zone trunk")
    });
    let (ok, failed) = call(
        (&addr(NET, 20), 5104),
        &addr(NET, 1),
        &users,
        "u1",
        1,
        100,
        dir,
    )
    .finish(30);
    assert_eq!((ok, failed), (0, 1));
    let errors = sipp_logs(dir, "errors");
    assert!(
        errors.contains("SIP/2.0 503 Service Unavailable (zone trunk: no address answers)"),
        "{errors}"
    );
}
