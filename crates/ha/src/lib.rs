//! HA pairs (HA-1…HA-11, `docs/ha.md`): a primary and a secondary with a virtual IP that
//! the holder of the pair's lease has, the seed's states, failover and failback.
//!
//! Built so far: the states and their transitions ([`transitions`]), the virtual IP by
//! netlink ([`vip`]) and its announcement by gratuitous ARP ([`arp`]). The service, the
//! address keeper and the pair's lease come next (docs/ha.md).

pub mod arp;
pub mod transitions;
pub mod vip;
