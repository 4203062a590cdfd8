//! The transaction-stateful proxy (SV-3, RFC 3261 §16–17): a server transaction per
//! request received, a client transaction per branch forwarded, parallel forking, the best
//! final response chosen (§16.7), CANCEL, retransmissions on UDP, 408 on timeout.
//!
//! A request for a registered AOR goes to each binding: straight to the contact for UDP,
//! on the endpoint's own connection when this peer holds it, and through the peer that
//! holds it otherwise (a Route to that peer carrying the connection as a flow token,
//! `cw-flow`, RFC 5626 style). Record-Route keeps every peer that did so on the dialog.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use causeway_common::time::unix_ms_now;
use causeway_sip::build::{self, Edit};
use causeway_sip::{HeaderKind, Message, NameAddr, SipUri, Via};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::routing::Credentials;
use crate::service::{AuthPolicy, SipService, LOG};
use crate::transport::{Incoming, Proto, Source, Target};
use crate::uac_auth;

const T1: Duration = Duration::from_millis(500);
const T2: Duration = Duration::from_secs(4);
/// How long an INVITE branch may ring before it is cancelled (Timer C, §16.6 step 11).
const TIMER_C: Duration = Duration::from_secs(180);
/// A branch to a zone address with another address after it moves on when nothing at all
/// has answered by then (RFC 3263 §4.3: the next target on a timeout), not after timer B.
const FAILOVER_AFTER: Duration = Duration::from_secs(4);
/// How long a finished transaction absorbs retransmissions (Timer J, 64·T1).
/// The methods this system handles (as registrar, as proxy, or answering itself).
const ALLOW: &[&str] = &[
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "OPTIONS",
    "MESSAGE",
    "REGISTER",
    "SUBSCRIBE",
    "NOTIFY",
    "REFER",
    "INFO",
    "UPDATE",
    "PRACK",
    "PUBLISH",
];
/// The extensions this system supports as a UAS (a request addressed to it may require them).
const UAS_EXTENSIONS: &[&str] = &["path", "outbound"];
const LINGER: Duration = Duration::from_secs(32);
const COOKIE: &str = "z9hG4bK";
const FLOW_PARAM: &str = "cw-flow";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BranchState {
    Trying,
    Proceeding,
    Done,
}

struct ServerTx {
    source: Source,
    /// Kept until a final response: CANCEL and our own responses are built from it.
    request: Option<Message>,
    last_response: Option<Bytes>,
    final_status: Option<u16>,
    finished_at: Option<Instant>,
    created: Instant,
    branches: Vec<String>,
    best: Option<Message>,
    cancelled: bool,
    /// A branch could not be sent (transport error): answered as unreachable if nothing
    /// better comes.
    unreachable: bool,
    /// The call this INVITE was admitted as (SV-4), released if the INVITE fails.
    call: Option<String>,
}

struct ClientTx {
    server: String,
    target: Target,
    /// The request as sent: retransmitted, and the source of its ACK and CANCEL.
    sent: Message,
    state: BranchState,
    invite: bool,
    started: Instant,
    /// Further addresses of the same zone, in order: tried one at a time when this one
    /// fails (503, no connection, no answer).
    next: Vec<Target>,
    /// The zone's credentials: a 401/407 from this address is answered once with them.
    credentials: Option<Credentials>,
    /// This branch's request has its credentials for this address already.
    answered: bool,
    /// How far the CSeq sent is above the caller's (each answered challenge adds one):
    /// answers go back shifted down by it (`uac_auth.rs`).
    cseq_shift: u32,
}

/// The proxy's own state: its transactions, the neighbour zones' health as this peer sees
/// it, and the resolver DNS zones ask. The registrar's is in `location`, admission's in
/// `admission`; what they share (the node, the transports, the configuration) is the
/// service's.
pub(crate) struct Proxy {
    pub(crate) transactions: std::sync::Mutex<ProxyState>,
    pub(crate) zones: crate::zones::ZoneHealth,
    pub(crate) resolver: crate::dns::SipResolver,
}

impl Proxy {
    pub(crate) fn new(resolver: crate::dns::SipResolver) -> Proxy {
        Proxy {
            transactions: Default::default(),
            zones: Default::default(),
            resolver,
        }
    }
}

#[derive(Default)]
pub struct ProxyState {
    servers: HashMap<String, ServerTx>,
    clients: HashMap<String, ClientTx>,
    /// Requests being handled whose server transaction does not exist yet (a REGISTER
    /// being saved, a request on its way to being forwarded).
    starting: std::collections::HashSet<String>,
}

/// Holds a request's key in `starting` while it is handled. Copies that arrive meanwhile
/// are dropped rather than handled twice: UDP retransmissions, which under load wait in
/// the queue with their original and then run on another worker at the same time (an
/// INVITE forwarded twice reaches the callee twice; a REGISTER would be saved twice).
struct Starting {
    svc: Arc<SipService>,
    key: String,
}

impl Drop for Starting {
    fn drop(&mut self) {
        self.svc.proxy_lock().starting.remove(&self.key);
    }
}

fn server_key(via: &Via, method: &str) -> String {
    let class = match method {
        "ACK" | "INVITE" => "INVITE",
        m => m,
    };
    format!(
        "{}|{}:{}|{class}",
        via.branch().unwrap_or(""),
        via.host.to_ascii_lowercase(),
        via.port.unwrap_or(0)
    )
}

/// `host:port` to one address: an IP as it is, a name through the system's resolver
/// (logged when it does not resolve).
pub(crate) async fn resolve(address: &str) -> Option<SocketAddr> {
    if let Ok(a) = address.parse::<SocketAddr>() {
        return Some(a);
    }
    match tokio::net::lookup_host(address).await {
        Ok(mut found) => found.next(),
        Err(e) => {
            debug!(target: LOG, address = %address, reason = %e, "A zone address does not resolve");
            None
        }
    }
}

/// The host of `host:port` when it is a name, not an IP address.
fn host_name(address: &str) -> Option<&str> {
    let (host, _) = address.rsplit_once(':')?;
    (host.parse::<std::net::IpAddr>().is_err() && !host.starts_with('[')).then_some(host)
}

impl SipService {
    /// A zone's address, resolved; over TLS, a server at an address written as a name
    /// must prove that name (else its certificate must name the IP address).
    pub(crate) async fn resolve_zone_address(
        &self,
        proto: Option<Proto>,
        address: &str,
    ) -> Option<SocketAddr> {
        let addr = resolve(address).await?;
        if proto == Some(Proto::Tls) {
            if let Some(name) = host_name(address) {
                self.transports.expect_tls_name(addr, name);
            }
        }
        Some(addr)
    }
}

fn uri_target(uri: &SipUri) -> Option<Target> {
    let proto = match uri.transport() {
        Some(t) => Proto::parse(&t)?,
        None => Proto::Udp,
    };
    let ip = uri.ip()?;
    let port = uri
        .port
        .unwrap_or(if proto == Proto::Tls { 5061 } else { 5060 });
    Some(Target {
        proto,
        addr: SocketAddr::new(ip, port),
        conn: None,
        local: None,
    })
}

