//! The retry budget, after Finagle's `RetryBudget` and tower's `TpsBudget`.
//!
//! Why a budget and not only `max_attempts`: with 3 attempts per request, a failing upstream sees
//! three times the load exactly when it can least take it (a retry storm). A budget caps retries
//! at a share of *requests* (default 20%) over a sliding window (10 s), so the worst-case
//! amplification is 1.2x however many attempts a single request may make; a small floor of
//! retries per second keeps low-traffic clients able to retry at all. Hedges draw from the same
//! budget.
//!
//! Accounting: every request deposits 1; a retry is paid either from this second's floor
//! (`min_per_second`) or from the window's ratio pool (`ratio * deposits - ratio-paid retries`).
//! Hence, over T seconds, retries <= ratio * requests + min_per_second * T.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use keel_core::Live;
use tokio::time::Instant;

use crate::{config::RetryConfig, error::ResilienceError};

#[derive(Debug, Default, Clone, Copy)]
struct Bucket {
    sec: u64,
    deposits: u64,
    from_ratio: u64,
    from_floor: u64,
}

/// A shared retry budget, read against a live [`RetryConfig`].
#[derive(Debug)]
pub struct RetryBudget {
    policy: Live<RetryConfig>,
    buckets: Mutex<VecDeque<Bucket>>,
    base: Instant,
    /// Deposits of second `pending_sec` not yet folded into the buckets: a deposit is one
    /// atomic add on the hot path; the lock is taken once per second, or when paying a retry.
    pending: AtomicU64,
    pending_sec: AtomicU64,
    /// Deposits folded into the buckets since the start (changed under the buckets' lock).
    folded: AtomicU64,
}

impl RetryBudget {
    /// A budget following `policy`'s `budget_ratio`, `min_per_second` and `budget_window`.
    pub fn new(policy: Live<RetryConfig>) -> Self {
        Self::with_base(policy, Instant::now())
    }

    /// As [`new`](Self::new), with its seconds counted from `base` (shared with the caller, which
    /// can then pass [`deposit_since`](Self::deposit_since) a reading relative to it).
    pub(crate) fn with_base(policy: Live<RetryConfig>, base: Instant) -> Self {
        Self {
            policy,
            buckets: Mutex::new(VecDeque::new()),
            base,
            pending: AtomicU64::new(0),
            pending_sec: AtomicU64::new(0),
            folded: AtomicU64::new(0),
        }
    }

    fn sec(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_secs()
    }

    fn with<R>(&self, f: impl FnOnce(&mut VecDeque<Bucket>, &RetryConfig) -> R) -> R {
        self.with_at(Instant::now(), f)
    }

    fn with_at<R>(
        &self,
        at: Instant,
        f: impl FnOnce(&mut VecDeque<Bucket>, &RetryConfig) -> R,
    ) -> R {
        let cfg = self.policy.load();
        let now = self.sec(at);
        let window = cfg.budget_window.as_secs().max(1);
        let mut b = keel_core::lock(&self.buckets);
        // Fold the pending deposits into their second, and move the fast path to this one.
        let psec = self.pending_sec.swap(now, Ordering::AcqRel);
        let n = self.pending.swap(0, Ordering::AcqRel);
        if n > 0 {
            self.folded.fetch_add(n, Ordering::Relaxed);
            match b.back_mut() {
                Some(l) if l.sec >= psec => l.deposits += n,
                _ => b.push_back(Bucket {
                    sec: psec,
                    deposits: n,
                    ..Bucket::default()
                }),
            }
        }
        while b.front().is_some_and(|f| f.sec + window <= now) {
            b.pop_front();
        }
        if b.back().is_none_or(|l| l.sec != now) {
            b.push_back(Bucket {
                sec: now,
                ..Bucket::default()
            });
        }
        f(&mut b, &cfg)
    }

    /// Requests deposited since the budget was made. Never decreases: the count folded under
    /// the lock plus this second's, which only grows until the next fold (under the same lock).
    pub fn requests(&self) -> u64 {
        let _folding = keel_core::lock(&self.buckets);
        self.folded.load(Ordering::Relaxed) + self.pending.load(Ordering::Acquire)
    }

