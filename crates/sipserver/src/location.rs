//! The location service (SV-2): every binding of every peer, indexed by AOR.
//!
//! Each peer owns the replicated stream `registrations/peerN` and writes into it only the
//! bindings it accepted; every peer holds every stream, so a lookup is local. A binding is
//! keyed `AOR|id` (id: `+sip.instance`/`reg-id` when given, else the contact URI). When the
//! same key is in several streams (the endpoint moved to another peer, or a peer removed a
//! binding another peer holds), the copy registered last wins; a removal is a record with
//! `removed` set that shadows older copies until they expire. Expiry is absolute wall-clock
//! time, so every peer agrees on it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

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

/// One copy of a binding as the table keeps it: the record's bytes as its stream holds them,
/// decoded only when a binding is asked for, and beside them the few fields that choosing
/// the newest copy, counting and sweeping read. One allocation per copy: a decoded
/// [`Binding`] in a map of its own per AOR took five, and five times the bytes
/// (`bench/RESULTS.md`, "Memory per binding").
struct Held {
    /// A hash of the record's key (`AOR|id`): the copies of one binding share it. The
    /// registrar writes each record under its binding's key, so the key is not kept: it
    /// is [`Binding::key`] of the decoded record.
    key_hash: u64,
    registered_at_ms: u64,
    expires_at_ms: u64,
    /// The peer whose stream holds this copy.
    stream: u16,
    /// The peer that accepted the REGISTER ([`Binding::owner`]).
    owner: u16,
    removed: bool,
    record: Box<[u8]>,
}

impl Held {
    /// None for bytes that are not a binding (or name a peer no cluster has).
    fn new(stream: usize, key_hash: u64, record: &[u8]) -> Option<Held> {
        let b = Binding::decode(record)?;
        Some(Held {
            key_hash,
            registered_at_ms: b.registered_at_ms,
            expires_at_ms: b.expires_at_ms,
            stream: u16::try_from(stream).ok()?,
            owner: u16::try_from(b.owner).ok()?,
            removed: b.removed,
            record: record.into(),
        })
    }

    fn live(&self, now_ms: u64) -> bool {
        !self.removed && self.expires_at_ms > now_ms
    }

    /// Which of two copies of one key wins: registered last, then the higher peer.
    fn rank(&self) -> (u64, u16) {
        (self.registered_at_ms, self.owner)
    }

    /// The binding. Its bytes were decoded once when the copy was taken, so this does not
    /// fail; a copy that did would be left out.
    fn binding(&self) -> Option<Binding> {
        Binding::decode(&self.record)
    }
}

