//! The typed configuration tree behind `xconfiguration get|set` (EX-2).
//!
//! Cluster-wide items live in the replicated configuration stream, one record per path,
//! the value in its canonical text form. Peer-specific items (marked † as in the seed) live
//! in the node's own file and take effect on restart (alarm 20007).

use std::net::IpAddr;

use causeway_mesh::TlsMode;
use serde::{Deserialize, Serialize};

use crate::config::{valid_address, NodeConfig};

/// How a value is checked and written back.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// Comma-separated DNS domains, each once.
    Domains,
    /// A password; never shown back.
    Secret,
    /// `host:port` (host an IP or a DNS name).
    HostPort,
    /// A grammar of the service that owns the item (a search rule): `check` gives the
    /// value as it is stored, or why it is refused; `what` names the shape for the pages.
    Checked {
        what: &'static str,
        check: fn(&str) -> Result<String, String>,
    },
    /// A whole number; 0 means no limit.
    Limit,
    /// `Permissive` or `Enforce`.
    TlsMode,
    /// An IP address.
    Ip,
    /// One of these words, written as here; any case, `_` or `-` for a space, and any
    /// unambiguous start (`check` for `Check credentials`) are accepted.
    Choice(&'static [&'static str]),
}

/// A cluster-wide configuration item. The node defines its own; each service defines
/// its items in its own crate and registers them (`register`).
#[derive(Debug)]
pub struct ItemDef {
    /// `<name>` stands for an operator-chosen name (a family of items).
    pub path: &'static str,
    pub kind: Kind,
    /// A change takes effect only after a restart (20007).
    pub restart: bool,
    pub about: &'static str,
    /// Shown when the item is not set ("" for none).
    pub default: &'static str,
}

/// Items added by the services the binary hosts (their own catalogues).
static REGISTERED: std::sync::RwLock<Vec<&'static [ItemDef]>> = std::sync::RwLock::new(Vec::new());

/// Adds a service's configuration items. Registering the same list again changes nothing;
/// a path another item already has is refused with the path named.
pub fn register(items: &'static [ItemDef]) -> Result<(), String> {
    let mut registered = REGISTERED.write().unwrap_or_else(|p| p.into_inner());
    if registered.iter().any(|r| std::ptr::eq(*r, items)) {
        return Ok(());
    }
    let known = |path: &str| {
        NODE_ITEMS
            .iter()
            .chain(registered.iter().flat_map(|r| r.iter()))
            .any(|d| d.path == path)
            || is_peer_specific(path)
    };
    if let Some(taken) = items.iter().find(|d| known(d.path)) {
        return Err(format!(
            "configuration item {} is already defined",
            taken.path
        ));
    }
    registered.push(items);
    Ok(())
}

/// Every cluster-wide item: the node's own, then the services' in registration order.
fn all_items() -> Vec<&'static ItemDef> {
    let registered = REGISTERED.read().unwrap_or_else(|p| p.into_inner());
    NODE_ITEMS
        .iter()
        .chain(registered.iter().flat_map(|r| r.iter()))
        .collect()
}

/// The node's own cluster-wide items.
const NODE_ITEMS: &[ItemDef] = &[
    ItemDef {
        path: "cluster.tls_verification",
        kind: Kind::TlsMode,
        restart: true,
        about: "TLS verification between peers: Permissive or Enforce",
        default: "", // the node file's mode, see default_value,
    },
    ItemDef {
        path: "cluster.address_mapping.<name>",
        kind: Kind::Ip,
        restart: false,
        about: "the address a peer name maps to, consulted before DNS",
        default: "",
    },
];

/// Peer-specific items (†), read from and written to the node's own file.
const PEER_ITEMS: &[(&str, &str)] = &[
    ("system.name", "this system's name"),
    (
        "system.address",
        "this system's address, as in the peer list",
    ),
    ("cluster.name", "the cluster's name (FQDN)"),
    (
        "cluster.peers",
        "Peer 1 … Peer N addresses, comma-separated",
    ),
    (
        "cluster.configuration_primary",
        "the configuration primary's peer number (change it with `xcommand SetPrimary`)",
    ),
    ("tls.certificate", "this peer's certificate file"),
    ("tls.private_key", "this peer's private key file"),
    ("tls.ca", "the trusted CA file"),
    (
        "licences.rich_media_sessions",
        "rich media session licences on this peer",
    ),
    (
        "licences.room_systems",
        "room system registration licences on this peer",
    ),
];