    /// Counts one request.
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// Counts one request made at `at` (saves a clock read when the caller has one).
    pub fn deposit_at(&self, at: Instant) {
        self.deposit_since(at.saturating_duration_since(self.base));
    }

    /// As [`deposit_at`](Self::deposit_at), with the time since this budget's base.
    pub(crate) fn deposit_since(&self, since: std::time::Duration) {
        if self.pending_sec.load(Ordering::Acquire) == since.as_secs() {
            self.pending.fetch_add(1, Ordering::AcqRel);
            return;
        }
        self.with_at(self.base + since, |b, _| {
            if let Some(l) = b.back_mut() {
                l.deposits += 1;
                // Straight into its bucket, under the lock: counted as folded.
                self.folded.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    /// Pays for one retry or hedge, or says the budget is spent.
    pub fn try_withdraw(&self) -> Result<(), ResilienceError> {
        self.with(|b, cfg| {
            let (deposits, from_ratio) = b
                .iter()
                .fold((0u64, 0u64), |(d, r), x| (d + x.deposits, r + x.from_ratio));
            let Some(last) = b.back_mut() else {
                return Err(ResilienceError::BudgetExhausted);
            };
            if last.from_floor < cfg.min_per_second as u64 {
                last.from_floor += 1;
                return Ok(());
            }
            if (deposits as f64 * cfg.budget_ratio.get()) - from_ratio as f64 >= 1.0 {
                last.from_ratio += 1;
                return Ok(());
            }
            Err(ResilienceError::BudgetExhausted)
        })
    }

    /// Retries the budget could pay for now (for metrics and tests).
    pub fn balance(&self) -> u64 {
        self.with(|b, cfg| {
            let (d, r) = b
                .iter()
                .fold((0u64, 0u64), |(d, r), x| (d + x.deposits, r + x.from_ratio));
            let floor = b
                .back()
                .map(|l| (cfg.min_per_second as u64).saturating_sub(l.from_floor))
                .unwrap_or(0);
            floor + ((d as f64 * cfg.budget_ratio.get()) - r as f64).max(0.0) as u64
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    /// Every deposit is counted, whether it lands in this second's fast path or starts a new
    /// second (and whether retries were paid in between).
    #[tokio::test(start_paused = true)]
    async fn requests_counts_every_deposit() {
        let b = RetryBudget::new(Live::new(RetryConfig::default()));
        for i in 0..5u64 {
            b.deposit();
            assert_eq!(b.requests(), 3 * i + 1);
            b.deposit();
            b.deposit();
            if i % 2 == 0 {
                let _ = b.try_withdraw();
            }
            assert_eq!(b.requests(), 3 * i + 3);
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
    }

    proptest! {
        #[test]
        fn retries_never_exceed_ratio_plus_floor(reqs in proptest::collection::vec(0u32..50, 1..30), ratio in 0u32..=100, floor in 0u32..20) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            rt.block_on(async {
                let cfg = RetryConfig {
                    budget_ratio: keel_core::Ratio::new(ratio as f64 / 100.0).unwrap(),
                    min_per_second: floor,
                    ..Default::default()
                };
                let b = RetryBudget::new(Live::new(cfg));
                let (mut total_req, mut total_retry) = (0u64, 0u64);
                for n in &reqs {
                    for _ in 0..*n {
                        b.deposit();
                        total_req += 1;
                        // Every request wants 2 retries.
                        for _ in 0..2 {
                            if b.try_withdraw().is_ok() { total_retry += 1; }
                        }
                    }
                    tokio::time::advance(Duration::from_secs(1)).await;
                }
                let bound = (ratio as f64 / 100.0) * total_req as f64 + (floor as u64 * reqs.len() as u64) as f64;
                assert!(total_retry as f64 <= bound + 1e-9, "{total_retry} > {bound}");
            });
        }
    }
}
