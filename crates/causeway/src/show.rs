//! `xstatus cluster` and `xstatus alarms`, laid out like the seed's Clustering page.

use std::fmt::Write as _;
use std::path::Path;

use causeway_cluster::{ClusterStatus, ConfigItem};
use causeway_common::time::utc_time;
use causeway_mesh::{CertStatus, Clustering};
use causeway_replication::ReplicationStatus;
use serde_json::json;

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
    if let Some(banner) = &s.banner {
        let _ = writeln!(out, "!!! {banner}\n");
    }
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
    row(&mut out, "Cluster port", &s.port);
    if let Some(problem) = &s.problem {
        let _ = writeln!(out, "\n! Invalid clustering configuration: {problem}");
    }
    if let Some(r) = &s.replication {
        let _ = writeln!(out);
        out.push_str(&render_replication(r));
    }
    for l in &s.leases {
        let holder = match (l.holder, l.generation) {
            (Some(h), Some(g)) if l.held_here => format!("Peer {h} (this system), generation {g}"),
            (Some(h), Some(g)) => format!("Peer {h}, generation {g}"),
            _ => "none (election in progress or no majority reachable)".to_string(),
        };
        row(&mut out, &format!("Lease {} holder", l.name), &holder);
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
    let peers: Vec<causeway_cluster::PeerAlarm> =
        serde_json::from_value(value["peers"].clone()).unwrap_or_default();
    if !peers.is_empty() {
        println!("\nAlarms on the other peers: {} raised", peers.len());
        for a in &peers {
            let note = if a.reachable {
                ""
            } else {
                "  (unreachable: as last reported)"
            };
            println!(
                "  Peer {}  {:<6} {:<9} {}  {}{note}",
                a.peer,
                a.id,
                a.severity,
                utc_time(a.raised_at_ms),
                a.title
            );
            println!("         Subject: {}   Reason: {}", a.subject, a.reason);
        }
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

fn render_replication(r: &ReplicationStatus) -> String {
    let mut out = String::new();
    let when = |t: Option<u64>| t.map(utc_time).unwrap_or_else(|| "-".into());
    let _ = writeln!(
        out,
        "{:<38}{}",
        "Cluster database status", r.database_status
    );
    let _ = writeln!(
        out,
        "{:<38}{} (generation {}, digest {}, {} items)",
        "Configuration revision", r.revision, r.generation, r.digest, r.records
    );
    let _ = writeln!(out, "{:<38}{}", "Last check", when(r.last_check_unix_ms));
    let _ = writeln!(out, "{:<38}{}", "Next check", when(r.next_check_unix_ms));
    let _ = writeln!(
        out,
        "{:<38}{}",
        "Last synchronisation",
        when(r.last_synchronisation_unix_ms)
    );
    for p in &r.peers {
        let _ = writeln!(
            out,
            "  Peer {}: {:<28} revision {}   digest {}   primary {}",
            p.index,
            p.state,
            p.revision
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into()),
            p.digest.as_deref().unwrap_or("-"),
            p.primary
                .map(|v| format!("Peer {v}"))
                .unwrap_or_else(|| "-".into()),
        );
    }
    if r.rejected_messages > 0 {
        let _ = writeln!(
            out,
            "  Rejected replication messages: {}",
            r.rejected_messages
        );
    }
    out
}

pub fn configuration(socket: &Path, path: Option<String>, json: bool) -> anyhow::Result<()> {
    let value = causeway_admin::client::get_json(socket, "/api/v1/configuration")?;
    let items: Vec<ConfigItem> = serde_json::from_value(value["items"].clone())?;
    let selected: Vec<&ConfigItem> = match &path {
        None => items.iter().collect(),
        Some(p) => items
            .iter()
            .filter(|i| i.path == *p || i.path.starts_with(&format!("{p}.")))
            .collect(),
    };
    if selected.is_empty() {
        anyhow::bail!(
            "{}: no such configuration item (run `causeway xconfiguration get` for the list)",
            path.unwrap_or_default()
        );
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&selected)?);
        return Ok(());
    }
    // One item asked for by its exact path: its value alone, for scripts.
    if let (Some(p), [item]) = (&path, selected.as_slice()) {
        if item.path == *p {
            println!("{}", item.value);
            return Ok(());
        }
    }
    print!(
        "{}",
        render_configuration(value["system_name"].as_str().unwrap_or("?"), &selected)
    );
    Ok(())
}

