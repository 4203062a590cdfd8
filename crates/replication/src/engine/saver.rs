//! The engine's saves, made in the order the engine queued them, off the async runtime
//! (`docs/replication.md`, "Saves outside the lock").
//!
//! The engine changes its memory under its lock and queues the matching store operations
//! there, so the queue's order is the order of the changes. A thread of its own saves them
//! (several queued batches in one transaction, one fsync) and then runs each batch's
//! completion, in order: the pushes, acks, digests and fetch answers that describe what
//! was saved leave only from there, so no peer is ever told of a change this node has not
//! saved. A store in memory (tests on tokio's paused clock) is saved inline instead: a
//! thread would let the paused clock jump while a save is outstanding.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use causeway_store::{Op, Store};
use tracing::warn;

use super::status::EngineCounters;
use super::LOG;

/// How a queued save ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Saved {
    Ok,
    /// The store refused the transaction (full or failing disk): the engine goes back to
    /// what the store holds.
    Failed(String),
    /// Not attempted: an earlier batch's save failed, and this batch was queued before the
    /// engine reloaded from the store, so saving it would leave a gap on disk.
    Skipped,
}

pub(super) type Completion = Box<dyn FnOnce(&Saved) + Send>;

struct Job {
    /// The engine's save epoch when the batch was queued (bumped by each reload).
    epoch: u64,
    ops: Vec<Op>,
    done: Completion,
}

/// A save queued under the engine's lock. For an inline save, `finish` runs its completion
/// once the caller has released the lock (completions take the lock themselves).
#[must_use = "an inline save's completion runs only in finish()"]
pub(super) struct Ticket(Option<(Saved, Completion)>);

impl Ticket {
    pub(super) fn finish(self) {
        if let Some((saved, done)) = self.0 {
            done(&saved);
        }
    }
}

pub(super) struct Saver {
    /// `None`: saved inline, on the caller's thread.
    queue: Option<mpsc::Sender<Job>>,
    inline: Mutex<Writer>,
}

/// Saves batches; remembers the epoch of the last failure so that the batches queued
/// before the engine reloaded are skipped.
struct Writer {
    store: Arc<dyn Store>,
    counters: Arc<EngineCounters>,
    failed_epoch: Option<u64>,
}

/// At most this many queued batches go into one transaction.
const MOST_BATCHES: usize = 256;

impl Saver {
    pub(super) fn start(store: Arc<dyn Store>, counters: Arc<EngineCounters>) -> Saver {
        let in_memory = store.in_memory();
        let mut writer = Writer {
            store,
            counters,
            failed_epoch: None,
        };
        if in_memory {
            return Saver {
                queue: None,
                inline: Mutex::new(writer),
            };
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let inline = Mutex::new(Writer {
            store: writer.store.clone(),
            counters: writer.counters.clone(),
            failed_epoch: None,
        });
        let spawned = std::thread::Builder::new()
            .name("repl-save".into())
            .spawn(move || {
                // Ends when the engine (the only sender) is dropped.
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    while jobs.len() < MOST_BATCHES {
                        match rx.try_recv() {
                            Ok(job) => jobs.push(job),
                            Err(_) => break,
                        }
                    }
                    writer.save(jobs);
                }
            });
        match spawned {
            Ok(_) => Saver {
                queue: Some(tx),
                inline,
            },
            Err(e) => {
                warn!(target: LOG, reason = %e,
                    "No thread for the store's saves: saving on the caller's thread");
                Saver {
                    queue: None,
                    inline,
                }
            }
        }
    }

