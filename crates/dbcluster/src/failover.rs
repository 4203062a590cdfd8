//! Seal, then promote (docs/dbcluster.md, section 3), the master's configuration, and
//! rejoin by `pg_rewind` or a fresh copy (section 4).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use causeway_consensus::{Holder, LeaderLease};
use nix::sys::signal::Signal;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::agent::{lock, percent, DbService, IN_SYNC_BYTES};
use crate::catalogue as alarm;
use crate::conf;
use crate::decide::{Instance, Observed, Upstream};
use crate::model::*;
use crate::pgwire::literal;
use crate::LOG;

impl DbService {
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
        let deadline = Instant::now() + Duration::from_millis(800);
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
                bail!("the WAL receiver did not stop within 0.8 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The position once replay has stopped moving: a standby that has just restarted
        // replays its own WAL for a while, and an understated position could let a candidate
        // behind it promote.
        let mut position = self.sealed_position().await?;
        let settle = Instant::now() + Duration::from_millis(400);
        loop {
            tokio::time::sleep(Duration::from_millis(40)).await;
            let now = self.sealed_position().await?;
            if now == position || Instant::now() >= settle {
                position = position.max(now);
                break;
            }
            position = now;
        }
        Ok(Sealed {
            position,
            timeline: lock(&self.seen).timeline,
        })
    }

    async fn sealed_position(&self) -> anyhow::Result<u64> {
        let pos = self
            .sql(
                "SELECT pg_wal_lsn_diff(greatest(coalesce(pg_last_wal_receive_lsn(), '0/0'), coalesce(pg_last_wal_replay_lsn(), '0/0')), '0/0')::bigint::text",
            )
            .await?;
        Ok(pos
            .first()
            .and_then(|r| r.first())
            .and_then(|v| v.as_deref())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    pub(crate) async fn promote(&self, generation: u64) -> anyhow::Result<String> {
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
                Duration::from_millis(1600),
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
        self.checkpoint_after_promotion(generation);
        Ok(format!(
            "Promoted this node to master: lease held at generation {generation}, {sealed} of {} members sealed, position {}",
            d,
            lsn(mine.position)
        ))
    }

    /// A checkpoint right after a promotion, on a connection of its own (it may take a
    /// while, and the loop's connection must stay free): until it completes, the control
    /// file still shows the old timeline, and a former master rewinding from this node would
    /// be given a data directory it cannot start from (Patroni does the same).
    fn checkpoint_after_promotion(&self, generation: u64) {
        let socket = self.layout.socket(self.section.port);
        let done = self.checkpointed_at.clone();
        self.tasks.spawn(async move {
            let login = crate::pgwire::Login {
                application_name: "causeway-checkpoint",
                ..Default::default()
            };
            for attempt in 0..5u64 {
                let result = async {
                    let mut c =
                        crate::pgwire::PgConn::unix(&socket, &login, Duration::from_secs(2)).await?;
                    let r = c.query("CHECKPOINT").await;
                    c.close().await;
                    r
                }
                .await;
                match result {
                    Ok(_) => {
                        done.store(generation, Ordering::SeqCst);
                        info!(target: LOG, event = "Database checkpoint after promotion", generation, "");
                        return;
                    }
                    Err(e) => {
                        warn!(target: LOG, reason = %e, attempt, "Checkpoint after promotion failed");
                        tokio::time::sleep(Duration::from_millis(500 * (attempt + 1))).await;
                    }
                }
            }
        });
    }

    /// The master's synchronous set, slots, and members that have caught up.
    pub(crate) async fn configure(&self, o: &Observed) -> anyhow::Result<String> {
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
    pub(crate) async fn tend_members(&self) {
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

    pub(crate) async fn rejoin(&self, u: Upstream, why: &str) -> anyhow::Result<String> {
        if !u.checkpointed {
            bail!(
                "waiting for Peer {}'s checkpoint after its promotion before rejoining",
                u.peer
            );
        }
        let copy_only =
            self.start_failures.load(Ordering::SeqCst) >= crate::decide::START_FAILURES_BEFORE_COPY;
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
        let rewound = if copy_only {
            Err(anyhow!(
                "PostgreSQL did not start from its data after the last rejoin"
            ))
        } else {
            tools
                .run(
                    "pg_rewind",
                    &[
                        format!("--target-pgdata={}", data.display()),
                        format!("--source-server={source}"),
                    ],
                    Duration::from_secs(300),
                    |_| {},
                )
                .await
        };
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
        self.start_failures.store(0, Ordering::SeqCst);
        self.start_standby(Some(u)).await?;
        Ok(format!(
            "Rejoined as a standby of Peer {} ({why}) with {how}",
            u.peer
        ))
    }

    /// `pg_basebackup` from the master at `from` (TLS, the client certificate) into the
    /// cluster directory.
    pub(crate) async fn copy_from(
        &self,
        from: SocketAddr,
        progress: impl FnMut(u32) + Send,
    ) -> anyhow::Result<()> {
        let conninfo = format!(
            "host={} port={} user=postgres dbname=postgres sslmode=verify-ca sslcert={} sslkey={} sslrootcert={} connect_timeout=5 application_name=causeway_copy",
            from.ip(),
            from.port(),
            self.layout.cert("client.crt").display(),
            self.layout.cert("client.key").display(),
            self.layout.cert("ca.crt").display()
        );
        self.copy_into_cluster(conninfo, &from.to_string(), progress)
            .await
    }

    /// `pg_basebackup` from `conninfo` into the cluster directory; the old one is kept aside
    /// as `cluster.failed` until the copy is complete.
    pub(crate) async fn copy_into_cluster(
        &self,
        conninfo: String,
        what: &str,
        mut progress: impl FnMut(u32) + Send,
    ) -> anyhow::Result<()> {
        let tools = self.tools()?.clone();
        let data = self.layout.cluster();
        let fresh = self.layout.root.join("cluster.new");
        let _ = std::fs::remove_dir_all(&fresh);
        std::fs::create_dir_all(&fresh)?;
        tools.own(&fresh, 0o700)?;
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
            return Err(e.context(format!("copying the database from {what}")));
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
}
