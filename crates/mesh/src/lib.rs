//! The full mesh of cluster links between peers (see `docs/mesh.md`).
//!
//! [`Mesh`] holds one session per peer over a [`Transport`]: [`TlsTransport`] in the product,
//! [`MemoryNetwork`] (with partitions, delays, loss) in in-process cluster tests.
#![forbid(unsafe_code)]

mod hello;
mod memory;
mod mesh;
mod resolve;
pub mod rpc;
mod settings;
mod status;
mod tls;
mod transport;
pub mod wire;

pub use hello::{check_hello, Refusal, RefuseField};
pub use memory::{MemoryNetwork, MemoryTransport};
pub use mesh::{Inbound, Mesh, SendError};
pub use resolve::{Resolver, SystemResolver};
pub use settings::{ClusterSettings, IpVersion, Timing, MAX_PEERS};
pub use status::{Clustering, FailureKind, MeshView, PeerStatus};
pub use tls::TlsTransport;
pub use transport::{AcceptEvent, BoxFuture, DialError, Link, LinkInfo, Transport};

pub use causeway_pki::{CertStatus, TlsMode};
