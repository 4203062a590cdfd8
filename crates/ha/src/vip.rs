//! The virtual IP on an interface (docs/ha.md, section 4): added and removed with netlink
//! (`RTM_NEWADDR`, `RTM_DELADDR`), behind a trait so the decision loop and the simulation
//! run on [`FakeVip`].

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Mutex;

use futures_util::future::BoxFuture;
use futures_util::TryStreamExt as _;

/// A virtual IP: the address, its prefix length and the interface that carries it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Vip {
    pub interface: String,
    pub address: IpAddr,
    pub prefix: u8,
}

impl std::fmt::Display for Vip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} on {}", self.address, self.prefix, self.interface)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VipError {
    #[error("interface '{0}' does not exist")]
    NoInterface(String),
    #[error("{what} {vip}: {reason} (the agent needs CAP_NET_ADMIN: run as root or grant it)")]
    Netlink {
        what: &'static str,
        vip: String,
        reason: String,
    },
}

/// The first address of `interface` in this network namespace, IPv4 first, link-local IPv6
/// skipped: a node's health-monitor or direct-connect address.
pub fn interface_address(interface: &str) -> Option<IpAddr> {
    let addrs: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .ok()?
        .filter(|a| a.interface_name == interface)
        .filter_map(|a| {
            let sa = a.address?;
            sa.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80))
        .collect();
    addrs
        .iter()
        .find(|ip| ip.is_ipv4())
        .or(addrs.first())
        .copied()
}

/// Adding and removing the address. Both are idempotent: adding an address that is there,
/// or removing one that is not, succeeds.
pub trait VirtualIp: Send + Sync {
    fn add<'a>(&'a self, vip: &'a Vip) -> BoxFuture<'a, Result<(), VipError>>;
    fn remove<'a>(&'a self, vip: &'a Vip) -> BoxFuture<'a, Result<(), VipError>>;
    fn present<'a>(&'a self, vip: &'a Vip) -> BoxFuture<'a, Result<bool, VipError>>;
}

/// The kernel's addresses, over an rtnetlink connection of this network namespace.
pub struct NetlinkVip {
    handle: rtnetlink::Handle,
}

impl NetlinkVip {
    /// Opens the netlink socket and spawns its connection on the current tokio runtime.
    pub fn connect() -> std::io::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    async fn index(&self, interface: &str) -> Result<u32, VipError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(interface.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            _ => Err(VipError::NoInterface(interface.to_string())),
        }
    }

    async fn find(
        &self,
        vip: &Vip,
    ) -> Result<Option<rtnetlink::packet_route::address::AddressMessage>, VipError> {
        let index = self.index(&vip.interface).await?;
        let mut found = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(vip.address)
            .set_prefix_length_filter(vip.prefix)
            .execute();
        found.try_next().await.map_err(|e| VipError::Netlink {
            what: "listing",
            vip: vip.to_string(),
            reason: e.to_string(),
        })
    }
}

/// netlink's "File exists": the address is there already.
fn exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

impl VirtualIp for NetlinkVip {
    fn add<'a>(&'a self, vip: &'a Vip) -> BoxFuture<'a, Result<(), VipError>> {
        Box::pin(async move {
            let index = self.index(&vip.interface).await?;
            match self
                .handle
                .address()
                .add(index, vip.address, vip.prefix)
                .execute()
                .await
            {
                Ok(()) => Ok(()),
                Err(e) if exists(&e) => Ok(()),
                Err(e) => Err(VipError::Netlink {
                    what: "adding",
                    vip: vip.to_string(),
                    reason: e.to_string(),
                }),
            }
        })
    }

    fn remove<'a>(&'a self, vip: &'a Vip) -> BoxFuture<'a, Result<(), VipError>> {
        Box::pin(async move {
            let Some(message) = self.find(vip).await? else {
                return Ok(());
            };
            self.handle
                .address()
                .del(message)
                .execute()
                .await
                .map_err(|e| VipError::Netlink {
                    what: "removing",
                    vip: vip.to_string(),
                    reason: e.to_string(),
                })
        })
    }

    fn present<'a>(&'a self, vip: &'a Vip) -> BoxFuture<'a, Result<bool, VipError>> {
        Box::pin(async move { Ok(self.find(vip).await?.is_some()) })
    }
}

/// Addresses in memory, with every change recorded: for the decision loop's tests and the
/// simulation.
#[derive(Default)]
pub struct FakeVip {
    held: Mutex<BTreeSet<Vip>>,
    /// (added, vip) in order.
    pub history: Mutex<Vec<(bool, Vip)>>,
}

impl FakeVip {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<Vip>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl VirtualIp for FakeVip {
    fn add<'a>(&'a self, vip: &'a Vip) -> BoxFuture<'a, Result<(), VipError>> {
        Box::pin(async move {
            if self.lock().insert(vip.clone()) {
                self.history
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((true, vip.clone()));
            }
            Ok(())
        })
    }

    fn remove<'a>(&'a self, vip: &'a Vip) -> BoxFuture<'a, Result<(), VipError>> {
        Box::pin(async move {
            if self.lock().remove(vip) {
                self.history
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((false, vip.clone()));
            }
            Ok(())
        })
    }

    fn present<'a>(&'a self, vip: &'a Vip) -> BoxFuture<'a, Result<bool, VipError>> {
        Box::pin(async move { Ok(self.lock().contains(vip)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_fake_is_idempotent_and_records_only_changes() {
        let vip = Vip {
            interface: "eth0".into(),
            address: "198.18.0.10".parse().unwrap(),
            prefix: 24,
        };
        let f = FakeVip::default();
        f.add(&vip).await.unwrap();
        f.add(&vip).await.unwrap();
        assert!(f.present(&vip).await.unwrap());
        f.remove(&vip).await.unwrap();
        f.remove(&vip).await.unwrap();
        assert!(!f.present(&vip).await.unwrap());
        assert_eq!(f.history.lock().unwrap().len(), 2);
    }
}
