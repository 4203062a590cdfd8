//! Owner-based replication (see `docs/replication.md`): streams of records carrying
//! `(owner, generation, seq)`, pushed by their owner at once, compared by digest on every
//! heartbeat, fetched by range or snapshot when a peer is behind, persisted in the store.
#![forbid(unsafe_code)]

mod bytes_serde;
mod engine;
pub mod keyring;
pub mod lifecycle;
mod stream;
pub mod wire;

pub use engine::{
    config_stream, Engine, EngineCounters, EngineSettings, NoObserver, Observer, Origin, PeerLink,
    PeerReplication, ReplicationStatus, WriteError, WriteOutcome,
};
/// Reads every stream of `store` as the engine would: an error means the store is damaged.
pub fn check_store(
    store: &dyn causeway_store::Store,
    keyring: Option<&keyring::Keyring>,
) -> Result<(), LoadError> {
    stream::Stream::load_all(store, keyring).map(|_| ())
}

pub use stream::{overwrite_in_store, Applied, Header, LoadError, NodeId, Record, StreamId};
pub use wire::{Change, CHANNEL};
