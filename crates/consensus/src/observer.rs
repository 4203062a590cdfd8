//! A test observer that sees every holder change of every member of a group and checks
//! the one property a lease exists for: never two holders in the same instant.

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

    /// Panics if two members' intervals overlap or one generation had two holders.
    pub fn check(&self) {
        let held = self.lock();
        let end = |h: &Held| {
            h.until
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
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
