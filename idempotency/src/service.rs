//! [`Idempotency`]: the middleware. Order of work for one request:
//!
//! 1. Methods not configured pass through. A missing key passes through, or is a 400 when
//!    required; a malformed key is a 400.
//! 2. The body is read (413 past `max_body_bytes`) and fingerprinted; the storage key is hashed
//!    from scope, method, route (axum's `MatchedPath`, else the path) and key.
//! 3. One claim: *completed* → replay (status, allow-listed headers, body, and
//!    `Idempotent-Replayed: true`); *in progress* → 409 + `Retry-After`, or wait and replay;
//!    *mismatch* → 422; *store down* → 503 + `Retry-After`, or run without idempotency when the
//!    route fails open.
//! 4. *New*: the handler runs with [`FencingToken`] and [`LeaseLost`] in its extensions while the
//!    watchdog renews the lease. Its response is stored (below 500 by default) with one
//!    owner-checked completion, or the key is released (5xx, panic, body too large). A completion
//!    refused as stale owner turns into a 409, so the client retries and gets the canonical
//!    answer.
//! 5. Dropped mid-way (client gone): a claim in flight is given back (owner-checked; nothing
//!    ran); while the handler runs, a guard releases the key (owner-checked) or lets it expire,
//!    per `on_cancel`; a completion or release already on its way runs to its end.

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{body::Body, extract::MatchedPath};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use keel_core::Live;
use tower_service::Service;
use tracing::{debug, error, warn, Instrument};

use crate::{
    config::{
        Fingerprint, IdempotencyConfig, OnCancel, OnConflict, OnStoreError, StorePolicy, MIN_LEASE,
    },
    future::ResponseFuture,
    key,
    layer::{IdempotencyLayer, Overrides},
    lease::{with_lease, FencingToken, LeaseLost},
    problem::problem,
    record::StoredResponse,
    store::{detached, new_owner, Claim, Detached, IdempotencyStore, Ownership},
    telemetry, IdempotencyError,
};

/// The tenant or principal a request acts for, set as a request extension by authentication.
/// Keys are namespaced by it, so two tenants using one key never see each other's answers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyScope(pub String);

/// The header set on replayed responses.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// Middleware applying the `Idempotency-Key` contract; see the module docs for the order of work.
#[derive(Clone)]
pub struct Idempotency<S> {
    inner: S,
    store: Arc<dyn IdempotencyStore>,
    config: Live<IdempotencyConfig>,
    overrides: Arc<Overrides>,
}

impl<S> std::fmt::Debug for Idempotency<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency").finish_non_exhaustive()
    }
}

impl<S> Idempotency<S> {
    /// Wraps `inner` with the store, live config and overrides of `layer`.
    pub fn new(inner: S, layer: IdempotencyLayer) -> Self {
        Self {
            inner,
            store: layer.store,
            config: layer.config,
            overrides: layer.overrides,
        }
    }
}

/// The policy of one request: the live config as loaded once, with the route's overrides.
struct Policy {
    cfg: Arc<IdempotencyConfig>,
    ov: Arc<Overrides>,
}

impl Policy {
    fn required(&self) -> bool {
        self.ov.required.unwrap_or(self.cfg.required)
    }
    fn on_conflict(&self) -> OnConflict {
        self.ov.on_conflict.unwrap_or(self.cfg.on_conflict)
    }
    fn on_store_error(&self) -> OnStoreError {
        self.ov.on_store_error.unwrap_or(self.cfg.on_store_error)
    }
    fn on_cancel(&self) -> OnCancel {
        self.ov.on_cancel.unwrap_or(self.cfg.on_cancel)
    }
    fn store_policy(&self) -> StorePolicy {
        self.ov.store_policy.unwrap_or(self.cfg.store_policy)
    }
    fn fingerprint(&self) -> &Fingerprint {
        self.ov
            .fingerprint
            .as_ref()
            .unwrap_or(&self.cfg.fingerprint)
    }
    /// The configuration's floors hold for overrides too (they pass no validation): a lease of
    /// at least [`MIN_LEASE`], a retention of at least the lease.
    fn lease(&self) -> Duration {
        self.ov.lease.unwrap_or(self.cfg.lease).max(MIN_LEASE)
    }
    fn ttl(&self) -> Duration {
        self.ov.ttl.unwrap_or(self.cfg.ttl).max(self.lease())
    }
}

