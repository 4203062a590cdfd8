//! Locating SIP servers (RFC 3263 §4): a SIP or SIPS URI's host, port and transport to the
//! ordered list of (transport, address) to try, through NAPTR, SRV and A/AAAA records.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::rdata::SRV;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;
use ring::rand::{SecureRandom, SystemRandom};
use tracing::debug;

use crate::transport::Proto;

const LOG: &str = "network.sip";
/// A list longer than this is never tried to the end: a SIP transaction times out first.
const MAX_TARGETS: usize = 16;
/// DNS questions one resolution may ask (A and AAAA count as two), so a hostile zone (a NAPTR
/// set naming a hundred SRV names, each naming a hundred hosts) costs bounded work.
const MAX_QUERIES: usize = 20;
/// For one question, both tries together.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// One resolution, all its questions together, in question timeouts: a zone whose every
/// answer comes just before the timeout must not hold a request for 20 of them.
const WHOLE_RESOLUTION_TIMEOUTS: u32 = 4;
const SIP_PORT: u16 = 5060;
const SIPS_PORT: u16 = 5061;
/// [`RecordType::SRV`] as a lookup names it.
const SRV_KIND: &str = "SRV";

/// Where to send a request, and how that was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsTarget {
    pub proto: Proto,
    pub addr: SocketAddr,
    /// How it was found, for logs and `xcommand Locate`: e.g. "NAPTR SIP+D2T → SRV
    /// _sip._tcp.other.test → 10 10 5060 sip1.other.test → 127.0.0.1".
    pub how: String,
}

/// An RFC 3263 resolver; clones share one cache (hickory's, which honours TTLs).
#[derive(Clone)]
pub struct SipResolver {
    /// A resolver that could not be built answers every resolution with why.
    resolver: Result<TokioResolver, String>,
    timeout: Duration,
}

impl SipResolver {
    /// The system's resolver (/etc/resolv.conf). One that cannot be read gives a resolver
    /// that answers every resolution with why (see [`SipResolver::unusable`]): nothing but
    /// DNS zones needs it, so the service starts anyway.
    pub fn system() -> SipResolver {
        let resolver = TokioResolver::builder_tokio()
            .map_err(|e| format!("reading the system's DNS configuration (/etc/resolv.conf): {e}"))
            .and_then(|mut builder| {
                tune(builder.options_mut(), DEFAULT_TIMEOUT);
                builder
                    .build()
                    .map_err(|e| format!("starting the DNS resolver: {e}"))
            });
        SipResolver {
            resolver,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Why this resolver cannot resolve anything, if it cannot.
    pub fn unusable(&self) -> Option<&str> {
        self.resolver.as_ref().err().map(String::as_str)
    }

    /// Only these name servers (UDP, and TCP for an answer too long for a datagram), e.g. a
    /// test's responder on 127.0.0.1:port, or an operator's `[sip] dns_servers`.
    pub fn with_servers(servers: &[SocketAddr]) -> SipResolver {
        SipResolver::with_servers_and_timeout(servers, DEFAULT_TIMEOUT)
    }

    /// As [`SipResolver::with_servers`], with `timeout` for each question (both tries).
    pub fn with_servers_and_timeout(servers: &[SocketAddr], timeout: Duration) -> SipResolver {
        let name_servers = servers
            .iter()
            .map(|server| {
                let mut config = NameServerConfig::udp_and_tcp(server.ip());
                for connection in &mut config.connections {
                    connection.port = server.port();
                }
                config
            })
            .collect();
        let mut builder = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(name_servers),
            TokioRuntimeProvider::default(),
        );
        let options = builder.options_mut();
        tune(options, timeout);
        // Only the servers named: /etc/hosts would answer for names they were meant to.
        options.use_hosts_file = ResolveHosts::Never;
        SipResolver {
            resolver: builder
                .build()
                .map_err(|e| format!("starting the DNS resolver: {e}")),
            timeout,
        }
    }

    /// RFC 3263 §4: the ordered list of targets for a SIP(S) URI's host part.
    pub async fn targets(
        &self,
        host: &str,
        port: Option<u16>,
        transport: Option<Proto>,
        sips: bool,
    ) -> Result<Vec<DnsTarget>, String> {
        let uri = uri_text(host, port, transport, sips);
        let resolver = match &self.resolver {
            Ok(resolver) => resolver,
            Err(e) => return Err(format!("{uri}: {e}")),
        };
        let mut resolution = Resolution {
            resolver,
            timeout: self.timeout,
            queries: 0,
            targets: Vec::new(),
            failure: None,
        };
        let whole = self.timeout * WHOLE_RESOLUTION_TIMEOUTS;
        let outcome =
            match tokio::time::timeout(whole, resolution.locate(host, port, transport, sips)).await
            {
                Ok(outcome) => outcome,
                Err(_) => Err(Halt(format!(
                    "DNS answers too slow: gave up after {} s",
                    whole.as_secs_f32()
                ))),
            };
        let queries = resolution.queries;
        let cut_short = match &outcome {
            Err(Halt(why)) => why.clone(),
            Ok(()) => String::new(),
        };
        let result = match outcome {
            // A resolution cut short keeps what it found before.
            Ok(()) | Err(Halt(_)) if !resolution.targets.is_empty() => Ok(resolution.targets),
            Ok(()) => Err(format!(
                "{uri}: {}",
                resolution
                    .failure
                    .unwrap_or_else(|| nothing_found(host, port, transport))
            )),
            Err(Halt(why)) => Err(format!("{uri}: {why}")),
        };
        match &result {
            Ok(targets) => {
                debug!(target: LOG, uri = %uri, targets = targets.len(), queries,
                    first = %targets.first().map(|t| t.how.as_str()).unwrap_or(""),
                    cut_short = %cut_short, "SIP server located");
            }
            Err(e) => {
                debug!(target: LOG, uri = %uri, queries, reason = %e, "SIP server not located");
            }
        }
        result
    }
}

fn tune(options: &mut ResolverOpts, timeout: Duration) {
    // hickory's timeout is per try and `attempts` counts retries: one try and one retry
    // within `timeout` all told.
    options.timeout = timeout / 2;
    options.attempts = 1;
    // A before AAAA, asked together: RFC 3263 leaves the order to the client, and the
    // networks this proxy serves are IPv4 first.
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
}

/// The URI as far as resolution sees it, to say which one a message is about.
fn uri_text(host: &str, port: Option<u16>, transport: Option<Proto>, sips: bool) -> String {
    let mut text = format!("{}:{host}", if sips { "sips" } else { "sip" });
    if let Some(port) = port {
        text.push_str(&format!(":{port}"));
    }
    if let Some(proto) = transport {
        text.push_str(&format!(";transport={}", proto.name().to_ascii_lowercase()));
    }
    text
}

fn nothing_found(host: &str, port: Option<u16>, transport: Option<Proto>) -> String {
    let host = host.trim_end_matches('.');
    match (port, transport) {
        (Some(_), _) => format!("no A/AAAA record for {host}"),
        (None, Some(_)) => format!("no SRV or A/AAAA record for {host}"),
        (None, None) => format!("no NAPTR, SRV or A/AAAA record for {host}"),
    }
}

fn default_port(proto: Proto) -> u16 {
    match proto {
        Proto::Tls => SIPS_PORT,
        Proto::Udp | Proto::Tcp => SIP_PORT,
    }
}

/// The host as an IP address: v4, or v6 with or without brackets.
fn ip_literal(host: &str) -> Option<IpAddr> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse().ok()
}

