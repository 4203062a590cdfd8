//! The seed's commands (`database cluster …`, docs/dbcluster.md section 8), run on the node
//! they name. `initialize` and `join` return once started; `status` shows their progress
//! in `Last command` until `(Success)` or `(Failed: …)`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use causeway_common::error::{ErrorCode, Refusal};
use causeway_consensus::LeaderLease;
use nix::sys::signal::Signal;
use tracing::info;

use crate::agent::{lock, now_ms, DbService};
use crate::model::*;
use crate::LOG;

type Answer = Result<String, Refusal>;

fn internal(e: anyhow::Error) -> Refusal {
    Refusal::new(ErrorCode::Internal, format!("{e:#}"))
}

impl DbService {
    /// Runs `database cluster <words…>`; the answer is the line the CLI prints.
    pub async fn command(self: &Arc<Self>, words: &[String]) -> Answer {
        let w: Vec<&str> = words.iter().map(String::as_str).collect();
        match w.as_slice() {
            ["localnode", interface] => self.localnode(interface).await,
            ["certs", files @ ..] if files.len() == 3 || files.len() == 5 => {
                self.certs(files).await
            }
            ["certs", ..] => Err(Refusal::invalid(
                "certs takes 3 files (<client_key> <client_crt> <ca_crt>) or 5 (<server_key> <server_crt> <client_key> <client_crt> <ca_crt>)",
            )),
            ["initialize"] => self.initialize().await,
            ["join", master] => self.join(master).await,
            ["remove"] => self.remove().await,
            ["clear", "error"] => self.clear_error().await,
            ["upgrade_schema"] => self.upgrade_schema().await,
            _ => Err(Refusal::invalid(format!(
                "unknown command 'database cluster {}': the commands are localnode <interface>, certs …, initialize, join <master address>, status, clear error, upgrade_schema, remove",
                words.join(" ")
            ))),
        }
    }

    fn refuse_if_member(&self) -> Result<(), Refusal> {
        if self.saved().member {
            return Err(Refusal::conflict(
                "this node is in the database cluster: run 'database cluster remove' first",
            ));
        }
        Ok(())
    }

    fn refuse_if_busy(&self) -> Result<(), Refusal> {
        if self.command_running.load(Ordering::SeqCst) {
            let last = self
                .saved()
                .last_command
                .map(|l| l.command)
                .unwrap_or_default();
            return Err(Refusal::conflict(format!(
                "'{last}' is still running: see 'database cluster status'"
            )));
        }
        Ok(())
    }

    fn refuse_without_postgres(&self) -> Result<(), Refusal> {
        match &self.tools {
            Ok(_) if self.sup.is_some() => Ok(()),
            Ok(_) => Err(Refusal::unavailable(
                "PostgreSQL is not available on this node",
            )),
            Err(why) => Err(Refusal::unavailable(why.clone())),
        }
    }

    fn refuse_without_setup(&self) -> Result<(), Refusal> {
        let s = self.saved();
        if s.localnode.is_none() {
            return Err(Refusal::conflict(
                "no interface is set: run 'database cluster localnode <interface>' first",
            ));
        }
        if s.certs.len() != 5 {
            return Err(Refusal::conflict(
                "a database node needs its server and client certificates: run 'database cluster certs <server_key> <server_crt> <client_key> <client_crt> <ca_crt>' first",
            ));
        }
        Ok(())
    }

    fn record(&self, command: &str, result: &str) {
        let entry = LastCommand {
            command: command.to_string(),
            result: result.to_string(),
            at_ms: now_ms(),
        };
        if let Err(e) = self.save(|s| s.last_command = Some(entry)) {
            tracing::warn!(target: LOG, reason = %format!("{e:#}"), "Recording the last command failed");
        }
    }

    async fn localnode(&self, interface: &str) -> Answer {
        self.refuse_if_member()?;
        self.refuse_if_busy()?;
        let ip = crate::tools::interface_address(interface)
            .map_err(|e| Refusal::invalid(format!("{e:#}")))?;
        let command = format!("database cluster localnode {interface}");
        self.save(|s| s.localnode = Some(interface.to_string()))
            .map_err(internal)?;
        self.resolve_listen_ip();
        // The node's own database listens there from now on.
        let _guard = self.act_lock.lock().await;
        if let Some(sup) = &self.sup {
            if sup.running_pid().is_some() {
                sup.stop(Signal::SIGINT, Duration::from_secs(10)).await;
                *self.conn.lock().await = None;
            }
        }
        self.wake();
        self.record(&command, "Success");
        Ok(format!("Interface set to {interface} ({ip})"))
    }

