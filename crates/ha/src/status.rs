//! `gethainfo` and `getserverinfo` in the seed's layout (docs/ha.md, section 10), from the
//! service's status JSON. Causeway's own lines, which the seed has not, end with ` *`.

use serde_json::Value;

const RULE: &str = "----------------------------------------------------------------------------";

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// The mean heartbeat response time as the seed prints it: `0.4 millisec` under 10 ms,
/// whole milliseconds above.
pub fn mean_rtt(ms: Option<f64>) -> String {
    match ms {
        None => "-".into(),
        Some(m) if m < 10.0 => format!("{m:.1} millisec"),
        Some(m) => format!("{} millisec", m.round() as u64),
    }
}

fn seconds(ms: u64) -> String {
    let s = format!("{:.2}", ms as f64 / 1000.0);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// `gethainfo`.
pub fn gethainfo(status: &Value) -> String {
    let mut out = String::new();
    let mut line = |l: String| {
        out.push_str(&l);
        out.push('\n');
    };
    if status.get("running").and_then(Value::as_bool) == Some(true) {
        line("Health Monitor is running. Retrieving HA related information".into());
    } else {
        line("Health Monitor is not running. Following information is from the last saved configuration".into());
    }
    let pairs: Vec<&Value> = status
        .get("pairs")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let role = s(status, "role");
    let is_secondary = role == "Secondary";
    line(RULE.into());
    line("Base high availability configuration for this server".into());
    line(RULE.into());
    line(format!(
        "Server role: {}",
        if role.is_empty() { "Witness" } else { role }
    ));
    line(format!(
        "Health Monitor IP Address: {}",
        s(status, "health_monitor_address")
    ));
    let own_vip = pairs
        .iter()
        .find(|p| s(p, "role") == "Primary")
        .map(|p| s(p, "virtual_ip").to_string());
    line(format!(
        "Virtual IP Address: {}",
        match (&own_vip, is_secondary) {
            (_, true) => "Not Applicable for a secondary".to_string(),
            (Some(v), _) => v.clone(),
            (None, _) => "None".to_string(),
        }
    ));
    line(format!("Version: {}", s(status, "version")));
    line(format!("UDI: causeway:{}", s(status, "system_name")));
    // A primary after `unpair` keeps its address but has no peer to show.
    let members: Vec<&&Value> = pairs
        .iter()
        .filter(|p| s(p, "role") != "Witness" && p["secondary"].as_u64() != Some(0))
        .collect();
    line(format!("Number of paired peers: {}", members.len()));
    for (n, p) in members.iter().enumerate() {
        let peer_is_primary = s(p, "role") == "Secondary";
        let (peer, peer_address) = if peer_is_primary {
            (p["primary"].as_u64().unwrap_or(0), s(p, "primary_address"))
        } else {
            (
                p["secondary"].as_u64().unwrap_or(0),
                s(p, "secondary_address"),
            )
        };
        let beat = p["heartbeats"].get(peer.to_string());
        let witness = p["witness"].as_u64().unwrap_or(0);
        let witness_beat = p["heartbeats"].get(witness.to_string());
        line(RULE.into());
        line(format!("Peer configuration#: {}", n + 1));
        line(RULE.into());
        // The seed's own line has no colon here.
        line(format!("Health Monitor IP Address {peer_address}"));
        line(format!(
            "Virtual IP Address: {}",
            if peer_is_primary {
                s(p, "virtual_ip")
            } else {
                "Not Applicable for a secondary"
            }
        ));
        line(format!("Version: {}", s(status, "version")));
        line(format!("Failover type: {}", s(p, "failover")));
        line(format!("Failback type: {}", s(p, "failback")));
        line(format!(
            "Failover wait time (seconds): {}",
            seconds(p["failover_wait_ms"].as_u64().unwrap_or(0))
        ));
        if witness == u64::MAX {
            line("Witness: the peer cluster (every other peer votes) *".into());
            line(format!(
                "Split brain protection: {} *",
                s(p, "split_brain_protection")
            ));
        } else if witness == 0 {
            line("Witness: none *".into());
            line(format!(
                "Split brain protection: none (no witness: a partition between primary and secondary can leave both holding {}) *",
                s(p, "virtual_ip")
            ));
        } else {
            line(format!(
                "Witness: Peer {witness} ({}), {} *",
                s(p, "witness_address"),
                witness_beat.map_or("Down", |b| s(b, "status"))
            ));
            line(format!(
                "Split brain protection: {} *",
                s(p, "split_brain_protection")
            ));
        }
        line(format!(
            "Lease generation: {} *",
            p["generation"]
                .as_u64()
                .map_or("-".into(), |g| g.to_string())
        ));
        let sync = &p["data_replication"];
        match sync["state"].as_str() {
            Some("Setting up") => line(format!(
                "Primary and secondary server synchronization in progress ({}% complete) *",
                sync["percent"].as_u64().unwrap_or(0)
            )),
            Some(state) => line(format!("Data replication: {state} *")),
            None => {}
        }
        let direct = &p["direct_connect"];
        let direct_used = direct["used"].as_bool() == Some(true);
        line(format!(
            "Direct connect used: {}",
            if direct_used { "Yes" } else { "No" }
        ));
        // Up when either path answers (docs/ha.md, section 8).
        let up = beat.is_some_and(|b| s(b, "status") == "Up") || direct["status"] == "Up";
        line(format!(
            "Heartbeat status: {}",
            if up { "Up" } else { "Down" }
        ));
        line(format!("Current state: {}", s(p, "state")));
    }
    let witnessed: Vec<&&Value> = pairs.iter().filter(|p| s(p, "role") == "Witness").collect();
    for p in witnessed {
        line(RULE.into());
        line(format!(
            "Witness of pair: Peer {} (primary) and Peer {} (secondary) *",
            p["primary"], p["secondary"]
        ));
        for who in ["primary", "secondary"] {
            let n = p[who].as_u64().unwrap_or(0);
            let b = p["heartbeats"].get(n.to_string());
            line(format!(
                "Heartbeat status of Peer {n}: {} ({}) *",
                b.map_or("Down", |b| s(b, "status")),
                b.and_then(|b| b.get("state"))
                    .and_then(Value::as_str)
                    .unwrap_or("unknown")
            ));
        }
    }
    out
}

/// `ha status`: the seed's "Current High Availability Status" page, then its events log
/// (newest first), per pair this node is a member of.
pub fn ha_status(status: &Value) -> String {
    let mut out = String::new();
    let pairs = status["pairs"].as_array().cloned().unwrap_or_default();
    for p in pairs.iter().filter(|p| s(p, "role") != "Witness") {
        let peer = if s(p, "role") == "Primary" {
            &p["secondary"]
        } else {
            &p["primary"]
        };
        let beat = p["heartbeats"].get(peer.to_string());
        let sync = &p["data_replication"];
        let state = s(p, "state");
        let status_line = match (state, sync["state"].as_str()) {
            ("SECONDARY_ALONE", Some("Setting up")) => format!(
                "Primary and secondary server synchronization in progress ({}% complete)",
                sync["percent"].as_u64().unwrap_or(0)
            ),
            ("TERMINATED", Some(s)) if s != "Up" => {
                "Primary instance is not synchronized with the secondary server. In progress."
                    .to_string()
            }
            ("FAILOVER_ACTIVE", _) => "Instance is in failover active state".into(),
            ("SECONDARY_ACTIVE", _)
                if !p["waiting_for"].as_str().unwrap_or("").is_empty()
                    && s(p, "waiting_for").starts_with("manual failover") =>
            {
                "Primary down: waiting for a manual failover".into()
            }
            (other, _) if other.ends_with("ACTIVE") => "Active".into(),
            (other, _) => other.to_string(),
        };
        let replication = match sync["state"].as_str() {
            Some("Setting up") => "Setting up",
            Some("Up") => "Up",
            _ => "Down",
        };
        out.push_str(&format!(
            "Pair of Peer {} ({} {})\n\nCurrent High Availability Status\n\n",
            p["pair"],
            s(p, "role"),
            state
        ));
        out.push_str(&format!("{:<30}{status_line}\n", "Status"));
        out.push_str(&format!(
            "{:<30}{}\n",
            "Heartbeats",
            beat.map_or("Down", |b| s(b, "status"))
        ));
        out.push_str(&format!("{:<30}{replication}\n", "Data Replication"));
        out.push_str(&format!(
            "{:<30}{}\n\nEvents Log\n\n",
            "Mean Heartbeat Response Time",
            mean_rtt(beat.and_then(|b| b["mean_rtt_ms"].as_f64()))
        ));
        out.push_str(&format!(
            "{:<58}{:<14}{:<28}{}\n",
            "Event Description", "Generated By", "Timestamp", "Remarks"
        ));
        for e in p["events"].as_array().cloned().unwrap_or_default() {
            out.push_str(&format!(
                "{:<58}{:<14}{:<28}{}\n",
                s(&e, "description"),
                s(&e, "generated_by"),
                causeway_common::time::mse_time(e["at_ms"].as_u64().unwrap_or(0)),
                s(&e, "remarks")
            ));
        }
        out.push('\n');
    }
    if out.is_empty() {
        out.push_str("This node is a member of no HA pair.\n");
    }
    out
}

/// `getserverinfo`: the seed's sections, with the SIP service in place of the seed's.
pub fn getserverinfo(status: &Value) -> String {
    let mut out = String::new();
    let pairs: Vec<&Value> = status
        .get("pairs")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let role = match s(status, "role") {
        "Primary" => "1",
        "Secondary" => "2",
        _ => "-",
    };
    out.push_str("Health Monitor is up\n");
    out.push_str(RULE);
    out.push_str("\nServer Config\n");
    out.push_str(RULE);
    out.push('\n');
    out.push_str(&format!("Server Name: {}\n", s(status, "system_name")));
    out.push_str(&format!("Version: {}\n", s(status, "version")));
    out.push_str(&format!("High Availability Role: {role}\n"));
    out.push_str(&format!(
        "Health Monitor Interface: {}\n",
        status["health_monitor_interface"].as_str().unwrap_or("-")
    ));
    out.push_str(RULE);
    out.push_str("\nServices\n");
    out.push_str(RULE);
    out.push('\n');
    let mut serving = false;
    for p in pairs.iter().filter(|p| s(p, "role") != "Witness") {
        let up = p["vip_held"].as_bool() == Some(true);
        serving |= up;
        out.push_str(&format!(
            "Service Name: SIP (instance of Peer {}, {})\nAdmin Status: Enabled\nOperation Status: {}\n",
            p["primary"],
            s(p, "virtual_ip"),
            if up { "Up" } else { "Down" }
        ));
    }
    if !serving && role == "2" {
        out.push_str("Causeway services are up and in DORMANT mode\n");
    }
    out.push_str(RULE);
    out.push_str("\nServer Monitor\n");
    out.push_str(RULE);
    out.push('\n');
    for p in &pairs {
        out.push_str(&format!(
            "Pair of Peer {}: {} (lease holder: {})\n",
            p["primary"],
            p["state"].as_str().unwrap_or("witness"),
            s(p, "holder")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn primary_status() -> Value {
        json!({
            "running": true, "role": "Primary", "health_monitor_address": "198.18.0.11",
            "health_monitor_interface": "eth0", "system_name": "cwha-p", "version": "0.1.0", "me": 1,
            "pairs": [{
                "pair": 1, "role": "Primary", "primary": 1, "secondary": 2, "witness": 3,
                "primary_address": "198.18.0.11", "secondary_address": "198.18.0.12",
                "witness_address": "198.18.0.13", "state": "PRIMARY_ACTIVE",
                "virtual_ip": "198.18.0.10", "failover": "Automatic", "failback": "Manual",
                "failover_wait_ms": 160, "generation": 7, "split_brain_protection": "witness",
                "vip_held": true, "holder": "this peer (generation 7)",
                "data_replication": {"state": "Up", "percent": 100},
                "heartbeats": {"2": {"status": "Up", "mean_rtt_ms": 0.4}, "3": {"status": "Up"}}
            }]
        })
    }

    #[test]
    fn gethainfo_has_the_seeds_layout() {
        let text = gethainfo(&primary_status());
        let want = "\
Health Monitor is running. Retrieving HA related information
----------------------------------------------------------------------------
Base high availability configuration for this server
----------------------------------------------------------------------------
Server role: Primary
Health Monitor IP Address: 198.18.0.11
Virtual IP Address: 198.18.0.10
Version: 0.1.0
UDI: causeway:cwha-p
Number of paired peers: 1
----------------------------------------------------------------------------
Peer configuration#: 1
----------------------------------------------------------------------------
Health Monitor IP Address 198.18.0.12
Virtual IP Address: Not Applicable for a secondary
Version: 0.1.0
Failover type: Automatic
Failback type: Manual
Failover wait time (seconds): 0.16
Witness: Peer 3 (198.18.0.13), Up *
Split brain protection: witness *
Lease generation: 7 *
Data replication: Up *
Direct connect used: No
Heartbeat status: Up
Current state: PRIMARY_ACTIVE
";
        assert_eq!(text, want);
    }

    #[test]
    fn a_secondary_has_no_virtual_ip_of_its_own_and_says_dormant_when_serving_nothing() {
        let mut st = primary_status();
        st["role"] = json!("Secondary");
        st["pairs"][0]["role"] = json!("Secondary");
        st["pairs"][0]["vip_held"] = json!(false);
        let text = gethainfo(&st);
        assert!(text.contains("Virtual IP Address: Not Applicable for a secondary\n"));
        assert!(text
            .contains("Health Monitor IP Address 198.18.0.11\nVirtual IP Address: 198.18.0.10\n"));
        st["pairs"][0]["data_replication"] = json!({"state": "Setting up", "percent": 66});
        assert!(gethainfo(&st).contains(
            "Primary and secondary server synchronization in progress (66% complete) *\n"
        ));
        let info = getserverinfo(&st);
        assert!(info.contains("High Availability Role: 2"));
        assert!(info.contains("DORMANT mode"));
    }

    #[test]
    fn ha_status_is_the_seeds_prime_page_with_its_events_log() {
        let mut st = primary_status();
        st["pairs"][0]["events"] = json!([
            {"description": "Active", "generated_by": "Primary", "at_ms": 1_796_120_102_000u64,
             "remarks": "GRACEFUL_SHUTDOWN → PRIMARY_ACTIVE"}
        ]);
        let text = ha_status(&st);
        assert!(
            text.contains(
                "Current High Availability Status\n\nStatus                        Active\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("Heartbeats                    Up\n"),
            "{text}"
        );
        assert!(
            text.contains("Data Replication              Up\n"),
            "{text}"
        );
        assert!(
            text.contains("Mean Heartbeat Response Time  0.4 millisec\n"),
            "{text}"
        );
        assert!(text.contains("Event Description"), "{text}");
        assert!(text.contains("Active"), "{text}");
        assert!(text.contains("2026-Dec-01, 10:15:02 UTC"), "{text}");
        st["pairs"][0]["state"] = json!("FAILOVER_ACTIVE");
        assert!(ha_status(&st).contains("Instance is in failover active state"));
    }

    #[test]
    fn the_mean_response_time_is_printed_as_the_seed_does() {
        assert_eq!(mean_rtt(Some(0.43)), "0.4 millisec");
        assert_eq!(mean_rtt(Some(12.4)), "12 millisec");
        assert_eq!(seconds(160), "0.16");
        assert_eq!(seconds(10_000), "10");
    }
}
