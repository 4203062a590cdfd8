//! Neighbour zones' health (`docs/sip.md`, "Routing beyond the cluster"): every peer sends
//! an OPTIONS keep-alive to every address of every zone each `zone_keepalive`; an address
//! that has not answered `DOWN_AFTER_MISSES` probes in a row is down, and a request takes
//! the first address of its zone that is not. Each peer keeps its own view: the network
//! path from it is what counts. A zone with every address down raises 30020.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

/// Branches of keep-alive probes start with this: their answers end here, not in the
/// proxy's transactions.
pub(crate) const KEEPALIVE_BRANCH: &str = "z9hG4bKcwka";
/// Probes in a row without an answer that make an address down.
pub(crate) const DOWN_AFTER_MISSES: u32 = 2;

#[derive(Debug)]
struct Probe {
    /// The branch of the probe not answered yet.
    outstanding: Option<String>,
    misses: u32,
    /// Until proven down, an address is tried.
    up: bool,
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            outstanding: None,
            misses: 0,
            up: true,
        }
    }
}

#[derive(Default)]
pub(crate) struct ZoneHealth {
    probes: Mutex<HashMap<SocketAddr, Probe>>,
}

impl ZoneHealth {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Probe>> {
        self.probes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `addr` may be sent to: not proven down.
    pub(crate) fn is_up(&self, addr: &SocketAddr) -> bool {
        self.lock().get(addr).is_none_or(|p| p.up)
    }

    /// An address's state in words, for `xstatus zones` and the Zones page.
    pub(crate) fn describe(&self, addr: &SocketAddr) -> (bool, String) {
        match self.lock().get(addr) {
            None => (true, "Not probed yet".into()),
            Some(p) if !p.up => (false, format!("Down ({} keep-alives unanswered)", p.misses)),
            Some(p) if p.misses > 0 => (true, format!("Up ({} keep-alive unanswered)", p.misses)),
            Some(_) => (true, "Up".into()),
        }
    }

    /// One round of probes to `addrs`: a probe still outstanding from the last round is a
    /// miss. Returns the branch to send to each. Addresses no zone names any more are
    /// forgotten.
    pub(crate) fn round(
        &self,
        addrs: &[SocketAddr],
        branch: impl Fn() -> String,
    ) -> Vec<(SocketAddr, String)> {
        let mut probes = self.lock();
        probes.retain(|a, _| addrs.contains(a));
        addrs
            .iter()
            .map(|a| {
                let p = probes.entry(*a).or_default();
                if p.outstanding.is_some() {
                    p.misses += 1;
                    if p.misses >= DOWN_AFTER_MISSES {
                        p.up = false;
                    }
                }
                let b = branch();
                p.outstanding = Some(b.clone());
                (*a, b)
            })
            .collect()
    }

    /// A response to the probe with `branch`: its address is up (a 503 says it is alive
    /// but refusing work: not up).
    pub(crate) fn answered(&self, branch: &str, status: u16) {
        let mut probes = self.lock();
        if let Some(p) = probes
            .values_mut()
            .find(|p| p.outstanding.as_deref() == Some(branch))
        {
            p.outstanding = None;
            if status != 503 {
                p.misses = 0;
                p.up = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_down_after_two_unanswered_probes_and_up_at_the_next_answer() {
        let h = ZoneHealth::default();
        let a: SocketAddr = "198.18.1.20:5060".parse().unwrap();
        let n = std::sync::atomic::AtomicU32::new(0);
        let branch = || {
            format!(
                "{KEEPALIVE_BRANCH}{}",
                n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            )
        };
        assert!(h.is_up(&a), "unknown: tried");
        h.round(&[a], branch);
        assert!(h.is_up(&a));
        h.round(&[a], branch);
        assert!(h.is_up(&a), "one miss");
        let sent = h.round(&[a], branch);
        assert!(!h.is_up(&a), "two misses");
        h.answered(&sent[0].1, 503);
        assert!(!h.is_up(&a), "a 503 is not up");
        let sent = h.round(&[a], branch);
        h.answered(&sent[0].1, 200);
        assert!(h.is_up(&a));
        // An answer to an old probe counts for nothing.
        h.answered("z9hG4bKcwka-old", 200);
        h.round(&[], branch);
        assert!(h.is_up(&a), "forgotten: unknown again");
    }
}
