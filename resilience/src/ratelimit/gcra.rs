//! Local GCRA: one `AtomicU64` per key, updated with a compare-and-swap.
//!
//! GCRA (the Generic Cell Rate Algorithm of ATM networks, ITU-T I.371; see also Brandur Leach,
//! "Rate limiting, cells, and GCRA") keeps a single number per key, the *theoretical arrival
//! time* (TAT) of the next call. With emission interval `T = 1 / rate` and tolerance
//! `tau = burst * T`, a call at `now` is allowed iff `max(TAT, now) + T - now <= tau`, and then
//! `TAT = max(TAT, now) + T`. One number, no refill timer, exact: it is a leaky bucket without
//! the bucket.
//!
//! Why not `governor`: its quota is fixed when the limiter is built; changing the rate means a new
//! limiter and forgetting every key's state. Here `T` and `tau` are read from the live policy on
//! every decision and the TAT (how far ahead of its allowance a key is) carries over, so a reload
//! takes effect on the next call without granting a fresh burst to everyone.
//!
//! Memory is bounded by `max_keys`: when the map is full, keys whose TAT has passed (which are
//! indistinguishable from absent keys) are swept; if it is still full, new keys share one
//! overflow cell, which errs on the side of limiting.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        RwLock,
    },
    time::Duration,
};

use tokio::time::Instant;

/// A rate limit decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the call may go.
    pub allowed: bool,
    /// Calls still allowed at once after this one.
    pub remaining: u64,
    /// If refused, how long until a call would be allowed.
    pub retry_after: Duration,
    /// How long until the key is back to its full burst.
    pub reset: Duration,
}

/// The parameters of one decision, from the live policy.
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    /// Emission interval in nanoseconds (1 / rate).
    pub t_ns: u64,
    /// Burst tolerance in nanoseconds (burst * T).
    pub tau_ns: u64,
}

impl Quota {
    /// A quota of `rate` calls per second with `burst` at once.
    pub fn new(rate: f64, burst: u32) -> Self {
        let t_ns = (1e9 / rate.max(1e-9)).clamp(1.0, 1e18) as u64;
        Self {
            t_ns,
            tau_ns: t_ns.saturating_mul(burst.max(1) as u64),
        }
    }
}

/// The GCRA step for one cell (the TAT, in ns since `base`): `Ok(ahead)` when the call is
/// admitted (the TAT moved; `ahead` = new TAT less now), `Err((ahead, start))` when it is not.
#[inline]
fn step(cell: &AtomicU64, now: u64, q: Quota) -> Result<u64, (u64, u64)> {
    let mut tat = cell.load(Ordering::Acquire);
    loop {
        let start = tat.max(now);
        let new_tat = start.saturating_add(q.t_ns);
        let ahead = new_tat - now;
        if ahead > q.tau_ns {
            return Err((ahead, start));
        }
        match cell.compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Ok(ahead),
            Err(actual) => tat = actual,
        }
    }
}

/// Decides for one cell, with what the RateLimit headers say.
pub(crate) fn decide(cell: &AtomicU64, now: u64, q: Quota) -> Decision {
    match step(cell, now, q) {
        Ok(ahead) => Decision {
            allowed: true,
            // A quota built field by field may hold a zero interval (`Quota::new` never does).
            remaining: (q.tau_ns - ahead) / q.t_ns.max(1),
            retry_after: Duration::ZERO,
            reset: Duration::from_nanos(ahead),
        },
        Err((ahead, start)) => Decision {
            allowed: false,
            remaining: 0,
            retry_after: Duration::from_nanos(ahead - q.tau_ns),
            reset: Duration::from_nanos(start - now),
        },
    }
}

/// Admits a call on one cell, or says how long until one would be: the same decision as
/// [`decide`], without the figures only response headers need (a division less).
pub(crate) fn admit(cell: &AtomicU64, now: u64, q: Quota) -> Result<(), Duration> {
    match step(cell, now, q) {
        Ok(_) => Ok(()),
        Err((ahead, _)) => Err(Duration::from_nanos(ahead - q.tau_ns)),
    }
}

/// A keyed, lock-free (per decision) GCRA limiter with bounded memory.
#[derive(Debug)]
pub struct LocalGcra {
    base: Instant,
    global: AtomicU64,
    overflow: AtomicU64,
    keys: RwLock<HashMap<Box<str>, AtomicU64>>,
}

impl Default for LocalGcra {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalGcra {
    /// An empty limiter.
    pub fn new() -> Self {
        Self::with_base(Instant::now())
    }

    /// An empty limiter whose clock starts at `base` (shared with the caller, which can then
    /// pass [`check_since`](Self::check_since) a reading it already made relative to it).
    pub(crate) fn with_base(base: Instant) -> Self {
        Self {
            base,
            global: AtomicU64::new(0),
            overflow: AtomicU64::new(0),
            keys: RwLock::new(HashMap::new()),
        }
    }

    /// Decides for `key` (`""` is the global key and takes no map lookup).
    pub fn check(&self, key: &str, q: Quota, max_keys: usize) -> Decision {
        self.check_at(key, q, max_keys, Instant::now())
    }

    /// As [`check`](Self::check), with the caller's clock reading (`at`).
    pub fn check_at(&self, key: &str, q: Quota, max_keys: usize, at: Instant) -> Decision {
        self.check_since(key, q, max_keys, self.since(at))
    }

    /// The time from this limiter's base to `at`.
    pub(crate) fn since(&self, at: Instant) -> std::time::Duration {
        at.saturating_duration_since(self.base)
    }