/// One line of `xconfiguration get`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigItem {
    pub path: String,
    pub value: String,
    /// † : set on each peer separately.
    pub peer_specific: bool,
    /// A change takes effect only after a restart (20007).
    pub restart_required: bool,
    /// Set on this peer but not yet in effect (peer-specific items, until restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
    pub about: String,
    /// What the value is (`host:port, up to 4, comma-separated`, `Permissive or Enforce`…).
    #[serde(default)]
    pub kind: String,
    /// The words a choice takes, for a form's list (empty: free text).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
}

impl Kind {
    /// The value's type, in words, for the Configuration page.
    pub fn describe(&self) -> String {
        match self {
            Kind::Domains => "DNS domains, comma-separated".into(),
            Kind::Secret => "password (never shown)".into(),
            Kind::HostPort => "host:port (IP or name), comma-separated".into(),
            Kind::Checked { what, .. } => what.to_string(),
            Kind::Limit => "whole number (0: no limit)".into(),
            Kind::TlsMode => "Permissive or Enforce".into(),
            Kind::Ip => "IP address".into(),
            Kind::Choice(words) => format!("one of: {}", words.join(", ")),
        }
    }

    pub fn choices(&self) -> Vec<String> {
        match self {
            Kind::TlsMode => vec!["Permissive".into(), "Enforce".into()],
            Kind::Choice(words) => words.iter().map(|w| w.to_string()).collect(),
            _ => Vec::new(),
        }
    }
}

fn name_ok(name: &str, dots: bool) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || (dots && c == '.'))
}

/// The cluster-wide item a path names, or why none does.
fn cluster_item(path: &str) -> Option<&'static ItemDef> {
    all_items()
        .into_iter()
        .find(|d| match d.path.split_once("<name>") {
            None => d.path == path,
            Some((prefix, suffix)) => path
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix(suffix))
                .is_some_and(|name| name_ok(name, suffix.is_empty())),
        })
}

pub fn is_peer_specific(path: &str) -> bool {
    PEER_ITEMS.iter().any(|(p, _)| *p == path)
}

fn unknown(path: &str) -> String {
    let known: Vec<&str> = all_items()
        .into_iter()
        .map(|d| d.path)
        .chain(PEER_ITEMS.iter().map(|(p, _)| *p))
        .collect();
    format!(
        "{path}: no such configuration item (known: {})",
        known.join(", ")
    )
}