/// The hash that tells the keys of one AOR apart. Only the few keys of one AOR are compared,
/// so two that share a 64-bit hash (and would be taken for one binding) do not happen by
/// chance; the hash lives only in this process's memory.
fn key_hash(key: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// Every copy of every binding of one AOR (usually one), of every stream.
type Copies = Vec<Held>;

/// An AOR as the table and the sweep's index share it (one allocation for both).
type Aor = Arc<str>;

/// The copies that count for an AOR's bindings: per key the newest (the last of equals, as
/// `Iterator::max_by_key` chooses). Quadratic in the copies of one AOR, which are few.
fn newest_per_key(copies: &[Held]) -> impl Iterator<Item = &Held> {
    copies.iter().enumerate().filter_map(move |(i, c)| {
        let beaten = copies.iter().enumerate().any(|(j, o)| {
            j != i
                && o.key_hash == c.key_hash
                && (o.rank() > c.rank() || (o.rank() == c.rank() && j > i))
        });
        (!beaten).then_some(c)
    })
}

/// What [`Location::listing`] finds: how many match, and the page asked for.
#[derive(Debug, Default)]
pub struct Listing {
    pub matched: usize,
    pub page: Vec<Binding>,
}

/// Every binding record of every stream, by AOR in order (a page of the list is read from
/// here, without sorting every binding).
#[derive(Default)]
pub struct Location {
    by_aor: RwLock<BTreeMap<Aor, Copies>>,
    /// This peer's index: its own records are also kept by when they fall due.
    own: usize,
    /// (due, AOR) of this peer's records: their expiry, or 0 once a newer copy elsewhere
    /// replaced one. When an entry falls due, the AOR's own copies are checked (a refresh
    /// leaves the old entry behind), so the sweep never scans every binding.
    due: Mutex<BTreeSet<(u64, Aor)>>,
    /// The last [`Location::counts`] of a large table, and when it was asked for.
    counts_cache: Mutex<Option<(u64, Counts)>>,
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

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<Aor, Copies>> {
        self.by_aor.read().unwrap_or_else(|p| p.into_inner())
    }

    fn due_lock(&self) -> MutexGuard<'_, BTreeSet<(u64, Aor)>> {
        self.due.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A record of stream `owner` changed (`None`: deleted; bytes that are not a binding
    /// count as deleted).
    pub fn apply(&self, owner: usize, key: &str, value: Option<&[u8]>) {
        let Some(aor) = key.split('|').next() else {
            return;
        };
        let hash = key_hash(key);
        let mut by_aor = self.by_aor.write().unwrap_or_else(|p| p.into_inner());
        match value.and_then(|v| Held::new(owner, hash, v)) {
            Some(held) => {
                let aor: Aor = match by_aor.get_key_value(aor) {
                    Some((known, _)) => known.clone(),
                    None => Arc::from(aor),
                };
                let copies = by_aor.entry(aor.clone()).or_default();
                let same_key = |c: &&Held| c.key_hash == hash;
                if owner == self.own {
                    let newer_elsewhere = copies.iter().filter(same_key).any(|c| {
                        usize::from(c.stream) != owner && c.registered_at_ms > held.registered_at_ms
                    });
                    let due = if newer_elsewhere {
                        0
                    } else {
                        held.expires_at_ms
                    };
                    self.due_lock().insert((due, aor));
                } else if copies.iter().filter(same_key).any(|mine| {
                    usize::from(mine.stream) == self.own
                        && mine.registered_at_ms < held.registered_at_ms
                }) {
                    self.due_lock().insert((0, aor));
                }
                match copies
                    .iter_mut()
                    .find(|c| c.key_hash == hash && c.stream == held.stream)
                {
                    Some(slot) => *slot = held,
                    None => {
                        // Exactly one more: a Vec grows by four at first, and most AORs
                        // keep one binding.
                        copies.reserve_exact(1);
                        copies.push(held);
                    }
                }
            }
            None => {
                if let Some(copies) = by_aor.get_mut(aor) {
                    copies.retain(|c| !(c.key_hash == hash && usize::from(c.stream) == owner));
                    if copies.is_empty() {
                        by_aor.remove(aor);
                    } else {
                        copies.shrink_to_fit();
                    }
                }
            }
        }
    }

    /// The current bindings of `aor`: per key the newest copy, if it is live; highest q
    /// first.
    pub fn lookup(&self, aor: &str, now_ms: u64) -> Vec<Binding> {
        let by_aor = self.read();
        let mut out: Vec<Binding> = by_aor
            .get(aor)
            .map(|copies| current(copies, now_ms).collect())
            .unwrap_or_default();
        out.sort_by(|a, b| {
            b.q.cmp(&a.q)
                .then(a.registered_at_ms.cmp(&b.registered_at_ms))
        });
        out
    }

    /// The newest copy of one key, live or not (a registrar checks Call-ID/CSeq against it).
    pub fn newest_of(&self, aor: &str, key: &str) -> Option<Binding> {
        let hash = key_hash(key);
        let by_aor = self.read();
        let newest = newest_per_key(by_aor.get(aor)?)
            .find(|c| c.key_hash == hash)
            .and_then(Held::binding);
        newest
    }

    /// This peer's keys that must go: expired (or a removal past what it shadowed), or
    /// superseded by a newer copy in another stream.
    pub fn stale_own(&self, now_ms: u64) -> Vec<String> {
        let fallen: Vec<Aor> = {
            let mut due = self.due_lock();
            let mut fallen = Vec::new();
            while let Some(first) = due.first() {
                if first.0 > now_ms {
                    break;
                }
                if let Some((_, aor)) = due.pop_first() {
                    fallen.push(aor);
                }
            }
            fallen
        };
        let by_aor = self.read();
        let mut out: Vec<String> = Vec::new();
        for aor in fallen {
            let Some(copies) = by_aor.get(&aor) else {
                continue;
            };
            for mine in copies.iter().filter(|c| usize::from(c.stream) == self.own) {
                let stale = mine.expires_at_ms <= now_ms
                    || copies.iter().any(|c| {
                        c.key_hash == mine.key_hash
                            && usize::from(c.stream) != self.own
                            && c.registered_at_ms > mine.registered_at_ms
                    });
                if let Some(b) = mine.binding().filter(|_| stale) {
                    out.push(b.key());
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// How many AORs have a record (live or awaiting its sweep): the registration
    /// licences count this, without a scan.
    pub fn aor_count(&self) -> usize {
        self.read().len()
    }

    /// In one pass over the live bindings, in AOR order: how many of `owner`'s (any owner's
    /// if none) have `q` in their AOR or contact, and one page of those in (AOR, contact)
    /// order (`limit` 0: none). A binding is decoded only to be shown, to compare its
    /// contact with `q` when its AOR does not match, or to order an AOR's several: with
    /// 100,000 bindings, decoding every one was half the pass (23 ms against 8 for one
    /// peer's, release build on this VM).
    pub fn listing(
        &self,
        now_ms: u64,
        owner: Option<usize>,
        q: &str,
        offset: usize,
        limit: usize,
    ) -> Listing {
        let by_aor = self.read();
        let mut listing = Listing::default();
        let end = offset.saturating_add(limit);
        let mut mine: Vec<&Held> = Vec::new();
        for (aor, copies) in by_aor.iter() {
            mine.clear();
            mine.extend(
                newest_per_key(copies)
                    .filter(|c| c.live(now_ms) && owner.is_none_or(|o| o == usize::from(c.owner))),
            );
            let aor_matches = q.is_empty() || aor.contains(q);
            if let ([one], true) = (mine.as_slice(), aor_matches) {
                if listing.matched >= offset && listing.matched < end {
                    listing.page.extend(one.binding());
                }
                listing.matched += 1;
                continue;
            }
            let mut bindings: Vec<Binding> = mine.iter().filter_map(|c| c.binding()).collect();
            bindings.sort_by(|a, b| a.uri.cmp(&b.uri));
            for b in bindings {
                if aor_matches || b.uri.contains(q) {
                    if listing.matched >= offset && listing.matched < end {
                        listing.page.push(b);
                    }
                    listing.matched += 1;
                }
            }
        }
        listing
    }

    /// Live bindings per owner, and the number of AORs with one (no binding is decoded).
    pub fn counts(&self, now_ms: u64) -> Counts {
        let by_aor = self.read();
        let mut per_owner: HashMap<usize, usize> = HashMap::new();
        let mut aors = 0;
        for copies in by_aor.values() {
            let mut any = false;
            for c in newest_per_key(copies).filter(|c| c.live(now_ms)) {
                *per_owner.entry(usize::from(c.owner)).or_insert(0) += 1;
                any = true;
            }
            aors += usize::from(any);
        }
        (per_owner, aors)
    }

    /// Drops every record of stream `owner` (its stream was replaced whole).
    pub fn clear_owner(&self, owner: usize) {
        let mut by_aor = self.by_aor.write().unwrap_or_else(|p| p.into_inner());
        by_aor.retain(|_, copies| {
            copies.retain(|c| usize::from(c.stream) != owner);
            copies.shrink_to_fit();
            !copies.is_empty()
        });
    }

    /// One page of AORs in order (those containing `q`, if given) with their live bindings,
    /// and how many AORs match. No pass over the bindings: the table is kept in AOR order.
    pub fn page_of_aors(
        &self,
        now_ms: u64,
        q: &str,
        offset: usize,
        limit: usize,
    ) -> (usize, Vec<Binding>) {
        let by_aor = self.read();
        let (matched, page): (usize, Vec<&Copies>) = if q.is_empty() {
            (
                by_aor.len(),
                by_aor.values().skip(offset).take(limit).collect(),
            )
        } else {
            let mut matched = 0;
            let mut page = Vec::new();
            for (_, copies) in by_aor.iter().filter(|(a, _)| a.contains(q)) {
                if matched >= offset && page.len() < limit {
                    page.push(copies);
                }
                matched += 1;
            }
            (matched, page)
        };
        let mut rows = Vec::new();
        for copies in page {
            let mut bindings: Vec<Binding> = current(copies, now_ms).collect();
            bindings.sort_by(|a, b| a.uri.cmp(&b.uri));
            rows.extend(bindings);
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
fn current(copies: &[Held], now_ms: u64) -> impl Iterator<Item = Binding> + '_ {
    newest_per_key(copies)
        .filter(move |c| c.live(now_ms))
        .filter_map(Held::binding)
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

    /// The table keeps each copy as its record's bytes: what comes out is what went in,
    /// every field, and the keys of one AOR stay apart.
    #[test]
    fn each_key_of_an_aor_is_its_own_binding_and_comes_back_whole() {
        let loc = Location::new(1);
        let mut a = binding(1, 10, 100_000);
        a.path = vec!["<sip:edge.lab.example;lr>".into()];
        a.params = ";+sip.instance=\"<urn:uuid:1>\";reg-id=1".into();
        a.instance = Some("<urn:uuid:1>".into());
        a.reg_id = Some(1);
        a.conn = Some(7);
        a.proto = Proto::Tcp;
        let mut b = binding(1, 20, 100_000);
        b.uri = "sip:alice@10.0.0.6:5060".into();
        b.q = 500;
        loc.apply(1, &a.key(), Some(&a.encode()));
        loc.apply(1, &b.key(), Some(&b.encode()));
        assert_eq!(loc.lookup(&a.aor, 50), vec![a.clone(), b.clone()]);
        assert_eq!(loc.newest_of(&a.aor, &b.key()), Some(b.clone()));
        // The endpoint of b moved to peer 2: its copy there is the one found, and this
        // peer's copy is stale.
        let mut moved = b.clone();
        moved.owner = 2;
        moved.registered_at_ms = 30;
        loc.apply(2, &b.key(), Some(&moved.encode()));
        assert_eq!(loc.newest_of(&a.aor, &b.key()), Some(moved.clone()));
        assert_eq!(loc.stale_own(50), vec![b.key()]);
        loc.apply(1, &b.key(), None);
        assert_eq!(loc.lookup(&a.aor, 50), vec![a.clone(), moved.clone()]);
        loc.apply(1, &a.key(), None);
        assert_eq!(loc.lookup(&a.aor, 50), vec![moved]);
        assert_eq!(loc.aor_count(), 1);
        // Bytes that are not a binding take the place of the copy they replace: none.
        loc.apply(2, &b.key(), Some(b"not a binding"));
        assert_eq!(loc.aor_count(), 0);
        assert!(loc.lookup(&a.aor, 50).is_empty());
    }

    #[test]
    fn a_listing_pages_the_bindings_of_a_peer_or_matching_a_text_in_order() {
        let loc = Location::new(1);
        for (k, user) in ["dave", "alice", "carol", "bob"].iter().enumerate() {
            let mut b = binding(k % 2 + 1, 10, 1_000 * (k as u64 + 1));
            b.aor = format!("sip:{user}@lab.example");
            b.uri = format!("sip:{user}@10.0.0.5:5060");
            loc.apply(b.owner, &b.key(), Some(&b.encode()));
        }
        // dave: peer 1, expires at 1,000; alice: peer 2, 2,000; carol: 1, 3,000; bob: 2, 4,000.
        let listing = loc.listing(500, None, "", 1, 2);
        assert_eq!(listing.matched, 4);
        let page: Vec<&str> = listing.page.iter().map(|b| b.aor.as_str()).collect();
        assert_eq!(page, ["sip:bob@lab.example", "sip:carol@lab.example"]);
        assert_eq!(loc.counts(1_500), (HashMap::from([(1, 1), (2, 2)]), 3));
        assert!(loc.listing(500, None, "", 4, 10).page.is_empty());
        // One peer's.
        let peer2 = loc.listing(500, Some(2), "", 0, 10);
        assert_eq!(peer2.matched, 2);
        let page: Vec<&str> = peer2.page.iter().map(|b| b.aor.as_str()).collect();
        assert_eq!(page, ["sip:alice@lab.example", "sip:bob@lab.example"]);
        assert_eq!(loc.listing(500, Some(9), "", 0, 10).matched, 0);
        // `q` in the AOR, or only in the contact (decoded to be compared).
        assert_eq!(loc.listing(500, None, "carol", 0, 10).matched, 1);
        let mut other_contact = binding(1, 20, 5_000);
        other_contact.aor = "sip:erin@lab.example".into();
        other_contact.uri = "sip:desk-7@10.0.0.9:5060".into();
        loc.apply(1, &other_contact.key(), Some(&other_contact.encode()));
        let by_contact = loc.listing(500, Some(1), "desk-7", 0, 10);
        assert_eq!(by_contact.matched, 1);
        assert_eq!(by_contact.page[0].aor, "sip:erin@lab.example");
        assert_eq!(loc.listing(500, Some(2), "desk-7", 0, 10).matched, 0);
        // Two contacts of one AOR come in contact order, and a page may split them.
        let mut second = other_contact.clone();
        second.uri = "sip:desk-1@10.0.0.9:5060".into();
        loc.apply(1, &second.key(), Some(&second.encode()));
        let erin = loc.listing(500, None, "erin", 1, 1);
        assert_eq!(erin.matched, 2);
        assert_eq!(erin.page[0].uri, "sip:desk-7@10.0.0.9:5060");
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
