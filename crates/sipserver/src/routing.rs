//! Search rules and neighbour zones (`docs/sip.md`, "Routing beyond the cluster"): where a
//! request goes that no binding of this cluster takes. Built from the cluster-wide items
//! `routing.rules.<name>` (`<pattern> <zone>`) and `zones.<name>.address|transport`, so
//! every peer routes alike.

use std::collections::BTreeMap;

use crate::transport::Proto;

/// One search rule: a destination pattern and the zone it sends matches to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchRule {
    pub name: String,
    /// The pattern without its trailing `*`.
    pub pattern: String,
    /// `pattern*`: any destination that starts with it; otherwise exactly it.
    pub prefix: bool,
    pub zone: String,
}

impl SearchRule {
    /// `+4420* london` under the name `10`.
    fn parse(name: &str, value: &str) -> Option<SearchRule> {
        let (pattern, zone) = value.split_once(' ')?;
        let (pattern, prefix) = match pattern.strip_suffix('*') {
            Some(p) => (p, true),
            None => (pattern, false),
        };
        Some(SearchRule {
            name: name.to_string(),
            pattern: pattern.to_ascii_lowercase(),
            prefix,
            zone: zone.trim().to_string(),
        })
    }

    /// Whether the rule takes `user` at `host`: a pattern with an `@` is matched against
    /// `user@host`, one without against the user part alone.
    fn matches(&self, user: &str, host: &str) -> bool {
        let destination = if self.pattern.contains('@') {
            format!("{user}@{host}").to_ascii_lowercase()
        } else {
            user.to_ascii_lowercase()
        };
        if self.prefix {
            destination.starts_with(&self.pattern)
        } else {
            destination == self.pattern
        }
    }
}

/// A neighbour zone: another system, reached at the first of its addresses that answers
/// the keep-alive (`zones.rs`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Zone {
    /// `host:port` each, in order of preference, as configured (a name is resolved when a
    /// request or a keep-alive is sent).
    pub addresses: Vec<String>,
    pub proto: Option<Proto>,
}

/// The rules in priority order and the zones they name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routing {
    pub rules: Vec<SearchRule>,
    pub zones: BTreeMap<String, Zone>,
}

/// Rule names sort as numbers where they are numbers (`9` before `10`), else as text.
fn priority(name: &str) -> (u64, String) {
    (name.parse().unwrap_or(u64::MAX), name.to_string())
}

impl Routing {
    /// From the configuration items (path, value); other items are ignored.
    pub fn from_items<'a>(items: impl IntoIterator<Item = (&'a str, &'a str)>) -> Routing {
        let mut routing = Routing::default();
        for (key, value) in items {
            if let Some(name) = key.strip_prefix("routing.rules.") {
                if let Some(rule) = SearchRule::parse(name, value) {
                    routing.rules.push(rule);
                }
            } else if let Some(rest) = key.strip_prefix("zones.") {
                if let Some(zone) = rest.strip_suffix(".address") {
                    routing.zones.entry(zone.to_string()).or_default().addresses = value
                        .split(',')
                        .map(str::trim)
                        .filter(|a| !a.is_empty())
                        .map(String::from)
                        .collect();
                } else if let Some(zone) = rest.strip_suffix(".transport") {
                    routing.zones.entry(zone.to_string()).or_default().proto = Proto::parse(value);
                }
            }
        }
        routing.rules.sort_by_key(|r| priority(&r.name));
        routing
    }

    /// Each rule in priority order as it would be tried for `user` at `host`, one line each,
    /// up to the one that takes it (`xcommand Locate`).
    pub fn trace(&self, user: &str, host: &str) -> Vec<String> {
        let mut lines = Vec::new();
        for r in &self.rules {
            let star = if r.prefix { "*" } else { "" };
            let zone = self.zones.get(&r.zone).filter(|z| !z.addresses.is_empty());
            let verdict = match (r.matches(user, host), zone) {
                (false, _) => "does not match".to_string(),
                (true, None) => format!("matches, but zone {} has no address", r.zone),
                (true, Some(z)) => {
                    format!("matches: zone {} at {}", r.zone, z.addresses.join(", "))
                }
            };
            lines.push(format!(
                "Search rule {} '{}{star}' to zone {}: {verdict}",
                r.name, r.pattern, r.zone
            ));
            if verdict.starts_with("matches:") {
                break;
            }
        }
        lines
    }

    /// The first rule, in priority order, that takes `user` at `host` and names a zone with
    /// an address; with that zone.
    pub fn route(&self, user: &str, host: &str) -> Option<(&SearchRule, &Zone)> {
        self.rules.iter().find_map(|r| {
            let zone = self
                .zones
                .get(&r.zone)
                .filter(|z| !z.addresses.is_empty())?;
            r.matches(user, host).then_some((r, zone))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(items: &[(&str, &str)]) -> Routing {
        Routing::from_items(items.iter().copied())
    }

    #[test]
    fn rules_apply_in_priority_order_to_the_user_or_to_user_at_host() {
        let r = routing(&[
            ("routing.rules.10", "+4420* london"),
            ("routing.rules.9", "+44* uk"),
            ("routing.rules.30", "bob@partner.example paris"),
            ("zones.london.address", "198.18.1.20:5060"),
            ("zones.uk.address", "198.18.1.21:5060"),
            ("zones.uk.transport", "TCP"),
            (
                "zones.paris.address",
                "paris.example:5061,paris2.example:5061",
            ),
            ("sip.domains", "example.com"),
        ]);
        // 9 before 10: the wider rule wins, as the operator ordered them.
        let (rule, zone) = r.route("+442071234567", "example.com").unwrap();
        assert_eq!((rule.name.as_str(), zone.proto), ("9", Some(Proto::Tcp)));
        assert_eq!(
            r.route("bob", "PARTNER.example").unwrap().1.addresses,
            ["paris.example:5061", "paris2.example:5061"]
        );
        assert!(
            r.route("bob", "other.example").is_none(),
            "exact, with its host"
        );
        assert!(r.route("alice", "example.com").is_none());
    }

    #[test]
    fn the_trace_shows_every_rule_tried_up_to_the_one_that_takes_it() {
        let r = routing(&[
            ("routing.rules.1", "+1* nowhere"),
            ("routing.rules.2", "+1555* us"),
            ("routing.rules.3", "+1* us"),
            ("zones.us.address", "198.18.1.30:5060"),
        ]);
        assert_eq!(
            r.trace("+15551234", "x"),
            [
                "Search rule 1 '+1*' to zone nowhere: matches, but zone nowhere has no address",
                "Search rule 2 '+1555*' to zone us: matches: zone us at 198.18.1.30:5060",
            ]
        );
        assert_eq!(
            r.trace("+44", "x").len(),
            3,
            "every rule tried, none took it"
        );
    }

    #[test]
    fn a_rule_naming_a_zone_without_an_address_takes_nothing() {
        let r = routing(&[
            ("routing.rules.1", "+1* nowhere"),
            ("routing.rules.2", "+1* us"),
            ("zones.us.address", "198.18.1.30:5060"),
        ]);
        assert_eq!(r.route("+15551234", "x").unwrap().0.name, "2");
    }
}
