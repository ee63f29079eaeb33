//! The lease watchdog, and what the handler is given: its fencing token and a signal that its
//! lease was lost.
//!
//! A lease (Redisson's "watchdog" pattern) lets a key outlive slow processing without holding it
//! forever after a crash: the claim holds the key for `lease`, and while the handler runs the
//! watchdog renews it every `lease / 3`, so two renewals may fail before it runs out. When a
//! renewal finds the key held by someone else, or renewals keep failing until the next one would
//! come too late, the watchdog cancels [`LeaseLost`]: the handler should stop, and its completion
//! will be refused as a stale owner. A process paused longer than its lease (GC, SIGSTOP, a VM
//! migration) cannot notice in time; that is what the [`FencingToken`] is for.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{
    store::{IdempotencyStore, Ownership},
    telemetry,
};

/// The fencing token of this execution (request extension, and given to function-API closures).
///
/// It grows with every claim of a key. Send it with downstream writes, and have the downstream
/// refuse a token lower than the highest it has seen for the key: a stale owner's late write is
/// then rejected even if it outlived its lease unnoticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

/// Cancelled when this execution lost its lease (request extension). Its result will not be
/// stored; stop work that is not yet committed.
#[derive(Debug, Clone, Default)]
pub struct LeaseLost(CancellationToken);

impl LeaseLost {
    /// Whether the lease is lost.
    pub fn is_lost(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves when the lease is lost.
    pub async fn lost(&self) {
        self.0.cancelled().await;
    }

    /// The underlying token, e.g. for `tokio::select!` or child tokens.
    pub fn token(&self) -> &CancellationToken {
        &self.0
    }
}

/// Renews a lease until dropped.
pub(crate) struct Watchdog {
    stop: CancellationToken,
    pub(crate) lost: LeaseLost,
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Watchdog {
    pub(crate) fn spawn(
        store: Arc<dyn IdempotencyStore>,
        key: String,
        owner: String,
        lease: Duration,
    ) -> Self {
        let stop = CancellationToken::new();
        let lost = LeaseLost::default();
        let every = (lease / 3).max(Duration::from_millis(1));
        let (stop2, lost2) = (stop.clone(), lost.clone());
        tokio::spawn(async move {
            let mut last_ok = Instant::now();
            loop {
                tokio::select! {
                    _ = stop2.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let r = tokio::select! {
                    _ = stop2.cancelled() => return,
                    r = tokio::time::timeout(every, store.renew(&key, &owner, lease)) => r,
                };
                match r {
                    Ok(Ok(Ownership::Owner)) => {
                        telemetry::renewal("ok");
                        last_ok = Instant::now();
                    }
                    Ok(Ok(Ownership::Stale)) => {
                        telemetry::renewal("lost");
                        warn!(
                            key = crate::key::short(&key),
                            "idempotency lease lost: key taken over or expired"
                        );
                        lost2.0.cancel();
                        return;
                    }
                    Ok(Err(_)) | Err(_) => {
                        telemetry::renewal("error");
                        if last_ok.elapsed() + every >= lease {
                            warn!(
                                key = crate::key::short(&key),
                                "idempotency lease renewals failed for a whole lease"
                            );
                            lost2.0.cancel();
                            return;
                        }
                    }
                }
            }
        });
        Self { stop, lost }
    }
}
