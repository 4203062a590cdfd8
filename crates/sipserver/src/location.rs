//! The location service (SV-2): every binding of every peer, indexed by AOR.
//!
//! Each peer owns the replicated stream `registrations/peerN` and writes into it only the
//! bindings it accepted; every peer holds every stream, so a lookup is local. A binding is
//! keyed `AOR|id` (id: `+sip.instance`/`reg-id` when given, else the contact URI). When the
//! same key is in several streams (the endpoint moved to another peer, or a peer removed a
//! binding another peer holds), the copy registered last wins; a removal is a record with
//! `removed` set that shadows older copies until they expire. Expiry is absolute wall-clock
//! time, so every peer agrees on it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use crate::transport::Proto;

pub const NAMESPACE: &str = "registrations";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub aor: String,
    /// The contact URI (without header parameters).
    pub uri: String,
    /// Header parameters to echo (q, +sip.instance, reg-id, methods …), without expires.
    pub params: String,
    pub expires_at_ms: u64,
    pub registered_at_ms: u64,
    pub call_id: String,
    pub cseq: u32,
    pub path: Vec<String>,
    pub instance: Option<String>,
    pub reg_id: Option<u32>,
    /// q in thousandths (1000 = 1.0).
    pub q: u16,
    /// The peer that accepted the REGISTER, and how the endpoint reached it.
    pub owner: usize,
    pub proto: Proto,
    pub received: SocketAddr,
    /// The connection on the owner (TCP/TLS): requests go through the owner to use it.
    pub conn: Option<u64>,
    /// A removal that shadows older copies of this key in other peers' streams.
    pub removed: bool,
}

impl Binding {
    pub fn key(&self) -> String {
        binding_key(&self.aor, self.instance.as_deref(), self.reg_id, &self.uri)
    }

    pub fn live(&self, now_ms: u64) -> bool {
        !self.removed && self.expires_at_ms > now_ms
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Option<Binding> {
        postcard::from_bytes(bytes).ok()
    }
}

pub fn binding_key(aor: &str, instance: Option<&str>, reg_id: Option<u32>, uri: &str) -> String {
    match instance {
        Some(i) => format!("{aor}|{i};reg-id={}", reg_id.unwrap_or(0)),
        None => format!("{aor}|{uri}"),
    }
}

pub fn stream_name(peer: usize) -> String {
    format!("peer{peer}")
}

/// Which peer owns a stream named `peerN`.
pub fn stream_owner(name: &str) -> Option<usize> {
    name.strip_prefix("peer")?.parse().ok()
}

/// The copies of one binding key, by the peer whose stream holds each.
type Copies = Vec<(usize, Binding)>;

/// What [`Location::listing`] finds.
#[derive(Debug, Default)]
pub struct Listing {
    pub per_owner: HashMap<usize, usize>,
    pub aors: usize,
    pub matched: usize,
    pub page: Vec<Binding>,
}

/// Every binding record of every stream: AOR → key → copies.
#[derive(Default)]
pub struct Location {
    by_aor: RwLock<HashMap<String, HashMap<String, Copies>>>,
    /// This peer's index: its own records are also kept by when they fall due.
    own: usize,
    /// (due, key) of this peer's records: their expiry, or 0 once a newer copy elsewhere
    /// replaced them. Entries are checked when they fall due (a refresh leaves the old
    /// entry behind), so the sweep never scans every binding.
    due: std::sync::Mutex<std::collections::BTreeSet<(u64, String)>>,
    /// The AORs held, in order: a page of the list is read from here, not from a pass over
    /// every binding (taken after `by_aor`, changed under its write lock).
    order: RwLock<std::collections::BTreeSet<String>>,
    /// The last [`Location::counts`] of a large table, and when it was asked for.
    counts_cache: std::sync::Mutex<Option<(u64, Counts)>>,
    counts_wanted_ms: std::sync::atomic::AtomicU64,
}

/// Live bindings per owner, and the number of AORs with one.
pub type Counts = (HashMap<usize, usize>, usize);

/// Below this many AORs, counts are made when asked (a few milliseconds); above it they are
/// made once a second while someone looks, off the request.
const COUNT_INLINE_BELOW: usize = 10_000;
/// How old counts of a large table may be when nobody refreshed them.
const COUNTS_MAX_AGE_MS: u64 = 5_000;

impl Location {
    pub fn new(own: usize) -> Location {
        Location {
            own,
            ..Location::default()
        }
    }