/// The answer when a DNS zone finds nowhere to send a request: 404 when the domain has no
/// SIP server in DNS, 503 when DNS itself could not be asked (a server silent or failing:
/// the caller may try again later).
pub(crate) fn dns_failure(zone: &str, reason: &str) -> (u16, String) {
    if crate::dns::is_unavailable(reason) {
        (503, format!("Service Unavailable (zone {zone}: {reason})"))
    } else {
        (404, format!("Not Found (zone {zone}: {reason})"))
    }
}

/// Methods that create a dialog and so are record-routed when they have no To tag.
fn creates_dialog(method: &str) -> bool {
    matches!(method, "INVITE" | "SUBSCRIBE" | "REFER" | "NOTIFY")
}

/// What this peer's own Routes at the top of a request say.
#[derive(Default)]
struct OurRoutes {
    popped: usize,
    flow: Option<u64>,
    /// A dialog whose INVITE was sent with credentials (`uac_auth.rs`): the shift, and the
    /// hash of the caller's tag (only the caller's requests are shifted).
    shift: Option<(u32, String)>,
}

impl OurRoutes {
    /// How far `msg`'s CSeq goes up on its way through: the dialog's shift if it comes from
    /// the caller.
    fn shift_for(&self, msg: &Message) -> u32 {
        let Some((shift, caller)) = &self.shift else {
            return 0;
        };
        let from_tag = msg
            .value(HeaderKind::From)
            .and_then(|f| NameAddr::parse(&f).ok())
            .and_then(|f| f.tag().map(uac_auth::tag_hash));
        if from_tag.as_ref() == Some(caller) {
            *shift
        } else {
            0
        }
    }
}

/// Where one forwarded copy goes: the Request-URI it carries, the next hop, Route lines to
/// put first.
struct Hop {
    uri: Option<String>,
    target: Target,
    routes: Vec<String>,
    /// The endpoint's connection on this peer: recorded in our Record-Route.
    flow: Option<u64>,
    /// Where to try next when `target` fails (a zone's further addresses).
    next: Vec<Target>,
    /// A zone's credentials, for its digest challenges.
    credentials: Option<Credentials>,
}

impl Hop {
    /// Straight to `target`, the Request-URI unchanged; on the connection it names, if any.
    fn direct(target: Target) -> Hop {
        Hop {
            uri: None,
            target,
            routes: vec![],
            flow: target.conn,
            next: vec![],
            credentials: None,
        }
    }
}

/// The next hop after the Routes this peer removed: the next Route (loose routing), else
/// the Request-URI.
fn next_hop(routes: &[String], popped: usize, uri: Option<&str>) -> Option<Target> {
    match routes.get(popped) {
        Some(route) => uri_target(&NameAddr::parse(route).ok()?.uri),
        None => uri_target(&SipUri::parse(uri?).ok()?),
    }
}

