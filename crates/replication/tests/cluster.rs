//! Replication engines wired by an in-process network with faults (partition, kill,
//! restart from the same store), on paused time. See `docs/replication.md`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use causeway_replication::wire::Message;
use causeway_replication::{
    config_stream, overwrite_in_store, Applied, Change, Engine, EngineSettings, Header, Observer,
    Origin, PeerLink, StreamId, WriteError,
};
use causeway_store::{MemoryStore, Op, Rows, Store, StoreError};
use tokio::sync::{mpsc, oneshot};

type Frame = (usize, usize, Bytes);

/// Which nodes run and which links are cut.
struct Net {
    size: usize,
    up: Mutex<Vec<bool>>,
    cut: Mutex<HashSet<(usize, usize)>>,
    tx: mpsc::UnboundedSender<Frame>,
}

impl Net {
    fn connected(&self, a: usize, b: usize) -> bool {
        let up = self.up.lock().unwrap();
        up[a - 1] && up[b - 1] && !self.cut.lock().unwrap().contains(&(a.min(b), a.max(b)))
    }
}

struct Link {
    me: usize,
    net: Arc<Net>,
}

impl PeerLink for Link {
    fn send(&self, peer: usize, payload: Bytes) -> bool {
        if !self.net.connected(self.me, peer) {
            return false;
        }
        self.net.tx.send((self.me, peer, payload)).is_ok()
    }
    fn active_peers(&self) -> Vec<usize> {
        (1..=self.net.size)
            .filter(|p| *p != self.me && self.net.connected(self.me, *p))
            .collect()
    }
}

/// Counts what each node applied, to check "exactly once, in one order".
#[derive(Default)]
struct Recorder {
    applied: Mutex<Vec<(String, Option<Vec<u8>>)>>,
    primaries: Mutex<Vec<usize>>,
}

impl Observer for Recorder {
    fn validate(&self, _: &StreamId, changes: &[Change]) -> Result<(), String> {
        for c in changes {
            if c.key == "sip.max_calls" {
                let v = c.value.as_deref().unwrap_or_default();
                if std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<u32>().ok())
                    .is_none()
                {
                    return Err("sip.max_calls: must be a whole number".into());
                }
            }
        }
        Ok(())
    }
    fn applied(&self, _: &StreamId, applied: &[Applied], _: Origin) {
        let mut a = self.applied.lock().unwrap();
        for x in applied {
            a.push((x.key.clone(), x.new.clone()));
        }
    }
    fn primary_changed(&self, primary: usize, _: u64) {
        self.primaries.lock().unwrap().push(primary);
    }
}

struct Node {
    engine: Arc<Engine>,
    recorder: Arc<Recorder>,
    stop: Option<oneshot::Sender<()>>,
}

struct Cluster {
    net: Arc<Net>,
    stores: Vec<Arc<FlakyStore>>,
    nodes: Arc<Mutex<Vec<Option<Node>>>>,
    /// The configuration primary each node's file names.
    primary_in_files: Vec<usize>,
}

impl Cluster {
    fn new(size: usize) -> Cluster {
        Cluster::with_primaries(&vec![1; size])
    }

    /// A cluster whose node `i` has `primaries[i - 1]` as the primary in its file.
    fn with_primaries(primaries: &[usize]) -> Cluster {
        let size = primaries.len();
        let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
        let net = Arc::new(Net {
            size,
            up: Mutex::new(vec![true; size]),
            cut: Mutex::new(HashSet::new()),
            tx,
        });
        let nodes: Arc<Mutex<Vec<Option<Node>>>> =
            Arc::new(Mutex::new((0..size).map(|_| None).collect()));
        let router_nodes = nodes.clone();
        let router_net = net.clone();
        tokio::spawn(async move {
            while let Some((from, to, payload)) = rx.recv().await {
                if !router_net.connected(from, to) {
                    continue;
                }
                let engine = router_nodes.lock().unwrap()[to - 1]
                    .as_ref()
                    .map(|n| n.engine.clone());
                if let Some(e) = engine {
                    e.handle(from, &payload);
                }
            }
        });
        let mut c = Cluster {
            net,
            stores: (0..size).map(|_| Arc::new(FlakyStore::default())).collect(),
            nodes,
            primary_in_files: primaries.to_vec(),
        };
        for i in 1..=size {
            c.start(i);
        }
        c
    }