/// Checks a cluster-wide value and returns its canonical form; the error names the path.
/// `None` deletes the item (back to its default).
pub fn canonical(path: &str, value: Option<&str>) -> Result<Option<String>, String> {
    let def = cluster_item(path).ok_or_else(|| {
        if is_peer_specific(path) {
            format!("{path} is peer-specific (†): it is not replicated")
        } else {
            unknown(path)
        }
    })?;
    let Some(value) = value else { return Ok(None) };
    let v = value.trim();
    if v.len() > 1024 {
        return Err(format!("{path}: longer than 1024 characters"));
    }
    let bad = |why: &str| Err(format!("{path}: '{v}' {why}"));
    let out = match def.kind {
        Kind::Domains => {
            let mut seen: Vec<String> = Vec::new();
            for d in v.split(',').map(str::trim).filter(|d| !d.is_empty()) {
                let d = d.to_ascii_lowercase();
                if d.parse::<IpAddr>().is_ok() || !valid_address(&d) {
                    return bad(&format!(
                        "is not a list of domains: '{d}' is not a DNS domain"
                    ));
                }
                if seen.contains(&d) {
                    return bad(&format!("lists '{d}' twice"));
                }
                seen.push(d);
            }
            seen.join(",")
        }
        Kind::Secret => {
            if v.is_empty() || v.chars().any(char::is_control) {
                return Err(format!(
                    "{path}: a password must be 1 to 1024 printable characters"
                ));
            }
            v.to_string()
        }
        Kind::HostPort => {
            // One address, or a few in order of preference, comma-separated.
            let list: Vec<String> = v
                .split(',')
                .map(|a| a.trim().to_ascii_lowercase())
                .filter(|a| !a.is_empty())
                .collect();
            let ok = |a: &str| {
                a.rsplit_once(':').is_some_and(|(h, p)| {
                    let h = h.trim_start_matches('[').trim_end_matches(']');
                    valid_address(h) && p.parse::<u16>().is_ok_and(|p| p > 0)
                })
            };
            if list.is_empty() || list.len() > 4 || !list.iter().all(|a| ok(a)) {
                return bad("is not host:port, or up to 4 of them comma-separated (for example sip1.example.com:5061,sip2.example.com:5061)");
            }
            list.join(",")
        }
        Kind::Checked { check, .. } => match check(v) {
            Ok(c) => c,
            Err(why) => return bad(&why),
        },
        Kind::Limit => match v.parse::<u32>() {
            Ok(n) => n.to_string(),
            Err(_) => return bad("is not a whole number from 0 to 4294967295"),
        },
        Kind::TlsMode => match v.to_ascii_lowercase().as_str() {
            "permissive" => "Permissive".to_string(),
            "enforce" | "enforcing" => "Enforce".to_string(),
            _ => return bad("is not Permissive or Enforce"),
        },
        Kind::Ip => match v.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => return bad("is not an IP address"),
        },
        Kind::Choice(choices) => {
            let words = |t: &str| t.to_ascii_lowercase().replace(['_', '-'], " ");
            let given = words(v);
            let given = given.split_whitespace().collect::<Vec<_>>().join(" ");
            let exact = choices.iter().copied().find(|c| words(c) == given);
            let starting: Vec<&str> = choices
                .iter()
                .copied()
                .filter(|c| !given.is_empty() && words(c).starts_with(&given))
                .collect();
            match (exact, starting.as_slice()) {
                (Some(c), _) | (None, &[c]) => c.to_string(),
                _ => {
                    let list: Vec<String> = choices.iter().map(|c| format!("'{c}'")).collect();
                    return bad(&format!("is not one of {}", list.join(", ")));
                }
            }
        }
    };
    Ok(Some(out))
}

pub fn restart_required(path: &str) -> bool {
    cluster_item(path).is_some_and(|d| d.restart)
}

/// What `get` shows for a stored value: secrets hidden.
pub fn shown(path: &str, value: &str) -> String {
    match cluster_item(path) {
        Some(d) if matches!(d.kind, Kind::Secret) => "********".to_string(),
        _ => value.to_string(),
    }
}

/// The cluster-wide items: every fixed path (set or default) and every set family member.
pub fn cluster_items(entries: &[(String, String)], file: &NodeConfig) -> Vec<ConfigItem> {
    let mut out = Vec::new();
    for def in all_items() {
        if def.path.contains("<name>") {
            for (k, v) in entries {
                if cluster_item(k).is_some_and(|d| std::ptr::eq(d, def)) {
                    out.push(item(k, &shown(k, v), def));
                }
            }
        } else {
            let value = entries
                .iter()
                .find(|(k, _)| k == def.path)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| default_value(def, file));
            out.push(item(def.path, &value, def));
        }
    }
    out
}

fn item(path: &str, value: &str, def: &ItemDef) -> ConfigItem {
    ConfigItem {
        path: path.to_string(),
        value: value.to_string(),
        peer_specific: false,
        restart_required: def.restart,
        pending: None,
        about: def.about.to_string(),
        kind: def.kind.describe(),
        choices: def.kind.choices(),
    }
}

/// What a cluster-wide item shows while it has never been set: its default, or the node
/// file's value for an item the file also holds. None for an item that is not known.
pub fn unset_value(path: &str, file: &NodeConfig) -> Option<String> {
    cluster_item(path).map(|def| default_value(def, file))
}

fn default_value(def: &ItemDef, file: &NodeConfig) -> String {
    match def.path {
        "cluster.tls_verification" => tls_text(file.cluster.tls_verification),
        _ => def.default.to_string(),
    }
}