impl SipService {
    pub(crate) async fn handle_request(self: Arc<Self>, incoming: Incoming) {
        let Incoming { msg, source } = incoming;
        let Some(method) = msg.method().map(str::to_string) else {
            return;
        };
        let via = match msg.value(HeaderKind::Via).map(|v| {
            let first = causeway_sip::split_list(&v)
                .into_iter()
                .next()
                .unwrap_or_default();
            Via::parse(&first)
        }) {
            Some(Ok(v)) => v,
            _ => {
                if method != "ACK" {
                    self.respond(&msg, &source, 400, "Bad Request (Via)", &[]);
                }
                return;
            }
        };
        let key = server_key(&via, &method);
        match method.as_str() {
            "ACK" => {
                let st = self.proxy_lock();
                if let Some(tx) = st.servers.get(&key) {
                    if tx.final_status.is_some_and(|s| s >= 300) {
                        // The ACK of our own non-2xx answer ends here (§16.7 step 8 / 17.2.1).
                        return;
                    }
                }
                drop(st);
                // An ACK for a 2xx is a request of its own: forwarded without a transaction.
                self.forward_stateless(&msg, &source);
                return;
            }
            "CANCEL" => return self.cancel(&msg, &source, &key),
            _ => {}
        }
        let _starting = {
            let mut st = self.proxy_lock();
            if let Some(tx) = st.servers.get(&key) {
                // A retransmission: the last response again, if there was one (§17.2).
                if let Some(r) = &tx.last_response {
                    self.transports.send(&source_target(&tx.source), r.clone());
                }
                return;
            }
            if !st.starting.insert(key.clone()) {
                return; // a copy of a request being handled now: it gets that one's answer
            }
            Starting {
                svc: self.clone(),
                key: key.clone(),
            }
        };
        // §16.3: Max-Forwards.
        let max_forwards = match msg.max_forwards() {
            Ok(m) => m.unwrap_or(70),
            Err(_) => return,
        };
        // §16.4: Routes naming this peer are ours to remove.
        let routes = msg.values(HeaderKind::Route);
        let ours = self.our_routes(&routes);
        let (popped, flow) = (ours.popped, ours.flow);
        let dialog_shift = ours.shift_for(&msg);
        let uri = match msg.uri().map(SipUri::parse) {
            Some(Ok(u)) => u,
            _ => {
                self.respond(&msg, &source, 416, "Unsupported URI Scheme", &[]);
                return;
            }
        };
        let remaining_routes = routes.len() - popped;
        let to_us = uri.user.is_none() && self.is_local_domain(&uri.host);
        if remaining_routes == 0 && method == "REGISTER" && self.is_local_domain(&uri.host) {
            self.register(&msg, &source).await;
            return;
        }
        if remaining_routes == 0 && to_us {
            // Addressed to this peer itself: it is the UAS (§8.2). Extensions it is
            // required to know first (§8.2.2.3), then the methods it serves.
            let unsupported: Vec<String> = msg
                .values(HeaderKind::Require)
                .into_iter()
                .filter(|tag| {
                    !UAS_EXTENSIONS
                        .iter()
                        .any(|s| s.eq_ignore_ascii_case(tag.trim()))
                })
                .collect();
            if !unsupported.is_empty() {
                let header = format!("Unsupported: {}", unsupported.join(", "));
                self.respond(&msg, &source, 420, "Bad Extension", &[header]);
                return;
            }
            if method == "OPTIONS" {
                self.respond(
                    &msg,
                    &source,
                    200,
                    "OK",
                    &[format!("Allow: {}", ALLOW.join(", "))],
                );
                return;
            }
            if max_forwards == 0 {
                self.respond(&msg, &source, 483, "Too Many Hops", &[]);
                return;
            }
            if !ALLOW.contains(&method.as_str()) {
                // A method this system does not know, to the system itself (§21.5.2).
                self.respond(
                    &msg,
                    &source,
                    501,
                    "Not Implemented",
                    &[format!("Allow: {}", ALLOW.join(", "))],
                );
                return;
            }
        }
        if max_forwards == 0 {
            self.respond(&msg, &source, 483, "Too Many Hops", &[]);
            return;
        }
        // §16.3 step 5: this proxy supports no extension a Proxy-Require may ask for; the
        // answer lists what it did not understand (RFC 4475 §3.3.5, bext01).
        let proxy_require: Vec<String> = msg
            .values(HeaderKind::ProxyRequire)
            .into_iter()
            .filter(|tag| !tag.is_empty())
            .collect();
        if !proxy_require.is_empty() {
            let header = format!("Unsupported: {}", proxy_require.join(", "));
            self.respond(&msg, &source, 420, "Bad Extension", &[header]);
            return;
        }
        let has_to_tag = msg
            .value(HeaderKind::To)
            .is_some_and(|t| build::has_tag(&t));
        // The authentication policy, for initial requests from outside the cluster (ACK and
        // CANCEL, handled above, cannot be challenged: §22.1).
        let from_peer = self.relayed_by_peer(&msg, &source);
        let policy = self.config().policy_for(source.remote.ip());
        let checking = policy == AuthPolicy::Check && !self.config().users.is_empty();
        if checking
            && !has_to_tag
            && !from_peer
            && !self.authenticate_request(&msg, &method, &source).await
        {
            return;
        }
        let authenticated = from_peer || checking || policy == AuthPolicy::TreatAsAuthenticated;
        // Not an open relay: beyond this cluster's domains a request goes only where a
        // dialog through this cluster (our Record-Route, now our Route) or another peer of
        // the cluster sends it.
        let may_leave = popped > 0 && (has_to_tag || from_peer);
        let refuse_relay = || {
            self.respond(
                &msg,
                &source,
                403,
                "Forbidden (not relaying outside the cluster's domains)",
                &[],
            );
        };
        let flow_target = (remaining_routes == 0)
            .then(|| self.flow_target(flow, &source))
            .flatten();
        let hops: Vec<Hop> = if let Some(target) = flow_target {
            // Towards an endpoint whose connection this peer holds (a relayed request, or
            // in-dialog). A closed connection falls through to the Request-URI.
            vec![Hop::direct(target)]
        } else if remaining_routes == 0 && uri.user.is_some() && self.is_local_domain(&uri.host) {
            let aor = self.canonical_aor(&uri);
            let bindings = self.location.lookup(&aor, unix_ms_now());
            if bindings.is_empty() {
                // The cluster's own registrations first; then the search rules.
                match self.zone_hop(&uri, authenticated, flow).await {
                    Ok(hops) if !hops.is_empty() => hops,
                    Err((status, reason)) => {
                        self.respond(&msg, &source, status, &reason, &[]);
                        return;
                    }
                    Ok(_) => {
                        // To an unauthenticated requester, an unknown user and a known one
                        // with no binding look alike: a scanner cannot list the users.
                        let user = uri.user.as_deref().unwrap_or("");
                        if !authenticated || self.config().users.contains_key(user) {
                            self.respond(&msg, &source, 480, "Temporarily Unavailable", &[]);
                        } else {
                            self.respond(&msg, &source, 404, "Not Found", &[]);
                        }
                        return;
                    }
                }
            } else {
                self.binding_hops(&bindings, flow)
            }
        } else if !may_leave {
            // Beyond the cluster's domains only where a search rule sends it (a request
            // with Routes of others' is not ours to route).
            let zone = match remaining_routes {
                0 => self.zone_hop(&uri, authenticated, flow).await,
                _ => Ok(Vec::new()),
            };
            match zone {
                Ok(hops) if !hops.is_empty() => hops,
                Err((status, reason)) => {
                    self.respond(&msg, &source, status, &reason, &[]);
                    return;
                }
                Ok(_) => return refuse_relay(),
            }
        } else {
            // Loose routing to the next Route (the Request-URI stays), or to the Request-URI.
            match next_hop(&routes, popped, msg.uri()) {
                Some(target) => vec![Hop::direct(target)],
                None => {
                    let reason = if remaining_routes > 0 {
                        "Not Found (next Route cannot be reached)"
                    } else {
                        "Not Found (no route to the Request-URI)"
                    };
                    self.respond(&msg, &source, 404, reason, &[]);
                    return;
                }
            }
        };
        if hops.is_empty() {
            self.respond(&msg, &source, 480, "Temporarily Unavailable", &[]);
            return;
        }
        let initial_invite = method == "INVITE" && !has_to_tag;
        let call = if initial_invite && !from_peer {
            match self.admission.admit(&msg, self.admission_limits()).await {
                Ok(call) => Some(call),
                Err(retry_after) => {
                    self.respond(
                        &msg,
                        &source,
                        503,
                        "Service Unavailable (call limit reached)",
                        &[format!("Retry-After: {retry_after}")],
                    );
                    return;
                }
            }
        } else {
            None
        };
        if method == "BYE" {
            // Released in the background: the BYE need not wait for the record to go.
            let (svc, bye) = (self.clone(), msg.clone());
            self.tasks
                .spawn(async move { svc.admission.release(&bye).await });
        }
        let record_route = creates_dialog(&method) && !has_to_tag;
        let invite = method == "INVITE";
        let now = Instant::now();
        let mut st = self.proxy_lock();
        let mut branch_ids = Vec::with_capacity(hops.len());
        for mut hop in hops {
            // Out from the address the request came to: the one its sender knows this
            // system by, and the only one this system may hold (an HA secondary of two).
            hop.target.local = Some(source.local);
            let branch = format!("{COOKIE}cw{}", self.unique());
            let out_proto = hop.target.proto;
            let mut prepend = vec![self.via_line(out_proto, source.local, &branch)];
            if self.is_cluster_peer(hop.target.addr.ip()) {
                // Relayed to another peer: marked so it can tell this from a forgery.
                prepend.push(self.relay.mark(&msg, &branch));
            }
            if record_route {
                prepend.push(self.record_route(out_proto, source.local, hop.flow));
                if out_proto != source.proto {
                    prepend.push(self.record_route(source.proto, source.local, None));
                }
            }
            prepend.extend(hop.routes.iter().map(|r| format!("Route: {r}")));
            let edit = Edit {
                uri: hop.uri.clone(),
                prepend,
                pop_via: false,
                pop_routes: popped,
                max_forwards: Some(max_forwards.saturating_sub(1)),
            };
            let mut bytes = build::rewrite(&msg, &edit);
            if dialog_shift > 0 {
                match uac_auth::shift_cseq(&bytes, i64::from(dialog_shift)) {
                    Some(shifted) => bytes = shifted,
                    None => continue,
                }
            }
            let Ok(sent) = Message::parse(
                bytes.clone(),
                causeway_sip::Transport::Stream,
                &Default::default(),
            ) else {
                continue;
            };
            let on_fail = {
                let svc = self.clone();
                let branch = branch.clone();
                move || svc.branch_failed(&branch)
            };
            self.transports.send_or(&hop.target, bytes, on_fail);
            st.clients.insert(
                branch.clone(),
                ClientTx {
                    server: key.clone(),
                    target: hop.target,
                    sent,
                    state: BranchState::Trying,
                    invite,
                    started: now,
                    next: hop.next,
                    credentials: hop.credentials,
                    answered: false,
                    cseq_shift: dialog_shift,
                },
            );
            branch_ids.push(branch);
        }
        let trying = invite.then(|| build::response(&msg, 100, "Trying", None, &[]));
        if let Some(t) = &trying {
            self.reply(&source, t.clone(), 100);
        }
        st.servers.insert(
            key.clone(),
            ServerTx {
                source,
                request: Some(msg),
                last_response: trying,
                final_status: None,
                finished_at: None,
                created: now,
                branches: branch_ids.clone(),
                best: None,
                cancelled: false,
                unreachable: false,
                call,
            },
        );
        drop(st);
        for b in branch_ids {
            self.tasks.spawn(self.clone().branch_timer(b));
        }
    }

