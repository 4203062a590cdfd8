//! The virtual IP for real, in two network namespaces this test makes (198.18.40.0/24, a
//! veth pair between them) and removes: added by netlink in one, announced by gratuitous
//! ARP that the other receives, reachable from the other while present, gone when removed.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use causeway_ha::arp::{parse_arp, ArpSocket};
use causeway_ha::vip::{NetlinkVip, Vip, VirtualIp};

/// Two namespaces joined by a veth pair; deleted (with their links) on drop.
struct Pair {
    a: String,
    b: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("'ip' is needed (apt-get install -y iproute2): {e}"));
    assert!(
        out.status.success(),
        "ip {}: {} (these tests need root for network namespaces)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pair {
    fn new() -> Self {
        let id = std::process::id();
        let (a, b) = (format!("cwha{id}a"), format!("cwha{id}b"));
        let pair = Pair { a, b };
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        ip(&[
            "-n", &pair.a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns",
            &pair.b,
        ]);
        for (ns, dev, addr) in [
            (&pair.a, "va", "198.18.40.1/24"),
            (&pair.b, "vb", "198.18.40.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    fn addresses(&self, ns: &str, dev: &str) -> String {
        let out = Command::new("ip")
            .args(["-n", ns, "-o", "addr", "show", "dev", dev])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn pings(&self, from: &str, to: &str) -> bool {
        Command::new("ip")
            .args(["netns", "exec", from, "ping", "-c", "1", "-W", "1", to])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A runtime for one namespace's thread (netlink sockets belong to the namespace they were
/// opened in).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `f` on a thread of its own inside namespace `ns` (setns moves only that thread).
fn in_namespace<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

#[test]
fn the_virtual_ip_is_added_announced_reachable_and_removed() {
    let pair = Pair::new();
    let vip = Vip {
        interface: "va".into(),
        address: IpAddr::V4(Ipv4Addr::new(198, 18, 40, 10)),
        prefix: 24,
    };
    // The other side listens for the announcement before it is made.
    let listener = {
        let b = pair.b.clone();
        std::thread::spawn(move || {
            in_namespace(&b, || {
                let s = ArpSocket::open("vb").unwrap();
                s.set_read_timeout(Duration::from_millis(200)).unwrap();
                let deadline = Instant::now() + Duration::from_secs(5);
                let mut buf = [0u8; 1500];
                while Instant::now() < deadline {
                    if let Ok(n) = s.recv(&mut buf) {
                        if let Some((1, mac, spa, tpa)) = parse_arp(&buf[..n]) {
                            if spa == Ipv4Addr::new(198, 18, 40, 10) && tpa == spa {
                                return Some(mac);
                            }
                        }
                    }
                }
                None
            })
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let (added_mac, was_present) = {
        let vip = vip.clone();
        in_namespace(&pair.a, move || {
            runtime().block_on(async {
                let nl = NetlinkVip::connect().unwrap();
                assert!(!nl.present(&vip).await.unwrap());
                nl.add(&vip).await.unwrap();
                nl.add(&vip).await.unwrap(); // idempotent
                let present = nl.present(&vip).await.unwrap();
                let arp = ArpSocket::open("va").unwrap();
                arp.send(&causeway_ha::arp::garp_request(
                    arp.mac,
                    Ipv4Addr::new(198, 18, 40, 10),
                ))
                .unwrap();
                (arp.mac, present)
            })
        })
    };
    assert!(was_present);
    assert!(pair.addresses(&pair.a, "va").contains("198.18.40.10/24"));
    assert_eq!(
        listener.join().unwrap(),
        Some(added_mac),
        "the other namespace received the gratuitous ARP from the holder's MAC"
    );
    assert!(
        pair.pings(&pair.b, "198.18.40.10"),
        "the VIP answers while present"
    );

    let vip2 = vip.clone();
    in_namespace(&pair.a, move || {
        runtime().block_on(async {
            let nl = NetlinkVip::connect().unwrap();
            nl.remove(&vip2).await.unwrap();
            nl.remove(&vip2).await.unwrap(); // idempotent
            assert!(!nl.present(&vip2).await.unwrap());
            let wrong = Vip {
                interface: "nosuch0".into(),
                ..vip2.clone()
            };
            let e = nl.add(&wrong).await.unwrap_err().to_string();
            assert!(e.contains("'nosuch0' does not exist"), "{e}");
        })
    });
    assert!(!pair.addresses(&pair.a, "va").contains("198.18.40.10"));
    assert!(!pair.pings(&pair.b, "198.18.40.10"), "the VIP is gone");
}