/// `xconfiguration get [PATH]` as a table: the † mark, then the key in a column as wide as
/// the longest key shown plus two spaces, then the value (and a pending value, if any).
pub fn render_configuration(system_name: &str, items: &[&ConfigItem]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Configuration of {system_name} († peer-specific: set on each peer)"
    );
    let _ = writeln!(out);
    let width = items
        .iter()
        .map(|i| i.path.chars().count())
        .max()
        .unwrap_or(0)
        + 2;
    for i in items {
        let mark = if i.peer_specific { "†" } else { " " };
        let pending = i
            .pending
            .as_deref()
            .map(|p| format!("   (set to '{p}': restart required)"))
            .unwrap_or_default();
        let line = format!("{mark} {:<width$}{}{pending}", i.path, i.value);
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

pub fn set_configuration(
    socket: &Path,
    path: &str,
    value: Option<&str>,
    force: bool,
) -> anyhow::Result<()> {
    let out = causeway_admin::client::post_json(
        socket,
        "/api/v1/configuration",
        &json!({ "path": path, "value": value, "force": force }),
    )?;
    let shown = out["value"].as_str().unwrap_or("");
    match (out["revision"].as_u64(), out["confirmed"].as_array()) {
        (Some(rev), Some(c)) => {
            let (n, of) = (c[0].as_u64().unwrap_or(0), c[1].as_u64().unwrap_or(0));
            println!("{path}: {shown} (revision {rev}, held by {n} of {of} peers)");
            if n * 2 <= of {
                println!("warning: not yet on a majority of peers: the others take it when they are back");
            }
        }
        _ => println!("{path}: {shown}"),
    }
    if let Some(w) = out["warning"].as_str() {
        println!("!!! {w}");
    }
    if out["restart_required"].as_bool() == Some(true) {
        println!("Restart required (alarm 20007): the change takes effect when this peer restarts");
    }
    Ok(())
}

pub fn force_config_update(socket: &Path) -> anyhow::Result<()> {
    let out =
        causeway_admin::client::post_json(socket, "/api/v1/command/forceconfigupdate", &json!({}))?;
    let r: ReplicationStatus = serde_json::from_value(out)?;
    println!("ForceConfigUpdate: this peer now holds the primary's configuration");
    print!("{}", render_replication(&r));
    Ok(())
}

pub fn set_primary(socket: &Path, peer: usize) -> anyhow::Result<()> {
    let out = causeway_admin::client::post_json(
        socket,
        "/api/v1/command/setprimary",
        &json!({ "peer": peer }),
    )?;
    let r: ReplicationStatus = serde_json::from_value(out)?;
    println!(
        "SetPrimary: Peer {peer} is the configuration primary (epoch {})",
        r.epoch
    );
    print!("{}", render_replication(&r));
    Ok(())
}

pub fn backup(socket: &Path, out: &Path, passphrase_file: &Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use causeway_cluster::backup;
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    // Checked here too, so a short passphrase is refused before the node does any work.
    let passphrase = backup::read_passphrase_file(passphrase_file)
        .and_then(|p| backup::check_passphrase(&p).map(|_| p))
        .map_err(anyhow::Error::msg)?;
    let value = causeway_admin::client::post_json(
        socket,
        "/api/v1/backup",
        &json!({ "passphrase": passphrase }),
    )?;
    let taken: backup::Backup = serde_json::from_value(value)
        .context("reading the node's answer: is the node the same version as this command?")?;
    let text = serde_json::to_string_pretty(&taken)?;
    // Written 0600 from the first byte (it holds every secret, sealed), then renamed into
    // place: a crash leaves the old file or the new one, never half of one.
    let tmp = out.with_extension("partial");
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(text.as_bytes())?;
            f.sync_all()
        })
        .and_then(|_| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)))
        .and_then(|_| std::fs::rename(&tmp, out))
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "Backup of {}: {} cluster data rows and {} written to {}, sealed with the passphrase in {}",
        taken.system_name,
        taken.rows,
        taken.config_path.display(),
        out.display(),
        passphrase_file.display()
    );
    println!("Keep the passphrase apart from the backup: the backup restores on any machine with it, and without it on none.");
    Ok(())
}