    fn proxy_lock(&self) -> std::sync::MutexGuard<'_, ProxyState> {
        self.proxy
            .transactions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The Via of a request this peer sends from its address `local`.
    fn via_line(&self, proto: Proto, local: IpAddr, branch: &str) -> String {
        format!(
            "Via: SIP/2.0/{} {};branch={branch}",
            proto.name(),
            SocketAddr::new(local, self.transports.port(proto))
        )
    }

    /// The connection a flow token names, unless the request came on it.
    fn flow_target(&self, flow: Option<u64>, source: &Source) -> Option<Target> {
        flow.filter(|c| source.conn != Some(*c))
            .and_then(|c| self.transports.connection(c))
    }

    fn record_route(&self, proto: Proto, local: IpAddr, flow: Option<u64>) -> String {
        let flow = flow
            .map(|f| format!(";{FLOW_PARAM}={f}"))
            .unwrap_or_default();
        format!(
            "Record-Route: <sip:{};transport={};lr{flow}>",
            SocketAddr::new(local, self.transports.port(proto)),
            proto.name().to_ascii_lowercase()
        )
    }

    /// Where the search rules send a request no binding of this cluster takes: each rule
    /// that takes it in priority order, until one whose target can (a zone with an address
    /// that answers its keep-alive, or local bindings of the rewritten alias). Empty: no rule
    /// takes it. Err: the answer for the last target that was tried and cannot take it (480
    /// no local binding, 503 no zone address answers, 404 or 503 for what DNS found).
    async fn zone_hop(
        &self,
        uri: &SipUri,
        authenticated: bool,
        flow: Option<u64>,
    ) -> Result<Vec<Hop>, (u16, String)> {
        let config = self.config();
        let plan = config
            .routing
            .plan(uri.user.as_deref().unwrap_or(""), &uri.host, authenticated);
        let mut failure = None;
        for step in &plan.steps {
            let rewritten = step.user != uri.user.as_deref().unwrap_or("") || step.host != uri.host;
            let Some((zone_name, zone)) = step.zone else {
                let mut local = uri.clone();
                local.user = Some(step.user.clone());
                local.host = step.host.clone();
                let bindings = self
                    .location
                    .lookup(&self.canonical_aor(&local), unix_ms_now());
                let hops = self.binding_hops(&bindings, flow);
                if !hops.is_empty() {
                    return Ok(hops);
                }
                failure = Some((
                    480,
                    format!(
                        "Temporarily Unavailable (search rule {}: no binding of {}@{})",
                        step.rule.name, step.user, step.host
                    ),
                ));
                continue;
            };
            // Every address not known down, in order: the first now, the others if it fails.
            let mut targets = Vec::new();
            if zone.dns {
                // The request's (rewritten) domain, as RFC 3263 finds it: each target in
                // order, the next on a timeout, a transport error or a 503 (§4.3).
                let transport = uri.transport().and_then(|t| Proto::parse(&t));
                match self
                    .proxy
                    .resolver
                    .targets(&step.host, uri.port, transport, uri.secure)
                    .await
                {
                    Ok(found) => {
                        // DNS that names this cluster would send the request round in a
                        // loop until Max-Forwards runs out: those targets are left out.
                        let away = |t: &crate::dns::DnsTarget| {
                            !self.is_own_address(t.addr.ip()) && !self.is_cluster_peer(t.addr.ip())
                        };
                        let n = found.len();
                        for t in found.into_iter().filter(away) {
                            if t.proto == Proto::Tls {
                                // RFC 5922 §4: the server proves the domain asked for, not
                                // the name an SRV record pointed to.
                                self.transports.expect_tls_name(t.addr, &step.host);
                            }
                            targets.push(Target {
                                proto: t.proto,
                                addr: t.addr,
                                conn: None,
                                local: None,
                            });
                        }
                        if n > 0 && targets.is_empty() {
                            failure = Some((
                                482,
                                format!(
                                    "Loop Detected (zone {zone_name}: DNS sends {} to this cluster)",
                                    step.host
                                ),
                            ));
                            continue;
                        }
                    }
                    Err(reason) => {
                        debug!(target: LOG, zone = %zone_name, reason = %reason,
                            "DNS zone found no target");
                        failure = Some(dns_failure(zone_name, &reason));
                        continue;
                    }
                }
            }
            for address in &zone.addresses {
                let Some(addr) = self.resolve_zone_address(zone.proto, address).await else {
                    continue;
                };
                if self.proxy.zones.is_up(&addr) {
                    targets.push(Target {
                        proto: zone.proto.unwrap_or(Proto::Udp),
                        addr,
                        conn: None,
                        local: None,
                    });
                }
            }
            if !targets.is_empty() {
                let first = targets.remove(0);
                debug!(target: LOG, rule = %step.rule.name, zone = %zone_name, dst = %first.addr,
                    "Search rule matched");
                let mut hop = Hop::direct(first);
                hop.next = targets;
                hop.credentials = zone.credentials.clone();
                if rewritten {
                    let mut to = uri.clone();
                    to.user = Some(step.user.clone());
                    to.host = step.host.clone();
                    hop.uri = Some(to.to_string());
                }
                return Ok(vec![hop]);
            }
            failure = Some((
                503,
                format!("Service Unavailable (zone {zone_name}: no address answers)"),
            ));
        }
        match failure {
            Some(reason) => Err(reason),
            None => Ok(Vec::new()),
        }
    }

    /// The hops to the bindings of one AOR. RFC 5626 §5.3: the flows of one instance (same
    /// +sip.instance, other reg-id) are ways to reach one device, not devices to fork to: the
    /// most recently registered flow that can be used carries the request.
    fn binding_hops(&self, bindings: &[crate::location::Binding], flow: Option<u64>) -> Vec<Hop> {
        let mut hops: Vec<Hop> = Vec::new();
        let mut newest: HashMap<&str, (u64, usize)> = HashMap::new();
        for b in bindings {
            let Some(hop) = self.binding_hop(b, flow) else {
                continue;
            };
            let Some(instance) = b.instance.as_deref() else {
                hops.push(hop);
                continue;
            };
            match newest.get_mut(instance) {
                Some((at, i)) => {
                    if b.registered_at_ms > *at {
                        *at = b.registered_at_ms;
                        hops[*i] = hop;
                    }
                }
                None => {
                    newest.insert(instance, (b.registered_at_ms, hops.len()));
                    hops.push(hop);
                }
            }
        }
        hops
    }

