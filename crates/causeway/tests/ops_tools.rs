//! The operator's tools against real nodes: `causeway syslog follow` and `causeway pcap`.
//! Peers on 127.0.89.x (syslog) and 127.0.90.x (pcap). `pcap` needs root (or CAP_NET_RAW)
//! and tcpdump to read its file back; the refusal test needs setpriv (util-linux).

mod harness;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use harness::{addr, wait_for, TestCluster, BIN};

/// A process we started, killed by its PID when dropped.
struct Started(Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `causeway --node DIR syslog follow ARGS`; its stdout lines come on the channel.
fn follow(dir: &std::path::Path, args: &[&str]) -> (Started, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .arg("--node")
        .arg(dir)
        .args(["syslog", "follow"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (Started(child), rx)
}

/// Lines from `rx` until one contains `needle` (all of them, that one last), within `secs`.
fn read_until(rx: &mpsc::Receiver<String>, needle: &str, secs: u64, seen: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(needle);
                seen.push(line);
                if found {
                    return;
                }
            }
            Err(_) => panic!(
                "no line with {needle:?} from syslog follow within {secs} s; it printed:\n{}",
                seen.join("\n")
            ),
        }
    }
}

#[test]
fn syslog_follow_prints_the_last_lines_then_each_new_one_and_ends_when_the_node_stops() {
    let mut c = TestCluster::start(89, 2, "Enforce", |_, _, _, _| {});
    wait_for(20, "cluster formed", || c.formed());
    let dir = c.peers[0].dir.clone();

    let (mut follower, rx) = follow(&dir, &["--lines", "1000"]);
    let mut seen = Vec::new();
    // The lines written before it started come first.
    read_until(&rx, "Detail=\"Node started\"", 20, &mut seen);
    assert!(
        seen[0].contains(" peer1 ") && seen[0].contains("UTCTime=\""),
        "not a log line of peer1: {}",
        seen[0]
    );
    // A line written after it started arrives while it runs.
    let (ok, out, err) = c.cli(1, &["xconfiguration", "set", "sip.domains", "x.example"]);
    assert!(ok, "{out}{err}");
    let changed = "Detail=\"xconfiguration sip.domains - changed from: (unset) to: x.example\"";
    let started_at = seen.len();
    read_until(&rx, changed, 20, &mut seen);
    assert!(
        seen[..started_at].iter().all(|l| !l.contains(changed)),
        "the change came before the earlier lines"
    );

    // `--lines 1`: just the newest line, then what follows.
    let (_second, rx2) = follow(&dir, &["--lines", "1"]);
    let first = rx2
        .recv_timeout(Duration::from_secs(20))
        .expect("a first line from syslog follow --lines 1");
    assert!(!first.contains("Detail=\"Node started\""), "{first}");
    let (ok, out, err) = c.cli(1, &["xconfiguration", "set", "sip.domains", "y.example"]);
    assert!(ok, "{out}{err}");
    read_until(&rx2, "to: y.example\"", 20, &mut vec![first]);

    // The node stops (SIGTERM) although followers are connected, and they end, saying so.
    let pid = c.peers[0].child.as_ref().unwrap().id();
    let term = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let node = c.peers[0].child.as_mut().unwrap();
    wait_for(15, "peer 1 to stop with followers connected", || {
        node.try_wait().unwrap().is_some()
    });
    c.peers[0].child = None;
    let status = loop_wait(&mut follower.0, 10);
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(follower.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("the node ended the log stream"), "{err}");
}

/// The child's exit status, waiting at most `secs`.
fn loop_wait(child: &mut Child, secs: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "still running after {secs} s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tcpdump(file: &std::path::Path, filter: &str) -> Vec<String> {
    let out = Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(file)
        .args((!filter.is_empty()).then_some(filter))
        .output()
        .expect("tcpdump runs (apt-get install tcpdump)");
    assert!(
        out.status.success(),
        "tcpdump -r {} '{filter}': {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn pcap_writes_the_mesh_traffic_tcpdump_reads_and_nothing_else() {
    let c = TestCluster::start(90, 2, "Enforce", |_, _, _, _| {});
    wait_for(20, "cluster formed", || c.formed());
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("cluster.pcap");
    let mut pcap = Started(
        Command::new(BIN)
            .args(["pcap", "lo", "--duration", "3", "--out"])
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Traffic to a port that is not the cluster's, while it captures.
    let udp = std::net::UdpSocket::bind(format!("{}:0", addr(90, 2))).unwrap();
    for _ in 0..10 {
        udp.send_to(b"not the cluster's", format!("{}:9", addr(90, 1)))
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = loop_wait(&mut pcap.0, 15);
    let mut out = String::new();
    let mut err = String::new();
    std::io::Read::read_to_string(pcap.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    std::io::Read::read_to_string(pcap.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{out}{err}");
    assert!(out.contains(&format!("into {}", file.display())), "{out}");

    let mesh = tcpdump(
        &file,
        &format!(
            "tcp port 4372 and host {} and host {}",
            addr(90, 1),
            addr(90, 2)
        ),
    );
    assert!(
        !mesh.is_empty(),
        "no mesh packet between the peers in the file"
    );
    assert!(
        tcpdump(&file, "udp port 9").is_empty(),
        "a packet to port 9 was captured"
    );
    let others = tcpdump(
        &file,
        "not (port 4372 or port 5060 or port 5061 or port 5432 or port 8008 or port 9899)",
    );
    assert!(others.is_empty(), "packets of other ports: {others:?}");
    // Every packet once (loopback's sent copies dropped) and all counted.
    let all = tcpdump(&file, "");
    let wrote = format!("Wrote {} packet", all.len());
    assert!(out.contains(&wrote), "{out} (tcpdump read {})", all.len());
    // Every mesh packet once: loopback's sent copy would make the same line but for the
    // time (TCP timestamps and sequence numbers included); a rare duplicate ACK may look
    // alike, not half of them. (Only our peers' TCP: other traffic here may be UDP.)
    let mut unique: Vec<&str> = mesh
        .iter()
        .map(|l| l.split_once(' ').map_or(l.as_str(), |(_, rest)| rest))
        .collect();
    unique.sort_unstable();
    unique.dedup();
    assert!(
        unique.len() * 10 >= mesh.len() * 9,
        "{} of {} mesh packets are in the file twice (loopback's sent copies kept?): {:?}",
        mesh.len() - unique.len(),
        mesh.len(),
        &mesh[..mesh.len().min(6)]
    );
}

#[test]
fn pcap_refuses_without_cap_net_raw_and_names_unknown_interfaces() {
    let tmp = tempfile::tempdir().unwrap();
    harness::set_mode(tmp.path(), 0o777);
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(BIN)
        .args(["pcap", "lo", "--duration", "1", "--out"])
        .arg(tmp.path().join("x.pcap"))
        .output()
        .expect("setpriv runs (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("needs root or CAP_NET_RAW"), "{err}");
    assert!(!tmp.path().join("x.pcap").exists());

    let out = Command::new(BIN)
        .args(["pcap", "nosuch0", "--duration", "1"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no network interface named 'nosuch0'"),
        "{err}"
    );
}