    async fn certs(&self, files: &[&str]) -> Answer {
        self.refuse_if_busy()?;
        let command = format!("database cluster certs {}", files.join(" "));
        let paths: Vec<PathBuf> = files.iter().map(PathBuf::from).collect();
        let (server, client) = if paths.len() == 5 {
            (
                Some((&paths[0], &paths[1])),
                (&paths[2], &paths[3], &paths[4]),
            )
        } else {
            (None, (&paths[0], &paths[1], &paths[2]))
        };
        let problems = crate::status::check_certs(server, client);
        if let Some(p) = problems {
            self.record(&command, &format!("Failed: {p}"));
            return Err(Refusal::invalid(p));
        }
        let tools = self
            .tools
            .as_ref()
            .map_err(|e| Refusal::unavailable(e.clone()))?;
        let mut copies: Vec<(&PathBuf, &str)> = vec![];
        if let Some((key, crt)) = server {
            copies.push((key, "server.key"));
            copies.push((crt, "server.crt"));
        }
        copies.push((client.0, "client.key"));
        copies.push((client.1, "client.crt"));
        copies.push((client.2, "ca.crt"));
        for (from, name) in copies {
            let to = self.layout.cert(name);
            std::fs::copy(from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))
                .map_err(internal)?;
            tools.own(&to, 0o600).map_err(internal)?;
        }
        let names: Vec<String> = paths
            .iter()
            .map(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        self.save(|s| s.certs = names).map_err(internal)?;
        self.check_installed_certificates();
        // Postgres reads its TLS files at start: restart the node's own database; a
        // member's instance takes them with a reload.
        let _guard = self.act_lock.lock().await;
        if let Some(sup) = &self.sup {
            if sup.running_pid().is_some() && !self.saved().member {
                sup.stop(Signal::SIGINT, Duration::from_secs(10)).await;
                *self.conn.lock().await = None;
            } else if sup.running_pid().is_some() {
                let _ = self.sql("SELECT pg_reload_conf()").await;
            }
        }
        self.wake();
        self.record(&command, "Success");
        Ok("Certificates installed".into())
    }

    async fn initialize(self: &Arc<Self>) -> Answer {
        self.refuse_if_member()?;
        self.refuse_if_busy()?;
        self.refuse_without_postgres()?;
        self.refuse_without_setup()?;
        if let Some((r, _)) = self
            .reports()
            .into_iter()
            .find(|(r, age)| *age < crate::agent::FRESH && r.is_ready_master())
        {
            let addr = r.address.map(|a| a.ip().to_string()).unwrap_or_default();
            return Err(Refusal::conflict(format!(
                "a database cluster exists: its master is {addr}: use 'database cluster join {addr}'"
            )));
        }
        let command = "database cluster initialize".to_string();
        self.command_running.store(true, Ordering::SeqCst);
        self.record(&command, "In progress: copying the node's own database");
        let svc = self.clone();
        self.tasks.spawn(async move {
            let result = svc.do_initialize().await;
            svc.finish(&command, result);
        });
        Ok("Initializing the database cluster with this node as master: see 'database cluster status'".into())
    }

    async fn do_initialize(&self) -> anyhow::Result<()> {
        let _guard = self.act_lock.lock().await;
        let sup = self.sup.clone().context("PostgreSQL is not available")?;
        if !self.instance_is_local() {
            sup.stop(Signal::SIGINT, Duration::from_secs(10)).await;
            *self.conn.lock().await = None;
            self.start_local().await?;
        }
        // The node's own database, over its Unix socket, stays as it is (DB-4).
        let local = format!(
            "host={} port={} user=postgres dbname=postgres application_name=causeway_copy",
            self.layout.run().display(),
            self.section.port
        );
        self.copy_into_cluster(local, "the node's own database", |_| {})
            .await?;
        sup.stop(Signal::SIGINT, Duration::from_secs(10)).await;
        *self.conn.lock().await = None;
        self.save(|s| {
            s.member = true;
            s.promoted_at = None;
        })?;
        Ok(())
    }

    fn instance_is_local(&self) -> bool {
        matches!(self.sup.as_ref().map(|s| s.current()), Some(crate::supervisor::Child::Running { data, .. }) if data == self.layout.local())
    }