    /// Every `zone_keepalive`: an OPTIONS to every address of every zone, and 30020 for a
    /// zone none of whose addresses answers.
    pub(crate) async fn zone_keepalive(self: Arc<Self>) {
        let mut alarmed: std::collections::HashSet<String> = Default::default();
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(self.settings.zone_keepalive) => {}
            }
            let config = self.config();
            let mut zones: Vec<(String, Proto, Vec<SocketAddr>)> = Vec::new();
            for (name, zone) in &config.routing.zones {
                let mut addrs = Vec::new();
                for a in &zone.addresses {
                    addrs.extend(self.resolve_zone_address(zone.proto, a).await);
                }
                zones.push((name.clone(), zone.proto.unwrap_or(Proto::Udp), addrs));
            }
            let all: Vec<SocketAddr> = zones.iter().flat_map(|z| z.2.clone()).collect();
            let sent = self.proxy.zones.round(&all, || {
                format!("{}{}", crate::zones::KEEPALIVE_BRANCH, self.unique())
            });
            for (addr, branch) in sent {
                let proto = zones
                    .iter()
                    .find(|z| z.2.contains(&addr))
                    .map_or(Proto::Udp, |z| z.1);
                self.transports.send(
                    &Target {
                        proto,
                        addr,
                        conn: None,
                        local: None,
                    },
                    self.keepalive_probe(proto, addr, &branch),
                );
            }
            let alarms = self.node.alarms();
            let mut now_down = std::collections::HashSet::new();
            for (name, _, addrs) in &zones {
                let subject = format!("zone {name}");
                if !addrs.is_empty() && addrs.iter().all(|a| !self.proxy.zones.is_up(a)) {
                    let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
                    if alarms.raise(
                        30020,
                        &subject,
                        &format!("zone {name}: no answer from {}", list.join(", ")),
                    ) {
                        warn!(target: LOG, zone = %name, "Neighbour zone unreachable");
                    }
                    now_down.insert(subject);
                }
            }
            for gone in alarmed.difference(&now_down) {
                alarms.lower(30020, gone);
            }
            alarmed = now_down;
        }
    }

    /// An OPTIONS keep-alive to `addr`.
    fn keepalive_probe(&self, proto: Proto, addr: SocketAddr, branch: &str) -> Bytes {
        let local = self.local_address(proto);
        let tag = self.unique();
        Bytes::from(format!(
            "OPTIONS sip:{addr} SIP/2.0\r\nVia: SIP/2.0/{} {local};branch={branch}\r\n\
             Max-Forwards: 70\r\nFrom: <sip:keepalive@{local}>;tag={tag}\r\nTo: <sip:{addr}>\r\n\
             Call-ID: {branch}@{}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
            proto.name(),
            local.ip()
        ))
    }

    /// How to reach one binding from this peer.
    fn binding_hop(&self, b: &crate::location::Binding, flow: Option<u64>) -> Option<Hop> {
        let contact = SipUri::parse(&b.uri).ok()?;
        let mut routes = b.path.clone();
        let path_target = routes
            .first()
            .and_then(|p| NameAddr::parse(p).ok())
            .and_then(|p| uri_target(&p.uri));
        if let Some(target) = path_target {
            // RFC 3327: the registered Path is the way in.
            return Some(Hop {
                uri: Some(b.uri.clone()),
                target,
                routes: std::mem::take(&mut routes),
                flow: None,
                next: vec![],
                credentials: None,
            });
        }
        if b.owner == self.self_index {
            if let Some(conn) = b.conn.filter(|c| self.transports.connection_alive(*c)) {
                return Some(Hop {
                    uri: Some(b.uri.clone()),
                    target: Target {
                        proto: b.proto,
                        addr: b.received,
                        conn: Some(conn),
                        local: None,
                    },
                    routes: vec![],
                    flow: Some(conn),
                    next: vec![],
                    credentials: None,
                });
            }
        } else if let (Some(conn), None) = (b.conn, flow) {
            // The endpoint's connection is on its owner: through the owner, if it is up.
            if let Some((ip, true)) = self.peer_address(b.owner) {
                let port = self.transports.port(Proto::Tcp);
                return Some(Hop {
                    uri: Some(b.uri.clone()),
                    target: Target {
                        proto: Proto::Tcp,
                        addr: SocketAddr::new(ip, port),
                        conn: None,
                        local: None,
                    },
                    routes: vec![format!(
                        "<sip:{ip}:{port};transport=tcp;lr;{FLOW_PARAM}={conn}>"
                    )],
                    flow: None,
                    next: vec![],
                    credentials: None,
                });
            }
        }
        let target = if b.proto == Proto::Udp && b.instance.is_some() && b.reg_id.is_some() {
            // An RFC 5626 flow over UDP: back to where the endpoint sends from (its NAT).
            Target {
                proto: Proto::Udp,
                addr: b.received,
                conn: None,
                local: None,
            }
        } else {
            // The contact itself: a UDP endpoint, or one whose connection went with its peer.
            uri_target(&contact)?
        };
        Some(Hop {
            uri: Some(b.uri.clone()),
            target,
            routes: vec![],
            flow: None,
            next: vec![],
            credentials: None,
        })
    }

    /// ACK for a 2xx and other requests outside a transaction: next Route or Request-URI.
    fn forward_stateless(&self, msg: &Message, source: &Source) {
        let routes = msg.values(HeaderKind::Route);
        let ours = self.our_routes(&routes);
        let (popped, flow) = (ours.popped, ours.flow);
        if popped == 0 {
            debug!(target: LOG, "ACK not routed through this cluster dropped");
            return;
        }
        let target = if popped < routes.len() {
            None
        } else {
            self.flow_target(flow, source)
        }
        .or_else(|| next_hop(&routes, popped, msg.uri()));
        let Some(mut target) = target else {
            debug!(target: LOG, "ACK with nowhere to go dropped");
            return;
        };
        target.local = Some(source.local);
        if self.is_me_target(&target) {
            return;
        }
        let branch = format!("{COOKIE}cw{}", self.unique());
        let bytes = build::rewrite(
            msg,
            &Edit {
                prepend: vec![self.via_line(target.proto, source.local, &branch)],
                pop_routes: popped,
                max_forwards: Some(
                    msg.max_forwards()
                        .ok()
                        .flatten()
                        .unwrap_or(70)
                        .saturating_sub(1),
                ),
                ..Edit::default()
            },
        );
        // The ACK of a 2xx carries its INVITE's number: shifted like the INVITE was.
        let bytes = match ours.shift_for(msg) {
            0 => bytes,
            shift => match uac_auth::shift_cseq(&bytes, i64::from(shift)) {
                Some(b) => b,
                None => return,
            },
        };
        self.transports.send(&target, bytes);
    }

    /// How many of the first Routes name this peer, the flow token among them (the
    /// connection a request continues on), and the dialog's CSeq shift.
    fn our_routes(&self, routes: &[String]) -> OurRoutes {
        let mut ours = OurRoutes::default();
        for r in routes {
            match NameAddr::parse(r) {
                Ok(na) if self.is_me(&na.uri) => {
                    ours.popped += 1;
                    if let Some(Some(f)) = na.uri.param(FLOW_PARAM) {
                        ours.flow = f.parse::<u64>().ok();
                    }
                    if let Some(Some(v)) = na.uri.param(uac_auth::CSEQ_PARAM) {
                        ours.shift = uac_auth::parse_shift(v);
                    }
                }
                _ => break,
            }
        }
        ours
    }

    fn is_me_target(&self, t: &Target) -> bool {
        self.is_own_address(t.addr.ip()) && t.addr.port() == self.transports.port(t.proto)
    }

    fn cancel(&self, msg: &Message, source: &Source, key: &str) {
        let invite_key = key.replace("|CANCEL", "|INVITE");
        let mut st = self.proxy_lock();
        let Some(tx) = st.servers.get_mut(&invite_key) else {
            drop(st);
            self.respond(msg, source, 481, "Call/Transaction Does Not Exist", &[]);
            return;
        };
        let ok = build::response(msg, 200, "OK", None, &[]);
        self.reply(source, ok, 200);
        if tx.final_status.is_some() {
            return;
        }
        tx.cancelled = true;
        let branches = tx.branches.clone();
        for b in branches {
            if let Some(c) = st.clients.get(&b) {
                if c.state != BranchState::Done {
                    if let Some(cancel) = make_cancel_or_ack(&c.sent, "CANCEL", None) {
                        self.transports.send(&c.target, cancel);
                    }
                }
            }
        }
    }

    pub(crate) fn handle_response(self: &Arc<Self>, incoming: Incoming) {
        let Incoming { msg, source } = incoming;
        let Some(status) = msg.status() else { return };
        let vias = msg.values(HeaderKind::Via);
        let Some(Ok(top)) = vias.first().map(|v| Via::parse(v)) else {
            return;
        };
        let Some(branch) = top.branch().map(str::to_string) else {
            return;
        };
        if branch.starts_with(crate::zones::KEEPALIVE_BRANCH) {
            if status >= 200 {
                self.proxy.zones.answered(&branch, status);
            }
            return;
        }
        // A client transaction is the branch and the CSeq method (§17.1.3): the answers to
        // our own CANCELs, which share the INVITE's branch, end here.
        if msg.cseq().is_ok_and(|(_, m)| m == "CANCEL") {
            return;
        }
        let mut st = self.proxy_lock();
        // Only an answer to a transaction of ours goes anywhere, and then to the request's
        // own source: a stray response is dropped, so nobody can bounce datagrams off this
        // peer to whatever a second Via names. A 2xx retransmitted after its INVITE ended
        // still finds the transaction, which lingers for 32 s (RFC 6026).
        let Some(client) = st.clients.get_mut(&branch) else {
            drop(st);
            debug!(target: LOG, src = %source.remote, branch = %branch,
                "Stray SIP response dropped");
            return;
        };
        let invite = client.invite;
        let target = client.target;
        let server_key = client.server.clone();
        let was = client.state;
        let shift = client.cseq_shift;
        if status < 200 {
            client.state = BranchState::Proceeding;
        } else {
            client.state = BranchState::Done;
            if invite && status >= 300 && was != BranchState::Done {
                // Our client transaction ACKs a non-2xx itself (§17.1.1.3).
                if let Some(ack) = make_cancel_or_ack(&client.sent, "ACK", Some(&msg)) {
                    self.transports.send(&target, ack);
                }
            }
        }
        if status == 100 {
            return;
        }
        if matches!(status, 401 | 407) && self.answer_challenge(&mut st, &branch, &msg) {
            return;
        }
        if status == 503 && self.try_next_address(&mut st, &branch) {
            return;
        }
        // Upstream, the answer carries the caller's own CSeq.
        let msg = match shift {
            0 => msg,
            shift => match uac_auth::shift_cseq(msg.raw(), -i64::from(shift)).and_then(|b| {
                Message::parse(b, causeway_sip::Transport::Stream, &Default::default()).ok()
            }) {
                Some(m) => m,
                None => return,
            },
        };
        let Some(tx) = st.servers.get_mut(&server_key) else {
            return;
        };
        let forward = |svc: &SipService, tx: &mut ServerTx, m: &Message| -> Bytes {
            let bytes = build::rewrite(
                m,
                &Edit {
                    pop_via: true,
                    ..Edit::default()
                },
            );
            svc.metrics.response(m.status().unwrap_or(500));
            svc.transports
                .send(&source_target(&tx.source), bytes.clone());
            bytes
        };
        if status < 200 {
            if tx.final_status.is_none() {
                let sent = forward(self, tx, &msg);
                tx.last_response = Some(sent);
            }
            return;
        }
        if status < 300 {
            // Every 2xx goes upstream, even after the first (§16.7 step 5).
            let sent = forward(self, tx, &msg);
            if tx.final_status.is_none() {
                tx.final_status = Some(status);
                tx.finished_at = Some(Instant::now());
                tx.last_response = Some(sent);
                tx.request = None;
                self.cancel_other_branches(&mut st, &server_key, &branch);
            }
            return;
        }
        if tx.final_status.is_some() {
            return;
        }
        let better = match &tx.best {
            None => true,
            Some(best) => rank(status) < rank(best.status().unwrap_or(500)),
        };
        if better {
            tx.best = Some(msg);
        }
        if status >= 600 {
            self.cancel_other_branches(&mut st, &server_key, &branch);
        }
        self.finish_if_done(&mut st, &server_key);
    }

    /// CANCELs the INVITE branches of a transaction still ringing, but `except`.
    fn cancel_other_branches(&self, st: &mut ProxyState, server_key: &str, except: &str) {
        let Some(tx) = st.servers.get(server_key) else {
            return;
        };
        for b in tx.branches.iter().filter(|b| *b != except) {
            if let Some(c) = st.clients.get(b) {
                if c.invite && c.state != BranchState::Done {
                    if let Some(cancel) = make_cancel_or_ack(&c.sent, "CANCEL", None) {
                        self.transports.send(&c.target, cancel);
                    }
                }
            }
        }
    }

    /// When every branch has a final answer, the best one goes upstream.
    fn finish_if_done(self: &Arc<Self>, st: &mut ProxyState, server_key: &str) {
        let Some(tx) = st.servers.get(server_key) else {
            return;
        };
        if tx.final_status.is_some()
            || tx.branches.iter().any(|b| {
                st.clients
                    .get(b)
                    .is_some_and(|c| c.state != BranchState::Done)
            })
        {
            return;
        }
        let Some(tx) = st.servers.get_mut(server_key) else {
            return;
        };
        let (status, bytes) = match (&tx.best, &tx.request) {
            (Some(best), _) => {
                let mut status = best.status().unwrap_or(500);
                let bytes = if status == 503 {
                    // A 503 from downstream is not ours to pass on (§16.7 step 6).
                    status = 500;
                    tx.request.as_ref().map(|r| {
                        build::response(
                            r,
                            500,
                            "Server Internal Error (no branch succeeded)",
                            Some(&self.unique()),
                            &[],
                        )
                    })
                } else {
                    Some(build::rewrite(
                        best,
                        &Edit {
                            pop_via: true,
                            ..Edit::default()
                        },
                    ))
                };
                (status, bytes)
            }
            (None, Some(req)) => {
                let (status, reason) = if tx.cancelled {
                    (487, "Request Terminated")
                } else if tx.unreachable {
                    (480, "Temporarily Unavailable (contact unreachable)")
                } else {
                    (408, "Request Timeout")
                };
                (
                    status,
                    Some(build::response(
                        req,
                        status,
                        reason,
                        Some(&self.unique()),
                        &[],
                    )),
                )
            }
            (None, None) => return,
        };
        let Some(bytes) = bytes else { return };
        self.metrics.response(status);
        self.transports
            .send(&source_target(&tx.source), bytes.clone());
        tx.final_status = Some(status);
        tx.finished_at = Some(Instant::now());
        tx.last_response = Some(bytes);
        tx.request = None;
        if let Some(call) = tx.call.take() {
            let svc = self.clone();
            self.tasks
                .spawn(async move { svc.admission.release_id(&call, "the INVITE failed").await });
        }
    }

    /// A neighbour zone challenged `branch` (401/407), and the zone has credentials not yet
    /// sent to this address: the request goes again on a new branch of the same
    /// transaction, one CSeq higher, with them (`uac_auth.rs`). False: the challenge is an
    /// answer like any other.
    fn answer_challenge(
        self: &Arc<Self>,
        st: &mut ProxyState,
        branch: &str,
        challenge: &Message,
    ) -> bool {
        let Some(c) = st.clients.get(branch) else {
            return false;
        };
        let Some(creds) = c.credentials.clone() else {
            return false;
        };
        if c.answered {
            warn!(target: LOG, dst = %c.target.addr, user = %creds.user,
                "A neighbour zone refused this cluster's credentials");
            return false;
        }
        if st
            .servers
            .get(&c.server)
            .is_none_or(|tx| tx.final_status.is_some() || tx.cancelled)
        {
            return false;
        }
        let (ask, answer) = match challenge.status() {
            Some(407) => ("Proxy-Authenticate", "Proxy-Authorization"),
            _ => ("WWW-Authenticate", "Authorization"),
        };
        let challenges: Vec<String> = challenge
            .headers()
            .iter()
            .filter(|h| {
                challenge
                    .header_name(h)
                    .eq_ignore_ascii_case(ask.as_bytes())
            })
            .map(|h| String::from_utf8_lossy(challenge.header_value(h)).into_owned())
            .collect();
        let (Some(method), Some(uri), Some(local)) =
            (c.sent.method(), c.sent.uri(), c.target.local)
        else {
            return false;
        };
        let value = match uac_auth::authorization(&challenges, method, uri, &creds, &self.unique())
        {
            Ok(v) => v,
            Err(reason) => {
                warn!(target: LOG, dst = %c.target.addr, reason = %reason,
                    "A neighbour zone's challenge cannot be answered");
                return false;
            }
        };
        let new_branch = format!("{COOKIE}cw{}", self.unique());
        // Credentials for another address of the zone (a failover) are not this one's.
        let without_old = uac_auth::drop_headers(c.sent.raw(), answer);
        let Ok(unanswered) = Message::parse(
            without_old,
            causeway_sip::Transport::Stream,
            &Default::default(),
        ) else {
            return false;
        };
        let bytes = build::rewrite(
            &unanswered,
            &Edit {
                pop_via: true,
                prepend: vec![
                    self.via_line(c.target.proto, local, &new_branch),
                    format!("{answer}: {value}"),
                ],
                ..Edit::default()
            },
        );
        let shift = c.cseq_shift + 1;
        let Some(mut bytes) = uac_auth::shift_cseq(&bytes, 1) else {
            return false;
        };
        // The dialog keeps the shift in this peer's Record-Route: the caller's later
        // requests in it go up by as much.
        let caller = c
            .sent
            .value(HeaderKind::From)
            .and_then(|f| NameAddr::parse(&f).ok())
            .and_then(|f| f.tag().map(uac_auth::tag_hash));
        if let Some(caller) = caller {
            let marked = uac_auth::edit_headers(&bytes, "Record-Route", |v| {
                let ours = NameAddr::parse(v).is_ok_and(|na| self.is_me(&na.uri));
                match ours.then(|| uac_auth::with_shift_param(v, shift, &caller)) {
                    Some(Some(marked)) => uac_auth::LineEdit::Replace(marked),
                    _ => uac_auth::LineEdit::Keep,
                }
            });
            if let Some(m) = marked {
                bytes = m;
            }
        }
        let Ok(sent) = Message::parse(
            bytes.clone(),
            causeway_sip::Transport::Stream,
            &Default::default(),
        ) else {
            return false;
        };
        let (server, target, invite) = (c.server.clone(), c.target, c.invite);
        let next = st
            .clients
            .get_mut(branch)
            .map(|c| std::mem::take(&mut c.next))
            .unwrap_or_default();
        info!(target: LOG, event = "Neighbour challenge answered", dst = %target.addr,
            user = %creds.user, cseq_shift = shift, "");
        let client = ClientTx {
            server,
            target,
            sent,
            state: BranchState::Trying,
            invite,
            started: Instant::now(),
            next,
            credentials: Some(creds),
            answered: true,
            cseq_shift: shift,
        };
        self.add_branch(st, new_branch, client, bytes);
        true
    }

    /// Sends `bytes` as a new branch of `client.server`'s transaction, and keeps it there.
    fn add_branch(
        self: &Arc<Self>,
        st: &mut ProxyState,
        branch: String,
        client: ClientTx,
        bytes: Bytes,
    ) {
        let on_fail = {
            let svc = self.clone();
            let b = branch.clone();
            move || svc.branch_failed(&b)
        };
        self.transports.send_or(&client.target, bytes, on_fail);
        if let Some(tx) = st.servers.get_mut(&client.server) {
            tx.branches.push(branch.clone());
        }
        st.clients.insert(branch.clone(), client);
        self.tasks.spawn(self.clone().branch_timer(branch));
    }

    /// The failed `branch` had further addresses of its zone: the request goes to the next
    /// one on a new branch of the same transaction. False when there is none (or the
    /// transaction has its answer already).
    fn try_next_address(self: &Arc<Self>, st: &mut ProxyState, branch: &str) -> bool {
        let Some(c) = st.clients.get_mut(branch) else {
            return false;
        };
        if c.next.is_empty() {
            return false;
        }
        let target = c.next.remove(0);
        let rest = std::mem::take(&mut c.next);
        let (server, sent, invite, from) = (c.server.clone(), c.sent.clone(), c.invite, c.target);
        let (credentials, cseq_shift) = (c.credentials.clone(), c.cseq_shift);
        if st
            .servers
            .get(&server)
            .is_none_or(|tx| tx.final_status.is_some() || tx.cancelled)
        {
            return false;
        }
        let new_branch = format!("{COOKIE}cw{}", self.unique());
        let Some(local) = from.local else {
            return false;
        };
        let bytes = build::rewrite(
            &sent,
            &Edit {
                pop_via: true,
                prepend: vec![self.via_line(target.proto, local, &new_branch)],
                ..Edit::default()
            },
        );
        let Ok(resent) = Message::parse(
            bytes.clone(),
            causeway_sip::Transport::Stream,
            &Default::default(),
        ) else {
            return false;
        };
        debug!(target: LOG, from = %from.addr, to = %target.addr,
            "Zone address failed: trying the next one");
        let target = Target {
            local: from.local,
            ..target
        };
        let client = ClientTx {
            server,
            target,
            sent: resent,
            state: BranchState::Trying,
            invite,
            started: Instant::now(),
            next: rest,
            // Another server: its own challenge is answered again.
            credentials,
            answered: false,
            cseq_shift,
        };
        self.add_branch(st, new_branch, client, bytes);
        true
    }

    /// A branch's connection could not be opened: it is over (RFC 3261 §8.1.3.1).
    fn branch_failed(self: &Arc<Self>, branch: &str) {
        let mut st = self.proxy_lock();
        let Some(c) = st.clients.get_mut(branch) else {
            return;
        };
        if c.state == BranchState::Done {
            return;
        }
        c.state = BranchState::Done;
        let server = c.server.clone();
        if self.try_next_address(&mut st, branch) {
            return;
        }
        if let Some(tx) = st.servers.get_mut(&server) {
            tx.unreachable = true;
        }
        self.finish_if_done(&mut st, &server);
    }

    /// Retransmits a branch on UDP and gives it a 408 when it times out (Timers A/B/E/F/C).
    async fn branch_timer(self: Arc<Self>, branch: String) {
        let mut interval = T1;
        loop {
            tokio::time::sleep(interval).await;
            let mut st = self.proxy_lock();
            let Some(c) = st.clients.get(&branch) else {
                return;
            };
            let elapsed = c.started.elapsed();
            let limit = if c.state == BranchState::Proceeding && c.invite {
                TIMER_C
            } else {
                T1 * 64
            };
            let silent = c.state == BranchState::Trying;
            match c.state {
                BranchState::Done => return,
                _ if silent && !c.next.is_empty() && elapsed >= FAILOVER_AFTER => {
                    if let Some(c) = st.clients.get_mut(&branch) {
                        c.state = BranchState::Done;
                    }
                    self.try_next_address(&mut st, &branch);
                    return;
                }
                _ if elapsed >= limit => {
                    if c.invite && c.state == BranchState::Proceeding {
                        if let Some(cancel) = make_cancel_or_ack(&c.sent, "CANCEL", None) {
                            self.transports.send(&c.target, cancel);
                        }
                    }
                    let server = c.server.clone();
                    if let Some(c) = st.clients.get_mut(&branch) {
                        c.state = BranchState::Done;
                    }
                    if silent && self.try_next_address(&mut st, &branch) {
                        return;
                    }
                    self.finish_if_done(&mut st, &server);
                    return;
                }
                state => {
                    let udp = c.target.proto == Proto::Udp;
                    let resend = udp && (state == BranchState::Trying || !c.invite);
                    if resend {
                        self.transports.send(&c.target, c.sent.raw().clone());
                    }
                    interval = if !udp || (c.invite && state == BranchState::Proceeding) {
                        Duration::from_secs(1)
                            .max(limit.saturating_sub(elapsed).min(Duration::from_secs(5)))
                    } else if c.invite {
                        interval * 2
                    } else {
                        (interval * 2).min(T2)
                    };
                    // Timer B/F run from the start, not from the last retransmission: wake
                    // at the deadline if it comes first (after 0.5+1+…+16 s, the next
                    // doubled wait would end at 63.5 s, not 32 s).
                    interval =
                        interval.min(limit.saturating_sub(elapsed).max(Duration::from_millis(1)));
                    if silent && !c.next.is_empty() {
                        // And at the moment to move on to the zone's next address.
                        interval = interval.min(
                            FAILOVER_AFTER
                                .saturating_sub(elapsed)
                                .max(Duration::from_millis(1)),
                        );
                    }
                }
            }
        }
    }

    /// Forgets transactions that finished a while ago (or never finished).
    pub(crate) fn sweep_transactions(&self) {
        let mut st = self.proxy_lock();
        let now = Instant::now();
        let mut gone = Vec::new();
        st.servers.retain(|_, tx| {
            let keep = match tx.finished_at {
                Some(at) => now.duration_since(at) < LINGER,
                None => now.duration_since(tx.created) < TIMER_C + LINGER,
            };
            if !keep {
                gone.append(&mut tx.branches);
            }
            keep
        });
        for b in gone {
            st.clients.remove(&b);
        }
    }

    pub fn transaction_count(&self) -> (usize, usize) {
        let st = self.proxy_lock();
        (st.servers.len(), st.clients.len())
    }
}

