//! The pages themselves: each asks the API what the CLI asks, and lays it out.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Form;
use causeway_cluster::{ClusterStatus, ConfigItem, PeerAlarm, SetOutcome};
use causeway_common::time::utc_time;
use causeway_mesh::{CertStatus, Clustering, PeerStatus};
use maud::{html, Markup, DOCTYPE};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{csrf_refusal, Authed, ListParams, Shared};

/// Rows on one page of the registrations and calls lists.
const PAGE_ROWS: usize = 50;
/// Peer entries on the Clustering page (the seed shows six).
const PEER_FIELDS: usize = 6;
/// How often the live parts refresh.
const LIVE_EVERY: &str = "every 2s";

/// A time the browser shows in the operator's zone (assets/app.js); UTC without script.
fn when(ms: u64) -> Markup {
    html! { time data-ms=(ms) { (utc_time(ms)) " UTC" } }
}

fn when_opt(ms: Option<u64>) -> Markup {
    match ms {
        Some(ms) => when(ms),
        None => html! { "-" },
    }
}

/// A green or red mark with its words, for a state.
fn state(ok: bool, text: &str) -> Markup {
    html! { span class=(if ok { "ok" } else { "bad" }) { (if ok { "● " } else { "✕ " }) (text) } }
}

pub(super) fn login_form(token: &str, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head { (head("Log in")) }
            body class="login" {
                main {
                    h1 { "Causeway" }
                    @if let Some(e) = error { p class="error" role="alert" { (e) } }
                    form method="post" action="/login" {
                        input type="hidden" name="login_token" value=(token);
                        label { "User name" input name="user" autocomplete="username" required autofocus; }
                        label { "Password" input name="password" type="password" autocomplete="current-password" required; }
                        button type="submit" data-busy="Logging in…" { "Log in" }
                    }
                    p class="hint" { "Accounts are made on the node: " code { "causeway --node <data dir> admin passwd <user>" } }
                }
            }
        }
    }
}

fn head(title: &str) -> Markup {
    html! {
        meta charset="utf-8";
        meta name="viewport" content="width=device-width, initial-scale=1";
        title { (title) " · Causeway" }
        link rel="stylesheet" href="/assets/style.css";
        script src="/assets/htmx.min.js" defer {}
        script src="/assets/app.js" defer {}
    }
}

