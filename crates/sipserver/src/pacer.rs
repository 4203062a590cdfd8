//! Pacing of outgoing UDP datagrams, per destination.
//!
//! A group commit answers its whole batch of REGISTERs at once. A client that sends many
//! requests from one address (an SBC, a trunk, a load generator) would get them as one
//! burst, more than its receive buffer holds if it is not scheduled at that moment, and
//! then retransmits every lost answer 500 ms later. So each destination has a queue of
//! its own, sent a little faster (PACE_FACTOR) than datagrams for it were queued lately:
//! bursts spread out to the pace the client itself keeps, the backlog still drains, and a
//! destination that is waiting never holds back another.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Datagrams one destination may receive back to back, at least.
const BURST: f64 = 8.0;
/// The sender waits on tokio's timer, whose waits last whole milliseconds: at a fast pace a
/// destination may receive what the pace allows over this long back to back, or the
/// timer's granularity would cap the pace below it.
const TICK: Duration = Duration::from_millis(2);
/// Sending pace as a multiple of the rate datagrams are queued for the destination. Low:
/// answers arrive about as evenly as the client sends (a factor of 2 overflowed SIPp's
/// socket at 9,000 REGISTER/s; at 15,000, 1.3 in 3 runs of 6, 1.1 in none of 7 alone and
/// in 1 of 3 beside the anchors; bench/RESULTS.md), yet the queue drains faster than it
/// fills: a batch queued at once raises the current window's rate, and so its own pace.
const PACE_FACTOR: f64 = 1.1;
/// The pace is never slower than this (a quiet destination) nor faster than this (the
/// default request cap per source, `sip.rate_per_source`).
const MIN_PER_SECOND: f64 = 2_000.0;
const MAX_PER_SECOND: f64 = 50_000.0;
/// The queued rate is measured over windows of this length.
const WINDOW: Duration = Duration::from_millis(100);
/// Out of tokens, a destination waits for this many at once: a wake-up costs tens of
/// microseconds whatever the wait.
const REFILL: f64 = 4.0;
/// Destinations idle this long are forgotten (looked for once per IDLE: with thousands of
/// endpoints, not on every datagram).
const IDLE: Duration = Duration::from_secs(2);

struct Destination {
    queue: VecDeque<Bytes>,
    tokens: f64,
    refilled: Instant,
    window_start: Instant,
    window_count: u32,
    /// Datagrams per second queued in the last full window.
    queued_rate: f64,
}

impl Destination {
    fn new(now: Instant) -> Self {
        Self {
            queue: VecDeque::new(),
            tokens: BURST,
            refilled: now,
            window_start: now,
            window_count: 0,
            queued_rate: 0.0,
        }
    }

    /// PACE_FACTOR times the queued rate: the last full window's, or the current one's if
    /// it is already higher (a client that just started).
    fn pace(&self, now: Instant) -> f64 {
        let elapsed = now
            .saturating_duration_since(self.window_start)
            .max(WINDOW / 10)
            .as_secs_f64();
        let current = f64::from(self.window_count) / elapsed;
        (PACE_FACTOR * self.queued_rate.max(current)).clamp(MIN_PER_SECOND, MAX_PER_SECOND)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        let pace = self.pace(now);
        self.tokens = (self.tokens + elapsed * pace).min(BURST.max(pace * TICK.as_secs_f64()));
        self.refilled = self.refilled.max(now);
    }

    /// When the front datagram may go.
    fn due(&mut self, now: Instant) -> Instant {
        self.refill(now);
        if self.tokens >= 1.0 {
            now
        } else {
            now + Duration::from_secs_f64((REFILL - self.tokens) / self.pace(now))
        }
    }
}

/// What the sender should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Send(SocketAddr, Bytes),
    /// Nothing may go before this instant.
    WaitUntil(Instant),
    Idle,
}

pub struct Pacer {
    destinations: HashMap<SocketAddr, Destination>,
    /// Destinations with datagrams queued, by when their front one may go.
    schedule: BinaryHeap<Reverse<(Instant, SocketAddr)>>,
    queued: usize,
    capacity: usize,
    swept: Instant,
}

impl Pacer {
    /// `capacity`: datagrams queued over all destinations; beyond, `push` refuses.
    pub fn new(capacity: usize) -> Self {
        Self {
            destinations: HashMap::new(),
            schedule: BinaryHeap::new(),
            queued: 0,
            capacity,
            swept: Instant::now(),
        }
    }

    /// Queues a datagram; false when the queues are full (the caller drops and counts it,
    /// as a full socket buffer would: UDP senders retransmit).
    pub fn push(&mut self, to: SocketAddr, bytes: Bytes, now: Instant) -> bool {
        if self.queued >= self.capacity {
            return false;
        }
        if now.saturating_duration_since(self.swept) >= IDLE {
            self.swept = now;
            self.destinations.retain(|_, d| {
                !d.queue.is_empty() || now.saturating_duration_since(d.refilled) < IDLE
            });
        }
        let d = self
            .destinations
            .entry(to)
            .or_insert_with(|| Destination::new(now));
        if now.saturating_duration_since(d.window_start) >= WINDOW {
            let elapsed = now.saturating_duration_since(d.window_start).as_secs_f64();
            // After a pause this rate is low; `pace` then goes by the current window.
            d.queued_rate = f64::from(d.window_count) / elapsed;
            d.window_start = now;
            d.window_count = 0;
        }
        d.window_count = d.window_count.saturating_add(1);
        d.queue.push_back(bytes);
        self.queued += 1;
        if d.queue.len() == 1 {
            let due = d.due(now);
            self.schedule.push(Reverse((due, to)));
        }
        true
    }

