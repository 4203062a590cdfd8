//! What the SIP service adds to the node's catalogues: its configuration items and its
//! alarms. The binary registers them at start whether or not this peer runs SIP (the
//! configuration primary checks every peer's items); the service registers them again
//! when it starts, which changes nothing.

use causeway_alarms::AlarmType;
use causeway_cluster::xconfig::{ItemDef, Kind};

/// How SIP requests from outside the cluster are authenticated (Expressway's zone
/// setting); see `docs/security.md`.
pub const AUTH_POLICIES: &[&str] = &[
    "Check credentials",
    "Do not check credentials",
    "Treat as authenticated",
];

/// How a neighbour zone is reached.
pub const ZONE_TRANSPORTS: &[&str] = &["UDP", "TCP", "TLS"];
/// A neighbour zone is reached at its own addresses; a DNS zone at whatever RFC 3263 finds
/// for the request's domain.
pub const ZONE_TYPES: &[&str] = &["Neighbour", "DNS"];

pub static ITEMS: &[ItemDef] = &[
    ItemDef {
        path: "sip.domains",
        kind: Kind::Domains,
        restart: false,
        about: "SIP domains this cluster is authoritative for",
        default: "",
    },
    ItemDef {
        path: "sip.users.<name>",
        kind: Kind::Secret,
        restart: false,
        about: "a SIP user's password (digest authentication)",
        default: "",
    },
    ItemDef {
        path: "sip.authentication.policy",
        kind: Kind::Choice(AUTH_POLICIES),
        restart: false,
        about: "requests other than REGISTER from outside the cluster: Check credentials (407 challenge), Do not check credentials, or Treat as authenticated",
        default: "Do not check credentials",
    },
    ItemDef {
        path: "sip.authentication.window_s",
        kind: Kind::Limit,
        restart: false,
        about: "seconds over which failed SIP authentications are counted per source and per user",
        default: "60",
    },
    ItemDef {
        path: "sip.authentication.slow_after",
        kind: Kind::Limit,
        restart: false,
        about: "failures from one source in the window after which its answers are delayed (0: never)",
        default: "5",
    },
    ItemDef {
        path: "sip.authentication.block_after",
        kind: Kind::Limit,
        restart: false,
        about: "failures from one source in the window after which it is refused unchecked (0: never)",
        default: "20",
    },
    ItemDef {
        path: "sip.authentication.block_s",
        kind: Kind::Limit,
        restart: false,
        about: "seconds a source stays blocked",
        default: "600",
    },
    ItemDef {
        path: "sip.authentication.alarm_after",
        kind: Kind::Limit,
        restart: false,
        about: "failures for one user in the window, from any source, that raise alarm 40001 (0: never)",
        default: "50",
    },
    ItemDef {
        path: "zones.<name>.address",
        kind: Kind::HostPort,
        restart: false,
        about: "a neighbour zone's SIP address",
        default: "",
    },
    ItemDef {
        path: "zones.<name>.authentication_policy",
        kind: Kind::Choice(AUTH_POLICIES),
        restart: false,
        about: "requests from this neighbour zone (a source at the IP of its address): Check credentials, Do not check credentials, or Treat as authenticated; unset: sip.authentication.policy",
        default: "",
    },
    ItemDef {
        path: "zones.<name>.transport",
        kind: Kind::Choice(ZONE_TRANSPORTS),
        restart: false,
        about: "how a neighbour zone is reached: UDP, TCP or TLS (unset: UDP)",
        default: "",
    },
    ItemDef {
        path: "zones.<name>.type",
        kind: Kind::Choice(ZONE_TYPES),
        restart: false,
        about: "Neighbour (reached at zones.<name>.address) or DNS (the request's domain resolved by RFC 3263: NAPTR, SRV, A/AAAA); unset: Neighbour",
        default: "",
    },
    ItemDef {
        path: "zones.<name>.username",
        kind: Kind::Checked {
            what: "a username",
            check: crate::routing::canonical_username,
        },
        restart: false,
        about: "the username this cluster answers a neighbour zone's digest challenge with (with zones.<name>.password)",
        default: "",
    },
    ItemDef {
        path: "zones.<name>.password",
        kind: Kind::Secret,
        restart: false,
        about: "the password this cluster answers a neighbour zone's digest challenge with",
        default: "",
    },
    ItemDef {
        path: "routing.rules.<name>",
        kind: Kind::Checked {
            what: "rule: <pattern> <zone|local> [strip=N] [prepend=X] [replace=T] [continue] [auth]",
            check: crate::routing::canonical_rule,
        },
        restart: false,
        about: "a search rule: a destination pattern (user, or user@host; a trailing * for a prefix, /…/ for a regular expression), the target (a zone, or local), and options: strip=N, prepend=TEXT, replace=TEMPLATE ($1… of a regex), continue (try the next rules when the target cannot take it), auth (authenticated requests only); applied in name order (numbers as numbers) to requests no binding of this cluster takes",
        default: "",
    },
    ItemDef {
        path: "limits.calls.max",
        kind: Kind::Limit,
        restart: false,
        about: "concurrent calls across the cluster (0: no limit)",
        default: "0",
    },
    ItemDef {
        path: "limits.bandwidth.total_kbps",
        kind: Kind::Limit,
        restart: false,
        about: "total call bandwidth across the cluster, kbit/s (0: no limit)",
        default: "0",
    },
    ItemDef {
        path: "limits.bandwidth.per_call_kbps",
        kind: Kind::Limit,
        restart: false,
        about: "bandwidth of one call, kbit/s (0: no limit)",
        default: "0",
    },
];

