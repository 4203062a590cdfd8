//! A test observer that sees every holder change of every member of a group and checks
//! the one property a lease exists for: never two holders in the same instant. A holder
//! holds until it lets go and, where its hold deadlines are watched too, until the last
//! of them: a service that cannot be told (the HA address keeper) acts until then.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::{Holder, LeaderLease};

/// One interval during which a member held the lease.
#[derive(Clone, Debug)]
pub struct Held {
    pub member: usize,
    pub generation: u64,
    pub from: Instant,
    /// When it let go; `None` while it still holds.
    pub until: Option<Instant>,
}

#[derive(Default)]
pub struct Observer {
    held: Mutex<Vec<Held>>,
    /// The latest hold deadline each member was given in each generation.
    deadlines: Mutex<HashMap<(usize, u64), Instant>>,
}

impl Observer {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Follows `lease` of `member` until its sender is gone (the member stopped).
    pub fn watch(self: &Arc<Self>, member: usize, lease: &dyn LeaderLease) -> JoinHandle<()> {
        let mut rx = lease.watch();
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let state = *rx.borrow_and_update();
                {
                    let mut held = me.lock();
                    let open = held
                        .iter_mut()
                        .find(|h| h.member == member && h.until.is_none());
                    match (state.holder, open) {
                        (Holder::Me { .. }, Some(_)) => {}
                        (Holder::Me { generation }, None) => held.push(Held {
                            member,
                            generation,
                            from: state.since,
                            until: None,
                        }),
                        (_, Some(h)) => h.until = Some(state.since),
                        (_, None) => {}
                    }
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    /// Follows the hold deadlines `member` is given (`LeaseGroup::hold`).
    pub fn watch_deadlines(
        self: &Arc<Self>,
        member: usize,
        mut rx: tokio::sync::watch::Receiver<Option<(u64, Instant)>>,
    ) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                if let Some((generation, until)) = *rx.borrow_and_update() {
                    let mut deadlines = me.deadlines.lock().unwrap_or_else(|p| p.into_inner());
                    let d = deadlines.entry((member, generation)).or_insert(until);
                    *d = (*d).max(until);
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    /// Panics if two members' intervals overlap or one generation had two holders.
    pub fn check(&self) {
        let held = self.lock();
        let deadlines = self.deadlines.lock().unwrap_or_else(|p| p.into_inner());
        let end = |h: &Held| {
            let lost = h
                .until
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            deadlines
                .get(&(h.member, h.generation))
                .map_or(lost, |&d| lost.max(d))
        };
        for (i, a) in held.iter().enumerate() {
            for b in &held[i + 1..] {
                if a.member == b.member {
                    continue;
                }
                assert!(
                    end(a) <= b.from || end(b) <= a.from,
                    "two holders at once: {a:?} and {b:?}"
                );
                assert_ne!(a.generation, b.generation, "{a:?} and {b:?}");
            }
        }
    }

    /// The member holding now, and since when.
    pub fn holder_now(&self) -> Option<(usize, Instant)> {
        self.lock()
            .iter()
            .find(|h| h.until.is_none())
            .map(|h| (h.member, h.from))
    }

    /// Every interval so far.
    pub fn history(&self) -> Vec<Held> {
        self.lock().clone()
    }
}