    fn start(&mut self, i: usize) {
        let mut settings = EngineSettings::new(i, self.net.size, self.primary_in_files[i - 1]);
        settings.heartbeat = Duration::from_millis(200);
        let recorder = Arc::new(Recorder::default());
        let store: Arc<dyn Store> = self.stores[i - 1].clone();
        let engine = Engine::open(
            settings,
            store,
            Arc::new(Link {
                me: i,
                net: self.net.clone(),
            }),
            recorder.clone(),
        )
        .expect("open engine");
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(engine.clone().run(async move {
            let _ = stopped.await;
        }));
        self.nodes.lock().unwrap()[i - 1] = Some(Node {
            engine,
            recorder,
            stop: Some(stop),
        });
        self.net.up.lock().unwrap()[i - 1] = true;
    }

    /// kill -9: the engine goes, its store stays.
    fn kill(&mut self, i: usize) {
        self.net.up.lock().unwrap()[i - 1] = false;
        if let Some(mut n) = self.nodes.lock().unwrap()[i - 1].take() {
            if let Some(s) = n.stop.take() {
                let _ = s.send(());
            }
        }
    }

    fn engine(&self, i: usize) -> Arc<Engine> {
        self.nodes.lock().unwrap()[i - 1]
            .as_ref()
            .expect("node running")
            .engine
            .clone()
    }

    fn recorder(&self, i: usize) -> Arc<Recorder> {
        self.nodes.lock().unwrap()[i - 1]
            .as_ref()
            .expect("node running")
            .recorder
            .clone()
    }

    fn partition(&self, i: usize) {
        let mut cut = self.net.cut.lock().unwrap();
        for p in 1..=self.net.size {
            if p != i {
                cut.insert((p.min(i), p.max(i)));
            }
        }
    }

    fn heal(&self) {
        self.net.cut.lock().unwrap().clear();
    }

    fn running(&self) -> Vec<usize> {
        let up = self.net.up.lock().unwrap();
        (1..=self.net.size).filter(|i| up[i - 1]).collect()
    }