fn source_target(s: &Source) -> Target {
    Target {
        proto: s.proto,
        addr: s.remote,
        conn: s.conn,
        local: Some(s.local),
    }
}

/// Lower is better: 6xx, then 2xx… as §16.7 step 6 prefers, with 401/407/415/420/484 and
/// 3xx ahead of 408 and 5xx.
fn rank(status: u16) -> u16 {
    match status {
        600..=699 => 0,
        200..=299 => 1,
        401 | 407 | 415 | 420 | 484 => 2,
        300..=399 => 3,
        408 => 7,
        400..=499 => 4,
        500..=599 => 6,
        _ => 8,
    }
}

/// A CANCEL (or the ACK of a non-2xx) for a request we sent: same Request-URI, our Via
/// only, Route, From, Call-ID, CSeq number; To from the response for an ACK (§9.1, §17.1.1.3).
fn make_cancel_or_ack(sent: &Message, method: &str, response: Option<&Message>) -> Option<Bytes> {
    let uri = sent.uri()?;
    let (cseq, _) = sent.cseq().ok()?;
    let via = causeway_sip::split_list(&sent.value(HeaderKind::Via)?)
        .into_iter()
        .next()?;
    let mut out = format!("{method} {uri} SIP/2.0\r\nVia: {via}\r\nMax-Forwards: 70\r\n");
    for r in sent.values(HeaderKind::Route) {
        out.push_str(&format!("Route: {r}\r\n"));
    }
    out.push_str(&format!("From: {}\r\n", sent.value(HeaderKind::From)?));
    let to = match response {
        Some(r) => r.value(HeaderKind::To)?,
        None => sent.value(HeaderKind::To)?,
    };
    out.push_str(&format!(
        "To: {to}\r\nCall-ID: {}\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n",
        sent.call_id()?
    ));
    Some(Bytes::from(out))
}
