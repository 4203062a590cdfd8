//! `causeway pcap <interface>`: the cluster's traffic into a pcap file.
//!
//! Captures TCP and UDP packets (IPv4 and IPv6) to or from the cluster's ports, [`PORTS`]:
//! the mesh (4372, the default `[cluster] port`), SIP (5060 UDP/TCP, 5061 TLS), and the
//! database cluster (PostgreSQL 5432, the local endpoint 9899, the health port 8008) — the
//! defaults; `--port` (repeated) names others, for a node configured with other ports.
//! `any` captures on every interface.
//!
//! It reads an `AF_PACKET` socket (root or CAP_NET_RAW) and filters in user space: no BPF
//! program, no libpcap. The file is classic pcap (2.4, snaplen 65535, microseconds), which
//! tcpdump, tshark and Wireshark read: Ethernet frames (linktype 1) for an Ethernet or
//! loopback interface (loopback frames carry a zeroed Ethernet header), Linux "cooked"
//! frames (linktype 113) for `any` and for interfaces without an Ethernet header (a tunnel),
//! as tcpdump does. On loopback the kernel shows every packet twice (sent and received);
//! the sent copy is dropped, as libpcap does. It runs until Ctrl-C (SIGINT), SIGTERM or
//! `--duration`, writes the file out about once a second, and says how many packets it
//! wrote.

use std::io::Write;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use nix::errno::Errno;
use nix::sys::socket::{
    recvfrom, setsockopt, socket, sockopt, AddressFamily, LinkAddr, SockFlag, SockProtocol,
    SockType,
};

/// The ports captured (either end): mesh, SIP, SIP over TLS, PostgreSQL, the database
/// health port, the database local endpoint.
pub const PORTS: [u16; 6] = [4372, 5060, 5061, 5432, 8008, 9899];

/// Bytes kept of each packet.
pub const SNAPLEN: u32 = 65535;
pub const LINKTYPE_ETHERNET: u32 = 1;
pub const LINKTYPE_LINUX_SLL: u32 = 113;

const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;
const PACKET_OUTGOING: u8 = 4;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// How often the loop looks at the stop flag and the clock while no packet comes.
const POLL: Duration = Duration::from_millis(200);
/// The largest packet read (GSO packets on loopback reach 64 KiB; more is cut).
const BUFFER: usize = 256 * 1024;