    /// Queues `ops` (possibly none: then `done` only runs after every save queued before
    /// it). Call with the engine's lock held, so the queue follows the order of changes.
    pub(super) fn queue(&self, epoch: u64, ops: Vec<Op>, done: Completion) -> Ticket {
        let job = Job { epoch, ops, done };
        let job = match &self.queue {
            Some(tx) => match tx.send(job) {
                Ok(()) => return Ticket(None),
                // The thread is gone (it panicked): save inline from now on.
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let mut writer = self.inline.lock().unwrap_or_else(|p| p.into_inner());
        let saved = writer.save_one(job.epoch, &job.ops);
        Ticket(Some((saved, job.done)))
    }
}

impl Writer {
    fn save(&mut self, mut jobs: Vec<Job>) {
        // Skipped ones first: they are never part of the transaction.
        let mut outcomes: Vec<Option<Saved>> = jobs
            .iter()
            .map(|j| self.skips(j.epoch).then_some(Saved::Skipped))
            .collect();
        let mut ops = Vec::new();
        for (job, outcome) in jobs.iter_mut().zip(&outcomes) {
            if outcome.is_none() {
                ops.append(&mut job.ops);
            }
        }
        let result = if ops.is_empty() {
            Ok(())
        } else {
            self.apply(&ops)
        };
        let mut first_failure = true;
        for (job, outcome) in jobs.iter().zip(outcomes.iter_mut()) {
            if outcome.is_some() {
                continue;
            }
            *outcome = Some(match &result {
                Ok(()) => Saved::Ok,
                // One failure per transaction: the first batch reports it (and the engine
                // reloads once); the rest of the transaction was not saved either.
                Err(e) if first_failure => {
                    first_failure = false;
                    self.failed_epoch = Some(job.epoch);
                    Saved::Failed(e.clone())
                }
                Err(_) => Saved::Skipped,
            });
        }
        for (job, outcome) in jobs.into_iter().zip(outcomes) {
            (job.done)(&outcome.unwrap_or(Saved::Skipped));
        }
    }

    fn save_one(&mut self, epoch: u64, ops: &[Op]) -> Saved {
        if self.skips(epoch) {
            return Saved::Skipped;
        }
        if ops.is_empty() {
            return Saved::Ok;
        }
        match self.apply(ops) {
            Ok(()) => Saved::Ok,
            Err(e) => {
                self.failed_epoch = Some(epoch);
                Saved::Failed(e)
            }
        }
    }

    fn skips(&self, epoch: u64) -> bool {
        self.failed_epoch.is_some_and(|f| epoch <= f)
    }

    fn apply(&self, ops: &[Op]) -> Result<(), String> {
        // A real duration for the metric, not logic: std's clock on purpose.
        let started = std::time::Instant::now();
        self.store.apply(ops).map_err(|e| e.to_string())?;
        let c = &self.counters;
        c.commits.fetch_add(1, Ordering::Relaxed);
        c.commit_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_store::{MemoryStore, Rows, StoreError};
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    /// A store on "disk" (saved on the thread) that records each transaction and can be
    /// made to fail, like a full disk.
    #[derive(Default)]
    struct Disk {
        inner: MemoryStore,
        transactions: Mutex<Vec<Vec<Op>>>,
        failing: AtomicBool,
    }

    impl Store for Disk {
        fn get(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(table, key)
        }
        fn scan(&self, table: &'static str, prefix: &[u8]) -> Result<Rows, StoreError> {
            self.inner.scan(table, prefix)
        }
        fn apply(&self, ops: &[Op]) -> Result<(), StoreError> {
            // Slow enough that batches queue up behind a save, as behind an fsync.
            std::thread::sleep(Duration::from_millis(2));
            if self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::Io {
                    path: "disk".into(),
                    doing: "writing",
                    reason: "no space left on device".into(),
                });
            }
            self.transactions.lock().unwrap().push(ops.to_vec());
            self.inner.apply(ops)
        }
    }

    fn put(n: u8) -> Op {
        Op::Put {
            table: "t",
            key: vec![n],
            value: vec![n],
        }
    }

    fn queue(
        saver: &Saver,
        epoch: u64,
        ops: Vec<Op>,
    ) -> (Ticket, std::sync::mpsc::Receiver<Saved>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let ticket = saver.queue(
            epoch,
            ops,
            Box::new(move |s: &Saved| {
                let _ = tx.send(s.clone());
            }),
        );
        (ticket, rx)
    }

    fn outcome(rx: &std::sync::mpsc::Receiver<Saved>) -> Saved {
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the save's completion ran")
    }

    #[test]
    fn batches_are_saved_in_queue_order_several_to_a_transaction_off_the_callers_thread() {
        let disk = Arc::new(Disk::default());
        let saver = Saver::start(disk.clone(), Arc::default());
        assert!(saver.queue.is_some(), "a store on disk gets a thread");
        let mut done = Vec::new();
        for n in 0..50u8 {
            let (ticket, rx) = queue(&saver, 0, vec![put(n)]);
            ticket.finish(); // nothing to do for a threaded save
            done.push(rx);
        }
        let order: Vec<Saved> = done.iter().map(outcome).collect();
        assert!(order.iter().all(|s| *s == Saved::Ok));
        let transactions = disk.transactions.lock().unwrap().clone();
        let saved: Vec<Op> = transactions.iter().flatten().cloned().collect();
        assert_eq!(saved, (0..50).map(put).collect::<Vec<_>>());
        assert!(
            transactions.len() < 50,
            "batches queued behind a save share its successor's transaction ({} transactions)",
            transactions.len()
        );
    }

    #[test]
    fn after_a_failed_save_the_batches_queued_before_the_reload_are_skipped() {
        let disk = Arc::new(Disk::default());
        let saver = Saver::start(disk.clone(), Arc::default());
        disk.failing.store(true, Ordering::SeqCst);
        let (_t, first) = queue(&saver, 0, vec![put(1)]);
        assert!(matches!(outcome(&first), Saved::Failed(e) if e.contains("no space")));
        disk.failing.store(false, Ordering::SeqCst);
        // Queued before the engine reloaded (same epoch): saving it would leave a gap.
        let (_t, second) = queue(&saver, 0, vec![put(2)]);
        assert_eq!(outcome(&second), Saved::Skipped);
        // After the reload (epoch bumped), saves go on.
        let (_t, third) = queue(&saver, 1, vec![put(3)]);
        assert_eq!(outcome(&third), Saved::Ok);
        let saved: Vec<Op> = disk.transactions.lock().unwrap().concat();
        assert_eq!(saved, vec![put(3)]);
    }

    #[test]
    fn a_store_in_memory_is_saved_inline_and_completes_when_the_ticket_is_finished() {
        let store = Arc::new(MemoryStore::new());
        let saver = Saver::start(store.clone(), Arc::default());
        assert!(saver.queue.is_none());
        let (ticket, rx) = queue(&saver, 0, vec![put(7)]);
        assert_eq!(
            store.get("t", &[7]).unwrap(),
            Some(vec![7]),
            "saved at once"
        );
        assert!(rx.try_recv().is_err(), "completion waits for finish()");
        ticket.finish();
        assert_eq!(outcome(&rx), Saved::Ok);
    }
}
