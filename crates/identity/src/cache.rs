//! A bounded answer cache: hit and miss lifetimes, least-recently-used eviction, one lookup in flight per key.
//!
//! # Design
//!
//! - Answers, failures included, are kept until they expire: a hit for the hit TTL, a miss
//!   (not found, invalid, unreachable) for the miss TTL, so that a burst of events for a
//!   broken identity asks the directory once.
//! - Each entry also keeps the last good value, across purges and expiry, so that a
//!   directory that cannot be reached does not turn a known identity into an unknown one.
//!   A definitive answer (not found, invalid) drops it.
//! - Concurrent lookups of one key share one request (a "flight"); the first caller leads,
//!   the others wait for its answer.
//! - A purge during a flight detaches the flight from the key: its answer still goes to the
//!   callers that were waiting for it, but is not stored, because it may predate whatever
//!   made the caller purge.
//! - Bounded twice: by entry count and by approximate bytes, evicting the least recently
//!   used entry first. A DID document can be 64 KiB, so a count alone would not bound memory.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::IdentityError;

/// What a lookup returns, and what the cache stores.
pub(crate) type Answer<V> = Result<V, IdentityError>;

/// Approximate heap bytes of a key or value, for the cache's byte bound.
pub(crate) trait Weigh {
    /// Approximate bytes held, including allocations behind pointers.
    fn weigh(&self) -> usize;
}

/// Bookkeeping bytes of one entry besides its key and value (maps, timestamps, error text).
const ENTRY_OVERHEAD: usize = 160;

/// How long answers live.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lifetimes {
    pub(crate) hit: Duration,
    pub(crate) miss: Duration,
}

/// One lookup in progress; followers watch for its answer.
#[derive(Debug)]
pub(crate) struct Flight<V> {
    answer: watch::Sender<Option<Answer<V>>>,
}

/// How a caller proceeds after asking the cache.
pub(crate) enum Start<V> {
    /// A live answer was cached.
    Cached(Answer<V>),
    /// Another caller is looking it up: wait for its answer (`None` if it gave up).
    Follow(watch::Receiver<Option<Answer<V>>>),
    /// Look it up, then [`Cache::settle`] (or [`Cache::abandon`]) this flight.
    Lead(Arc<Flight<V>>),
}

#[derive(Debug)]
struct Entry<V> {
    /// `None` once purged: the next lookup asks again.
    answer: Option<Answer<V>>,
    expires: Instant,
    /// The last value that resolved, served when the directory cannot be reached.
    last_good: Option<V>,
    /// Position in [`Cache::recency`].
    used: u64,
    /// What this entry adds to [`Cache::bytes`].
    weight: usize,
}

/// The cache of one kind of lookup (DIDs or handles). Callers hold it behind a mutex and
/// never across an `.await`.
#[derive(Debug)]
pub(crate) struct Cache<K, V> {
    entries: HashMap<K, Entry<V>>,
    /// Use stamp → key, oldest first: the eviction order.
    recency: BTreeMap<u64, K>,
    clock: u64,
    bytes: usize,
    capacity: usize,
    max_bytes: usize,
    flights: HashMap<K, Arc<Flight<V>>>,
}

