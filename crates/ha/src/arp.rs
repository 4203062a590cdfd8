//! Announcing the virtual IP after it moves (docs/ha.md, section 4): gratuitous ARP
//! requests (sender IP = target IP = the VIP, the form keepalived sends and Linux accepts
//! over `locktime`) on a packet socket bound to the interface, on a schedule.
//!
//! The packet socket is the crate's only `unsafe`: `socket`, `bind` and `sendto` with a
//! `sockaddr_ll`, each block with its reason.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;

/// When the frames go out after the address is added: six, as keepalived's
/// `garp_master_delay` repeat does, the first at once.
pub const SCHEDULE_MS: [u64; 6] = [0, 10, 50, 200, 1000, 5000];

/// A gratuitous ARP request for `ip` from `mac`, broadcast: 42 bytes.
pub fn garp_request(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]); // to everyone
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&ETH_P_IP.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // target hardware address: zeros; target protocol address: the VIP itself
    f[38..42].copy_from_slice(&ip.octets());
    f
}

const ETH_P_IPV6: u16 = 0x86dd;

/// An unsolicited neighbour advertisement for `ip` from `mac` (RFC 4861 §7.2.6), to all
/// nodes (ff02::1): Override set, Solicited clear, hop limit 255, the target link-layer
/// address option; 86 bytes.
pub fn unsolicited_na(mac: [u8; 6], ip: std::net::Ipv6Addr) -> [u8; 86] {
    let all_nodes = std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut f = [0u8; 86];
    f[0..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 1]); // ff02::1's multicast MAC
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    // IPv6 header
    f[14] = 0x60;
    f[18..20].copy_from_slice(&32u16.to_be_bytes()); // payload: the ICMPv6 message
    f[20] = 58; // ICMPv6
    f[21] = 255; // hop limit: receivers drop an NA with any other
    f[22..38].copy_from_slice(&ip.octets());
    f[38..54].copy_from_slice(&all_nodes.octets());
    // ICMPv6 neighbour advertisement
    f[54] = 136;
    f[58] = 0x20; // R=0 S=0 O=1
    f[62..78].copy_from_slice(&ip.octets());
    f[78] = 2; // target link-layer address
    f[79] = 1; // length in units of 8 bytes
    f[80..86].copy_from_slice(&mac);
    let sum = icmpv6_checksum(&ip, &all_nodes, &f[54..86]);
    f[56..58].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The ICMPv6 checksum over the pseudo-header and `message` (its checksum field zero).
fn icmpv6_checksum(src: &std::net::Ipv6Addr, dst: &std::net::Ipv6Addr, message: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(message.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(message);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// If `frame` is an ARP packet, its (operation, sender MAC, sender IP, target IP).
pub fn parse_arp(frame: &[u8]) -> Option<(u16, [u8; 6], Ipv4Addr, Ipv4Addr)> {
    if frame.len() < 42 || frame[12..14] != ETH_P_ARP.to_be_bytes() {
        return None;
    }
    let op = u16::from_be_bytes([frame[20], frame[21]]);
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&frame[22..28]);
    let spa = Ipv4Addr::new(frame[28], frame[29], frame[30], frame[31]);
    let tpa = Ipv4Addr::new(frame[38], frame[39], frame[40], frame[41]);
    Some((op, mac, spa, tpa))
}

/// If `frame` is an ARP packet in which another host (a MAC that is not `ours`) says it
/// has `ip` (the sender address), that MAC. Requests asking for `ip` are not claims.
pub fn claims_from_another(frame: &[u8], ip: Ipv4Addr, ours: [u8; 6]) -> Option<[u8; 6]> {
    let (_, mac, sender, _) = parse_arp(frame)?;
    (sender == ip && mac != ours).then_some(mac)
}

/// `02:00:5e:00:01:0a`
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A packet socket bound to one interface, for ARP frames.
pub struct ArpSocket {
    fd: OwnedFd,
    ifindex: i32,
    pub mac: [u8; 6],
}

fn sockaddr(ifindex: i32) -> libc::sockaddr_ll {
    libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: ETH_P_ARP.to_be(),
        sll_ifindex: ifindex,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0],
    }
}