pub fn restore(data_dir: &Path, file: &Path, passphrase_file: Option<&Path>) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use causeway_cluster::backup::{self, BackupFile};
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let found = BackupFile::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let passphrase = passphrase_file
        .map(backup::read_passphrase_file)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let done = backup::restore(data_dir, &found, passphrase.as_deref()).map_err(|e| {
        anyhow::anyhow!(
            "restoring {} into {}: {e}",
            file.display(),
            data_dir.display()
        )
    })?;
    println!(
        "Restored {} cluster data rows and {} from the backup of {} ({})",
        done.rows,
        done.config_path.display(),
        found.system_name(),
        found.format()
    );
    if let Some(kept) = &done.previous_config {
        println!("The file it replaced is kept as {}", kept.display());
    }
    if let Some(key) = &done.created_system_key {
        println!(
            "Made a new system key {}: the cluster data is sealed with it",
            key.display()
        );
    }
    if let Some(store) = &done.created_store {
        println!("Made a new store {}", store.display());
    }
    if !done.missing_identity.is_empty() {
        let missing: Vec<String> = done
            .missing_identity
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        println!(
            "The node needs {} before it starts (certificates and keys are not in a backup): copy them from the old machine, or make new ones with `causeway pki csr` and `causeway pki sign`",
            missing.join(", ")
        );
    }
    println!("Start the node: peers holding newer configuration bring it up to date.");
    Ok(())
}

pub fn purge(data_dir: &Path, confirm: bool) -> anyhow::Result<()> {
    if !confirm {
        anyhow::bail!(
            "this destroys the cluster data of the node in {} (its file, certificates and admin accounts stay): run again with --confirm",
            data_dir.display()
        );
    }
    let rows = causeway_cluster::backup::purge(data_dir).map_err(anyhow::Error::msg)?;
    println!(
        "Purged {rows} cluster data rows in {}: start the node and it rejoins, taking the configuration from the primary",
        data_dir.display()
    );
    Ok(())
}

/// `xcommand Locate <alias>`: the steps, then where it ends.
pub fn locate(socket: &Path, alias: &str, authenticated: bool) -> anyhow::Result<()> {
    let out = causeway_admin::client::post_json(
        socket,
        "/api/v1/command/locate",
        &json!({ "alias": alias, "authenticated": authenticated }),
    )
    .map_err(|e| {
        if e.to_string().contains("404") {
            anyhow::anyhow!("this node runs no SIP service: Locate needs a [sip] section")
        } else {
            e
        }
    })?;
    let located: causeway_sipserver::status::Located = serde_json::from_value(out)?;
    println!("Locate {}", located.alias);
    for (i, step) in located.steps.iter().enumerate() {
        println!("  {}. {step}", i + 1);
    }
    println!("{}", located.result);
    Ok(())
}

/// A command whose answer is one line of text.
pub fn simple_command(socket: &Path, route: &str, name: &str) -> anyhow::Result<()> {
    let out =
        causeway_admin::client::post_json(socket, &format!("/api/v1/command/{route}"), &json!({}))?;
    println!("{name}: {}", out["result"].as_str().unwrap_or("done"));
    Ok(())
}

/// `database cluster …`: `status` is read, every other command is sent as its words.
pub fn database_cluster(socket: &Path, words: &[String], json: bool) -> anyhow::Result<()> {
    let no_service = |e: anyhow::Error| {
        if e.to_string().contains("404") {
            anyhow::anyhow!(
                "this node runs no database cluster service: add a [database] section to its file and restart it"
            )
        } else {
            e
        }
    };
    if words == ["status"] {
        let value = causeway_admin::client::get_json(socket, "/api/v1/dbcluster/status")
            .map_err(no_service)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&value["status"])?);
        } else {
            print!("{}", value["text"].as_str().unwrap_or_default());
        }
        return Ok(());
    }
    let out = causeway_admin::client::post_json(
        socket,
        "/api/v1/dbcluster/command",
        &json!({ "words": words }),
    )
    .map_err(no_service)?;
    println!("{}", out["message"].as_str().unwrap_or("done"));
    Ok(())
}