impl<K, V> Cache<K, V>
where
    K: Hash + Eq + Clone + Display + Weigh,
    V: Clone + Weigh,
{
    /// An empty cache of at most `capacity` entries and about `max_bytes` bytes.
    pub(crate) fn new(capacity: usize, max_bytes: usize) -> Self {
        Cache {
            entries: HashMap::new(),
            recency: BTreeMap::new(),
            clock: 0,
            bytes: 0,
            capacity,
            max_bytes,
            flights: HashMap::new(),
        }
    }

    /// Entries held, live, expired or purged.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Approximate bytes held.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Begins a lookup of `key`: a live cached answer, a flight to follow, or a new flight to
    /// lead. `fresh` skips the cache and any flight already running (after purging both).
    pub(crate) fn start(&mut self, key: &K, fresh: bool, now: Instant) -> Start<V> {
        if fresh {
            self.purge(key);
        } else {
            if let Some(answer) = self.live(key, now) {
                return Start::Cached(answer);
            }
            if let Some(flight) = self.flights.get(key) {
                return Start::Follow(flight.answer.subscribe());
            }
        }
        let (answer, _) = watch::channel(None);
        let flight = Arc::new(Flight { answer });
        self.flights.insert(key.clone(), flight.clone());
        Start::Lead(flight)
    }

    /// The cached answer if it has not expired.
    fn live(&mut self, key: &K, now: Instant) -> Option<Answer<V>> {
        let entry = self.entries.get(key)?;
        if now >= entry.expires {
            return None;
        }
        let answer = entry.answer.clone()?;
        self.touch(key);
        Some(answer)
    }

    /// The last good value, whether or not its answer is still live.
    pub(crate) fn last_good(&self, key: &K) -> Option<V> {
        self.entries.get(key)?.last_good.clone()
    }

    /// Forgets the answer for `key` (keeping the last good value as a fallback for
    /// unreachable directories) and detaches any flight, so that its answer is not stored.
    pub(crate) fn purge(&mut self, key: &K) {
        self.flights.remove(key);
        if let Some(entry) = self.entries.get_mut(key) {
            entry.answer = None;
        }
    }

    /// Detaches `flight` without an answer: its leader was dropped mid-way. Followers see
    /// the channel close and start over.
    pub(crate) fn abandon(&mut self, key: &K, flight: &Arc<Flight<V>>) {
        if self
            .flights
            .get(key)
            .is_some_and(|current| Arc::ptr_eq(current, flight))
        {
            self.flights.remove(key);
        }
    }

    /// Ends `flight` with what the lookup found: stores it (unless a purge detached the
    /// flight meanwhile), falls back to the last good value when the lookup failed
    /// transiently, hands the result to the followers and returns it.
    pub(crate) fn settle(
        &mut self,
        key: &K,
        flight: &Arc<Flight<V>>,
        found: Answer<V>,
        lifetimes: Lifetimes,
        now: Instant,
    ) -> Answer<V> {
        let current = self
            .flights
            .get(key)
            .is_some_and(|current| Arc::ptr_eq(current, flight));
        if current {
            self.flights.remove(key);
        }
        let answer = match found {
            Ok(value) => {
                if current {
                    self.put(
                        key,
                        Ok(value.clone()),
                        now + lifetimes.hit,
                        Some(value.clone()),
                    );
                }
                Ok(value)
            }
            Err(err) if err.is_transient() => match self.last_good(key) {
                Some(old) => {
                    tracing::warn!(%key, %err, "identity: lookup failed; using the last good answer");
                    if current {
                        // Served for the miss TTL, then asked again.
                        self.put(
                            key,
                            Ok(old.clone()),
                            now + lifetimes.miss,
                            Some(old.clone()),
                        );
                    }
                    Ok(old)
                }
                None => {
                    if current {
                        self.put(key, Err(err.clone()), now + lifetimes.miss, None);
                    }
                    Err(err)
                }
            },
            Err(err) => {
                if current {
                    self.put(key, Err(err.clone()), now + lifetimes.miss, None);
                }
                Err(err)
            }
        };
        flight.answer.send_replace(Some(answer.clone()));
        answer
    }

    fn put(&mut self, key: &K, answer: Answer<V>, expires: Instant, last_good: Option<V>) {
        let value_weight = match &answer {
            Ok(value) => value.weigh(),
            Err(err) => err.to_string().len(),
        };
        let weight = ENTRY_OVERHEAD
            + key.weigh()
            + value_weight.max(last_good.as_ref().map_or(0, Weigh::weigh));
        match self.entries.get_mut(key) {
            Some(entry) => {
                self.bytes = self.bytes.saturating_sub(entry.weight);
                entry.answer = Some(answer);
                entry.expires = expires;
                entry.last_good = last_good;
                entry.weight = weight;
            }
            None => {
                self.entries.insert(
                    key.clone(),
                    Entry {
                        answer: Some(answer),
                        expires,
                        last_good,
                        used: 0,
                        weight,
                    },
                );
            }
        }
        self.bytes += weight;
        self.touch(key);
        self.evict();
    }

    /// Marks `key` as the most recently used.
    fn touch(&mut self, key: &K) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        self.recency.remove(&entry.used);
        self.clock += 1;
        entry.used = self.clock;
        self.recency.insert(self.clock, key.clone());
    }

    /// Drops least recently used entries until both bounds hold.
    fn evict(&mut self) {
        while self.entries.len() > self.capacity || self.bytes > self.max_bytes {
            let Some((_, key)) = self.recency.pop_first() else {
                break;
            };
            if let Some(entry) = self.entries.remove(&key) {
                self.bytes = self.bytes.saturating_sub(entry.weight);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atpdb_repo::syntax::Did;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    impl Weigh for u32 {
        fn weigh(&self) -> usize {
            4
        }
    }

    const LIFETIMES: Lifetimes = Lifetimes {
        hit: Duration::from_secs(60),
        miss: Duration::from_secs(5),
    };

    fn did(n: usize) -> Result<Did, Box<dyn std::error::Error>> {
        Ok(format!("did:web:host{n}.example").parse()?)
    }

    /// Looks `key` up, storing `found` if the cache has no live answer.
    fn lookup(
        cache: &mut Cache<Did, u32>,
        key: &Did,
        found: Answer<u32>,
        now: Instant,
    ) -> Answer<u32> {
        match cache.start(key, false, now) {
            Start::Cached(answer) => answer,
            Start::Lead(flight) => cache.settle(key, &flight, found, LIFETIMES, now),
            Start::Follow(_) => Err(IdentityError::Unsupported { did: key.clone() }),
        }
    }

    fn unreachable(key: &Did) -> Answer<u32> {
        Err(IdentityError::Unreachable {
            did: key.clone(),
            reason: "down".to_owned(),
        })
    }

    #[test]
    fn hits_and_misses_expire_on_their_own_clocks() -> TestResult {
        let mut cache = Cache::new(10, usize::MAX);
        let (a, b) = (did(1)?, did(2)?);
        let start = Instant::now();
        assert_eq!(lookup(&mut cache, &a, Ok(1), start)?, 1);
        assert!(matches!(
            lookup(
                &mut cache,
                &b,
                Err(IdentityError::NotFound { did: b.clone() }),
                start
            ),
            Err(IdentityError::NotFound { .. })
        ));
        let later = start + Duration::from_secs(10);
        assert_eq!(lookup(&mut cache, &a, Ok(2), later)?, 1, "hit still live");
        assert_eq!(lookup(&mut cache, &b, Ok(3), later)?, 3, "miss expired");
        let much_later = start + Duration::from_secs(61);
        assert_eq!(lookup(&mut cache, &a, Ok(4), much_later)?, 4, "hit expired");
        Ok(())
    }

    #[test]
    fn unreachable_falls_back_to_the_last_good_value() -> TestResult {
        let mut cache = Cache::new(10, usize::MAX);
        let a = did(1)?;
        let start = Instant::now();
        lookup(&mut cache, &a, Ok(1), start)?;
        cache.purge(&a);
        assert_eq!(lookup(&mut cache, &a, unreachable(&a), start)?, 1);
        // The fallback is served for the miss TTL only, then asked again.
        let later = start + Duration::from_secs(6);
        assert_eq!(lookup(&mut cache, &a, Ok(2), later)?, 2);
        // A definitive answer drops the fallback.
        cache.purge(&a);
        let gone = Err(IdentityError::NotFound { did: a.clone() });
        assert!(lookup(&mut cache, &a, gone, later).is_err());
        cache.purge(&a);
        assert!(lookup(&mut cache, &a, unreachable(&a), later).is_err());
        Ok(())
    }

    #[test]
    fn a_purge_during_a_flight_keeps_its_answer_out() -> TestResult {
        let mut cache = Cache::new(10, usize::MAX);
        let a = did(1)?;
        let now = Instant::now();
        let Start::Lead(first) = cache.start(&a, false, now) else {
            return Err("expected to lead".into());
        };
        let Start::Follow(mut follower) = cache.start(&a, false, now) else {
            return Err("expected to follow".into());
        };
        cache.purge(&a);
        assert_eq!(cache.settle(&a, &first, Ok(1), LIFETIMES, now)?, 1);
        assert_eq!(
            follower.borrow_and_update().clone().ok_or("no answer")??,
            1,
            "the follower still gets the answer"
        );
        assert_eq!(cache.len(), 0, "but it is not stored");
        // A refresh during a flight does the same, and its own answer is stored.
        let Start::Lead(stale) = cache.start(&a, false, now) else {
            return Err("expected to lead".into());
        };
        let Start::Lead(fresh) = cache.start(&a, true, now) else {
            return Err("a refresh leads".into());
        };
        cache.settle(&a, &fresh, Ok(2), LIFETIMES, now)?;
        cache.settle(&a, &stale, Ok(1), LIFETIMES, now)?;
        assert_eq!(lookup(&mut cache, &a, Ok(3), now)?, 2);
        Ok(())
    }

    #[test]
    fn abandoned_flights_close_their_followers() -> TestResult {
        let mut cache: Cache<Did, u32> = Cache::new(10, usize::MAX);
        let a = did(1)?;
        let now = Instant::now();
        let Start::Lead(flight) = cache.start(&a, false, now) else {
            return Err("expected to lead".into());
        };
        let Start::Follow(follower) = cache.start(&a, false, now) else {
            return Err("expected to follow".into());
        };
        cache.abandon(&a, &flight);
        drop(flight);
        assert!(follower.has_changed().is_err(), "the channel is closed");
        assert!(matches!(cache.start(&a, false, now), Start::Lead(_)));
        Ok(())
    }

    #[test]
    fn bounded_by_count_least_recently_used_first() -> TestResult {
        let mut cache = Cache::new(3, usize::MAX);
        let now = Instant::now();
        for n in 0..3 {
            lookup(&mut cache, &did(n)?, Ok(n as u32), now)?;
        }
        // Using 0 makes 1 the oldest.
        assert_eq!(lookup(&mut cache, &did(0)?, Ok(99), now)?, 0);
        lookup(&mut cache, &did(3)?, Ok(3), now)?;
        assert_eq!(cache.len(), 3);
        assert_eq!(lookup(&mut cache, &did(0)?, Ok(99), now)?, 0, "kept");
        assert_eq!(lookup(&mut cache, &did(1)?, Ok(99), now)?, 99, "evicted");
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.recency.len(), 3);
        Ok(())
    }

    #[test]
    fn bounded_by_bytes() -> TestResult {
        let one = ENTRY_OVERHEAD + did(0)?.weigh() + 4;
        let mut cache = Cache::new(100, one * 2);
        let now = Instant::now();
        for n in 0..5 {
            lookup(&mut cache, &did(n)?, Ok(1), now)?;
            assert!(cache.bytes() <= one * 2);
        }
        assert_eq!(cache.len(), 2);
        Ok(())
    }

    #[test]
    fn capacity_zero_caches_nothing() -> TestResult {
        let mut cache = Cache::new(0, usize::MAX);
        let now = Instant::now();
        assert_eq!(lookup(&mut cache, &did(1)?, Ok(1), now)?, 1);
        assert_eq!(cache.len(), 0);
        assert_eq!(cache.bytes(), 0);
        Ok(())
    }
}