    /// Waits (in paused time) until every running node's configuration header matches
    /// node `reference`'s; panics with every header after `limit`.
    async fn converge(&self, reference: usize, limit: Duration) -> Header {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let want = self.engine(reference).header(&config_stream());
            let all: Vec<(usize, Header)> = self
                .running()
                .into_iter()
                .map(|i| (i, self.engine(i).header(&config_stream())))
                .collect();
            if all.iter().all(|(_, h)| *h == want) {
                return want;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("no convergence on Peer {reference}'s {want:?} within {limit:?}: {all:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn set(key: &str, value: &str) -> Vec<Change> {
    vec![Change {
        key: key.into(),
        value: Some(value.as_bytes().to_vec()),
    }]
}

fn get(c: &Cluster, node: usize, key: &str) -> Option<String> {
    c.engine(node)
        .get(&config_stream(), key)
        .map(|v| String::from_utf8(v).unwrap())
}

async fn settle() {
    tokio::time::sleep(Duration::from_secs(1)).await;
}

async fn primary_change_reaches_every_subordinate(size: usize) {
    let c = Cluster::new(size);
    settle().await;
    let out = c
        .engine(1)
        .write(&config_stream(), set("sip.domains", "example.com"))
        .await
        .unwrap();
    assert!(out.majority(), "{out:?}");
    assert_eq!(out.peers, size);
    // Pushed at once: no heartbeat needed. Let the frames be delivered, nothing more.
    tokio::time::sleep(Duration::from_millis(1)).await;
    for i in 1..=size {
        assert_eq!(
            get(&c, i, "sip.domains").as_deref(),
            Some("example.com"),
            "Peer {i}"
        );
    }
    c.converge(1, Duration::from_secs(1)).await;
    // Subordinates learn each other's position from the next digest.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 1..=size {
        let status = c.engine(i).status();
        assert_eq!(status.database_status, "Active", "Peer {i}: {status:?}");
        assert!(c.engine(i).alarms(true).is_empty(), "Peer {i}");
    }
}

#[tokio::test(start_paused = true)]
async fn three_peers_a_change_on_the_primary_is_applied_on_every_subordinate() {
    primary_change_reaches_every_subordinate(3).await;
}

#[tokio::test(start_paused = true)]
async fn six_peers_a_change_on_the_primary_is_applied_on_every_subordinate() {
    primary_change_reaches_every_subordinate(6).await;
}

async fn writes_through_subordinates_apply_once_in_one_order(size: usize) {
    let c = Cluster::new(size);
    settle().await;
    let mut tasks = Vec::new();
    for round in 0..20 {
        for via in 1..=size {
            let e = c.engine(via);
            tasks.push(tokio::spawn(async move {
                e.write(
                    &config_stream(),
                    set(&format!("k{via}"), &format!("{round}")),
                )
                .await
            }));
        }
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let h = c.converge(1, Duration::from_secs(2)).await;
    assert_eq!(h.seq, 20 * size as u64, "every change exactly once");
    let order = c.recorder(1).applied.lock().unwrap().clone();
    assert_eq!(order.len(), 20 * size);
    for i in 2..=size {
        assert_eq!(
            *c.recorder(i).applied.lock().unwrap(),
            order,
            "Peer {i} applied the same changes in the same order"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn three_peers_writes_through_subordinates_apply_everywhere_once_in_one_order() {
    writes_through_subordinates_apply_once_in_one_order(3).await;
}

#[tokio::test(start_paused = true)]
async fn six_peers_writes_through_subordinates_apply_everywhere_once_in_one_order() {
    writes_through_subordinates_apply_once_in_one_order(6).await;
}

#[tokio::test(start_paused = true)]
async fn a_subordinate_down_during_1000_changes_catches_up_on_restart() {
    let mut c = Cluster::new(3);
    settle().await;
    c.engine(1)
        .write(&config_stream(), set("before", "1"))
        .await
        .unwrap();
    c.kill(3);
    for n in 0..1000 {
        let out = c
            .engine(1)
            .write(
                &config_stream(),
                set(&format!("user{}", n % 300), &n.to_string()),
            )
            .await
            .unwrap();
        assert!(out.majority(), "two of three hold change {n}");
    }
    // A deletion travels as a tombstone.
    c.engine(1)
        .write(
            &config_stream(),
            vec![Change {
                key: "before".into(),
                value: None,
            }],
        )
        .await
        .unwrap();
    c.start(3);
    // Restarted from its store: it resumes where it stopped, not from nothing.
    assert_eq!(c.engine(3).header(&config_stream()).seq, 1);
    assert_eq!(get(&c, 3, "before").as_deref(), Some("1"));
    let h = c.converge(1, Duration::from_secs(3)).await;
    assert_eq!(h.seq, 1002);
    assert_eq!(get(&c, 3, "before"), None, "the tombstone reached Peer 3");
    assert_eq!(get(&c, 3, "user99").as_deref(), Some("999"));
    assert_eq!(
        c.engine(3).entries(&config_stream()),
        c.engine(1).entries(&config_stream())
    );
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_subordinate_converges_after_the_partition_heals() {
    let c = Cluster::new(3);
    settle().await;
    c.partition(2);
    for n in 0..50 {
        c.engine(1)
            .write(
                &config_stream(),
                set("sip.domains", &format!("d{n}.example")),
            )
            .await
            .unwrap();
    }
    // While cut off, a write through Peer 2 names the unreachable primary.
    let err = c
        .engine(2)
        .write(&config_stream(), set("x", "1"))
        .await
        .unwrap_err();
    assert_eq!(err, WriteError::PrimaryUnreachable(1));
    assert!(err.to_string().contains("Peer 1"), "{err}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        c.engine(2).alarms(true).iter().any(|a| a.0 == 20016),
        "primary unreachable is alarmed: {:?}",
        c.engine(2).alarms(true)
    );
    c.heal();
    c.converge(1, Duration::from_secs(2)).await;
    assert_eq!(get(&c, 2, "sip.domains").as_deref(), Some("d49.example"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(c.engine(2).alarms(true).is_empty());
}

#[tokio::test(start_paused = true)]
async fn primary_killed_moved_by_one_command_and_the_old_primary_follows() {
    let mut c = Cluster::new(3);
    settle().await;
    let mut acked = Vec::new();
    for n in 0..30 {
        let key = format!("k{n}");
        let out = c
            .engine(1)
            .write(&config_stream(), set(&key, "v"))
            .await
            .unwrap();
        assert!(out.majority());
        acked.push(key);
    }
    // Peer 3 misses the last changes; only Peer 2 holds them with Peer 1.
    c.partition(3);
    for n in 30..40 {
        let key = format!("k{n}");
        assert!(c
            .engine(1)
            .write(&config_stream(), set(&key, "v"))
            .await
            .unwrap()
            .majority());
        acked.push(key);
    }
    c.kill(1);
    c.heal();
    // One command, on Peer 3 (the peer that is behind), naming Peer 3.
    let epoch = c.engine(3).set_primary(3).await.unwrap();
    assert!(epoch >= 1);
    eprintln!("{:?}\n{:?}", c.engine(3).status(), c.engine(2).status());
    for i in [2, 3] {
        assert_eq!(c.engine(i).primary(), 3, "Peer {i}");
    }
    // The new primary took the newest configuration first: nothing acknowledged is lost.
    for k in &acked {
        assert_eq!(
            get(&c, 3, k).as_deref(),
            Some("v"),
            "{k} on the new primary"
        );
    }
    let out = c
        .engine(2)
        .write(&config_stream(), set("after", "1"))
        .await
        .unwrap();
    assert!(out.majority());
    // Peer 1 comes back with its own file still naming itself: it follows, never overwrites.
    c.start(1);
    let h = c.converge(3, Duration::from_secs(3)).await;
    assert_eq!(c.engine(1).primary(), 3);
    assert_eq!(h.generation, epoch);
    for k in &acked {
        assert_eq!(
            get(&c, 1, k).as_deref(),
            Some("v"),
            "{k} on the old primary"
        );
    }
    assert_eq!(get(&c, 1, "after").as_deref(), Some("1"));
    assert_eq!(
        c.engine(1)
            .write(&config_stream(), set("x", "y"))
            .await
            .unwrap()
            .seq,
        h.seq + 1,
        "the old primary forwards to the new one"
    );
    assert_eq!(*c.recorder(1).primaries.lock().unwrap(), vec![3]);
}

#[tokio::test(start_paused = true)]
async fn peers_that_disagree_on_the_primary_raise_20017_and_are_not_active_until_set_primary() {
    // Peer 3's file names Peer 2 as the primary, the others' Peer 1.
    let c = Cluster::with_primaries(&[1, 1, 2]);
    // Past five heartbeats of disagreement (200 ms each).
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, other) in [(1, 3), (2, 3), (3, 1)] {
        let alarms = c.engine(i).alarms(true);
        assert!(
            alarms
                .iter()
                .any(|a| a.0 == 20017 && a.1 == format!("Peer {other}")),
            "20017 for Peer {other} on Peer {i}: {alarms:?}"
        );
        let status = c.engine(i).status().database_status;
        assert!(
            status.starts_with("Not synchronised"),
            "Peer {i} reads {status:?} while 20017 is raised"
        );
        assert!(
            status.contains(&format!("Peer {other}: names Peer")),
            "Peer {i}: {status}"
        );
    }
    // One SetPrimary settles it: no 20017 and Active everywhere.
    c.engine(3).set_primary(1).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 1..=3 {
        assert_eq!(c.engine(i).primary(), 1, "Peer {i}");
        let alarms = c.engine(i).alarms(true);
        assert!(alarms.iter().all(|a| a.0 != 20017), "Peer {i}: {alarms:?}");
        assert_eq!(c.engine(i).status().database_status, "Active", "Peer {i}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_tampered_store_is_alarmed_and_force_config_update_repairs_it() {
    let mut c = Cluster::new(3);
    settle().await;
    c.engine(1)
        .write(&config_stream(), set("sip.domains", "example.com"))
        .await
        .unwrap();
    c.converge(1, Duration::from_secs(1)).await;
    c.kill(2);
    assert!(overwrite_in_store(
        c.stores[1].as_ref(),
        &config_stream(),
        "sip.domains",
        b"evil.example"
    )
    .unwrap());
    c.start(2);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let alarms = c.engine(2).alarms(true);
    let conflict = alarms
        .iter()
        .find(|a| a.0 == 20011)
        .unwrap_or_else(|| panic!("20011 raised: {alarms:?}"));
    assert!(conflict.2.contains("ForceConfigUpdate"), "{conflict:?}");
    assert!(c
        .engine(2)
        .status()
        .database_status
        .starts_with("Not synchronised"));
    let on_primary = c.engine(1).force_config_update().await.unwrap_err();
    assert!(on_primary.message.contains("primary"), "{on_primary}");
    assert_eq!(on_primary.code, causeway_common::error::ErrorCode::Conflict);
    c.engine(2).force_config_update().await.unwrap();
    assert_eq!(get(&c, 2, "sip.domains").as_deref(), Some("example.com"));
    assert!(c.engine(2).alarms(true).is_empty());
    assert_eq!(c.engine(2).status().database_status, "Active");
}

#[tokio::test(start_paused = true)]
async fn pushes_from_a_non_primary_or_an_older_generation_are_rejected() {
    let c = Cluster::new(3);
    settle().await;
    c.engine(1)
        .write(&config_stream(), set("sip.domains", "example.com"))
        .await
        .unwrap();
    c.converge(1, Duration::from_secs(1)).await;
    let mine = c.engine(2).header(&config_stream());
    let forged = |generation: u64| Message::Push {
        stream: config_stream(),
        prev: mine.position(),
        header: Header {
            generation,
            seq: mine.seq + 1,
            ..mine
        },
        records: vec![causeway_replication::Record {
            key: "sip.domains".into(),
            value: Some(b"evil.example".to_vec()),
            seq: mine.seq + 1,
        }],
    };
    // From Peer 3, which is not the primary.
    c.engine(2).handle(3, &forged(mine.generation).encode());
    assert_eq!(c.engine(2).status().rejected_messages, 1);
    // From the primary, but an older generation.
    let newer = c.engine(2).set_primary(1).await.unwrap();
    c.converge(1, Duration::from_secs(1)).await;
    assert!(c.engine(2).header(&config_stream()).generation >= newer);
    c.engine(2).handle(1, &forged(0).encode());
    assert_eq!(c.engine(2).status().rejected_messages, 2);
    // Garbage.
    c.engine(2).handle(1, b"\xff\xff\xff\xffnot a message");
    assert_eq!(c.engine(2).status().rejected_messages, 3);
    assert_eq!(get(&c, 2, "sip.domains").as_deref(), Some("example.com"));
}

#[tokio::test(start_paused = true)]
async fn an_invalid_value_is_refused_with_the_field_named_on_any_peer() {
    let c = Cluster::new(3);
    settle().await;
    for via in [1, 2] {
        let err = c
            .engine(via)
            .write(&config_stream(), set("sip.max_calls", "lots"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("sip.max_calls"), "{err}");
    }
    assert_eq!(
        c.engine(1).header(&config_stream()).seq,
        0,
        "nothing written"
    );
}

#[tokio::test(start_paused = true)]
async fn a_primary_restored_from_an_older_backup_gets_its_later_writes_back_from_the_peers() {
    use causeway_replication::lifecycle;
    let mut c = Cluster::new(3);
    settle().await;
    for n in 0..10 {
        c.engine(1)
            .write(&config_stream(), set(&format!("k{n}"), "old"))
            .await
            .unwrap();
    }
    let backup = lifecycle::dump(c.stores[0].as_ref()).unwrap();
    for n in 5..20 {
        assert!(c
            .engine(1)
            .write(&config_stream(), set(&format!("k{n}"), "new"))
            .await
            .unwrap()
            .majority());
    }
    c.kill(1);
    lifecycle::restore(c.stores[0].as_ref(), &backup, None).unwrap();
    c.start(1);
    assert_eq!(c.engine(1).header(&config_stream()).seq, 10);
    let h = c.converge(2, Duration::from_secs(3)).await;
    assert_eq!(h.seq, 25, "nothing acknowledged is lost");
    assert_eq!(get(&c, 1, "k7").as_deref(), Some("new"));
    assert_eq!(get(&c, 1, "k19").as_deref(), Some("new"));
    assert_eq!(get(&c, 1, "k2").as_deref(), Some("old"));
}

#[tokio::test(start_paused = true)]
async fn a_primary_that_lost_its_store_is_refilled_by_the_peers() {
    let mut c = Cluster::new(3);
    settle().await;
    for n in 0..10 {
        c.engine(1)
            .write(&config_stream(), set(&format!("k{n}"), "v"))
            .await
            .unwrap();
    }
    c.kill(1);
    causeway_replication::lifecycle::factory_reset(c.stores[0].as_ref()).unwrap();
    c.start(1);
    let h = c.converge(2, Duration::from_secs(3)).await;
    assert_eq!(h.seq, 10);
    assert_eq!(get(&c, 1, "k9").as_deref(), Some("v"));
    // And it goes on as the primary.
    let out = c
        .engine(1)
        .write(&config_stream(), set("after", "1"))
        .await
        .unwrap();
    assert_eq!(out.seq, 11);
}

#[tokio::test(start_paused = true)]
async fn values_are_sealed_at_rest_with_the_system_key_and_a_key_change_reseals_them() {
    use causeway_replication::keyring::KeyFiles;
    let dir = tempfile::tempdir().unwrap();
    let files = KeyFiles::in_dir(dir.path());
    let (ring, _) = files.load_or_create().unwrap();
    let ring = Arc::new(ring);
    let store = Arc::new(MemoryStore::new());
    let open = |keyring: Option<Arc<causeway_replication::keyring::Keyring>>| {
        let mut settings = EngineSettings::new(1, 1, 1);
        settings.keyring = keyring;
        Engine::open(
            settings,
            store.clone(),
            Arc::new(NoLink),
            Arc::new(Recorder::default()),
        )
    };
    let engine = open(Some(ring.clone())).unwrap();
    engine
        .write(&config_stream(), set("sip.users.alice", "s3cret"))
        .await
        .unwrap();
    let plain_hash = engine.header(&config_stream()).hash;
    let raw = causeway_replication::lifecycle::dump(store.as_ref()).unwrap();
    let in_clear = raw
        .tables
        .iter()
        .flat_map(|(_, rows)| rows)
        .any(|(_, v)| v.windows(6).any(|w| w == b"s3cret"));
    assert!(!in_clear, "the secret is not in the store in clear");
    drop(engine);
    assert!(open(None).is_err(), "unreadable without the key");
    let engine = open(Some(ring.clone())).unwrap();
    assert_eq!(
        engine.get(&config_stream(), "sip.users.alice").as_deref(),
        Some(&b"s3cret"[..])
    );
    assert_eq!(
        engine.header(&config_stream()).hash,
        plain_hash,
        "peers compare plain values"
    );
    // Key change: every value resealed; the old key alone no longer reads the store.
    let next = Arc::new(files.begin_change().unwrap());
    assert_eq!(engine.reseal(next.clone()).unwrap(), 1);
    files.finish_change().unwrap();
    drop(engine);
    let (after, _) = files.load_or_create().unwrap();
    let engine = open(Some(Arc::new(after))).unwrap();
    assert_eq!(
        engine.get(&config_stream(), "sip.users.alice").as_deref(),
        Some(&b"s3cret"[..])
    );
    drop(engine);
    let err = open(Some(ring)).err().unwrap().to_string();
    assert!(err.contains("does not have"), "{err}");
}

struct NoLink;
impl PeerLink for NoLink {
    fn send(&self, _: usize, _: Bytes) -> bool {
        false
    }
    fn active_peers(&self) -> Vec<usize> {
        Vec::new()
    }
}

#[tokio::test(start_paused = true)]
async fn every_peer_owns_a_stream_of_its_own_and_a_writer_that_started_over_replaces_it() {
    let mut c = Cluster::new(3);
    settle().await;
    let own = |k: usize| StreamId::new("alarms", &format!("peer{k}"));
    for k in 1..=3 {
        c.engine(k)
            .write(&own(k), set("20004|198.18.0.9", &format!("from {k}")))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for reader in 1..=3 {
        for k in 1..=3 {
            assert_eq!(
                c.engine(reader).get(&own(k), "20004|198.18.0.9").as_deref(),
                Some(format!("from {k}").as_bytes()),
                "Peer {reader} holds Peer {k}'s stream"
            );
        }
    }
    // Nobody but its owner writes a stream: a push of Peer 3's stream from Peer 2 is refused.
    let h = c.engine(1).header(&own(3));
    let forged = Message::Push {
        stream: own(3),
        prev: h.position(),
        header: Header {
            seq: h.seq + 1,
            ..h
        },
        records: vec![causeway_replication::Record {
            key: "forged".into(),
            value: Some(b"x".to_vec()),
            seq: h.seq + 1,
        }],
    };
    c.engine(1).handle(2, &forged.encode());
    assert_eq!(c.engine(1).get(&own(3), "forged"), None);
    // Peer 3 loses its store and starts over with one different entry.
    c.kill(3);
    causeway_replication::lifecycle::factory_reset(c.stores[2].as_ref()).unwrap();
    c.start(3);
    c.engine(3)
        .write(&own(3), set("20006|Peer 1", "fresh"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for reader in 1..=2 {
        assert_eq!(
            c.engine(reader).entries(&own(3)),
            vec![("20006|Peer 1".to_string(), b"fresh".to_vec())],
            "Peer {reader} replaced Peer 3's old stream"
        );
    }
    assert_eq!(c.engine(1).streams("alarms").len(), 3);
}

/// A store whose writes can be made to fail, like a full or failing disk.
#[derive(Default)]
struct FlakyStore {
    inner: MemoryStore,
    failing: std::sync::atomic::AtomicBool,
}

impl Store for FlakyStore {
    fn in_memory(&self) -> bool {
        true
    }

    fn get(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(table, key)
    }
    fn scan(&self, table: &'static str, prefix: &[u8]) -> Result<Rows, StoreError> {
        self.inner.scan(table, prefix)
    }
    fn apply(&self, ops: &[Op]) -> Result<(), StoreError> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Io {
                path: "flaky".into(),
                doing: "committing",
                reason: "No space left on device".into(),
            });
        }
        self.inner.apply(ops)
    }
}

#[tokio::test(start_paused = true)]
async fn a_subordinate_whose_disk_fails_raises_20009_acks_nothing_unsaved_and_catches_up_after() {
    use std::sync::atomic::Ordering;
    let mut c = Cluster::new(3);
    settle().await;
    c.stores[2].failing.store(true, Ordering::SeqCst);
    for n in 0..5 {
        let out = c
            .engine(1)
            .write(&config_stream(), set(&format!("k{n}"), "v"))
            .await
            .unwrap();
        assert_eq!(
            out.confirmed, 2,
            "Peer 3 saved nothing, so it acknowledged nothing"
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        c.engine(3).alarms(true).iter().any(|a| a.0 == 20009),
        "{:?}",
        c.engine(3).alarms(true)
    );
    assert_eq!(
        c.engine(3).header(&config_stream()).seq,
        0,
        "what is shown is what is saved"
    );
    c.stores[2].failing.store(false, Ordering::SeqCst);
    c.converge(1, Duration::from_secs(3)).await;
    assert!(c.engine(3).alarms(true).is_empty());
    // Saved for real: a restart reads it back.
    c.kill(3);
    c.start(3);
    assert_eq!(c.engine(3).header(&config_stream()).seq, 5);
}

/// The group commit's interval (docs/replication.md, "The commit interval"): a writer alone
/// is committed at once, write after write; under load, commits start at most every
/// `commit_interval`, so the writes of one interval share a commit, and none waits much
/// longer than that.
#[tokio::test(start_paused = true)]
async fn under_load_commits_start_at_most_every_interval_and_a_lone_writer_never_waits() {
    use std::sync::atomic::Ordering::Relaxed;
    let c = Cluster::new(3);
    settle().await;
    let primary = c.engine(1);
    let interval = EngineSettings::new(1, 3, 1).commit_interval;
    let commits = || primary.counters().commits.load(Relaxed);

    // One writer, one write after the other: never held for the interval.
    let (before, started) = (commits(), tokio::time::Instant::now());
    for n in 0..20 {
        let change = set("sip.max_calls", &n.to_string());
        primary
            .write(&config_stream(), change)
            .await
            .expect("lone write");
    }
    assert!(
        started.elapsed() < interval,
        "20 writes one after the other took {:?}: a lone writer waited for the interval",
        started.elapsed()
    );
    assert_eq!(
        commits() - before,
        20,
        "a lone writer is committed write by write"
    );

    // Writers in bursts of 5 every millisecond (5,000 writes/s) for 100 ms. Here a write
    // takes no time at all (no disk, no network): only a burst overlaps.
    let before = commits();
    let mut writers = Vec::new();
    for n in 0..500 {
        let engine = primary.clone();
        writers.push(tokio::spawn(async move {
            let asked = tokio::time::Instant::now();
            let outcome = engine
                .write(&config_stream(), set(&format!("load.key{n}"), "v"))
                .await
                .expect("write under load");
            (asked.elapsed(), outcome.confirmed)
        }));
        if n % 5 == 4 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let mut slowest = Duration::ZERO;
    for w in writers {
        let (took, confirmed) = w.await.expect("writer task");
        assert!(confirmed >= 2, "answered before a majority held it");
        slowest = slowest.max(took);
    }
    let made = commits() - before;
    assert!(
        made <= 100 / 10 + 4,
        "500 writes over 100 ms took {made} commits: they should share one per {interval:?}"
    );
    assert!(
        made >= 5,
        "{made} commits for 100 ms of writes: some waited far too long"
    );
    assert!(
        slowest <= interval * 2,
        "a write under load waited {slowest:?}, more than twice the interval"
    );
    for key in ["load.key0", "load.key499"] {
        c.converge(1, Duration::from_secs(5)).await;
        assert_eq!(get(&c, 3, key).as_deref(), Some("v"));
    }
}
