use std::net::IpAddr;

use crate::settings::IpVersion;
use crate::transport::BoxFuture;

/// Turns a peer address (IP or FQDN) into an IP. The cluster address mapping (EX-9) will sit
/// in front of DNS here.
pub trait Resolver: Send + Sync + 'static {
    fn resolve<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<IpAddr, String>>;
}

/// The system resolver (`/etc/hosts`, DNS), keeping only the cluster's IP version.
pub struct SystemResolver {
    pub ip_version: IpVersion,
}

impl Resolver for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<IpAddr, String>> {
        Box::pin(async move {
            if let Ok(ip) = host.parse::<IpAddr>() {
                return Ok(ip);
            }
            let addrs = tokio::net::lookup_host((host, 0))
                .await
                .map_err(|e| format!("cannot resolve '{host}': {e}"))?;
            let want_v4 = self.ip_version == IpVersion::IPv4;
            addrs
                .map(|a| a.ip())
                .find(|ip| ip.is_ipv4() == want_v4)
                .ok_or_else(|| format!("'{host}' has no {} address", self.ip_version))
        })
    }
}
