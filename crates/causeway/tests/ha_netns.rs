//! HA pairs with real processes in real network namespaces (docs/ha.md, section 13): each
//! test builds its own lab with `causeway lab ha up` (its own namespace names and its own
//! /24 of 198.18.0.0/15), probes the virtual IP from the client namespace every millisecond
//! (SIP OPTIONS over UDP), watches the address in each node's namespace with `ip monitor`,
//! and removes everything it made (`lab ha down`) when it ends, pass or fail.
//!
//! Needs root, `ip` (iproute2) and `iptables` (partitions), as `.ci/run` provides.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_causeway");

struct Lab {
    dir: tempfile::TempDir,
    prefix: String,
    subnet: String,
}

/// Node roles, their namespace suffix and host number.
const P: (&str, &str, u8) = ("primary", "p", 11);
const S: (&str, &str, u8) = ("secondary", "s", 12);
const W: (&str, &str, u8) = ("witness", "w", 13);
const P2: (&str, &str, u8) = ("primary2", "p2", 14);

type Node = (&'static str, &'static str, u8);

impl Lab {
    fn up(tag: char, net: u8, extra: &[&str]) -> Lab {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the HA tests make network namespaces: run them as root (CI does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let lab = Lab {
            prefix: format!("h{}{tag}", std::process::id() % 10_000),
            subnet: format!("198.18.{net}"),
            dir,
        };
        let out = Command::new(BIN)
            .args(["lab", "ha", "up", "--dir"])
            .arg(lab.dir.path())
            .args(["--prefix", &lab.prefix, "--subnet", &lab.subnet])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "lab ha up failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        lab
    }

    fn ns(&self, n: Node) -> String {
        format!("{}-{}", self.prefix, n.1)
    }

    fn ip(&self, n: Node) -> String {
        format!("{}.{}", self.subnet, n.2)
    }

    fn vip(&self) -> String {
        format!("{}.10", self.subnet)
    }

    fn node_dir(&self, n: Node) -> PathBuf {
        self.dir.path().join(n.0)
    }

    /// Runs a command that must succeed; its standard output.
    fn ok(&self, n: Node, args: &[&str]) -> String {
        let out = self.cli(n, args);
        assert!(
            out.status.success(),
            "{} {args:?}: {}",
            n.0,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command that must be refused; its error.
    fn refused(&self, n: Node, args: &[&str]) -> String {
        let out = self.cli(n, args);
        assert!(!out.status.success(), "{} {args:?} was not refused", n.0);
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn cli(&self, n: Node, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--node")
            .arg(self.node_dir(n))
            .args(args)
            .output()
            .unwrap()
    }

    /// The node's `ha status` for its `index`th pair.
    fn status(&self, n: Node, index: usize) -> Value {
        let out = self.cli(n, &["ha", "status", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v["pairs"][index].clone()
    }

    fn state(&self, n: Node) -> String {
        self.status(n, 0)["state"]
            .as_str()
            .unwrap_or("down")
            .to_string()
    }

    fn wait_state(&self, n: Node, want: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let now = self.state(n);
            if now == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} is {now}, not {want}, after {within:?}",
                n.0
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self, n: Node) -> i32 {
        std::fs::read_to_string(self.node_dir(n).join("causeway.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn signal(&self, n: Node, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid(n)), sig).unwrap();
    }

    /// Waits for the node's process to be gone (its PID no longer runs its config).
    fn wait_gone(&self, n: Node) {
        let pid = self.pid(n);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
            && Instant::now() < deadline
        {
            // Reap it if it was our child (restarted by this test).
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the node again in its namespace, as an operator would.
    fn restart(&self, n: Node) -> Child {
        let dir = self.node_dir(n);
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("causeway.log"))
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(n), BIN, "run", "--config"])
            .arg(dir.join("causeway.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        std::fs::write(dir.join("causeway.pid"), format!("{}\n", child.id())).unwrap();
        child
    }

    fn has_vip(&self, n: Node, vip: &str) -> bool {
        let out = Command::new("ip")
            .args(["-n", &self.ns(n), "-o", "addr", "show", "dev", "eth0"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains(&format!(" {vip}/"))
    }

    /// Drops everything between `a` and `b` (both directions), in `a`'s namespace.
    fn cut(&self, a: Node, b: Node) {
        for (chain, dir) in [("INPUT", "-s"), ("OUTPUT", "-d")] {
            let ok = Command::new("ip")
                .args(["netns", "exec", &self.ns(a), "iptables", "-A", chain, dir])
                .arg(self.ip(b))
                .args(["-j", "DROP"])
                .status()
                .unwrap()
                .success();
            assert!(ok, "iptables in {}", self.ns(a));
        }
    }

    fn heal(&self, nodes: &[Node]) {
        for &n in nodes {
            let _ = Command::new("ip")
                .args(["netns", "exec", &self.ns(n), "iptables", "-F"])
                .status();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(BIN)
            .args(["lab", "ha", "down", "--dir"])
            .arg(self.dir.path())
            .output();
        // A failed test keeps the nodes' logs and events for the post-mortem.
        if std::thread::panicking() {
            let kept = std::env::temp_dir().join(format!("causeway-ha-failed-{}", self.prefix));
            let copied = Command::new("cp")
                .arg("-r")
                .arg(self.dir.path())
                .arg(&kept)
                .status()
                .is_ok_and(|s| s.success());
            if copied {
                eprintln!("the lab's files are kept in {}", kept.display());
            }
        }
    }
}

// ---------------------------------------------------------------- the client's probe

/// SIP OPTIONS to `vip:5060` every millisecond from the client namespace for `duration`;
/// for each probe, when it was sent and whether its 200 came within 100 ms.
struct Probe(std::thread::JoinHandle<Vec<(Instant, bool)>>);

impl Probe {
    fn start(lab: &Lab, vip: &str, duration: Duration) -> Probe {
        let ns = std::fs::File::open(format!("/run/netns/{}-c", lab.prefix)).unwrap();
        let vip = vip.to_string();
        let handle = std::thread::spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.set_nonblocking(true).unwrap();
            let local = sock.local_addr().unwrap();
            let start = Instant::now();
            let mut sent: Vec<Instant> = vec![];
            let mut answered: Vec<Option<Instant>> = vec![];
            let mut buf = [0u8; 2048];
            // Exactly one probe per millisecond of `duration` (late ones go at once), so the
            // last one is always the one given the full answer time.
            while (sent.len() as u128) < duration.as_millis() {
                let i = sent.len();
                let msg = format!(
                    "OPTIONS sip:{vip} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-t{i}\r\n\
                     Max-Forwards: 70\r\nFrom: <sip:t@{vip}>;tag=t\r\nTo: <sip:{vip}>\r\n\
                     Call-ID: t-{i}@probe\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
                );
                sent.push(Instant::now());
                answered.push(None);
                let _ = sock.send_to(msg.as_bytes(), (vip.as_str(), 5060));
                // The last probe is given the full 100 ms to be answered (the next one would
                // be past the end).
                let due = if Duration::from_millis(i as u64 + 1) >= duration {
                    Instant::now() + Duration::from_millis(110)
                } else {
                    start + Duration::from_millis(i as u64 + 1)
                };
                while Instant::now() < due {
                    match sock.recv_from(&mut buf) {
                        Ok((n, _)) => {
                            let text = String::from_utf8_lossy(&buf[..n]);
                            if let Some(id) = text
                                .lines()
                                .find_map(|l| l.strip_prefix("Call-ID: t-"))
                                .and_then(|l| l.split('@').next())
                                .and_then(|n| n.parse::<usize>().ok())
                            {
                                if let Some(slot) = answered.get_mut(id) {
                                    slot.get_or_insert(Instant::now());
                                }
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_micros(100)),
                    }
                }
            }
            sent.into_iter()
                .zip(answered)
                .map(|(s, a)| (s, a.is_some_and(|a| a - s <= Duration::from_millis(100))))
                .collect()
        });
        Probe(handle)
    }

    /// The longest run of unanswered probes sent after `t0`, from the first lost probe's
    /// send time to the next answered probe's (the keepalived anchor's definition).
    fn outage_after(self, t0: Instant) -> (Duration, bool) {
        let probes = self.0.join().unwrap();
        let mut runs = vec![];
        let mut lost_since: Option<Instant> = None;
        for (at, ok) in probes.iter().filter(|(at, _)| *at >= t0) {
            match (ok, lost_since) {
                (false, None) => lost_since = Some(*at),
                (true, Some(since)) => {
                    runs.push((since - t0, *at - since));
                    lost_since = None;
                }
                _ => {}
            }
        }
        if let Some(since) = lost_since {
            println!(
                "unanswered from {:?} after the fault to the probe's end ({} probes after the fault)",
                since - t0,
                probes.iter().filter(|(at, _)| *at >= t0).count()
            );
        }
        if runs.len() > 1 {
            println!("outages (start after the fault, length): {runs:?}");
        }
        let worst = runs.iter().map(|r| r.1).max().unwrap_or_default();
        (worst, lost_since.is_none())
    }
}

/// One OPTIONS to `vip` from the client namespace: where its 200 came from, if one came
/// within a second.
fn options_answered_from(lab: &Lab, vip: &str) -> Option<std::net::SocketAddr> {
    let ns = std::fs::File::open(format!("/run/netns/{}-c", lab.prefix)).unwrap();
    let vip = vip.to_string();
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let local = sock.local_addr().unwrap();
        let msg = format!(
            "OPTIONS sip:{vip} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-once\r\n\
             Max-Forwards: 70\r\nFrom: <sip:t@{vip}>;tag=t\r\nTo: <sip:{vip}>\r\n\
             Call-ID: once@probe\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
        );
        sock.send_to(msg.as_bytes(), (vip.as_str(), 5060)).unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = sock.recv_from(&mut buf).ok()?;
        buf[..n].starts_with(b"SIP/2.0 200").then_some(from)
    })
    .join()
    .unwrap()
}

// ---------------------------------------------------------------- address monitors

/// `ip -ts monitor address` in each node's namespace: every add and delete of the virtual
/// IP, stamped with the host's wall clock (one clock for every namespace).
struct Monitors {
    children: Vec<Child>,
    events: Arc<Mutex<Vec<(f64, String, bool)>>>,
    initial: Vec<(String, bool)>,
}

fn wall_seconds(stamp: &str) -> Option<f64> {
    // 2026-11-30T14:49:04.274064
    let (date, time) = stamp.split_once('T')?;
    let day: f64 = date.rsplit('-').next()?.parse().ok()?;
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(day * 86_400.0 + h * 3600.0 + m * 60.0 + s)
}

impl Monitors {
    fn start(lab: &Lab, nodes: &[Node], vip: &str) -> Monitors {
        let events = Arc::new(Mutex::new(vec![]));
        let mut children = vec![];
        for &n in nodes {
            let mut child = Command::new("ip")
                .args(["-ts", "-n", &lab.ns(n), "monitor", "address"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let out = child.stdout.take().unwrap();
            let (events, who, needle) = (events.clone(), n.0.to_string(), format!(" {vip}/"));
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    if !line.contains(&needle) {
                        continue;
                    }
                    let Some(stamp) = line.strip_prefix('[').and_then(|l| l.split(']').next())
                    else {
                        continue;
                    };
                    if let Some(t) = wall_seconds(stamp) {
                        let added = !line.contains("Deleted");
                        events.lock().unwrap().push((t, who.clone(), added));
                    }
                }
            });
            children.push(child);
        }
        // Give the monitors a moment to subscribe before the state they start from is read.
        std::thread::sleep(Duration::from_millis(100));
        let initial = nodes
            .iter()
            .map(|&n| (n.0.to_string(), lab.has_vip(n, vip)))
            .collect();
        Monitors {
            children,
            events,
            initial,
        }
    }

    /// Every (time, node, added) in order, and the most holders seen at any instant.
    fn stop(mut self) -> (Vec<(f64, String, bool)>, usize) {
        std::thread::sleep(Duration::from_millis(100));
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let mut events = self.events.lock().unwrap().clone();
        events.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut holding: std::collections::BTreeMap<String, bool> =
            self.initial.iter().cloned().collect();
        let mut most = holding.values().filter(|h| **h).count();
        for (_, who, added) in &events {
            holding.insert(who.clone(), *added);
            most = most.max(holding.values().filter(|h| **h).count());
        }
        (events, most)
    }
}

fn only_holder(lab: &Lab, holder: Node, others: &[Node]) {
    let vip = lab.vip();
    assert!(lab.has_vip(holder, &vip), "{} should hold {vip}", holder.0);
    for &o in others {
        assert!(!lab.has_vip(o, &vip), "{} holds {vip} too", o.0);
    }
}

// ---------------------------------------------------------------- the tests

#[test]
fn kill_9_of_the_primary_fails_over_once_and_the_primary_comes_back_terminated_until_failback() {
    let lab = Lab::up('a', 50, &[]);
    only_holder(&lab, P, &[S, W]);
    let monitors = Monitors::start(&lab, &[P, S], &lab.vip());
    let probe = Probe::start(&lab, &lab.vip(), Duration::from_millis(2500));
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    lab.signal(P, nix::sys::signal::Signal::SIGKILL);
    let (outage, recovered) = probe.outage_after(t0);
    println!("kill -9 of the primary: client outage {outage:?}");
    assert!(recovered, "the virtual IP did not answer again within 2 s");
    assert!(
        outage > Duration::ZERO,
        "the probe saw no outage: it is not probing the primary"
    );
    lab.wait_gone(P);
    only_holder(&lab, S, &[P]);
    lab.wait_state(S, "FAILOVER_ACTIVE", Duration::from_secs(2));
    let (events, most) = monitors.stop();
    assert_eq!(most, 1, "two holders at once: {events:?}");

    // The primary comes back TERMINATED: it does not take the address back by itself.
    let mut child = lab.restart(P);
    lab.wait_state(P, "TERMINATED", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    only_holder(&lab, S, &[P]);
    let info = lab.ok(P, &["gethainfo"]);
    assert!(info.contains("Current state: TERMINATED"), "{info}");
    assert!(info.contains("Heartbeat status: Up"), "{info}");

    // Failback within the guard window needs --force (once the primary has its copy of
    // the files back; before that it is refused for that).
    wait_for("the primary in sync", Duration::from_secs(5), || {
        lab.status(P, 0)["data_replication"]["state"] == "Up"
    });
    let refused = lab.refused(P, &["ha", "failback"]);
    assert!(refused.contains("guard window"), "{}", refused);
    lab.ok(P, &["ha", "failback", "--force"]);
    lab.wait_state(P, "PRIMARY_ACTIVE", Duration::from_secs(3));
    lab.wait_state(S, "SECONDARY_ACTIVE", Duration::from_secs(3));
    only_holder(&lab, P, &[S]);
    // The seed's transitions, in the events log of each side.
    let events: Vec<String> = lab.status(P, 0)["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["remarks"].as_str().unwrap_or("").to_string())
        .collect();
    for step in [
        "GRACEFUL_SHUTDOWN → TERMINATED",
        "TERMINATED → FAILBACK_ACTIVE",
        "FAILBACK_ACTIVE → FAILBACK_COMPLETE",
        "FAILBACK_COMPLETE → PRIMARY_ACTIVE",
    ] {
        assert!(
            events.iter().any(|e| e == step),
            "no '{step}' in {events:?}"
        );
    }
    lab.signal(P, nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
}

#[test]
fn the_primarys_link_down_fails_over_and_the_primary_drops_the_address() {
    let lab = Lab::up('b', 51, &[]);
    let monitors = Monitors::start(&lab, &[P, S], &lab.vip());
    let probe = Probe::start(&lab, &lab.vip(), Duration::from_millis(2000));
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let down = Command::new("ip")
        .args(["-n", &lab.ns(P), "link", "set", "eth0", "down"])
        .status()
        .unwrap();
    assert!(down.success());
    let (outage, recovered) = probe.outage_after(t0);
    println!("primary's link down: client outage {outage:?}");
    assert!(recovered);
    lab.wait_state(S, "FAILOVER_ACTIVE", Duration::from_secs(2));
    // The primary cannot reach anyone: its keeper removed the address at the hold's end.
    only_holder(&lab, S, &[P]);
    let (events, most) = monitors.stop();
    assert_eq!(most, 1, "two holders at once: {events:?}");
    let up = Command::new("ip")
        .args(["-n", &lab.ns(P), "link", "set", "eth0", "up"])
        .status()
        .unwrap();
    assert!(up.success());
    lab.wait_state(P, "TERMINATED", Duration::from_secs(10));
    only_holder(&lab, S, &[P]);
}

#[test]
fn switchover_moves_the_address_and_moving_back_within_the_guard_window_needs_force() {
    let lab = Lab::up('c', 52, &[]);
    let probe = Probe::start(&lab, &lab.vip(), Duration::from_millis(3000));
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    lab.ok(P, &["ha", "switchover"]);
    let (outage, recovered) = probe.outage_after(t0);
    println!("switchover: client outage {outage:?}");
    assert!(recovered);
    lab.wait_state(S, "FAILOVER_ACTIVE", Duration::from_secs(2));
    lab.wait_state(P, "TERMINATED", Duration::from_secs(2));
    only_holder(&lab, S, &[P]);
    // Back again, from either side, is refused within the guard window …
    for n in [P, S] {
        assert!(lab.refused(n, &["ha", "switchover"]).contains("--force"));
    }
    // … and done with --force.
    lab.ok(S, &["ha", "switchover", "--force"]);
    lab.wait_state(P, "PRIMARY_ACTIVE", Duration::from_secs(3));
    only_holder(&lab, P, &[S]);
}

#[test]
fn graceful_shutdown_of_the_primary_hands_the_address_over() {
    let lab = Lab::up('d', 53, &[]);
    let monitors = Monitors::start(&lab, &[P, S], &lab.vip());
    lab.signal(P, nix::sys::signal::Signal::SIGTERM);
    lab.wait_gone(P);
    lab.wait_state(S, "FAILOVER_ACTIVE", Duration::from_secs(2));
    only_holder(&lab, S, &[P]);
    let (events, most) = monitors.stop();
    assert_eq!(most, 1, "two holders at once: {events:?}");
    // The stopped primary says so, from its saved state.
    let info = lab.ok(P, &["gethainfo"]);
    assert!(info.contains("Health Monitor is not running"), "{info}");
    assert!(
        info.contains("Last shutdown state: GRACEFUL_SHUTDOWN"),
        "{info}"
    );
}

#[test]
fn a_partition_between_the_pair_with_the_witness_on_the_primarys_side_moves_nothing() {
    let lab = Lab::up('e', 54, &[]);
    let monitors = Monitors::start(&lab, &[P, S], &lab.vip());
    lab.cut(P, S);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(lab.state(P), "PRIMARY_ACTIVE");
    assert_eq!(lab.state(S), "SECONDARY_ACTIVE");
    only_holder(&lab, P, &[S]);
    // Each side says it lost the other (21020), and the secondary never stood: its term
    // did not rise, so the heal deposes no one.
    let alarms = lab.ok(S, &["xstatus", "alarms"]);
    assert!(alarms.contains("21020"), "{alarms}");
    let generation = lab.status(P, 0)["generation"].as_u64();
    lab.heal(&[P]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(lab.status(P, 0)["generation"].as_u64(), generation);
    only_holder(&lab, P, &[S]);
    let (events, _) = monitors.stop();
    assert!(events.is_empty(), "the address moved: {events:?}");
}

#[test]
fn a_primary_cut_off_from_the_secondary_and_the_witness_drops_the_address_before_the_secondary_adds_it(
) {
    let lab = Lab::up('f', 55, &[]);
    let monitors = Monitors::start(&lab, &[P, S], &lab.vip());
    lab.cut(P, S);
    lab.cut(P, W);
    lab.wait_state(S, "FAILOVER_ACTIVE", Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(300));
    only_holder(&lab, S, &[P]);
    let (events, most) = monitors.stop();
    assert_eq!(most, 1, "two holders at once: {events:?}");
    let removed = events
        .iter()
        .find(|e| e.1 == "primary" && !e.2)
        .expect("P removed it");
    let added = events
        .iter()
        .find(|e| e.1 == "secondary" && e.2)
        .expect("S added it");
    println!(
        "the primary removed the address {:.1} ms before the secondary added it",
        (added.0 - removed.0) * 1000.0
    );
    assert!(removed.0 < added.0, "{events:?}");
    assert_eq!(lab.state(P), "FAILOVER_INVOKED");
    lab.heal(&[P]);
    lab.wait_state(P, "TERMINATED", Duration::from_secs(10));
    only_holder(&lab, S, &[P]);
}

#[test]
fn randomized_partitions_never_give_two_holders() {
    let trials: usize = std::env::var("HA_PARTITION_TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(12);
    let seed: u64 = std::env::var("HA_PARTITION_SEED")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("HA_PARTITION_SEED={seed} HA_PARTITION_TRIALS={trials}");
    let mut rng = seed | 1;
    let mut next = move |n: u64| {
        // xorshift64*: enough for choosing shapes and durations, replayable by seed.
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    };
    let lab = Lab::up('g', 56, &[]);
    let monitors = Monitors::start(&lab, &[P, S], &lab.vip());
    let shapes: [&[(Node, Node)]; 6] = [
        &[(P, S)],
        &[(P, S), (P, W)],
        &[(S, P), (S, W)],
        &[(W, P), (W, S)],
        &[(P, W)],
        &[(S, W)],
    ];
    for trial in 0..trials {
        let shape = shapes[next(shapes.len() as u64) as usize];
        let hold = Duration::from_millis(50 + next(700));
        for &(a, b) in shape {
            lab.cut(a, b);
        }
        std::thread::sleep(hold);
        lab.heal(&[P, S, W]);
        // Settle: the mesh redials, the states converge.
        std::thread::sleep(Duration::from_millis(2500));
        let holders: Vec<&str> = [P, S]
            .iter()
            .filter(|n| lab.has_vip(**n, &lab.vip()))
            .map(|n| n.0)
            .collect();
        println!(
            "trial {trial}: cut {:?} for {hold:?}; holders now {holders:?}",
            shape.iter().map(|(a, b)| (a.0, b.0)).collect::<Vec<_>>()
        );
        assert!(
            holders.len() <= 1,
            "two holders after trial {trial} (seed {seed})"
        );
    }
    // After the last heal exactly one member holds it.
    std::thread::sleep(Duration::from_secs(1));
    let holders = [P, S]
        .iter()
        .filter(|n| lab.has_vip(**n, &lab.vip()))
        .count();
    assert_eq!(holders, 1, "seed {seed}");
    let (events, most) = monitors.stop();
    assert_eq!(
        most, 1,
        "two holders at one instant (seed {seed}): {events:?}"
    );
}

#[test]
fn with_manual_failover_the_secondary_waits_for_the_command() {
    let lab = Lab::up('h', 57, &["--failover", "manual"]);
    lab.signal(P, nix::sys::signal::Signal::SIGKILL);
    lab.wait_gone(P);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(lab.state(S), "SECONDARY_ACTIVE");
    assert!(!lab.has_vip(S, &lab.vip()), "the secondary moved unasked");
    let alarms = lab.ok(S, &["xstatus", "alarms"]);
    assert!(alarms.contains("21029"), "{alarms}");
    lab.ok(S, &["ha", "failover"]);
    lab.wait_state(S, "FAILOVER_ACTIVE", Duration::from_secs(2));
    only_holder(&lab, S, &[P]);
}

#[test]
fn one_secondary_for_two_primaries_takes_over_only_the_failed_primarys_address() {
    let lab = Lab::up('i', 58, &["--second-primary"]);
    let vip2 = format!("{}.20", lab.subnet);
    let untouched = Monitors::start(&lab, &[P], &lab.vip());
    assert!(lab.has_vip(P2, &vip2));
    let vip2_sip: std::net::SocketAddr = format!("{vip2}:5060").parse().unwrap();
    assert_eq!(options_answered_from(&lab, &vip2), Some(vip2_sip));
    lab.signal(P2, nix::sys::signal::Signal::SIGKILL);
    lab.wait_gone(P2);
    let deadline = Instant::now() + Duration::from_secs(2);
    while !lab.has_vip(S, &vip2) {
        assert!(
            Instant::now() < deadline,
            "the secondary did not take {vip2}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(lab.status(S, 1)["state"], "FAILOVER_ACTIVE");
    assert_eq!(lab.status(S, 0)["state"], "SECONDARY_ACTIVE");
    assert!(!lab.has_vip(S, &lab.vip()));
    only_holder(&lab, P, &[S]);
    // The secondary serves SIP on the address it took, answering from it (a client
    // drops an answer from another address); the other pair's is still its primary's.
    assert_eq!(options_answered_from(&lab, &vip2), Some(vip2_sip));
    let vip1_sip = format!("{}:5060", lab.vip()).parse().ok();
    assert_eq!(options_answered_from(&lab, &lab.vip()), vip1_sip);
    let (events, _) = untouched.stop();
    assert!(
        events.is_empty(),
        "the other primary's address moved: {events:?}"
    );
    // Commands name the pair when the secondary has two.
    assert!(lab.refused(S, &["ha", "switchover"]).contains("--pair"));
}

/// The reason of alarm `id` if node `n` has it raised itself (not another peer's copy).
fn own_alarm_reason(lab: &Lab, n: Node, id: u32) -> Option<String> {
    let out = lab.cli(n, &["xstatus", "alarms", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["active"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["id"] == id))
        .map(|a| a["reason"].as_str().unwrap_or("").to_string())
}

fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_secondary_keeps_a_copy_of_the_primarys_files_and_the_primary_takes_back_what_changed_meanwhile(
) {
    let lab = Lab::up('j', 59, &[]);
    let (pf, sf) = (lab.node_dir(P).join("files"), lab.node_dir(S).join("files"));
    let big: Vec<u8> = (0..(1u32 << 20) + 17).map(|i| (i % 251) as u8).collect();
    std::fs::create_dir_all(pf.join("sub")).unwrap();
    std::fs::write(pf.join("a.txt"), b"hello").unwrap();
    std::fs::write(pf.join("sub/big.bin"), &big).unwrap();
    wait_for("the copy on the secondary", Duration::from_secs(10), || {
        std::fs::read(sf.join("a.txt")).is_ok_and(|b| b == b"hello")
            && std::fs::read(sf.join("sub/big.bin")).is_ok_and(|b| b == big)
    });
    assert_eq!(lab.status(S, 0)["data_replication"]["state"], "Up");
    std::fs::remove_file(pf.join("a.txt")).unwrap();
    wait_for(
        "the deletion on the secondary",
        Duration::from_secs(5),
        || !sf.join("a.txt").exists(),
    );
    // A file over the 256 MiB cap is named in 21024, never skipped in silence.
    let huge = std::fs::File::create(pf.join("huge.iso")).unwrap();
    huge.set_len((256 << 20) + 1).unwrap();
    let raised_21024 = || own_alarm_reason(&lab, S, 21024);
    wait_for("21024 naming the file", Duration::from_secs(5), || {
        raised_21024().is_some_and(|r| r.contains("huge.iso"))
    });
    std::fs::remove_file(pf.join("huge.iso")).unwrap();
    wait_for("21024 lowered", Duration::from_secs(5), || {
        raised_21024().is_none()
    });

    // After a failover the secondary's directory is the truth, and the primary takes it.
    lab.signal(P, nix::sys::signal::Signal::SIGKILL);
    lab.wait_gone(P);
    lab.wait_state(S, "FAILOVER_ACTIVE", Duration::from_secs(2));
    std::fs::write(sf.join("c.txt"), b"written during the failover").unwrap();
    let mut child = lab.restart(P);
    lab.wait_state(P, "TERMINATED", Duration::from_secs(10));
    wait_for(
        "the copy back on the primary",
        Duration::from_secs(10),
        || std::fs::read(pf.join("c.txt")).is_ok_and(|b| b == b"written during the failover"),
    );
    assert_eq!(std::fs::read(pf.join("sub/big.bin")).unwrap(), big);
    wait_for("the primary in sync", Duration::from_secs(5), || {
        lab.status(P, 0)["data_replication"]["state"] == "Up"
    });
    // In sync, so a failback after the guard window would need no --force for it.
    lab.ok(P, &["ha", "failback", "--force"]);
    lab.wait_state(P, "PRIMARY_ACTIVE", Duration::from_secs(3));
    lab.signal(P, nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
}

#[test]
fn a_primary_that_lost_its_data_does_not_serve_until_recovery_mode_takes_it_back_from_the_secondary(
) {
    let lab = Lab::up('k', 60, &["--failover", "manual"]);
    let (pd, sf) = (lab.node_dir(P), lab.node_dir(S).join("files"));
    std::fs::write(pd.join("files/a.txt"), b"the primary's data").unwrap();
    wait_for("the copy on the secondary", Duration::from_secs(10), || {
        std::fs::read(sf.join("a.txt")).is_ok_and(|b| b == b"the primary's data")
    });
    // The primary's machine loses its data: only its node file and certificate remain.
    lab.signal(P, nix::sys::signal::Signal::SIGKILL);
    lab.wait_gone(P);
    for entry in std::fs::read_dir(&pd).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if ![
            "causeway.toml",
            "node.key",
            "node.crt",
            "ca.crt",
            "causeway.log",
            "causeway.pid",
        ]
        .contains(&name.as_str())
        {
            let _ = std::fs::remove_dir_all(entry.path());
            let _ = std::fs::remove_file(entry.path());
        }
    }
    std::fs::create_dir_all(pd.join("files")).unwrap();
    let mut child = lab.restart(P);
    std::thread::sleep(Duration::from_secs(3));
    // It does not serve an empty directory (the secondary would delete its copy).
    assert!(!lab.has_vip(P, &lab.vip()));
    let alarms = lab.ok(P, &["xstatus", "alarms"]);
    assert!(
        alarms.contains("21028") && alarms.contains("recovery mode"),
        "{alarms}"
    );
    assert!(
        std::fs::read(sf.join("a.txt")).is_ok(),
        "the secondary lost its copy"
    );

    // Restarted in recovery mode, it takes the data back, then serves on 'ha failback'.
    lab.signal(P, nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
    let toml = pd.join("causeway.toml");
    let mut config = std::fs::read_to_string(&toml).unwrap();
    config.push_str("recovery_mode = true\n");
    std::fs::write(&toml, config).unwrap();
    let mut child = lab.restart(P);
    lab.wait_state(P, "TERMINATED", Duration::from_secs(10));
    wait_for(
        "the data back on the primary",
        Duration::from_secs(10),
        || std::fs::read(pd.join("files/a.txt")).is_ok_and(|b| b == b"the primary's data"),
    );
    wait_for("the recovery completed", Duration::from_secs(5), || {
        lab.status(P, 0)["events"].as_array().is_some_and(|e| {
            e.iter().any(|e| {
                e["description"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("Recovery completed")
            })
        })
    });
    // Its lease records went with its data: the refusal says what to run.
    let why = lab.refused(P, &["ha", "failback"]);
    assert!(why.contains("ha failover' on the secondary"), "{why}");
    lab.ok(S, &["ha", "failover"]);
    lab.wait_state(S, "FAILOVER_ACTIVE", Duration::from_secs(3));
    lab.wait_state(P, "TERMINATED", Duration::from_secs(3));
    lab.ok(P, &["ha", "failback", "--force"]);
    lab.wait_state(P, "PRIMARY_ACTIVE", Duration::from_secs(3));
    only_holder(&lab, P, &[S]);
    assert_eq!(
        std::fs::read(sf.join("a.txt")).unwrap(),
        b"the primary's data"
    );
    lab.signal(P, nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
}

#[test]
fn operator_commands_run_when_the_address_arrives_and_when_it_leaves() {
    let lab = Lab::up('l', 62, &[]);
    let sd = lab.node_dir(S);
    let script = sd.join("notify.sh");
    let out = sd.join("notify.out");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$CAUSEWAY_HA_EVENT $1 $2 $3 $4\" >> {}\n",
            out.display()
        ),
    )
    .unwrap();
    let mut perms = std::fs::metadata(&script).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&script, perms).unwrap();
    lab.signal(S, nix::sys::signal::Signal::SIGTERM);
    lab.wait_gone(S);
    let toml = sd.join("causeway.toml");
    let mut config = std::fs::read_to_string(&toml).unwrap();
    config.push_str(&format!(
        "on_promote = \"{0}\"\non_demote = \"{0}\"\n",
        script.display()
    ));
    std::fs::write(&toml, config).unwrap();
    let mut child = lab.restart(S);
    lab.wait_state(S, "SECONDARY_ACTIVE", Duration::from_secs(10));
    lab.ok(P, &["ha", "switchover"]);
    lab.wait_state(S, "FAILOVER_ACTIVE", Duration::from_secs(3));
    lab.ok(S, &["ha", "switchover", "--force"]);
    lab.wait_state(P, "PRIMARY_ACTIVE", Duration::from_secs(3));
    let vip = lab.vip();
    wait_for("both commands", Duration::from_secs(3), || {
        std::fs::read_to_string(&out).is_ok_and(|t| t.lines().count() >= 2)
    });
    let lines: Vec<String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert!(
        lines[0].starts_with(&format!("promote 1 FAILOVER_ACTIVE {vip} ")),
        "{lines:?}"
    );
    assert!(lines[1].starts_with("demote 1 "), "{lines:?}");
    assert!(lines[1].contains(&vip), "{lines:?}");
    lab.signal(S, nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
}

#[test]
fn without_a_witness_the_pair_fails_over_says_it_can_split_and_heals_to_one_holder() {
    let lab = Lab::up('m', 64, &["--no-witness"]);
    let info = lab.ok(P, &["gethainfo"]);
    assert!(info.contains("Witness: none *"), "{info}");
    assert!(
        info.contains("Split brain protection: none (no witness"),
        "{info}"
    );
    assert_eq!(lab.status(P, 0)["split_brain_protection"], "none");
    let alarms = lab.ok(P, &["xstatus", "alarms"]);
    assert!(alarms.contains("21022"), "{alarms}");

    // A partition with both links up: both hold, as the status said they could.
    lab.cut(P, S);
    wait_for("the secondary to take over", Duration::from_secs(3), || {
        lab.has_vip(S, &lab.vip())
    });
    assert!(
        lab.has_vip(P, &lab.vip()),
        "the primary kept it (no witness to stop it)"
    );
    // The heal: the higher generation keeps it, the other lets go at once.
    let monitors = Monitors::start(&lab, &[P, S], &lab.vip());
    lab.heal(&[P]);
    wait_for("one holder after the heal", Duration::from_secs(5), || {
        lab.has_vip(P, &lab.vip()) != lab.has_vip(S, &lab.vip())
    });
    let (events, _) = monitors.stop();
    println!("after the heal: {events:?}");
    let alarms = lab.ok(S, &["xstatus", "alarms"]);
    assert!(
        alarms.contains("21025"),
        "two holders were never reported: {alarms}"
    );

    // kill -9 of whoever holds: the other takes over after the failover wait.
    let holder = if lab.has_vip(P, &lab.vip()) { P } else { S };
    let other = if holder.0 == P.0 { S } else { P };
    std::thread::sleep(Duration::from_secs(1));
    lab.signal(holder, nix::sys::signal::Signal::SIGKILL);
    lab.wait_gone(holder);
    wait_for(
        "the other member to take over",
        Duration::from_secs(3),
        || lab.has_vip(other, &lab.vip()),
    );
    assert!(
        !lab.has_vip(holder, &lab.vip()),
        "the killed node's keeper kept it"
    );
}

#[test]
fn unpair_leaves_the_primary_serving_alone_and_takes_the_secondary_out_for_good() {
    let lab = Lab::up('n', 65, &[]);
    // Never while the secondary serves.
    lab.ok(P, &["ha", "switchover"]);
    lab.wait_state(S, "FAILOVER_ACTIVE", Duration::from_secs(3));
    // Refused throughout: first while the primary does not know the holder yet (its quiet
    // start after handing over), then because the secondary holds it.
    wait_for(
        "the primary to refuse: the secondary serves",
        Duration::from_secs(3),
        || {
            lab.refused(P, &["ha", "unpair"])
                .contains("fail back first")
        },
    );
    lab.ok(P, &["ha", "failback", "--force"]);
    lab.wait_state(P, "PRIMARY_ACTIVE", Duration::from_secs(3));

    lab.ok(P, &["ha", "unpair"]);
    wait_for("the primary to hold alone", Duration::from_secs(3), || {
        lab.has_vip(P, &lab.vip())
    });
    for n in [P, S] {
        let info = lab.ok(n, &["gethainfo"]);
        assert!(
            info.contains("Number of paired peers: 0"),
            "{}: {info}",
            n.0
        );
    }
    // The secondary no longer takes over, and the primary keeps its address across a
    // restart.
    lab.signal(P, nix::sys::signal::Signal::SIGKILL);
    lab.wait_gone(P);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !lab.has_vip(S, &lab.vip()),
        "an unpaired secondary took over"
    );
    let mut child = lab.restart(P);
    wait_for("the primary alone again", Duration::from_secs(5), || {
        lab.has_vip(P, &lab.vip())
    });
    let info = lab.ok(P, &["gethainfo"]);
    assert!(info.contains("Number of paired peers: 0"), "{info}");
    lab.signal(P, nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
}

#[test]
fn a_direct_connect_cable_keeps_the_heartbeat_up_when_the_health_monitor_network_between_the_pair_fails(
) {
    let lab = Lab::up('o', 66, &["--direct-connect"]);
    wait_for("the direct path up", Duration::from_secs(5), || {
        lab.status(P, 0)["direct_connect"]["status"] == "Up"
    });
    let info = lab.ok(P, &["gethainfo"]);
    assert!(info.contains("Direct connect used: Yes"), "{info}");
    // The health-monitor network between the two fails; the cable does not.
    lab.cut(P, S);
    std::thread::sleep(Duration::from_secs(2));
    let s = lab.status(S, 0);
    assert_eq!(s["heartbeats"]["1"]["status"], "Down", "{s}");
    assert_eq!(s["direct_connect"]["status"], "Up", "{s}");
    let info = lab.ok(S, &["gethainfo"]);
    assert!(info.contains("Heartbeat status: Up"), "{info}");
    assert!(
        s["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["description"]
                .as_str()
                .unwrap_or("")
                .contains("direct connect path only")),
        "{s}"
    );
    // The cable never carries the lease: the witness still hears the primary, nothing moves.
    assert_eq!(lab.state(P), "PRIMARY_ACTIVE");
    only_holder(&lab, P, &[S]);
}

#[test]
fn ha_configure_on_the_primary_changes_the_pair_at_once_and_in_its_node_file() {
    let lab = Lab::up('q', 67, &[]);
    assert!(lab
        .refused(S, &["ha", "configure", "--failover", "manual"])
        .contains("run 'ha configure' on Peer 1"));
    assert!(lab
        .refused(P, &["ha", "configure", "--failover-wait-ms", "100"])
        .contains("ha.failover_wait_ms"));
    let said = lab.ok(P, &["ha", "configure", "--failover", "manual"]);
    assert!(said.contains("Failover mode set to MANUAL."), "{said}");
    let file = std::fs::read_to_string(lab.node_dir(P).join("causeway.toml")).unwrap();
    assert!(file.contains("failover = \"manual\""), "{file}");
    wait_for(
        "the secondary to take the settings",
        Duration::from_secs(3),
        || lab.status(S, 0)["failover"] == "Manual",
    );
    // Now the secondary waits for the command when the primary dies.
    lab.signal(P, nix::sys::signal::Signal::SIGKILL);
    lab.wait_gone(P);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !lab.has_vip(S, &lab.vip()),
        "the secondary moved after failover=manual"
    );
    assert_eq!(lab.state(S), "SECONDARY_ACTIVE");
}

#[test]
fn with_the_cluster_as_witness_every_other_peer_votes_and_the_secondary_takes_over() {
    // Four peers (two primaries, their secondary, a witness node): each pair's majority is
    // three of the four.
    let lab = Lab::up('r', 68, &["--second-primary", "--cluster-witness"]);
    let info = lab.ok(P, &["gethainfo"]);
    assert!(info.contains("Witness: the peer cluster"), "{info}");
    // The witness node and the other primary both witness pair 1.
    let w = lab.ok(W, &["gethainfo"]);
    assert!(w.contains("Witness of pair: Peer 1"), "{w}");
    let p2 = lab.ok(P2, &["ha", "status", "--json"]);
    assert!(p2.contains("\"role\": \"Witness\""), "{p2}");
    // A partition of the pair alone moves nothing: the other voters still hear the primary.
    lab.cut(P, S);
    std::thread::sleep(Duration::from_secs(2));
    only_holder(&lab, P, &[S]);
    lab.heal(&[P]);
    lab.signal(P, nix::sys::signal::Signal::SIGKILL);
    lab.wait_gone(P);
    wait_for("the secondary to take over", Duration::from_secs(3), || {
        lab.has_vip(S, &lab.vip())
    });
    assert_eq!(lab.status(S, 0)["state"], "FAILOVER_ACTIVE");
}

/// Another machine on the link claims the virtual IP while the primary holds it (an address
/// added by hand, a host outside the pair): the primary says so (21026, naming the MAC),
/// keeps the address, and the alarm names what to do.
#[test]
fn a_host_outside_the_pair_claiming_the_virtual_ip_raises_21026_on_the_holder() {
    let lab = Lab::up('s', 69, &[]);
    assert!(lab.has_vip(P, &lab.vip()));
    let ns = std::fs::File::open(format!("/run/netns/{}-c", lab.prefix)).unwrap();
    let vip: std::net::Ipv4Addr = lab.vip().parse().unwrap();
    let claimant = std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let socket = causeway_ha::arp::ArpSocket::open("eth0").unwrap();
        let frame = causeway_ha::arp::garp_request(socket.mac, vip);
        for _ in 0..5 {
            socket.send(&frame).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        causeway_ha::arp::mac_text(socket.mac)
    })
    .join()
    .unwrap();
    let raised_21026 = |n: Node| own_alarm_reason(&lab, n, 21026);
    wait_for(
        "21026 on the primary naming the MAC",
        Duration::from_secs(5),
        || raised_21026(P).is_some_and(|r| r.contains(&claimant)),
    );
    assert!(lab.has_vip(P, &lab.vip()), "the holder keeps the address");
    assert_eq!(raised_21026(S), None, "only the holder watches");
}