    fn due_lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<(u64, String)>> {
        self.due.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A record of stream `owner` changed (`None`: deleted).
    pub fn apply(&self, owner: usize, key: &str, value: Option<&[u8]>) {
        let Some(aor) = key.split('|').next() else {
            return;
        };
        let mut by_aor = self.by_aor.write().unwrap_or_else(|p| p.into_inner());
        match value.and_then(Binding::decode) {
            Some(b) => {
                if !by_aor.contains_key(aor) {
                    self.order_write().insert(aor.to_string());
                }
                let copies = by_aor
                    .entry(aor.to_string())
                    .or_default()
                    .entry(key.to_string())
                    .or_default();
                if owner == self.own {
                    let newer_elsewhere = copies
                        .iter()
                        .any(|(o, c)| *o != owner && c.registered_at_ms > b.registered_at_ms);
                    let due = if newer_elsewhere { 0 } else { b.expires_at_ms };
                    self.due_lock().insert((due, key.to_string()));
                } else if copies
                    .iter()
                    .any(|(o, mine)| *o == self.own && mine.registered_at_ms < b.registered_at_ms)
                {
                    self.due_lock().insert((0, key.to_string()));
                }
                match copies.iter_mut().find(|(o, _)| *o == owner) {
                    Some(slot) => slot.1 = b,
                    None => copies.push((owner, b)),
                }
            }
            None => {
                if let Some(keys) = by_aor.get_mut(aor) {
                    if let Some(copies) = keys.get_mut(key) {
                        copies.retain(|(o, _)| *o != owner);
                        if copies.is_empty() {
                            keys.remove(key);
                        }
                    }
                    if keys.is_empty() {
                        by_aor.remove(aor);
                        self.order_write().remove(aor);
                    }
                }
            }
        }
    }

    /// The current bindings of `aor`: per key the newest copy, if it is live; highest q
    /// first.
    pub fn lookup(&self, aor: &str, now_ms: u64) -> Vec<Binding> {
        let by_aor = self.by_aor.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Binding> = by_aor
            .get(aor)
            .into_iter()
            .flat_map(|keys| current(keys, now_ms))
            .collect();
        out.sort_by(|a, b| {
            b.q.cmp(&a.q)
                .then(a.registered_at_ms.cmp(&b.registered_at_ms))
        });
        out
    }

    /// The newest copy of one key, live or not (a registrar checks Call-ID/CSeq against it).
    pub fn newest_of(&self, aor: &str, key: &str) -> Option<Binding> {
        let by_aor = self.by_aor.read().unwrap_or_else(|p| p.into_inner());
        by_aor.get(aor)?.get(key).and_then(|c| newest(c)).cloned()
    }

    /// This peer's keys that must go: expired (or a removal past what it shadowed), or
    /// superseded by a newer copy in another stream.
    pub fn stale_own(&self, now_ms: u64) -> Vec<String> {
        let fallen: Vec<String> = {
            let mut due = self.due_lock();
            let mut fallen = Vec::new();
            while let Some(first) = due.first() {
                if first.0 > now_ms {
                    break;
                }
                if let Some((_, key)) = due.pop_first() {
                    fallen.push(key);
                }
            }
            fallen
        };
        let by_aor = self.by_aor.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<String> = fallen
            .into_iter()
            .filter(|key| {
                let aor = key.split('|').next().unwrap_or_default();
                let Some(copies) = by_aor.get(aor).and_then(|k| k.get(key)) else {
                    return false;
                };
                let Some((_, mine)) = copies.iter().find(|(o, _)| *o == self.own) else {
                    return false;
                };
                mine.expires_at_ms <= now_ms
                    || copies
                        .iter()
                        .any(|(o, b)| *o != self.own && b.registered_at_ms > mine.registered_at_ms)
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// How many AORs have a record (live or awaiting its sweep): the registration
    /// licences count this, without a scan.
    pub fn aor_count(&self) -> usize {
        self.by_aor.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// In one pass over the live bindings: how many each owner holds and how many AORs have
    /// one (as [`Location::counts`]), how many `matches` takes, and one page of those in AOR
    /// order. Only references are gathered and only the page is cloned (`limit` 0: none).
    pub fn listing(
        &self,
        now_ms: u64,
        matches: impl Fn(&Binding) -> bool,
        offset: usize,
        limit: usize,
    ) -> Listing {
        let by_aor = self.by_aor.read().unwrap_or_else(|p| p.into_inner());
        let mut listing = Listing::default();
        let mut hits: Vec<&Binding> = Vec::new();
        for keys in by_aor.values() {
            let mut any = false;
            for b in keys
                .values()
                .filter_map(|c| newest(c))
                .filter(|b| b.live(now_ms))
            {
                *listing.per_owner.entry(b.owner).or_insert(0) += 1;
                any = true;
                if matches(b) {
                    listing.matched += 1;
                    if limit > 0 {
                        hits.push(b);
                    }
                }
            }
            listing.aors += usize::from(any);
        }
        let end = offset.saturating_add(limit).min(hits.len());
        if offset >= end {
            return listing;
        }
        let order = |a: &&Binding, b: &&Binding| (&a.aor, &a.uri).cmp(&(&b.aor, &b.uri));
        if end < hits.len() {
            hits.select_nth_unstable_by(end, order);
            hits.truncate(end);
        }
        hits.sort_unstable_by(order);
        listing.page = hits[offset..].iter().map(|b| (*b).clone()).collect();
        listing
    }

    /// Live bindings per owner, and the number of AORs with one.
    pub fn counts(&self, now_ms: u64) -> Counts {
        let listing = self.listing(now_ms, |_| false, 0, 0);
        (listing.per_owner, listing.aors)
    }

    /// Drops every record of stream `owner` (its stream was replaced whole).
    pub fn clear_owner(&self, owner: usize) {
        let mut by_aor = self.by_aor.write().unwrap_or_else(|p| p.into_inner());
        for keys in by_aor.values_mut() {
            for copies in keys.values_mut() {
                copies.retain(|(o, _)| *o != owner);
            }
            keys.retain(|_, c| !c.is_empty());
        }
        by_aor.retain(|_, k| !k.is_empty());
        *self.order_write() = by_aor.keys().cloned().collect();
    }

    fn order_write(&self) -> std::sync::RwLockWriteGuard<'_, std::collections::BTreeSet<String>> {
        self.order.write().unwrap_or_else(|p| p.into_inner())
    }

    /// One page of AORs in order (those containing `q`, if given) with their live bindings,
    /// and how many AORs match. No pass over the bindings: the order is kept as they change.
    pub fn page_of_aors(
        &self,
        now_ms: u64,
        q: &str,
        offset: usize,
        limit: usize,
    ) -> (usize, Vec<Binding>) {
        let by_aor = self.by_aor.read().unwrap_or_else(|p| p.into_inner());
        let order = self.order.read().unwrap_or_else(|p| p.into_inner());
        let (matched, page): (usize, Vec<&String>) = if q.is_empty() {
            (order.len(), order.iter().skip(offset).take(limit).collect())
        } else {
            let mut matched = 0;
            let mut page = Vec::new();
            for aor in order.iter().filter(|a| a.contains(q)) {
                if matched >= offset && page.len() < limit {
                    page.push(aor);
                }
                matched += 1;
            }
            (matched, page)
        };
        let mut rows = Vec::new();
        for aor in page {
            if let Some(keys) = by_aor.get(aor) {
                let mut bindings: Vec<Binding> = current(keys, now_ms).collect();
                bindings.sort_by(|a, b| a.uri.cmp(&b.uri));
                rows.extend(bindings);
            }
        }
        (matched, rows)
    }

    /// [`Location::counts`], made now for a small table; for a large one, as last made (at
    /// most a second old while someone asks, see [`Location::refresh_counts`]).
    pub fn counts_recent(&self, now_ms: u64) -> Counts {
        use std::sync::atomic::Ordering;
        if self.aor_count() < COUNT_INLINE_BELOW {
            return self.counts(now_ms);
        }
        self.counts_wanted_ms.store(now_ms, Ordering::Relaxed);
        let cache = self.counts_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, counts)) = cache.as_ref() {
            if now_ms.saturating_sub(*at) <= COUNTS_MAX_AGE_MS {
                return counts.clone();
            }
        }
        drop(cache);
        self.refresh_counts(now_ms);
        self.counts_recent_cached().unwrap_or_default()
    }

    fn counts_recent_cached(&self) -> Option<Counts> {
        let cache = self.counts_cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.as_ref().map(|(_, c)| c.clone())
    }

    /// Makes the counts of a large table again if they were asked for in the last 10 s
    /// (called every second by the housekeeping, off the runtime's workers).
    pub fn refresh_counts_if_wanted(&self, now_ms: u64) {
        use std::sync::atomic::Ordering;
        let wanted = self.counts_wanted_ms.load(Ordering::Relaxed);
        if wanted > 0 && now_ms.saturating_sub(wanted) < 10_000 {
            self.refresh_counts(now_ms);
        }
    }

    fn refresh_counts(&self, now_ms: u64) {
        let counts = self.counts(now_ms);
        *self.counts_cache.lock().unwrap_or_else(|p| p.into_inner()) = Some((now_ms, counts));
    }
}

/// An AOR's bindings that count now: per key the newest copy, if it is live.
fn current(keys: &HashMap<String, Copies>, now_ms: u64) -> impl Iterator<Item = Binding> + '_ {
    keys.values()
        .filter_map(|copies| newest(copies))
        .filter(move |b| b.live(now_ms))
        .cloned()
}

fn newest(copies: &[(usize, Binding)]) -> Option<&Binding> {
    copies
        .iter()
        .map(|(_, b)| b)
        .max_by_key(|b| (b.registered_at_ms, b.owner))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(owner: usize, at: u64, expires: u64) -> Binding {
        Binding {
            aor: "sip:alice@lab.example".into(),
            uri: "sip:alice@10.0.0.5:5060".into(),
            params: String::new(),
            expires_at_ms: expires,
            registered_at_ms: at,
            call_id: "c".into(),
            cseq: 1,
            path: vec![],
            instance: None,
            reg_id: None,
            q: 1000,
            owner,
            proto: Proto::Udp,
            received: "10.0.0.5:5060".parse().unwrap(),
            conn: None,
            removed: false,
        }
    }

    #[test]
    fn pages_follow_the_aors_in_order_as_they_come_and_go() {
        let loc = Location::new(1);
        let put = |owner: usize, user: &str| {
            let mut b = binding(owner, 10, 1_000_000);
            b.aor = format!("sip:{user}@lab.example");
            b.uri = format!("sip:{user}@10.0.0.5:5060");
            loc.apply(owner, &b.key(), Some(&b.encode()));
            b.key()
        };
        let users =
            |page: &[Binding]| -> Vec<String> { page.iter().map(|b| b.aor.clone()).collect() };
        for (k, u) in ["carol", "alice", "dave", "bob"].iter().enumerate() {
            put(k % 2 + 1, u);
        }
        let (matched, page) = loc.page_of_aors(100, "", 1, 2);
        assert_eq!(matched, 4);
        assert_eq!(
            users(&page),
            ["sip:bob@lab.example", "sip:carol@lab.example"]
        );
        let (matched, page) = loc.page_of_aors(100, "o", 0, 10);
        assert_eq!(matched, 2, "bob and carol");
        assert_eq!(
            users(&page),
            ["sip:bob@lab.example", "sip:carol@lab.example"]
        );
        let bob = put(2, "bob");
        loc.apply(2, &bob, None);
        assert_eq!(
            loc.page_of_aors(100, "bob", 0, 10).0,
            0,
            "gone when its last binding went"
        );
        loc.clear_owner(2);
        let (matched, page) = loc.page_of_aors(100, "", 0, 10);
        assert_eq!(matched, 2, "peer 2's stream replaced whole");
        assert_eq!(
            users(&page),
            ["sip:carol@lab.example", "sip:dave@lab.example"]
        );
        assert!(
            loc.page_of_aors(2_000_000, "", 0, 10).1.is_empty(),
            "expired"
        );
    }

    #[test]
    fn the_newest_copy_wins_and_the_old_owner_sees_its_copy_is_stale() {
        let loc = Location::new(1);
        let peer3 = Location::new(3);
        let peer2 = Location::new(2);
        let old = binding(1, 100, 10_000);
        let key = old.key();
        let all = [&loc, &peer2, &peer3];
        let apply = |owner: usize, b: Option<&Binding>| {
            for l in all {
                l.apply(owner, &key, b.map(|b| b.encode()).as_deref());
            }
        };
        apply(1, Some(&old));
        assert_eq!(loc.lookup("sip:alice@lab.example", 200)[0].owner, 1);
        let moved = binding(3, 500, 20_000);
        apply(3, Some(&moved));
        let found = loc.lookup("sip:alice@lab.example", 600);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].owner, 3);
        assert_eq!(loc.stale_own(600), vec![key.clone()]);
        assert!(peer3.stale_own(600).is_empty());
        // A removal on peer 2 shadows peer 3's copy; once expired, both go.
        let mut removal = binding(2, 900, 20_000);
        removal.removed = true;
        apply(2, Some(&removal));
        assert!(loc.lookup("sip:alice@lab.example", 1_000).is_empty());
        assert_eq!(peer3.stale_own(1_000), vec![key.clone()]);
        apply(1, None);
        apply(3, None);
        assert!(peer2.stale_own(19_999).is_empty());
        assert_eq!(peer2.stale_own(20_001), vec![key.clone()]);
        apply(2, None);
        assert_eq!(loc.counts(0).1, 0);
        assert_eq!(loc.aor_count(), 0);
    }

    #[test]
    fn expired_bindings_are_not_found() {
        let loc = Location::new(1);
        let b = binding(1, 100, 1_000);
        loc.apply(1, &b.key(), Some(&b.encode()));
        assert_eq!(loc.lookup(&b.aor, 999).len(), 1);
        assert!(loc.lookup(&b.aor, 1_000).is_empty());
        assert!(loc.stale_own(999).is_empty());
        // A refresh moves the expiry: the old entry falls due and is let go.
        let refreshed = binding(1, 200, 5_000);
        loc.apply(1, &b.key(), Some(&refreshed.encode()));
        assert!(loc.stale_own(1_000).is_empty());
        assert_eq!(loc.stale_own(5_000), vec![b.key()]);
    }
}
