//! Failed digest authentications counted per source address and per user, fail2ban-style
//! (issue 17): a source that keeps failing is answered more slowly, then refused outright
//! for a while; a user whose password is being guessed from many addresses raises an
//! alarm. A correct user from another address is never held back by someone else's
//! failures: only the failing source is slowed or blocked.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Sources and users remembered at most; past it the quietest are forgotten first.
const MAX_TRACKED: usize = 50_000;
/// Each failure past `slow_after` adds this much to the answer, up to `MAX_DELAY`.
const DELAY_STEP: Duration = Duration::from_millis(500);
const MAX_DELAY: Duration = Duration::from_secs(4);

/// The thresholds (configuration `sip.authentication.*`; 0 turns a step off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuardSettings {
    pub window: Duration,
    pub slow_after: u32,
    pub block_after: u32,
    pub block_for: Duration,
    /// Failures for one user, from anywhere, in one window that raise the alarm.
    pub alarm_after: u32,
}

impl Default for GuardSettings {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            slow_after: 5,
            block_after: 20,
            block_for: Duration::from_secs(600),
            alarm_after: 50,
        }
    }
}

/// What to do with a source's next authenticated request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Open,
    /// Check it, after this long.
    Slow(Duration),
    /// Refuse it unchecked until the block ends.
    Blocked,
}

#[derive(Default)]
struct Count {
    failures: u32,
    window_start: Option<Instant>,
    blocked_until: Option<Instant>,
}

impl Count {
    /// Failures in the window running now (none once it is over).
    fn live(&self, now: Instant, window: Duration) -> u32 {
        match self.window_start {
            Some(s) if now.duration_since(s) <= window => self.failures,
            _ => 0,
        }
    }

    /// Like `live`, starting a new window when the last one is over.
    fn current(&mut self, now: Instant, window: Duration) -> u32 {
        if self
            .window_start
            .is_none_or(|s| now.duration_since(s) > window)
        {
            self.window_start = Some(now);
            self.failures = 0;
        }
        self.failures
    }
}

/// What a failure led to, for the log and the alarm table.
#[derive(Debug, PartialEq, Eq)]
pub struct Failure {
    pub source_failures: u32,
    pub user_failures: u32,
    /// This failure started a block of the source.
    pub blocked: bool,
    /// The user's failures reached the alarm threshold with this one.
    pub user_alarm: bool,
}