/// A name as it is written, for `how` and messages.
fn plain(name: &Name) -> String {
    let text = name.to_ascii();
    text.trim_end_matches('.').to_owned()
}

/// A NAPTR service field to the transport it offers (RFC 3263 §4.1; SCTP and others are not
/// offered by this proxy).
fn naptr_proto(service: &str, sips: bool) -> Option<Proto> {
    match service.to_ascii_uppercase().as_str() {
        "SIPS+D2T" => Some(Proto::Tls),
        "SIP+D2T" if !sips => Some(Proto::Tcp),
        "SIP+D2U" if !sips => Some(Proto::Udp),
        _ => None,
    }
}

/// `_sip._udp.host`, `_sip._tcp.host` or `_sips._tcp.host`.
fn srv_name(host: &Name, proto: Proto) -> Option<Name> {
    let (service, protocol) = match proto {
        Proto::Udp => ("_sip", "_udp"),
        Proto::Tcp => ("_sip", "_tcp"),
        Proto::Tls => ("_sips", "_tcp"),
    };
    host.prepend_label(protocol)
        .and_then(|name| name.prepend_label(service))
        .ok()
}

/// RFC 2782 order: by priority, lowest first; within one priority a weighted random draw,
/// each record's chance proportional to its weight (a weight of 0 only a small chance).
fn srv_order(mut records: Vec<SRV>, random: &mut impl FnMut(u64) -> u64) -> Vec<SRV> {
    // Weight 0 first within a priority, as RFC 2782 arranges them before drawing.
    records.sort_by_key(|r| (r.priority, r.weight != 0));
    let mut ordered = Vec::with_capacity(records.len());
    let mut rest = records.as_slice();
    while let Some(first) = rest.first() {
        let same = rest
            .iter()
            .take_while(|r| r.priority == first.priority)
            .count();
        let (group, later) = rest.split_at(same);
        let mut group = group.to_vec();
        while !group.is_empty() {
            let total: u64 = group.iter().map(|r| u64::from(r.weight)).sum();
            let draw = random(total);
            let mut running = 0u64;
            let chosen = group
                .iter()
                .position(|r| {
                    running += u64::from(r.weight);
                    running >= draw
                })
                .unwrap_or(0);
            ordered.push(group.remove(chosen));
        }
        rest = later;
    }
    ordered
}

/// A number in 0..=max from the system's random source. Without one (never seen on Linux)
/// 0: the records keep their sorted order, still a valid if unbalanced choice.
fn system_random(max: u64) -> u64 {
    let mut bytes = [0u8; 8];
    if SystemRandom::new().fill(&mut bytes).is_err() {
        return 0;
    }
    match max.checked_add(1) {
        Some(span) => u64::from_le_bytes(bytes) % span,
        None => u64::from_le_bytes(bytes),
    }
}

