//! Search rules and neighbour zones (`docs/sip.md`, "Routing beyond the cluster"): where a
//! request goes that no binding of this cluster takes. Built from the cluster-wide items
//! `routing.rules.<name>` and `zones.<name>.address|transport`, so every peer routes alike.
//!
//! A rule is `<pattern> <target> [options]`:
//! - pattern: `+4420*` (a prefix), `bob@partner.example` (exactly), or `/regex/` (the whole
//!   destination, case-insensitive); with an `@` it is matched against `user@host`, else
//!   against the user part;
//! - target: a zone's name, or `local` (this cluster's registrations of the rewritten alias);
//! - options: `strip=N` (drop the first N characters), `prepend=TEXT`, `replace=TEMPLATE`
//!   (regex rules: `$1`… are the pattern's groups), `continue` (when the target cannot take
//!   it, go on to the next rules with the rewritten alias; the default is `stop`), `auth`
//!   (only for authenticated requests).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::transport::Proto;

/// Longest pattern accepted: a rule is a line an operator writes.
const MAX_PATTERN: usize = 256;
/// A compiled pattern stays small whatever is written (the regex crate's size limit).
const REGEX_SIZE_LIMIT: usize = 64 * 1024;

#[derive(Clone, Debug)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    Regex(Arc<regex::Regex>),
}

/// Where a rule sends what it matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleTarget {
    /// This cluster's own registrations (of the rewritten alias).
    Local,
    Zone(String),
}

/// One search rule, parsed from its item.
#[derive(Clone, Debug)]
pub struct SearchRule {
    pub name: String,
    pub pattern: Pattern,
    /// The pattern is matched against `user@host` (it has an `@`), else the user alone.
    pub with_host: bool,
    pub target: RuleTarget,
    pub strip: usize,
    pub prepend: String,
    pub replace: Option<String>,
    /// When the target cannot take the request, try the next rules.
    pub go_on: bool,
    /// Only for authenticated requests.
    pub auth_only: bool,
    /// The item's value as stored (for the trace, and to compare rules).
    pub text: String,
}

impl PartialEq for SearchRule {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.text == other.text
    }
}

impl Eq for SearchRule {}

/// A zone's username as stored: it goes into a quoted Digest parameter, so no quote,
/// backslash or control character, and at most 128 bytes.
pub fn canonical_username(value: &str) -> Result<String, String> {
    let v = value.trim();
    if v.len() > 128 {
        return Err("is longer than 128 characters".into());
    }
    if v.chars().any(|c| c == '"' || c == '\\' || c.is_control()) {
        return Err("has a quote, a backslash or a control character".into());
    }
    Ok(v.to_string())
}

/// The item's value as stored, or why it is refused (the configuration check).
pub fn canonical_rule(value: &str) -> Result<String, String> {
    SearchRule::parse("check", value).map(|r| r.text)
}

fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl SearchRule {
    /// `+4420* london strip=3 prepend=0` under the name `10`.
    pub fn parse(name: &str, value: &str) -> Result<SearchRule, String> {
        const SHAPE: &str = "is not '<pattern> <zone or local> [strip=N] [prepend=TEXT] [replace=TEMPLATE] [continue|stop] [auth]' (for example '+4420* london strip=3')";
        let value = value.trim();
        // A regex may hold spaces: it ends at the last '/' before the target.
        let (pattern_text, rest) = if let Some(body) = value.strip_prefix('/') {
            let end = body.rfind('/').ok_or_else(|| SHAPE.to_string())?;
            (&value[..end + 2], &body[end + 1..])
        } else {
            value.split_once(' ').ok_or_else(|| SHAPE.to_string())?
        };
        if pattern_text.len() > MAX_PATTERN {
            return Err(format!(
                "has a pattern longer than {MAX_PATTERN} characters"
            ));
        }
        let mut words = rest.split_whitespace();
        let target = match words.next() {
            Some(t) if t.eq_ignore_ascii_case("local") => RuleTarget::Local,
            Some(t) if name_ok(t) => RuleTarget::Zone(t.to_string()),
            _ => return Err(SHAPE.into()),
        };
        let pattern = if let Some(re) = pattern_text
            .strip_prefix('/')
            .and_then(|p| p.strip_suffix('/'))
        {
            let compiled = regex::RegexBuilder::new(&format!("^(?:{re})$"))
                .case_insensitive(true)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| format!("has a pattern that is not a regular expression: {e}"))?;
            Pattern::Regex(Arc::new(compiled))
        } else {
            let body = pattern_text.strip_suffix('*').unwrap_or(pattern_text);
            if body.is_empty() && !pattern_text.ends_with('*')
                || body.contains('*')
                || !body
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "@.+-_".contains(c))
            {
                return Err(SHAPE.into());
            }
            let body = body.to_ascii_lowercase();
            if pattern_text.ends_with('*') {
                Pattern::Prefix(body)
            } else {
                Pattern::Exact(body)
            }
        };
        let mut rule = SearchRule {
            name: name.to_string(),
            with_host: pattern_text.contains('@'),
            pattern,
            target,
            strip: 0,
            prepend: String::new(),
            replace: None,
            go_on: false,
            auth_only: false,
            text: String::new(),
        };
        for word in words {
            let (key, val) = word.split_once('=').unwrap_or((word, ""));
            match key.to_ascii_lowercase().as_str() {
                "strip" => {
                    rule.strip = val
                        .parse()
                        .ok()
                        .filter(|n| *n <= 64)
                        .ok_or("has strip= that is not a number from 0 to 64")?
                }
                "prepend"
                    if val
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-_.".contains(c)) =>
                {
                    rule.prepend = val.to_string()
                }
                "replace" if matches!(rule.pattern, Pattern::Regex(_)) && !val.is_empty() => {
                    rule.replace = Some(val.to_string())
                }
                "replace" => {
                    return Err(
                        "has replace= on a rule whose pattern is not a /regex/ (or an empty one)"
                            .into(),
                    )
                }
                "continue" if val.is_empty() => rule.go_on = true,
                "stop" if val.is_empty() => rule.go_on = false,
                "auth" if val.is_empty() => rule.auth_only = true,
                _ => return Err(format!("has an unknown option '{word}': {SHAPE}")),
            }
        }
        // Written back in one order, so every peer stores the same text.
        let mut text = format!(
            "{} {}",
            match &rule.pattern {
                Pattern::Regex(_) => pattern_text.to_string(),
                _ => pattern_text.to_ascii_lowercase(),
            },
            match &rule.target {
                RuleTarget::Local => "local",
                RuleTarget::Zone(z) => z,
            }
        );
        if rule.strip > 0 {
            text.push_str(&format!(" strip={}", rule.strip));
        }
        if !rule.prepend.is_empty() {
            text.push_str(&format!(" prepend={}", rule.prepend));
        }
        if let Some(r) = &rule.replace {
            text.push_str(&format!(" replace={r}"));
        }
        if rule.go_on {
            text.push_str(" continue");
        }
        if rule.auth_only {
            text.push_str(" auth");
        }
        rule.text = text;
        Ok(rule)
    }

    fn destination(&self, user: &str, host: &str) -> String {
        if self.with_host {
            format!("{user}@{host}")
        } else {
            user.to_string()
        }
    }

    /// Whether the rule takes `user` at `host`.
    pub fn matches(&self, user: &str, host: &str) -> bool {
        let destination = self.destination(user, host);
        match &self.pattern {
            Pattern::Exact(p) => destination.eq_ignore_ascii_case(p),
            Pattern::Prefix(p) => destination
                .get(..p.len())
                .is_some_and(|d| d.eq_ignore_ascii_case(p)),
            Pattern::Regex(re) => re.is_match(&destination),
        }
    }

    /// `user` at `host` after the rule's rewrite: replace, then strip, then prepend. A
    /// pattern with an `@` rewrites `user@host`; the result's last `@` splits it again.
    pub fn rewrite(&self, user: &str, host: &str) -> (String, String) {
        let mut out = self.destination(user, host);
        if let (Pattern::Regex(re), Some(template)) = (&self.pattern, &self.replace) {
            out = re.replace(&out, template.as_str()).into_owned();
        }
        let cut = out
            .char_indices()
            .nth(self.strip)
            .map_or(out.len(), |(i, _)| i);
        out = format!("{}{}", self.prepend, &out[cut..]);
        if self.with_host {
            match out.rsplit_once('@') {
                Some((u, h)) if !h.is_empty() => (u.to_string(), h.to_string()),
                _ => (out, host.to_string()),
            }
        } else {
            (out, host.to_string())
        }
    }

    fn rewrites(&self) -> bool {
        self.strip > 0 || !self.prepend.is_empty() || self.replace.is_some()
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
    /// What this cluster answers the neighbour's digest challenges with.
    pub credentials: Option<Credentials>,
    /// A DNS zone: no addresses of its own; the request's domain is looked up (RFC 3263).
    pub dns: bool,
}

