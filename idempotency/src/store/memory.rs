//! The embedded default store: one process, no network.
//!
//! Same semantics as Redis (atomic claim, owner-checked writes, fencing, lease and retention
//! TTLs), on `tokio::time` so tests can pause and advance the clock.
//!
//! ## Bounded, and what it does when full
//!
//! It holds at most `capacity` keys and about `max_bytes` bytes (keys, fingerprints, owners and
//! stored answers, plus a fixed estimate of the bookkeeping per key). To make room for a claim
//! (or for the answer of a completion) it first drops expired entries, then **evicts completed
//! answers, the one whose retention ends first first** (with one retention for every route, the
//! oldest first), each counted in `keel_idempotency_memory_evictions_total`.
//!
//! **An evicted key can execute again**: its answer is forgotten before its retention ended, so
//! a retry with that key runs the handler a second time instead of getting the replay. Under a
//! sustained rate of new keys above about `capacity / ttl` per second (or `max_bytes`' worth of
//! answers per `ttl`) the retention actually kept shrinks to `capacity / rate`; watch the
//! eviction counter, and raise the limits, shorten `ttl` or use Redis when it moves.
//!
//! Claims in progress are never evicted. When they alone fill the store, a new claim is refused
//! with [`IdempotencyError::Full`] (503 + `Retry-After`, or run without idempotency on a route
//! that fails open), and so is a completion whose answer cannot fit beside them.
//!
//! A key's fencing tokens grow with every claim of it and continue from the wall clock
//! (microseconds since the epoch, as Redis's do from the server's clock), so a store made after a
//! restart hands out tokens above those of the store before it. Each part counts its own: two
//! keys in different parts may get the same token (as with Redis, tokens order the claims of one
//! key, not of all keys).
//!
//! Every operation is O(log n): entries are indexed by the end of their lease (in progress) or of
//! their retention (completed), so expired entries and eviction candidates are found at the front
//! of an ordered map instead of by walking every entry.
//!
//! ## Parts
//!
//! A large store is split by a hash of the key into parts (a power of two, up to 16), each with
//! its own lock and an equal share of `capacity` and `max_bytes`; every part holds at least 8,192
//! keys and 4 MiB, and at least the largest answer it is told of
//! ([`with_largest_answer`](MemoryStore::with_largest_answer); the store built from the
//! configuration passes `max_body_bytes`). The limits, the eviction order and "full" above hold
//! per part. Keys are hashed, so parts fill evenly. Two things come of it: requests on different
//! keys do not wait for one lock, and each hash table is small. A hash table that has grown or
//! been churned rebuilds itself now and then, all at once, under its lock: one table of 145,000
//! keys took 56–60 ms, during which every request waited; a part of such a store (16 parts) takes
//! about 2 ms, for the keys of that part only (`examples/memory_churn.rs` measures it). A store
//! below 16,384 keys or 8 MiB is one part, and its limits and eviction order are exact.

use std::{collections::BTreeMap, sync::Mutex, time::Duration};

use bytes::Bytes;
use hashbrown::HashTable;
use keel_core::units::MAX_DURATION;
use tokio::time::Instant;

use super::{BoxFuture, Claim, IdempotencyStore, Ownership};
use crate::{telemetry, IdempotencyError};

/// Default byte budget of a memory store: 64 MiB.
pub const DEFAULT_MEMORY_MAX_BYTES: usize = 64 << 20;

/// What one entry costs beside its strings and answer: the map slot, its two allocations' headers
/// and its place in an index. An estimate (measured layouts are about 250–400 bytes).
const ENTRY_OVERHEAD: usize = 256;

enum State {
    InProgress { owner: Box<str> },
    Completed(Bytes),
}

struct Entry {
    state: State,
    fingerprint: Box<str>,
    expires: Instant,
    /// The fencing token of the claim that made the entry: unique, so `(expires, fence)` names
    /// the entry in its index.
    fence: u64,
    /// What the entry counts against `max_bytes`.
    size: usize,
}

impl Entry {
    fn index(&self) -> (Instant, u64) {
        (self.expires, self.fence)
    }
    fn in_progress(&self) -> bool {
        matches!(self.state, State::InProgress { .. })
    }
}

fn entry_size(key: &str, fingerprint: &str, owner: &str, record: usize) -> usize {
    ENTRY_OVERHEAD
        .saturating_add(key.len())
        .saturating_add(fingerprint.len())
        .saturating_add(owner.len())
        .saturating_add(record)
}

/// A key's entry in its part's table, beside the key's hash: the table never hashes a key again,
/// neither to grow or rebuild itself nor to find the entry an index names.
struct Slot {
    hash: u64,
    key: Box<str>,
    entry: Entry,
}