/// Why a resolution stopped before its end: the rest would fail the same way, or cost too
/// much.
struct Halt(String);

/// One call of [`SipResolver::targets`]: what it found and what it cost so far.
struct Resolution<'a> {
    resolver: &'a TokioResolver,
    timeout: Duration,
    queries: usize,
    targets: Vec<DnsTarget>,
    /// The first failure other than "no such record", told if nothing is found.
    failure: Option<String>,
}

impl Resolution<'_> {
    async fn locate(
        &mut self,
        host: &str,
        port: Option<u16>,
        transport: Option<Proto>,
        sips: bool,
    ) -> Result<(), Halt> {
        // A SIPS URI is TLS whatever its transport parameter says (RFC 3261 §26.2.2 has no
        // SIPS over UDP), and TLS is found under `_sips._tcp`.
        let transport = if sips {
            transport.map(|_| Proto::Tls)
        } else {
            transport
        };
        let fallback_proto = if sips { Proto::Tls } else { Proto::Udp };

        if let Some(ip) = ip_literal(host) {
            let proto = transport.unwrap_or(fallback_proto);
            let port = port.unwrap_or(default_port(proto));
            self.push(proto, SocketAddr::new(ip, port), format!("IP address {ip}"));
            return Ok(());
        }
        let name = host_name(host)?;

        if let Some(port) = port {
            let proto = transport.unwrap_or(fallback_proto);
            return self
                .addresses(&name, proto, port, &format!("port {port} given → "))
                .await;
        }

        if let Some(proto) = transport {
            let service = srv_name(&name, proto).ok_or_else(|| too_long(&name))?;
            if !self.srv(&service, proto, "").await? {
                let port = default_port(proto);
                self.addresses(&name, proto, port, "no SRV → ").await?;
            }
            return Ok(());
        }

        let mut asked = Vec::new();
        match self.naptr(&name, sips, &mut asked).await? {
            Naptr::NoSuchName => return Ok(()),
            Naptr::Used if !self.targets.is_empty() => return Ok(()),
            Naptr::Used | Naptr::NoneUsable => {}
        }
        // No usable NAPTR (RFC 3263 §4.1): one SRV query per transport. The order is ours to
        // choose; UDP first, as RFC 3261 requires every element to support it and it is the
        // transport a URI without NAPTR or SRV gets, then TCP, then TLS. A SIPS URI is TLS
        // only.
        let fallbacks: &[Proto] = if sips {
            &[Proto::Tls]
        } else {
            &[Proto::Udp, Proto::Tcp, Proto::Tls]
        };
        let mut offered = false;
        for &proto in fallbacks {
            let service = srv_name(&name, proto).ok_or_else(|| too_long(&name))?;
            if asked.contains(&service) {
                continue;
            }
            offered |= self.srv(&service, proto, "no NAPTR → ").await?;
        }
        if !offered {
            let port = default_port(fallback_proto);
            self.addresses(&name, fallback_proto, port, "no NAPTR or SRV → ")
                .await?;
        }
        Ok(())
    }

    /// Follows the host's usable NAPTR records, in order then preference, to their SRV
    /// names; notes each SRV name asked in `asked`.
    async fn naptr(
        &mut self,
        name: &Name,
        sips: bool,
        asked: &mut Vec<Name>,
    ) -> Result<Naptr, Halt> {
        let Some(records) = self.lookup(name, RecordType::NAPTR).await? else {
            // Nothing exists under a name that does not exist (RFC 8020): no SRV, no address.
            return Ok(Naptr::NoSuchName);
        };
        let mut usable: Vec<_> = records
            .into_iter()
            .filter_map(|data| match data {
                RData::NAPTR(naptr) => Some(naptr),
                _ => None,
            })
            .filter_map(|naptr| {
                let service = String::from_utf8_lossy(&naptr.services).to_ascii_uppercase();
                let terminal = naptr.flags.eq_ignore_ascii_case(b"s");
                let proto = naptr_proto(&service, sips)?;
                (terminal && !naptr.replacement.is_root()).then_some((naptr, service, proto))
            })
            .collect();
        if usable.is_empty() {
            return Ok(Naptr::NoneUsable);
        }
        usable.sort_by_key(|(naptr, _, _)| (naptr.order, naptr.preference));
        for (naptr, service, proto) in usable {
            if self.full() {
                break;
            }
            if asked.contains(&naptr.replacement) {
                continue;
            }
            asked.push(naptr.replacement.clone());
            self.srv(&naptr.replacement, proto, &format!("NAPTR {service} → "))
                .await?;
        }
        Ok(Naptr::Used)
    }

    /// The addresses an SRV name leads to, in RFC 2782 order; whether it has any SRV
    /// record (one whose target is "." included: the service is decidedly not offered).
    async fn srv(&mut self, service: &Name, proto: Proto, how: &str) -> Result<bool, Halt> {
        let records: Vec<SRV> = self
            .lookup(service, RecordType::SRV)
            .await?
            .unwrap_or_default()
            .into_iter()
            .filter_map(|data| match data {
                RData::SRV(srv) => Some(srv),
                _ => None,
            })
            .collect();
        let found = !records.is_empty();
        for srv in srv_order(records, &mut system_random) {
            if self.full() {
                break;
            }
            if srv.target.is_root() {
                self.failure.get_or_insert(format!(
                    "{} says the service is not offered (SRV target \".\")",
                    plain(service)
                ));
                continue;
            }
            let step = format!(
                "{how}SRV {} → {} {} {} {} → ",
                plain(service),
                srv.priority,
                srv.weight,
                srv.port,
                plain(&srv.target)
            );
            self.resolve_addresses(&srv.target, proto, srv.port, &step, false)
                .await?;
        }
        Ok(found)
    }

    /// The name's A and AAAA addresses, each a target, the record type named in `how`.
    async fn addresses(
        &mut self,
        name: &Name,
        proto: Proto,
        port: u16,
        how: &str,
    ) -> Result<(), Halt> {
        self.resolve_addresses(name, proto, port, how, true).await
    }

    async fn resolve_addresses(
        &mut self,
        name: &Name,
        proto: Proto,
        port: u16,
        how: &str,
        name_the_lookup: bool,
    ) -> Result<(), Halt> {
        if self.full() {
            return Ok(());
        }
        // A and AAAA are asked together: two questions.
        self.spend(2, name, "A/AAAA")?;
        let lookup = self.resolver.lookup_ip(name.clone());
        let found = match tokio::time::timeout(self.grace(), lookup).await {
            Err(_) => return Err(Halt(timed_out(name, "A/AAAA"))),
            Ok(Err(e)) => {
                self.judge(e, name, "A/AAAA")?;
                return Ok(());
            }
            Ok(Ok(found)) => found,
        };
        for ip in found.iter() {
            let step = if name_the_lookup {
                let kind = if ip.is_ipv4() { "A" } else { "AAAA" };
                format!("{how}{kind} {} → {ip}", plain(name))
            } else {
                format!("{how}{ip}")
            };
            self.push(proto, SocketAddr::new(ip, port), step);
        }
        Ok(())
    }

    /// The records of one type at a name: some, none (Some(empty)), or None when the name
    /// does not exist. Failures that leave the rest worth asking are noted and give none.
    async fn lookup(
        &mut self,
        name: &Name,
        record_type: RecordType,
    ) -> Result<Option<Vec<RData>>, Halt> {
        let kind = record_type.to_string();
        self.spend(1, name, &kind)?;
        let lookup = self.resolver.lookup(name.clone(), record_type);
        match tokio::time::timeout(self.grace(), lookup).await {
            Err(_) => Err(Halt(timed_out(name, &kind))),
            Ok(Ok(found)) => Ok(Some(
                found
                    .answers()
                    .iter()
                    .filter(|r| r.record_type() == record_type)
                    .map(|r| r.data.clone())
                    .collect(),
            )),
            Ok(Err(e)) if e.is_nx_domain() => {
                self.judge(e, name, &kind)?;
                Ok(None)
            }
            Ok(Err(e)) => {
                self.judge(e, name, &kind)?;
                Ok(Some(Vec::new()))
            }
        }
    }

    /// Sorts a lookup's failure: a timeout ends the resolution (every further question would
    /// wait as long, and a SIP transaction cannot), anything else is noted for the final
    /// message if nothing is found.
    fn judge(&mut self, error: NetError, name: &Name, kind: &str) -> Result<(), Halt> {
        let text = match &error {
            NetError::Timeout => return Err(Halt(timed_out(name, kind))),
            // An SRV name that does not exist is the common way of having no SRV record.
            e if e.is_nx_domain() && kind == SRV_KIND => return Ok(()),
            e if e.is_nx_domain() => format!("{} does not exist (NXDOMAIN)", plain(name)),
            e if e.is_no_records_found() => return Ok(()),
            e => format!("DNS lookup of {kind} {} failed: {e}", plain(name)),
        };
        self.failure.get_or_insert(text);
        Ok(())
    }

    fn spend(&mut self, questions: usize, name: &Name, kind: &str) -> Result<(), Halt> {
        if self.queries + questions > MAX_QUERIES {
            return Err(Halt(format!(
                "gave up after {} DNS queries, before {kind} {}",
                self.queries,
                plain(name)
            )));
        }
        self.queries += questions;
        Ok(())
    }

    /// hickory's own deadline plus a margin: this one only fires if hickory's did not.
    fn grace(&self) -> Duration {
        self.timeout + Duration::from_millis(250)
    }

    fn full(&self) -> bool {
        self.targets.len() >= MAX_TARGETS
    }

    fn push(&mut self, proto: Proto, addr: SocketAddr, how: String) {
        let seen = self
            .targets
            .iter()
            .any(|t| t.proto == proto && t.addr == addr);
        if !seen && !self.full() {
            self.targets.push(DnsTarget { proto, addr, how });
        }
    }
}

