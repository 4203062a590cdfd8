//! Who may hold a pair's address (docs/ha.md, section 2): the `ha/<pair>` lease group when
//! the pair has a witness, or, without one, the pair's own heartbeats.
//!
//! Without a witness two voters cannot form a majority that survives the loss of either, so
//! the pair runs on heartbeats: the primary holds while it runs with its health-monitor link
//! up, the secondary takes over after the failover wait of silence, and generations are a
//! stored counter (`max(mine, peer's) + 1` per acquisition). A partition with both links up
//! leaves both holding — the pair says so (21022, `split_brain_protection: none`) — and at
//! the heal the higher generation keeps the address while the other releases at once.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use causeway_consensus::{Holder, LeaderLease, LeaseGroup, LeaseState};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::LOG;

/// How long a heartbeat-held address is held after each renewal, and how long the peer's
/// "I hold" stays believed: the lease group's timing (docs/ha.md, section 3).
const HOLD: Duration = Duration::from_millis(100);
const BELIEVED: Duration = Duration::from_millis(150);
const RENEW: Duration = Duration::from_millis(25);

pub(crate) enum PairLease {
    Group(Arc<LeaseGroup>),
    Beats(Arc<BeatLease>),
}

impl PairLease {
    pub fn state(&self) -> LeaseState {
        match self {
            PairLease::Group(g) => g.state(),
            PairLease::Beats(b) => *b.state.borrow(),
        }
    }

    pub fn watch(&self) -> watch::Receiver<LeaseState> {
        match self {
            PairLease::Group(g) => g.watch(),
            PairLease::Beats(b) => b.state.subscribe(),
        }
    }

    /// While held: the generation and the end of the hold.
    pub fn hold(&self) -> watch::Receiver<Option<(u64, Instant)>> {
        match self {
            PairLease::Group(g) => g.hold(),
            PairLease::Beats(b) => b.hold.subscribe(),
        }
    }

    pub fn last_heard_holder(&self) -> Option<Instant> {
        match self {
            PairLease::Group(g) => g.last_heard_holder(),
            PairLease::Beats(b) => b
                .peer_holding
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .map(|(_, t)| t),
        }
    }

    pub async fn stand_now(&self) -> Result<(), String> {
        match self {
            PairLease::Group(g) => g.stand_now().await,
            PairLease::Beats(b) => b.take(),
        }
    }

    pub fn resign(&self) {
        match self {
            PairLease::Group(g) => g.resign(),
            PairLease::Beats(b) => b.release("resigned"),
        }
    }

    /// This member's lease records were lost (it cannot vote or stand until it hears a holder).
    pub fn records_reset(&self) -> bool {
        match self {
            PairLease::Group(g) => g.records_reset().borrow().is_some(),
            PairLease::Beats(_) => false,
        }
    }

    pub fn has_witness(&self) -> bool {
        matches!(self, PairLease::Group(_))
    }

    /// What the pair peer said in a heartbeat: the generation it holds the address at.
    pub fn observe_peer(&self, holding: Option<u64>) {
        if let PairLease::Beats(b) = self {
            b.observe(holding);
        }
    }

    pub async fn shutdown(&self) {
        match self {
            PairLease::Group(g) => g.shutdown().await,
            PairLease::Beats(b) => {
                b.release("stopping");
                b.cancel.cancel();
            }
        }
    }
}

pub(crate) struct BeatLease {
    peer: usize,
    interface: String,
    state: watch::Sender<LeaseState>,
    hold: watch::Sender<Option<(u64, Instant)>>,
    /// The highest generation this member has seen or taken, kept in `generation_file`.
    generation: AtomicU64,
    generation_file: PathBuf,
    holding: Mutex<Option<u64>>,
    /// The generation the peer last said it holds at, and when.
    peer_holding: Mutex<Option<(u64, Instant)>>,
    carrier_down: AtomicBool,
    cancel: CancellationToken,
}

