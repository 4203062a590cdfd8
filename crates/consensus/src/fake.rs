//! An in-memory lease for a service's own tests: the test decides who holds it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::{Holder, LeaderLease, LeaseState, Membership};

pub struct FakeLease {
    name: String,
    members: Vec<usize>,
    state: watch::Sender<LeaseState>,
    eligible: AtomicBool,
    resigned: AtomicUsize,
}

impl FakeLease {
    pub fn new(name: &str, members: Vec<usize>) -> Self {
        Self {
            name: name.to_string(),
            members,
            state: watch::channel(LeaseState::nobody()).0,
            eligible: AtomicBool::new(true),
            resigned: AtomicUsize::new(0),
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

    /// How many times the service resigned the lease.
    pub fn resignations(&self) -> usize {
        self.resigned.load(Ordering::Relaxed)
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

    /// A holder that resigns holds nothing; the test decides who holds it next.
    fn resign(&self) {
        if matches!(self.state().holder, Holder::Me { .. }) {
            self.resigned.fetch_add(1, Ordering::Relaxed);
            self.set(Holder::Nobody);
        }
    }
}

impl Membership for FakeLease {
    fn members(&self) -> Vec<usize> {
        self.members.clone()
    }
}