/// A username and password this cluster uses towards a neighbour (`zones.<name>.username`,
/// `zones.<name>.password`).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    /// Never the password: zones are logged and shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials {{ user: {:?} }}", self.user)
    }
}

/// The rules in priority order and the zones they name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routing {
    pub rules: Vec<SearchRule>,
    pub zones: BTreeMap<String, Zone>,
}

/// One place a request may go, in the order the rules give: the target, with the alias as
/// the rules before it rewrote it.
#[derive(Clone, Debug)]
pub struct Step<'a> {
    pub rule: &'a SearchRule,
    pub user: String,
    pub host: String,
    /// The zone, for a zone target (`None`: the local registrations).
    pub zone: Option<(&'a str, &'a Zone)>,
}

/// Where the rules send a request, and the trace of every rule looked at.
#[derive(Debug, Default)]
pub struct Plan<'a> {
    pub steps: Vec<Step<'a>>,
    pub trace: Vec<String>,
}

/// Rule names sort as numbers where they are numbers (`9` before `10`), else as text.
fn priority(name: &str) -> (u64, String) {
    (name.parse().unwrap_or(u64::MAX), name.to_string())
}

impl Routing {
    /// From the configuration items (path, value); other items are ignored, and so is a
    /// rule that no longer parses (the configuration check refuses those when set).
    pub fn from_items<'a>(items: impl IntoIterator<Item = (&'a str, &'a str)>) -> Routing {
        let mut routing = Routing::default();
        let (mut usernames, mut passwords) = (BTreeMap::new(), BTreeMap::new());
        for (key, value) in items {
            if let Some(name) = key.strip_prefix("routing.rules.") {
                if let Ok(rule) = SearchRule::parse(name, value) {
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
                } else if let Some(zone) = rest.strip_suffix(".type") {
                    routing.zones.entry(zone.to_string()).or_default().dns =
                        value.eq_ignore_ascii_case("DNS");
                } else if let Some(zone) = rest.strip_suffix(".username") {
                    usernames.insert(zone.to_string(), value.to_string());
                } else if let Some(zone) = rest.strip_suffix(".password") {
                    passwords.insert(zone.to_string(), value.to_string());
                }
            }
        }
        for (zone, user) in usernames {
            // A username without a password answers with an empty one: the neighbour
            // decides whether that is enough.
            let password = passwords.remove(&zone).unwrap_or_default();
            if let Some(z) = routing.zones.get_mut(&zone) {
                z.credentials = Some(Credentials { user, password });
            }
        }
        routing.rules.sort_by_key(|r| priority(&r.name));
        routing
    }

    /// The rules in priority order for `user` at `host`: every one that takes it, up to the
    /// first that stops the search, each with the alias as rewritten so far; and a line per
    /// rule looked at (`xcommand Locate`).
    pub fn plan(&self, user: &str, host: &str, authenticated: bool) -> Plan<'_> {
        let mut plan = Plan::default();
        let (mut user, mut host) = (user.to_string(), host.to_string());
        for r in &self.rules {
            let head = format!("Search rule {} '{}'", r.name, r.text);
            if r.auth_only && !authenticated {
                plan.trace
                    .push(format!("{head}: for authenticated requests only: skipped"));
                continue;
            }
            if !r.matches(&user, &host) {
                plan.trace.push(format!("{head}: does not match"));
                continue;
            }
            let (u, h) = r.rewrite(&user, &host);
            let rewritten = if r.rewrites() {
                format!(", rewritten to {u}@{h}")
            } else {
                String::new()
            };
            let zone = match &r.target {
                RuleTarget::Local => None,
                RuleTarget::Zone(z) => {
                    match self
                        .zones
                        .get_key_value(z)
                        .filter(|(_, z)| z.dns || !z.addresses.is_empty())
                    {
                        Some((name, zone)) => Some((name.as_str(), zone)),
                        None => {
                            plan.trace.push(format!(
                                "{head}: matches{rewritten}, but zone {z} has no address"
                            ));
                            continue;
                        }
                    }
                }
            };
            let to = match zone {
                Some((name, z)) if z.dns => format!("zone {name} (DNS: {h} looked up)"),
                Some((name, z)) => format!("zone {name} at {}", z.addresses.join(", ")),
                None => "the local registrations".into(),
            };
            let then = if r.go_on {
                "; if it cannot take it, the next rules"
            } else {
                ""
            };
            plan.trace
                .push(format!("{head}: matches{rewritten}: to {to}{then}"));
            plan.steps.push(Step {
                rule: r,
                user: u.clone(),
                host: h.clone(),
                zone,
            });
            if !r.go_on {
                break;
            }
            (user, host) = (u, h);
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(items: &[(&str, &str)]) -> Routing {
        Routing::from_items(items.iter().copied())
    }

    /// (rule name, zone or "local", user@host) of each step.
    fn steps(
        r: &Routing,
        user: &str,
        host: &str,
        authenticated: bool,
    ) -> Vec<(String, String, String)> {
        r.plan(user, host, authenticated)
            .steps
            .iter()
            .map(|s| {
                (
                    s.rule.name.clone(),
                    s.zone.map_or("local".to_string(), |z| z.0.to_string()),
                    format!("{}@{}", s.user, s.host),
                )
            })
            .collect()
    }

    fn step(rule: &str, zone: &str, alias: &str) -> (String, String, String) {
        (rule.into(), zone.into(), alias.into())
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
        let plan = r.plan("+442071234567", "example.com", false);
        assert_eq!(plan.steps.len(), 1, "the first match stops the search");
        let (name, zone) = plan.steps[0].zone.unwrap();
        assert_eq!(
            (plan.steps[0].rule.name.as_str(), name, zone.proto),
            ("9", "uk", Some(Proto::Tcp))
        );
        assert_eq!(
            steps(&r, "bob", "PARTNER.example", false),
            [step("30", "paris", "bob@PARTNER.example")]
        );
        assert!(
            steps(&r, "bob", "other.example", false).is_empty(),
            "exact, with its host"
        );
        assert!(steps(&r, "alice", "example.com", false).is_empty());
    }

    #[test]
    fn a_rule_rewrites_the_alias_and_continue_hands_the_rewritten_one_on() {
        let r = routing(&[
            // The trunk takes national numbers: 0 for +44.
            ("routing.rules.1", "+44* trunk strip=3 prepend=0 continue"),
            ("routing.rules.2", "/0(20)(\\d+)/ london replace=+44-$1-$2"),
            ("routing.rules.3", "0* trunk"),
            ("zones.trunk.address", "198.18.1.40:5060"),
            ("zones.london.address", "198.18.1.20:5060"),
        ]);
        assert_eq!(
            steps(&r, "+442071234567", "example.com", false),
            [
                step("1", "trunk", "02071234567@example.com"),
                step("2", "london", "+44-20-71234567@example.com"),
            ]
        );
        // A regex takes the whole alias, not a part of it.
        assert_eq!(
            steps(&r, "+4413", "example.com", false),
            [
                step("1", "trunk", "013@example.com"),
                step("3", "trunk", "013@example.com")
            ]
        );
        let trace = r.plan("+442071234567", "example.com", false).trace;
        assert_eq!(
            trace,
            [
                "Search rule 1 '+44* trunk strip=3 prepend=0 continue': matches, rewritten to 02071234567@example.com: to zone trunk at 198.18.1.40:5060; if it cannot take it, the next rules",
                "Search rule 2 '/0(20)(\\d+)/ london replace=+44-$1-$2': matches, rewritten to +44-20-71234567@example.com: to zone london at 198.18.1.20:5060",
            ]
        );
    }

    #[test]
    fn a_rule_for_authenticated_requests_only_is_skipped_for_others_and_local_is_a_target() {
        let r = routing(&[
            ("routing.rules.1", "9* pstn strip=1 auth"),
            (
                "routing.rules.2",
                "/ext-(\\d{4})@.*/ local replace=$1@example.com",
            ),
            ("zones.pstn.address", "198.18.1.50:5060"),
        ]);
        assert_eq!(
            steps(&r, "912345", "example.com", true),
            [step("1", "pstn", "12345@example.com")]
        );
        assert!(steps(&r, "912345", "example.com", false).is_empty());
        assert_eq!(
            r.plan("912345", "example.com", false).trace,
            [
                "Search rule 1 '9* pstn strip=1 auth': for authenticated requests only: skipped",
                "Search rule 2 '/ext-(\\d{4})@.*/ local replace=$1@example.com': does not match"
            ]
        );
        assert_eq!(
            steps(&r, "ext-1234", "Old.Example", false),
            [step("2", "local", "1234@example.com")]
        );
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
            r.plan("+15551234", "x", false).trace,
            [
                "Search rule 1 '+1* nowhere': matches, but zone nowhere has no address",
                "Search rule 2 '+1555* us': matches: to zone us at 198.18.1.30:5060",
            ]
        );
        assert_eq!(
            r.plan("+44", "x", false).trace.len(),
            3,
            "every rule tried, none took it"
        );
    }

    #[test]
    fn rules_are_checked_and_stored_in_one_spelling() {
        assert_eq!(canonical_rule("+4420*   London").unwrap(), "+4420* London");
        assert_eq!(
            canonical_rule("+44*  trunk  AUTH continue prepend=0 strip=3").unwrap(),
            "+44* trunk strip=3 prepend=0 continue auth"
        );
        assert_eq!(canonical_rule("/a b/ local").unwrap(), "/a b/ local");
        for bad in [
            "+44*20 london",
            "+44",
            "/(/ london",
            "+44* london strip=x",
            "+44* london replace=$1",
            "+44* london stop=1",
            "+44* london whatever",
            "+44* lon:don",
        ] {
            assert!(canonical_rule(bad).is_err(), "{bad}");
        }
        let long = format!("/{}/ z", "a".repeat(MAX_PATTERN));
        assert!(canonical_rule(&long).unwrap_err().contains("longer"));
    }

    #[test]
    fn a_rule_naming_a_zone_without_an_address_takes_nothing() {
        let r = routing(&[
            ("routing.rules.1", "+1* nowhere"),
            ("routing.rules.2", "+1* us"),
            ("zones.us.address", "198.18.1.30:5060"),
        ]);
        assert_eq!(
            steps(&r, "+15551234", "x", false),
            [step("2", "us", "+15551234@x")]
        );
    }
}
