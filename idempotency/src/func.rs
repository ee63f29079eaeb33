//! The function API: idempotency for work that is not an HTTP request (queue consumers, jobs,
//! webhooks). The same store, leases, watchdog and fencing as the layer; the result is stored as
//! JSON and returned to every later call with the same key.

use std::{panic::AssertUnwindSafe, sync::Arc, time::Duration};

use futures_util::FutureExt;
use serde::{de::DeserializeOwned, Serialize};

use crate::{
    config::MIN_LEASE,
    key,
    lease::{with_lease, FencingToken, LeaseLost},
    store::{detached, new_owner, Claim, IdempotencyStore, Ownership},
    telemetry, IdempotencyError,
};

/// Why [`Idempotent::run`] returned no value.
#[derive(Debug, thiserror::Error)]
pub enum RunError<E> {
    /// The closure failed; the key was released, so a later run executes again.
    #[error("idempotent operation failed: {0}")]
    Failed(E),
    /// The key could not be used (in progress, mismatch, store down, stale owner...).
    #[error(transparent)]
    Idempotency(#[from] IdempotencyError),
}

impl<E> RunError<E> {
    /// Whether retrying later may help (a failed closure: yes, it runs again).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Failed(_) => true,
            Self::Idempotency(e) => e.is_retryable(),
        }
    }
}

/// Runs closures once per key.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::sync::Arc;
/// use keel_idempotency::{Idempotent, MemoryStore};
///
/// let once = Idempotent::new(Arc::new(MemoryStore::new(1000))).scope("billing");
/// let a: u32 = once.run("invoice-42", || async { Ok::<_, std::io::Error>(7) }).await.unwrap();
/// let b: u32 = once.run("invoice-42", || async { Ok::<_, std::io::Error>(8) }).await.unwrap();
/// assert_eq!((a, b), (7, 7));
/// # }
/// ```
#[derive(Clone)]
pub struct Idempotent {
    store: Arc<dyn IdempotencyStore>,
    scope: String,
    lease: Duration,
    ttl: Duration,
    wait: Duration,
}

impl std::fmt::Debug for Idempotent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotent")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl Idempotent {
    /// Runs on `store` with a 10s lease, 24h retention, and no waiting for a run in progress.
    pub fn new(store: Arc<dyn IdempotencyStore>) -> Self {
        Self {
            store,
            scope: String::new(),
            lease: Duration::from_secs(10),
            ttl: Duration::from_secs(86_400),
            wait: Duration::ZERO,
        }
    }

    /// Namespaces keys (e.g. by queue or tenant).
    #[must_use]
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = scope.into();
        self
    }

    /// The lease (renewed every third of it while the closure runs). At least 30 ms
    /// ([`MIN_LEASE`](crate::MIN_LEASE)): a shorter one counts as that.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long results are kept. At least the lease: a shorter retention counts as the lease.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long a call waits for a run of the same key in progress elsewhere before giving up
    /// with [`IdempotencyError::InProgress`].
    #[must_use]
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Runs `f` once for `key`; later calls return the stored result.
    pub async fn run<T, E, F, Fut>(&self, key: &str, f: F) -> Result<T, RunError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        self.run_fenced(key, |_, _| f()).await
    }

    /// Like [`run`](Self::run), giving the closure its fencing token and lease-lost signal.
    ///
    /// Dropping the returned future (the caller gives up): while the claim is in flight it is
    /// given back; while the closure runs, the key stays claimed until its lease ends (nothing
    /// renews it any more), so a half-done closure is not raced by its retry; a completion or
    /// release already on its way runs to its end.
    pub async fn run_fenced<T, E, F, Fut>(&self, key: &str, f: F) -> Result<T, RunError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(FencingToken, LeaseLost) -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let skey = key::storage_key(&self.scope, "RUN", "", key);
        let owner = new_owner();
        let lease = self.lease.max(MIN_LEASE);
        let ttl = self.ttl.max(lease);
        let until = tokio::time::Instant::now() + self.wait.min(keel_core::units::MAX_DURATION);
        let fence = loop {
            // Dropped while the claim is in flight (the caller gave up): the claim may have
            // taken effect with nothing run; give it back rather than hold it a whole lease.
            let mut in_flight =
                ClaimInFlight(Some((self.store.clone(), skey.clone(), owner.clone())));
            let claim = self.store.claim(&skey, &owner, "", lease).await;
            in_flight.0 = None;
            match claim {
                Ok(Claim::New { fence }) => {
                    telemetry::claim("new");
                    break fence;
                }
                Ok(Claim::Completed(raw)) => {
                    telemetry::claim("replay");
                    return serde_json::from_slice(&raw)
                        .map_err(|e| IdempotencyError::Serde(e.to_string()).into());
                }
                Ok(Claim::Mismatch) => {
                    telemetry::claim("mismatch");
                    return Err(IdempotencyError::Mismatch.into());
                }
                Ok(Claim::InProgress { retry_after }) => {
                    let now = tokio::time::Instant::now();
                    if now < until {
                        tokio::time::sleep((until - now).min(Duration::from_millis(50))).await;
                        continue;
                    }
                    telemetry::claim("conflict");
                    return Err(IdempotencyError::InProgress { retry_after }.into());
                }
                Err(e) => {
                    telemetry::claim("store_error");
                    crate::store::give_back_timed_out_claim(&self.store, &e, &skey, &owner);
                    return Err(e.into());
                }
            }
        };
        let lost = LeaseLost::default();
        // The closure is called inside the guarded future: a panic while it builds its future
        // releases the key like a panic while it runs.
        let work =
            AssertUnwindSafe(async { f(FencingToken(fence), lost.clone()).await }).catch_unwind();
        let out = with_lease(self.store.as_ref(), &skey, &owner, lease, &lost, work).await;
        // From here on, a release or completion runs to its end even if the caller gives up.
        let give_back = || crate::store::give_back(self.store.clone(), skey.clone(), owner.clone());
        let value = match out {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                give_back().await;
                return Err(RunError::Failed(e));
            }
            Err(panic) => {
                give_back().await;
                std::panic::resume_unwind(panic);
            }
        };
        let raw = match serde_json::to_vec(&value) {
            Ok(r) => r,
            Err(e) => {
                give_back().await;
                return Err(IdempotencyError::Serde(e.to_string()).into());
            }
        };
        let store = self.store.clone();
        let done = detached(async move {
            let r = store.complete(&skey, &owner, raw.into(), ttl).await;
            telemetry::complete(match r {
                Ok(Ownership::Owner) => "ok",
                Ok(Ownership::Stale) => "stale_owner",
                Err(_) => "error",
            });
            r
        })
        .await?;
        match done {
            Ownership::Owner => Ok(value),
            Ownership::Stale => Err(IdempotencyError::StaleOwner.into()),
        }
    }
}

