//! The database cluster with real processes (issue 13): `causeway run` peers each
//! supervising a real PostgreSQL 15, driven with the seed's commands, reached with `psql`
//! over mutual TLS. Each test has its own 127.0.N.0/24 and removes what it made.

mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::*;
use serde_json::Value;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Client certificate files: (certificate, key, CA).
#[derive(Clone)]
struct Client {
    crt: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

struct Db {
    c: TestCluster,
    net: u8,
    dir: PathBuf,
    client: Client,
}

fn require_postgres() {
    assert!(
        Path::new(PG_BIN).join("postgres").exists() && Path::new(PG_BIN).join("psql").exists(),
        "PostgreSQL 15 is needed for these tests: apt-get install -y postgresql-15"
    );
}

/// `n` peers with a `[database]` section, and the database certificates: a CA, a server
/// certificate per peer, a client certificate with CN `postgres`.
fn start(net: u8, n: usize) -> Db {
    require_postgres();
    let c = TestCluster::start(net, n, "Enforce", |k, config, _, _| {
        let a = addr(net, k);
        config.push_str(&format!(
            "\n[database]\nlocalnode = \"{a}\"\nendpoint = \"{a}:9899\"\nschema_dir = \"schema\"\n"
        ));
    });
    wait_for(60, "the peer cluster to form", || c.formed());
    let dir = c._tmp.path().join("db");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = causeway_pki::ca_init(&dir.join("ca"), "database CA").unwrap();
    let client = issue(&dir, "client", "postgres", &ca);
    for k in 1..=n {
        issue(&dir, &format!("server{k}"), &addr(net, k), &ca);
    }
    Db {
        c,
        net,
        dir,
        client,
    }
}

fn issue(dir: &Path, name: &str, cn: &str, ca: &causeway_pki::CaFiles) -> Client {
    let subject = causeway_pki::parse_subject_args(&[format!("CN:{cn}")]).unwrap();
    let (key, csr) = causeway_pki::csr(dir, name, &subject).unwrap();
    let crt = dir.join(format!("{name}.crt"));
    causeway_pki::sign_csr(&csr, ca, 30, &crt).unwrap();
    Client {
        crt,
        key,
        ca: ca.cert.clone(),
    }
}

impl Db {
    fn a(&self, k: usize) -> String {
        addr(self.net, k)
    }

