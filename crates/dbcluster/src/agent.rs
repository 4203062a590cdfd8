//! The service and its one decision loop: observe, decide one action, act, say what it did
//! (Patroni's `ha.py` cycle, event-driven: a lease change, a report, the child's exit or a
//! command wakes it, and a 100 ms tick).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use causeway_cluster::config::DatabaseSection;
use causeway_cluster::Node;
use causeway_common::time::unix_ms_now;
use causeway_consensus::{Holder, LeaderLease, LeaseGroup, LeaseTiming};
use causeway_mesh::BoxFuture;
use nix::sys::signal::Signal;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::catalogue as alarm;
use crate::conf::{self, Layout, Settings};
use crate::decide::{self, Action, Instance, Observed, Upstream};
use crate::model::*;
use crate::pgwire::{Login, PgConn, PgError};
use crate::supervisor::{self, Child, Supervisor};
use crate::tools::Tools;
use crate::LOG;

/// The `dbcluster` lease (docs/dbcluster.md, section 2): 1 s, so that stopping PostgreSQL
/// fits in the time between "lost" and the earliest other holder.
pub fn lease_timing() -> LeaseTiming {
    LeaseTiming {
        heartbeat: Duration::from_millis(100),
        election_timeout_min: Duration::from_millis(500),
        election_timeout_max: Duration::from_millis(1000),
        renew: Duration::from_millis(100),
    }
}

const TICK: Duration = Duration::from_millis(100);
pub(crate) const REPORT_EVERY: Duration = Duration::from_millis(250);
/// A report older than this is not counted (a node that stopped reporting is unreachable).
pub(crate) const FRESH: Duration = Duration::from_millis(1500);
const SQL_TIMEOUT: Duration = Duration::from_millis(500);
/// A standby within this many bytes of the master is "In Sync".
pub const IN_SYNC_BYTES: u64 = 1 << 20;
pub(crate) const NO_MASTER_ALARM_AFTER: Duration = Duration::from_secs(5);

/// What the last observation found, kept for reports, status and the endpoint.
#[derive(Clone, Debug, Default)]
pub(crate) struct Seen {
    pub in_recovery: Option<bool>,
    pub position: u64,
    pub timeline: u32,
    pub streaming: bool,
    pub members: Vec<Member>,
    pub replicas: Vec<Replica>,
    pub error: Option<String>,
}

pub struct DbService {
    pub(crate) node: Arc<Node>,
    pub(crate) me: usize,
    pub(crate) section: DatabaseSection,
    pub(crate) layout: Layout,
    pub(crate) tools: Result<Tools, String>,
    pub(crate) sup: Option<Arc<Supervisor>>,
    pub(crate) lease: Arc<LeaseGroup>,
    pub(crate) saved: Mutex<Saved>,
    pub(crate) reports: Mutex<BTreeMap<usize, (Report, Instant)>>,
    pub(crate) seen: Mutex<Seen>,
    /// Serialises everything that changes postgres or its files: the loop's actions, seals
    /// asked by a candidate, and commands.
    pub(crate) act_lock: tokio::sync::Mutex<()>,
    /// A command owns postgres: the loop observes but does not act.
    pub(crate) command_running: AtomicBool,
    /// Postgres was promoted at the lease this node holds: the fencer stops it the moment
    /// the lease is lost.
    pub(crate) writable: AtomicBool,
    /// Whether this node may stand for the lease, as the loop last decided.
    pub(crate) eligible: AtomicBool,
    /// The running postgres has answered SQL at least once.
    pub(crate) answered: AtomicBool,
    /// Starts in a row that ended before postgres answered.
    pub(crate) start_failures: std::sync::atomic::AtomicU32,
    /// The generation this master has checkpointed at since its promotion.
    pub(crate) checkpointed_at: Arc<AtomicU64>,
    pub(crate) following: Mutex<Option<usize>>,
    pub(crate) not_streaming_since: Mutex<Option<Instant>>,
    pub(crate) starting_since: Mutex<Option<Instant>>,
    pub(crate) resigned_until: Mutex<Option<Instant>>,
    pub(crate) no_master_since: Mutex<Option<Instant>>,
    /// The master of the highest generation ever seen (peer, generation): not sealed, not
    /// compared against, by a candidate (its unacknowledged WAL is not a reason to wait).
    pub(crate) last_master: Mutex<Option<(usize, u64)>>,
    pub(crate) conn: tokio::sync::Mutex<Option<PgConn>>,
    pub(crate) route: watch::Sender<Option<(SocketAddr, u64)>>,
    pub(crate) counters: Counters,
    pub(crate) last_why: Mutex<String>,
    pub(crate) wake: Notify,
    /// Where PostgreSQL listens (`localnode` resolved).
    pub(crate) listen: Mutex<IpAddr>,
    /// Tells the reporter to send this node's report now.
    pub(crate) report_now: Notify,
    pub(crate) tasks: TaskTracker,
    pub(crate) cancel: CancellationToken,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub failovers: AtomicU64,
    pub fences: AtomicU64,
    pub rewinds_ok: AtomicU64,
    pub rewinds_failed: AtomicU64,
    pub basebackups_ok: AtomicU64,
    pub basebackups_failed: AtomicU64,
    pub endpoint_connections: AtomicU64,
    pub endpoint_closed_master_changed: AtomicU64,
    pub health_check_failures: AtomicU64,
}