/// Everything under one part's lock.
#[derive(Default)]
struct Inner {
    table: HashTable<Slot>,
    /// Entries in progress, by the end of their lease: the key's hash.
    leases: BTreeMap<(Instant, u64), u64>,
    /// Completed entries, by the end of their retention (the eviction order): the key's hash.
    completed: BTreeMap<(Instant, u64), u64>,
    bytes_in_progress: usize,
    bytes_completed: usize,
    fence: u64,
}

impl Inner {
    fn bytes(&self) -> usize {
        self.bytes_in_progress + self.bytes_completed
    }

    fn get(&self, hash: u64, key: &str) -> Option<&Entry> {
        self.table
            .find(hash, |s| s.hash == hash && *s.key == *key)
            .map(|s| &s.entry)
    }

    fn insert(&mut self, hash: u64, key: Box<str>, entry: Entry) {
        let index = if entry.in_progress() {
            self.bytes_in_progress += entry.size;
            &mut self.leases
        } else {
            self.bytes_completed += entry.size;
            &mut self.completed
        };
        index.insert(entry.index(), hash);
        self.table
            .insert_unique(hash, Slot { hash, key, entry }, |s| s.hash);
    }

    /// Takes the slot `eq` finds out of the table and its bytes out of the counts (not out of
    /// its index).
    fn take(&mut self, hash: u64, eq: impl FnMut(&Slot) -> bool) -> Option<Slot> {
        let (slot, _) = self.table.find_entry(hash, eq).ok()?.remove();
        if slot.entry.in_progress() {
            self.bytes_in_progress -= slot.entry.size;
        } else {
            self.bytes_completed -= slot.entry.size;
        }
        Some(slot)
    }

    fn remove(&mut self, hash: u64, key: &str) -> Option<(Box<str>, Entry)> {
        let slot = self.take(hash, |s| s.hash == hash && *s.key == *key)?;
        let index = if slot.entry.in_progress() {
            &mut self.leases
        } else {
            &mut self.completed
        };
        index.remove(&slot.entry.index());
        Some((slot.key, slot.entry))
    }

    /// Drops the entry its index named at `at` (already taken out of the index).
    fn drop_indexed(&mut self, at: (Instant, u64), hash: u64) {
        self.take(hash, |s| s.hash == hash && s.entry.index() == at);
    }

    /// Drops the entries whose lease or retention ended (at the front of each index).
    fn purge_expired(&mut self, now: Instant) {
        for completed in [false, true] {
            loop {
                let index = if completed {
                    &mut self.completed
                } else {
                    &mut self.leases
                };
                let Some(first) = index.first_entry() else {
                    break;
                };
                let at = *first.key();
                if at.0 > now {
                    break;
                }
                let hash = first.remove();
                self.drop_indexed(at, hash);
            }
        }
    }

    /// Evicts the completed entry whose retention ends first; false when there is none.
    fn evict_one(&mut self) -> bool {
        let Some((at, hash)) = self.completed.pop_first() else {
            return false;
        };
        self.drop_indexed(at, hash);
        true
    }
}

/// An in-process [`IdempotencyStore`]: bounded in keys and bytes, TTL-expiring, evicting
/// completed answers (never claims in progress) when full. See the module documentation above
/// for what eviction means for the guarantee.
pub struct MemoryStore {
    /// The keys, split by a hash of the key: each part has its own lock and its share of the
    /// limits (see the module documentation).
    shards: Box<[Mutex<Inner>]>,
    /// Hashes keys (foldhash, seeded per store): several times cheaper than the standard
    /// library's SipHash on the 64-byte keys the layer makes. It is not built to resist keys
    /// chosen to collide; the layer's keys are SHA-256 digests and the seed is random per store,
    /// so colliding keys cannot be aimed at it. One hash per operation picks the part and finds
    /// the key.
    hasher: foldhash::fast::RandomState,
    /// The limits as given, for the whole store.
    capacity: usize,
    max_bytes: usize,
    /// The largest answer each part must be able to hold.
    largest: usize,
    /// Each part's share of them.
    shard_capacity: usize,
    shard_bytes: usize,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("capacity", &self.capacity)
            .field("max_bytes", &self.max_bytes)
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

/// The wall clock in microseconds since the Unix epoch (0 before it).
///
/// Fencing tokens are at least this, so those of a store made after a restart are above those of
/// the store before it, as long as the clock did not step back by more than the restart took and
/// the old store did not hand out more than a million tokens a second. Redis's store seeds its
/// tokens from the server's `TIME` in microseconds too, so switching stores keeps them growing.
fn wall_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Keys per part, at least.
const KEYS_PER_SHARD: usize = 8_192;
/// Bytes per part, at least (and at least the largest answer to be stored).
const BYTES_PER_SHARD: usize = 4 << 20;
/// The most parts a store is split into.
const MAX_SHARDS: usize = 16;

/// How many parts a store of `capacity` keys and `max_bytes` bytes is split into, so that each
/// holds at least [`KEYS_PER_SHARD`] keys and `largest` (or [`BYTES_PER_SHARD`]) bytes: a power of
/// two, 1 to [`MAX_SHARDS`].
fn shard_count(capacity: usize, max_bytes: usize, largest: usize) -> usize {
    let n = (capacity / KEYS_PER_SHARD)
        .min(max_bytes / largest.max(BYTES_PER_SHARD))
        .clamp(1, MAX_SHARDS);
    // The largest power of two not above `n`.
    1 << n.ilog2()
}

/// Counts evictions once the lock is released.
fn count_evictions(n: u64) {
    if n > 0 {
        metrics::counter!(telemetry::MEMORY_EVICTIONS_TOTAL).increment(n);
    }
}

impl MemoryStore {
    /// A store holding at most `capacity` keys, and at most [`DEFAULT_MEMORY_MAX_BYTES`] bytes
    /// (see [`with_max_bytes`](Self::with_max_bytes)).
    pub fn new(capacity: usize) -> Self {
        Self::split(capacity.max(1), DEFAULT_MEMORY_MAX_BYTES, BYTES_PER_SHARD)
    }