pub fn tls_text(mode: TlsMode) -> String {
    match mode {
        TlsMode::Permissive => "Permissive",
        TlsMode::Enforce => "Enforce",
    }
    .to_string()
}

/// The peer-specific items as `running` holds them, with `file`'s value as pending where it
/// differs (set, not yet restarted). `primary` is the replicated primary (EX-7).
pub fn peer_items(running: &NodeConfig, file: &NodeConfig, primary: usize) -> Vec<ConfigItem> {
    PEER_ITEMS
        .iter()
        .map(|(path, about)| {
            let value = peer_value(running, path, primary);
            let on_file = peer_value(file, path, primary);
            ConfigItem {
                path: path.to_string(),
                pending: (on_file != value).then_some(on_file),
                value,
                peer_specific: true,
                restart_required: *path != "cluster.configuration_primary",
                about: about.to_string(),
                kind: peer_kind(path).to_string(),
                choices: Vec::new(),
            }
        })
        .collect()
}

fn peer_kind(path: &str) -> &'static str {
    match path {
        "system.address" => "IP address or DNS name",
        "cluster.peers" => "addresses (IP or name), comma-separated",
        "cluster.configuration_primary" => "peer number",
        "licences.rich_media_sessions" | "licences.room_systems" => "whole number",
        p if p.starts_with("tls.") => "file in the data directory",
        _ => "name",
    }
}

fn peer_value(c: &NodeConfig, path: &str, primary: usize) -> String {
    match path {
        "system.name" => c.node.system_name.clone(),
        "system.address" => c.node.address.clone(),
        "cluster.name" => c.cluster.name.clone(),
        "cluster.peers" => c.cluster.peers.join(","),
        "cluster.configuration_primary" => primary.to_string(),
        "tls.certificate" => c.tls.certificate.display().to_string(),
        "tls.private_key" => c.tls.private_key.display().to_string(),
        "tls.ca" => c.tls.ca.display().to_string(),
        "licences.rich_media_sessions" => c.licences.rich_media_sessions.to_string(),
        "licences.room_systems" => c.licences.room_systems.to_string(),
        _ => String::new(),
    }
}

/// This system's address as the peer list spells it becomes `address`. Where it was an IP
/// and becomes a name, the cluster port and SIP keep listening on that IP (`cluster.listen`,
/// `sip.listen`, unless already set): a name is not something to bind to.
fn readdress(file: &mut NodeConfig, address: &str) {
    if let Ok(ip) = file.node.address.parse::<std::net::IpAddr>() {
        if address.parse::<std::net::IpAddr>().is_err() {
            file.cluster.listen.get_or_insert(ip);
            if let Some(sip) = file.sip.as_mut() {
                sip.listen.get_or_insert(ip);
            }
        }
    }
    file.node.address = address.to_string();
}