fn sip_status(socket: &Path, path: &str, json: bool) -> anyhow::Result<Option<serde_json::Value>> {
    let value = causeway_admin::client::get_json(socket, path).map_err(|e| {
        if e.to_string().contains("404") {
            anyhow::anyhow!(
                "this peer runs no SIP service: add a [sip] section to its file and restart it"
            )
        } else {
            e
        }
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(None);
    }
    Ok(Some(value))
}

pub fn registrations(socket: &Path, json: bool) -> anyhow::Result<()> {
    let Some(value) = sip_status(socket, "/api/v1/status/registrations", json)? else {
        return Ok(());
    };
    let s: causeway_sipserver::status::RegistrationsStatus = serde_json::from_value(value)?;
    print!("{}", render_registrations(&s));
    Ok(())
}

pub fn zones(socket: &Path, json: bool) -> anyhow::Result<()> {
    let Some(value) = sip_status(socket, "/api/v1/status/zones", json)? else {
        return Ok(());
    };
    let s: causeway_sipserver::status::ZonesStatus = serde_json::from_value(value)?;
    print!("{}", render_zones(&s));
    Ok(())
}

pub fn render_zones(s: &causeway_sipserver::status::ZonesStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Neighbour zones (as seen by Peer {})", s.peer);
    if s.zones.is_empty() {
        let _ = writeln!(out, "  none: set zones.<name>.address");
    }
    for z in &s.zones {
        let state = if z.up { "Up" } else { "Down" };
        let _ = writeln!(out, "\n  {}  ({})  {state}", z.name, z.transport);
        for a in &z.addresses {
            let resolved = match &a.resolved {
                Some(r) if *r != a.address => format!(" ({r})"),
                _ => String::new(),
            };
            let _ = writeln!(out, "    {}{resolved}  {}", a.address, a.state);
        }
        if z.rules.is_empty() {
            let _ = writeln!(out, "    Search rules: none sends requests here");
        } else {
            let _ = writeln!(out, "    Search rules: {}", z.rules.join(", "));
        }
    }
    out
}

pub fn render_registrations(s: &causeway_sipserver::status::RegistrationsStatus) -> String {
    let mut out = String::new();
    let per_peer: Vec<String> = s
        .per_peer
        .iter()
        .map(|(p, n)| format!("Peer {p}: {n}"))
        .collect();
    let _ = writeln!(out, "Registrations (as seen by Peer {})", s.peer);
    let _ = writeln!(
        out,
        "  AORs: {}  Bindings: {}  ({})",
        s.aors,
        s.bindings,
        if per_peer.is_empty() {
            "none".to_string()
        } else {
            per_peer.join(", ")
        }
    );
    if s.licences > 0 {
        let _ = writeln!(
            out,
            "  Registration licences: {} of {} in use (cluster pool)",
            s.aors, s.licences
        );
    }
    if !s.rows.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "  {:<36} {:<44} {:>7} {:<5} {:<4} Received from",
            "AOR", "Contact", "Expires", "Peer", "Via"
        );
        for r in &s.rows {
            let _ = writeln!(
                out,
                "  {:<36} {:<44} {:>6}s {:<5} {:<4} {}",
                r.aor, r.contact, r.expires_in_s, r.peer, r.transport, r.received
            );
        }
        if s.rows.len() < s.bindings {
            let _ = writeln!(
                out,
                "  … {} more (use --json for the first 10,000)",
                s.bindings - s.rows.len()
            );
        }
    }
    out
}

pub fn services(socket: &Path, json: bool) -> anyhow::Result<()> {
    let value = causeway_admin::client::get_json(socket, "/api/v1/status/services")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let Some(services) = value.as_object().filter(|s| !s.is_empty()) else {
        println!("No services are configured on this node");
        return Ok(());
    };
    for (name, status) in services {
        println!("{name}");
        if let Some(fields) = status.as_object() {
            for (k, v) in fields {
                println!("  {k:<20}{v}");
            }
        }
    }
    Ok(())
}

pub fn calls(socket: &Path, json: bool) -> anyhow::Result<()> {
    let Some(value) = sip_status(socket, "/api/v1/status/calls", json)? else {
        return Ok(());
    };
    let s: causeway_sipserver::status::CallsStatus = serde_json::from_value(value)?;
    let limit = |n: u64| {
        if n == 0 {
            "no limit".to_string()
        } else {
            n.to_string()
        }
    };
    println!("Calls (as seen by Peer {})", s.peer);
    println!(
        "  Cluster: {} calls of {}, {} kbps of {}",
        s.calls,
        limit(s.calls_max),
        s.kbps,
        limit(s.bandwidth_total_kbps)
    );
    if s.licences > 0 {
        println!(
            "  Call licences: {} of {} in use (cluster pool)",
            s.calls, s.licences
        );
    }
    for (p, n, k) in &s.per_peer {
        println!("  Peer {p}: {n} calls, {k} kbps");
    }
    if !s.rows.is_empty() {
        println!();
        println!(
            "  {:<5} {:>8} {:<32} {:<32} Call",
            "Peer", "Duration", "From", "To"
        );
        for r in &s.rows {
            println!(
                "  {:<5} {:>7}s {:<32} {:<32} {}",
                r.peer, r.duration_s, r.from, r.to, r.call
            );
        }
    }
    Ok(())
}

