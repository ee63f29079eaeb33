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

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

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
///
/// Present only on requests that claimed a key: a request without a key on a route where the
/// key is optional, or one run without idempotency because the store failed and the route fails
/// open, has none. On such routes take it as `Option<Extension<FencingToken>>` (a plain
/// `Extension<FencingToken>` would answer those requests with a 500).
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

/// Runs `work` while renewing the lease every `lease / 3` in the same task (no spawn: the renewal
/// loop is polled beside the work and stops when the work ends). Cancels `lost` when a renewal
/// finds another owner, or when renewals fail until the next one would come too late.
///
/// A future of its own rather than an `async fn`, which would hold `work` twice (as its argument
/// and pinned) in every request's future.
pub(crate) fn with_lease<'a, F: Future + 'a>(
    store: &'a dyn IdempotencyStore,
    key: &'a str,
    owner: &'a str,
    lease: Duration,
    lost: &'a LeaseLost,
    work: F,
) -> WithLease<F, impl Future<Output = ()> + 'a> {
    WithLease {
        renew: renew_loop(store, key, owner, lease, lost),
        work,
        renewing: true,
    }
}

pin_project_lite::pin_project! {
    /// The future of [`with_lease`].
    pub(crate) struct WithLease<F, R> {
        // Dropped first: the renewal ends before the work.
        #[pin]
        renew: R,
        #[pin]
        work: F,
        renewing: bool,
    }
}

impl<F: Future, R: Future<Output = ()>> Future for WithLease<F, R> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // The work first: once it is done, no renewal starts.
        if let Poll::Ready(out) = this.work.poll(cx) {
            return Poll::Ready(out);
        }
        if *this.renewing && this.renew.poll(cx).is_ready() {
            *this.renewing = false;
        }
        Poll::Pending
    }
}

async fn renew_loop(
    store: &dyn IdempotencyStore,
    key: &str,
    owner: &str,
    lease: Duration,
    lost: &LeaseLost,
) {
    let every = (lease / 3).max(Duration::from_millis(1));
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(every).await;
        match tokio::time::timeout(every, store.renew(key, owner, lease)).await {
            Ok(Ok(Ownership::Owner)) => {
                telemetry::renewal("ok");
                last_ok = Instant::now();
            }
            Ok(Ok(Ownership::Stale)) => {
                telemetry::renewal("lost");
                warn!(
                    key = crate::key::short(key),
                    "idempotency lease lost: key taken over or expired"
                );
                lost.0.cancel();
                return;
            }
            Ok(Err(_)) | Err(_) => {
                telemetry::renewal("error");
                if last_ok.elapsed() + every >= lease {
                    warn!(
                        key = crate::key::short(key),
                        "idempotency lease renewals failed for a whole lease"
                    );
                    lost.0.cancel();
                    return;
                }
            }
        }
    }
}
