//! HA pairs (HA-1…HA-11, `docs/ha.md`): a primary and a secondary with a virtual IP that
//! the holder of the pair's lease has, the seed's states, failover and failback.
//!
//! Built so far: the states and their transitions ([`transitions`]). The service, the
//! address keeper and the virtual IP come next (docs/ha.md, section 13 for the order).

pub mod transitions;
