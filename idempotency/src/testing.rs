//! Test helpers shared by the unit tests: a store whose calls take time.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;

use crate::{BoxFuture, Claim, IdempotencyError, IdempotencyStore, MemoryStore, Ownership};

/// A memory store whose claims answer `claim_delay` after taking effect (an answer still on the
/// wire), and whose completions take effect `complete_delay` after being sent.
pub(crate) struct Slow {
    pub(crate) inner: MemoryStore,
    pub(crate) claim_delay: Duration,
    pub(crate) complete_delay: Duration,
}

impl Slow {
    pub(crate) fn new(claim_delay: Duration, complete_delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryStore::new(100),
            claim_delay,
            complete_delay,
        })
    }
}

impl IdempotencyStore for Slow {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        fp: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, IdempotencyError>> {
        Box::pin(async move {
            let r = self.inner.claim(key, owner, fp, lease).await;
            tokio::time::sleep(self.claim_delay).await;
            r
        })
    }
    fn renew<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>> {
        self.inner.renew(key, owner, lease)
    }
    fn complete<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>> {
        Box::pin(async move {
            tokio::time::sleep(self.complete_delay).await;
            self.inner.complete(key, owner, record, ttl).await
        })
    }
    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>> {
        self.inner.release(key, owner)
    }
}