impl DbService {
    /// Starts the service on `node`: finds PostgreSQL, makes the node's own database on
    /// first start, joins the `dbcluster` lease group, and starts the loop, the endpoint
    /// and the health port.
    pub async fn start(node: Arc<Node>, section: DatabaseSection) -> anyhow::Result<Arc<Self>> {
        crate::catalogue::register();
        let layout = Layout::new(&node.config().node.data_dir);
        std::fs::create_dir_all(&layout.root)
            .with_context(|| format!("creating {}", layout.root.display()))?;
        let saved: Saved = match std::fs::read(layout.state_file()) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} is unreadable: restore it from a backup, or remove it to start this node outside the database cluster",
                    layout.state_file().display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved {
                localnode: section.localnode.clone(),
                ..Default::default()
            },
            Err(e) => return Err(e).context("reading the database state"),
        };
        let tools = Tools::find(section.bin_dir.as_deref())
            .and_then(|t| match crate::tools::unreachable_ancestor(&t, &layout.root) {
                Some(dir) => bail!(
                    "PostgreSQL runs as the {} user, which cannot reach {}: give it search permission (chmod o+x {})",
                    t.os_user,
                    layout.root.display(),
                    dir.display()
                ),
                None => Ok(t),
            })
            .map_err(|e| format!("{e:#}"));
        let sup = match &tools {
            Ok(t) => Some(Supervisor::new(t.clone(), layout.log_file())?),
            Err(why) => {
                node.alarms().raise(alarm::NO_POSTGRES, "postgres", why);
                warn!(target: LOG, reason = %why, "PostgreSQL is not available; the database cluster service runs without it");
                None
            }
        };
        let leases = node.leases();
        let lease = leases
            .start_group_with("dbcluster", leases.all_peers(), lease_timing())
            .map_err(|e| anyhow!("{e}"))?;
        lease.set_eligible(false);
        let svc = Arc::new(Self {
            me: leases.self_index(),
            node: node.clone(),
            section,
            layout,
            tools,
            sup,
            lease,
            saved: Mutex::new(saved),
            reports: Mutex::new(BTreeMap::new()),
            seen: Mutex::new(Seen::default()),
            act_lock: tokio::sync::Mutex::new(()),
            command_running: AtomicBool::new(false),
            writable: AtomicBool::new(false),
            eligible: AtomicBool::new(false),
            answered: AtomicBool::new(false),
            start_failures: std::sync::atomic::AtomicU32::new(0),
            checkpointed_at: Arc::new(AtomicU64::new(0)),
            following: Mutex::new(None),
            not_streaming_since: Mutex::new(None),
            starting_since: Mutex::new(None),
            resigned_until: Mutex::new(None),
            no_master_since: Mutex::new(None),
            last_master: Mutex::new(None),
            conn: tokio::sync::Mutex::new(None),
            route: watch::channel(None).0,
            counters: Counters::default(),
            last_why: Mutex::new(String::new()),
            wake: Notify::new(),
            listen: Mutex::new(IpAddr::from([127, 0, 0, 1])),
            report_now: Notify::new(),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
        });
        svc.resolve_listen_ip();
        if svc.sup.is_some() {
            for data in [svc.layout.local(), svc.layout.cluster()] {
                supervisor::stop_leftover(&data);
            }
            if let Err(e) = svc.prepare_dirs().await {
                let why = format!("{e:#}");
                node.alarms().raise(alarm::NO_POSTGRES, "postgres", &why);
                warn!(target: LOG, reason = %why, "Preparing the node's own database failed");
            }
        }
        svc.serve_peers();
        node.metrics()
            .register(Box::new(crate::status::Collector(Arc::downgrade(&svc))));
        svc.tasks.spawn(svc.clone().run_loop());
        svc.tasks.spawn(svc.clone().fencer());
        svc.tasks.spawn(svc.clone().reporter());
        svc.tasks.spawn(svc.clone().watch_certificates());
        svc.tasks.spawn(crate::endpoint::serve(svc.clone()).await?);
        if let Some(task) = crate::health::serve(svc.clone()).await? {
            svc.tasks.spawn(task);
        }
        Ok(svc)
    }

    pub(crate) fn tools(&self) -> anyhow::Result<&Tools> {
        self.tools.as_ref().map_err(|e| anyhow!("{e}"))
    }

    pub(crate) fn supervisor(&self) -> anyhow::Result<&Arc<Supervisor>> {
        self.sup.as_ref().ok_or_else(|| {
            anyhow!(
                "{}",
                self.tools
                    .as_ref()
                    .err()
                    .cloned()
                    .unwrap_or_else(|| "PostgreSQL is not available".into())
            )
        })
    }

    pub(crate) fn saved(&self) -> Saved {
        self.saved.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes the saved state and writes it (atomically) before returning.
    pub(crate) fn save(&self, change: impl FnOnce(&mut Saved)) -> anyhow::Result<()> {
        let mut s = self.saved.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = s.clone();
        change(&mut next);
        let path = self.layout.state_file();
        let bytes = serde_json::to_vec_pretty(&next)?;
        causeway_common::fsio::write_atomic(&path, &bytes)
            .with_context(|| format!("writing {}", path.display()))?;
        *s = next;
        Ok(())
    }

    /// The address PostgreSQL listens on: `localnode`, else 127.0.0.1. Read on every route
    /// and report, so kept resolved (`localnode` sets it again).
    pub(crate) fn listen_ip(&self) -> IpAddr {
        *lock(&self.listen)
    }

    /// Resolves `localnode` (an interface or one of its addresses) again.
    pub(crate) fn resolve_listen_ip(&self) {
        let ip = self
            .saved()
            .localnode
            .and_then(|i| crate::tools::interface_address(&i).ok())
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        *lock(&self.listen) = ip;
    }

    pub(crate) fn pg_address(&self) -> SocketAddr {
        SocketAddr::new(self.listen_ip(), self.section.port)
    }

    /// Server files given with the 5-file `certs`.
    pub(crate) fn has_server_certs(&self) -> bool {
        self.saved().certs.len() == 5
    }

    pub(crate) fn synchronous(&self) -> bool {
        !self
            .node
            .configuration()
            .iter()
            .any(|i| i.path == "database.replication" && i.value == "Asynchronous")
    }

    /// The run and certificate directories, and the node's own database at first start.
    pub(crate) async fn prepare_dirs(&self) -> anyhow::Result<()> {
        let tools = self.tools()?.clone();
        for d in [self.layout.run(), self.layout.certs()] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            tools.own(&d, 0o700)?;
        }
        tools.own(&self.layout.root, 0o755)?;
        let local = self.layout.local();
        if !local.join("PG_VERSION").exists() {
            info!(target: LOG, data = %local.display(), "Creating the node's own database");
            let _ = std::fs::remove_dir_all(&local);
            std::fs::create_dir_all(&local)?;
            tools.own(&local, 0o700)?;
            tools
                .run(
                    "initdb",
                    &[
                        "-D".into(),
                        local.display().to_string(),
                        "-U".into(),
                        "postgres".into(),
                        "--data-checksums".into(),
                        "-E".into(),
                        "UTF8".into(),
                        "--locale=C".into(),
                        "--auth-local=peer".into(),
                        "--auth-host=reject".into(),
                    ],
                    Duration::from_secs(120),
                    |_| {},
                )
                .await
                .context("creating the node's own database (initdb)")?;
        }
        Ok(())
    }

    pub(crate) fn settings(&self, conninfo: String, sync_names: String) -> Settings {
        Settings {
            listen: self.listen_ip(),
            port: self.section.port,
            socket_dir: self.layout.run(),
            tls: self.has_server_certs().then(|| self.layout.certs()),
            primary_conninfo: conninfo,
            primary_slot: conf::standby_name(self.me),
            synchronous_standby_names: sync_names,
        }
    }

    pub(crate) fn conninfo_to(&self, address: SocketAddr) -> String {
        conf::conninfo(
            address.ip(),
            address.port(),
            &self.layout.certs(),
            &conf::standby_name(self.me),
        )
    }

    // ---- SQL on the agent's own connection (Unix socket, peer authentication) ----

    pub(crate) async fn sql(&self, q: &str) -> Result<crate::pgwire::Rows, PgError> {
        self.sql_within(q, SQL_TIMEOUT).await
    }

    pub(crate) async fn sql_within(
        &self,
        q: &str,
        timeout: Duration,
    ) -> Result<crate::pgwire::Rows, PgError> {
        let mut conn = self.conn.lock().await;
        if conn.is_none() {
            let login = Login {
                application_name: "causeway-agent",
                ..Default::default()
            };
            *conn = Some(
                PgConn::unix(&self.layout.socket(self.section.port), &login, SQL_TIMEOUT).await?,
            );
        }
        let c = conn.as_mut().ok_or_else(|| PgError {
            code: None,
            message: "no connection".into(),
        })?;
        match tokio::time::timeout(timeout, c.query(q)).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => {
                // A server error leaves the connection usable; a broken one is dropped.
                if e.code.is_none() {
                    *conn = None;
                }
                Err(e)
            }
            Err(_) => {
                *conn = None;
                Err(PgError {
                    code: None,
                    message: format!("no answer within {} ms", timeout.as_millis()),
                })
            }
        }
    }

    pub(crate) async fn drop_conn(&self) {
        *self.conn.lock().await = None;
    }

    // ---- the loop ----

    pub(crate) async fn run_loop(self: Arc<Self>) {
        let mut lease = self.lease.watch();
        let mut child = match &self.sup {
            Some(s) => s.watch(),
            None => watch::channel(Child::None).1,
        };
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(TICK) => {}
                _ = lease.changed() => {}
                _ = child.changed() => {}
                _ = self.wake.notified() => {}
            }
            if self.sup.is_none() {
                continue;
            }
            let o = self.observe().await;
            let eligible = decide::eligible(&o, &self.rival_positions())
                && lock(&self.resigned_until).is_none_or(|t| Instant::now() >= t);
            self.lease.set_eligible(eligible);
            self.eligible.store(eligible, Ordering::Relaxed);
            self.raise_or_lower(&o);
            if self.command_running.load(Ordering::SeqCst) {
                continue;
            }
            let action = decide::decide(&o);
            // A seal, a member change or a command that held the lock has changed what was
            // observed: wait for it, then observe again rather than act on the old view.
            let Ok(_guard) = self.act_lock.try_lock() else {
                drop(self.act_lock.lock().await);
                continue;
            };
            if self.command_running.load(Ordering::SeqCst) {
                continue;
            }
            let started = Instant::now();
            let what = format!("{action:?}");
            match self.act(&o, action.clone()).await {
                Ok(detail) => {
                    if detail.is_some() {
                        self.report_now.notify_one();
                        self.refresh_route();
                    }
                    if let Some(detail) = detail {
                        info!(target: LOG, event = "Database action", action = %action_name(&action),
                            generation = %generation_of(&o.lease), duration_ms = started.elapsed().as_millis() as u64,
                            detail = %detail, "");
                    } else if let Action::None { why } = action {
                        let mut last = lock(&self.last_why);
                        if *last != why {
                            info!(target: LOG, event = "Database state", detail = why, "");
                            *last = why.to_string();
                        }
                    }
                }
                Err(e) => {
                    warn!(target: LOG, event = "Database action failed", action = %what, reason = %format!("{e:#}"), "");
                    // Do not spin on a failing action.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Runs one action; `Some(detail)` when it changed something.
    pub(crate) async fn act(&self, o: &Observed, action: Action) -> anyhow::Result<Option<String>> {
        let sup = self.supervisor()?;
        match action {
            Action::None { .. } => Ok(None),
            Action::Fence { why } => {
                self.fence(why).await;
                Ok(Some(format!("Stopped PostgreSQL at once: {why}")))
            }
            Action::UseLocal => {
                if o.instance == Instance::Cluster {
                    sup.stop(Signal::SIGINT, Duration::from_secs(10)).await;
                }
                self.start_local().await?;
                Ok(Some("Started the node's own database".into()))
            }
            Action::StopLocal => {
                sup.stop(Signal::SIGINT, Duration::from_secs(10)).await;
                self.drop_conn().await;
                Ok(Some(
                    "Stopped the node's own database: this node is in the database cluster".into(),
                ))
            }
            Action::StartStandby { upstream } => {
                self.start_standby(upstream).await?;
                Ok(Some(match upstream {
                    Some(u) => format!(
                        "Started PostgreSQL as a standby of Peer {} (generation {})",
                        u.peer, u.generation
                    ),
                    None => "Started PostgreSQL as a standby with no master to follow".into(),
                }))
            }
            Action::Follow { upstream } => {
                self.follow(upstream).await?;
                Ok(Some(format!(
                    "Following Peer {} at {} (generation {})",
                    upstream.peer, upstream.address, upstream.generation
                )))
            }
            Action::Promote { generation } => self.promote(generation).await.map(Some),
            Action::Configure => self.configure(o).await.map(Some),
            Action::Rewind { upstream, why } => self.rejoin(upstream, why).await.map(Some),
            Action::Resign { why } => {
                self.step_aside(Duration::from_secs(2));
                Ok(Some(format!("Gave up the lease: {why}")))
            }
        }
    }

    /// Not eligible for `for_`, and the lease given up if held.
    pub(crate) fn step_aside(&self, for_: Duration) {
        *lock(&self.resigned_until) = Some(Instant::now() + for_);
        self.lease.set_eligible(false);
        self.lease.resign();
    }

    pub(crate) async fn fence(&self, why: &str) {
        let was = self.writable.swap(false, Ordering::SeqCst);
        if let Some(sup) = &self.sup {
            sup.stop(Signal::SIGQUIT, Duration::from_millis(200)).await;
        }
        self.drop_conn().await;
        *lock(&self.following) = None;
        if was {
            self.counters.fences.fetch_add(1, Ordering::Relaxed);
            self.node
                .alarms()
                .raise(alarm::FENCED, "database", &format!("fenced: {why}"));
            warn!(target: LOG, event = "Database fenced", reason = why, "");
        }
    }

    /// Stops a writable postgres the moment the lease is lost, whatever the loop is doing.
    pub(crate) async fn fencer(self: Arc<Self>) {
        let mut lease = self.lease.watch();
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                r = lease.changed() => if r.is_err() { return },
            }
            let holder = lease.borrow_and_update().holder;
            if !matches!(holder, Holder::Me { .. }) && self.writable.swap(false, Ordering::SeqCst) {
                if let Some(sup) = &self.sup {
                    sup.quit_now();
                }
                self.counters.fences.fetch_add(1, Ordering::Relaxed);
                self.node.alarms().raise(
                    alarm::FENCED,
                    "database",
                    &format!("fenced: the lease was lost (holder now: {holder})"),
                );
                warn!(target: LOG, event = "Database fenced", reason = "the lease was lost", holder = %holder, "");
                self.wake.notify_one();
                self.report_now.notify_one();
            }
        }
    }

    pub(crate) async fn start_local(&self) -> anyhow::Result<()> {
        let tools = self.tools()?.clone();
        let local = self.layout.local();
        conf::write(&tools, &local, &self.settings(String::new(), String::new()))?;
        let _ = std::fs::remove_file(local.join("standby.signal"));
        self.supervisor()?.start(&local).await?;
        self.wait_ready(Duration::from_secs(60)).await
    }

    pub(crate) async fn start_standby(&self, upstream: Option<Upstream>) -> anyhow::Result<()> {
        if let Some(u) = upstream {
            self.refuse_if_sealed_above(u)?;
        }
        let tools = self.tools()?.clone();
        let data = self.layout.cluster();
        let conninfo = upstream
            .map(|u| self.conninfo_to(u.address))
            .unwrap_or_default();
        conf::write(&tools, &data, &self.settings(conninfo, String::new()))?;
        conf::write_standby_signal(&tools, &data)?;
        *lock(&self.following) = upstream.map(|u| u.peer);
        self.writable.store(false, Ordering::SeqCst);
        self.answered.store(false, Ordering::SeqCst);
        self.supervisor()?.start(&data).await?;
        Ok(())
    }

    /// A seal may have come between the observation and this action (both run under
    /// `act_lock`, the observation does not): the seal is checked again here, so no standby
    /// ever streams from a master older than the generation it sealed for.
    fn refuse_if_sealed_above(&self, u: Upstream) -> anyhow::Result<()> {
        let sealed_at = self.saved().sealed_at;
        if u.generation < sealed_at {
            bail!(
                "not following Peer {} at generation {}: this node is sealed at generation {sealed_at}",
                u.peer,
                u.generation
            );
        }
        Ok(())
    }

    pub(crate) async fn follow(&self, u: Upstream) -> anyhow::Result<()> {
        self.refuse_if_sealed_above(u)?;
        let tools = self.tools()?.clone();
        conf::write(
            &tools,
            &self.layout.cluster(),
            &self.settings(self.conninfo_to(u.address), String::new()),
        )?;
        self.sql("SELECT pg_reload_conf()").await?;
        *lock(&self.following) = Some(u.peer);
        *lock(&self.not_streaming_since) = None;
        self.node.alarms().lower(alarm::FENCED, "database");
        Ok(())
    }

    pub(crate) async fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            match self.sql("SELECT 1").await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    bail!(
                        "PostgreSQL did not accept connections within {} s: {e}",
                        within.as_secs()
                    )
                }
                Err(_) => {
                    if self.instance() == Instance::None {
                        bail!(
                            "PostgreSQL exited during start: see {}",
                            self.layout.log_file().display()
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
            }
        }
    }
}

