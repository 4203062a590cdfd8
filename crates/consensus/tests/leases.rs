//! Lease groups of 1, 3 and 5 members over the real mesh on the in-memory network, on
//! tokio's paused clock. An observer sees every holder change of every member and checks
//! that no two members ever hold the lease in the same instant.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use causeway_consensus::observer::Observer;
use causeway_consensus::{LeaderLease, LeaseGroup, LeaseTiming};
use causeway_mesh::rpc::{Rpc, RPC_CHANNEL};
use causeway_mesh::{ClusterSettings, MemoryNetwork, Mesh, SystemResolver, Timing, TlsMode};
use causeway_store::{MemoryStore, Store};
use tokio::task::JoinHandle;
use tokio::time::Instant;

fn ip(k: usize) -> IpAddr {
    format!("198.18.1.{k}").parse().unwrap()
}

struct Member {
    mesh: Arc<Mesh>,
    rpc: Arc<Rpc>,
    group: Arc<LeaseGroup>,
    router: JoinHandle<()>,
    watcher: JoinHandle<()>,
}

struct Lab {
    net: MemoryNetwork,
    n: usize,
    stores: Vec<Arc<dyn Store>>,
    members: Vec<Option<Member>>,
    observer: Arc<Observer>,
}

impl Lab {
    fn start(n: usize) -> Lab {
        if std::env::var("RUST_LOG").is_ok() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let mut lab = Lab {
            net: MemoryNetwork::new(),
            n,
            stores: (0..n)
                .map(|_| Arc::new(MemoryStore::new()) as Arc<dyn Store>)
                .collect(),
            members: (0..n).map(|_| None).collect(),
            observer: Arc::default(),
        };
        for k in 1..=n {
            lab.boot(k);
        }
        lab
    }

    fn peers(&self) -> Vec<String> {
        (1..=self.n).map(|k| ip(k).to_string()).collect()
    }

    fn boot(&mut self, k: usize) {
        assert!(self.members[k - 1].is_none(), "member {k} is running");
        let settings = ClusterSettings {
            cluster_name: "leases.example".into(),
            peers: self.peers(),
            self_index: k,
            configuration_primary: 1,
            ip_version: Default::default(),
            tls_mode: TlsMode::Permissive,
            port: 4372,
            system_name: format!("peer{k}"),
            software_version: "test".into(),
            timing: Timing::default(),
        };
        let resolver = Arc::new(SystemResolver {
            ip_version: Default::default(),
        });
        let (mesh, mut inbound) = Mesh::start(settings, self.net.transport(ip(k)), resolver);
        let mesh = Arc::new(mesh);
        let rpc = Rpc::new(mesh.clone());
        let r = rpc.clone();
        let router = tokio::spawn(async move {
            while let Some(m) = inbound.recv().await {
                if m.channel == RPC_CHANNEL {
                    r.handle(m.from, &m.payload);
                }
            }
        });
        let group = LeaseGroup::start(
            "calls",
            k,
            (1..=self.n).collect(),
            &self.peers().join(","),
            self.stores[k - 1].clone(),
            rpc.clone(),
            LeaseTiming::default(),
        )
        .expect("the group starts");
        let watcher = self.observer.watch(k, group.as_ref());
        // Ends with the group, like the watcher.
        drop(self.observer.watch_deadlines(k, group.hold()));
        self.members[k - 1] = Some(Member {
            mesh,
            rpc,
            group,
            router,
            watcher,
        });
    }

    /// Stops member `k` as a kill would: it answers nothing from now on. Its lease ends
    /// now (a killed process cannot act on it).
    async fn kill(&mut self, k: usize) {
        let Some(m) = self.members[k - 1].take() else {
            return;
        };
        m.router.abort();
        m.group.shutdown().await;
        m.rpc.shutdown().await;
        m.mesh.shutdown().await;
        // The watcher ends when the group is gone, after seeing its last state.
        drop(m.group);
        if tokio::time::timeout(Duration::from_secs(1), m.watcher)
            .await
            .is_err()
        {
            panic!("member {k}'s lease group was not dropped at its kill");
        }
    }

    fn holder(&self) -> Option<usize> {
        self.observer.holder_now().map(|(m, _)| m)
    }

