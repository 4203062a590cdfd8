//! Observing: what runs, what its SQL says, the member list, the best master to follow.

use std::sync::atomic::Ordering;

use causeway_consensus::LeaderLease;
use tokio::time::Instant;
use tracing::warn;

use crate::agent::{lock, DbService, Seen, FRESH};
use crate::conf;
use crate::decide::{Instance, Observed, Pg, Upstream};
use crate::model::*;
use crate::pgwire::PgError;
use crate::supervisor::Child;
use crate::LOG;

impl DbService {
    pub(crate) fn instance(&self) -> Instance {
        match self.sup.as_ref().map(|s| s.current()) {
            Some(Child::Running { data, .. }) if data == self.layout.local() => Instance::Local,
            Some(Child::Running { .. }) => Instance::Cluster,
            _ => Instance::None,
        }
    }

    pub(crate) async fn observe(&self) -> Observed {
        let saved = self.saved();
        if let Some(sup) = &self.sup {
            if let Child::Exited { data, status } = sup.current() {
                warn!(target: LOG, data = %data.display(), status = %status, "PostgreSQL exited");
                // Exited before it ever answered: its data may be what it cannot start from.
                if !self.answered.swap(false, Ordering::SeqCst) {
                    self.start_failures.fetch_add(1, Ordering::SeqCst);
                }
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
                    self.answered.store(true, Ordering::SeqCst);
                    self.start_failures.store(0, Ordering::SeqCst);
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
            start_failures: self.start_failures.load(Ordering::SeqCst),
            wanted_sync_names: conf::sync_names(self.me, &set, self.synchronous()),
            wanted_slots: members
                .iter()
                .filter(|m| m.peer != self.me)
                .map(|m| conf::standby_name(m.peer))
                .collect(),
        }
    }

    pub(crate) async fn observe_sql(&self, instance: Instance) -> Result<Pg, PgError> {
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

    pub(crate) async fn read_members(&self) -> Result<Vec<Member>, PgError> {
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

    pub(crate) async fn read_error(&self) -> Result<Option<String>, PgError> {
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

    pub(crate) async fn read_replicas(&self) -> Result<Vec<Replica>, PgError> {
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
    pub(crate) fn best_master(&self) -> Option<Upstream> {
        let reports = lock(&self.reports);
        reports
            .values()
            .filter(|(r, at)| at.elapsed() < FRESH && r.is_ready_master() && r.peer != self.me)
            .filter_map(|(r, _)| {
                Some(Upstream {
                    peer: r.peer,
                    generation: r.generation,
                    address: r.address?,
                    checkpointed: r.checkpointed,
                })
            })
            .max_by_key(|u| u.generation)
    }

    /// Fresh reports from the other standbys of the synchronous set, for eligibility.
    pub(crate) fn rival_positions(&self) -> Vec<(usize, u64)> {
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
}