pub fn capture(
    interface: &str,
    out: Option<&Path>,
    duration: Option<u64>,
    ports: &[u16],
) -> anyhow::Result<()> {
    let ports = if ports.is_empty() { &PORTS[..] } else { ports };
    let wanted = if interface == "any" {
        None
    } else {
        Some(nix::net::if_::if_nametoindex(interface).map_err(|e| {
            anyhow::anyhow!(
                "no network interface named '{interface}' ({e}): see 'ip link', or use 'any'"
            )
        })? as usize)
    };
    let link = match wanted {
        Some(_) => match interface_type(interface) {
            Some(ARPHRD_ETHER | ARPHRD_LOOPBACK) => Link::Ethernet,
            _ => Link::Cooked,
        },
        None => Link::Cooked,
    };
    let kind = match link {
        Link::Ethernet => SockType::Raw,
        Link::Cooked => SockType::Datagram,
    };
    let sock = socket(
        AddressFamily::Packet,
        kind,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::EthAll,
    )
    .map_err(|e| match e {
        Errno::EPERM | Errno::EACCES => anyhow::anyhow!(
            "pcap needs root or CAP_NET_RAW: opening a packet socket was refused ({e}); run it with sudo"
        ),
        e => anyhow::anyhow!("opening a packet socket: {e}"),
    })?;
    setsockopt(
        &sock,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(0, POLL.as_micros() as _),
    )
    .context("setting the packet socket's receive timeout")?;
    // A larger buffer loses fewer packets in a burst; the default is only a problem then.
    let _ = setsockopt(&sock, sockopt::RcvBuf, &(4 * 1024 * 1024));
    let stop = stop_on_signals()?;

    let path = match out {
        Some(p) => p.to_path_buf(),
        None => default_file(interface),
    };
    let file = std::fs::File::create(&path)
        .with_context(|| format!("creating the capture file {}", path.display()))?;
    let mut pcap = PcapWriter::new(std::io::BufWriter::new(file), link.linktype())
        .with_context(|| format!("writing {}", path.display()))?;
    let shown: Vec<String> = ports.iter().map(u16::to_string).collect();
    println!(
        "Capturing the cluster's traffic on {interface} (TCP and UDP ports {}) into {}: stop with Ctrl-C{}",
        shown.join(", "),
        path.display(),
        duration.map(|d| format!(" (or after {d} s)")).unwrap_or_default(),
    );
    let _ = std::io::stdout().flush();

    let deadline = duration.map(|d| Instant::now() + Duration::from_secs(d));
    let mut buf = vec![0u8; BUFFER];
    let mut flushed = Instant::now();
    while !stop.load(Ordering::SeqCst) && deadline.is_none_or(|d| Instant::now() < d) {
        let (n, from) = match recvfrom::<LinkAddr>(sock.as_raw_fd(), &mut buf) {
            Ok(got) => got,
            Err(Errno::EAGAIN | Errno::EINTR) => continue,
            // The interface went down or away: keep listening, it may come back.
            Err(Errno::ENETDOWN | Errno::ENXIO) => continue,
            Err(e) => return Err(anyhow::anyhow!("reading the packet socket: {e}")),
        };
        let Some(from) = from else { continue };
        let frame = &buf[..n];
        let meta = Meta {
            ifindex: from.ifindex(),
            pkttype: from.pkttype(),
            hatype: from.hatype(),
            protocol: u16::from_be(from.protocol()),
            halen: from.halen(),
            addr: from.addr().unwrap_or_default(),
        };
        if wanted.is_some_and(|i| i != meta.ifindex) || !keep(link, &meta, frame, ports) {
            continue;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let prefix = match link {
            Link::Ethernet => Vec::new(),
            Link::Cooked => meta.sll_header().to_vec(),
        };
        pcap.write_packet(now, &prefix, frame)
            .with_context(|| format!("writing {}", path.display()))?;
        if flushed.elapsed() >= Duration::from_secs(1) {
            pcap.flush()
                .with_context(|| format!("writing {}", path.display()))?;
            flushed = Instant::now();
        }
    }
    let packets = pcap.packets;
    pcap.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "Wrote {packets} packet{} to {}",
        if packets == 1 { "" } else { "s" },
        path.display()
    );
    Ok(())
}

/// `causeway-lo-20261201T101502.pcap` in the current directory.
fn default_file(interface: &str) -> PathBuf {
    let stamp: String = causeway_common::time::iso8601(causeway_common::time::unix_ms_now())
        .chars()
        .take(19)
        .filter(|c| c.is_ascii_digit() || *c == 'T')
        .collect();
    let name: String = interface
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    PathBuf::from(format!("causeway-{name}-{stamp}.pcap"))
}

/// The interface's ARP hardware type (1 Ethernet, 772 loopback, 65534 none, …).
fn interface_type(name: &str) -> Option<u16> {
    std::fs::read_to_string(format!("/sys/class/net/{name}/type"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A flag set by SIGINT or SIGTERM, from a small runtime on a thread of its own.
fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal watcher")?;
    let (mut int, mut term) = rt
        .block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            ))
        })
        .context("watching for Ctrl-C")?;
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("pcap-signals".into())
        .spawn(move || {
            rt.block_on(async move {
                loop {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                    flag.store(true, Ordering::SeqCst);
                }
            })
        })
        .context("starting the signal watcher")?;
    Ok(stop)
}

/// What the socket reads: whole Ethernet frames, or network packets with the link layer
/// described by the socket address (kept in a Linux cooked header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    Ethernet,
    Cooked,
}

impl Link {
    pub fn linktype(self) -> u32 {
        match self {
            Link::Ethernet => LINKTYPE_ETHERNET,
            Link::Cooked => LINKTYPE_LINUX_SLL,
        }
    }
}

/// The socket address of one packet.
#[derive(Clone, Copy, Debug, Default)]
pub struct Meta {
    pub ifindex: usize,
    pub pkttype: u8,
    pub hatype: u16,
    /// The ethertype, host order.
    pub protocol: u16,
    pub halen: usize,
    pub addr: [u8; 6],
}