    /// An empty store of these limits, split into parts.
    fn split(capacity: usize, max_bytes: usize, largest: usize) -> Self {
        let n = shard_count(capacity, max_bytes, largest);
        Self {
            shards: (0..n).map(|_| Mutex::new(Inner::default())).collect(),
            hasher: foldhash::fast::RandomState::default(),
            capacity,
            max_bytes,
            largest,
            // At least KEYS_PER_SHARD each (n is at most capacity / KEYS_PER_SHARD), and never
            // more than `capacity` together.
            shard_capacity: capacity / n,
            shard_bytes: max_bytes / n,
        }
    }

    /// The same store holding at most about `max_bytes` bytes: keys, fingerprints, owners and
    /// stored answers, plus an estimate of the bookkeeping of each key (256 bytes). A builder:
    /// the store it returns is a new, empty one.
    #[must_use]
    pub fn with_max_bytes(self, max_bytes: usize) -> Self {
        Self::split(self.capacity, max_bytes.max(1), self.largest)
    }

    /// The same store with parts (see the module documentation) of at least `bytes` each, when
    /// it has more than one: fewer, larger parts when the largest answer to be stored is over
    /// 4 MiB. Pass the largest answer with room for its headers and the entry's bookkeeping (the
    /// store built from the configuration passes `max_body_bytes` + 64 KiB); a store built in
    /// code for larger answers should do the same, or an answer larger than its part's share is
    /// refused as [`IdempotencyError::Full`]. A builder: the store it returns is a new, empty one.
    #[must_use]
    pub fn with_largest_answer(self, bytes: usize) -> Self {
        Self::split(self.capacity, self.max_bytes, bytes)
    }

    /// How many keys it holds (expired ones included until dropped by a later claim).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| keel_core::lock(s).table.len())
            .sum()
    }

