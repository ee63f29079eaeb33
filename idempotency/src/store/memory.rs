//! The embedded default store: one process, no network.
//!
//! Same semantics as Redis (atomic claim, owner-checked writes, fencing, lease and retention
//! TTLs), on `tokio::time` so tests can pause and advance the clock. It is bounded: when full it
//! first drops expired entries (one sweep per 100 ms at most, as a sweep walks every entry under
//! the lock); if every entry is still live it refuses new claims with
//! [`IdempotencyError::Full`] (a 503) rather than forget a completed key, because forgetting is
//! exactly the silent double execution this crate exists to prevent.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use keel_core::units::MAX_DURATION;
use tokio::time::Instant;

use super::{BoxFuture, Claim, IdempotencyStore, Ownership};
use crate::IdempotencyError;

enum State {
    InProgress { owner: String },
    Completed(Bytes),
}

struct Entry {
    state: State,
    fingerprint: String,
    expires: Instant,
}

/// An in-process [`IdempotencyStore`]: bounded, TTL-evicting.
pub struct MemoryStore {
    entries: Mutex<HashMap<String, Entry>>,
    capacity: usize,
    fence: AtomicU64,
    last_sweep: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// A store holding at most `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            fence: AtomicU64::new(0),
            last_sweep: Mutex::new(None),
        }
    }

    /// How many keys it holds (expired ones included until swept).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether it holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        keel_core::lock(&self.entries)
    }

    fn claim_now(
        &self,
        key: &str,
        owner: &str,
        fp: &str,
        lease: Duration,
    ) -> Result<Claim, IdempotencyError> {
        let now = Instant::now();
        let mut map = self.lock();
        if let Some(e) = map.get(key) {
            if e.expires > now {
                if e.fingerprint != fp {
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
        if map.len() >= self.capacity && !map.contains_key(key) {
            // A sweep is O(n) under the lock: at most one per 100ms while full, so an overloaded
            // store answers `Full` quickly instead of sweeping on every claim.
            let mut last = keel_core::lock(&self.last_sweep);
            if last.is_none_or(|t| now.duration_since(t) >= Duration::from_millis(100)) {
                *last = Some(now);
                map.retain(|_, e| e.expires > now);
            }
            if map.len() >= self.capacity {
                return Err(IdempotencyError::Full(map.len()));
            }
        }
        let fence = self.fence.fetch_add(1, Ordering::Relaxed) + 1;
        map.insert(
            key.to_owned(),
            Entry {
                state: State::InProgress {
                    owner: owner.to_owned(),
                },
                fingerprint: fp.to_owned(),
                expires: now + lease.min(MAX_DURATION),
            },
        );
        Ok(Claim::New { fence })
    }

    /// Runs `f` on the entry if `owner` holds it in progress and its lease has not run out.
    fn if_owner(
        &self,
        key: &str,
        owner: &str,
        f: impl FnOnce(&mut HashMap<String, Entry>, Instant),
    ) -> Ownership {
        let now = Instant::now();
        let mut map = self.lock();
        let held = matches!(
            map.get(key),
            Some(Entry { state: State::InProgress { owner: o }, expires, .. }) if o == owner && *expires > now
        );
        if held {
            f(&mut map, now);
            Ownership::Owner
        } else {
            Ownership::Stale
        }
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
        let r = self.if_owner(key, owner, |m, now| {
            if let Some(e) = m.get_mut(key) {
                e.expires = now + lease.min(MAX_DURATION);
            }
        });
        Box::pin(async move { Ok(r) })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        record: Bytes,
        retention: Duration,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>> {
        let r = self.if_owner(key, owner, |m, now| {
            if let Some(e) = m.get_mut(key) {
                e.state = State::Completed(record);
                e.expires = now + retention.min(MAX_DURATION);
            }
        });
        Box::pin(async move { Ok(r) })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>> {
        let r = self.if_owner(key, owner, |m, _| {
            m.remove(key);
        });
        Box::pin(async move { Ok(r) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bounded_and_evicts_expired() {
        let s = MemoryStore::new(2);
        let l = Duration::from_secs(1);
        assert!(matches!(
            s.claim("a", "o", "f", l).await,
            Ok(Claim::New { .. })
        ));
        assert!(matches!(
            s.claim("b", "o", "f", l).await,
            Ok(Claim::New { .. })
        ));
        assert!(matches!(
            s.claim("c", "o", "f", l).await,
            Err(IdempotencyError::Full(2))
        ));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(matches!(
            s.claim("c", "o", "f", l).await,
            Ok(Claim::New { .. })
        ));
        assert_eq!(s.len(), 1);
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
    }
}