/// The frame of every page: the menu, who is logged in, and the page's body.
fn layout(web: &Shared, who: &Authed, title: &str, body: Markup) -> Markup {
    let menu: Vec<(String, String)> = [
        ("Overview", "/ui/overview"),
        ("Clustering", "/ui/clustering"),
        ("Alarms", "/ui/alarms"),
        ("Registrations", "/ui/registrations"),
        ("Calls", "/ui/calls"),
        ("Zones", "/ui/zones"),
        ("Configuration", "/ui/configuration"),
    ]
    .iter()
    .map(|(t, h)| (t.to_string(), h.to_string()))
    .chain(
        web.pages()
            .iter()
            .map(|p| (p.title.to_string(), format!("/ui/service/{}", p.slug))),
    )
    .collect();
    let headers = json!({ "X-CSRF-Token": who.csrf }).to_string();
    html! {
        (DOCTYPE)
        html lang="en" {
            head { (head(title)) }
            body hx-headers=(headers) {
                header {
                    nav {
                        strong { "Causeway" }
                        @for (t, h) in &menu {
                            a href=(h) class=(if t == title { "here" } else { "" }) { (t) }
                        }
                    }
                    form method="post" action="/logout" class="logout" {
                        input type="hidden" name="csrf" value=(who.csrf);
                        span { (who.user) }
                        button type="submit" data-busy="Logging out…" { "Log out" }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

fn problem(why: &str) -> Markup {
    html! { p class="error" role="alert" { (why) } }
}

async fn cluster_status(web: &Shared) -> Result<ClusterStatus, String> {
    let v = web.api(Method::GET, "/api/v1/status/cluster", None).await?;
    serde_json::from_value(v).map_err(|e| format!("the cluster status did not parse: {e}"))
}

fn peer_ok(p: &PeerStatus) -> bool {
    matches!(p.clustering, Clustering::Active | Clustering::ThisSystem)
}

// ---- Overview -------------------------------------------------------------------------

/// A page whose body htmx fetches again from `live` every [`LIVE_EVERY`].
fn live_page(web: &Shared, who: &Authed, title: &str, live: &str, body: Markup) -> Markup {
    layout(
        web,
        who,
        title,
        html! { div hx-get=(live) hx-trigger=(LIVE_EVERY) hx-swap="innerHTML" id="live" { (body) } },
    )
}

pub(super) async fn overview(State(web): State<Shared>, who: Authed) -> Markup {
    let body = overview_body(&web).await;
    live_page(&web, &who, "Overview", "/ui/overview/live", body)
}

pub(super) async fn overview_live(State(web): State<Shared>, _who: Authed) -> Markup {
    overview_body(&web).await
}

async fn overview_body(web: &Shared) -> Markup {
    let cluster = cluster_status(web).await;
    let alarms = web.api(Method::GET, "/api/v1/status/alarms", None).await;
    let regs = web
        .api(Method::GET, "/api/v1/status/registrations?limit=0", None)
        .await;
    let calls = web
        .api(Method::GET, "/api/v1/status/calls?limit=0", None)
        .await;
    html! {
        section {
            h2 { "Alarms" }
            @match &alarms {
                Ok(a) => (alarm_table(a, false)),
                Err(e) => (problem(e)),
            }
        }
        section {
            h2 { "Peers" }
            @match &cluster {
                Ok(c) => {
                    @if let Some(b) = &c.banner { (problem(b)) }
                    @if let Some(p) = &c.problem { (problem(&format!("Invalid clustering configuration: {p}"))) }
                    table class="peers" {
                        thead { tr { th { "Peer" } th { "Address" } th { "System" } th { "Clustering" } th { "Round trip" } th { "Last contact" } } }
                        tbody {
                            @for p in &c.peers {
                                tr id=(format!("peer-{}", p.index)) class=(if peer_ok(p) { "up" } else { "down" }) {
                                    td { "Peer " (p.index) }
                                    td { (p.address) }
                                    td { (p.system_name.as_deref().unwrap_or("-")) }
                                    td { (state(peer_ok(p), &p.clustering_text())) }
                                    td { (p.rtt_ms.map(|r| format!("{r:.1} ms")).unwrap_or_else(|| "-".into())) }
                                    td { (when_opt(p.last_contact_ms)) }
                                }
                            }
                        }
                    }
                }
                Err(e) => (problem(e)),
            }
        }
        section class="figures" {
            div {
                h2 { "Registrations now" }
                @match &regs {
                    Ok(r) => p class="figure" { (r["bindings"].as_u64().unwrap_or(0)) " bindings, " (r["aors"].as_u64().unwrap_or(0)) " AORs" },
                    Err(e) => (problem(e)),
                }
            }
            div {
                h2 { "Calls now" }
                @match &calls {
                    Ok(c) => p class="figure" { (c["calls"].as_u64().unwrap_or(0)) " calls, " (c["kbps"].as_u64().unwrap_or(0)) " kbps" },
                    Err(e) => (problem(e)),
                }
            }
            div {
                h2 { "Replication" }
                @match cluster.as_ref().ok().and_then(|c| c.replication.as_ref()) {
                    Some(r) => {
                        p class="figure" { (state(r.database_status == "Active", &r.database_status)) }
                        p { "Revision " (r.revision) ", last synchronisation " (when_opt(r.last_synchronisation_unix_ms)) }
                    }
                    None => p { "Not clustered" },
                }
            }
        }
    }
}

/// The alarms raised on this peer and those the other peers report: one table.
fn alarm_table(v: &Value, details: bool) -> Markup {
    let system = v["system_name"].as_str().unwrap_or("this peer");
    let active = v["active"].as_array().cloned().unwrap_or_default();
    let peers: Vec<PeerAlarm> = serde_json::from_value(v["peers"].clone()).unwrap_or_default();
    let total = active.len() + peers.len();
    html! {
        p class="count" { (total) " raised" }
        @if total > 0 {
            table class="alarms" {
                thead { tr { th { "ID" } th { "Severity" } th { "Peer" } th { "Title" } th { "Subject" } th { "Raised" } @if details { th { "Reason" } th { "Action" } } } }
                tbody {
                    @for a in &active {
                        tr class="alarm" data-id=(a["id"]) {
                            td { (a["id"]) }
                            td { (a["severity"].as_str().unwrap_or("")) }
                            td { (system) }
                            td { (a["title"].as_str().unwrap_or("")) }
                            td { (a["subject"].as_str().unwrap_or("")) }
                            td { (when(a["raised_at_ms"].as_u64().unwrap_or(0))) }
                            @if details {
                                td { (a["reason"].as_str().unwrap_or("")) }
                                td { (a["action"].as_str().unwrap_or("")) }
                            }
                        }
                    }
                    @for a in &peers {
                        tr class="alarm" data-id=(a.id) {
                            td { (a.id) }
                            td { (a.severity) }
                            td { "Peer " (a.peer) @if !a.reachable { " (unreachable: as last reported)" } }
                            td { (a.title) }
                            td { (a.subject) }
                            td { (when(a.raised_at_ms)) }
                            @if details { td { (a.reason) } td { "-" } }
                        }
                    }
                }
            }
        }
    }
}

// ---- Alarms ---------------------------------------------------------------------------

pub(super) async fn alarms(State(web): State<Shared>, who: Authed) -> Markup {
    let body = alarms_body(&web).await;
    live_page(&web, &who, "Alarms", "/ui/alarms/live", body)
}

pub(super) async fn alarms_live(State(web): State<Shared>, _who: Authed) -> Markup {
    alarms_body(&web).await
}

async fn alarms_body(web: &Shared) -> Markup {
    match web.api(Method::GET, "/api/v1/status/alarms", None).await {
        Ok(v) => {
            let events = v["events"].as_array().cloned().unwrap_or_default();
            html! {
                h2 { "Raised, cluster-wide" }
                (alarm_table(&v, true))
                h2 { "History on this peer" }
                table class="events" {
                    thead { tr { th { "Time" } th { "Event" } th { "ID" } th { "Severity" } th { "Subject" } th { "Reason" } } }
                    tbody {
                        @for e in events.iter().rev().take(200) {
                            tr {
                                td { (when(e["at_ms"].as_u64().unwrap_or(0))) }
                                td { (e["event"].as_str().unwrap_or("")) }
                                td { (e["id"]) }
                                td { (e["severity"].as_str().unwrap_or("")) }
                                td { (e["subject"].as_str().unwrap_or("")) }
                                td { (e["reason"].as_str().unwrap_or("")) }
                            }
                        }
                    }
                }
            }
        }
        Err(e) => problem(&e),
    }
}

// ---- Clustering -----------------------------------------------------------------------

pub(super) async fn clustering(State(web): State<Shared>, who: Authed) -> Markup {
    let body = clustering_body(&web, &who, &[]).await;
    layout(&web, &who, "Clustering", body)
}

/// What a save did, item by item.
enum Saved {
    Done(String),
    Refused(String),
}

async fn items(web: &Shared) -> Result<Vec<ConfigItem>, String> {
    let v = web.api(Method::GET, "/api/v1/configuration", None).await?;
    serde_json::from_value(v["items"].clone())
        .map_err(|e| format!("the configuration did not parse: {e}"))
}

fn value_of<'a>(items: &'a [ConfigItem], path: &str) -> &'a str {
    items
        .iter()
        .find(|i| i.path == path)
        .map(|i| i.pending.as_deref().unwrap_or(&i.value))
        .unwrap_or("")
}

async fn clustering_body(web: &Shared, who: &Authed, saved: &[Saved]) -> Markup {
    let status = match cluster_status(web).await {
        Ok(s) => s,
        Err(e) => return problem(&e),
    };
    let items = items(web).await.unwrap_or_default();
    let peers_value = value_of(&items, "cluster.peers");
    let mut addresses: Vec<String> = peers_value
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    addresses.resize(PEER_FIELDS.max(addresses.len()), String::new());
    let mappings: Vec<&ConfigItem> = items
        .iter()
        .filter(|i| i.path.starts_with("cluster.address_mapping."))
        .collect();
    let tls = value_of(&items, "cluster.tls_verification");
    let restart_pending = items
        .iter()
        .any(|i| i.path.starts_with("cluster.") && i.pending.is_some());
    let row = |label: &str, field: Markup| html! { div class="row" { label { span { (label) } (field) } } };
    html! {
        @for s in saved {
            @match s {
                Saved::Done(m) => p class="saved" role="status" { (m) },
                Saved::Refused(m) => (problem(m)),
            }
        }
        @if let Some(b) = &status.banner { (problem(b)) }
        @if let Some(p) = &status.problem { (problem(&format!("Invalid clustering configuration: {p}"))) }
        @if restart_pending {
            p class="warning" { "A change to this peer's clustering settings is saved and takes effect after a restart of this peer (alarm 20007)." }
        }
        form method="post" action="/ui/clustering" class="seed" {
            input type="hidden" name="csrf" value=(who.csrf);
            h2 { "Configuration" }
            (row("Cluster name (FQDN for Provisioning)", html! { input name="cluster_name" value=(value_of(&items, "cluster.name")); }))
            (row("Configuration primary", html! { input name="primary" type="number" min="1" max="6" value=(value_of(&items, "cluster.configuration_primary")); }))
            (row("TLS verification mode", html! {
                select name="tls" {
                    @for m in ["Permissive", "Enforce"] { option value=(m) selected[m == tls] { (m) } }
                }
            }))
            (row("Cluster IP version", html! { output { (status.ip_version.to_string()) } }))
            h2 { "Peers" }
            @for (i, addr) in addresses.iter().enumerate() {
                @let peer = status.peers.iter().find(|p| p.index == i + 1);
                div class="row peer" id=(format!("peer-{}", i + 1)) {
                    label { span { "Peer " (i + 1) " address †" } input name="peer" value=(addr); }
                    @if let Some(p) = peer {
                        div class="peer-state" {
                            (state(p.certificate == CertStatus::Valid, &format!("Certificate: {}", p.certificate)))
                            " "
                            (state(peer_ok(p), &format!("Clustering: {}", p.clustering_text())))
                        }
                    }
                }
            }
            h2 { "Cluster address mapping" }
            @for m in &mappings {
                (row(&format!("Name {}", m.path.trim_start_matches("cluster.address_mapping.")), html! {
                    input name=(format!("map:{}", m.path.trim_start_matches("cluster.address_mapping."))) value=(m.value);
                }))
            }
            div class="row" {
                label { span { "New mapping: name" } input name="new_map_name"; }
                label { span { "maps to address" } input name="new_map_value"; }
            }
            p class="hint" { "† set on each peer separately; a change to the peer list or the name takes effect after a restart. Cluster-wide settings go to every peer through the configuration primary." }
            button type="submit" { "Save" }
        }
        @if let Some(r) = &status.replication {
            h2 { "Status" }
            dl class="seed" {
                dt { "Cluster database status" } dd { (state(r.database_status == "Active", &r.database_status)) }
                dt { "Last synchronisation" } dd { (when_opt(r.last_synchronisation_unix_ms)) }
                dt { "Next synchronisation check" } dd { (when_opt(r.next_check_unix_ms)) }
                dt { "Configuration revision" } dd { (r.revision) " (" (r.records) " items)" }
            }
        }
    }
}

pub(super) async fn save_clustering(
    State(web): State<Shared>,
    who: Authed,
    headers: HeaderMap,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let csrf = fields
        .iter()
        .find(|(k, _)| k == "csrf")
        .map(|(_, v)| v.as_str());
    if let Some(r) = csrf_refusal(&who, &headers, csrf) {
        return r;
    }
    let items = items(&web).await.unwrap_or_default();
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim().to_string())
    };
    let peers: Vec<String> = fields
        .iter()
        .filter(|(k, _)| k == "peer")
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    let mut changes: Vec<(String, Option<String>)> = Vec::new();
    let mut want = |path: &str, value: Option<String>| {
        if let Some(v) = value {
            if v != value_of(&items, path) {
                changes.push((path.to_string(), Some(v)));
            }
        }
    };
    want("cluster.name", field("cluster_name"));
    want("cluster.configuration_primary", field("primary"));
    want("cluster.tls_verification", field("tls"));
    want("cluster.peers", Some(peers.join(",")));
    for (k, v) in &fields {
        if let Some(name) = k.strip_prefix("map:") {
            let path = format!("cluster.address_mapping.{name}");
            let v = v.trim();
            if v.is_empty() {
                changes.push((path, None));
            } else if v != value_of(&items, &path) {
                changes.push((path, Some(v.to_string())));
            }
        }
    }
    if let (Some(name), Some(value)) = (field("new_map_name"), field("new_map_value")) {
        if !name.is_empty() && !value.is_empty() {
            changes.push((format!("cluster.address_mapping.{name}"), Some(value)));
        }
    }
    let mut saved = Vec::new();
    for (path, value) in changes {
        // The primary moves for the whole cluster at once, as `xcommand SetPrimary` does.
        let primary = value.as_deref().and_then(|v| v.parse::<usize>().ok());
        if let ("cluster.configuration_primary", Some(peer)) = (path.as_str(), primary) {
            saved.push(set_primary(&web, &who, peer).await);
            continue;
        }
        saved.push(apply(&web, &who, &path, value.as_deref()).await);
    }
    if saved.is_empty() {
        saved.push(Saved::Done("Nothing changed.".into()));
    }
    let body = clustering_body(&web, &who, &saved).await;
    layout(&web, &who, "Clustering", body).into_response()
}

/// `xcommand SetPrimary <peer>` through the API, logged with the account that asked.
async fn set_primary(web: &Shared, who: &Authed, peer: usize) -> Saved {
    let body = json!({ "peer": peer });
    match web
        .api(Method::POST, "/api/v1/command/setprimary", Some(&body))
        .await
    {
        Ok(_) => {
            tracing::info!(target: "management.admin", event = "Configuration primary set", user = %who.user, via = "web", peer = peer, "");
            Saved::Done(format!(
                "Peer {peer} is the configuration primary on every reachable peer"
            ))
        }
        Err(why) => Saved::Refused(format!("configuration primary: {why}")),
    }
}

/// One item set (or unset) through the API, logged with the account that asked.
async fn apply(web: &Shared, who: &Authed, path: &str, value: Option<&str>) -> Saved {
    let body = json!({ "path": path, "value": value });
    let answer = web
        .api(Method::POST, "/api/v1/configuration", Some(&body))
        .await;
    let shown = value.unwrap_or("(default)");
    match answer {
        Ok(v) => {
            tracing::info!(target: "management.admin", event = "Configuration changed", user = %who.user, src_ip = %who.ip.map(|i| i.to_string()).unwrap_or_default(), via = "web", path = path, value = shown, "");
            let outcome: Option<SetOutcome> = serde_json::from_value(v).ok();
            let mut m = format!("{path} set to {shown}");
            if let Some(o) = outcome {
                if let Some((held, of)) = o.confirmed {
                    m.push_str(&format!(" (held by {held} of {of} peers)"));
                }
                if o.restart_required {
                    m.push_str(": saved on this peer, takes effect after a restart of this peer");
                }
                if let Some(w) = o.warning {
                    m.push_str(&format!(" — warning: {w}"));
                }
            }
            Saved::Done(m)
        }
        Err(why) => {
            tracing::warn!(target: "management.admin", event = "Configuration change refused", user = %who.user, via = "web", path = path, reason = %why, "");
            Saved::Refused(format!("{path}: {why}"))
        }
    }
}

// ---- Configuration --------------------------------------------------------------------

#[derive(Deserialize, Default)]
pub(super) struct ConfigQuery {
    #[serde(default)]
    filter: String,
}

pub(super) async fn configuration(
    State(web): State<Shared>,
    who: Authed,
    axum::extract::Query(q): axum::extract::Query<ConfigQuery>,
) -> Markup {
    let body = configuration_body(&web, &who, &q.filter, None).await;
    layout(&web, &who, "Configuration", body)
}

async fn configuration_body(
    web: &Shared,
    who: &Authed,
    filter: &str,
    saved: Option<Saved>,
) -> Markup {
    let items = match items(web).await {
        Ok(i) => i,
        Err(e) => return problem(&e),
    };
    let shown: Vec<&ConfigItem> = items
        .iter()
        .filter(|i| filter.is_empty() || i.path.contains(filter))
        .collect();
    html! {
        @match &saved {
            Some(Saved::Done(m)) => p class="saved" role="status" { (m) },
            Some(Saved::Refused(m)) => (problem(m)),
            None => {},
        }
        form method="get" action="/ui/configuration" class="search" {
            label { span { "Items containing" } input name="filter" value=(filter) type="search"; }
            button type="submit" { "Show" }
        }
        p class="hint" { "† peer-specific: set on this peer only, takes effect after a restart. Other items are cluster-wide: saved through the configuration primary to every peer." }
        table class="config" {
            thead { tr { th { "Item" } th { "Value" } th { "Type" } th { "About" } } }
            tbody {
                @for i in &shown {
                    tr id=(format!("item-{}", i.path)) {
                        td { code { (i.path) } @if i.peer_specific { " †" } }
                        td {
                            form method="post" action="/ui/configuration" class="item" {
                                input type="hidden" name="csrf" value=(who.csrf);
                                input type="hidden" name="path" value=(i.path);
                                input type="hidden" name="filter" value=(filter);
                                @let current = i.pending.as_deref().unwrap_or(&i.value);
                                @if i.kind.starts_with("password") {
                                    // Never shown back: a new one is typed, or nothing changes.
                                    input name="value" type="password" autocomplete="new-password" placeholder="type a new password" required aria-label=(i.path);
                                } @else if i.choices.is_empty() {
                                    input name="value" value=(current) aria-label=(i.path);
                                } @else {
                                    select name="value" aria-label=(i.path) {
                                        @for c in &i.choices { option value=(c) selected[c == current] { (c) } }
                                    }
                                }
                                button type="submit" name="action" value="set" { "Save" }
                                @if !i.peer_specific { button type="submit" name="action" value="unset" class="quiet" { "Default" } }
                            }
                            @if let Some(p) = &i.pending { small { "pending restart: " (p) " (running: " (i.value) ")" } }
                        }
                        td { (i.kind) }
                        td { (i.about) @if i.restart_required { " (restart required)" } }
                    }
                }
            }
        }
        form method="post" action="/ui/configuration" class="item new" {
            input type="hidden" name="csrf" value=(who.csrf);
            input type="hidden" name="filter" value=(filter);
            h2 { "Add a named item" }
            label { span { "Item" } input name="path" placeholder="zones.trunk.address"; }
            label { span { "Value" } input name="value"; }
            button type="submit" name="action" value="set" { "Save" }
        }
    }
}

#[derive(Deserialize)]
pub(super) struct ConfigForm {
    #[serde(default)]
    csrf: Option<String>,
    path: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    filter: String,
}

pub(super) async fn save_configuration(
    State(web): State<Shared>,
    who: Authed,
    headers: HeaderMap,
    Form(form): Form<ConfigForm>,
) -> Response {
    if let Some(r) = csrf_refusal(&who, &headers, form.csrf.as_deref()) {
        return r;
    }
    let value = (form.action != "unset").then_some(form.value.trim());
    let saved = apply(&web, &who, form.path.trim(), value).await;
    let status = match saved {
        Saved::Done(_) => StatusCode::OK,
        Saved::Refused(_) => StatusCode::UNPROCESSABLE_ENTITY,
    };
    let body = configuration_body(&web, &who, &form.filter, Some(saved)).await;
    (status, layout(&web, &who, "Configuration", body)).into_response()
}

// ---- Registrations and calls ----------------------------------------------------------

fn pager(base: &str, q: &str, peer: &str, page: usize, total: usize) -> Markup {
    let pages = total.div_ceil(PAGE_ROWS).max(1);
    let link = |p: usize| {
        format!(
            "{base}?q={}&peer={}&page={p}",
            urlencode(q),
            urlencode(peer)
        )
    };
    html! {
        nav class="pager" {
            @if page > 0 { a href=(link(page - 1)) { "← Previous" } }
            span { "Page " (page + 1) " of " (pages) " (" (total) " rows)" }
            @if page + 1 < pages { a href=(link(page + 1)) { "Next →" } }
        }
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn search_form(base: &str, q: &str, peer: &str, what: &str) -> Markup {
    html! {
        form method="get" action=(base) class="search" {
            label { span { (what) } input name="q" value=(q) type="search"; }
            label { span { "Peer" } input name="peer" value=(peer) type="number" min="1" max="64"; }
            button type="submit" { "Search" }
        }
    }
}

fn usage(label: &str, used: u64, limit: Option<u64>) -> Markup {
    html! {
        div class="usage" {
            span { (label) ": " (used) @if let Some(l) = limit { " of " (l) } }
            @if let Some(l) = limit.filter(|l| *l > 0) {
                progress max=(l) value=(used.min(l)) {}
            }
        }
    }
}

/// A limit of the API's answer; 0 and absent both mean none.
fn limit_of(v: &Value) -> Option<u64> {
    v.as_u64().filter(|l| *l > 0)
}

/// One page of a list API (`registrations`, `calls`) for the page's query: the answer, its
/// rows, and how many match in all.
async fn list_page(
    web: &Shared,
    list: &str,
    q: &super::ListQuery,
) -> Result<(Value, Vec<Value>, usize), String> {
    let path = format!(
        "/api/v1/status/{list}?q={}&peer={}&offset={}&limit={PAGE_ROWS}",
        urlencode(&q.q),
        urlencode(&q.peer),
        q.page * PAGE_ROWS
    );
    let v = web.api(Method::GET, &path, None).await?;
    let rows = v["rows"].as_array().cloned().unwrap_or_default();
    let matched = v["matched"].as_u64().unwrap_or(rows.len() as u64) as usize;
    Ok((v, rows, matched))
}

pub(super) async fn registrations(State(web): State<Shared>, who: Authed, q: ListParams) -> Markup {
    let body = match list_page(&web, "registrations", &q).await {
        Ok((v, rows, matched)) => {
            let per_peer: BTreeMap<u64, u64> = v["per_peer"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| Some((p[0].as_u64()?, p[1].as_u64()?)))
                .collect();
            html! {
                div class="figures" {
                    (usage("Bindings in the cluster", v["bindings"].as_u64().unwrap_or(0), limit_of(&v["licences"])))
                    span { (v["aors"].as_u64().unwrap_or(0)) " AORs" }
                    @for (peer, n) in &per_peer { span { "Peer " (peer) ": " (n) } }
                }
                (search_form("/ui/registrations", &q.q, &q.peer, "AOR containing"))
                table class="list" {
                    thead { tr { th { "AOR" } th { "Contact" } th { "Peer" } th { "Transport" } th { "From" } th { "Expires in" } } }
                    tbody {
                        @for r in &rows {
                            tr {
                                td { (r["aor"].as_str().unwrap_or("")) }
                                td { (r["contact"].as_str().unwrap_or("")) }
                                td { "Peer " (r["peer"]) }
                                td { (r["transport"].as_str().unwrap_or("")) }
                                td { (r["received"].as_str().unwrap_or("")) }
                                td { (r["expires_in_s"]) " s" }
                            }
                        }
                    }
                }
                (pager("/ui/registrations", &q.q, &q.peer, q.page, matched))
            }
        }
        Err(e) => problem(&e),
    };
    layout(&web, &who, "Registrations", body)
}

pub(super) async fn calls(State(web): State<Shared>, who: Authed, q: ListParams) -> Markup {
    let body = match list_page(&web, "calls", &q).await {
        Ok((v, rows, matched)) => {
            html! {
                div class="figures" {
                    (usage("Calls in the cluster", v["calls"].as_u64().unwrap_or(0), limit_of(&v["calls_max"]).or(limit_of(&v["licences"]))))
                    (usage("Bandwidth (kbps)", v["kbps"].as_u64().unwrap_or(0), limit_of(&v["bandwidth_total_kbps"])))
                    @if let Some(l) = limit_of(&v["licences"]) { span { "Licensed calls: " (l) } }
                }
                (search_form("/ui/calls", &q.q, &q.peer, "Caller or callee containing"))
                table class="list" {
                    thead { tr { th { "Peer" } th { "Call" } th { "From" } th { "To" } th { "Duration" } th { "kbps" } } }
                    tbody {
                        @for r in &rows {
                            tr {
                                td { "Peer " (r["peer"]) }
                                td { (r["call"].as_str().unwrap_or("")) }
                                td { (r["from"].as_str().unwrap_or("")) }
                                td { (r["to"].as_str().unwrap_or("")) }
                                td { (r["duration_s"]) " s" }
                                td { (r["kbps"]) }
                            }
                        }
                    }
                }
                (pager("/ui/calls", &q.q, &q.peer, q.page, matched))
            }
        }
        Err(e) => problem(&e),
    };
    layout(&web, &who, "Calls", body)
}

// ---- Zones -----------------------------------------------------------------------------

pub(super) async fn zones(State(web): State<Shared>, who: Authed) -> Markup {
    let body = zones_body(&web).await;
    live_page(&web, &who, "Zones", "/ui/zones/live", body)
}

pub(super) async fn zones_live(State(web): State<Shared>, _who: Authed) -> Markup {
    zones_body(&web).await
}

async fn zones_body(web: &Shared) -> Markup {
    let v = match web.api(Method::GET, "/api/v1/status/zones", None).await {
        Ok(v) => v,
        Err(e) => return problem(&e),
    };
    let zones = v["zones"].as_array().cloned().unwrap_or_default();
    html! {
        p class="hint" { "Each peer probes every zone address with an OPTIONS keep-alive; this is the view from this peer. Zones and search rules are set on the Configuration page (zones.*, routing.rules.*)." }
        @if zones.is_empty() { p { "No neighbour zone is configured." } }
        table class="list zones" {
            thead { tr { th { "Zone" } th { "Transport" } th { "State" } th { "Addresses" } th { "Search rules" } } }
            tbody {
                @for z in &zones {
                    tr id=(format!("zone-{}", z["name"].as_str().unwrap_or(""))) class=(if z["up"] == true { "up" } else { "down" }) {
                        td { (z["name"].as_str().unwrap_or("")) }
                        td { (z["transport"].as_str().unwrap_or("")) }
                        td { (state(z["up"] == true, if z["up"] == true { "Up" } else { "Down" })) }
                        td {
                            @for a in z["addresses"].as_array().into_iter().flatten() {
                                div { code { (a["address"].as_str().unwrap_or("")) } " " (state(a["up"] == true, a["state"].as_str().unwrap_or(""))) }
                            }
                        }
                        td {
                            @for r in z["rules"].as_array().into_iter().flatten() {
                                div { code { (r.as_str().unwrap_or("")) } }
                            }
                        }
                    }
                }
            }
        }
    }
}

// ---- Service pages --------------------------------------------------------------------

pub(super) async fn service(
    State(web): State<Shared>,
    who: Authed,
    Path(slug): Path<String>,
) -> Response {
    let Some(page) = web.pages().iter().find(|p| p.slug == slug).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let body = service_body(&web, &page).await;
    live_page(
        &web,
        &who,
        page.title,
        &format!("/ui/service/{slug}/live"),
        body,
    )
    .into_response()
}

pub(super) async fn service_live(
    State(web): State<Shared>,
    _who: Authed,
    Path(slug): Path<String>,
) -> Response {
    match web.pages().iter().find(|p| p.slug == slug).cloned() {
        Some(page) => service_body(&web, &page).await.into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn service_body(web: &Shared, page: &super::ServicePage) -> Markup {
    match web.api(Method::GET, page.status_api, None).await {
        Ok(v) => html! {
            pre class="seed" { (v[page.text_key].as_str().unwrap_or("")) }
        },
        Err(e) => problem(&e),
    }
}
