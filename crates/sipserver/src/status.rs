//! `xstatus registrations` and `xstatus calls` (JSON under `/api/v1/status/…`) and the
//! Prometheus counters (`/metrics`).

use std::sync::{Arc, Weak};

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use causeway_cluster::metrics::gauge;
use causeway_common::time::unix_ms_now;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use serde::{Deserialize, Serialize};

use crate::SipService;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BindingRow {
    pub aor: String,
    pub contact: String,
    pub expires_in_s: u64,
    /// The peer the endpoint registered with.
    pub peer: usize,
    pub transport: String,
    pub received: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegistrationsStatus {
    /// The peer that answered.
    pub peer: usize,
    pub aors: usize,
    pub bindings: usize,
    /// Bindings by the peer they registered with.
    pub per_peer: Vec<(usize, usize)>,
    /// Registration licences in the cluster's pool (0: no licence limit).
    #[serde(default)]
    pub licences: u64,
    /// Rows that matched the query (`rows` is one page of them).
    #[serde(default)]
    pub matched: usize,
    pub rows: Vec<BindingRow>,
}

/// `?q=&peer=&offset=&limit=` of the registrations and calls lists: one page of what
/// contains `q` (an AOR; a call's caller or callee), of one peer if given. A registrations
/// page without a peer is `limit` AORs with their bindings; otherwise `limit` rows.
#[derive(Clone, Debug, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    pub q: String,
    /// A peer number; empty for every peer.
    #[serde(default)]
    pub peer: String,
    #[serde(default)]
    pub offset: usize,
    #[serde(default = "default_rows")]
    pub limit: usize,
}

fn default_rows() -> usize {
    ROWS
}

impl ListQuery {
    /// The first `limit` rows of every peer.
    pub fn first(limit: usize) -> ListQuery {
        ListQuery {
            q: String::new(),
            peer: String::new(),
            offset: 0,
            limit,
        }
    }

    fn peer(&self) -> Option<usize> {
        self.peer.trim().parse().ok()
    }