/// Applies a peer-specific change to `file` and checks the whole file as `causeway run`
/// would; the error names the item.
pub fn set_peer_item(file: &mut NodeConfig, path: &str, value: &str) -> Result<(), String> {
    let v = value.trim();
    let number = |what: &str| {
        v.parse::<u32>()
            .map_err(|_| format!("{path}: '{v}' is not a whole number of {what}"))
    };
    match path {
        "system.name" => file.node.system_name = v.to_string(),
        "system.address" => {
            if !file.cluster.peers.is_empty()
                && !file.cluster.peers.iter().any(|p| p.eq_ignore_ascii_case(v))
            {
                // Alone it would cut this system off (20003): the list names the peers.
                return Err(format!(
                    "{path}: '{v}' is not in cluster.peers: change this system's entry there instead (`xconfiguration set cluster.peers …`), and its address follows"
                ));
            }
            readdress(file, v)
        }
        "cluster.name" => file.cluster.name = v.to_string(),
        "cluster.peers" => {
            let (own, before) = (file.self_index(), file.cluster.peers.len());
            file.cluster.peers = v
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect();
            // This system's own entry respelled in place (its IP for its name, or back): it
            // is still this system, so its address follows, in the same change. A list that
            // grew or shrank, or still names this address, is left as written.
            if let Some(i) = own.filter(|_| file.cluster.peers.len() == before) {
                if file.self_index().is_none() {
                    let new = file.cluster.peers[i - 1].clone();
                    readdress(file, &new);
                }
            }
        }
        "cluster.configuration_primary" => {
            return Err(format!(
                "{path}: moves for the whole cluster at once: run `causeway xcommand SetPrimary <peer>`"
            ))
        }
        "tls.certificate" => file.tls.certificate = v.into(),
        "tls.private_key" => file.tls.private_key = v.into(),
        "tls.ca" => file.tls.ca = v.into(),
        "licences.rich_media_sessions" => file.licences.rich_media_sessions = number("licences")?,
        "licences.room_systems" => file.licences.room_systems = number("licences")?,
        _ => return Err(unknown(path)),
    }
    file.validate().map_err(|e| match e {
        crate::ConfigError::Field { field, message, .. } => {
            format!("{path}: '{v}' refused: {field}: {message}")
        }
        other => format!("{path}: '{v}' refused: {other}"),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `<pattern> <zone>`, for the tests' rule item (SIP's own grammar is in its crate).
    fn test_rule(v: &str) -> Result<String, String> {
        match v.split_whitespace().collect::<Vec<_>>().as_slice() {
            [pattern, zone] if !pattern.trim_end_matches('*').contains('*') => {
                Ok(format!("{pattern} {zone}"))
            }
            _ => Err("is not '<pattern> <zone>'".into()),
        }
    }

    /// A service's items as the node's tests see them (SIP's own are in its crate).
    pub(crate) static TEST_ITEMS: &[ItemDef] = &[
        ItemDef {
            path: "sip.domains",
            kind: Kind::Domains,
            restart: false,
            about: "SIP domains",
            default: "",
        },
        ItemDef {
            path: "sip.users.<name>",
            kind: Kind::Secret,
            restart: false,
            about: "a SIP user's password",
            default: "",
        },
        ItemDef {
            path: "zones.<name>.address",
            kind: Kind::HostPort,
            restart: false,
            about: "a zone's address",
            default: "",
        },
        ItemDef {
            path: "routing.rules.<name>",
            kind: Kind::Checked {
                what: "rule: <pattern> <zone>",
                check: test_rule,
            },
            restart: false,
            about: "a search rule",
            default: "",
        },
        ItemDef {
            path: "limits.calls.max",
            kind: Kind::Limit,
            restart: false,
            about: "concurrent calls",
            default: "0",
        },
        ItemDef {
            path: "test.mode",
            kind: Kind::Choice(&["Fast", "Slow and steady"]),
            restart: false,
            about: "a choice",
            default: "Fast",
        },
    ];

    #[test]
    fn a_services_items_join_once_and_a_taken_path_is_refused_by_name() {
        register(TEST_ITEMS).unwrap();
        register(TEST_ITEMS).unwrap();
        static CLASH: &[ItemDef] = &[ItemDef {
            path: "cluster.tls_verification",
            kind: Kind::Limit,
            restart: false,
            about: "",
            default: "",
        }];
        let e = register(CLASH).unwrap_err();
        assert!(e.contains("cluster.tls_verification"), "{e}");
        assert_eq!(
            canonical("test.mode", Some("slow")).unwrap(),
            Some("Slow and steady".into())
        );
        assert_eq!(
            canonical("test.mode", Some("FAST")).unwrap(),
            Some("Fast".into())
        );
        let e = canonical("test.mode", Some("")).unwrap_err();
        assert!(e.contains("'Fast', 'Slow and steady'"), "{e}");
    }

    /// A peer that respells its own entry in the list (its IP for its name) stays itself:
    /// its address follows in the same change and it keeps listening where it did.
    #[test]
    fn respelling_this_systems_own_entry_moves_its_address_and_keeps_its_listeners() {
        let base = "[node]\nsystem_name = \"p2\"\naddress = \"127.0.0.2\"\ndata_dir = \"/tmp/p2\"\n\
                    [cluster]\nname = \"c.example\"\npeers = [\"127.0.0.1\", \"127.0.0.2\", \"127.0.0.3\"]\n\
                    [sip]\nudp_port = 5060\n";
        let mut file: NodeConfig = toml::from_str(base).unwrap();
        set_peer_item(&mut file, "cluster.peers", "127.0.0.1,peer2.lab,127.0.0.3").unwrap();
        assert_eq!(file.node.address, "peer2.lab");
        assert_eq!(file.self_index(), Some(2));
        let ip: std::net::IpAddr = "127.0.0.2".parse().unwrap();
        assert_eq!(file.cluster.listen, Some(ip));
        assert_eq!(file.sip.as_ref().unwrap().listen, Some(ip));
        // system.address alone would cut it off: refused, naming what to change.
        let mut file: NodeConfig = toml::from_str(base).unwrap();
        let e = set_peer_item(&mut file, "system.address", "peer2.lab").unwrap_err();
        assert!(e.contains("not in cluster.peers"), "{e}");
        // Another peer's entry changed, or the list grown: this system's address stays.
        let mut file: NodeConfig = toml::from_str(base).unwrap();
        set_peer_item(&mut file, "cluster.peers", "peer1.lab,127.0.0.2,127.0.0.3").unwrap();
        assert_eq!(file.node.address, "127.0.0.2");
        assert_eq!(file.cluster.listen, None);
    }

    #[test]
    fn an_item_never_set_shows_its_default_or_the_node_files_value() {
        let mut file: NodeConfig = toml::from_str(
            "[node]\nsystem_name = \"p1\"\naddress = \"127.0.0.1\"\ndata_dir = \"/tmp/p1\"\n",
        )
        .unwrap();
        file.cluster.tls_verification = TlsMode::Enforce;
        assert_eq!(
            unset_value("cluster.tls_verification", &file).as_deref(),
            Some("Enforce")
        );
        assert_eq!(unset_value("no.such.item", &file), None);
    }

    #[test]
    fn values_are_checked_and_canonical_and_errors_name_the_field() {
        register(TEST_ITEMS).unwrap();
        assert_eq!(
            canonical("sip.domains", Some(" Example.com, example.org ")).unwrap(),
            Some("example.com,example.org".into())
        );
        let e = canonical("sip.domains", Some("example.com,bad domain")).unwrap_err();
        assert!(
            e.starts_with("sip.domains:") && e.contains("bad domain"),
            "{e}"
        );
        assert!(canonical("sip.domains", Some("a.example,a.example")).is_err());
        assert_eq!(
            canonical("cluster.tls_verification", Some("enforcing")).unwrap(),
            Some("Enforce".into())
        );
        assert!(canonical("limits.calls.max", Some("-1"))
            .unwrap_err()
            .starts_with("limits.calls.max:"));
        assert_eq!(
            canonical("routing.rules.10", Some("+4420*   london")).unwrap(),
            Some("+4420* london".into())
        );
        assert!(canonical("routing.rules.10", Some("+44*20 london")).is_err());
        assert!(canonical("zones.london.address", Some("sip.example.com:5061")).is_ok());
        assert!(canonical("zones.london.address", Some("sip.example.com")).is_err());
        assert_eq!(
            canonical(
                "zones.london.address",
                Some(" A.example:5060 , 10.0.0.2:5060")
            )
            .unwrap(),
            Some("a.example:5060,10.0.0.2:5060".into())
        );
        assert!(canonical("zones.london.address", Some("a:1,b:2,c:3,d:4,e:5")).is_err());
        assert!(canonical("zones.lon.don.address", Some("a:1")).is_err());
        assert_eq!(
            canonical(
                "cluster.address_mapping.peer1.lab.example",
                Some("127.0.0.1")
            )
            .unwrap(),
            Some("127.0.0.1".into())
        );
        assert!(canonical("sip.users.alice", Some("s3cret")).is_ok());
        assert_eq!(shown("sip.users.alice", "s3cret"), "********");
        let e = canonical("sip.nonsense", Some("1")).unwrap_err();
        assert!(
            e.contains("no such configuration item") && e.contains("sip.domains"),
            "{e}"
        );
        let e = canonical("system.name", Some("x")).unwrap_err();
        assert!(e.contains("peer-specific"), "{e}");
        assert_eq!(canonical("sip.domains", None).unwrap(), None);
    }
}