    fn finish(&self, command: &str, result: anyhow::Result<()>) {
        match result {
            Ok(()) => {
                let members = lock(&self.seen).members.len();
                info!(target: LOG, event = "Database command", command, result = "Success", "");
                self.record(command, "Success");
                if members == 2 || members == 4 {
                    tracing::warn!(target: LOG, members, "The database cluster has an even number of nodes: add or remove one");
                }
            }
            Err(e) => {
                let why = format!("{e:#}");
                tracing::warn!(target: LOG, event = "Database command", command, result = "Failed", reason = %why, "");
                self.record(command, &format!("Failed: {why}"));
            }
        }
        self.command_running.store(false, Ordering::SeqCst);
        self.wake();
    }

    async fn join(self: &Arc<Self>, master: &str) -> Answer {
        self.refuse_if_member()?;
        self.refuse_if_busy()?;
        self.refuse_without_postgres()?;
        self.refuse_without_setup()?;
        let wanted = master.trim_matches(['<', '>']);
        let ip: std::net::IpAddr = wanted.parse().map_err(|_| {
            Refusal::invalid(format!("'{master}' is not an address: give the master's database address, as 'database cluster status' shows it"))
        })?;
        let reports = self.reports();
        let fresh: Vec<&Report> = reports
            .iter()
            .filter(|(_, age)| *age < crate::agent::FRESH)
            .map(|(r, _)| r)
            .collect();
        let Some(target) = fresh.iter().find(|r| r.address.map(|a| a.ip()) == Some(ip)) else {
            return Err(Refusal::unavailable(format!(
                "no peer of this cluster has the database address {ip} (or it does not answer): check the address with 'database cluster status' on the master"
            )));
        };
        if !target.is_ready_master() {
            let hint = fresh
                .iter()
                .find(|r| r.is_ready_master())
                .and_then(|r| r.address)
                .map(|a| format!(": the master is {}", a.ip()))
                .unwrap_or_else(|| ": the cluster has no master now".into());
            return Err(Refusal::conflict(format!("{ip} is not the master{hint}")));
        }
        let (peer, address) = (
            target.peer,
            target.address.unwrap_or(SocketAddr::new(ip, 5432)),
        );
        let command = format!("database cluster join {master}");
        let rpc = self.node.leases().rpc().clone();
        rpc.call(
            &join_endpoint(),
            peer,
            &JoinRequest {
                address: self.pg_address(),
            },
            Duration::from_secs(12),
        )
        .await
        .map_err(|e| Refusal::unavailable(format!("the master refused or did not answer: {e}")))?;
        self.command_running.store(true, Ordering::SeqCst);
        self.record(&command, "In progress: copying the database, 0%");
        let svc = self.clone();
        self.tasks.spawn(async move {
            let result = svc.do_join(&command, address).await;
            svc.finish(&command, result);
        });
        Ok(format!(
            "Joining the database cluster of master {ip}: see 'database cluster status'"
        ))
    }

    async fn do_join(&self, command: &str, master: SocketAddr) -> anyhow::Result<()> {
        let _guard = self.act_lock.lock().await;
        let sup = self.sup.clone().context("PostgreSQL is not available")?;
        // The node's own database is kept aside, untouched, until 'remove'.
        sup.stop(Signal::SIGINT, Duration::from_secs(10)).await;
        *self.conn.lock().await = None;
        let mut last = 0;
        self.copy_from(master, |p| {
            if p != last {
                last = p;
                self.record(command, &format!("In progress: copying the database, {p}%"));
            }
        })
        .await?;
        self.save(|s| {
            s.member = true;
            s.promoted_at = None;
            s.sealed_at = 0;
        })?;
        Ok(())
    }