    fn matches(&self, peer: usize, texts: &[&str]) -> bool {
        let q = self.q.trim();
        self.peer().is_none_or(|p| p == peer)
            && (q.is_empty() || texts.iter().any(|t| t.contains(q)))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CallRow {
    pub peer: usize,
    pub call: String,
    pub from: String,
    pub to: String,
    pub duration_s: u64,
    pub kbps: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CallsStatus {
    pub peer: usize,
    /// `limits.calls.max` (0: none).
    pub calls_max: u64,
    /// Call licences in the cluster's pool (0: no licence limit).
    #[serde(default)]
    pub licences: u64,
    pub bandwidth_total_kbps: u64,
    pub calls: usize,
    pub kbps: u64,
    /// (peer, calls, kbps)
    pub per_peer: Vec<(usize, usize, u64)>,
    #[serde(default)]
    pub matched: usize,
    pub rows: Vec<CallRow>,
}

impl SipService {
    /// The cluster's registrations: the counts (at most a second old for a large table),
    /// and one page. Without a peer, a page is `limit` AORs in order (those containing `q`)
    /// with their bindings, read from the kept order; with a peer, it is `limit` bindings of
    /// that peer, found by a pass over every binding (decoding only that peer's).
    pub fn registrations_status(&self, query: &ListQuery) -> RegistrationsStatus {
        let now = unix_ms_now();
        let limit = query.limit.min(ROWS);
        let (per_owner, aors) = self.location.counts_recent(now);
        let (matched, page) = if query.peer().is_none() {
            self.location
                .page_of_aors(now, query.q.trim(), query.offset, limit)
        } else {
            let listing =
                self.location
                    .listing(now, query.peer(), query.q.trim(), query.offset, limit);
            (listing.matched, listing.page)
        };
        let mut per_peer: Vec<(usize, usize)> = per_owner.into_iter().collect();
        per_peer.sort();
        RegistrationsStatus {
            peer: self.self_index,
            aors,
            bindings: per_peer.iter().map(|p| p.1).sum(),
            per_peer,
            licences: self.licences.current().registrations,
            matched,
            rows: page
                .into_iter()
                .map(|b| BindingRow {
                    expires_in_s: b.expires_at_ms.saturating_sub(now).div_ceil(1000),
                    aor: b.aor,
                    contact: b.uri,
                    peer: b.owner,
                    transport: b.proto.name().to_string(),
                    received: b.received.to_string(),
                })
                .collect(),
        }
    }

    pub fn calls_status(&self, query: &ListQuery) -> CallsStatus {
        let now = unix_ms_now();
        let config = self.config();
        let per_peer = self.admission.usage();
        let matching: Vec<_> = self
            .admission
            .calls()
            .into_iter()
            .filter(|(peer, call, r)| query.matches(*peer, &[call, &r.from, &r.to]))
            .collect();
        CallsStatus {
            peer: self.self_index,
            calls_max: config.calls_max,
            licences: self.licences.current().calls,
            bandwidth_total_kbps: config.bandwidth_total_kbps,
            calls: per_peer.iter().map(|p| p.1).sum(),
            kbps: per_peer.iter().map(|p| p.2).sum(),
            per_peer,
            matched: matching.len(),
            rows: matching
                .into_iter()
                .skip(query.offset)
                .take(query.limit.min(ROWS))
                .map(|(peer, call, r)| CallRow {
                    peer,
                    call,
                    from: r.from,
                    to: r.to,
                    duration_s: now.saturating_sub(r.started_ms) / 1000,
                    kbps: r.kbps,
                })
                .collect(),
        }
    }

    /// The SIP part of a scrape of `/metrics`.
    fn encode_metrics(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let now = unix_ms_now();
        let (per_owner, aors) = self.location.counts_recent(now);
        let bindings: usize = per_owner.values().sum();
        let calls: usize = self.admission.usage().iter().map(|p| p.1).sum();
        let (servers, clients) = self.transaction_count();
        self.metrics.encode(enc)?;
        let gauges = [
            (
                "causeway_sip_registered_aors",
                "AORs with a live binding, cluster-wide",
                aors as f64,
            ),
            (
                "causeway_sip_bindings",
                "live bindings, cluster-wide",
                bindings as f64,
            ),
            (
                "causeway_sip_calls",
                "calls in progress, cluster-wide",
                calls as f64,
            ),
            (
                "causeway_sip_connections",
                "open SIP TCP/TLS connections on this peer",
                self.transports.connection_count() as f64,
            ),
            (
                "causeway_sip_transactions",
                "SIP transactions held on this peer",
                (servers + clients) as f64,
            ),
        ];
        for (name, help, v) in gauges {
            gauge(enc, name, help, &[(vec![], v)])?;
        }
        Ok(())
    }
}

/// SIP's collector on the node's `/metrics`.
pub(crate) struct SipCollector(pub(crate) Weak<SipService>);

impl std::fmt::Debug for SipCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SipCollector")
    }
}

impl Collector for SipCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        match self.0.upgrade() {
            Some(svc) => svc.encode_metrics(&mut enc),
            None => Ok(()),
        }
    }
}

/// Rows shown at most; the totals count everything.
const ROWS: usize = 10_000;

pub fn router(svc: Arc<SipService>) -> Router {
    Router::new()
        .route(
            "/api/v1/status/registrations",
            get(
                |State(s): State<Arc<SipService>>, Query(q): Query<ListQuery>| async move {
                    Json(s.registrations_status(&q))
                },
            ),
        )
        .route(
            "/api/v1/status/calls",
            get(
                |State(s): State<Arc<SipService>>, Query(q): Query<ListQuery>| async move {
                    Json(s.calls_status(&q))
                },
            ),
        )
        .route(
            "/api/v1/status/zones",
            get(|State(s): State<Arc<SipService>>| async move { Json(s.zones_status().await) }),
        )
        .route(
            "/api/v1/command/locate",
            axum::routing::post(
                |State(s): State<Arc<SipService>>, Json(req): Json<LocateRequest>| async move {
                    Json(s.locate(&req.alias, req.authenticated).await)
                },
            ),
        )
        .with_state(svc)
}

