//! `xstatus cluster` and `xstatus alarms`, laid out like the seed's Clustering page.

use std::fmt::Write as _;
use std::path::Path;

use causeway_cluster::ClusterStatus;
use causeway_common::time::utc_time;
use causeway_mesh::{CertStatus, Clustering};

pub fn cluster(socket: &Path, json: bool) -> anyhow::Result<()> {
    let value = causeway_admin::client::get_json(socket, "/api/v1/status/cluster")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let status: ClusterStatus = serde_json::from_value(value)?;
    print!("{}", render_cluster(&status));
    Ok(())
}

pub fn render_cluster(s: &ClusterStatus) -> String {
    let mut out = String::new();
    let row = |out: &mut String, k: &str, v: &dyn std::fmt::Display| {
        let _ = writeln!(out, "{k:<38}{v}");
    };
    let _ = writeln!(out, "Clustering");
    let _ = writeln!(out);
    let name = if s.cluster_name.is_empty() {
        "(not configured)"
    } else {
        &s.cluster_name
    };
    row(&mut out, "Cluster name (FQDN for Provisioning)", &name);
    row(&mut out, "Configuration primary", &s.configuration_primary);
    row(&mut out, "TLS verification mode", &s.tls_verification);
    row(&mut out, "Cluster IP version", &s.ip_version);
    if let Some(problem) = &s.problem {
        let _ = writeln!(out, "\n! Invalid clustering configuration: {problem}");
    }
    for p in &s.peers {
        let _ = writeln!(out);
        row(
            &mut out,
            &format!("Peer {} address", p.index),
            &format!("† {}", p.address),
        );
        let cert_mark = match p.certificate {
            CertStatus::Valid => "✓",
            CertStatus::Invalid(_) => "✗",
            CertStatus::Unknown => "?",
        };
        let clustering_mark = match p.clustering {
            Clustering::ThisSystem | Clustering::Active => "✓",
            Clustering::Failed(_) => "✗",
            Clustering::Unknown => "?",
        };
        let _ = writeln!(out, "    {cert_mark} Certificate: {}", p.certificate);
        let _ = writeln!(
            out,
            "    {clustering_mark} Clustering: {}",
            p.clustering_text()
        );
        if p.clustering != Clustering::ThisSystem {
            let rtt = p
                .rtt_ms
                .map(|r| format!("{r:.1} ms"))
                .unwrap_or_else(|| "-".into());
            let version = p.software_version.as_deref().unwrap_or("-");
            let contact = p
                .last_contact_ms
                .map(utc_time)
                .unwrap_or_else(|| "never".into());
            let _ = writeln!(
                out,
                "      Round trip: {rtt}   Software version: {version}   Last contact: {contact}"
            );
        }
    }
    out
}

pub fn alarms(socket: &Path, json: bool) -> anyhow::Result<()> {
    let value = causeway_admin::client::get_json(socket, "/api/v1/status/alarms")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let active = value["active"].as_array().cloned().unwrap_or_default();
    println!(
        "Alarms on {}: {} raised",
        value["system_name"].as_str().unwrap_or("?"),
        active.len()
    );
    for a in &active {
        let s = |k: &str| a[k].as_str().unwrap_or("").to_string();
        println!();
        println!(
            "{:<6} {:<9} {}  {}",
            a["id"],
            s("severity"),
            utc_time(a["raised_at_ms"].as_u64().unwrap_or(0)),
            s("title")
        );
        println!("       Subject: {}", s("subject"));
        println!("       Detail:  {}", s("detail"));
        println!("       Reason:  {}", s("reason"));
        println!("       Action:  {}", s("action"));
        println!("       UUID:    {}", s("uuid"));
    }
    let events = value["events"].as_array().cloned().unwrap_or_default();
    if !events.is_empty() {
        println!("\nRecent events");
        for e in events.iter().rev().take(20) {
            println!(
                "  {}  {:<13} Id=\"{}\" Subject=\"{}\"",
                utc_time(e["at_ms"].as_u64().unwrap_or(0)),
                e["event"].as_str().unwrap_or(""),
                e["id"],
                e["subject"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}