#[derive(Default)]
pub struct AuthGuard {
    sources: Mutex<HashMap<IpAddr, Count>>,
    users: Mutex<HashMap<String, Count>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl AuthGuard {
    pub fn gate(&self, source: IpAddr, s: &GuardSettings) -> Gate {
        let now = Instant::now();
        let sources = lock(&self.sources);
        let Some(c) = sources.get(&source) else {
            return Gate::Open;
        };
        if c.blocked_until.is_some_and(|until| now < until) {
            return Gate::Blocked;
        }
        let failures = c.live(now, s.window);
        if s.slow_after > 0 && failures >= s.slow_after {
            let excess = failures - s.slow_after + 1;
            return Gate::Slow((DELAY_STEP * excess).min(MAX_DELAY));
        }
        Gate::Open
    }

    /// Counts a failed authentication of `user` from `source`.
    pub fn failed(&self, source: IpAddr, user: &str, s: &GuardSettings) -> Failure {
        let now = Instant::now();
        let (source_failures, blocked) = {
            let mut sources = lock(&self.sources);
            make_room(&mut sources, now, s.window);
            let c = sources.entry(source).or_default();
            c.failures = c.current(now, s.window) + 1;
            let block = s.block_after > 0
                && c.failures >= s.block_after
                && c.blocked_until.is_none_or(|until| now >= until);
            if block {
                c.blocked_until = Some(now + s.block_for);
            }
            (c.failures, block)
        };
        let user_failures = {
            let mut users = lock(&self.users);
            make_room(&mut users, now, s.window);
            let c = users.entry(user.to_string()).or_default();
            c.failures = c.current(now, s.window) + 1;
            c.failures
        };
        Failure {
            source_failures,
            user_failures,
            blocked,
            user_alarm: s.alarm_after > 0 && user_failures == s.alarm_after,
        }
    }

    /// A source authenticated: its count starts again (its earlier failures were typos).
    pub fn succeeded(&self, source: IpAddr) {
        let mut sources = lock(&self.sources);
        if sources
            .get(&source)
            .is_some_and(|c| c.blocked_until.is_none())
        {
            sources.remove(&source);
        }
    }

    /// Forgets what is over: blocks ended, windows past. Returns the sources whose block
    /// ended and the users whose alarm window passed, for the alarms to be lowered.
    pub fn sweep(&self, s: &GuardSettings) -> (Vec<IpAddr>, Vec<String>) {
        let now = Instant::now();
        let over = |c: &Count| {
            c.blocked_until.is_none_or(|until| now >= until)
                && c.window_start
                    .is_none_or(|st| now.duration_since(st) > s.window)
        };
        let mut ended_sources = Vec::new();
        lock(&self.sources).retain(|ip, c| {
            let keep = !over(c);
            if !keep && c.blocked_until.is_some() {
                ended_sources.push(*ip);
            }
            keep
        });
        let mut quiet_users = Vec::new();
        lock(&self.users).retain(|u, c| {
            let keep = !over(c);
            if !keep && s.alarm_after > 0 && c.failures >= s.alarm_after {
                quiet_users.push(u.clone());
            }
            keep
        });
        (ended_sources, quiet_users)
    }
}

/// Keeps a map under `MAX_TRACKED` by dropping entries whose window is over, then the ones
/// with the fewest failures.
fn make_room<K: Clone + Eq + std::hash::Hash>(
    map: &mut HashMap<K, Count>,
    now: Instant,
    window: Duration,
) {
    if map.len() < MAX_TRACKED {
        return;
    }
    map.retain(|_, c| {
        c.blocked_until.is_some_and(|u| now < u)
            || c.window_start
                .is_some_and(|s| now.duration_since(s) <= window)
    });
    if map.len() >= MAX_TRACKED {
        let mut by_failures: Vec<(K, u32)> =
            map.iter().map(|(k, c)| (k.clone(), c.failures)).collect();
        by_failures.sort_by_key(|(_, f)| *f);
        for (k, _) in by_failures.into_iter().take(MAX_TRACKED / 10) {
            map.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([198, 18, 0, last])
    }

    #[tokio::test(start_paused = true)]
    async fn a_guessing_source_is_slowed_then_blocked_and_another_source_is_untouched() {
        let (g, s) = (AuthGuard::default(), GuardSettings::default());
        for n in 1..s.slow_after {
            assert!(!g.failed(ip(1), "alice", &s).blocked, "failure {n}");
            assert_eq!(g.gate(ip(1), &s), Gate::Open);
        }
        g.failed(ip(1), "alice", &s);
        assert_eq!(g.gate(ip(1), &s), Gate::Slow(DELAY_STEP));
        let mut blocked = false;
        for _ in s.slow_after..s.block_after {
            blocked |= g.failed(ip(1), "alice", &s).blocked;
        }
        assert!(blocked, "blocked at {} failures", s.block_after);
        assert_eq!(g.gate(ip(1), &s), Gate::Blocked);
        // The real alice, elsewhere, is not held back.
        assert_eq!(g.gate(ip(2), &s), Gate::Open);
        tokio::time::advance(s.block_for + s.window + Duration::from_secs(1)).await;
        assert_eq!(g.gate(ip(1), &s), Gate::Open, "the block ends");
        let (ended, _) = g.sweep(&s);
        assert_eq!(ended, vec![ip(1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_user_guessed_from_many_sources_raises_the_alarm_once() {
        let (g, s) = (AuthGuard::default(), GuardSettings::default());
        let alarms = (0..s.alarm_after + 10)
            .filter(|n| g.failed(ip((n % 250) as u8), "bob", &s).user_alarm)
            .count();
        assert_eq!(alarms, 1);
        tokio::time::advance(s.window + Duration::from_secs(1)).await;
        let (_, quiet) = g.sweep(&s);
        assert_eq!(quiet, vec!["bob".to_string()]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_forgets_a_few_typos() {
        let (g, s) = (AuthGuard::default(), GuardSettings::default());
        for _ in 0..s.slow_after {
            g.failed(ip(3), "carol", &s);
        }
        assert_ne!(g.gate(ip(3), &s), Gate::Open);
        g.succeeded(ip(3));
        assert_eq!(g.gate(ip(3), &s), Gate::Open);
    }
}