fn secs_ceil(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// What a dropped request (client gone) leaves to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Armed {
    /// Nothing is held.
    No,
    /// A claim is in flight: it may have taken effect, and nothing ran, so it is given back
    /// (owner-checked: a no-op if it never took effect), whatever `on_cancel` says.
    Claiming,
    /// The handler runs: the key is released or left to expire, per `on_cancel`.
    Running,
}

/// Acts for a request dropped mid-way (client disconnect), per [`Armed`].
struct CancelGuard {
    store: Arc<dyn IdempotencyStore>,
    key: String,
    owner: String,
    release: bool,
    armed: Armed,
}

impl CancelGuard {
    /// Disarms the guard and hands over the store, key and owner it held.
    fn disarm(mut self) -> (Arc<dyn IdempotencyStore>, String, String) {
        self.armed = Armed::No;
        (
            self.store.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.owner),
        )
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        match self.armed {
            Armed::No => return,
            Armed::Claiming => {}
            Armed::Running => {
                telemetry::complete("cancelled");
                if !self.release {
                    debug!(
                        key = key::short(&self.key),
                        "request dropped; lease left to expire"
                    );
                    return;
                }
            }
        }
        let (store, key, owner) = (
            self.store.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.owner),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = store.release(&key, &owner).await;
                debug!(key = key::short(&key), "request dropped; key released");
            });
        }
    }
}

/// A response body, read up to the storage limit.
enum Answer {
    /// Whole, within the limit: it can be stored.
    Whole(Bytes),
    /// Past the limit: what was read followed by the rest, to stream to the client unstored.
    TooLarge(Body),
}

/// Reads `body` whole if it fits in `limit` bytes; past that, stops reading and hands back what
/// was read chained to the rest, so a large answer is neither held whole in memory nor stored
/// cut short. Trailers are dropped.
async fn read_at_most(mut body: Body, limit: usize) -> Result<Answer, axum::Error> {
    if axum::body::HttpBody::size_hint(&body).lower() > u64::try_from(limit).unwrap_or(u64::MAX) {
        return Ok(Answer::TooLarge(body));
    }
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        len = len.saturating_add(data.len());
        chunks.push(data);
        if len > limit {
            let read = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, axum::Error>));
            return Ok(Answer::TooLarge(Body::from_stream(
                read.chain(body.into_data_stream()),
            )));
        }
    }
    Ok(Answer::Whole(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => chunks.concat().into(),
    }))
}

/// Releases the key: see [`crate::store::give_back`].
fn give_back((store, key, owner): (Arc<dyn IdempotencyStore>, String, String)) -> Detached<()> {
    crate::store::give_back(store, key, owner)
}

/// Stores the answer (owner-checked) and counts the outcome: to the end, even if the request is
/// dropped meanwhile (the handler ran; a lost completion would leave the key claimed until its
/// lease ended, and then run the request again).
fn complete(
    (store, key, owner): (Arc<dyn IdempotencyStore>, String, String),
    record: Bytes,
    ttl: Duration,
) -> Detached<Result<Ownership, IdempotencyError>> {
    detached(async move {
        let r = store.complete(&key, &owner, record, ttl).await;
        telemetry::complete(match r {
            Ok(Ownership::Owner) => "ok",
            Ok(Ownership::Stale) => "stale_owner",
            Err(_) => "error",
        });
        r
    })
}

fn replay(stored: StoredResponse) -> Response<Body> {
    let mut r = Response::new(Body::from(stored.body));
    *r.status_mut() = stored.status;
    let h = r.headers_mut();
    for (n, v) in stored.headers {
        h.append(n, v);
    }
    h.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    r
}

fn store_unavailable(e: &IdempotencyError) -> Response<Body> {
    if let IdempotencyError::Full(_) = e {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "store-full",
            "Idempotency store full",
            "The request was not processed: the idempotency store is full of requests in progress; retry later.",
            Some(1),
        );
    }
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "store-unavailable",
        "Idempotency store unavailable",
        "The request was not processed because its duplicates could not be ruled out; retry later.",
        Some(1),
    )
}

