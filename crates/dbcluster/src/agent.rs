//! The service and its one decision loop: observe, decide one action, act, say what it did
//! (Patroni's `ha.py` cycle, event-driven: a lease change, a report, the child's exit or a
//! command wakes it, and a 100 ms tick).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
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
use crate::decide::{self, Action, Instance, Observed, Pg, Upstream};
use crate::model::*;
use crate::pgwire::{literal, Login, PgConn, PgError};
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
const REPORT_EVERY: Duration = Duration::from_millis(250);
/// A report older than this is not counted (a node that stopped reporting is unreachable).
pub(crate) const FRESH: Duration = Duration::from_millis(1500);
const SQL_TIMEOUT: Duration = Duration::from_millis(500);
/// A standby within this many bytes of the master is "In Sync".
pub const IN_SYNC_BYTES: u64 = 1 << 20;
const NO_MASTER_ALARM_AFTER: Duration = Duration::from_secs(5);

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
    pub(crate) following: Mutex<Option<usize>>,
    not_streaming_since: Mutex<Option<Instant>>,
    starting_since: Mutex<Option<Instant>>,
    resigned_until: Mutex<Option<Instant>>,
    no_master_since: Mutex<Option<Instant>>,
    /// The master of the highest generation ever seen (peer, generation): not sealed, not
    /// compared against, by a candidate (its unacknowledged WAL is not a reason to wait).
    last_master: Mutex<Option<(usize, u64)>>,
    pub(crate) conn: tokio::sync::Mutex<Option<PgConn>>,
    pub(crate) route: watch::Sender<Option<(SocketAddr, u64)>>,
    pub(crate) counters: Counters,
    last_why: Mutex<String>,
    wake: Notify,
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
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
        });
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

    fn tools(&self) -> anyhow::Result<&Tools> {
        self.tools.as_ref().map_err(|e| anyhow!("{e}"))
    }

    fn supervisor(&self) -> anyhow::Result<&Arc<Supervisor>> {
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
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(&next)?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("writing {}", tmp.display()))?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        *s = next;
        Ok(())
    }

    /// The address PostgreSQL listens on: `localnode`, else 127.0.0.1.
    pub(crate) fn listen_ip(&self) -> IpAddr {
        self.saved()
            .localnode
            .and_then(|i| crate::tools::interface_address(&i).ok())
            .unwrap_or(IpAddr::from([127, 0, 0, 1]))
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
    async fn prepare_dirs(&self) -> anyhow::Result<()> {
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

    fn settings(&self, conninfo: String, sync_names: String) -> Settings {
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

    fn conninfo_to(&self, address: SocketAddr) -> String {
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

    async fn drop_conn(&self) {
        *self.conn.lock().await = None;
    }

    // ---- observing ----

    fn instance(&self) -> Instance {
        match self.sup.as_ref().map(|s| s.current()) {
            Some(Child::Running { data, .. }) if data == self.layout.local() => Instance::Local,
            Some(Child::Running { .. }) => Instance::Cluster,
            _ => Instance::None,
        }
    }

    async fn observe(&self) -> Observed {
        let saved = self.saved();
        if let Some(sup) = &self.sup {
            if let Child::Exited { data, status } = sup.current() {
                warn!(target: LOG, data = %data.display(), status = %status, "PostgreSQL exited");
                self.writable.store(false, Ordering::SeqCst);
                sup.forget_exit();
                self.drop_conn().await;
            }
        }
        let instance = self.instance();
        let pg = if instance == Instance::None {
            *lock(&self.starting_since) = None;
            Pg::Down
        } else {
            match self.observe_sql(instance).await {
                Ok(pg) => {
                    *lock(&self.starting_since) = None;
                    pg
                }
                Err(_) => {
                    let since = *lock(&self.starting_since).get_or_insert_with(Instant::now);
                    Pg::Starting {
                        for_ms: since.elapsed().as_millis() as u64,
                    }
                }
            }
        };
        let upstream = self.best_master();
        if let Some(u) = upstream {
            let mut last = lock(&self.last_master);
            if last.is_none_or(|(_, g)| g < u.generation) {
                *last = Some((u.peer, u.generation));
            }
        }
        let members = lock(&self.seen).members.clone();
        let in_set: Vec<usize> = members
            .iter()
            .filter(|m| m.in_set)
            .map(|m| m.peer)
            .collect();
        let mut set = in_set.clone();
        if !set.contains(&self.me) {
            set.push(self.me);
        }
        set.sort_unstable();
        Observed {
            me: self.me,
            member: saved.member,
            lease: self.lease.state().holder,
            instance,
            pg,
            promoted_at: saved.promoted_at,
            sealed_at: saved.sealed_at,
            upstream,
            wanted_sync_names: conf::sync_names(self.me, &set, self.synchronous()),
            wanted_slots: members
                .iter()
                .filter(|m| m.peer != self.me)
                .map(|m| conf::standby_name(m.peer))
                .collect(),
        }
    }

    async fn observe_sql(&self, instance: Instance) -> Result<Pg, PgError> {
        let rows = self
            .sql(
                "SELECT pg_is_in_recovery()::text, \
                 (CASE WHEN pg_is_in_recovery() THEN pg_wal_lsn_diff(greatest(coalesce(pg_last_wal_receive_lsn(), '0/0'), coalesce(pg_last_wal_replay_lsn(), '0/0')), '0/0') \
                  ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0') END)::bigint::text, \
                 (SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming')::text, \
                 current_setting('synchronous_standby_names'), \
                 coalesce((SELECT string_agg(slot_name, ',') FROM pg_replication_slots), ''), \
                 (CASE WHEN pg_is_in_recovery() THEN coalesce((SELECT received_tli FROM pg_stat_wal_receiver), (SELECT timeline_id FROM pg_control_checkpoint())) \
                  ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END)::text",
            )
            .await?;
        let row = rows.into_iter().next().unwrap_or_default();
        let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let in_recovery = col(0) == "true";
        let position: u64 = col(1).parse().unwrap_or(0);
        let streaming = col(2) != "0" && !col(2).is_empty();
        let sync_names = col(3);
        let slots: Vec<String> = col(4)
            .split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        let timeline: u32 = col(5).parse().unwrap_or(0);
        let (mut members, mut replicas, mut error) = (vec![], vec![], None);
        if instance == Instance::Cluster {
            members = self.read_members().await?;
            error = self.read_error().await?;
            if !in_recovery {
                replicas = self.read_replicas().await?;
            }
        }
        {
            let mut seen = lock(&self.seen);
            *seen = Seen {
                in_recovery: Some(in_recovery),
                position,
                timeline,
                streaming,
                members,
                replicas,
                error,
            };
        }
        if instance == Instance::Local {
            // The node's own database is a primary; the loop never treats it as one.
            return Ok(Pg::Primary { sync_names, slots });
        }
        if in_recovery {
            let following = *lock(&self.following);
            let not_streaming_ms = {
                let mut since = lock(&self.not_streaming_since);
                if streaming || following.is_none() {
                    *since = None;
                    0
                } else {
                    since.get_or_insert_with(Instant::now).elapsed().as_millis() as u64
                }
            };
            Ok(Pg::Standby {
                position,
                following,
                streaming,
                not_streaming_ms,
            })
        } else {
            Ok(Pg::Primary { sync_names, slots })
        }
    }

    async fn read_members(&self) -> Result<Vec<Member>, PgError> {
        match self
            .sql("SELECT peer::text, address, in_set::text FROM causeway.members ORDER BY peer")
            .await
        {
            Ok(rows) => Ok(rows
                .into_iter()
                .filter_map(|r| {
                    let peer = r.first()?.as_ref()?.parse().ok()?;
                    let address = r.get(1)?.as_ref()?.parse().ok()?;
                    let in_set = r.get(2)?.as_deref() == Some("true");
                    Some(Member {
                        peer,
                        address,
                        in_set,
                    })
                })
                .collect()),
            Err(e) if e.code.as_deref() == Some("42P01") || e.code.as_deref() == Some("3F000") => {
                Ok(vec![])
            }
            Err(e) => Err(e),
        }
    }

    async fn read_error(&self) -> Result<Option<String>, PgError> {
        match self
            .sql("SELECT error FROM causeway_schema.state WHERE error IS NOT NULL LIMIT 1")
            .await
        {
            Ok(rows) => Ok(rows
                .into_iter()
                .next()
                .and_then(|r| r.into_iter().next().flatten())),
            Err(e) if e.code.as_deref() == Some("42P01") || e.code.as_deref() == Some("3F000") => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn read_replicas(&self) -> Result<Vec<Replica>, PgError> {
        let rows = self
            .sql(
                "SELECT application_name, state, sync_state, \
                 coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn), 0)::bigint::text \
                 FROM pg_stat_replication",
            )
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let name = r.first()?.clone()?;
                let peer = name.strip_prefix("causeway_peer")?.parse().ok()?;
                Some(Replica {
                    peer,
                    state: r.get(1)?.clone().unwrap_or_default(),
                    sync_state: r.get(2)?.clone().unwrap_or_default(),
                    flush_lag: r.get(3)?.as_deref()?.parse::<i64>().ok()?.max(0) as u64,
                })
            })
            .collect())
    }

    /// The ready master of the highest generation another node reports (fresh reports only).
    fn best_master(&self) -> Option<Upstream> {
        let reports = lock(&self.reports);
        reports
            .values()
            .filter(|(r, at)| at.elapsed() < FRESH && r.is_ready_master() && r.peer != self.me)
            .filter_map(|(r, _)| {
                Some(Upstream {
                    peer: r.peer,
                    generation: r.generation,
                    address: r.address?,
                })
            })
            .max_by_key(|u| u.generation)
    }

    /// Fresh reports from the other standbys of the synchronous set, for eligibility.
    fn rival_positions(&self) -> Vec<(usize, u64)> {
        let last_master = lock(&self.last_master).map(|(p, _)| p);
        let in_set: Vec<usize> = lock(&self.seen)
            .members
            .iter()
            .filter(|m| m.in_set)
            .map(|m| m.peer)
            .collect();
        lock(&self.reports)
            .values()
            .filter(|(r, at)| {
                at.elapsed() < FRESH
                    && r.peer != self.me
                    && r.role == Role::Standby
                    && r.member
                    && Some(r.peer) != last_master
                    && (in_set.is_empty() || in_set.contains(&r.peer))
            })
            .map(|(r, _)| (r.peer, r.position))
            .collect()
    }

    // ---- the loop ----

    async fn run_loop(self: Arc<Self>) {
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
            self.raise_or_lower(&o);
            if self.command_running.load(Ordering::SeqCst) {
                continue;
            }
            let action = decide::decide(&o);
            let _guard = self.act_lock.lock().await;
            if self.command_running.load(Ordering::SeqCst) {
                continue;
            }
            let started = Instant::now();
            let what = format!("{action:?}");
            match self.act(&o, action.clone()).await {
                Ok(detail) => {
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
    async fn act(&self, o: &Observed, action: Action) -> anyhow::Result<Option<String>> {
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
    async fn fencer(self: Arc<Self>) {
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

    async fn start_standby(&self, upstream: Option<Upstream>) -> anyhow::Result<()> {
        let tools = self.tools()?.clone();
        let data = self.layout.cluster();
        let conninfo = upstream
            .map(|u| self.conninfo_to(u.address))
            .unwrap_or_default();
        conf::write(&tools, &data, &self.settings(conninfo, String::new()))?;
        conf::write_standby_signal(&tools, &data)?;
        *lock(&self.following) = upstream.map(|u| u.peer);
        self.writable.store(false, Ordering::SeqCst);
        self.supervisor()?.start(&data).await?;
        Ok(())
    }

    async fn follow(&self, u: Upstream) -> anyhow::Result<()> {
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

    // ---- seal, then promote (section 3) ----

    /// Stops this standby receiving WAL from any master below `generation` and returns its
    /// final position. Answered for a candidate, and run by the candidate on itself.
    pub(crate) async fn seal_here(&self, generation: u64) -> anyhow::Result<Sealed> {
        let saved = self.saved();
        if !saved.member {
            bail!("Peer {} is not a member of the database cluster", self.me);
        }
        if generation < saved.sealed_at {
            bail!(
                "Peer {} is sealed at generation {}, above {generation}",
                self.me,
                saved.sealed_at
            );
        }
        if self.instance() != Instance::Cluster || lock(&self.seen).in_recovery != Some(true) {
            bail!("Peer {} is not a running standby", self.me);
        }
        self.save(|s| s.sealed_at = generation)?;
        let tools = self.tools()?.clone();
        conf::write(
            &tools,
            &self.layout.cluster(),
            &self.settings(String::new(), String::new()),
        )?;
        *lock(&self.following) = None;
        self.sql("SELECT pg_reload_conf()").await?;
        let deadline = Instant::now() + Duration::from_millis(1500);
        loop {
            let rows = self
                .sql("SELECT count(*)::text FROM pg_stat_wal_receiver")
                .await?;
            if rows
                .first()
                .and_then(|r| r.first())
                .and_then(|v| v.as_deref())
                == Some("0")
            {
                break;
            }
            if Instant::now() >= deadline {
                bail!("the WAL receiver did not stop within 1.5 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pos = self
            .sql(
                "SELECT pg_wal_lsn_diff(greatest(coalesce(pg_last_wal_receive_lsn(), '0/0'), coalesce(pg_last_wal_replay_lsn(), '0/0')), '0/0')::bigint::text",
            )
            .await?;
        let position = pos
            .first()
            .and_then(|r| r.first())
            .and_then(|v| v.as_deref())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(Sealed {
            position,
            timeline: lock(&self.seen).timeline,
        })
    }

    async fn promote(&self, generation: u64) -> anyhow::Result<String> {
        let mine = self.seal_here(generation).await?;
        let synchronous = self.synchronous();
        let last_master = lock(&self.last_master).map(|(p, _)| p);
        let members = lock(&self.seen).members.clone();
        let set: Vec<usize> = members
            .iter()
            .filter(|m| m.in_set)
            .map(|m| m.peer)
            .collect();
        let d = set.len().max(1);
        let quorum = conf::seal_quorum(d, synchronous);
        let targets: Vec<usize> = set
            .iter()
            .copied()
            .filter(|&p| p != self.me && Some(p) != last_master)
            .collect();
        let rpc = self.node.leases().rpc().clone();
        let answers = rpc
            .call_quorum(
                &seal_endpoint(),
                &targets,
                &SealRequest { generation },
                targets.len(),
                Duration::from_millis(1000),
            )
            .await;
        let mut sealed = 1; // this node
        let mut refusals = vec![];
        for (peer, answer) in answers {
            match answer {
                Ok(s) if s.position > mine.position => {
                    self.step_aside(Duration::from_secs(2));
                    bail!(
                        "Peer {peer} is further ({}) than this node ({}): it should be master; gave up the lease",
                        lsn(s.position),
                        lsn(mine.position)
                    );
                }
                Ok(_) => sealed += 1,
                Err(e) => refusals.push(format!("{e}")),
            }
        }
        if sealed < quorum {
            self.step_aside(Duration::from_secs(1));
            bail!(
                "sealed {sealed} of the {quorum} members a promotion needs ({}); gave up the lease",
                refusals.join("; ")
            );
        }
        if self.lease.state().holder != (Holder::Me { generation }) {
            bail!("the lease at generation {generation} was lost before the promotion");
        }
        self.save(|s| s.promoted_at = Some(generation))?;
        self.sql_within("SELECT pg_promote(true, 30)", Duration::from_secs(31))
            .await
            .context("pg_promote")?;
        if self.lease.state().holder != (Holder::Me { generation }) {
            self.fence("the lease was lost during the promotion").await;
            bail!("the lease at generation {generation} was lost during the promotion");
        }
        self.writable.store(true, Ordering::SeqCst);
        self.counters.failovers.fetch_add(1, Ordering::Relaxed);
        // The first master of a cluster creates the member list with itself in it.
        self.sql_within(
            &format!(
                "CREATE SCHEMA IF NOT EXISTS causeway; \
                 CREATE TABLE IF NOT EXISTS causeway.members (peer int PRIMARY KEY, address text NOT NULL, in_set bool NOT NULL DEFAULT false, added_at timestamptz NOT NULL DEFAULT now()); \
                 CREATE TABLE IF NOT EXISTS causeway.masters (generation bigint PRIMARY KEY, peer int NOT NULL, timeline int NOT NULL, at timestamptz NOT NULL DEFAULT now()); \
                 INSERT INTO causeway.members (peer, address, in_set) VALUES ({me}, {addr}, true) ON CONFLICT (peer) DO UPDATE SET address = excluded.address, in_set = true; \
                 INSERT INTO causeway.masters (generation, peer, timeline) VALUES ({generation}, {me}, ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int) ON CONFLICT DO NOTHING",
                me = self.me,
                addr = literal(&self.pg_address().to_string()),
            ),
            // A synchronous commit waits for a standby: not forever, the loop goes on.
            Duration::from_secs(5),
        )
        .await
        .ok();
        *lock(&self.following) = None;
        self.node.alarms().lower(alarm::FENCED, "database");
        Ok(format!(
            "Promoted this node to master: lease held at generation {generation}, {sealed} of {} members sealed, position {}",
            d,
            lsn(mine.position)
        ))
    }

    /// The master's synchronous set, slots, and members that have caught up.
    async fn configure(&self, o: &Observed) -> anyhow::Result<String> {
        let tools = self.tools()?.clone();
        conf::write(
            &tools,
            &self.layout.cluster(),
            &self.settings(String::new(), o.wanted_sync_names.clone()),
        )?;
        self.sql("SELECT pg_reload_conf()").await?;
        for slot in &o.wanted_slots {
            self.sql(&format!(
                "SELECT pg_create_physical_replication_slot({}, true) WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {})",
                literal(slot),
                literal(slot)
            ))
            .await?;
        }
        Ok(format!(
            "Synchronous standbys: '{}'; slots: {}",
            o.wanted_sync_names,
            o.wanted_slots.join(", ")
        ))
    }

    /// Members that joined and now stream in sync enter the synchronous set; slots of
    /// nodes that left are dropped. Run by the master every cycle.
    async fn tend_members(&self) {
        if !self.writable.load(Ordering::SeqCst) {
            return;
        }
        let (members, replicas) = {
            let s = lock(&self.seen);
            (s.members.clone(), s.replicas.clone())
        };
        for m in members.iter().filter(|m| !m.in_set) {
            if replicas
                .iter()
                .any(|r| r.peer == m.peer && r.state == "streaming" && r.flush_lag <= IN_SYNC_BYTES)
            {
                let _ = self
                    .sql_within(
                        &format!(
                            "UPDATE causeway.members SET in_set = true WHERE peer = {}",
                            m.peer
                        ),
                        Duration::from_secs(2),
                    )
                    .await;
                info!(target: LOG, event = "Database member in sync", peer = m.peer, "");
            }
        }
        let _ = self
            .sql(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE NOT active AND slot_name LIKE 'causeway_peer%' \
                 AND substr(slot_name, 14)::int NOT IN (SELECT peer FROM causeway.members)",
            )
            .await;
    }

    // ---- rejoin (section 4) ----

    async fn rejoin(&self, u: Upstream, why: &str) -> anyhow::Result<String> {
        let sup = self.supervisor()?.clone();
        sup.stop(Signal::SIGINT, Duration::from_secs(10)).await;
        self.drop_conn().await;
        let tools = self.tools()?.clone();
        let data = self.layout.cluster();
        let source = format!(
            "host={} port={} user=postgres dbname=postgres sslmode=verify-ca sslcert={} sslkey={} sslrootcert={} connect_timeout=5",
            u.address.ip(),
            u.address.port(),
            self.layout.cert("client.crt").display(),
            self.layout.cert("client.key").display(),
            self.layout.cert("ca.crt").display()
        );
        let rewound = tools
            .run(
                "pg_rewind",
                &[
                    format!("--target-pgdata={}", data.display()),
                    format!("--source-server={source}"),
                ],
                Duration::from_secs(300),
                |_| {},
            )
            .await;
        let how = match rewound {
            Ok(_) => {
                self.counters.rewinds_ok.fetch_add(1, Ordering::Relaxed);
                "pg_rewind".to_string()
            }
            Err(e) => {
                self.counters.rewinds_failed.fetch_add(1, Ordering::Relaxed);
                warn!(target: LOG, event = "Database rewind failed", reason = %format!("{e:#}"), "Copying the database from the master instead");
                if let Err(copy) = self.copy_from(u.address, |_| {}).await {
                    let why = format!(
                        "pg_rewind failed ({e:#}) and so did a fresh copy ({copy:#}); retried by itself"
                    );
                    self.node
                        .alarms()
                        .raise(alarm::DATABASE_FAILURE, "database", &why);
                    // Retried on a later cycle, not in a tight loop.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    bail!(why);
                }
                format!("a fresh copy (pg_rewind failed: {e:#})")
            }
        };
        // pg_rewind copies the source's configuration files: Causeway's are written again.
        self.save(|s| s.promoted_at = None)?;
        self.node
            .alarms()
            .lower(alarm::DATABASE_FAILURE, "database");
        self.start_standby(Some(u)).await?;
        Ok(format!(
            "Rejoined as a standby of Peer {} ({why}) with {how}",
            u.peer
        ))
    }

    /// `pg_basebackup` from `from` into the cluster directory (the old one kept aside as
    /// `cluster.failed` until the copy is complete).
    pub(crate) async fn copy_from(
        &self,
        from: SocketAddr,
        mut progress: impl FnMut(u32) + Send,
    ) -> anyhow::Result<()> {
        let tools = self.tools()?.clone();
        let data = self.layout.cluster();
        let fresh = self.layout.root.join("cluster.new");
        let _ = std::fs::remove_dir_all(&fresh);
        std::fs::create_dir_all(&fresh)?;
        tools.own(&fresh, 0o700)?;
        let conninfo = format!(
            "host={} port={} user=postgres dbname=postgres sslmode=verify-ca sslcert={} sslkey={} sslrootcert={} connect_timeout=5 application_name=causeway_copy",
            from.ip(),
            from.port(),
            self.layout.cert("client.crt").display(),
            self.layout.cert("client.key").display(),
            self.layout.cert("ca.crt").display()
        );
        let result = tools
            .run(
                "pg_basebackup",
                &[
                    "-d".into(),
                    conninfo,
                    "-D".into(),
                    fresh.display().to_string(),
                    "-X".into(),
                    "stream".into(),
                    "-c".into(),
                    "fast".into(),
                    "-P".into(),
                ],
                Duration::from_secs(3600),
                |line| {
                    if let Some(p) = percent(line) {
                        progress(p)
                    }
                },
            )
            .await;
        if let Err(e) = result {
            self.counters
                .basebackups_failed
                .fetch_add(1, Ordering::Relaxed);
            let _ = std::fs::remove_dir_all(&fresh);
            return Err(e.context(format!("copying the database from {from}")));
        }
        self.counters.basebackups_ok.fetch_add(1, Ordering::Relaxed);
        let failed = self.layout.root.join("cluster.failed");
        let _ = std::fs::remove_dir_all(&failed);
        if data.exists() {
            std::fs::rename(&data, &failed)?;
        }
        std::fs::rename(&fresh, &data)?;
        let _ = std::fs::remove_dir_all(&failed);
        Ok(())
    }

    // ---- reports, alarms, the endpoint's route ----

    pub(crate) fn my_report(&self) -> Report {
        let saved = self.saved();
        let seen = lock(&self.seen).clone();
        let instance = self.instance();
        let holder = self.lease.state().holder;
        let writable = self.writable.load(Ordering::SeqCst);
        let role = if self.command_running.load(Ordering::SeqCst) {
            Role::Busy
        } else {
            match instance {
                Instance::None => Role::Stopped,
                Instance::Local => Role::Local,
                Instance::Cluster if seen.in_recovery == Some(false) => Role::Master,
                Instance::Cluster => Role::Standby,
            }
        };
        let ready = role == Role::Master
            && writable
            && matches!(holder, Holder::Me { generation } if Some(generation) == saved.promoted_at);
        let following = *lock(&self.following);
        let generation = match role {
            Role::Master => saved.promoted_at.unwrap_or(0),
            _ => following
                .and_then(|p| lock(&self.reports).get(&p).map(|(r, _)| r.generation))
                .unwrap_or(0),
        };
        Report {
            peer: self.me,
            member: saved.member,
            role,
            generation,
            ready,
            address: saved.localnode.as_ref().map(|_| self.pg_address()),
            timeline: seen.timeline,
            position: seen.position,
            upstream: following,
            streaming: seen.streaming,
            sealed_at: saved.sealed_at,
            eligible: false,
            members: seen.members,
            replicas: if role == Role::Master {
                seen.replicas
            } else {
                vec![]
            },
            error: seen.error,
        }
    }

    /// The master every node's endpoint leads to: the ready master of the highest
    /// generation (this node included); a node outside the cluster leads to its own database.
    pub(crate) fn compute_route(&self) -> Option<(SocketAddr, u64)> {
        if !self.saved().member {
            return (self.instance() == Instance::Local).then(|| (self.pg_address(), 0));
        }
        let mine = self.my_report();
        let mut best = mine
            .is_ready_master()
            .then(|| (self.pg_address(), mine.generation));
        if let Some(u) = self.best_master() {
            if best.is_none_or(|(_, g)| u.generation > g) {
                best = Some((u.address, u.generation));
            }
        }
        // A master this node's lease view says has been replaced is not routed to.
        match (self.lease.state().holder, best) {
            (Holder::Peer { generation, .. }, Some((_, g))) if generation > g => None,
            (_, b) => b,
        }
    }

    async fn reporter(self: Arc<Self>) {
        let rpc = self.node.leases().rpc().clone();
        let peers: Vec<usize> = self
            .node
            .leases()
            .all_peers()
            .into_iter()
            .filter(|&p| p != self.me)
            .collect();
        let mut every = tokio::time::interval(REPORT_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut route_every = tokio::time::interval(Duration::from_millis(50));
        route_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = route_every.tick() => {
                    let route = self.compute_route();
                    self.route.send_if_modified(|r| if *r != route { *r = route; true } else { false });
                    continue;
                }
                _ = every.tick() => {}
            }
            self.tend_members().await;
            let mut report = self.my_report();
            report.eligible = self.lease.state().is_mine() || report.role == Role::Standby;
            let _ = rpc
                .call_quorum(
                    &report_endpoint(),
                    &peers,
                    &report,
                    peers.len(),
                    Duration::from_millis(300),
                )
                .await;
        }
    }

    fn raise_or_lower(&self, o: &Observed) {
        let alarms = self.node.alarms();
        if !o.member {
            alarms.lower(alarm::NO_MASTER, "database");
            alarms.lower(alarm::EVEN, "database");
            *lock(&self.no_master_since) = None;
            return;
        }
        let route = self.compute_route();
        let mut since = lock(&self.no_master_since);
        if route.is_some() {
            *since = None;
            alarms.lower(alarm::NO_MASTER, "database");
        } else if since.get_or_insert_with(Instant::now).elapsed() > NO_MASTER_ALARM_AFTER {
            alarms.raise(
                alarm::NO_MASTER,
                "database",
                "no ready master: fewer than a majority of the peers reach each other, or too few standbys can be sealed",
            );
        }
        let members = lock(&self.seen).members.clone();
        if members.len() == 2 || members.len() == 4 {
            alarms.raise(
                alarm::EVEN,
                "database",
                &format!("{} database nodes", members.len()),
            );
        } else {
            alarms.lower(alarm::EVEN, "database");
        }
        if self.writable.load(Ordering::SeqCst) {
            let replicas = lock(&self.seen).replicas.clone();
            for m in members.iter().filter(|m| m.peer != self.me) {
                let subject = format!("Peer {}", m.peer);
                let replica = replicas.iter().find(|r| r.peer == m.peer);
                match replica.map(|r| r.flush_lag) {
                    Some(lag) if lag > alarm::LAG_ALARM_BYTES => {
                        alarms.raise(
                            alarm::LAGGING,
                            &subject,
                            &format!("Peer {} is {lag} bytes behind the master", m.peer),
                        );
                    }
                    Some(lag) if lag > alarm::LAG_ALARM_BYTES / 2 => {}
                    _ => {
                        alarms.lower(alarm::LAGGING, &subject);
                    }
                }
                if replica.is_some_and(|r| r.state == "streaming") {
                    alarms.lower(alarm::OUT_OF_SYNC, &subject);
                } else {
                    alarms.raise(
                        alarm::OUT_OF_SYNC,
                        &subject,
                        &format!("Peer {} is not streaming from the master", m.peer),
                    );
                }
            }
        } else {
            for m in &members {
                alarms.lower(alarm::OUT_OF_SYNC, &format!("Peer {}", m.peer));
                alarms.lower(alarm::LAGGING, &format!("Peer {}", m.peer));
            }
        }
        match &lock(&self.seen).error {
            Some(e) => {
                alarms.raise(alarm::SCHEMA, "database", e);
            }
            None => {
                alarms.lower(alarm::SCHEMA, "database");
            }
        }
    }

    fn serve_peers(self: &Arc<Self>) {
        let rpc = self.node.leases().rpc().clone();
        let me = Arc::downgrade(self);
        rpc.serve(&report_endpoint(), move |from, report: Report| {
            let me = me.clone();
            async move {
                if let Some(svc) = me.upgrade() {
                    if report.peer == from {
                        lock(&svc.reports).insert(from, (report, Instant::now()));
                    }
                }
                Ok(())
            }
        });
        let me = Arc::downgrade(self);
        rpc.serve(&seal_endpoint(), move |from, req: SealRequest| {
            let me = me.clone();
            async move {
                let svc = me.upgrade().ok_or("shutting down")?;
                let _guard = tokio::time::timeout(Duration::from_millis(800), svc.act_lock.lock())
                    .await
                    .map_err(|_| format!("Peer {} is busy", svc.me))?;
                let sealed = svc
                    .seal_here(req.generation)
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                info!(target: LOG, event = "Database sealed", generation = req.generation, candidate = from,
                    position = %lsn(sealed.position), "");
                Ok(sealed)
            }
        });
        let me = Arc::downgrade(self);
        rpc.serve(&join_endpoint(), move |from, req: JoinRequest| {
            let me = me.clone();
            async move {
                let svc = me.upgrade().ok_or("shutting down")?;
                svc.admit(from, req.address)
                    .await
                    .map_err(|e| format!("{e:#}"))
            }
        });
        let me = Arc::downgrade(self);
        rpc.serve(&remove_endpoint(), move |from, _req: RemoveRequest| {
            let me = me.clone();
            async move {
                let svc = me.upgrade().ok_or("shutting down")?;
                svc.drop_member(from).await.map_err(|e| format!("{e:#}"))
            }
        });
    }

    /// On the master: `peer` joins (outside the synchronous set until it has caught up).
    async fn admit(&self, peer: usize, address: SocketAddr) -> anyhow::Result<()> {
        if !self.my_report().is_ready_master() {
            bail!("Peer {} is not the master", self.me);
        }
        let members = lock(&self.seen).members.clone();
        if members.len() >= 5 && !members.iter().any(|m| m.peer == peer) {
            bail!("the database cluster has 5 nodes already, the most it can have");
        }
        let slot = conf::standby_name(peer);
        self.sql_within(
            &format!(
                "INSERT INTO causeway.members (peer, address, in_set) VALUES ({peer}, {}, false) \
                 ON CONFLICT (peer) DO UPDATE SET address = excluded.address, in_set = false; \
                 SELECT pg_create_physical_replication_slot({s}, true) WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {s})",
                literal(&address.to_string()),
                s = literal(&slot)
            ),
            Duration::from_secs(10),
        )
        .await
        .map_err(|e| anyhow!("adding Peer {peer} to the member list: {e}"))?;
        info!(target: LOG, event = "Database member added", peer, address = %address, "");
        Ok(())
    }

    /// On the master: `peer` leaves. Its slot goes once its standby has stopped.
    async fn drop_member(&self, peer: usize) -> anyhow::Result<()> {
        if !self.my_report().is_ready_master() {
            bail!("Peer {} is not the master", self.me);
        }
        let members = lock(&self.seen).members.clone();
        let rest: Vec<usize> = members
            .iter()
            .filter(|m| m.peer != peer && m.in_set)
            .map(|m| m.peer)
            .collect();
        // The synchronous set loses it first, so no commit waits for a node that is going.
        let tools = self.tools()?.clone();
        conf::write(
            &tools,
            &self.layout.cluster(),
            &self.settings(
                String::new(),
                conf::sync_names(self.me, &rest, self.synchronous()),
            ),
        )?;
        self.sql("SELECT pg_reload_conf()").await?;
        self.sql_within(
            &format!("DELETE FROM causeway.members WHERE peer = {peer}"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|e| anyhow!("removing Peer {peer} from the member list: {e}"))?;
        info!(target: LOG, event = "Database member removed", peer, "");
        Ok(())
    }

    /// Alarm 21014 from the installed certificates: checked at start and every 6 hours
    /// (and after `certs`), raised from 30 days before one expires.
    async fn watch_certificates(self: Arc<Self>) {
        loop {
            self.check_installed_certificates();
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(6 * 3600)) => {}
            }
        }
    }

    pub(crate) fn check_installed_certificates(&self) {
        let saved = self.saved();
        if saved.certs.is_empty() {
            return;
        }
        let c = |n: &str| self.layout.cert(n);
        let (key, crt, ca) = (c("client.key"), c("client.crt"), c("ca.crt"));
        let server = (saved.certs.len() == 5).then(|| (c("server.key"), c("server.crt")));
        let problem =
            crate::status::check_certs(server.as_ref().map(|(k, c)| (k, c)), (&key, &crt, &ca))
                .or_else(|| {
                    let mut files = vec![crt.clone()];
                    if let Some((_, s)) = &server {
                        files.push(s.clone());
                    }
                    files
                        .iter()
                        .find_map(|f| crate::status::expires_within(f, 30))
                });
        match problem {
            Some(p) => {
                self.node.alarms().raise(alarm::CERTIFICATES, "database", &p);
            }
            None => {
                self.node.alarms().lower(alarm::CERTIFICATES, "database");
            }
        }
    }

    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    pub(crate) fn reports(&self) -> Vec<(Report, Duration)> {
        lock(&self.reports)
            .values()
            .map(|(r, at)| (r.clone(), at.elapsed()))
            .collect()
    }

    pub(crate) fn schema_dir(&self) -> Option<PathBuf> {
        self.section
            .schema_dir
            .as_ref()
            .map(|d| self.node.config().data_path(d))
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
fn percent(line: &str) -> Option<u32> {
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
