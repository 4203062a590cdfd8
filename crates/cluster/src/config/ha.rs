//! † The `[ha]` section (HA pairs, docs/ha.md section 1): this node's role in a pair and,
//! on a primary, the pair's virtual IP and settings. Checked at load, naming the field,
//! before any port is bound.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HaRole {
    Primary,
    Secondary,
    /// Gives a pair its majority: votes, never holds the address.
    Witness,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HaMode {
    Automatic,
    Manual,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CapacityClass {
    Low,
    Standard,
    High,
}

/// The lease of a pair lasts 150 ms; a failover wait below it plus 10 ms cannot be met.
pub const MIN_FAILOVER_WAIT_MS: u64 = 160;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaSection {
    pub role: HaRole,
    /// The interface that carries `node.address`, this node's health-monitor address.
    pub health_monitor_interface: String,
    /// An interface of its own for heartbeats and replication to the pair peer.
    #[serde(default)]
    pub direct_connect_interface: Option<String>,
    #[serde(default = "standard")]
    pub capacity_class: CapacityClass,
    /// A peer number, "cluster", or "none".
    #[serde(default)]
    pub witness: Option<String>,
    #[serde(default)]
    pub recovery_mode: bool,
    #[serde(default)]
    pub files_dir: Option<PathBuf>,
    #[serde(default)]
    pub on_promote: Option<PathBuf>,
    #[serde(default)]
    pub on_demote: Option<PathBuf>,
    // Primary only.
    #[serde(default)]
    pub virtual_ip: Option<IpAddr>,
    /// Dotted (`255.255.255.0`) or a prefix length (`24`).
    #[serde(default)]
    pub netmask: Option<String>,
    #[serde(default)]
    pub secondary: Option<usize>,
    #[serde(default = "automatic")]
    pub failover: HaMode,
    #[serde(default = "manual")]
    pub failback: HaMode,
    #[serde(default = "failover_wait_ms")]
    pub failover_wait_ms: u64,
    #[serde(default = "guard_window_s")]
    pub guard_window_s: u64,
    // Secondary only: the primaries it backs up, by peer number.
    #[serde(default)]
    pub primaries: Vec<usize>,
}

fn standard() -> CapacityClass {
    CapacityClass::Standard
}
fn automatic() -> HaMode {
    HaMode::Automatic
}
fn manual() -> HaMode {
    HaMode::Manual
}
fn failover_wait_ms() -> u64 {
    MIN_FAILOVER_WAIT_MS
}
fn guard_window_s() -> u64 {
    300
}

/// The prefix length of `netmask` (dotted or a number), for an address of `vip`'s family.
pub fn prefix_len(netmask: &str, vip: IpAddr) -> Result<u8, String> {
    let max = if vip.is_ipv4() { 32 } else { 128 };
    if let Ok(n) = netmask.trim_start_matches('/').parse::<u8>() {
        return if n <= max && n > 0 {
            Ok(n)
        } else {
            Err(format!("a prefix length must be 1 to {max}, not {n}"))
        };
    }
    let bits: u128 = match (netmask.parse::<IpAddr>(), vip) {
        (Ok(IpAddr::V4(m)), IpAddr::V4(_)) => u128::from(u32::from(m)) << 96,
        (Ok(IpAddr::V6(m)), IpAddr::V6(_)) => u128::from(m),
        _ => {
            return Err(format!(
                "'{netmask}' is neither a prefix length nor a netmask of the virtual IP's family"
            ))
        }
    };
    let ones = bits.leading_ones();
    if bits.count_ones() != ones || ones == 0 {
        return Err(format!("'{netmask}' is not a contiguous netmask"));
    }
    Ok(ones as u8)
}

fn same_subnet(a: IpAddr, b: IpAddr, prefix: u8) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

impl HaSection {
    /// Checks the section against the node's address (its health-monitor address), the
    /// peer list and its own peer number. `Err((field, message))` names what is wrong.
    pub fn check(
        &self,
        node_address: &str,
        peers: &[String],
        me: usize,
    ) -> Result<(), (&'static str, String)> {
        let peer_ok = |p: usize| p >= 1 && p <= peers.len() && p != me;
        if let Some(w) = &self.witness {
            if !matches!(w.as_str(), "cluster" | "none") {
                let n: usize = w.parse().map_err(|_| {
                    (
                        "ha.witness",
                        format!("'{w}' is not a peer number, \"cluster\" or \"none\""),
                    )
                })?;
                if !peer_ok(n) || self.secondary == Some(n) || self.primaries.contains(&n) {
                    return Err((
                        "ha.witness",
                        format!("Peer {n} cannot be the witness: it must be another peer of the list and not a member of the pair"),
                    ));
                }
            }
        }
        match self.role {
            HaRole::Witness => {
                if self.virtual_ip.is_some() {
                    return Err(("ha.virtual_ip", "a witness holds no virtual IP".into()));
                }
                Ok(())
            }
            HaRole::Secondary => {
                if self.virtual_ip.is_some() {
                    return Err((
                        "ha.virtual_ip",
                        "Not Applicable for a secondary: it learns each primary's virtual IP at pairing".into(),
                    ));
                }
                if self.primaries.is_empty() || self.primaries.len() > 2 {
                    return Err((
                        "ha.primaries",
                        "a secondary backs up one or two primaries, by peer number".into(),
                    ));
                }
                if let Some(p) = self.primaries.iter().find(|&&p| !peer_ok(p)) {
                    return Err((
                        "ha.primaries",
                        format!("Peer {p} is not another peer of the peer list"),
                    ));
                }
                if self.primaries.len() == 2 && self.capacity_class == CapacityClass::Low {
                    return Err((
                        "ha.capacity_class",
                        "a secondary of two primaries must be of class standard or high".into(),
                    ));
                }
                Ok(())
            }
            HaRole::Primary => {
                let vip = self.virtual_ip.ok_or((
                    "ha.virtual_ip",
                    "a primary needs the pair's virtual IP".to_string(),
                ))?;
                let mask = self.netmask.as_deref().ok_or((
                    "ha.netmask",
                    "a primary needs the virtual IP's netmask".to_string(),
                ))?;
                let prefix = prefix_len(mask, vip).map_err(|m| ("ha.netmask", m))?;
                let unusable = match vip {
                    IpAddr::V4(v) => {
                        v.is_loopback()
                            || v.is_link_local()
                            || v.is_multicast()
                            || v.is_broadcast()
                            || v.is_unspecified()
                            || (prefix < 31
                                && (u32::from(v) & !(u32::MAX << (32 - prefix)) == 0
                                    || u32::from(v) | (u32::MAX << (32 - prefix)) == u32::MAX))
                    }
                    IpAddr::V6(v) => {
                        v.is_loopback()
                            || v.is_multicast()
                            || v.is_unspecified()
                            || (v.segments()[0] & 0xffc0) == 0xfe80
                    }
                };
                if unusable {
                    return Err((
                        "ha.virtual_ip",
                        format!("{vip}/{prefix} is a network, broadcast, loopback, link-local or multicast address"),
                    ));
                }
                let hm: IpAddr = node_address.parse().map_err(|_| {
                    (
                        "node.address",
                        format!("'{node_address}' is not an IP address: an HA node's address is its health-monitor address"),
                    )
                })?;
                if hm == vip || peers.iter().any(|p| p.parse() == Ok(vip)) {
                    return Err((
                        "ha.virtual_ip",
                        format!("{vip} is this node's health-monitor address or a peer's address: the virtual IP must be an address of its own"),
                    ));
                }
                if !same_subnet(vip, hm, prefix) {
                    return Err((
                        "ha.virtual_ip",
                        format!("{vip}/{prefix} is not in the subnet of the health-monitor address {hm}: both must be on the same layer-2 network"),
                    ));
                }
                let secondary = self.secondary.ok_or((
                    "ha.secondary",
                    "a primary names its secondary by peer number".to_string(),
                ))?;
                if !peer_ok(secondary) {
                    return Err((
                        "ha.secondary",
                        format!("Peer {secondary} is not another peer of the peer list"),
                    ));
                }
                if self.failover_wait_ms < MIN_FAILOVER_WAIT_MS {
                    return Err((
                        "ha.failover_wait_ms",
                        format!(
                            "{} ms is below the pair's lease plus 10 ms ({MIN_FAILOVER_WAIT_MS} ms)",
                            self.failover_wait_ms
                        ),
                    ));
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary() -> HaSection {
        toml::from_str(
            r#"
role = "primary"
health_monitor_interface = "eth0"
virtual_ip = "198.18.0.10"
netmask = "255.255.255.0"
secondary = 2
witness = "3"
"#,
        )
        .unwrap()
    }

    fn peers() -> Vec<String> {
        vec![
            "198.18.0.11".into(),
            "198.18.0.12".into(),
            "198.18.0.13".into(),
        ]
    }

    #[test]
    fn a_good_primary_passes_with_the_defaults() {
        let p = primary();
        assert_eq!(p.failover, HaMode::Automatic);
        assert_eq!(p.failback, HaMode::Manual);
        assert_eq!(p.failover_wait_ms, 160);
        assert_eq!(p.check("198.18.0.11", &peers(), 1), Ok(()));
    }

    #[test]
    fn netmasks_are_dotted_or_prefix_lengths_and_contiguous() {
        let v4: IpAddr = "198.18.0.10".parse().unwrap();
        assert_eq!(prefix_len("255.255.255.0", v4), Ok(24));
        assert_eq!(prefix_len("24", v4), Ok(24));
        assert_eq!(prefix_len("/16", v4), Ok(16));
        assert!(prefix_len("255.0.255.0", v4)
            .unwrap_err()
            .contains("contiguous"));
        assert!(prefix_len("33", v4).is_err());
        let v6: IpAddr = "2001:db8::10".parse().unwrap();
        assert_eq!(prefix_len("64", v6), Ok(64));
        assert!(prefix_len("255.255.255.0", v6).is_err());
    }

    #[test]
    fn each_wrong_field_is_named() {
        let check = |edit: &dyn Fn(&mut HaSection), hm: &str| {
            let mut p = primary();
            edit(&mut p);
            p.check(hm, &peers(), 1).unwrap_err()
        };
        let (f, m) = check(
            &|p| p.virtual_ip = Some("198.18.0.11".parse().unwrap()),
            "198.18.0.11",
        );
        assert_eq!(f, "ha.virtual_ip");
        assert!(m.contains("address of its own"), "{m}");
        let (f, m) = check(
            &|p| p.virtual_ip = Some("198.19.0.10".parse().unwrap()),
            "198.18.0.11",
        );
        assert_eq!(f, "ha.virtual_ip");
        assert!(
            m.contains("not in the subnet of the health-monitor address 198.18.0.11"),
            "{m}"
        );
        let (f, m) = check(
            &|p| p.virtual_ip = Some("198.18.0.255".parse().unwrap()),
            "198.18.0.11",
        );
        assert_eq!(f, "ha.virtual_ip");
        assert!(m.contains("broadcast"), "{m}");
        let (f, _) = check(
            &|p| p.virtual_ip = Some("198.18.0.0".parse().unwrap()),
            "198.18.0.11",
        );
        assert_eq!(f, "ha.virtual_ip");
        let (f, _) = check(&|p| p.failover_wait_ms = 100, "198.18.0.11");
        assert_eq!(f, "ha.failover_wait_ms");
        let (f, _) = check(&|p| p.secondary = Some(1), "198.18.0.11");
        assert_eq!(f, "ha.secondary");
        let (f, _) = check(&|p| p.witness = Some("2".into()), "198.18.0.11");
        assert_eq!(f, "ha.witness");
        let (f, _) = check(&|_| {}, "hm.example.com");
        assert_eq!(f, "node.address");
        // A /16 takes in both.
        let mut p = primary();
        p.netmask = Some("16".into());
        p.virtual_ip = Some("198.18.7.10".parse().unwrap());
        assert_eq!(p.check("198.18.0.11", &peers(), 1), Ok(()));
    }

    #[test]
    fn a_secondary_backs_up_one_or_two_primaries() {
        let mut s: HaSection = toml::from_str(
            "role = \"secondary\"\nhealth_monitor_interface = \"eth0\"\nprimaries = [1, 3]\n",
        )
        .unwrap();
        assert_eq!(s.check("198.18.0.12", &peers(), 2), Ok(()));
        s.capacity_class = CapacityClass::Low;
        assert_eq!(
            s.check("198.18.0.12", &peers(), 2).unwrap_err().0,
            "ha.capacity_class"
        );
        s.primaries = vec![];
        assert_eq!(
            s.check("198.18.0.12", &peers(), 2).unwrap_err().0,
            "ha.primaries"
        );
        s.primaries = vec![2];
        assert_eq!(
            s.check("198.18.0.12", &peers(), 2).unwrap_err().0,
            "ha.primaries"
        );
        s.primaries = vec![1];
        s.virtual_ip = Some("198.18.0.10".parse().unwrap());
        assert!(s
            .check("198.18.0.12", &peers(), 2)
            .unwrap_err()
            .1
            .contains("Not Applicable"));
    }
}