    /// Whether it holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes it counts against its budget now (an estimate; see
    /// [`with_max_bytes`](Self::with_max_bytes)).
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| keel_core::lock(s).bytes()).sum()
    }

    fn hash(&self, key: &str) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, key)
    }

    /// Which part holds the key of `hash`: bits 32 and up, which a table does not use (it places
    /// keys by the low bits and tags them with the top 7), so each part's keys still spread over
    /// its whole table.
    fn part_of(&self, hash: u64) -> usize {
        usize::try_from(hash >> 32).unwrap_or(0) & (self.shards.len() - 1)
    }

    /// The part that holds the key of `hash`, locked.
    fn lock(&self, hash: u64) -> std::sync::MutexGuard<'_, Inner> {
        keel_core::lock(&self.shards[self.part_of(hash)])
    }

    /// "Full", naming how many claims are in progress in the key's part.
    fn full(g: &Inner) -> IdempotencyError {
        IdempotencyError::Full(g.leases.len())
    }

    fn claim_now(
        &self,
        key: &str,
        owner: &str,
        fp: &str,
        lease: Duration,
    ) -> Result<Claim, IdempotencyError> {
        let now = Instant::now();
        let wall = wall_micros();
        let hash = self.hash(key);
        let mut g = self.lock(hash);
        if let Some(e) = g.get(hash, key) {
            if e.expires > now {
                if *e.fingerprint != *fp {
                    return Ok(Claim::Mismatch);
                }
                return Ok(match &e.state {
                    State::Completed(r) => Claim::Completed(r.clone()),
                    State::InProgress { .. } => Claim::InProgress {
                        retry_after: Some(e.expires - now),
                    },
                });
            }
        }
        // What the key held has expired (or there was nothing): the claim is new.
        let old = g.remove(hash, key).map(|(k, _)| k);
        g.purge_expired(now);
        let size = entry_size(key, fp, owner, 0);
        // Claims in progress are never evicted: when they alone leave no room, refuse without
        // evicting anything.
        if g.leases.len() >= self.shard_capacity
            || g.bytes_in_progress.saturating_add(size) > self.shard_bytes
        {
            return Err(Self::full(&g));
        }
        let mut evicted = 0;
        while g.table.len() >= self.shard_capacity
            || g.bytes().saturating_add(size) > self.shard_bytes
        {
            if !g.evict_one() {
                break;
            }
            evicted += 1;
        }
        g.fence = g.fence.saturating_add(1).max(wall);
        let fence = g.fence;
        let key = old.unwrap_or_else(|| key.into());
        g.insert(
            hash,
            key,
            Entry {
                state: State::InProgress {
                    owner: owner.into(),
                },
                fingerprint: fp.into(),
                expires: now + lease.min(MAX_DURATION),
                fence,
                size,
            },
        );
        drop(g);
        count_evictions(evicted);
        Ok(Claim::New { fence })
    }

    /// Whether `owner` holds `key` in progress with its lease running.
    /// The entry of `key` if `owner` holds it in progress with its lease running.
    fn held<'g>(
        g: &'g Inner,
        hash: u64,
        key: &str,
        owner: &str,
        now: Instant,
    ) -> Option<&'g Entry> {
        g.get(hash, key).filter(|e| {
            matches!(&e.state, State::InProgress { owner: o } if **o == *owner) && e.expires > now
        })
    }

    fn renew_now(&self, key: &str, owner: &str, lease: Duration) -> Ownership {
        let now = Instant::now();
        let hash = self.hash(key);
        let mut g = self.lock(hash);
        if Self::held(&g, hash, key, owner, now).is_none() {
            return Ownership::Stale;
        }
        if let Some((k, mut e)) = g.remove(hash, key) {
            e.expires = now + lease.min(MAX_DURATION);
            g.insert(hash, k, e);
        }
        Ownership::Owner
    }

    fn complete_now(
        &self,
        key: &str,
        owner: &str,
        record: Bytes,
        retention: Duration,
    ) -> Result<Ownership, IdempotencyError> {
        let now = Instant::now();
        let hash = self.hash(key);
        let mut g = self.lock(hash);
        let Some((old_size, fp_len)) =
            Self::held(&g, hash, key, owner, now).map(|e| (e.size, e.fingerprint.len()))
        else {
            return Ok(Ownership::Stale);
        };
        let size = ENTRY_OVERHEAD
            .saturating_add(key.len())
            .saturating_add(fp_len)
            .saturating_add(record.len());
        // Even with every completed answer evicted, this one would not fit beside the claims in
        // progress: refuse, and leave the claim as it was.
        if (g.bytes_in_progress - old_size).saturating_add(size) > self.shard_bytes {
            return Err(Self::full(&g));
        }
        let Some((k, mut e)) = g.remove(hash, key) else {
            return Ok(Ownership::Stale);
        };
        let mut evicted = 0;
        while g.bytes().saturating_add(size) > self.shard_bytes {
            if !g.evict_one() {
                break;
            }
            evicted += 1;
        }
        e.state = State::Completed(record);
        e.expires = now + retention.min(MAX_DURATION);
        e.size = size;
        g.insert(hash, k, e);
        drop(g);
        count_evictions(evicted);
        Ok(Ownership::Owner)
    }

    fn release_now(&self, key: &str, owner: &str) -> Ownership {
        let now = Instant::now();
        let hash = self.hash(key);
        let mut g = self.lock(hash);
        if Self::held(&g, hash, key, owner, now).is_none() {
            return Ownership::Stale;
        }
        g.remove(hash, key);
        Ownership::Owner
    }

    /// Checks that the map, the indices and the byte counts agree (tests).
    #[cfg(test)]
    fn check(&self) {
        for (part, shard) in self.shards.iter().enumerate() {
            self.check_shard(part, &keel_core::lock(shard));
        }
    }

    #[cfg(test)]
    fn check_shard(&self, part: usize, g: &Inner) {
        assert_eq!(g.table.len(), g.leases.len() + g.completed.len());
        let (mut bp, mut bc) = (0, 0);
        for slot in &g.table {
            // Its hash is its key's, and that hash picks this part.
            assert_eq!(slot.hash, self.hash(&slot.key));
            assert_eq!(self.part_of(slot.hash), part);
            let index = if slot.entry.in_progress() {
                bp += slot.entry.size;
                &g.leases
            } else {
                bc += slot.entry.size;
                &g.completed
            };
            assert_eq!(index.get(&slot.entry.index()), Some(&slot.hash));
        }
        assert_eq!((bp, bc), (g.bytes_in_progress, g.bytes_completed));
        assert!(g.table.len() <= self.shard_capacity);
        assert!(g.bytes() <= self.shard_bytes);
    }
}