    fn isolate(&self, k: usize) {
        let all: Vec<IpAddr> = (1..=self.n).map(ip).collect();
        self.net.isolate(ip(k), &all);
    }

    async fn wait_holder(&self, within: Duration, what: &str) -> usize {
        let deadline = Instant::now() + within;
        loop {
            if let Some(h) = self.holder() {
                return h;
            }
            assert!(
                Instant::now() < deadline,
                "no holder within {within:?}: {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for a holder other than `old`, acquired after `since`.
    async fn wait_new_holder(&self, old: usize, since: Instant, within: Duration) -> usize {
        let deadline = since + within;
        loop {
            if let Some((h, from)) = self.observer.holder_now() {
                if h != old && from >= since {
                    return h;
                }
            }
            if Instant::now() >= deadline {
                let held = self.observer.history();
                let rel: Vec<_> = held
                    .iter()
                    .map(|h| {
                        (
                            h.member,
                            h.generation,
                            h.from.checked_duration_since(since),
                            h.until.and_then(|u| u.checked_duration_since(since)),
                        )
                    })
                    .collect();
                panic!("no new holder within {within:?} of losing Peer {old}: {rel:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn stop(mut self) {
        for k in 1..=self.n {
            self.kill(k).await;
        }
        self.observer.check();
    }
}

/// The bound the issue sets: the lease time plus one election, with room for the RPCs.
fn failover_bound() -> Duration {
    let t = LeaseTiming::default();
    t.lease() + t.election_timeout_max + t.renew + Duration::from_millis(150)
}

async fn kill_partition_heal_restart(n: usize) {
    let mut lab = Lab::start(n);
    let first = lab
        .wait_holder(Duration::from_secs(5), "first election")
        .await;

    // The holder is killed: a survivor holds the lease within the bound.
    let t = Instant::now();
    lab.kill(first).await;
    let second = lab.wait_new_holder(first, t, failover_bound()).await;
    lab.observer.check();
    lab.boot(first);

    // The holder is partitioned into a minority of one: it lets go, the majority elects.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let holder = lab.holder().unwrap_or(second);
    let t = Instant::now();
    lab.isolate(holder);
    let third = lab.wait_new_holder(holder, t, failover_bound()).await;
    assert_ne!(third, holder);
    lab.observer.check();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_ne!(
        lab.holder(),
        Some(holder),
        "the isolated member cannot hold the lease"
    );
    lab.net.heal_all();
    lab.wait_holder(Duration::from_secs(5), "after healing")
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    lab.observer.check();

    // Every member restarted, in reverse order, one every 300 ms: a holder once a
    // majority is back, and the votes on disk keep it to one per term.
    for k in 1..=n {
        lab.kill(k).await;
    }
    assert_eq!(lab.holder(), None);
    for k in (1..=n).rev() {
        lab.boot(k);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    lab.wait_holder(Duration::from_secs(5), "after a full restart")
        .await;
    lab.stop().await;
}

#[tokio::test(start_paused = true)]
async fn three_members_kill_partition_heal_restart_never_two_holders() {
    kill_partition_heal_restart(3).await;
}

#[tokio::test(start_paused = true)]
async fn five_members_kill_partition_heal_restart_never_two_holders() {
    kill_partition_heal_restart(5).await;
}

#[tokio::test(start_paused = true)]
async fn a_single_member_group_holds_its_lease_after_its_quiet_start() {
    let lab = Lab::start(1);
    let started = Instant::now();
    lab.wait_holder(Duration::from_secs(2), "single member")
        .await;
    assert!(
        Instant::now() - started >= LeaseTiming::default().lease(),
        "not before its quiet start"
    );
    lab.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_ineligible_member_votes_but_never_holds() {
    let mut lab = Lab::start(3);
    // Member 3 is a witness: it never stands, but with it 1 or 2 still have a majority.
    lab.members[2].as_ref().unwrap().group.set_eligible(false);
    let first = lab.wait_holder(Duration::from_secs(5), "first").await;
    assert_ne!(first, 3);
    let other = if first == 1 { 2 } else { 1 };
    let t = Instant::now();
    lab.kill(first).await;
    let next = lab.wait_new_holder(first, t, failover_bound()).await;
    assert_eq!(next, other, "the witness's vote elects the other member");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let history = lab.observer.history();
    assert!(
        history.iter().all(|h| h.member != 3),
        "the witness never held it: {history:?}"
    );
    lab.stop().await;
}

/// Deterministic xorshift so a seed replays the same schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0.max(1);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One random schedule of kills, restarts, partitions, one-way delays and heals.
async fn random_schedule(seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xdead_beef);
    let n = if rng.below(2) == 0 { 3 } else { 5 };
    let mut lab = Lab::start(n);
    lab.wait_holder(Duration::from_secs(5), "first").await;
    for _ in 0..12 {
        let k = 1 + rng.below(n as u64) as usize;
        match rng.below(6) {
            0 => lab.kill(k).await,
            1 => {
                if lab.members[k - 1].is_none() {
                    lab.boot(k);
                }
            }
            2 => lab.isolate(k),
            3 => {
                let j = 1 + rng.below(n as u64) as usize;
                if j != k {
                    lab.net.partition(ip(k), ip(j));
                }
            }
            4 => {
                let j = 1 + rng.below(n as u64) as usize;
                let d = Duration::from_millis(rng.below(200));
                lab.net.delay(ip(k), ip(j), d);
            }
            _ => lab.net.heal_all(),
        }
        tokio::time::sleep(Duration::from_millis(50 + rng.below(1500))).await;
        lab.observer.check();
    }
    // Everything healed and running: one holder again, with no overlap anywhere before.
    lab.net.heal_all();
    for k in 1..=n {
        lab.net.delay(ip(k), ip(k % n + 1), Duration::ZERO);
        lab.net.delay(ip(k % n + 1), ip(k), Duration::ZERO);
        if lab.members[k - 1].is_none() {
            lab.boot(k);
        }
    }
    for a in 1..=n {
        for b in 1..=n {
            lab.net.delay(ip(a), ip(b), Duration::ZERO);
        }
    }
    lab.wait_holder(Duration::from_secs(10), "after the schedule")
        .await;
    lab.stop().await;
}

/// `CONSENSUS_SEEDS` (default 200) schedules from seed 0; `CONSENSUS_SEED=N` replays one.
#[tokio::test(start_paused = true)]
async fn random_fault_schedules_never_give_two_holders() {
    let seeds: Vec<u64> = match std::env::var("CONSENSUS_SEED") {
        Ok(s) => vec![s.parse().expect("CONSENSUS_SEED is a number")],
        Err(_) => {
            let n = std::env::var("CONSENSUS_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(200);
            (0..n).collect()
        }
    };
    for seed in seeds {
        eprintln!("seed {seed} (replay: CONSENSUS_SEED={seed})");
        random_schedule(seed).await;
    }
}

/// A member whose vote record is unreadable starts empty and refuses every vote until it
/// hears a leader chosen without it: with only it and one other member up, no one holds
/// the lease (its vote could otherwise be a second one in a term it already voted in).
#[tokio::test(start_paused = true)]
async fn a_member_with_unreadable_records_votes_again_only_after_hearing_a_leader() {
    let mut lab = Lab::start(3);
    let holder = lab.wait_holder(Duration::from_secs(5), "first").await;
    let k = 1 + holder % 3;
    let j = 1 + k % 3;
    lab.kill(holder).await;
    lab.kill(k).await;
    let store = lab.stores[k - 1].clone();
    let vote = store
        .scan("consensus", b"")
        .unwrap()
        .into_iter()
        .find(|(key, _)| key.ends_with(b"/vote"))
        .expect("a vote was saved")
        .0;
    store
        .apply(&[causeway_store::Op::Put {
            table: "consensus",
            key: vote,
            value: b"{not json".to_vec(),
        }])
        .unwrap();
    lab.boot(k);
    let reset = lab.members[k - 1].as_ref().unwrap().group.records_reset();
    assert!(
        reset.borrow().as_ref().is_some_and(|r| r.contains("vote")),
        "{:?}",
        *reset.borrow()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(lab.holder(), None, "Peer {k} gave Peer {j} no vote");
    lab.boot(holder);
    lab.wait_holder(Duration::from_secs(5), "the old holder back")
        .await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while reset.borrow().is_some() {
        assert!(Instant::now() < deadline, "Peer {k} never heard the leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lab.stop().await;
}

/// A holder that resigns (a switchover, or a service whose own part failed) lets go at once
/// and, once ineligible, is replaced by another member within the lease time plus one
/// election and its quiet start; it is never one of two holders, and it can stand again.
#[tokio::test(start_paused = true)]
async fn a_holder_that_resigns_is_replaced_and_never_holds_with_another() {
    let lab = Lab::start(3);
    let first = lab
        .wait_holder(Duration::from_secs(5), "first election")
        .await;
    let group = lab.members[first - 1].as_ref().unwrap().group.clone();
    group.set_eligible(false);
    let t = Instant::now();
    group.resign();
    assert!(
        !matches!(group.state().holder, causeway_consensus::Holder::Me { .. }),
        "lost at once"
    );
    let second = lab.wait_new_holder(first, t, failover_bound()).await;
    assert_ne!(second, first);
    tokio::time::sleep(Duration::from_secs(2)).await;
    lab.observer.check();
    assert_eq!(
        lab.holder(),
        Some(second),
        "the ineligible member stays aside"
    );
    // Eligible again, it holds the lease once the new holder resigns in turn.
    group.set_eligible(true);
    let other = lab.members[second - 1].as_ref().unwrap().group.clone();
    for k in 1..=3 {
        if k != first {
            lab.members[k - 1]
                .as_ref()
                .unwrap()
                .group
                .set_eligible(false);
        }
    }
    let t = Instant::now();
    other.resign();
    let third = lab.wait_new_holder(second, t, failover_bound()).await;
    assert_eq!(third, first);
    // Resigning without holding the lease changes nothing.
    other.resign();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(lab.holder(), Some(first));
    drop((group, other));
    lab.stop().await;
}

/// The HA shape that once gave two holders for 15 ms. A new holder's first rounds are
/// confirmed by one member alone (the witness cannot hear the holder), and that member
/// stands at once, as an HA member whose failure detector had decided a moment earlier
/// would. Its own vote and the witness's would elect it while the new holder, elected
/// less than a lease time ago, refuses to step down: two holders until the new holder's
/// next heartbeat. It must refuse to stand until its last acknowledgement has run out.
#[tokio::test(start_paused = true)]
async fn a_member_that_just_confirmed_the_holder_does_not_stand_beside_it() {
    let lab = Lab::start(3);
    let a = lab.wait_holder(Duration::from_secs(5), "first").await;
    let (b, c) = match a {
        1 => (2, 3),
        2 => (1, 3),
        _ => (1, 2),
    };
    let group = |k: usize| lab.members[k - 1].as_ref().unwrap().group.clone();
    // Members stand only when told (as an HA pair's do), never on openraft's timer.
    for k in 1..=3 {
        group(k).set_eligible(false);
    }
    // Frames to and from `a` are lost (its connections stay up): after a lease time
    // without it, `b` stands and wins with `c`'s vote.
    let lose = |x: usize, y: usize, p: f64| {
        lab.net.loss(ip(x), ip(y), p);
        lab.net.loss(ip(y), ip(x), p);
    };
    lose(a, b, 1.0);
    lose(a, c, 1.0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    group(b)
        .stand_now()
        .await
        .expect("silent for a lease time: b stands");
    let t = Instant::now();
    let new = lab.wait_new_holder(a, t, failover_bound()).await;
    assert_eq!(new, b);
    // `c` hears `a` again, `a` can vote for it, and `b`'s rounds reach `c` only: `c`
    // must not stand now. (Were it to, `b` would learn of it 30 ms late.)
    lose(a, c, 0.0);
    lab.net.delay(ip(c), ip(b), Duration::from_millis(30));
    let refused = group(c).stand_now().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    lab.observer.check();
    assert_eq!(lab.holder(), Some(b));
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("heard the holder")),
        "{refused:?}"
    );
    // Cut off from `b` too, `c` stands after one lease time of silence and wins.
    lose(b, c, 1.0);
    let t = Instant::now();
    tokio::time::sleep(LeaseTiming::default().lease()).await;
    group(c)
        .stand_now()
        .await
        .expect("silent for a lease time: c stands");
    assert_eq!(lab.wait_new_holder(b, t, failover_bound()).await, c);
    lab.stop().await;
}