    /// As [`check_at`](Self::check_at), with the time since this limiter's base.
    pub(crate) fn check_since(
        &self,
        key: &str,
        q: Quota,
        max_keys: usize,
        since: std::time::Duration,
    ) -> Decision {
        let now = since.as_nanos() as u64;
        self.with_cell(key, max_keys, now, |cell| decide(cell, now, q))
    }

    /// As [`check_since`](Self::check_since), for a caller that needs only the verdict and,
    /// when refused, the time until a call would be admitted.
    pub(crate) fn admit_since(
        &self,
        key: &str,
        q: Quota,
        max_keys: usize,
        since: std::time::Duration,
    ) -> Result<(), Duration> {
        let now = since.as_nanos() as u64;
        self.with_cell(key, max_keys, now, |cell| admit(cell, now, q))
    }

    /// Runs `f` on the cell of `key` (`""`: the global one; over `max_keys`, after dropping
    /// idle keys: the shared overflow cell), made if new.
    #[inline]
    fn with_cell<R>(
        &self,
        key: &str,
        max_keys: usize,
        now: u64,
        f: impl FnOnce(&AtomicU64) -> R,
    ) -> R {
        if key.is_empty() {
            return f(&self.global);
        }
        {
            let map = match self.keys.read() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if let Some(cell) = map.get(key) {
                return f(cell);
            }
        }
        let mut map = match self.keys.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if !map.contains_key(key) && map.len() >= max_keys {
            map.retain(|_, tat| tat.load(Ordering::Acquire) > now);
            if map.len() >= max_keys {
                return f(&self.overflow);
            }
        }
        let cell = map
            .entry(Box::from(key))
            .or_insert_with(|| AtomicU64::new(0));
        f(cell)
    }

    /// Keys tracked now.
    pub fn keys(&self) -> usize {
        self.keys.read().map(|m| m.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_quota_of_zeros_built_by_hand_decides_without_panicking() {
        let g = LocalGcra::new();
        let zero = Quota { t_ns: 0, tau_ns: 0 };
        for _ in 0..3 {
            let d = g.check("k", zero, 10);
            assert!(d.allowed);
            assert_eq!(d.remaining, 0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn within_one_percent_over_10_000_decisions() {
        let g = LocalGcra::new();
        let q = Quota::new(1000.0, 10);
        // Offer 2000/s for 10,000 decisions (5 s): about 5000 + burst allowed.
        let mut allowed = 0u64;
        for _ in 0..10_000 {
            if g.check("", q, 10).allowed {
                allowed += 1;
            }
            tokio::time::advance(Duration::from_micros(500)).await;
        }
        let expected = 1000.0 * 5.0 + 10.0;
        let err = (allowed as f64 - expected).abs() / expected;
        assert!(err <= 0.01, "allowed {allowed}, expected {expected}");
    }

    #[tokio::test(start_paused = true)]
    async fn per_key_memory_is_bounded() {
        let g = LocalGcra::new();
        let q = Quota::new(10.0, 1);
        for i in 0..10_000 {
            let _ = g.check(&format!("tenant-{i}"), q, 100);
            assert!(g.keys() <= 100);
        }
        // After the keys' TATs pass, new keys get their own cells again.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(g.check("fresh", q, 100).allowed);
        assert_eq!(g.keys(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_change_keeps_state() {
        let g = LocalGcra::new();
        let fast = Quota::new(100.0, 5);
        for _ in 0..5 {
            assert!(g.check("k", fast, 10).allowed);
        }
        assert!(!g.check("k", fast, 10).allowed);
        // A slower quota keeps how far ahead the key is (50 ms of the new 500 ms tolerance
        // used), so it gets 4 more calls where a fresh key gets the whole burst of 5.
        let slow = Quota::new(10.0, 5);
        let k = (0..10).filter(|_| g.check("k", slow, 10).allowed).count();
        let fresh = (0..10).filter(|_| g.check("new", slow, 10).allowed).count();
        assert_eq!((k, fresh), (4, 5));
    }

    proptest! {
        #[test]
        fn never_more_than_rate_times_time_plus_burst(rate in 1u32..10_000, burst in 1u32..100, gaps in proptest::collection::vec(0u64..5_000_000, 1..500)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            rt.block_on(async {
                let g = LocalGcra::new();
                let q = Quota::new(rate as f64, burst);
                let start = Instant::now();
                let mut allowed = 0u64;
                for gap in gaps {
                    if g.check("", q, 1).allowed { allowed += 1; }
                    tokio::time::advance(Duration::from_nanos(gap)).await;
                }
                let secs = (Instant::now() - start).as_secs_f64();
                let bound = rate as f64 * secs + burst as f64 + 1.0;
                assert!(allowed as f64 <= bound, "{allowed} > {bound}");
            });
        }

        /// `admit` (the client stack's verdict-only path) decides exactly as `decide`.
        #[test]
        fn admit_agrees_with_decide(rate in 1u32..10_000, burst in 1u32..100, gaps in proptest::collection::vec(0u64..5_000_000, 1..300)) {
            let q = Quota::new(rate as f64, burst);
            let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
            let mut now = 0u64;
            for gap in gaps {
                let d = decide(&a, now, q);
                let r = admit(&b, now, q);
                prop_assert_eq!(d.allowed, r.is_ok());
                if let Err(wait) = r {
                    prop_assert_eq!(wait, d.retry_after);
                }
                now += gap;
            }
        }
    }
}