impl IdempotencyStore for MemoryStore {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        fingerprint: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, IdempotencyError>> {
        let r = self.claim_now(key, owner, fingerprint, lease);
        Box::pin(async move { r })
    }

    fn renew<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>> {
        let r = self.renew_now(key, owner, lease);
        Box::pin(async move { Ok(r) })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        record: Bytes,
        retention: Duration,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>> {
        let r = self.complete_now(key, owner, record, retention);
        Box::pin(async move { r })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>> {
        let r = self.release_now(key, owner);
        Box::pin(async move { Ok(r) })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    };

    use super::*;
    use proptest::prelude::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_large_store_is_split_into_parts_that_each_hold_enough() {
        const MIB: usize = 1 << 20;
        let parts = |keys, bytes, largest| shard_count(keys, bytes, largest);
        assert_eq!(parts(1, 64 * MIB, 0), 1);
        assert_eq!(parts(16_383, 64 * MIB, 0), 1);
        assert_eq!(parts(16_384, 64 * MIB, 0), 2);
        // The defaults: 100,000 keys and 64 MiB, answers up to 1 MiB.
        assert_eq!(parts(100_000, 64 * MIB, MIB), 8);
        assert_eq!(parts(10_000_000, 64 * MIB, MIB), 16);
        assert_eq!(parts(10_000_000, 1 << 40, 0), 16);
        // Bytes bound it too: every part holds 4 MiB, or the largest answer if more.
        assert_eq!(parts(10_000_000, 8 * MIB - 1, 0), 1);
        assert_eq!(parts(10_000_000, 64 * MIB, 20 * MIB), 2);
        assert_eq!(parts(10_000_000, 3 * MIB, 20 * MIB), 1);
        let s = MemoryStore::new(100_000).with_max_bytes(64 * MIB);
        assert_eq!(
            (s.shards.len(), s.shard_capacity, s.shard_bytes),
            (8, 12_500, 8 * MIB)
        );
        let s = s.with_largest_answer(40 * MIB);
        assert_eq!((s.shards.len(), s.shard_bytes), (1, 64 * MIB));
    }

    /// A store of `n` parts of `keys` keys and `bytes` bytes each (smaller than the real minimum,
    /// so that tests can fill one).
    fn in_parts(n: usize, keys: usize, bytes: usize) -> MemoryStore {
        // As `split` makes them: a key's part is picked by a mask.
        assert!(n.is_power_of_two());
        let mut s = MemoryStore::new(1);
        s.shards = (0..n).map(|_| Mutex::new(Inner::default())).collect();
        (s.capacity, s.max_bytes, s.shard_capacity, s.shard_bytes) =
            (n * keys, n * bytes, keys, bytes);
        s
    }

    /// Keys of part `part` of `s`, in order.
    fn keys_of(s: &MemoryStore, part: usize) -> impl Iterator<Item = String> + '_ {
        (0..)
            .map(|i| format!("k{i}"))
            .filter(move |k| s.part_of(s.hash(k)) == part)
    }

    /// Each part keeps to its share: a part full of claims in progress refuses the next claim
    /// of its own keys while the other parts take theirs, and a part evicts its own answers,
    /// never another part's (even when another part's answers would end sooner).
    #[tokio::test(start_paused = true)]
    async fn each_part_keeps_to_its_share() {
        let recorder = Evictions::default();
        let _guard = metrics::set_default_local_recorder(&recorder);
        let s = in_parts(4, 3, 1 << 20);
        let mine: Vec<String> = keys_of(&s, 1).take(5).collect();
        for k in &mine[..3] {
            new(&s, k).await;
        }
        match s.claim(&mine[3], "o", "f", S).await {
            Err(IdempotencyError::Full(3)) => {}
            other => panic!("{other:?}"),
        }
        for part in [0, 2, 3] {
            for k in keys_of(&s, part).take(3) {
                new(&s, &k).await;
            }
        }
        s.check();
        // Part 0's answers end first of all; part 2's later.
        let first: Vec<String> = keys_of(&s, 0).take(3).collect();
        for k in &first {
            done(&s, k, S * 30).await;
        }
        let theirs: Vec<String> = keys_of(&s, 2).take(3).collect();
        for k in &theirs {
            done(&s, k, S * 60).await;
        }
        // Part 2 takes two more keys: it evicts its own two oldest answers, not part 0's.
        for k in keys_of(&s, 2).skip(3).take(2) {
            new(&s, &k).await;
        }
        assert_eq!(recorder.get(), 2);
        let holds = |k: &str| {
            let hash = s.hash(k);
            s.lock(hash).get(hash, k).is_some()
        };
        let kept: Vec<bool> = theirs.iter().map(|k| holds(k)).collect();
        assert_eq!(kept, [false, false, true]);
        for k in first.iter().chain(&theirs[2..]) {
            assert!(matches!(
                s.claim(k, "o2", "f", S).await,
                Ok(Claim::Completed(_))
            ));
        }
        // Part 1 still holds its three claims; part 1's refusal took nothing from the others.
        assert_eq!(s.len(), 12);
        s.check();
    }

    /// In a store of several parts, each part counts its own tokens: a key's tokens grow by one
    /// from its part's last, whatever another part hands out.
    #[tokio::test]
    async fn each_part_counts_its_own_tokens() {
        let s = MemoryStore::new(1 << 17);
        assert_eq!(s.shards.len(), 16);
        let a = keys_of(&s, 3).next().unwrap();
        let other = keys_of(&s, 5).next().unwrap();
        // Part 3's counter far ahead of the clock, as after a burst of claims.
        let ahead = wall_micros() + (1 << 40);
        s.lock(s.hash(&a)).fence = ahead;
        for n in 1..=3 {
            assert_eq!(new(&s, &a).await, ahead + n);
            assert_eq!(s.release(&a, "o").await.unwrap(), Ownership::Owner);
        }
        // Part 5 still follows the clock.
        assert!(new(&s, &other).await < ahead);
    }

    /// Built from the configuration, every part can hold the largest answer the body limit
    /// allows: a 20 MiB answer is stored in a store of 100,000 keys and 64 MiB (which, split
    /// into the 8 parts of 8 MiB the limits alone give, could not hold it).
    #[tokio::test]
    async fn the_store_built_from_the_configuration_holds_the_largest_answer() {
        let cfg = crate::IdempotencyConfig {
            max_body_bytes: 20 << 20,
            memory_capacity: 100_000,
            memory_max_bytes: 64 << 20,
            ..crate::IdempotencyConfig::default()
        };
        let store = crate::store::store_from_config(&cfg).await.unwrap();
        assert!(matches!(
            store.claim("big", "o", "f", S).await,
            Ok(Claim::New { .. })
        ));
        let answer = Bytes::from(vec![7u8; 20 << 20]);
        assert_eq!(
            store.complete("big", "o", answer, S).await.unwrap(),
            Ownership::Owner
        );
        let small = MemoryStore::new(100_000).with_max_bytes(64 << 20);
        assert!(small.shards.len() > 1);
        new(&small, "big").await;
        assert!(matches!(
            small
                .complete("big", "o", Bytes::from(vec![7u8; 20 << 20]), S)
                .await,
            Err(IdempotencyError::Full(_))
        ));
    }

    async fn new(s: &MemoryStore, key: &str) -> u64 {
        match s.claim(key, "o", "f", S).await {
            Ok(Claim::New { fence }) => fence,
            other => panic!("{key}: {other:?}"),
        }
    }

    async fn done(s: &MemoryStore, key: &str, ttl: Duration) {
        let r = s.complete(key, "o", Bytes::from(key.to_owned()), ttl).await;
        assert_eq!(r.unwrap(), Ownership::Owner, "{key}");
    }

    /// Counts `keel_idempotency_memory_evictions_total` (thread-local: current-thread tests).
    #[derive(Default)]
    struct Evictions(Arc<AtomicU64>);

    impl Evictions {
        fn get(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl metrics::Recorder for Evictions {
        fn describe_counter(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_gauge(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_histogram(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn register_counter(
            &self,
            key: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Counter {
            if key.name() == telemetry::MEMORY_EVICTIONS_TOTAL {
                metrics::Counter::from_arc(self.0.clone())
            } else {
                metrics::Counter::noop()
            }
        }
        fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
            metrics::Gauge::noop()
        }
        fn register_histogram(
            &self,
            _: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Histogram {
            metrics::Histogram::noop()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_and_evicts_expired() {
        let rec = Evictions::default();
        let _g = metrics::set_default_local_recorder(&rec);
        let s = MemoryStore::new(2);
        new(&s, "a").await;
        new(&s, "b").await;
        assert!(matches!(
            s.claim("c", "o", "f", S).await,
            Err(IdempotencyError::Full(2))
        ));
        tokio::time::advance(2 * S).await;
        new(&s, "c").await;
        assert_eq!(s.len(), 1);
        assert_eq!(rec.get(), 0, "expired entries are not evictions");
        s.check();
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_store_evicts_the_completed_answer_nearest_its_end() {
        let rec = Evictions::default();
        let _g = metrics::set_default_local_recorder(&rec);
        let s = MemoryStore::new(3);
        for (k, ttl) in [("a", 30), ("b", 10), ("c", 20)] {
            new(&s, k).await;
            done(&s, k, Duration::from_secs(ttl)).await;
        }
        // Full of completed answers: a new key still runs, and "b" (ends first) makes room.
        new(&s, "d").await;
        assert_eq!(rec.get(), 1);
        assert_eq!(s.len(), 3);
        for k in ["a", "c"] {
            assert!(matches!(
                s.claim(k, "o2", "f", S).await,
                Ok(Claim::Completed(_))
            ));
        }
        // The evicted key is forgotten: it can execute again (and evicts "c" to do so).
        new(&s, "b").await;
        assert_eq!(rec.get(), 2);
        assert!(matches!(
            s.claim("a", "o2", "f", S).await,
            Ok(Claim::Completed(_))
        ));
        s.check();
    }

    #[tokio::test(start_paused = true)]
    async fn claims_in_progress_are_never_evicted() {
        let rec = Evictions::default();
        let _g = metrics::set_default_local_recorder(&rec);
        let s = MemoryStore::new(2);
        new(&s, "a").await;
        new(&s, "b").await;
        done(&s, "a", S * 60).await;
        new(&s, "c").await;
        assert_eq!(rec.get(), 1, "a (completed) made room");
        // Only claims in progress now: refused, typed, retryable, a store failure (503).
        let e = s.claim("d", "o", "f", S).await.unwrap_err();
        assert!(matches!(e, IdempotencyError::Full(2)), "{e:?}");
        assert!(e.is_retryable() && e.is_store_failure());
        assert_eq!(rec.get(), 1);
        // Both claims are intact: their owners renew and complete them.
        for k in ["b", "c"] {
            assert_eq!(s.renew(k, "o", S).await.unwrap(), Ownership::Owner);
            done(&s, k, S * 60).await;
        }
        s.check();
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_in_bytes_too() {
        let rec = Evictions::default();
        let _g = metrics::set_default_local_recorder(&rec);
        let one = entry_size("k0", "f", "", 1000);
        let s = MemoryStore::new(1000).with_max_bytes(3 * one);
        for i in 0..3 {
            let k = format!("k{i}");
            new(&s, &k).await;
            s.complete(&k, "o", Bytes::from(vec![0; 1000]), S * 60)
                .await
                .unwrap();
        }
        assert_eq!(rec.get(), 0);
        new(&s, "k3").await;
        assert_eq!(rec.get(), 1, "a claim past the byte budget evicts");
        s.complete("k3", "o", Bytes::from(vec![0; 1000]), S * 60)
            .await
            .unwrap();
        assert!(s.bytes() <= 3 * one);
        assert_eq!(s.len(), 3);
        // An answer that cannot fit even with every completed answer gone is refused, and its
        // claim stays as it was.
        new(&s, "huge").await;
        let e = s
            .complete("huge", "o", Bytes::from(vec![0; 4 * one]), S * 60)
            .await
            .unwrap_err();
        assert!(matches!(e, IdempotencyError::Full(_)), "{e:?}");
        assert_eq!(s.release("huge", "o").await.unwrap(), Ownership::Owner);
        s.check();
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewed_lease_is_not_dropped_at_its_first_end() {
        let s = MemoryStore::new(2);
        new(&s, "a").await;
        tokio::time::advance(S / 2).await;
        assert_eq!(s.renew("a", "o", S).await.unwrap(), Ownership::Owner);
        tokio::time::advance(S * 7 / 10).await;
        // The lease first ended 200ms ago; renewed, it runs 300ms more.
        new(&s, "b").await;
        done(&s, "a", S).await;
        s.check();
    }

    #[tokio::test(start_paused = true)]
    async fn lease_expiry_makes_owner_stale() {
        let s = MemoryStore::new(10);
        let l = Duration::from_secs(1);
        let Ok(Claim::New { fence: f1 }) = s.claim("k", "o1", "f", l).await else {
            panic!()
        };
        tokio::time::advance(Duration::from_millis(1500)).await;
        let Ok(Claim::New { fence: f2 }) = s.claim("k", "o2", "f", l).await else {
            panic!()
        };
        assert!(f2 > f1);
        assert_eq!(
            s.complete("k", "o1", Bytes::from_static(b"x"), l)
                .await
                .unwrap(),
            Ownership::Stale
        );
        assert_eq!(
            s.complete("k", "o2", Bytes::from_static(b"y"), l)
                .await
                .unwrap(),
            Ownership::Owner
        );
        s.check();
    }

    fn wall_micros_now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64
    }

    /// A restarted process starts a new, empty memory store. Its fencing tokens must still be
    /// above the ones the old store handed out: a downstream that remembers the highest token it
    /// saw for a key would otherwise refuse every new owner of it (Redis's tokens continue from
    /// the server's clock for the same reason).
    #[tokio::test(start_paused = true)]
    async fn fences_keep_growing_across_a_restart() {
        let before = MemoryStore::new(10);
        let mut last = 0;
        for _ in 0..3 {
            let f = new(&before, "k").await;
            assert!(f > last);
            last = f;
            assert_eq!(before.release("k", "o").await.unwrap(), Ownership::Owner);
        }
        drop(before);
        // A restart takes longer than the wall clock needs to pass the last token.
        while wall_micros_now() <= last {
            std::hint::spin_loop();
        }
        let after = MemoryStore::new(10);
        let f = new(&after, "k").await;
        assert!(f > last, "{f} after {last}");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Claim(u8, u8),
        Renew(u8, u8),
        Complete(u8, u8, u16, u8),
        Release(u8, u8),
        Advance(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..12u8, 0..3u8).prop_map(|(k, o)| Op::Claim(k, o)),
            (0..12u8, 0..3u8).prop_map(|(k, o)| Op::Renew(k, o)),
            (0..12u8, 0..3u8, 0..3000u16, 1..20u8)
                .prop_map(|(k, o, n, t)| Op::Complete(k, o, n, t)),
            (0..12u8, 0..3u8).prop_map(|(k, o)| Op::Release(k, o)),
            (0..3000u16).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Any sequence of operations keeps the indices, byte counts and bounds consistent, and
        /// never evicts a claim in progress: its owner can always complete it within its lease.
        #[test]
        fn bookkeeping_holds(ops in proptest::collection::vec(op(), 1..200), parts in proptest::bool::ANY) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async {
                let bytes = 4 * entry_size("k00", "f", "o0", 1500);
                // One part, or two of half each.
                let s = if parts {
                    in_parts(2, 3, bytes / 2)
                } else {
                    MemoryStore::new(6).with_max_bytes(bytes)
                };
                // What each key's owner believes it holds, and until when.
                let mut held: std::collections::HashMap<String, (String, Instant)> =
                    std::collections::HashMap::new();
                for op in ops {
                    let now = Instant::now();
                    match op {
                        Op::Claim(k, o) => {
                            let (k, o) = (format!("k{k:02}"), format!("o{o}"));
                            if let Ok(Claim::New { .. }) = s.claim(&k, &o, "f", S).await {
                                held.insert(k, (o, now + S));
                            }
                        }
                        Op::Renew(k, o) => {
                            let (k, o) = (format!("k{k:02}"), format!("o{o}"));
                            if s.renew(&k, &o, S).await.unwrap() == Ownership::Owner {
                                held.insert(k, (o, now + S));
                            }
                        }
                        Op::Complete(k, o, n, t) => {
                            let (k, o) = (format!("k{k:02}"), format!("o{o}"));
                            let live = held.get(&k).is_some_and(|(h, end)| *h == o && *end > now);
                            let r = s.complete(&k, &o, Bytes::from(vec![0; usize::from(n)]), S * u32::from(t)).await;
                            match r {
                                Ok(Ownership::Owner) => { prop_assert!(live); held.remove(&k); }
                                Ok(Ownership::Stale) => prop_assert!(!live, "a live claim was lost"),
                                Err(_) => prop_assert!(live),
                            }
                        }
                        Op::Release(k, o) => {
                            let (k, o) = (format!("k{k:02}"), format!("o{o}"));
                            let live = held.get(&k).is_some_and(|(h, end)| *h == o && *end > now);
                            let r = s.release(&k, &o).await.unwrap();
                            prop_assert_eq!(r == Ownership::Owner, live);
                            if live { held.remove(&k); }
                        }
                        Op::Advance(ms) => tokio::time::advance(Duration::from_millis(u64::from(ms))).await,
                    }
                    s.check();
                }
                Ok(())
            })?;
        }
    }
}