    /// `causeway --node peerK database cluster <words>`: Ok(stdout) or Err(stderr).
    fn cmd(&self, k: usize, words: &[&str]) -> Result<String, String> {
        let out = Command::new(BIN)
            .arg("--node")
            .arg(&self.c.peers[k - 1].dir)
            .args(["database", "cluster"])
            .args(words)
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn status(&self, k: usize) -> Option<Value> {
        let out = self.cmd(k, &["status", "--json"]).ok()?;
        serde_json::from_str(&out).ok()
    }

    fn text(&self, k: usize) -> String {
        self.cmd(k, &["status"]).unwrap_or_default()
    }

    fn certs(&self, k: usize) {
        let d = &self.dir;
        let files = [
            d.join(format!("server{k}.key")),
            d.join(format!("server{k}.crt")),
            self.client.key.clone(),
            self.client.crt.clone(),
            self.client.ca.clone(),
        ];
        let words: Vec<String> = std::iter::once("certs".to_string())
            .chain(files.iter().map(|f| f.display().to_string()))
            .collect();
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        self.cmd(k, &words).expect("certs is accepted");
    }

    /// Waits until peer k's last command succeeded and it sees a master.
    fn wait_command(&self, k: usize) {
        wait_for(
            90,
            &format!("peer {k}'s database command to succeed"),
            || {
                let Some(s) = self.status(k) else {
                    return false;
                };
                let result = s["last_command"]["result"].as_str().unwrap_or_default();
                assert!(!result.starts_with("Failed"), "peer {k}: {result}");
                result == "Success" && s["status"] == "Enabled" && s["node_in_use"].is_string()
            },
        );
    }

    fn initialize_and_join(&self, peers: std::ops::RangeInclusive<usize>) {
        self.cmd(1, &["initialize"]).expect("initialize starts");
        self.wait_command(1);
        let master = self.a(1);
        for k in peers {
            wait_for(20, &format!("peer {k} to accept join"), || {
                self.cmd(k, &["join", &master]).is_ok()
            });
            self.wait_command(k);
        }
    }

    fn form(&self) {
        for k in 1..=self.c.peers.len() {
            self.certs(k);
        }
        self.initialize_and_join(2..=self.c.peers.len());
        self.wait_states(self.c.peers.len() - 1);
    }

    /// Waits until every running member shows one Connected Master and `standbys` Connected
    /// Slave ( In Sync ).
    fn wait_states(&self, standbys: usize) {
        let running: Vec<usize> = (1..=self.c.peers.len())
            .filter(|&k| self.c.peers[k - 1].child.is_some())
            .collect();
        wait_for(
            60,
            "one master and the standbys in sync on every node",
            || {
                running.iter().all(|&k| {
                    let t = self.text(k);
                    t.matches("Connected Master").count() == 1
                        && t.matches("Connected Slave ( In Sync )").count() == standbys
                })
            },
        );
    }

    /// The master as the first running peer sees it.
    fn master(&self) -> Option<usize> {
        let k = (1..=self.c.peers.len()).find(|&k| self.c.peers[k - 1].child.is_some())?;
        self.master_seen_by(k)
    }

    /// Waits until peer `k` sees a master, and returns it.
    fn wait_master(&self, k: usize) -> usize {
        let mut master = None;
        wait_for(30, &format!("peer {k} to see a master"), || {
            master = self.master_seen_by(k);
            master.is_some()
        });
        master.unwrap_or_default()
    }

    fn master_seen_by(&self, k: usize) -> Option<usize> {
        let s = self.status(k)?;
        s["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["state"] == "Connected Master")
            .and_then(|n| n["peer"].as_u64())
            .map(|p| p as usize)
    }

    /// Kill -9 of the node: its causeway, then its postmaster (in one burst).
    fn kill_node(&mut self, k: usize) {
        let pid_file = self.c.peers[k - 1].dir.join("db/cluster/postmaster.pid");
        let postmaster = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        self.c.kill9(k);
        if let Some(pid) = postmaster {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// `psql` to `host:port` with `client`'s certificate: Ok(output) or Err(its error).
fn sql(target: &str, client: &Client, query: &str) -> Result<String, String> {
    let (host, port) = target.rsplit_once(':').unwrap();
    let conninfo = format!(
        "host={host} port={port} user=postgres dbname=postgres sslmode=verify-ca sslcert={} sslkey={} sslrootcert={} connect_timeout=3",
        client.crt.display(),
        client.key.display(),
        client.ca.display()
    );
    let out = Command::new(format!("{PG_BIN}/psql"))
        .arg(conninfo)
        .args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-c", query])
        .env("PGCONNECT_TIMEOUT", "3")
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn http_status(target: &str, path: &str) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(target) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = write!(s, "GET {path} HTTP/1.0\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn three_nodes_form_share_a_table_through_any_endpoint_and_refuse_wrong_certificates() {
    let db = start(70, 3);
    // Before it joins, peer 3's own database holds a table of its own (DB-4).
    db.certs(3);
    wait_for(30, "peer 3's own database through its endpoint", || {
        sql(
            &format!("{}:9899", db.a(3)),
            &db.client,
            "CREATE TABLE mine AS SELECT 'peer3-local'::text AS v",
        )
        .is_ok()
    });
    let system_id = |k: usize| {
        sql(
            &format!("{}:9899", db.a(k)),
            &db.client,
            "SELECT system_identifier FROM pg_control_system()",
        )
        .unwrap()
    };
    let local_id = system_id(3);
    db.form();

    // The seed's layout on every node: (me) once, the master and two standbys in sync.
    for k in 1..=3 {
        let t = db.text(k);
        assert!(
            t.starts_with("Status                : Enabled\nNodes:\n"),
            "{t}"
        );
        assert_eq!(t.matches("(me)").count(), 1, "{t}");
        assert!(
            t.contains(&format!("Node in use           : {}\n", db.a(1))),
            "{t}"
        );
        assert!(
            t.contains("Certificates\nServer Key              : server"),
            "{t}"
        );
    }
    // Written through one node's endpoint, read through another's.
    sql(
        &format!("{}:9899", db.a(2)),
        &db.client,
        "CREATE TABLE shared (v text); INSERT INTO shared VALUES ('written via peer 2')",
    )
    .unwrap();
    assert_eq!(
        sql(
            &format!("{}:9899", db.a(3)),
            &db.client,
            "SELECT v FROM shared"
        )
        .unwrap(),
        "written via peer 2"
    );
    // While a member, peer 3's own database is not in use: its table is not there.
    assert!(sql(
        &format!("{}:9899", db.a(3)),
        &db.client,
        "SELECT v FROM mine"
    )
    .is_err());
    // Health for load balancers: the master and the standbys.
    assert_eq!(http_status(&format!("{}:8008", db.a(1)), "/primary"), 200);
    assert_eq!(http_status(&format!("{}:8008", db.a(2)), "/primary"), 503);
    wait_for(10, "/replica on a standby", || {
        http_status(&format!("{}:8008", db.a(2)), "/replica") == 200
    });
    assert_eq!(http_status(&format!("{}:8008", db.a(1)), "/replica"), 503);

    // Wrong client certificates are refused on 5432 and on 9899 (DB-2).
    let other_ca = causeway_pki::ca_init(&db.dir.join("other-ca"), "other CA").unwrap();
    let ours = causeway_pki::CaFiles::in_dir(&db.dir.join("ca"));
    let alice = issue(&db.dir, "alice", "alice", &ours);
    let mut stranger = issue(&db.dir, "stranger", "postgres", &other_ca);
    stranger.ca = db.client.ca.clone();
    for target in [format!("{}:5432", db.a(1)), format!("{}:9899", db.a(2))] {
        let e = sql(&target, &alice, "SELECT 1").unwrap_err();
        assert!(
            e.contains("certificate authentication failed"),
            "{target}: {e}"
        );
        let e = sql(&target, &stranger, "SELECT 1").unwrap_err();
        assert!(
            e.contains("certificate") || e.contains("SSL") || e.contains("alert"),
            "{target}: {e}"
        );
        assert_eq!(sql(&target, &db.client, "SELECT 1").unwrap(), "1");
    }
    // `certs` names what is wrong with a client certificate.
    let e = db
        .cmd(
            2,
            &[
                "certs",
                &alice.key.display().to_string(),
                &alice.crt.display().to_string(),
                &alice.ca.display().to_string(),
            ],
        )
        .unwrap_err();
    assert!(e.contains("CN is 'alice'; it must be 'postgres'"), "{e}");

    // `remove` on a standby: its own database is back, unchanged, and in use again.
    db.cmd(3, &["remove"]).expect("remove on a standby");
    assert_eq!(
        sql(
            &format!("{}:9899", db.a(3)),
            &db.client,
            "SELECT v FROM mine"
        )
        .unwrap(),
        "peer3-local"
    );
    assert_eq!(system_id(3), local_id);
    assert!(sql(
        &format!("{}:9899", db.a(3)),
        &db.client,
        "SELECT v FROM shared"
    )
    .is_err());
    assert!(db.text(3).starts_with("Status                : Disabled"));
    wait_for(20, "the others to show two nodes", || {
        let t = db.text(1);
        !t.contains(&db.a(3)) && t.contains("Connected Slave ( In Sync )")
    });
    // The cluster goes on writing with two nodes.
    sql(
        &format!("{}:9899", db.a(2)),
        &db.client,
        "INSERT INTO shared VALUES ('after remove')",
    )
    .unwrap();
}

#[test]
fn a_failed_schema_upgrade_is_an_error_until_cleared() {
    let db = start(71, 3);
    db.form();
    let schema = db.c.peers[1].dir.join("schema");
    std::fs::create_dir_all(&schema).unwrap();
    std::fs::write(
        schema.join("0001_people.sql"),
        "CREATE TABLE people (id int PRIMARY KEY, name text);",
    )
    .unwrap();
    std::fs::write(
        schema.join("0002_broken.sql"),
        "ALTER TABLE nobody ADD COLUMN x int;",
    )
    .unwrap();
    let e = db.cmd(2, &["upgrade_schema"]).unwrap_err();
    assert!(e.contains("0002_broken.sql failed"), "{e}");
    // Every node shows the error; the good file stayed applied, once.
    wait_for(10, "the error on every node", || {
        (1..=3).all(|k| {
            db.text(k).starts_with(
                "Status                : Error\nError                 : 0002_broken.sql failed",
            )
        })
    });
    assert!(db.c.alarm_raised(1, 21016, "database") || db.c.alarm_raised(2, 21016, "database"));
    let applied = sql(
        &format!("{}:9899", db.a(3)),
        &db.client,
        "SELECT string_agg(name, ',') FROM causeway_schema.applied",
    )
    .unwrap();
    assert_eq!(applied, "0001_people.sql");
    // Refused while in error; cleared by 'clear error'; then the fixed file applies.
    let e = db.cmd(2, &["upgrade_schema"]).unwrap_err();
    assert!(e.contains("clear error"), "{e}");
    db.cmd(3, &["clear", "error"]).unwrap();
    wait_for(10, "the error to clear on every node", || {
        (1..=3).all(|k| db.text(k).starts_with("Status                : Enabled"))
    });
    std::fs::write(
        schema.join("0002_broken.sql"),
        "ALTER TABLE people ADD COLUMN email text;",
    )
    .unwrap();
    let out = db.cmd(2, &["upgrade_schema"]).unwrap();
    assert!(out.contains("1 files applied"), "{out}");
    assert!(db.cmd(2, &["clear", "error"]).unwrap().contains("no error"));
    assert!(db
        .c
        .log(2)
        .contains("Upgrading schema with connect line 'connect_timeout=4 user=postgres host="));
}

/// An acknowledged insert: the row, when, and the address of the server that committed it.
type Ack = (u32, Instant, String);

/// Every acknowledged row of `acked` is in table `w` on peer `k` (read on its 5432).
fn assert_kept<'a>(db: &Db, k: usize, acked: impl IntoIterator<Item = &'a Ack>, what: &str) {
    let rows = sql(
        &format!("{}:5432", db.a(k)),
        &db.client,
        "SELECT string_agg(n::text, ',') FROM w",
    )
    .unwrap();
    let rows: std::collections::HashSet<u32> =
        rows.split(',').filter_map(|n| n.parse().ok()).collect();
    let lost: Vec<u32> = acked
        .into_iter()
        .map(|a| a.0)
        .filter(|n| !rows.contains(n))
        .collect();
    assert!(lost.is_empty(), "{what}: {lost:?}");
}

/// Inserts numbered rows through `target` until told to stop, recording each acknowledged
/// one. Bounded: 5,000 rows, 90 s.
fn writer(
    target: String,
    client: Client,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    first: u32,
) -> std::thread::JoinHandle<Vec<Ack>> {
    std::thread::spawn(move || {
        let mut acked = vec![];
        let started = Instant::now();
        let mut n = first;
        while !stop.load(std::sync::atomic::Ordering::SeqCst)
            && started.elapsed() < Duration::from_secs(90)
            && n < first + 5000
        {
            let q = format!("INSERT INTO w VALUES ({n}) RETURNING host(inet_server_addr())");
            if let Ok(server) = sql(&target, &client, &q) {
                acked.push((n, Instant::now(), server));
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        acked
    })
}

#[test]
fn the_master_killed_is_replaced_with_no_acknowledged_write_lost_and_comes_back_as_a_standby() {
    let mut db = start(72, 3);
    db.form();
    sql(
        &format!("{}:9899", db.a(3)),
        &db.client,
        "CREATE TABLE w (n int PRIMARY KEY)",
    )
    .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = writer(
        format!("{}:9899", db.a(3)),
        db.client.clone(),
        stop.clone(),
        0,
    );
    std::thread::sleep(Duration::from_secs(2));
    let killed_at = Instant::now();
    db.kill_node(1);
    wait_for(30, "a new master", || matches!(db.master(), Some(2 | 3)));
    // The old master comes back at once, while the writer goes on: it must wait for the new
    // master's checkpoint before it rewinds (a rewind from a master that has not
    // checkpointed since its promotion gives a data directory postgres cannot start from).
    db.c.launch(1);
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let acked = w.join().unwrap();
    let after: Vec<_> = acked.iter().filter(|(_, t, _)| *t > killed_at).collect();
    assert!(!after.is_empty(), "writes resumed on the new master");
    eprintln!(
        "first acknowledged write {} ms after the kill",
        after[0].1.duration_since(killed_at).as_millis()
    );
    assert_kept(&db, db.wait_master(2), &acked, "acknowledged rows lost");
    // The old master is back by itself as a standby of the new one and catches up.
    db.wait_states(2);
    let (net, client) = (db.net, db.client.clone());
    let count = move |k: usize| {
        sql(
            &format!("{}:5432", addr(net, k)),
            &client,
            "SELECT count(*) FROM w",
        )
        .unwrap()
    };
    let master = db.wait_master(2);
    wait_for(20, "peer 1 to catch up", || count(1) == count(master));
    let me = format!("{} (me)", db.a(1));
    assert!(db
        .text(1)
        .contains(&format!("  {me:<21}: Connected Slave ( In Sync )\n")));

    // A second failover: the new master goes the same way. Its control file still names the
    // first timeline until it checkpoints, two timelines behind: the rejoin must wait for it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = writer(
        format!("{}:9899", db.a(1)),
        db.client.clone(),
        stop.clone(),
        10_000,
    );
    std::thread::sleep(Duration::from_secs(1));
    db.kill_node(master);
    wait_for(30, "a third master", || {
        db.master_seen_by(1).is_some_and(|m| m != master)
    });
    db.c.launch(master);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let acked = w.join().unwrap();
    db.wait_states(2);
    let third = db.wait_master(1);
    assert_kept(
        &db,
        third,
        &acked,
        "acknowledged rows lost in the second failover",
    );
    wait_for(20, "the second old master to catch up", || {
        count(master) == count(third)
    });
}

/// iptables rules that cut a peer's mesh links (the cluster port, both ways); removed on drop.
struct MeshCut {
    rules: Vec<Vec<String>>,
}

impl MeshCut {
    fn new(ip: &str) -> Self {
        let rules: Vec<Vec<String>> = [["-d", ip], ["-s", ip]]
            .iter()
            .map(|[dir, ip]| {
                [
                    "INPUT", "-p", "tcp", dir, ip, "--dport", "4372", "-j", "DROP",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect()
            })
            .collect();
        for r in &rules {
            let ok = Command::new("iptables").arg("-I").args(r).status();
            assert!(
                ok.is_ok_and(|s| s.success()),
                "iptables is needed to cut a mesh link: apt-get install -y iptables (and run as root)"
            );
        }
        MeshCut { rules }
    }
}

impl Drop for MeshCut {
    fn drop(&mut self) {
        for r in &self.rules {
            let _ = Command::new("iptables").arg("-D").args(r).status();
        }
    }
}

#[test]
fn a_master_cut_from_the_majority_refuses_writes_before_another_accepts_one() {
    let db = start(73, 3);
    db.form();
    sql(
        &format!("{}:9899", db.a(1)),
        &db.client,
        "CREATE TABLE w (n int PRIMARY KEY)",
    )
    .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // One writer straight at the old master's 5432 (still open), one through peer 2's endpoint.
    let old = writer(
        format!("{}:5432", db.a(1)),
        db.client.clone(),
        stop.clone(),
        0,
    );
    let new = writer(
        format!("{}:9899", db.a(2)),
        db.client.clone(),
        stop.clone(),
        100_000,
    );
    std::thread::sleep(Duration::from_secs(2));
    let cut_at = Instant::now();
    let cut = MeshCut::new(&db.a(1));
    wait_for(30, "a new master among peers 2 and 3", || {
        db.status(2).is_some_and(|s| {
            s["nodes"].as_array().is_some_and(|ns| {
                ns.iter()
                    .any(|n| n["state"] == "Connected Master" && n["peer"] != 1)
            })
        })
    });
    // Never two masters: the old one answers /primary 503 now.
    assert_eq!(http_status(&format!("{}:8008", db.a(1)), "/primary"), 503);
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let old = old.join().unwrap();
    let new = new.join().unwrap();
    let new_master = db.wait_master(2);
    assert_ne!(new_master, 1);
    let old_ip = db.a(1);
    let acks: Vec<&Ack> = old.iter().chain(&new).collect();
    // Never two masters: the old master's last acknowledged write precedes the new one's first.
    let last_old = acks.iter().filter(|a| a.2 == old_ip).map(|a| a.1).max();
    let first_new = acks.iter().filter(|a| a.2 != old_ip).map(|a| a.1).min();
    let first_new = first_new.expect("the new master accepted writes");
    if let Some(last_old) = last_old {
        assert!(
            last_old < first_new,
            "the old master acknowledged a write {} ms after the new master's first",
            last_old.duration_since(first_new).as_millis()
        );
        eprintln!(
            "old master's last write {} ms after the cut, new master's first {} ms after",
            last_old.saturating_duration_since(cut_at).as_millis(),
            first_new.duration_since(cut_at).as_millis()
        );
    }
    // Synchronous replication: nothing the old master acknowledged is missing.
    assert_kept(
        &db,
        new_master,
        acks.iter().copied(),
        "acknowledged rows missing on the new master",
    );
    // Healed, the old master comes back as a standby by itself.
    drop(cut);
    db.wait_states(2);
    assert_eq!(db.master(), Some(new_master));
}

#[test]
fn five_nodes_keep_a_master_with_two_lost_and_refuse_writes_with_three_lost() {
    let mut db = start(74, 5);
    db.form();
    sql(
        &format!("{}:9899", db.a(5)),
        &db.client,
        "CREATE TABLE w (n int PRIMARY KEY)",
    )
    .unwrap();
    // The master and one standby at once.
    let master = db.wait_master(1);
    let other = (1..=5).find(|&k| k != master).unwrap();
    db.kill_node(master);
    db.kill_node(other);
    let alive: Vec<usize> = (1..=5).filter(|&k| k != master && k != other).collect();
    wait_for(30, "a master among the three left", || {
        db.master().is_some_and(|m| alive.contains(&m))
    });
    let via = format!("{}:9899", db.a(alive[0]));
    wait_for(20, "a write on the new master", || {
        sql(&via, &db.client, "INSERT INTO w VALUES (1)").is_ok()
    });
    // Now three lost: no majority, no master, writes refused.
    let new_master = db.wait_master(alive[0]);
    db.kill_node(new_master);
    let last: Vec<usize> = alive.iter().copied().filter(|&k| k != new_master).collect();
    db.kill_node(last[0]);
    let survivor = last[1];
    std::thread::sleep(Duration::from_secs(4));
    for target in [
        format!("{}:5432", db.a(survivor)),
        format!("{}:9899", db.a(survivor)),
    ] {
        let e = sql(&target, &db.client, "INSERT INTO w VALUES (2)").unwrap_err();
        eprintln!("{target}: {e}");
    }
    let e = sql(
        &format!("{}:5432", db.a(survivor)),
        &db.client,
        "INSERT INTO w VALUES (3)",
    )
    .unwrap_err();
    assert!(e.contains("read-only transaction"), "{e}");
    wait_for(15, "alarm 21010 on the survivor", || {
        db.c.alarm_raised(survivor, 21010, "database")
    });
    assert_eq!(
        http_status(&format!("{}:8008", db.a(survivor)), "/primary"),
        503
    );
    // The row acknowledged before is still there, readable on the survivor.
    assert_eq!(
        sql(
            &format!("{}:5432", db.a(survivor)),
            &db.client,
            "SELECT count(*) FROM w WHERE n = 1"
        )
        .unwrap(),
        "1"
    );
}

/// `sql` with a deadline: an insert waiting for synchronous standbys that never answer is
/// not acknowledged; the client gives up (killed, so it cannot cancel and commit locally).
fn sql_within(target: &str, client: &Client, query: &str, secs: u64) -> Result<String, String> {
    let (host, port) = target.rsplit_once(':').unwrap();
    let conninfo = format!(
        "host={host} port={port} user=postgres dbname=postgres sslmode=verify-ca sslcert={} sslkey={} sslrootcert={} connect_timeout=3",
        client.crt.display(),
        client.key.display(),
        client.ca.display()
    );
    let mut child = Command::new(format!("{PG_BIN}/psql"))
        .arg(conninfo)
        .args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-c", query])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return if status.success() {
                Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
            };
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no answer within {secs} s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_frozen_master_agent_cannot_acknowledge_writes_and_endpoint_clients_move_to_the_new_master() {
    use causeway_dbcluster::pgwire::{Login, PgConn};
    let db = start(75, 3);
    db.form();
    sql(
        &format!("{}:9899", db.a(1)),
        &db.client,
        "CREATE TABLE w (n int PRIMARY KEY)",
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let id =
        causeway_pki::NodeIdentity::load(&db.client.crt, &db.client.key, &db.client.ca).unwrap();
    let tls = causeway_pki::client_config(causeway_pki::TlsMode::Enforce, &id).unwrap();
    let endpoint: std::net::SocketAddr = format!("{}:9899", db.a(2)).parse().unwrap();
    let connect = || {
        rt.block_on(PgConn::tls(
            endpoint,
            tls.clone(),
            &Login::default(),
            Duration::from_secs(5),
        ))
        .unwrap()
    };
    let mut held = connect();
    let server = |c: &mut PgConn| {
        rt.block_on(c.value("SELECT host(inet_server_addr())"))
            .unwrap()
    };
    assert_eq!(server(&mut held).as_deref(), Some(db.a(1).as_str()));

    // The master's agent freezes; its PostgreSQL runs on, reachable on 5432.
    let pid = db.c.peers[0].child.as_ref().unwrap().id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    wait_for(30, "a new master among peers 2 and 3", || {
        matches!(db.master_seen_by(2), Some(2 | 3))
    });
    // The sealed standbys no longer take its WAL: a commit there is never acknowledged.
    let e = sql_within(
        &format!("{}:5432", db.a(1)),
        &db.client,
        "INSERT INTO w VALUES (1)",
        4,
    )
    .unwrap_err();
    assert!(e.contains("no answer"), "{e}");
    // The endpoint closed the connection it held to the old master; a new one reaches the new.
    wait_for(10, "the held connection to be closed", || {
        rt.block_on(held.query("SELECT 1")).is_err()
    });
    let new_master = db.wait_master(2);
    let mut fresh = connect();
    assert_eq!(
        server(&mut fresh).as_deref(),
        Some(db.a(new_master).as_str())
    );
    rt.block_on(fresh.query("INSERT INTO w VALUES (2)"))
        .unwrap();

    // Thawed, the old master stops its PostgreSQL at once and comes back as a standby.
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    db.wait_states(2);
    assert_eq!(db.master(), Some(new_master));
    // Row 1 was never acknowledged; it is not on the new master's timeline.
    assert_eq!(
        sql(
            &format!("{}:9899", db.a(3)),
            &db.client,
            "SELECT string_agg(n::text, ',') FROM w"
        )
        .unwrap(),
        "2"
    );
}

#[test]
fn every_node_killed_and_restarted_in_reverse_order_keeps_every_acknowledged_row() {
    let mut db = start(76, 3);
    db.form();
    let net = db.net;
    let via = |k: usize| format!("{}:9899", addr(net, k));
    sql(&via(2), &db.client, "CREATE TABLE w (n int PRIMARY KEY)").unwrap();
    let mut acked = vec![];
    for n in 0..50 {
        sql(
            &via(1 + n % 3),
            &db.client,
            &format!("INSERT INTO w VALUES ({n})"),
        )
        .unwrap();
        acked.push(n);
    }
    for k in 1..=3 {
        db.kill_node(k);
    }
    // The master last: it comes back as a standby like the others; the most advanced stands.
    for k in [3, 2, 1] {
        db.c.launch(k);
        std::thread::sleep(Duration::from_millis(500));
    }
    db.wait_states(2);
    let master = db.wait_master(2);
    let rows = sql(
        &format!("{}:5432", db.a(master)),
        &db.client,
        "SELECT string_agg(n::text, ',' ORDER BY n) FROM w",
    )
    .unwrap();
    let want: Vec<String> = acked.iter().map(|n| n.to_string()).collect();
    assert_eq!(rows, want.join(","));
    sql(&via(3), &db.client, "INSERT INTO w VALUES (1000)").unwrap();
}

#[test]
fn asynchronous_replication_commits_without_a_standby_and_synchronous_waits_for_one() {
    let mut db = start(77, 3);
    // Two database nodes; peer 3 runs the service but stays out, a voter of the lease only.
    db.certs(1);
    db.certs(2);
    db.initialize_and_join(2..=2);
    db.wait_states(1);
    let master = format!("{}:9899", db.a(1));
    sql(&master, &db.client, "CREATE TABLE w (n int PRIMARY KEY)").unwrap();
    // "In Sync" under synchronous replication means the master counts the standby for its
    // commits now, not only that the standby has caught up.
    let counted = sql(
        &master,
        &db.client,
        "SELECT string_agg(sync_state, ',') FROM pg_stat_replication",
    )
    .unwrap();
    assert!(
        counted.contains("quorum") || counted.contains("sync"),
        "In Sync shown while the master counts no standby: {counted:?}"
    );
    db.kill_node(2);
    // Synchronous (the default): a commit waits for the lost standby.
    let e = sql_within(&master, &db.client, "INSERT INTO w VALUES (1)", 3).unwrap_err();
    assert!(e.contains("no answer"), "{e}");
    // Asynchronous: the master commits alone.
    set(&db.c, 1, "database.replication", "Asynchronous");
    wait_for(20, "a commit without a standby", || {
        sql_within(
            &master,
            &db.client,
            "INSERT INTO w VALUES (2) ON CONFLICT DO NOTHING",
            2,
        )
        .is_ok()
    });
    assert_eq!(
        sql(&master, &db.client, "SHOW synchronous_standby_names").unwrap(),
        ""
    );
    // And back: the set names the standby again.
    set(&db.c, 3, "database.replication", "Synchronous");
    wait_for(20, "the synchronous set back", || {
        sql(&master, &db.client, "SHOW synchronous_standby_names")
            .is_ok_and(|s| s.contains("causeway_peer2"))
    });
}