    /// The next datagram that may go at `now`, or how long until one may.
    pub fn next(&mut self, now: Instant) -> Next {
        while let Some(Reverse((due, to))) = self.schedule.peek().copied() {
            if due > now {
                return Next::WaitUntil(due);
            }
            self.schedule.pop();
            let Some(d) = self.destinations.get_mut(&to) else {
                continue;
            };
            d.refill(now);
            let Some(bytes) = d.queue.pop_front() else {
                continue;
            };
            d.tokens -= 1.0;
            self.queued -= 1;
            if !d.queue.is_empty() {
                let due = d.due(now);
                self.schedule.push(Reverse((due, to)));
            }
            return Next::Send(to, bytes);
        }
        Next::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Sends everything queued, stepping the clock to each due time; the send times.
    fn drain(p: &mut Pacer, mut now: Instant) -> Vec<(SocketAddr, Instant)> {
        let mut sent = Vec::new();
        loop {
            match p.next(now) {
                Next::Send(to, _) => sent.push((to, now)),
                Next::WaitUntil(t) => {
                    assert!(t > now, "a wait lies in the future");
                    now = t;
                }
                Next::Idle => return sent,
            }
        }
    }

    #[test]
    fn a_burst_is_spread_out_and_another_destination_is_not_held_back() {
        let (a, b) = (addr("192.0.2.1:5060"), addr("192.0.2.2:5060"));
        let mut p = Pacer::new(1000);
        let t0 = Instant::now();
        for _ in 0..100 {
            assert!(p.push(a, Bytes::from_static(b"x"), t0));
        }
        assert!(p.push(b, Bytes::from_static(b"y"), t0));
        let sent = drain(&mut p, t0);
        assert_eq!(sent.len(), 101);
        let to_a: Vec<Instant> = sent.iter().filter(|s| s.0 == a).map(|s| s.1).collect();
        let at_once = to_a.iter().filter(|t| **t == t0).count();
        assert_eq!(
            at_once, BURST as usize,
            "the burst goes at once, the rest waits"
        );
        let b_at = sent.iter().find(|s| s.0 == b).unwrap().1;
        assert_eq!(b_at, t0, "b is not queued behind a's burst");
        // 100 queued at once: the pace is PACE_FACTOR × 100 / (WINDOW / 10), capped.
        let span = to_a[99].duration_since(t0).as_secs_f64();
        let pace = (PACE_FACTOR * 100.0 / (WINDOW / 10).as_secs_f64()).min(MAX_PER_SECOND);
        let expected = (100.0 - BURST) / pace;
        assert!(
            span >= expected * 0.9 && span <= expected * 1.2,
            "92 paced datagrams took {span} s, expected about {expected} s"
        );
    }

    #[test]
    fn the_pace_follows_the_rate_datagrams_are_queued_at() {
        let a = addr("192.0.2.1:5060");
        let mut p = Pacer::new(100_000);
        let t0 = Instant::now();
        // 5,000/s for one second, in batches of 50 every 10 ms (a group commit).
        let mut sent = Vec::new();
        for batch in 0..100u32 {
            let now = t0 + Duration::from_millis(10 * u64::from(batch));
            for _ in 0..50 {
                assert!(p.push(a, Bytes::from_static(b"x"), now));
            }
            let (mut t, end) = (now, now + Duration::from_millis(10));
            loop {
                match p.next(t) {
                    Next::Send(..) => sent.push(t),
                    Next::WaitUntil(w) if w < end => t = w,
                    _ => break,
                }
            }
        }
        let last: Vec<Instant> = sent[sent.len() - 50..].to_vec();
        let span = last[49].duration_since(last[0]).as_secs_f64();
        // The burst at once, the other 42 at PACE_FACTOR × 5,000/s.
        let expected = (50.0 - BURST) / (PACE_FACTOR * 5_000.0);
        assert!(
            span >= expected * 0.8 && span <= expected * 1.2,
            "the last batch of 50 went out over {span} s, expected about {expected} s"
        );
        assert!(
            sent.len() >= 4_900,
            "the backlog drains: {} sent",
            sent.len()
        );
    }

    #[test]
    fn full_queues_refuse_and_a_pause_refills_the_burst() {
        let a = addr("192.0.2.1:5060");
        let mut p = Pacer::new(10);
        let t0 = Instant::now();
        for _ in 0..10 {
            assert!(p.push(a, Bytes::from_static(b"x"), t0));
        }
        assert!(
            !p.push(a, Bytes::from_static(b"x"), t0),
            "the eleventh is refused"
        );
        drain(&mut p, t0);
        let later = t0 + Duration::from_secs(1);
        for _ in 0..BURST as usize {
            assert!(p.push(a, Bytes::from_static(b"x"), later));
        }
        let sent = drain(&mut p, later);
        assert!(
            sent.iter().all(|s| s.1 == later),
            "a full burst after a pause"
        );
    }

    /// The sender wakes on tokio's timer, a whole millisecond at a time: at 11,000
    /// datagrams/s to one destination (SIPp at the top of the ladder) it must still keep up,
    /// which 8 per wake (8,000/s) would not.
    #[test]
    fn a_sender_woken_each_millisecond_keeps_up_with_a_fast_destination() {
        let a = addr("192.0.2.1:5060");
        let mut p = Pacer::new(100_000);
        let t0 = Instant::now();
        let (mut queued, mut sent) = (0, 0);
        for ms in 0..1_000u64 {
            let now = t0 + Duration::from_millis(ms);
            for _ in 0..11 {
                assert!(p.push(a, Bytes::from_static(b"x"), now));
                queued += 1;
            }
            while let Next::Send(..) = p.next(now) {
                sent += 1;
            }
        }
        assert!(
            queued - sent <= 2 * BURST as usize,
            "{} of {queued} still queued after a second: the pace fell behind",
            queued - sent
        );
    }
}