impl Meta {
    /// The 16-byte Linux cooked header (LINKTYPE_LINUX_SLL), big-endian fields.
    pub fn sll_header(&self) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..2].copy_from_slice(&u16::from(self.pkttype).to_be_bytes());
        h[2..4].copy_from_slice(&self.hatype.to_be_bytes());
        let halen = self.halen.min(self.addr.len());
        h[4..6].copy_from_slice(&(halen as u16).to_be_bytes());
        h[6..6 + halen].copy_from_slice(&self.addr[..halen]);
        h[14..16].copy_from_slice(&self.protocol.to_be_bytes());
        h
    }
}

/// Whether a packet goes into the file: not loopback's sent copy, and TCP or UDP over IPv4
/// or IPv6 with either port in `ports`. Never panics, whatever the bytes.
pub fn keep(link: Link, meta: &Meta, frame: &[u8], ports: &[u16]) -> bool {
    if meta.pkttype == PACKET_OUTGOING && meta.hatype == ARPHRD_LOOPBACK {
        return false;
    }
    let network = match link {
        Link::Ethernet => ethernet_payload(frame),
        Link::Cooked => Some((meta.protocol, frame)),
    };
    network
        .and_then(|(ethertype, packet)| transport_ports(ethertype, packet))
        .is_some_and(|(src, dst)| ports.contains(&src) || ports.contains(&dst))
}

/// The ethertype and payload of an Ethernet frame, past up to two VLAN tags.
pub fn ethernet_payload(frame: &[u8]) -> Option<(u16, &[u8])> {
    let mut ethertype = be16(frame, 12)?;
    let mut offset = 14;
    for _ in 0..2 {
        if !matches!(ethertype, 0x8100 | 0x88a8 | 0x9100) {
            break;
        }
        ethertype = be16(frame, offset + 2)?;
        offset += 4;
    }
    Some((ethertype, frame.get(offset..)?))
}

/// (source port, destination port) of a TCP or UDP packet over IPv4 or IPv6; `None` for
/// anything else, a fragment after the first, or a packet too short to say.
pub fn transport_ports(ethertype: u16, packet: &[u8]) -> Option<(u16, u16)> {
    let (protocol, offset) = match ethertype {
        ETHERTYPE_IPV4 => {
            let first = *packet.first()?;
            if first >> 4 != 4 {
                return None;
            }
            let header = usize::from(first & 0x0f) * 4;
            if header < 20 {
                return None;
            }
            // Fragment offset not zero: no transport header here.
            if be16(packet, 6)? & 0x1fff != 0 {
                return None;
            }
            (*packet.get(9)?, header)
        }
        ETHERTYPE_IPV6 => {
            if *packet.first()? >> 4 != 6 {
                return None;
            }
            let mut next = *packet.get(6)?;
            let mut offset = 40;
            // Extension headers, a bounded number of them.
            for _ in 0..8 {
                match next {
                    // Hop-by-hop, routing, destination options.
                    0 | 43 | 60 => {
                        let len = (usize::from(*packet.get(offset + 1)?) + 1) * 8;
                        next = *packet.get(offset)?;
                        offset += len;
                    }
                    // Fragment: only the first one carries the ports.
                    44 => {
                        if be16(packet, offset + 2)? >> 3 != 0 {
                            return None;
                        }
                        next = *packet.get(offset)?;
                        offset += 8;
                    }
                    // Authentication header.
                    51 => {
                        let len = (usize::from(*packet.get(offset + 1)?) + 2) * 4;
                        next = *packet.get(offset)?;
                        offset += len;
                    }
                    _ => break,
                }
            }
            (next, offset)
        }
        _ => return None,
    };
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return None;
    }
    Some((be16(packet, offset)?, be16(packet, offset.checked_add(2)?)?))
}

fn be16(data: &[u8], at: usize) -> Option<u16> {
    let bytes = data.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([bytes[0], bytes[1]]))
}

