//! `causeway run`: load and check the configuration, then bind, then serve until a signal.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use causeway_cluster::{Node, NodeConfig, NodeStore};
use causeway_mesh::{SystemResolver, TlsTransport, Transport};
use causeway_pki::NodeIdentity;
use tokio_util::sync::CancellationToken;

use crate::{EXIT_CONFIG, EXIT_UNAVAILABLE};

pub fn run(config_path: &Path) -> ExitCode {
    // Everything that can be wrong with the file is found before any port is bound.
    let config = match NodeConfig::load(config_path) {
        Ok(mut c) => {
            c.announce_version = std::env::var("CAUSEWAY_ANNOUNCE_VERSION").ok();
            c
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let needs_tls = !config.cluster.peers.is_empty() || config.admin.https_listen.is_some();
    let identity = if needs_tls {
        let t = &config.tls;
        match NodeIdentity::load(
            &config.data_path(&t.certificate),
            &config.data_path(&t.private_key),
            &config.data_path(&t.ca),
        ) {
            Ok(id) => Some(id),
            Err(e) => {
                eprintln!("error: {}: tls: {e}", config_path.display());
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    } else {
        None
    };
    causeway_common::logging::init(&config.node.system_name, config.node.log_format);
    // One worker per core: the store's saves run on the replication engine's own thread,
    // so no worker waits on an fsync.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, identity)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(target: "management.node", reason = %format!("{e:#}"), "Node stopped");
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

async fn serve(config: NodeConfig, identity: Option<NodeIdentity>) -> anyhow::Result<()> {
    let data_dir = config.node.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let cancel = CancellationToken::new();
    // The cluster port is bound only when the mesh will run: a node with alarm 20003 (not in
    // its own peer list) must not accept connections nobody serves.
    let transport: Option<Arc<dyn Transport>> = match (&identity, config.cluster_settings()) {
        (Some(id), Some(settings)) => {
            let listen = std::net::SocketAddr::new(config.listen_ip(), config.cluster.port);
            // Dialled from this system's own address, so peers see the source they expect:
            // the node's IP, or where it listens when its address is a name.
            let local_ip = config.node.address.parse().ok().or(config.cluster.listen);
            let peer_ips = settings
                .peers
                .iter()
                .filter_map(|p| p.parse().ok())
                .collect();
            let t = TlsTransport::bind(
                listen,
                local_ip,
                settings.tls_mode,
                id.clone(),
                settings.timing,
                peer_ips,
                cancel.clone(),
            )
            .await?;
            Some(t)
        }
        _ => None,
    };
    let resolver = Arc::new(SystemResolver {
        ip_version: config.cluster.ip_version,
    });
    // Every service's items and alarms, whether or not this peer runs it: the
    // configuration primary checks every peer's items.
    causeway_sipserver::catalogue::register();
    causeway_dbcluster::catalogue::register();
    causeway_ha::catalogue::register();
    let store = NodeStore::open(&data_dir);
    let (node, _services) = Node::start(config.clone(), transport, resolver, store);
    let mut app = causeway_admin::router(node.clone());
    // The pages the hosted services add to the web interface.
    let mut pages = Vec::new();
    if let Some(section) = &config.sip {
        let sip = start_sip(&config, section, &identity, node.clone(), cancel.clone()).await?;
        node.host(sip.clone());
        app = app.merge(causeway_sipserver::status::router(sip));
    } else if node.mesh().is_some() {
        // A peer without SIP still votes for the admission lease of the peers with it.
        causeway_sipserver::start_witness(&node);
    }
    if let Some(section) = &config.database {
        let db = causeway_dbcluster::DbService::start(node.clone(), section.clone())
            .await
            .context("starting the database cluster service")?;
        node.host(db.clone());
        app = app.merge(causeway_dbcluster::router(db));
        pages.push(causeway_dbcluster::WEB_PAGE);
    } else if node.mesh().is_some() {
        // A peer without a database still votes for the database cluster's master: the
        // majority that chooses it is the peer cluster's.
        causeway_dbcluster::start_witness(&node);
    }
    if node.mesh().is_some() {
        // Every clustered node runs it: without an [ha] section it can be a pair's witness.
        let ha = causeway_ha::HaService::start(node.clone(), config.ha.clone())
            .await
            .context("starting the HA service")?;
        node.host(ha.clone());
        app = app.merge(causeway_ha::router(ha));
        if config.ha.is_some() {
            pages.push(causeway_ha::WEB_PAGE);
        }
    } else if config.ha.is_some() {
        anyhow::bail!("an HA pair needs the peer cluster: list the primary, the secondary and the witness in cluster.peers");
    }
    let unix =
        causeway_admin::serve_unix(&config.admin_socket(), app.clone(), cancel.clone()).await?;
    let https = match (config.admin.https_listen, &identity) {
        (Some(listen), Some(id)) => Some(
            causeway_admin::serve_https(listen, id, data_dir.clone(), app, pages, cancel.clone())
                .await?,
        ),
        _ => None,
    };
    tracing::info!(
        target: "management.node",
        version = causeway_common::SOFTWARE_VERSION,
        admin_socket = %config.admin_socket().display(),
        "Node started"
    );
    crate::sdnotify::ready();
    crate::sdnotify::spawn_watchdog(cancel.clone());
    wait_for_signal().await;
    tracing::info!(target: "management.node", "Node shutting down");
    // `syslog follow` streams end, so the admin servers can finish.
    causeway_common::logging::tap().close_followers();
    crate::sdnotify::stopping();
    node.shutdown().await;
    cancel.cancel();
    let _ = unix.await;
    if let Some(h) = https {
        let _ = h.await;
    }
    let _ = std::fs::remove_file(config.admin_socket());
    Ok(())
}

/// Binds the SIP ports and starts the registrar and proxy (SV-1…SV-4).
async fn start_sip(
    config: &NodeConfig,
    section: &causeway_cluster::SipSection,
    identity: &Option<NodeIdentity>,
    node: Arc<Node>,
    cancel: CancellationToken,
) -> anyhow::Result<Arc<causeway_sipserver::SipService>> {
    // check-config made sure the node's address is an IP when sip.listen is absent.
    let addresses = config.sip_addresses();
    let (&listen, also_listen) = addresses
        .split_first()
        .context("sip.listen is not set and node.address is not an IP address")?;
    let tls = match (identity, section.tls_port) {
        (Some(id), port) if port != 0 => {
            let (server, client) = causeway_pki::sip_tls_configs(id)
                .context("building the SIP TLS configuration from the node's certificate")?;
            Some((port, server, client))
        }
        _ => None,
    };
    let mut local_names = vec![];
    if !config.cluster.name.is_empty() {
        local_names.push(config.cluster.name.to_ascii_lowercase());
    }
    if !config.node.address.is_empty() {
        local_names.push(config.node.address.to_ascii_lowercase());
    }
    if let Some(ip) = section.listen {
        // An HA pair's virtual IP: requests to it are for this system while it holds it.
        local_names.push(ip.to_string());
    }
    let settings = causeway_sipserver::SipSettings {
        listen,
        also_listen: also_listen.to_vec(),
        udp_port: section.udp_port,
        tcp_port: section.tcp_port,
        tls,
        caps: causeway_sipserver::Caps {
            rate_per_source: section.rate_per_source,
            max_connections: section.max_connections,
            max_connections_per_source: section.max_connections_per_source,
            ..Default::default()
        },
        local_names,
        min_expires: section.min_expires,
        max_expires: section.max_expires,
        default_expires: 3600.min(section.max_expires),
        zone_keepalive: std::time::Duration::from_millis(section.zone_keepalive_ms),
        // Checked when the node file was read.
        dns_servers: section
            .dns_servers
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect(),
    };
    causeway_sipserver::SipService::start(node, settings, cancel).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