impl<S> Service<Request<Body>> for Idempotency<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness of the inner service is awaited inside the future, after the claim.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let policy = Policy {
            cfg: self.config.get(),
            ov: self.overrides.clone(),
        };
        let store = self.store.clone();
        ResponseFuture {
            inner: Box::pin(handle(inner, store, policy, req)),
        }
    }
}

/// Calls `inner` with `req` once it is ready.
fn call_inner<S>(inner: S, req: Request<Body>) -> Call<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    Call::Waiting { inner, req }
}

pin_project_lite::pin_project! {
    /// The future of [`call_inner`]: a future of its own rather than an `async fn`, which would
    /// hold the request twice (as its argument, and in the handler's future).
    #[project = CallState]
    enum Call<S: Service<Request<Body>>> {
        Waiting { inner: S, req: Request<Body> },
        Called { #[pin] fut: S::Future },
    }
}

impl<S> Future for Call<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    type Output = Result<Response<Body>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                CallState::Waiting { inner, req } => {
                    std::task::ready!(inner.poll_ready(cx))?;
                    let fut = inner.call(std::mem::take(req));
                    self.set(Call::Called { fut });
                }
                CallState::Called { fut } => return fut.poll(cx),
            }
        }
    }
}

#[allow(clippy::manual_async_fn)] // see the comment on the `async` block
fn handle<S>(
    inner: S,
    store: Arc<dyn IdempotencyStore>,
    policy: Policy,
    req: Request<Body>,
) -> impl Future<Output = Result<Response<Body>, S::Error>>
where
    S: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    // An `async` block rather than an `async fn`: its arguments are held once, not twice
    // (an `async fn` keeps them and its own copies), in every request's future.
    async move {
        let cfg = &policy.cfg;
        if !cfg
            .methods
            .iter()
            .any(|m| m.eq_ignore_ascii_case(req.method().as_str()))
        {
            return call_inner(inner, req).await;
        }
        let client_key = match key::key_from_headers(req.headers(), &cfg.header) {
            Ok(Some(k)) => k,
            Ok(None) if policy.required() => {
                return Ok(problem(
                    StatusCode::BAD_REQUEST,
                    "missing-key",
                    "Idempotency key missing",
                    &format!("This operation requires the {} header.", cfg.header),
                    None,
                ))
            }
            Ok(None) => return call_inner(inner, req).await,
            Err(e) => {
                return Ok(problem(
                    StatusCode::BAD_REQUEST,
                    "malformed-key",
                    "Idempotency key malformed",
                    &e.to_string(),
                    None,
                ))
            }
        };
        // Raw bytes: a lossy UTF-8 conversion would merge distinct non-UTF-8 tenants.
        let scope = req
            .extensions()
            .get::<IdempotencyScope>()
            .map(|s| s.0.as_bytes().to_vec())
            .or_else(|| {
                let h = cfg.scope_header.as_deref()?;
                req.headers().get(h).map(|v| v.as_bytes().to_vec())
            })
            .unwrap_or_default();
        let route = req
            .extensions()
            .get::<MatchedPath>()
            .map(|m| m.as_str().to_owned())
            .unwrap_or_else(|| req.uri().path().to_owned());
        let skey = key::storage_key_raw(&scope, req.method().as_str(), &route, &client_key);
        drop(client_key);

        // In a block, so that what it leaves behind takes no room in the future while the
        // request executes.
        let (req, fp) = {
            let (parts, body) = req.into_parts();
            let body = match Limited::new(body, cfg.max_body_bytes).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) if !e.is::<http_body_util::LengthLimitError>() => {
                    return Ok(problem(
                        StatusCode::BAD_REQUEST,
                        "body-unreadable",
                        "Request body unreadable",
                        "The request body could not be read.",
                        None,
                    ))
                }
                Err(_) => {
                    return Ok(problem(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body-too-large",
                        "Request body too large",
                        &format!(
                            "Idempotent requests are limited to {} bytes.",
                            cfg.max_body_bytes
                        ),
                        None,
                    ))
                }
            };
            let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
            let fp = key::fingerprint(policy.fingerprint(), target, &parts.headers, &body);
            (Request::from_parts(parts, Body::from(body)), fp)
        };
        let span = tracing::info_span!("keel.idempotency", key = key::short(&skey));
        execute(inner, store, policy, req, skey, fp)
            .instrument(span)
            .await
    }
}