impl BeatLease {
    pub fn start(peer: usize, interface: String, generation_file: PathBuf) -> Arc<Self> {
        let stored = std::fs::read_to_string(&generation_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let lease = Arc::new(Self {
            peer,
            interface,
            state: watch::channel(LeaseState::nobody()).0,
            hold: watch::channel(None).0,
            generation: AtomicU64::new(stored),
            generation_file,
            holding: Mutex::new(None),
            peer_holding: Mutex::new(None),
            carrier_down: AtomicBool::new(false),
            cancel: CancellationToken::new(),
        });
        let l = lease.clone();
        tokio::spawn(async move { l.renew().await });
        lease
    }

    fn carrier_up(&self) -> bool {
        // Read in this process's network namespace (a node run by `ip netns exec` sees its
        // own /sys). An interface that reports nothing is taken as up.
        std::fs::read_to_string(format!("/sys/class/net/{}/carrier", self.interface))
            .map_or(true, |c| c.trim() == "1")
    }

    fn take(&self) -> Result<(), String> {
        if !self.carrier_up() {
            return Err(format!(
                "the health-monitor link {} is down",
                self.interface
            ));
        }
        let peer = self
            .peer_holding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(0, |(g, _)| g);
        let g = self.generation.load(Ordering::Relaxed).max(peer) + 1;
        // Stored before it is used: a restart never takes a generation twice.
        causeway_common::fsio::write_atomic(&self.generation_file, g.to_string().as_bytes())
            .map_err(|e| format!("storing the generation: {e}"))?;
        self.generation.store(g, Ordering::Relaxed);
        *self.holding.lock().unwrap_or_else(|p| p.into_inner()) = Some(g);
        info!(target: LOG, event = "Lease acquired", group = "ha (no witness)", generation = g, "");
        self.publish();
        Ok(())
    }

    fn release(&self, why: &str) {
        if self
            .holding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .is_some()
        {
            info!(target: LOG, event = "Lease released", group = "ha (no witness)", reason = why, "");
        }
        self.publish();
    }

    fn observe(&self, holding: Option<u64>) {
        let mut p = self.peer_holding.lock().unwrap_or_else(|p| p.into_inner());
        match holding {
            Some(g) => {
                *p = Some((g, Instant::now()));
                self.generation.fetch_max(g, Ordering::Relaxed);
            }
            // A peer that says it holds nothing is not the holder, however recently it did.
            None => {
                if p.is_some_and(|(_, t)| t.elapsed() < BELIEVED) {
                    *p = p.map(|(g, _)| (g, Instant::now() - BELIEVED));
                }
            }
        }
    }

    /// Extends the hold every 25 ms while held; gives it up when the link is down or the peer
    /// holds a higher generation (the heal after a split).
    async fn renew(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RENEW);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let up = self.carrier_up();
            if self.carrier_down.swap(!up, Ordering::Relaxed) == up {
                info!(target: LOG, event = "Health-monitor link", interface = %self.interface,
                    state = if up { "up" } else { "down" }, "");
            }
            let mine = *self.holding.lock().unwrap_or_else(|p| p.into_inner());
            let peer = *self.peer_holding.lock().unwrap_or_else(|p| p.into_inner());
            if let (Some(g), Some((pg, at))) = (mine, peer) {
                if at.elapsed() < BELIEVED && pg > g {
                    self.release(&format!("the peer holds a higher generation ({pg} > {g})"));
                    continue;
                }
            }
            if mine.is_some() && !up {
                self.release("the health-monitor link is down");
                continue;
            }
            self.publish();
        }
    }

    fn publish(&self) {
        let mine = *self.holding.lock().unwrap_or_else(|p| p.into_inner());
        let peer = *self.peer_holding.lock().unwrap_or_else(|p| p.into_inner());
        let holder = match (mine, peer) {
            (Some(g), _) => Holder::Me { generation: g },
            (None, Some((g, at))) if at.elapsed() < BELIEVED => Holder::Peer {
                peer: self.peer,
                generation: g,
            },
            _ => Holder::Nobody,
        };
        self.hold
            .send_replace(mine.map(|g| (g, Instant::now() + HOLD)));
        self.state.send_if_modified(|s| {
            if s.holder == holder {
                return false;
            }
            *s = LeaseState {
                holder,
                since: Instant::now(),
            };
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_taken_generation_is_above_every_one_seen_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gen");
        let a = BeatLease::start(2, "no-such-if".into(), file.clone());
        a.observe(Some(7));
        a.take().unwrap();
        assert_eq!(*a.holding.lock().unwrap(), Some(8));
        assert_eq!(a.state.borrow().holder, Holder::Me { generation: 8 });
        a.cancel.cancel();
        let b = BeatLease::start(2, "no-such-if".into(), file);
        b.take().unwrap();
        assert_eq!(*b.holding.lock().unwrap(), Some(9));
        b.cancel.cancel();
    }

    #[tokio::test]
    async fn at_the_heal_the_lower_generation_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let a = BeatLease::start(2, "no-such-if".into(), dir.path().join("gen"));
        a.take().unwrap();
        let mine = a.holding.lock().unwrap().unwrap();
        a.observe(Some(mine + 3));
        tokio::time::sleep(RENEW * 3).await;
        assert!(a.holding.lock().unwrap().is_none());
        assert!(matches!(
            a.state.borrow().holder,
            Holder::Peer { peer: 2, .. }
        ));
        a.cancel.cancel();
    }
}
