//! What members tell each other (reports, seals, join, remove), the alarms that follow
//! from it, and the endpoint's route.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use causeway_consensus::{Holder, LeaderLease};
use tokio::time::Instant;
use tracing::info;

use crate::agent::{lock, DbService, NO_MASTER_ALARM_AFTER, REPORT_EVERY};
use crate::catalogue as alarm;
use crate::conf;
use crate::decide::{Instance, Observed};
use crate::model::*;
use crate::pgwire::literal;
use crate::LOG;
use std::path::PathBuf;

impl DbService {
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
            checkpointed: ready
                && saved.promoted_at == Some(self.checkpointed_at.load(Ordering::SeqCst)),
            address: saved.localnode.as_ref().map(|_| self.pg_address()),
            timeline: seen.timeline,
            position: seen.position,
            upstream: following,
            streaming: seen.streaming,
            sealed_at: saved.sealed_at,
            eligible: self.eligible.load(Ordering::Relaxed),
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

    /// Recomputes where the endpoint leads; connections routed to another generation are
    /// closed by the endpoint when it changes.
    pub(crate) fn refresh_route(&self) {
        let route = self.compute_route();
        self.route.send_if_modified(|r| {
            if *r != route {
                *r = route;
                true
            } else {
                false
            }
        });
    }

    pub(crate) async fn reporter(self: Arc<Self>) {
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
                    self.refresh_route();
                    continue;
                }
                _ = every.tick() => {}
                // A promotion, a fence or a new role is told at once, not at the next tick:
                // every endpoint's route waits on it.
                _ = self.report_now.notified() => {}
            }
            // Sent without waiting for the answers: a dead peer's timeout must not delay
            // the next report to the live ones (a round ends within 300 ms).
            let report = self.my_report();
            let (rpc, peers) = (rpc.clone(), peers.clone());
            self.tasks.spawn(async move {
                let _ = rpc
                    .call_quorum(
                        &report_endpoint(),
                        &peers,
                        &report,
                        peers.len(),
                        Duration::from_millis(300),
                    )
                    .await;
            });
            self.tend_members().await;
        }
    }

    pub(crate) fn raise_or_lower(&self, o: &Observed) {
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

    pub(crate) fn serve_peers(self: &Arc<Self>) {
        let rpc = self.node.leases().rpc().clone();
        let me = Arc::downgrade(self);
        rpc.serve(&report_endpoint(), move |from, report: Report| {
            let me = me.clone();
            async move {
                if let Some(svc) = me.upgrade() {
                    if report.peer == from {
                        lock(&svc.reports).insert(from, (report, Instant::now()));
                        svc.refresh_route();
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
    pub(crate) async fn admit(&self, peer: usize, address: SocketAddr) -> anyhow::Result<()> {
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
    pub(crate) async fn drop_member(&self, peer: usize) -> anyhow::Result<()> {
        // With the loop's actions, so its `configure` cannot put the leaving node back into
        // the synchronous set between these two steps.
        let _guard = tokio::time::timeout(Duration::from_secs(5), self.act_lock.lock())
            .await
            .map_err(|_| anyhow!("Peer {} is busy: try again", self.me))?;
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
    pub(crate) async fn watch_certificates(self: Arc<Self>) {
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
                self.node
                    .alarms()
                    .raise(alarm::CERTIFICATES, "database", &p);
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