/// `xstatus zones`: each neighbour zone as this peer sees it (its own network path).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ZonesStatus {
    pub peer: usize,
    pub zones: Vec<ZoneRow>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ZoneRow {
    pub name: String,
    pub transport: String,
    /// Up while one address answers its keep-alive.
    pub up: bool,
    pub addresses: Vec<ZoneAddress>,
    /// The search rules that send requests to it.
    pub rules: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ZoneAddress {
    pub address: String,
    /// What the address resolved to, if it did.
    pub resolved: Option<String>,
    pub up: bool,
    pub state: String,
}

impl SipService {
    pub async fn zones_status(&self) -> ZonesStatus {
        let config = self.config();
        let mut zones = Vec::new();
        for (name, zone) in &config.routing.zones {
            let mut addresses = Vec::new();
            for a in &zone.addresses {
                let resolved = crate::proxy::resolve(a).await;
                let (up, state) = match resolved {
                    Some(addr) => self.proxy.zones.describe(&addr),
                    None => (false, "Does not resolve".to_string()),
                };
                addresses.push(ZoneAddress {
                    address: a.clone(),
                    resolved: resolved.map(|r| r.to_string()),
                    up,
                    state,
                });
            }
            let transport = if zone.dns {
                "DNS (RFC 3263: NAPTR, SRV, A/AAAA of each request's domain)".to_string()
            } else {
                zone.proto.unwrap_or(crate::Proto::Udp).name().to_string()
            };
            zones.push(ZoneRow {
                name: name.clone(),
                transport,
                // A DNS zone has no addresses to probe: each request finds its own.
                up: zone.dns || addresses.iter().any(|a| a.up),
                addresses,
                rules: config
                    .routing
                    .rules
                    .iter()
                    .filter(|r| r.target == crate::routing::RuleTarget::Zone(name.clone()))
                    .map(|r| format!("{} '{}'", r.name, r.text))
                    .collect(),
            });
        }
        ZonesStatus {
            peer: self.self_index,
            zones,
        }
    }
}

#[derive(Deserialize)]
pub struct LocateRequest {
    pub alias: String,
    /// As for a request that authenticated (rules marked `auth` apply); the default.
    #[serde(default = "yes")]
    pub authenticated: bool,
}

fn yes() -> bool {
    true
}

/// `xcommand Locate`: the steps a request for an alias would go through, and where it ends.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Located {
    pub alias: String,
    pub steps: Vec<String>,
    pub result: String,
}