impl ArpSocket {
    /// Opens the socket on `interface` (needs CAP_NET_RAW).
    pub fn open(interface: &str) -> std::io::Result<Self> {
        let name = std::ffi::CString::new(interface)
            .map_err(|_| std::io::Error::other("interface name with a NUL byte"))?;
        // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        if ifindex == 0 {
            return Err(std::io::Error::other(format!(
                "interface '{interface}' does not exist"
            )));
        }
        // SAFETY: plain socket(2) call; the descriptor is owned by `OwnedFd` at once.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ARP.to_be()),
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor this function just opened and nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mac = read_mac(&fd, interface)?;
        let addr = sockaddr(ifindex);
        // SAFETY: `addr` is a fully initialised sockaddr_ll and the length is its size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { fd, ifindex, mac })
    }

    /// Sends one frame to the link's broadcast address.
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        let addr = sockaddr(self.ifindex);
        // SAFETY: `frame` is valid for `frame.len()` bytes; `addr` is initialised and sized.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one frame into `buf` (blocking; for tests and the conflict watch).
    pub fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Gives up waiting in `recv` after `timeout`.
    pub fn set_read_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: `tv` is an initialised timeval and the length is its size.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Announces `ip` on the schedule, until done or the future is dropped (a demotion).
    pub async fn announce(&self, ip: Ipv4Addr) -> std::io::Result<()> {
        let frame = garp_request(self.mac, ip);
        let start = tokio::time::Instant::now();
        for at in SCHEDULE_MS {
            tokio::time::sleep_until(start + Duration::from_millis(at)).await;
            self.send(&frame)?;
        }
        Ok(())
    }
}

/// The interface's MAC address (SIOCGIFHWADDR, which answers in the caller's network
/// namespace; /sys shows the namespace it was mounted in).
fn read_mac(fd: &OwnedFd, interface: &str) -> std::io::Result<[u8; 6]> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = interface.as_bytes();
    if name.len() >= req.ifr_name.len() {
        return Err(std::io::Error::other(format!(
            "interface name '{interface}' is too long"
        )));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    // SAFETY: `req` is an initialised ifreq naming the interface; the kernel fills in
    // `ifru_hwaddr`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: after SIOCGIFHWADDR succeeded, `ifru_hwaddr` is the active union member.
    let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(hw.sa_data.iter()) {
        *d = *s as u8;
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_an_arp_frame_naming_the_address_as_its_sender_from_another_mac() {
        let vip = Ipv4Addr::new(198, 18, 0, 10);
        let (ours, theirs) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        assert_eq!(
            claims_from_another(&garp_request(ours, vip), vip, ours),
            None
        );
        assert_eq!(
            claims_from_another(&garp_request(theirs, vip), vip, ours),
            Some(theirs)
        );
        // A frame about another address is not a claim on ours.
        let other = Ipv4Addr::new(198, 18, 0, 11);
        assert_eq!(
            claims_from_another(&garp_request(theirs, other), vip, ours),
            None
        );
        assert_eq!(claims_from_another(&[0u8; 20], vip, ours), None);
        assert_eq!(mac_text(theirs), "02:00:00:00:00:02");
    }

    #[test]
    fn a_gratuitous_arp_request_byte_for_byte() {
        let mac = [0x02, 0x00, 0x5e, 0x10, 0x00, 0x01];
        let f = garp_request(mac, Ipv4Addr::new(198, 18, 0, 10));
        let want: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // broadcast
            0x02, 0x00, 0x5e, 0x10, 0x00, 0x01, // from us
            0x08, 0x06, // ARP
            0x00, 0x01, 0x08, 0x00, 6, 4, // Ethernet, IPv4
            0x00, 0x01, // request
            0x02, 0x00, 0x5e, 0x10, 0x00, 0x01, 198, 18, 0, 10, // sender: us, the VIP
            0, 0, 0, 0, 0, 0, 198, 18, 0, 10, // target: the VIP
        ];
        assert_eq!(f, want);
        assert_eq!(
            parse_arp(&f),
            Some((
                1,
                mac,
                Ipv4Addr::new(198, 18, 0, 10),
                Ipv4Addr::new(198, 18, 0, 10)
            ))
        );
        assert_eq!(parse_arp(&f[..30]), None);
    }

    #[test]
    fn an_unsolicited_neighbour_advertisement_checks_out() {
        let mac = [0x02, 0, 0, 0, 0, 0x11];
        let ip: std::net::Ipv6Addr = "2001:db8::10".parse().unwrap();
        let f = unsolicited_na(mac, ip);
        assert_eq!(&f[0..6], &[0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        assert_eq!((f[20], f[21]), (58, 255));
        assert_eq!(f[54], 136, "neighbour advertisement");
        assert_eq!(f[58], 0x20, "Override only");
        assert_eq!(&f[62..78], &ip.octets());
        assert_eq!(&f[80..86], &mac);
        // A receiver's sum over the pseudo-header and the message, checksum included, is
        // 0xffff (its complement zero).
        let all_nodes = std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
        assert_eq!(icmpv6_checksum(&ip, &all_nodes, &f[54..86]), 0);
    }

    #[test]
    fn the_schedule_starts_at_once_and_ends_at_five_seconds() {
        assert_eq!(SCHEDULE_MS[0], 0);
        assert!(SCHEDULE_MS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(SCHEDULE_MS.len(), 6);
    }
}