/// The 24-byte header of a classic pcap file (little-endian, microseconds).
pub fn file_header(linktype: u32) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[0..4].copy_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    h[4..6].copy_from_slice(&2u16.to_le_bytes());
    h[6..8].copy_from_slice(&4u16.to_le_bytes());
    // thiszone and sigfigs: 0.
    h[16..20].copy_from_slice(&SNAPLEN.to_le_bytes());
    h[20..24].copy_from_slice(&linktype.to_le_bytes());
    h
}

/// Writes a classic pcap file: its header, then one record a packet.
pub struct PcapWriter<W: Write> {
    out: W,
    pub packets: u64,
}

impl<W: Write> PcapWriter<W> {
    pub fn new(mut out: W, linktype: u32) -> std::io::Result<Self> {
        out.write_all(&file_header(linktype))?;
        Ok(Self { out, packets: 0 })
    }

    /// One packet, `prefix` (a cooked header, or nothing) then `data`, cut at [`SNAPLEN`];
    /// `ts` is the time since the Unix epoch.
    pub fn write_packet(
        &mut self,
        ts: Duration,
        prefix: &[u8],
        data: &[u8],
    ) -> std::io::Result<()> {
        let orig = prefix.len() + data.len();
        let incl = orig.min(SNAPLEN as usize);
        let mut record = [0u8; 16];
        // Seconds wrap in 2106, as the format's do.
        record[0..4].copy_from_slice(&(ts.as_secs() as u32).to_le_bytes());
        record[4..8].copy_from_slice(&ts.subsec_micros().to_le_bytes());
        record[8..12].copy_from_slice(&(incl as u32).to_le_bytes());
        record[12..16].copy_from_slice(&u32::try_from(orig).unwrap_or(u32::MAX).to_le_bytes());
        self.out.write_all(&record)?;
        let from_prefix = prefix.len().min(incl);
        self.out.write_all(&prefix[..from_prefix])?;
        self.out.write_all(&data[..incl - from_prefix])?;
        self.packets += 1;
        Ok(())
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet frame (zero addresses) around `packet`.
    fn ether(ethertype: u16, packet: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(packet);
        f
    }

    fn ipv4(protocol: u8, src: u16, dst: u16) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[9] = protocol;
        p[12..16].copy_from_slice(&[127, 0, 89, 1]);
        p[16..20].copy_from_slice(&[127, 0, 89, 2]);
        p.extend_from_slice(&src.to_be_bytes());
        p.extend_from_slice(&dst.to_be_bytes());
        p.extend_from_slice(&[0u8; 16]);
        p
    }

    fn ipv6(next: u8, extension: &[u8], src: u16, dst: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[6] = next;
        p.extend_from_slice(extension);
        p.extend_from_slice(&src.to_be_bytes());
        p.extend_from_slice(&dst.to_be_bytes());
        p.extend_from_slice(&[0u8; 16]);
        p
    }

    fn incoming() -> Meta {
        Meta {
            hatype: ARPHRD_ETHER,
            ..Meta::default()
        }
    }

    #[test]
    fn ipv4_tcp_and_udp_to_or_from_a_cluster_port_are_kept() {
        let m = incoming();
        assert!(keep(
            Link::Ethernet,
            &m,
            &ether(0x0800, &ipv4(6, 40000, 4372)),
            &PORTS
        ));
        assert!(keep(
            Link::Ethernet,
            &m,
            &ether(0x0800, &ipv4(6, 4372, 40000)),
            &PORTS
        ));
        assert!(keep(
            Link::Ethernet,
            &m,
            &ether(0x0800, &ipv4(17, 5060, 5060)),
            &PORTS
        ));
        assert!(!keep(
            Link::Ethernet,
            &m,
            &ether(0x0800, &ipv4(17, 40000, 9)),
            &PORTS
        ));
        assert!(!keep(
            Link::Ethernet,
            &m,
            &ether(0x0800, &ipv4(6, 22, 40000)),
            &PORTS
        ));
        // Not TCP or UDP (ICMP), whatever the bytes where ports would be.
        assert!(!keep(
            Link::Ethernet,
            &m,
            &ether(0x0800, &ipv4(1, 4372, 4372)),
            &PORTS
        ));
        // ARP.
        assert!(!keep(
            Link::Ethernet,
            &m,
            &ether(0x0806, &ipv4(6, 4372, 4372)),
            &PORTS
        ));
    }

