//! How a service plugs into the node: SIP today, the database cluster and HA pairs next.
//!
//! A service is started with the [`Node`](crate::Node) it runs on and shares what the node
//! has — the mesh RPC ([`Node::leases`](crate::Node::leases)`().rpc()`), the store, the
//! lease groups, the alarm table and `/metrics` — instead of making its own. The binary,
//! the composition root, hands it to [`Node::host`](crate::Node::host); the node stops
//! every hosted service, newest first, before it lets go of its leases and its mesh.
//!
//! A service's configuration items and alarm types are its own, defined in its crate
//! (`sipserver::catalogue` is the model): a static list of
//! [`ItemDef`](crate::xconfig::ItemDef)s and one of `AlarmType`s, added to the node's
//! catalogues with [`xconfig::register`](crate::xconfig::register) and
//! `causeway_alarms::register`. The binary registers every service's lists before the
//! node starts, whether or not this peer runs the service: the configuration primary
//! checks the items of every peer's services.

use causeway_mesh::BoxFuture;

pub trait Service: Send + Sync + 'static {
    /// Short name for logs and status (`sip`, `dbcluster`, `ha`).
    fn name(&self) -> &'static str;
    /// Its state as `xstatus` shows it.
    fn status(&self) -> serde_json::Value;
    /// Stops every task of the service; done when they have ended.
    fn stop(&self) -> BoxFuture<'_, ()>;
}