#[allow(clippy::manual_async_fn)] // see the comment on the `async` block
fn execute<S>(
    inner: S,
    store: Arc<dyn IdempotencyStore>,
    policy: Policy,
    mut req: Request<Body>,
    skey: String,
    fp: String,
) -> impl Future<Output = Result<Response<Body>, S::Error>>
where
    S: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    // An `async` block rather than an `async fn`: its arguments are held once, not twice
    // (an `async fn` keeps them and its own copies), in every request's future.
    async move {
        let lease = policy.lease();
        let owner = new_owner();
        let wait_until = tokio::time::Instant::now()
            + policy.cfg.conflict_wait.min(keel_core::units::MAX_DURATION);
        let mut guard = CancelGuard {
            store: store.clone(),
            key: skey.clone(),
            owner: owner.clone(),
            release: policy.on_cancel() == OnCancel::Release,
            armed: Armed::No,
        };
        let fence = loop {
            guard.armed = Armed::Claiming;
            let claim = store.claim(&skey, &owner, &fp, lease).await;
            guard.armed = Armed::No;
            match claim {
                Ok(Claim::New { fence }) => {
                    telemetry::claim("new");
                    break fence;
                }
                Ok(Claim::Completed(raw)) => {
                    telemetry::claim("replay");
                    return Ok(match StoredResponse::decode(&raw) {
                        Some(s) => replay(s),
                        None => {
                            error!(
                                key = key::short(&skey),
                                "stored idempotent response is corrupt"
                            );
                            problem(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "corrupt-record",
                                "Stored response unreadable",
                                "The stored response for this key cannot be read.",
                                None,
                            )
                        }
                    });
                }
                Ok(Claim::Mismatch) => {
                    telemetry::claim("mismatch");
                    return Ok(problem(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "key-reused",
                        "Idempotency key reused",
                        "This idempotency key was used with a different request.",
                        None,
                    ));
                }
                Ok(Claim::InProgress { retry_after }) => {
                    let now = tokio::time::Instant::now();
                    if policy.on_conflict() == OnConflict::Wait && now < wait_until {
                        let step = retry_after
                            .unwrap_or(Duration::from_millis(50))
                            .clamp(Duration::from_millis(5), Duration::from_millis(50));
                        tokio::time::sleep(step.min(wait_until - now)).await;
                        continue;
                    }
                    telemetry::claim("conflict");
                    let secs = retry_after.map(secs_ceil).unwrap_or(1);
                    return Ok(problem(
                        StatusCode::CONFLICT,
                        "in-progress",
                        "Request in progress",
                        "A request with this idempotency key is being processed; retry later.",
                        Some(secs),
                    ));
                }
                Err(e) => {
                    telemetry::claim("store_error");
                    crate::store::give_back_timed_out_claim(&store, &e, &skey, &owner);
                    if policy.on_store_error() == OnStoreError::FailOpen && e.is_store_failure() {
                        metrics::counter!(telemetry::FAIL_OPEN_TOTAL).increment(1);
                        warn!(key = key::short(&skey), error = %e, "idempotency store failed; running without idempotency (fail open)");
                        return call_inner(inner, req).await;
                    }
                    warn!(key = key::short(&skey), error = %e, "idempotency store failed; refusing (fail closed)");
                    return Ok(store_unavailable(&e));
                }
            }
        };

        let lost = LeaseLost::default();
        req.extensions_mut().insert(FencingToken(fence));
        req.extensions_mut().insert(lost.clone());
        guard.armed = Armed::Running;

        // The handler and the reading of its body (up to the storage limit) run under the lease.
        let limit = policy.cfg.max_body_bytes;
        // Built in place, of combinators rather than an `async` block (which would hold the
        // handler's future beside the request it was made from): every request's future is smaller.
        let outcome = with_lease(
            store.as_ref(),
            &skey,
            &owner,
            lease,
            &lost,
            AssertUnwindSafe(call_inner(inner, req).then(move |resp| async move {
                let (parts, body) = resp?.into_parts();
                Ok::<_, S::Error>((parts, read_at_most(body, limit).await))
            }))
            .catch_unwind(),
        )
        .await;
        let held = guard.disarm();
        let (parts, body) = match outcome {
            Ok(Ok((parts, Ok(Answer::Whole(body))))) => (parts, body),
            Ok(Ok((parts, Ok(Answer::TooLarge(body))))) => {
                // Never stored cut short: the key is released (a retry runs again) and the answer
                // streams on to the client whole.
                warn!(
                    key = key::short(&skey),
                    limit, "response too large to store; key released"
                );
                give_back(held).await;
                return Ok(Response::from_parts(parts, body));
            }
            Ok(Ok((_, Err(e)))) => {
                give_back(held).await;
                error!(key = key::short(&skey), error = %e, "response body failed; key released");
                return Ok(problem(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "body-failed",
                    "Internal error",
                    "The response could not be produced; the request may be retried.",
                    None,
                ));
            }
            Ok(Err(e)) => {
                give_back(held).await;
                return Err(e);
            }
            Err(_) => {
                give_back(held).await;
                error!(key = key::short(&skey), "handler panicked; key released");
                return Ok(problem(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "handler-panicked",
                    "Internal error",
                    "The handler failed; the request may be retried.",
                    None,
                ));
            }
        };

        if !policy.store_policy().stores(parts.status.as_u16()) {
            give_back(held).await;
            return Ok(Response::from_parts(parts, Body::from(body)));
        }
        let record = StoredResponse::encode(
            parts.status,
            &parts.headers,
            &policy.cfg.replay_headers,
            &body,
        );
        match complete(held, record, policy.ttl()).await {
            Ok(Ownership::Owner) => Ok(Response::from_parts(parts, Body::from(body))),
            Ok(Ownership::Stale) => {
                warn!(
                    key = key::short(&skey),
                    fence,
                    lease_lost = lost.is_lost(),
                    "completion refused: stale owner"
                );
                Ok(problem(
                    StatusCode::CONFLICT,
                    "lease-lost",
                    "Lease lost",
                    "This execution lost its claim on the key before completing; retry to get the stored answer.",
                    Some(1),
                ))
            }
            Err(e) => {
                error!(key = key::short(&skey), error = %e, "completion could not be stored; the key stays claimed until its lease expires");
                Ok(Response::from_parts(parts, Body::from(body)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures_util::StreamExt;

    use super::*;
    use crate::MemoryStore;

    fn app(cfg: IdempotencyConfig, runs: Arc<AtomicUsize>) -> axum::Router {
        app_on(Arc::new(MemoryStore::new(100)), cfg, runs)
    }

    fn app_on(
        store: Arc<dyn IdempotencyStore>,
        cfg: IdempotencyConfig,
        runs: Arc<AtomicUsize>,
    ) -> axum::Router {
        let layer = IdempotencyLayer::new(store, Live::new(cfg)).required(true);
        axum::Router::new().route(
            "/pay",
            axum::routing::post(move || {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                        .to_string()
                }
            })
            .layer(layer),
        )
    }

    async fn send(app: &axum::Router, headers: &[(&str, &[u8])]) -> Response<Body> {
        let mut req = Request::post("/pay").body(Body::from("b")).unwrap();
        for (n, v) in headers {
            req.headers_mut().insert(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        tower::ServiceExt::oneshot(app.clone(), req).await.unwrap()
    }

    async fn problem_type(r: Response<Body>) -> String {
        assert_eq!(
            r.headers()[http::header::CONTENT_TYPE],
            "application/problem+json"
        );
        let b = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        v["type"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .to_owned()
    }

    /// A memory store of one key: a request in progress fills it (another key gets a 503 saying
    /// so); once answered, that answer is evicted for the next key, and its key runs again.
    #[tokio::test]
    async fn a_full_memory_store_refuses_while_in_progress_and_evicts_answers() {
        let runs = Arc::new(AtomicUsize::new(0));
        let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let layer = IdempotencyLayer::new(
            Arc::new(MemoryStore::new(1)),
            Live::new(IdempotencyConfig::default()),
        );
        let handler = {
            let (runs, gate) = (runs.clone(), gate.clone());
            move || {
                let (runs, gate, started_tx) = (runs.clone(), gate.clone(), started_tx.clone());
                async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst);
                    let _ = started_tx.send(());
                    gate.acquire().await.unwrap().forget();
                    n.to_string()
                }
            }
        };
        let app = axum::Router::new().route("/pay", axum::routing::post(handler).layer(layer));
        let first = tokio::spawn({
            let app = app.clone();
            async move { send(&app, &[("idempotency-key", b"a")]).await }
        });
        started.recv().await.unwrap();
        let r = send(&app, &[("idempotency-key", b"b")]).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key(http::header::RETRY_AFTER));
        assert_eq!(problem_type(r).await, "store-full");
        gate.add_permits(3);
        assert_eq!(first.await.unwrap().status(), StatusCode::OK);
        // "a" is answered: its answer makes room for "b", and "a" runs again afterwards.
        for key in [&b"b"[..], b"a"] {
            let r = send(&app, &[("idempotency-key", key)]).await;
            assert_eq!(r.status(), StatusCode::OK);
            assert!(r.headers().get(REPLAYED_HEADER).is_none());
        }
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    /// A POST answered with a redirect (303 See Other, "created, look there") has done its work:
    /// its duplicate gets the same redirect, not a second execution.
    #[tokio::test]
    async fn a_redirect_is_stored_and_replayed() {
        let runs = Arc::new(AtomicUsize::new(0));
        let layer = IdempotencyLayer::new(
            Arc::new(MemoryStore::new(100)),
            Live::new(IdempotencyConfig::default()),
        );
        let app = axum::Router::new().route(
            "/pay",
            axum::routing::post({
                let runs = runs.clone();
                move || async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst);
                    axum::response::Redirect::to(&format!("/payments/{n}"))
                }
            })
            .layer(layer),
        );
        for replayed in [false, true] {
            let r = send(&app, &[("idempotency-key", b"r")]).await;
            assert_eq!(r.status(), StatusCode::SEE_OTHER);
            assert_eq!(r.headers()[http::header::LOCATION], "/payments/0");
            assert_eq!(r.headers().contains_key(REPLAYED_HEADER), replayed);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    /// The client goes away while the completion is on its way to the store: the handler ran,
    /// so its answer is still stored (and replayed), not lost with the key left claimed until its
    /// lease ends and the request then run again.
    #[tokio::test(start_paused = true)]
    async fn a_completion_in_flight_outlives_the_client() {
        let runs = Arc::new(AtomicUsize::new(0));
        let store = crate::testing::Slow::new(Duration::ZERO, Duration::from_millis(100));
        let app = app_on(store, IdempotencyConfig::default(), runs.clone());
        let gone = tokio::time::timeout(
            Duration::from_millis(50),
            send(&app, &[("idempotency-key", b"c")]),
        )
        .await;
        assert!(gone.is_err(), "dropped while completing");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = send(&app, &[("idempotency-key", b"c")]).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[REPLAYED_HEADER], "true");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    /// The client goes away while the claim is on its way back: the claim took effect, nothing
    /// ran, so the key is given back at once instead of being held for a whole lease (409s).
    #[tokio::test(start_paused = true)]
    async fn a_claim_in_flight_is_given_back_when_the_client_goes_away() {
        let runs = Arc::new(AtomicUsize::new(0));
        let store = crate::testing::Slow::new(Duration::from_millis(100), Duration::ZERO);
        let cfg = IdempotencyConfig {
            on_cancel: OnCancel::Expire,
            ..IdempotencyConfig::default()
        };
        let app = app_on(store, cfg, runs.clone());
        let gone = tokio::time::timeout(
            Duration::from_millis(50),
            send(&app, &[("idempotency-key", b"c")]),
        )
        .await;
        assert!(gone.is_err(), "dropped while claiming");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = send(&app, &[("idempotency-key", b"c")]).await;
        assert_eq!(r.status(), StatusCode::OK, "the key was given back");
        assert!(r.headers().get(REPLAYED_HEADER).is_none());
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    /// An answer larger than `max_body_bytes` is neither stored (no truncated replay: the key
    /// is released) nor first read whole into memory: it streams to the client, whole, once the
    /// limit is passed. One at the limit is stored and replayed byte for byte.
    #[tokio::test]
    async fn an_answer_past_the_limit_streams_whole_and_is_not_stored() {
        let pulled = Arc::new(AtomicUsize::new(0));
        let runs = Arc::new(AtomicUsize::new(0));
        let layer = IdempotencyLayer::new(
            Arc::new(MemoryStore::new(100)),
            Live::new(IdempotencyConfig {
                max_body_bytes: 4096,
                ..IdempotencyConfig::default()
            }),
        );
        let handler = {
            let (pulled, runs) = (pulled.clone(), runs.clone());
            move |body: Bytes| {
                let (pulled, runs) = (pulled.clone(), runs.clone());
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let chunks: usize = std::str::from_utf8(&body).unwrap().parse().unwrap();
                    let stream = futures_util::stream::iter(0..chunks).map(move |i| {
                        pulled.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, std::convert::Infallible>(Bytes::from(vec![
                            b'a' + (i % 26) as u8;
                            1024
                        ]))
                    });
                    Body::from_stream(stream)
                }
            }
        };
        let app = axum::Router::new().route("/pay", axum::routing::post(handler).layer(layer));
        let expected = |chunks: usize| -> Vec<u8> {
            (0..chunks)
                .flat_map(|i| vec![b'a' + (i % 26) as u8; 1024])
                .collect()
        };
        let call = |key: &'static str, chunks: usize| {
            let app = app.clone();
            async move {
                let req = Request::post("/pay")
                    .header("idempotency-key", key)
                    .body(Body::from(chunks.to_string()))
                    .unwrap();
                tower::ServiceExt::oneshot(app, req).await.unwrap()
            }
        };
        let r = call("big", 100).await;
        let read = pulled.load(Ordering::SeqCst);
        assert!(
            read <= 5,
            "{read} chunks of 1 KiB read before answering, limit 4 KiB"
        );
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, expected(100), "the whole answer, not a truncated one");
        let again = call("big", 100).await;
        assert!(again.headers().get(REPLAYED_HEADER).is_none(), "not stored");
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        // At the limit: stored and replayed.
        for replayed in [false, true] {
            let r = call("fits", 4).await;
            assert_eq!(r.headers().contains_key(REPLAYED_HEADER), replayed);
            let body = r.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, expected(4));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    /// An inner service that is not ready at once (`Pending` twice, then ready), or that fails
    /// its readiness: the layer waits for it, or answers its error and gives the key back.
    #[derive(Clone)]
    struct Gate {
        pending: Arc<AtomicUsize>,
        fail: Arc<std::sync::atomic::AtomicBool>,
        runs: Arc<AtomicUsize>,
        saw: Arc<std::sync::Mutex<Vec<Seen>>>,
    }

    /// What the handler was given: its fencing token and the request body.
    type Seen = (Option<FencingToken>, Bytes);

    #[derive(Debug, PartialEq)]
    struct NotReady;

    impl Service<Request<Body>> for Gate {
        type Response = Response<Body>;
        type Error = NotReady;
        type Future = futures_util::future::BoxFuture<'static, Result<Response<Body>, NotReady>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), NotReady>> {
            if self
                .pending
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if self.fail.load(Ordering::SeqCst) {
                return Poll::Ready(Err(NotReady));
            }
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<Body>) -> Self::Future {
            let (runs, saw) = (self.runs.clone(), self.saw.clone());
            Box::pin(async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let fence = req.extensions().get::<FencingToken>().copied();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                saw.lock().unwrap().push((fence, body));
                let mut r = Response::new(Body::from("ran"));
                *r.status_mut() = StatusCode::CREATED;
                Ok(r)
            })
        }
    }

    #[tokio::test]
    async fn an_inner_service_not_ready_at_once_is_waited_for_or_its_error_answered() {
        let gate = Gate {
            pending: Arc::new(AtomicUsize::new(2)),
            fail: Arc::default(),
            runs: Arc::default(),
            saw: Arc::default(),
        };
        let svc = tower_layer::Layer::layer(
            &IdempotencyLayer::new(
                Arc::new(MemoryStore::new(100)),
                Live::new(IdempotencyConfig::default()),
            ),
            gate.clone(),
        );
        let call = |key: &'static str| {
            let svc = svc.clone();
            async move {
                let req = Request::post("/pay")
                    .header("idempotency-key", key)
                    .body(Body::from("b"))
                    .unwrap();
                tower::ServiceExt::oneshot(svc, req).await
            }
        };
        // Not ready twice, then ready: the request arrives whole, with its fencing token.
        for replayed in [false, true] {
            let r = call("a").await.unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
            assert_eq!(r.headers().contains_key(REPLAYED_HEADER), replayed);
            let body = r.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "ran");
        }
        assert_eq!(gate.pending.load(Ordering::SeqCst), 0);
        assert_eq!(gate.runs.load(Ordering::SeqCst), 1);
        {
            let saw = gate.saw.lock().unwrap();
            assert_eq!(saw.len(), 1);
            assert!(saw[0].0.is_some(), "the fencing token reaches the handler");
            assert_eq!(saw[0].1, "b");
        }
        // Readiness fails: the error is the answer, and the key is given back for a retry.
        gate.fail.store(true, Ordering::SeqCst);
        assert_eq!(call("b").await.unwrap_err(), NotReady);
        gate.fail.store(false, Ordering::SeqCst);
        let r = call("b").await.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        assert!(!r.headers().contains_key(REPLAYED_HEADER));
        assert_eq!(gate.runs.load(Ordering::SeqCst), 2);
    }

    /// Per-route overrides pass no validation: a zero lease made every completion a stale
    /// owner (409, and the next request ran again), a zero retention forgot every answer at
    /// once. They count as the configuration's floors: a lease of at least 30 ms, a retention
    /// of at least the lease.
    #[tokio::test(start_paused = true)]
    async fn route_overrides_below_the_floors_still_run_once() {
        for layer in [
            |l: IdempotencyLayer| l.lease(Duration::ZERO),
            |l: IdempotencyLayer| l.ttl(Duration::ZERO),
        ] {
            let runs = Arc::new(AtomicUsize::new(0));
            let base = IdempotencyLayer::new(
                Arc::new(MemoryStore::new(100)),
                Live::new(IdempotencyConfig::default()),
            );
            let app = axum::Router::new().route(
                "/pay",
                axum::routing::post({
                    let runs = runs.clone();
                    move || async move { runs.fetch_add(1, Ordering::SeqCst).to_string() }
                })
                .layer(layer(base)),
            );
            for replayed in [false, true] {
                let r = send(&app, &[("idempotency-key", b"z")]).await;
                assert_eq!(r.status(), StatusCode::OK);
                assert_eq!(r.headers().contains_key(REPLAYED_HEADER), replayed);
            }
            assert_eq!(runs.load(Ordering::SeqCst), 1);
        }
    }

    #[tokio::test]
    async fn scope_header_values_that_are_not_utf8_stay_apart() {
        let runs = Arc::new(AtomicUsize::new(0));
        let app = app(
            IdempotencyConfig {
                scope_header: Some("x-tenant".into()),
                ..IdempotencyConfig::default()
            },
            runs.clone(),
        );
        // Two tenants whose names are Latin-1 bytes ("M\xfcller", "M\xf6ller").
        for tenant in [&b"M\xfcller"[..], b"M\xf6ller"] {
            let r = send(&app, &[("idempotency-key", b"k"), ("x-tenant", tenant)]).await;
            assert_eq!(r.status(), StatusCode::OK);
            assert!(
                r.headers().get(REPLAYED_HEADER).is_none(),
                "tenant {tenant:?} got another tenant's answer"
            );
        }
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }
}