/// `gethainfo` / `getserverinfo` (`which`), or `ha status --json`. With the node down,
/// `gethainfo` says so and shows the state each pair was left in, as the seed does.
pub fn ha_info(socket: &Path, data_dir: &Path, which: &str, json: bool) -> anyhow::Result<()> {
    match causeway_admin::client::get_json(socket, "/api/v1/ha/status") {
        Ok(value) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&value["status"])?);
            } else {
                print!("{}", value[which].as_str().unwrap_or_default());
            }
            Ok(())
        }
        Err(e) if e.to_string().contains("404") => Err(anyhow::anyhow!(
            "this node runs no HA service: it needs the peer cluster (cluster.peers)"
        )),
        Err(e) => {
            if which != "gethainfo" {
                println!("Health Monitor is not running");
                return Err(e);
            }
            println!("Health Monitor is not running. Following information is from the last saved configuration");
            let mut found = false;
            if let Ok(dir) = std::fs::read_dir(data_dir.join("ha")) {
                let mut files: Vec<_> = dir.filter_map(Result::ok).map(|e| e.path()).collect();
                files.sort();
                for f in files {
                    let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                    let Some(pair) = name
                        .strip_prefix("state-")
                        .and_then(|n| n.strip_suffix(".json"))
                    else {
                        continue;
                    };
                    let v: serde_json::Value = std::fs::read(&f)
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or_default();
                    found = true;
                    println!(
                        "Pair of Peer {pair}: Last shutdown state: {} ({})",
                        v["state"].as_str().unwrap_or("unknown"),
                        v["at"].as_str().unwrap_or("")
                    );
                }
            }
            if !found {
                println!("No HA state saved in {}", data_dir.join("ha").display());
            }
            Ok(())
        }
    }
}

/// `ha switchover|failover|failback|unpair|configure … [--pair N] [--force]`.
pub fn ha_command(
    socket: &Path,
    words: &[String],
    pair: Option<usize>,
    force: bool,
) -> anyhow::Result<()> {
    let out = causeway_admin::client::post_json(
        socket,
        "/api/v1/ha/command",
        &json!({ "words": words, "pair": pair, "force": force }),
    )?;
    println!("{}", out["message"].as_str().unwrap_or("done"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(path: &str, value: &str, peer_specific: bool, pending: Option<&str>) -> ConfigItem {
        ConfigItem {
            path: path.into(),
            value: value.into(),
            peer_specific,
            restart_required: peer_specific,
            pending: pending.map(String::from),
            about: String::new(),
            kind: String::new(),
            choices: Vec::new(),
        }
    }

    #[test]
    fn configuration_keys_are_a_column_as_wide_as_the_longest_plus_two() {
        let long = "cluster.address_mapping.peer3-replacement.lab.example";
        let items = [
            item("sip.domains", "example.com", false, None),
            item(long, "10.0.0.3", false, None),
            item("system.name", "peer1", true, Some("peer-one")),
        ];
        let refs: Vec<&ConfigItem> = items.iter().collect();
        let text = render_configuration("peer1", &refs);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "Configuration of peer1 († peer-specific: set on each peer)"
        );
        assert_eq!(lines[1], "");
        let column = long.len() + 2;
        let rows = &lines[2..];
        assert_eq!(rows.len(), 3, "{text}");
        // Every value starts in the same column, after the mark, a space and the key column.
        for (row, (key, value)) in rows.iter().zip([
            ("sip.domains", "example.com"),
            (long, "10.0.0.3"),
            ("system.name", "peer1"),
        ]) {
            let chars: Vec<char> = row.chars().collect();
            let key_column: String = chars[2..2 + column].iter().collect();
            assert_eq!(key_column, format!("{key:<column$}"), "{text}");
            let rest: String = chars[2 + column..].iter().collect();
            assert!(rest.starts_with(value), "{text}");
        }
        // The longest key still has two spaces before its value.
        assert!(rows[1].contains(&format!("{long}  10.0.0.3")), "{text}");
        assert!(rows[0].starts_with("  sip.domains "), "{text}");
        assert!(rows[2].starts_with("† system.name "), "{text}");
        assert!(
            rows[2].ends_with("peer1   (set to 'peer-one': restart required)"),
            "{text}"
        );
    }

    #[test]
    fn configuration_of_short_keys_is_not_padded_to_a_fixed_width() {
        let items = [item("a.b", "1", false, None), item("a.cd", "2", true, None)];
        let refs: Vec<&ConfigItem> = items.iter().collect();
        let text = render_configuration("p", &refs);
        assert!(text.ends_with("  a.b   1\n† a.cd  2\n"), "{text:?}");
    }
}