    async fn remove(self: &Arc<Self>) -> Answer {
        self.refuse_if_busy()?;
        if !self.saved().member {
            return Err(Refusal::conflict("this node is not in a database cluster"));
        }
        let command = "database cluster remove".to_string();
        let members = lock(&self.seen).members.clone();
        let others = members.iter().filter(|m| m.peer != self.me).count();
        if others > 0 {
            if self.lease.state().is_mine() {
                // A master hands over first: it steps aside and waits for the next master.
                self.step_aside(Duration::from_secs(30));
                let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let next = self.reports().into_iter().any(|(r, age)| {
                        age < crate::agent::FRESH && r.is_ready_master() && r.peer != self.me
                    });
                    if next {
                        break;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Refusal::unavailable(
                            "no other node became master within 6 s: this node stays in the database cluster; run this again when 'database cluster status' shows a master",
                        ));
                    }
                }
            }
            let master = self
                .reports()
                .into_iter()
                .filter(|(r, age)| {
                    *age < crate::agent::FRESH && r.is_ready_master() && r.peer != self.me
                })
                .max_by_key(|(r, _)| r.generation)
                .map(|(r, _)| r.peer);
            let Some(master) = master else {
                return Err(Refusal::unavailable(
                    "no master is reachable: this node stays in the database cluster; run this again when 'database cluster status' shows a master",
                ));
            };
            self.node
                .leases()
                .rpc()
                .call(
                    &remove_endpoint(),
                    master,
                    &RemoveRequest {},
                    Duration::from_secs(12),
                )
                .await
                .map_err(|e| {
                    Refusal::unavailable(format!("the master refused or did not answer: {e}"))
                })?;
        }
        self.command_running.store(true, Ordering::SeqCst);
        self.lease.set_eligible(false);
        let _guard = self.act_lock.lock().await;
        let result = async {
            if let Some(sup) = &self.sup {
                self.writable.store(false, Ordering::SeqCst);
                sup.stop(Signal::SIGINT, Duration::from_secs(10)).await;
            }
            *self.conn.lock().await = None;
            let data = self.layout.cluster();
            if data.exists() {
                std::fs::remove_dir_all(&data)
                    .with_context(|| format!("removing {}", data.display()))?;
            }
            self.save(|s| {
                s.member = false;
                s.promoted_at = None;
                s.sealed_at = 0;
            })?;
            lock(&self.seen).members.clear();
            self.start_local().await
        }
        .await;
        drop(_guard);
        let answer = match &result {
            Ok(()) => Ok(
                "Removed from the database cluster: the node's own database is in use again"
                    .to_string(),
            ),
            Err(e) => Err(Refusal::new(ErrorCode::Internal, format!("{e:#}"))),
        };
        self.finish(&command, result);
        answer
    }

    async fn clear_error(&self) -> Answer {
        let command = "database cluster clear error";
        let had = self
            .master_sql("SELECT count(*)::text FROM causeway_schema.state WHERE error IS NOT NULL")
            .await;
        match had {
            Ok(rows)
                if rows
                    .first()
                    .and_then(|r| r.first())
                    .and_then(|v| v.as_deref())
                    != Some("0") =>
            {
                self.master_sql("UPDATE causeway_schema.state SET error = NULL")
                    .await
                    .map_err(|e| {
                        Refusal::unavailable(format!("clearing the error on the master: {e}"))
                    })?;
                self.node
                    .alarms()
                    .lower(crate::catalogue::SCHEMA, "database");
                self.record(command, "Success");
                Ok("Error cleared".into())
            }
            _ => {
                self.record(command, "Success");
                Ok("There is no error to clear".into())
            }
        }
    }

    /// SQL on the master, through this node's endpoint with the client certificate (as the
    /// seed's schema builder does).
    pub(crate) async fn master_sql(
        &self,
        sql: &str,
    ) -> Result<crate::pgwire::Rows, crate::pgwire::PgError> {
        let mut conn = self.master_conn().await?;
        let rows = conn.query(sql).await;
        conn.close().await;
        rows
    }

    pub(crate) async fn master_conn(
        &self,
    ) -> Result<crate::pgwire::PgConn, crate::pgwire::PgError> {
        let tls = crate::status::client_tls(&self.layout.certs()).map_err(|e| {
            crate::pgwire::PgError {
                code: None,
                message: format!("{e:#}"),
            }
        })?;
        let login = crate::pgwire::Login {
            application_name: "causeway-schema",
            ..Default::default()
        };
        crate::pgwire::PgConn::tls(self.section.endpoint, tls, &login, Duration::from_secs(4)).await
    }

    async fn upgrade_schema(&self) -> Answer {
        let command = "database cluster upgrade_schema";
        let Some(dir) = self.schema_dir() else {
            return Err(Refusal::conflict(
                "no schema directory: set schema_dir in the [database] section of the node file",
            ));
        };
        info!(target: LOG, detail = %format!(
            "Upgrading schema with connect line 'connect_timeout=4 user=postgres host={} port={} sslmode=verify-ca sslcert={} sslkey={} sslrootcert={} '",
            self.section.endpoint.ip(), self.section.endpoint.port(),
            self.layout.cert("client.crt").display(), self.layout.cert("client.key").display(), self.layout.cert("ca.crt").display()), "");
        let mut conn = self.master_conn().await.map_err(|e| {
            Refusal::unavailable(format!(
                "the database cluster's master cannot be reached through {}: {e}",
                self.section.endpoint
            ))
        })?;
        let result = apply_schema(&mut conn, &dir, &self.node.config().node.system_name).await;
        conn.close().await;
        match result {
            Ok(n) => {
                self.record(command, "Success");
                Ok(format!("Schema up to date ({n} files applied)"))
            }
            Err(SchemaError::Refused(r)) => {
                self.record(command, &format!("Failed: {}", r.message));
                Err(r)
            }
            Err(SchemaError::Failed(why)) => {
                // Recorded in the database, so every node shows it and it survives a failover.
                let _ = self
                    .master_sql(&format!(
                        "INSERT INTO causeway_schema.state (id, error) VALUES (1, {e}) ON CONFLICT (id) DO UPDATE SET error = {e}",
                        e = crate::pgwire::literal(&why)
                    ))
                    .await;
                self.node
                    .alarms()
                    .raise(crate::catalogue::SCHEMA, "database", &why);
                self.record(command, &format!("Failed: {why}"));
                Err(Refusal::conflict(format!("{why}: correct it, then run 'database cluster clear error' and this command again")))
            }
        }
    }
}