impl SipService {
    /// Where a request for `alias` (`user@host`, or a user of the cluster's own domain) would
    /// go from this peer: the cluster's own registrations first, then the search rules in
    /// order, as for an `authenticated` request or not. Nothing is sent.
    pub async fn locate(&self, alias: &str, authenticated: bool) -> Located {
        let alias = alias.trim();
        // As a Request-URI: a port, `;transport=` or `sips:` change where RFC 3263 leads.
        let written = if alias.starts_with("sip:") || alias.starts_with("sips:") {
            alias.to_string()
        } else if alias.contains('@') {
            format!("sip:{alias}")
        } else {
            format!("sip:{alias}@{}", self.realm())
        };
        let uri = causeway_sip::SipUri::parse(&written).ok();
        let (user, host) = match &uri {
            Some(uri) => (uri.user.clone().unwrap_or_default(), uri.host.clone()),
            None => {
                let bare = alias.trim_start_matches("sip:");
                match bare.split_once('@') {
                    Some((u, h)) => (u.to_string(), h.to_string()),
                    None => (bare.to_string(), self.realm()),
                }
            }
        };
        let alias = alias.trim_start_matches("sip:");
        let mut steps = Vec::new();
        let local = self.is_local_domain(&host);
        if local {
            let aor = causeway_sip::SipUri::parse(&format!("sip:{user}@{host}"))
                .map(|uri| self.canonical_aor(&uri))
                .unwrap_or_else(|_| format!("sip:{user}@{host}"));
            let bindings = self.location.lookup(&aor, unix_ms_now());
            steps.push(format!(
                "Local registrations of {aor}: {} binding(s)",
                bindings.len()
            ));
            if !bindings.is_empty() {
                return Located {
                    alias: alias.to_string(),
                    steps,
                    result: format!("Found: {} local binding(s) of {aor}", bindings.len()),
                };
            }
        } else {
            steps.push(format!("{host} is not a domain of this cluster"));
        }
        let config = self.config();
        let plan = config.routing.plan(&user, &host, authenticated);
        steps.extend(plan.trace.iter().cloned());
        let mut failure = None;
        let mut found = None;
        for step in &plan.steps {
            let Some((zone_name, zone)) = step.zone else {
                let aor = causeway_sip::SipUri::parse(&format!("sip:{}@{}", step.user, step.host))
                    .map(|uri| self.canonical_aor(&uri))
                    .unwrap_or_else(|_| format!("sip:{}@{}", step.user, step.host));
                let n = self.location.lookup(&aor, unix_ms_now()).len();
                steps.push(format!("Local registrations of {aor}: {n} binding(s)"));
                if n > 0 {
                    found = Some(format!(
                        "Found: search rule {} sends it to {n} local binding(s) of {aor}",
                        step.rule.name
                    ));
                    break;
                }
                failure = Some(format!(
                    "Not found: 480 Temporarily Unavailable (search rule {}: no binding of {aor})",
                    step.rule.name
                ));
                continue;
            };
            if zone.dns {
                // Asked now, as a request would (RFC 3263); nothing is sent.
                let (port, transport, secure) = uri.as_ref().map_or((None, None, false), |u| {
                    (
                        u.port,
                        u.transport().and_then(|t| crate::Proto::parse(&t)),
                        u.secure,
                    )
                });
                match self
                    .proxy
                    .resolver
                    .targets(&step.host, port, transport, secure)
                    .await
                {
                    Ok(targets) => {
                        for t in &targets {
                            steps.push(format!(
                                "Zone {zone_name} (DNS) target {} {}: {}",
                                t.proto.name(),
                                t.addr,
                                t.how
                            ));
                        }
                        if let Some(first) = targets.first() {
                            found = Some(format!(
                                "Found: search rule {} sends it to zone {zone_name} (DNS) at {} ({}) as {}@{}",
                                step.rule.name,
                                first.addr,
                                first.proto.name(),
                                step.user,
                                step.host
                            ));
                            break;
                        }
                    }
                    Err(reason) => {
                        let (status, text) = crate::proxy::dns_failure(zone_name, &reason);
                        steps.push(format!("Zone {zone_name} (DNS): {reason}"));
                        failure = Some(format!("Not found: {status} {text}"));
                    }
                }
                continue;
            }
            // An address known down (by its keep-alive) is passed over; a name is resolved
            // only when a request is sent.
            let down = |a: &String| {
                a.parse::<std::net::SocketAddr>()
                    .is_ok_and(|a| !self.proxy.zones.is_up(&a))
            };
            for a in zone.addresses.iter().filter(|a| down(a)) {
                steps.push(format!(
                    "Zone {zone_name} address {a}: down (no answer to OPTIONS)"
                ));
            }
            if let Some(at) = zone.addresses.iter().find(|a| !down(a)) {
                found = Some(format!(
                    "Found: search rule {} sends it to zone {zone_name} at {at} ({}) as {}@{}",
                    step.rule.name,
                    zone.proto.unwrap_or(crate::Proto::Udp).name(),
                    step.user,
                    step.host
                ));
                break;
            }
            failure = Some(format!(
                "Not found: 503 Service Unavailable (zone {zone_name}: no address answers)"
            ));
        }
        let result = match (found, failure) {
            (Some(found), _) => found,
            (None, Some(failure)) => failure,
            (None, None) if local => "Not found: 480 Temporarily Unavailable (no binding, no search rule takes it)".into(),
            (None, None) => "Not found: 403 Forbidden (not a domain of this cluster, and no search rule sends it anywhere)".into(),
        };
        Located {
            alias: alias.to_string(),
            steps,
            result,
        }
    }
}
