//! Replication engine throughput: three engines in one process, each on its own redb file
//! (durable commits), linked by in-process channels. Prints writes per second for one writer
//! at a time, for batches, and for concurrent writers. Run by `bench/replication_throughput.sh`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use causeway_replication::{
    config_stream, Change, Engine, EngineSettings, NoObserver, PeerLink, StreamId,
};
use causeway_store::RedbStore;
use tokio::sync::mpsc;

type Frame = (usize, usize, Bytes);

struct Link {
    me: usize,
    peers: usize,
    tx: mpsc::UnboundedSender<Frame>,
}

impl PeerLink for Link {
    fn send(&self, peer: usize, payload: Bytes) -> bool {
        self.tx.send((self.me, peer, payload)).is_ok()
    }
    fn active_peers(&self) -> Vec<usize> {
        (1..=self.peers).filter(|p| *p != self.me).collect()
    }
}

fn change(key: String, value: String) -> Change {
    Change {
        key,
        value: Some(value.into_bytes()),
    }
}

#[tokio::main]
async fn main() {
    let peers = 3;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
    let mut engines = Vec::new();
    for me in 1..=peers {
        let store = RedbStore::open(&dir.path().join(format!("peer{me}.redb"))).expect("store");
        let engine = Engine::open(
            EngineSettings::new(me, peers, 1),
            Arc::new(store),
            Arc::new(Link {
                me,
                peers,
                tx: tx.clone(),
            }),
            Arc::new(NoObserver),
        )
        .expect("engine");
        tokio::spawn(engine.clone().run(std::future::pending::<()>()));
        engines.push(engine);
    }
    let router = engines.clone();
    tokio::spawn(async move {
        // Like a node's inbound loop: what has arrived is handled as one batch per receiver.
        while let Some(first) = rx.recv().await {
            let mut per_peer: Vec<Vec<(usize, Bytes)>> = vec![Vec::new(); router.len()];
            let mut next = Some(first);
            while let Some((from, to, payload)) = next {
                per_peer[to - 1].push((from, payload));
                next = rx.try_recv().ok();
            }
            for (i, frames) in per_peer.iter().enumerate() {
                if !frames.is_empty() {
                    router[i].handle_batch(frames);
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let primary = engines[0].clone();
    println!("3 engines, durable redb commits, in-process links");

    // CONCURRENT_ONLY=1: only the concurrent writers (the script varies WRITERS).
    if std::env::var("CONCURRENT_ONLY").is_err() {
        let n = 2000;
        let t = Instant::now();
        for i in 0..n {
            primary
                .write(
                    &config_stream(),
                    vec![change(format!("k{i}"), i.to_string())],
                )
                .await
                .expect("write");
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "one change per write, one writer: {n} writes in {secs:.2} s = {:.0} acknowledged writes/s",
            n as f64 / secs
        );

        let batches = 200;
        let per = 100;
        let t = Instant::now();
        for b in 0..batches {
            let changes = (0..per)
                .map(|i| change(format!("b{b}.{i}"), "v".into()))
                .collect();
            primary
                .write(&config_stream(), changes)
                .await
                .expect("write");
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "batches of {per}: {} changes in {secs:.2} s = {:.0} acknowledged changes/s",
            batches * per,
            (batches * per) as f64 / secs
        );
    }

    let writers: usize = std::env::var("WRITERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(64);
    let each = 8000 / writers;
    let stream = StreamId::new("registrations", "peer1");
    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let e = primary.clone();
        let stream = stream.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..each {
                e.write(&stream, vec![change(format!("w{w}.{i}"), "v".into())])
                    .await
                    .expect("write");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{writers} concurrent writers, one change each: {} writes in {secs:.2} s = {:.0} acknowledged writes/s",
        writers * each,
        (writers * each) as f64 / secs
    );
    let h = engines[2].header(&config_stream());
    assert_eq!(
        h,
        primary.header(&config_stream()),
        "Peer 3 holds everything"
    );
}