enum SchemaError {
    Refused(Refusal),
    Failed(String),
}

/// Applies the files `NNNN_<name>.sql` of `dir` not applied yet, in order, each in one
/// transaction with its row in `causeway_schema.applied`; one node at a time (an advisory
/// lock). Returns how many it applied.
async fn apply_schema(
    conn: &mut crate::pgwire::PgConn,
    dir: &Path,
    by: &str,
) -> Result<usize, SchemaError> {
    use crate::pgwire::literal;
    let unavailable = |e: crate::pgwire::PgError| {
        SchemaError::Refused(Refusal::unavailable(format!("on the master: {e}")))
    };
    conn.query(
        "CREATE SCHEMA IF NOT EXISTS causeway_schema; \
         CREATE TABLE IF NOT EXISTS causeway_schema.applied (version int PRIMARY KEY, name text NOT NULL, sha256 text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(), applied_by text NOT NULL); \
         CREATE TABLE IF NOT EXISTS causeway_schema.state (id int PRIMARY KEY CHECK (id = 1), error text)",
    )
    .await
    .map_err(unavailable)?;
    let state = conn
        .value("SELECT error FROM causeway_schema.state WHERE id = 1")
        .await
        .map_err(unavailable)?;
    if let Some(e) = state {
        return Err(SchemaError::Refused(Refusal::conflict(format!(
            "the database cluster is in the error state ({e}): run 'database cluster clear error' first"
        ))));
    }
    let mut files: Vec<(u32, String, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| {
            SchemaError::Refused(Refusal::invalid(format!("reading {}: {e}", dir.display())))
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".sql")?;
            let (num, _) = stem.split_once('_')?;
            Some((num.parse().ok()?, name, e.path()))
        })
        .collect();
    files.sort();
    let mut applied = 0;
    for (version, name, path) in files {
        let sql = std::fs::read_to_string(&path)
            .map_err(|e| SchemaError::Failed(format!("reading {}: {e}", path.display())))?;
        let sha = hex(ring::digest::digest(&ring::digest::SHA256, sql.as_bytes()).as_ref());
        let done = conn
            .value(&format!(
                "SELECT sha256 FROM causeway_schema.applied WHERE version = {version}"
            ))
            .await
            .map_err(unavailable)?;
        match done {
            Some(s) if s == sha => continue,
            Some(s) => {
                return Err(SchemaError::Failed(format!(
                    "{name} was applied with SHA-256 {s} and has changed since ({sha})"
                )))
            }
            None => {}
        }
        let tx = format!(
            "BEGIN; SELECT pg_advisory_xact_lock(4372); {sql}\n; INSERT INTO causeway_schema.applied (version, name, sha256, applied_by) VALUES ({version}, {}, {}, {}); COMMIT;",
            literal(&name),
            literal(&sha),
            literal(by)
        );
        if let Err(e) = conn.query(&tx).await {
            let _ = conn.query("ROLLBACK").await;
            return Err(SchemaError::Failed(format!("{name} failed: {}", e.message)));
        }
        info!(target: LOG, event = "Schema file applied", file = %name, "");
        applied += 1;
    }
    Ok(applied)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
