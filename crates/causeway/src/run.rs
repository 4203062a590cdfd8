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
            let local_ip = config.node.address.parse().ok();
            let t = TlsTransport::bind(
                listen,
                local_ip,
                settings.tls_mode,
                id.clone(),
                settings.timing,
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
    let store = NodeStore::open(&data_dir);
    let (node, _services) = Node::start(config.clone(), transport, resolver, store);
    let app = causeway_admin::router(node.clone());
    let unix =
        causeway_admin::serve_unix(&config.admin_socket(), app.clone(), cancel.clone()).await?;
    let https = match (config.admin.https_listen, &identity) {
        (Some(listen), Some(id)) => Some(
            causeway_admin::serve_https(listen, id, data_dir.clone(), app, cancel.clone()).await?,
        ),
        _ => None,
    };
    tracing::info!(
        target: "management.node",
        version = causeway_common::SOFTWARE_VERSION,
        admin_socket = %config.admin_socket().display(),
        "Node started"
    );
    wait_for_signal().await;
    tracing::info!(target: "management.node", "Node shutting down");
    node.shutdown().await;
    cancel.cancel();
    let _ = unix.await;
    if let Some(h) = https {
        let _ = h.await;
    }
    let _ = std::fs::remove_file(config.admin_socket());
    Ok(())
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