    #[test]
    fn ip_options_and_fragments_are_read_right() {
        let mut p = ipv4(6, 0, 0);
        // IHL 6: four bytes of options before the ports.
        p[0] = 0x46;
        p.splice(20..20, [1, 1, 1, 1]);
        p[24..26].copy_from_slice(&4372u16.to_be_bytes());
        assert_eq!(transport_ports(0x0800, &p), Some((4372, 0)));
        // A later fragment has no ports, even if the bytes look like some.
        let mut frag = ipv4(6, 4372, 4372);
        frag[6..8].copy_from_slice(&0x0010u16.to_be_bytes());
        assert_eq!(transport_ports(0x0800, &frag), None);
        // The first fragment (more-fragments set, offset 0) has them.
        frag[6..8].copy_from_slice(&0x2000u16.to_be_bytes());
        assert_eq!(transport_ports(0x0800, &frag), Some((4372, 4372)));
    }

    #[test]
    fn ipv6_with_and_without_extension_headers() {
        let m = incoming();
        assert!(keep(
            Link::Ethernet,
            &m,
            &ether(0x86dd, &ipv6(6, &[], 40000, 5061)),
            &PORTS
        ));
        assert!(!keep(
            Link::Ethernet,
            &m,
            &ether(0x86dd, &ipv6(17, &[], 40000, 53)),
            &PORTS
        ));
        // Hop-by-hop (8 bytes) then UDP.
        let hop = [17, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            transport_ports(0x86dd, &ipv6(0, &hop, 5432, 1)),
            Some((5432, 1))
        );
        // A first fragment then TCP; a later one has no ports.
        let first = [6, 0, 0, 1, 0, 0, 0, 7];
        assert_eq!(
            transport_ports(0x86dd, &ipv6(44, &first, 9899, 2)),
            Some((9899, 2))
        );
        let later = [6, 0, 0, 0x19, 0, 0, 0, 7];
        assert_eq!(transport_ports(0x86dd, &ipv6(44, &later, 9899, 2)), None);
        // Version nibble wrong.
        let mut bad = ipv6(6, &[], 4372, 4372);
        bad[0] = 0x40;
        assert_eq!(transport_ports(0x86dd, &bad), None);
    }