/// Gives a claim back (owner-checked, in the background) when dropped while still set.
struct ClaimInFlight(Option<(Arc<dyn IdempotencyStore>, String, String)>);

impl Drop for ClaimInFlight {
    fn drop(&mut self) {
        if let (Some((store, key, owner)), Ok(rt)) =
            (self.0.take(), tokio::runtime::Handle::try_current())
        {
            rt.spawn(async move {
                let _ = store.release(&key, &owner).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::MemoryStore;

    #[tokio::test(start_paused = true)]
    async fn closure_panicking_when_called_releases_the_key() {
        let once = Idempotent::new(Arc::new(MemoryStore::new(10)));
        let r = AssertUnwindSafe(once.run("k", || -> std::future::Ready<Result<u8, ()>> {
            panic!("closure panics before returning its future")
        }))
        .catch_unwind()
        .await;
        assert!(r.is_err(), "the panic reaches the caller");
        // The key was released: the next run executes at once instead of meeting InProgress.
        let v: u8 = once
            .run("k", || async { Ok::<_, ()>(7) })
            .await
            .expect("key released after the panic");
        assert_eq!(v, 7);
    }

    /// The caller goes away while the completion is on its way to the store: the closure ran,
    /// so its result is still stored, and the next call gets it instead of an "in progress".
    #[tokio::test(start_paused = true)]
    async fn a_completion_in_flight_outlives_the_caller() {
        let store = crate::testing::Slow::new(Duration::ZERO, Duration::from_millis(100));
        let once = Idempotent::new(store);
        let gone = tokio::time::timeout(
            Duration::from_millis(50),
            once.run("k", || async { Ok::<u8, ()>(1) }),
        )
        .await;
        assert!(gone.is_err(), "dropped while completing");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let v: u8 = once.run("k", || async { Ok::<_, ()>(2) }).await.unwrap();
        assert_eq!(v, 1, "the first result was stored");
    }

    /// The caller goes away while the claim is on its way back: nothing ran, so the key is given
    /// back instead of being held for a whole lease.
    #[tokio::test(start_paused = true)]
    async fn a_claim_in_flight_is_given_back_when_the_caller_goes_away() {
        let store = crate::testing::Slow::new(Duration::from_millis(100), Duration::ZERO);
        let once = Idempotent::new(store);
        let gone = tokio::time::timeout(
            Duration::from_millis(50),
            once.run("k", || async { Ok::<u8, ()>(1) }),
        )
        .await;
        assert!(gone.is_err(), "dropped while claiming");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let v: u8 = once.run("k", || async { Ok::<_, ()>(2) }).await.unwrap();
        assert_eq!(v, 2, "the key was free: the second call ran");
    }

    /// A zero lease or retention set in code: the closure still runs once, and its result is
    /// kept (a zero lease made every completion a stale owner; a zero retention forgot it).
    #[tokio::test(start_paused = true)]
    async fn a_zero_lease_or_retention_still_runs_once() {
        for once in [
            Idempotent::new(Arc::new(MemoryStore::new(10))).lease(Duration::ZERO),
            Idempotent::new(Arc::new(MemoryStore::new(10))).ttl(Duration::ZERO),
        ] {
            let a: u8 = once.run("k", || async { Ok::<_, ()>(1) }).await.unwrap();
            let b: u8 = once.run("k", || async { Ok::<_, ()>(2) }).await.unwrap();
            assert_eq!((a, b), (1, 1));
        }
    }

    /// Records the `result` label of every `completes_total` increment.
    #[derive(Default)]
    struct Completes(std::sync::Mutex<Vec<String>>);

    impl metrics::Recorder for Completes {
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
            if key.name() == telemetry::COMPLETES_TOTAL {
                for l in key.labels() {
                    self.0.lock().unwrap().push(l.value().to_owned());
                }
            }
            metrics::Counter::noop()
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

    /// A memory store whose completions fail (`.1`), or whose releases find the key someone
    /// else's (`.2`).
    struct Rigged(MemoryStore, bool, bool);

    impl IdempotencyStore for Rigged {
        fn claim<'a>(
            &'a self,
            key: &'a str,
            owner: &'a str,
            fp: &'a str,
            lease: Duration,
        ) -> crate::BoxFuture<'a, Result<Claim, IdempotencyError>> {
            self.0.claim(key, owner, fp, lease)
        }
        fn renew<'a>(
            &'a self,
            key: &'a str,
            owner: &'a str,
            lease: Duration,
        ) -> crate::BoxFuture<'a, Result<Ownership, IdempotencyError>> {
            self.0.renew(key, owner, lease)
        }
        fn complete<'a>(
            &'a self,
            key: &'a str,
            owner: &'a str,
            record: bytes::Bytes,
            retention: Duration,
        ) -> crate::BoxFuture<'a, Result<Ownership, IdempotencyError>> {
            if !self.1 {
                return self.0.complete(key, owner, record, retention);
            }
            Box::pin(async { Err(IdempotencyError::Unavailable("test: down".into())) })
        }
        fn release<'a>(
            &'a self,
            key: &'a str,
            owner: &'a str,
        ) -> crate::BoxFuture<'a, Result<Ownership, IdempotencyError>> {
            if !self.2 {
                return self.0.release(key, owner);
            }
            Box::pin(async { Ok(Ownership::Stale) })
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn every_end_of_a_run_is_counted() {
        let rec = Completes::default();
        let _guard = metrics::set_default_local_recorder(&rec);
        // A result that cannot be serialized: the key is released, and counted so.
        let once = Idempotent::new(Arc::new(MemoryStore::new(10)));
        let r: Result<HashMap<(u8, u8), u8>, RunError<()>> = once
            .run("k", || async { Ok(HashMap::from([((1, 2), 3)])) })
            .await;
        assert!(matches!(
            r,
            Err(RunError::Idempotency(IdempotencyError::Serde(_)))
        ));
        // A completion the store failed to take: counted as an error.
        let once = Idempotent::new(Arc::new(Rigged(MemoryStore::new(10), true, false)));
        let r: Result<u8, RunError<()>> = once.run("k", || async { Ok(1) }).await;
        assert!(matches!(
            r,
            Err(RunError::Idempotency(IdempotencyError::Unavailable(_)))
        ));
        // A failed run whose key was taken over meanwhile: its release is refused, and counted
        // as the stale owner's, not as a release.
        let once = Idempotent::new(Arc::new(Rigged(MemoryStore::new(10), false, true)));
        let r: Result<u8, RunError<()>> = once.run("k", || async { Err(()) }).await;
        assert!(matches!(r, Err(RunError::Failed(()))));
        assert_eq!(*rec.0.lock().unwrap(), ["released", "error", "stale_owner"]);
    }
}