enum Naptr {
    NoSuchName,
    NoneUsable,
    Used,
}

/// The URI's host as a DNS name. A dotted name is taken as complete, so a search list adds
/// no questions; a single label ("pbx") is left to the system's search list.
fn host_name(host: &str) -> Result<Name, Halt> {
    let mut name =
        Name::from_ascii(host).map_err(|e| Halt(format!("{host} is not a valid DNS name: {e}")))?;
    if name.is_root() {
        return Err(Halt("the host is empty".to_owned()));
    }
    if host.trim_end_matches('.').contains('.') {
        name.set_fqdn(true);
    }
    Ok(name)
}

fn too_long(name: &Name) -> Halt {
    Halt(format!("{} is too long for an SRV name", plain(name)))
}

/// Whether a `targets` error means DNS could not be asked (a server silent or failing, the
/// resolver not started, the answers too slow or too many), rather than that the domain
/// has no SIP server: the proxy answers the first 503, the second 404. The words are this
/// file's own messages', kept in one place with them.
pub fn is_unavailable(reason: &str) -> bool {
    [
        "timed out",
        "failed",
        "too slow",
        "gave up after",
        "starting the DNS resolver",
        "the system's DNS configuration",
    ]
    .iter()
    .any(|w| reason.contains(w))
}

