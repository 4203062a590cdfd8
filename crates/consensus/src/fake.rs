//! An in-memory lease for a service's own tests: the test decides who holds it.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::{Holder, LeaderLease, LeaseState, Membership};

pub struct FakeLease {
    name: String,
    members: Vec<usize>,
    state: watch::Sender<LeaseState>,
    eligible: AtomicBool,
}

impl FakeLease {
    pub fn new(name: &str, members: Vec<usize>) -> Self {
        Self {
            name: name.to_string(),
            members,
            state: watch::channel(LeaseState::nobody()).0,
            eligible: AtomicBool::new(true),
        }
    }

    /// Hands the lease to `holder` now.
    pub fn set(&self, holder: Holder) {
        self.state.send_replace(LeaseState {
            holder,
            since: Instant::now(),
        });
    }

    pub fn is_eligible(&self) -> bool {
        self.eligible.load(Ordering::Relaxed)
    }
}

impl LeaderLease for FakeLease {
    fn name(&self) -> &str {
        &self.name
    }

    fn state(&self) -> LeaseState {
        *self.state.borrow()
    }

    fn watch(&self) -> watch::Receiver<LeaseState> {
        self.state.subscribe()
    }

    fn set_eligible(&self, eligible: bool) {
        self.eligible.store(eligible, Ordering::Relaxed);
    }
}

impl Membership for FakeLease {
    fn members(&self) -> Vec<usize> {
        self.members.clone()
    }
}
