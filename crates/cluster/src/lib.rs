//! A Causeway node's cluster role: its configuration file, the mesh to its peers, and the
//! alarms that follow from what the mesh sees (EX-1…EX-6, EX-11, OP-1).
#![forbid(unsafe_code)]

pub mod backup;
pub mod config;
pub mod leases;
pub mod metrics;
mod node;
mod peer_alarms;
pub mod service;
pub mod xconfig;

/// The node's operator-facing errors: a message saying what to do, and a code.
pub use causeway_common::error::Refusal as NodeError;
pub use config::{
    prefix_len as ha_prefix_len, CapacityClass, ConfigError, DatabaseSection, HaMode, HaRole,
    HaSection, NodeConfig, SipSection,
};
pub use leases::{LeaseStatus, Leases};
pub use node::{ClusterStatus, Node, NodeStore, PeerAlarm, SetOutcome};
pub use peer_alarms::{peer_alarms, MANAGED_ALARMS};
pub use service::Service;
pub use xconfig::ConfigItem;