impl causeway_cluster::Service for DbService {
    fn name(&self) -> &'static str {
        "dbcluster"
    }

    fn status(&self) -> serde_json::Value {
        serde_json::to_value(self.status_json()).unwrap_or_default()
    }

    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.cancel.cancel();
            self.tasks.close();
            self.tasks.wait().await;
            let rpc = self.node.leases().rpc();
            for e in [
                "dbcluster/report",
                "dbcluster/seal",
                "dbcluster/join",
                "dbcluster/remove",
            ] {
                rpc.unserve(e);
            }
            // A clean stop: postgres stops fast (a master's clients see the end at once).
            if let Some(sup) = &self.sup {
                self.writable.store(false, Ordering::SeqCst);
                sup.stop(Signal::SIGINT, Duration::from_secs(10)).await;
            }
        })
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn action_name(a: &Action) -> &'static str {
    match a {
        Action::None { .. } => "none",
        Action::Fence { .. } => "fence",
        Action::UseLocal => "use_local",
        Action::StopLocal => "stop_local",
        Action::StartStandby { .. } => "start_standby",
        Action::Follow { .. } => "follow",
        Action::Promote { .. } => "promote",
        Action::Configure => "configure",
        Action::Rewind { .. } => "rewind",
        Action::Resign { .. } => "resign",
    }
}

fn generation_of(h: &Holder) -> String {
    match h {
        Holder::Me { generation } | Holder::Peer { generation, .. } => generation.to_string(),
        Holder::Nobody => "none".into(),
    }
}

/// `pg_basebackup -P`'s "1234/5678 kB (21%), 0/1 tablespace" → 21.
pub(crate) fn percent(line: &str) -> Option<u32> {
    let open = line.find('(')?;
    let close = line[open..].find("%)")?;
    line[open + 1..open + close].trim().parse().ok()
}

pub(crate) fn now_ms() -> u64 {
    unix_ms_now()
}

#[cfg(test)]
mod tests {
    #[test]
    fn basebackup_progress_is_read_from_its_lines() {
        assert_eq!(
            super::percent("22806/22806 kB (100%), 1/1 tablespace"),
            Some(100)
        );
        assert_eq!(
            super::percent("1024/4096 kB (25%), 0/1 tablespace"),
            Some(25)
        );
        assert_eq!(super::percent("waiting for checkpoint"), None);
    }
}