    #[test]
    fn vlan_tags_are_skipped_and_plain_frames_need_none() {
        let p = ipv4(6, 1, 4372);
        let mut tagged = vec![0u8; 12];
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x05, 0x08, 0x00]);
        tagged.extend_from_slice(&p);
        assert_eq!(ethernet_payload(&tagged), Some((0x0800, &p[..])));
        assert_eq!(ethernet_payload(&ether(0x0800, &p)), Some((0x0800, &p[..])));
        assert!(keep(Link::Ethernet, &incoming(), &tagged, &PORTS));
    }

    #[test]
    fn short_and_garbage_frames_are_dropped_without_a_panic() {
        let m = incoming();
        let whole = ether(0x0800, &ipv4(6, 1, 4372));
        // Every cut of a good frame, and of an IPv6 one with an extension header.
        for cut in 0..whole.len() {
            let kept = keep(Link::Ethernet, &m, &whole[..cut], &PORTS);
            assert!(!kept || cut >= 14 + 20 + 4, "kept a frame cut at {cut}");
        }
        let v6 = ether(0x86dd, &ipv6(0, &[6, 0, 0, 0, 0, 0, 0, 0], 1, 4372));
        for cut in 0..v6.len() {
            let _ = keep(Link::Ethernet, &m, &v6[..cut], &PORTS);
        }
        assert!(keep(Link::Ethernet, &m, &v6, &PORTS));
        // Pseudo-random garbage, with the ethertype forced to IPv4 or IPv6 half the time.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 120) as usize;
            let mut frame: Vec<u8> = (0..len).map(|i| (x >> (i % 56)) as u8).collect();
            if len >= 15 && round % 2 == 0 {
                frame[12..14].copy_from_slice(if round % 4 == 0 {
                    &[0x08, 0]
                } else {
                    &[0x86, 0xdd]
                });
                frame[14] = if round % 4 == 0 { 0x4f } else { 0x60 };
            }
            let _ = keep(Link::Ethernet, &m, &frame, &PORTS);
            let _ = keep(
                Link::Cooked,
                &Meta {
                    protocol: 0x86dd,
                    ..m
                },
                &frame,
                &PORTS,
            );
            let _ = keep(
                Link::Cooked,
                &Meta {
                    protocol: 0x0800,
                    ..m
                },
                &frame,
                &PORTS,
            );
        }
        // An IPv4 header length below 20 is refused.
        let mut short_ihl = ipv4(6, 4372, 4372);
        short_ihl[0] = 0x44;
        assert_eq!(transport_ports(0x0800, &short_ihl), None);
    }

    #[test]
    fn loopback_sent_copies_are_dropped_others_kept() {
        let frame = ether(0x0800, &ipv4(6, 1, 4372));
        let lo = |pkttype| Meta {
            pkttype,
            hatype: ARPHRD_LOOPBACK,
            ..Meta::default()
        };
        assert!(keep(Link::Ethernet, &lo(0), &frame, &PORTS));
        assert!(!keep(Link::Ethernet, &lo(PACKET_OUTGOING), &frame, &PORTS));
        // On a real interface what we send is seen once: kept.
        let eth_out = Meta {
            pkttype: PACKET_OUTGOING,
            ..incoming()
        };
        assert!(keep(Link::Ethernet, &eth_out, &frame, &PORTS));
    }

    #[test]
    fn cooked_packets_use_the_socket_protocol() {
        let m = Meta {
            protocol: 0x0800,
            hatype: 65534,
            ..Meta::default()
        };
        assert!(keep(Link::Cooked, &m, &ipv4(17, 5060, 40000), &PORTS));
        assert!(!keep(
            Link::Cooked,
            &Meta {
                protocol: 0x0806,
                ..m
            },
            &ipv4(17, 5060, 40000),
            &PORTS
        ));
    }

    #[test]
    fn the_file_header_is_classic_pcap() {
        assert_eq!(
            file_header(LINKTYPE_ETHERNET),
            [
                0xd4, 0xc3, 0xb2, 0xa1, // magic, little-endian: microseconds
                2, 0, 4, 0, // version 2.4
                0, 0, 0, 0, // thiszone
                0, 0, 0, 0, // sigfigs
                0xff, 0xff, 0, 0, // snaplen 65535
                1, 0, 0, 0, // Ethernet
            ]
        );
        assert_eq!(file_header(LINKTYPE_LINUX_SLL)[20..], [113, 0, 0, 0]);
    }

    #[test]
    fn records_carry_time_lengths_and_cut_at_the_snaplen() {
        let mut w = PcapWriter::new(Vec::new(), LINKTYPE_LINUX_SLL).unwrap();
        let ts = Duration::new(1_595_362_610, 321_654_000);
        w.write_packet(ts, &[0xaa; 16], &[0xbb; 4]).unwrap();
        w.write_packet(ts, &[], &vec![0xcc; 70_000]).unwrap();
        assert_eq!(w.packets, 2);
        let bytes = w.out;
        let r = &bytes[24..];
        assert_eq!(r[0..4], 1_595_362_610u32.to_le_bytes());
        assert_eq!(r[4..8], 321_654u32.to_le_bytes());
        assert_eq!(r[8..12], 20u32.to_le_bytes());
        assert_eq!(r[12..16], 20u32.to_le_bytes());
        assert_eq!(r[16..32], [0xaa; 16]);
        assert_eq!(r[32..36], [0xbb; 4]);
        let r = &r[36..];
        assert_eq!(r[8..12], 65_535u32.to_le_bytes());
        assert_eq!(r[12..16], 70_000u32.to_le_bytes());
        assert_eq!(r.len(), 16 + 65_535);
    }

    #[test]
    fn the_cooked_header_follows_the_format() {
        let m = Meta {
            ifindex: 1,
            pkttype: 4,
            hatype: 1,
            protocol: 0x86dd,
            halen: 6,
            addr: [1, 2, 3, 4, 5, 6],
        };
        assert_eq!(
            m.sll_header(),
            [0, 4, 0, 1, 0, 6, 1, 2, 3, 4, 5, 6, 0, 0, 0x86, 0xdd]
        );
    }
}