fn timed_out(name: &Name, kind: &str) -> String {
    format!("DNS server timed out looking up {kind} {}", plain(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns_responder::{DnsResponder, TestRecord};
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Instant;

    fn loopback() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, 0, last)
    }

    async fn zone(records: Vec<TestRecord>) -> (DnsResponder, SipResolver) {
        let responder = DnsResponder::start(loopback(), records)
            .await
            .expect("the test responder starts");
        let resolver = SipResolver::with_servers(&[responder.addr]);
        (responder, resolver)
    }

    fn asked_types(responder: &DnsResponder) -> Vec<String> {
        responder.queries().into_iter().map(|(_, t)| t).collect()
    }

    fn summary(targets: &[DnsTarget]) -> Vec<(Proto, SocketAddr)> {
        targets.iter().map(|t| (t.proto, t.addr)).collect()
    }

    fn at(proto: Proto, last: u8, port: u16) -> (Proto, SocketAddr) {
        (proto, SocketAddr::from((ip(last), port)))
    }

    #[tokio::test]
    async fn dns_naptr_order_leads_through_srv_to_addresses() {
        let (_responder, resolver) = zone(vec![
            TestRecord::naptr("other.test", 20, 10, "s", "SIP+D2U", "_sip._udp.other.test"),
            TestRecord::naptr("other.test", 10, 10, "S", "SIP+D2T", "_sip._tcp.other.test"),
            // Neither terminal nor a SIP service: both ignored.
            TestRecord::naptr("other.test", 5, 10, "", "SIP+D2U", "_sip._udp.other.test"),
            TestRecord::naptr("other.test", 5, 10, "s", "SIP+D2S", "_sip._sctp.other.test"),
            TestRecord::srv("_sip._tcp.other.test", 10, 10, 5060, "sip1.other.test"),
            TestRecord::srv("_sip._udp.other.test", 10, 10, 5070, "sip2.other.test"),
            TestRecord::a("sip1.other.test", ip(1)),
            TestRecord::a("sip2.other.test", ip(2)),
        ])
        .await;
        let targets = resolver
            .targets("other.test", None, None, false)
            .await
            .expect("resolves");
        assert_eq!(
            summary(&targets),
            vec![at(Proto::Tcp, 1, 5060), at(Proto::Udp, 2, 5070)]
        );
        assert_eq!(
            targets[0].how,
            "NAPTR SIP+D2T → SRV _sip._tcp.other.test → 10 10 5060 sip1.other.test → 127.0.0.1"
        );
        assert_eq!(
            targets[1].how,
            "NAPTR SIP+D2U → SRV _sip._udp.other.test → 10 10 5070 sip2.other.test → 127.0.0.2"
        );
    }

    #[tokio::test]
    async fn dns_srv_lowest_priority_first() {
        let (_responder, resolver) = zone(vec![
            TestRecord::srv("_sip._udp.other.test", 20, 10, 5060, "backup.other.test"),
            TestRecord::srv("_sip._udp.other.test", 10, 10, 5062, "main.other.test"),
            TestRecord::a("backup.other.test", ip(2)),
            TestRecord::a("main.other.test", ip(1)),
            TestRecord::aaaa("main.other.test", Ipv6Addr::LOCALHOST),
        ])
        .await;
        let targets = resolver
            .targets("other.test", None, Some(Proto::Udp), false)
            .await
            .expect("resolves");
        assert_eq!(
            summary(&targets),
            vec![
                at(Proto::Udp, 1, 5062),
                (Proto::Udp, SocketAddr::from((Ipv6Addr::LOCALHOST, 5062))),
                at(Proto::Udp, 2, 5060),
            ]
        );
    }

    #[tokio::test]
    async fn dns_srv_weights_draw_order_within_a_priority() {
        let (_responder, resolver) = zone(vec![
            TestRecord::srv("_sip._udp.even.test", 10, 50, 5060, "a.even.test"),
            TestRecord::srv("_sip._udp.even.test", 10, 50, 5060, "b.even.test"),
            TestRecord::srv("_sip._udp.skewed.test", 10, 0, 5060, "zero.skewed.test"),
            TestRecord::srv("_sip._udp.skewed.test", 10, 100, 5060, "heavy.skewed.test"),
            TestRecord::a("a.even.test", ip(1)),
            TestRecord::a("b.even.test", ip(2)),
            TestRecord::a("zero.skewed.test", ip(3)),
            TestRecord::a("heavy.skewed.test", ip(4)),
        ])
        .await;
        let runs = 200;
        let (mut a_first, mut heavy_first) = (0, 0);
        for _ in 0..runs {
            let even = resolver
                .targets("even.test", None, Some(Proto::Udp), false)
                .await
                .expect("resolves");
            assert_eq!(even.len(), 2);
            if even[0].addr.ip() == IpAddr::V4(ip(1)) {
                a_first += 1;
            }
            let skewed = resolver
                .targets("skewed.test", None, Some(Proto::Udp), false)
                .await
                .expect("resolves");
            assert_eq!(skewed.len(), 2, "a weight-0 record is still a target");
            if skewed[0].addr.ip() == IpAddr::V4(ip(4)) {
                heavy_first += 1;
            }
        }
        assert!(
            a_first > 0 && a_first < runs,
            "equal weights: both orders appear ({a_first} of {runs} a first)"
        );
        assert!(
            heavy_first * 10 >= runs * 9,
            "weight 100 over weight 0 first in {heavy_first} of {runs}"
        );
    }

    #[test]
    fn dns_srv_order_draw_is_rfc_2782() {
        let record = |priority, weight, last| {
            SRV::new(
                priority,
                weight,
                5060,
                Name::from_ascii(format!("h{last}.test.")).expect("name"),
            )
        };
        let records = vec![
            record(20, 5, 9),
            record(10, 30, 1),
            record(10, 0, 2),
            record(10, 70, 3),
        ];
        let order = |draws: &[u64]| {
            let mut draws = draws.iter().copied();
            srv_order(records.clone(), &mut |_| draws.next().unwrap_or(0))
                .iter()
                .map(|r| plain(&r.target))
                .collect::<Vec<_>>()
        };
        // Running sums 0 (weight 0 first), 30, 100: a draw of 0 takes the weight-0 record,
        // 1..=30 the weight-30 one, 31..=100 the weight-70 one.
        assert_eq!(
            order(&[0, 0, 0, 0]),
            ["h2.test", "h1.test", "h3.test", "h9.test"]
        );
        assert_eq!(
            order(&[31, 30, 0, 0]),
            ["h3.test", "h1.test", "h2.test", "h9.test"]
        );
        assert_eq!(
            order(&[30, 1, 0, 0]),
            ["h1.test", "h3.test", "h2.test", "h9.test"]
        );
    }

    #[tokio::test]
    async fn dns_without_naptr_falls_back_to_srv() {
        let (responder, resolver) = zone(vec![
            TestRecord::srv("_sip._tcp.other.test", 10, 10, 5080, "sip1.other.test"),
            TestRecord::a("sip1.other.test", ip(1)),
        ])
        .await;
        let targets = resolver
            .targets("other.test", None, None, false)
            .await
            .expect("resolves");
        assert_eq!(summary(&targets), vec![at(Proto::Tcp, 1, 5080)]);
        assert_eq!(
            targets[0].how,
            "no NAPTR → SRV _sip._tcp.other.test → 10 10 5080 sip1.other.test → 127.0.0.1"
        );
        let srv_asked: Vec<String> = responder
            .queries()
            .into_iter()
            .filter(|(_, t)| t == "SRV")
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            srv_asked,
            [
                "_sip._udp.other.test",
                "_sip._tcp.other.test",
                "_sips._tcp.other.test"
            ]
        );
    }

    #[tokio::test]
    async fn dns_without_srv_uses_the_address_and_default_port() {
        let (_responder, resolver) = zone(vec![TestRecord::a("other.test", ip(7))]).await;
        let targets = resolver
            .targets("other.test", None, None, false)
            .await
            .expect("resolves");
        assert_eq!(summary(&targets), vec![at(Proto::Udp, 7, 5060)]);
        assert_eq!(targets[0].how, "no NAPTR or SRV → A other.test → 127.0.0.7");

        let targets = resolver
            .targets("other.test", None, None, true)
            .await
            .expect("resolves");
        assert_eq!(summary(&targets), vec![at(Proto::Tls, 7, 5061)]);

        let targets = resolver
            .targets("other.test", None, Some(Proto::Tcp), false)
            .await
            .expect("resolves");
        assert_eq!(summary(&targets), vec![at(Proto::Tcp, 7, 5060)]);
    }

    #[tokio::test]
    async fn dns_explicit_port_asks_only_for_addresses() {
        let (responder, resolver) = zone(vec![
            TestRecord::naptr("other.test", 10, 10, "s", "SIP+D2T", "_sip._tcp.other.test"),
            TestRecord::srv("_sip._tcp.other.test", 10, 10, 5080, "sip1.other.test"),
            TestRecord::a("sip1.other.test", ip(1)),
            TestRecord::a("other.test", ip(7)),
        ])
        .await;
        let targets = resolver
            .targets("other.test", Some(5070), None, false)
            .await
            .expect("resolves");
        assert_eq!(summary(&targets), vec![at(Proto::Udp, 7, 5070)]);
        assert_eq!(targets[0].how, "port 5070 given → A other.test → 127.0.0.7");
        let mut asked = asked_types(&responder);
        asked.sort();
        assert_eq!(asked, ["A", "AAAA"], "no NAPTR or SRV with a port");

        let targets = resolver
            .targets("other.test", Some(5071), Some(Proto::Tcp), false)
            .await
            .expect("resolves");
        assert_eq!(summary(&targets), vec![at(Proto::Tcp, 7, 5071)]);
    }

    #[tokio::test]
    async fn dns_transport_parameter_picks_its_srv() {
        let (responder, resolver) = zone(vec![
            TestRecord::naptr("other.test", 10, 10, "s", "SIP+D2U", "_sip._udp.other.test"),
            TestRecord::srv("_sip._udp.other.test", 10, 10, 5060, "udp.other.test"),
            TestRecord::srv("_sip._tcp.other.test", 10, 10, 5090, "tcp.other.test"),
            TestRecord::a("udp.other.test", ip(1)),
            TestRecord::a("tcp.other.test", ip(2)),
        ])
        .await;
        let targets = resolver
            .targets("other.test", None, Some(Proto::Tcp), false)
            .await
            .expect("resolves");
        assert_eq!(summary(&targets), vec![at(Proto::Tcp, 2, 5090)]);
        let asked = responder.queries();
        assert_eq!(
            asked[0],
            ("_sip._tcp.other.test".to_owned(), "SRV".to_owned())
        );
        assert!(asked.iter().all(|(_, t)| t != "NAPTR"), "{asked:?}");
    }

    #[tokio::test]
    async fn dns_sips_uses_tls_only() {
        let (responder, resolver) = zone(vec![
            TestRecord::naptr("other.test", 10, 10, "s", "SIP+D2U", "_sip._udp.other.test"),
            TestRecord::naptr(
                "other.test",
                20,
                10,
                "s",
                "SIPS+D2T",
                "_sips._tcp.other.test",
            ),
            TestRecord::srv("_sip._udp.other.test", 10, 10, 5060, "udp.other.test"),
            TestRecord::srv("_sips._tcp.other.test", 10, 10, 5071, "tls.other.test"),
            TestRecord::a("udp.other.test", ip(1)),
            TestRecord::a("tls.other.test", ip(2)),
            TestRecord::srv("_sip._udp.plain.test", 10, 10, 5060, "udp.other.test"),
            TestRecord::srv("_sips._tcp.plain.test", 10, 10, 5072, "tls.other.test"),
        ])
        .await;
        let targets = resolver
            .targets("other.test", None, None, true)
            .await
            .expect("resolves");
        assert_eq!(summary(&targets), vec![at(Proto::Tls, 2, 5071)]);

        // No NAPTR: only `_sips._tcp` is asked.
        let targets = resolver
            .targets("plain.test", None, None, true)
            .await
            .expect("resolves");
        assert_eq!(summary(&targets), vec![at(Proto::Tls, 2, 5072)]);
        let srv_asked: Vec<String> = responder
            .queries()
            .into_iter()
            .filter(|(n, t)| t == "SRV" && n.ends_with("plain.test"))
            .map(|(n, _)| n)
            .collect();
        assert_eq!(srv_asked, ["_sips._tcp.plain.test"]);

        // transport=tcp in a SIPS URI is still TLS.
        let targets = resolver
            .targets("plain.test", None, Some(Proto::Tcp), true)
            .await
            .expect("resolves");
        assert_eq!(summary(&targets), vec![at(Proto::Tls, 2, 5072)]);
    }

    #[tokio::test]
    async fn dns_ip_literal_asks_nothing() {
        let (responder, resolver) = zone(vec![]).await;
        let cases = [
            ("127.0.0.9", None, None, false, Proto::Udp, "127.0.0.9:5060"),
            ("[::1]", None, None, false, Proto::Udp, "[::1]:5060"),
            (
                "::1",
                Some(5070),
                Some(Proto::Tcp),
                false,
                Proto::Tcp,
                "[::1]:5070",
            ),
            ("127.0.0.9", None, None, true, Proto::Tls, "127.0.0.9:5061"),
            (
                "127.0.0.9",
                None,
                Some(Proto::Tls),
                false,
                Proto::Tls,
                "127.0.0.9:5061",
            ),
        ];
        for (host, port, transport, sips, proto, addr) in cases {
            let targets = resolver
                .targets(host, port, transport, sips)
                .await
                .expect("an IP address resolves");
            let expected: SocketAddr = addr.parse().expect("test address");
            assert_eq!(summary(&targets), vec![(proto, expected)], "{host}");
        }
        assert!(responder.queries().is_empty(), "{:?}", responder.queries());
    }

    #[tokio::test]
    async fn dns_duplicates_and_refused_service_are_dropped() {
        let (_responder, resolver) = zone(vec![
            TestRecord::srv("_sip._udp.other.test", 10, 10, 5060, "sip1.other.test"),
            TestRecord::srv("_sip._udp.other.test", 20, 10, 5060, "alias.other.test"),
            TestRecord::a("sip1.other.test", ip(1)),
            TestRecord::a("alias.other.test", ip(1)),
            // "." : TCP decidedly not offered, so no fallback to the host's address either.
            TestRecord::srv("_sip._tcp.closed.test", 10, 0, 0, "."),
            TestRecord::a("closed.test", ip(5)),
        ])
        .await;
        let targets = resolver
            .targets("other.test", None, Some(Proto::Udp), false)
            .await
            .expect("resolves");
        assert_eq!(summary(&targets), vec![at(Proto::Udp, 1, 5060)]);
        assert!(targets[0].how.contains("sip1.other.test"));

        let refused = resolver
            .targets("closed.test", None, Some(Proto::Tcp), false)
            .await
            .expect_err("not offered");
        assert_eq!(
            refused,
            "sip:closed.test;transport=tcp: _sip._tcp.closed.test says the service is not \
             offered (SRV target \".\")"
        );
    }

    #[tokio::test]
    async fn dns_unknown_name_is_named_in_the_error() {
        let (responder, resolver) = zone(vec![TestRecord::a("other.test", ip(1))]).await;
        let error = resolver
            .targets("nowhere.test", None, None, false)
            .await
            .expect_err("does not exist");
        assert_eq!(
            error,
            "sip:nowhere.test: nowhere.test does not exist (NXDOMAIN)"
        );
        assert!(!is_unavailable(&error), "a 404, not a 503");
        // NXDOMAIN for the host: nothing below it is asked.
        assert_eq!(asked_types(&responder), ["NAPTR"]);

        let error = resolver
            .targets("nowhere.test", Some(5060), None, false)
            .await
            .expect_err("does not exist");
        assert!(error.contains("nowhere.test does not exist"), "{error}");
    }

    #[tokio::test]
    async fn dns_name_without_records_says_so() {
        let (_responder, resolver) = zone(vec![TestRecord::naptr(
            "other.test",
            10,
            10,
            "s",
            "SIP+D2W",
            "_sip._ws.other.test",
        )])
        .await;
        let error = resolver
            .targets("other.test", None, None, false)
            .await
            .expect_err("nothing usable");
        assert_eq!(
            error,
            "sip:other.test: no NAPTR, SRV or A/AAAA record for other.test"
        );
        assert!(!is_unavailable(&error));
    }

    #[tokio::test]
    async fn dns_silent_server_times_out_in_bounded_time() {
        // Bound and never read: every question goes unanswered.
        let silent = std::net::UdpSocket::bind(loopback()).expect("bind");
        let server = silent.local_addr().expect("address");
        let resolver = SipResolver::with_servers_and_timeout(&[server], Duration::from_millis(400));
        let started = Instant::now();
        let error = resolver
            .targets("other.test", None, Some(Proto::Udp), false)
            .await
            .expect_err("no answer");
        let took = started.elapsed();
        assert_eq!(
            error,
            "sip:other.test;transport=udp: DNS server timed out looking up SRV _sip._udp.other.test"
        );
        assert!(took < Duration::from_secs(2), "took {took:?}");
        assert!(took >= Duration::from_millis(300), "took {took:?}");
        assert!(is_unavailable(&error), "a 503, not a 404");
    }

    #[tokio::test]
    async fn dns_without_servers_fails_without_panicking() {
        let resolver = SipResolver::with_servers(&[]);
        let error = resolver
            .targets("other.test", None, None, false)
            .await
            .expect_err("no server to ask");
        assert!(error.starts_with("sip:other.test: "), "{error}");
        assert!(is_unavailable(&error), "{error}");
    }

    #[tokio::test]
    async fn dns_hostile_zone_is_capped() {
        let mut records = Vec::new();
        for n in 0..100 {
            let service = format!("_sip._udp.n{n}.evil.test");
            let host = format!("h{n}.evil.test");
            records.push(TestRecord::naptr(
                "evil.test",
                10,
                n,
                "s",
                "SIP+D2U",
                &service,
            ));
            records.push(TestRecord::srv(&service, 10, 10, 5060, &host));
            records.push(TestRecord::a(&host, Ipv4Addr::new(127, 1, 0, n as u8)));
        }
        // One host with many addresses: the list of targets is capped too.
        for n in 0..40 {
            records.push(TestRecord::a("many.evil.test", Ipv4Addr::new(127, 2, 0, n)));
        }
        let (responder, resolver) = zone(records).await;

        let targets = resolver
            .targets("evil.test", None, None, false)
            .await
            .expect("what was found within the budget");
        // NAPTR (1), then per name SRV (1) and A/AAAA (2): six names fit in 20 questions.
        assert_eq!(targets.len(), 6, "{targets:?}");
        assert_eq!(
            targets[0].addr,
            SocketAddr::from((Ipv4Addr::new(127, 1, 0, 0), 5060))
        );
        let asked = responder.queries();
        let naptr = asked.iter().filter(|(_, t)| t == "NAPTR").count();
        // The NAPTR set is too long for a datagram: asked again over TCP.
        assert!(naptr <= 2, "{asked:?}");
        assert!(
            asked.len() - naptr < MAX_QUERIES,
            "{} questions",
            asked.len()
        );

        let targets = resolver
            .targets("many.evil.test", Some(5060), None, false)
            .await
            .expect("resolves");
        assert_eq!(targets.len(), MAX_TARGETS);
    }
}