pub static ALARMS: &[AlarmType] = &[
    causeway_alarms::alarm!(30012, "ca05e0a1-0000-4000-8000-000000030012", Warning, "Licences of a lost peer",
        "The licences of a lost cluster peer will be removed from the pool after the grace period",
        "Bring the peer back, or remove it from the cluster"),
    causeway_alarms::alarm!(30013, "ca05e0a1-0000-4000-8000-000000030013", Warning, "Licences of a lost peer",
        "Call licences of a lost cluster peer will be removed from the pool after the grace period",
        "Bring the peer back, or remove it from the cluster"),
    causeway_alarms::alarm!(30014, "ca05e0a1-0000-4000-8000-000000030014", Warning, "Licences of a lost peer",
        "Registration licences of a lost cluster peer will be removed from the pool after the grace period",
        "Bring the peer back, or remove it from the cluster"),
    causeway_alarms::alarm!(30015, "ca05e0a1-0000-4000-8000-000000030015", Warning, "Licences of a lost peer removed",
        "The licences of a lost cluster peer have been removed from the pool",
        "Bring the peer back, or remove it from the cluster"),
    causeway_alarms::alarm!(30016, "ca05e0a1-0000-4000-8000-000000030016", Warning, "Licences of a lost peer removed",
        "Call licences of a lost cluster peer have been removed from the pool",
        "Bring the peer back, or remove it from the cluster"),
    causeway_alarms::alarm!(30017, "ca05e0a1-0000-4000-8000-000000030017", Warning, "Licences of a lost peer removed",
        "Registration licences of a lost cluster peer have been removed from the pool",
        "Bring the peer back, or remove it from the cluster"),
    causeway_alarms::alarm!(30020, "ca05e0a1-0000-4000-8000-000000030020", Warning, "Neighbour zone unreachable",
        "Neighbour zone unreachable: no address of a neighbour zone answers the OPTIONS keep-alive from this peer; calls the search rules send there fail with 503",
        "Check the neighbour system and the network path from this peer to the addresses named in the reason; the alarm clears at the first answer"),
    causeway_alarms::alarm!(40001, "ca05e0a1-0000-4000-8000-000000040001", Warning, "SIP authentication failures",
        "Many failed SIP authentications: a source address has been blocked, or a user's password is being guessed from several addresses",
        "Check the source (firewall it if it is not one of yours) and the strength of the user's password; the alarm clears by itself once the failures stop"),
];

/// Adds SIP's items and alarms to the node's catalogues (idempotent).
pub fn register() {
    // Only a clash of IDs or paths between compiled-in catalogues can fail: a
    // programming error the tests below catch.
    if let Err(e) = causeway_cluster::xconfig::register(ITEMS) {
        tracing::error!(target: "developer.sip", reason = %e, "SIP configuration items not registered");
    }
    if let Err(e) = causeway_alarms::register(ALARMS) {
        tracing::error!(target: "developer.sip", reason = %e, "SIP alarms not registered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sips_items_and_alarms_join_the_catalogues_once_and_are_checked_there() {
        assert!(causeway_cluster::xconfig::register(ITEMS).is_ok());
        assert!(causeway_alarms::register(ALARMS).is_ok());
        assert!(
            causeway_cluster::xconfig::register(ITEMS).is_ok(),
            "again: no change"
        );
        assert_eq!(causeway_alarms::lookup(40001).map(|a| a.id), Some(40001));
        let canonical = causeway_cluster::xconfig::canonical;
        assert_eq!(
            canonical("sip.authentication.policy", Some("check")).unwrap(),
            Some("Check credentials".into())
        );
        assert_eq!(
            canonical("sip.authentication.policy", Some("treat_as_authenticated")).unwrap(),
            Some("Treat as authenticated".into())
        );
        let e = canonical("sip.authentication.policy", Some("maybe")).unwrap_err();
        assert!(
            e.starts_with("sip.authentication.policy:") && e.contains("'Check credentials'"),
            "{e}"
        );
        assert!(canonical("limits.calls.max", Some("-1"))
            .unwrap_err()
            .starts_with("limits.calls.max:"));
    }
}
