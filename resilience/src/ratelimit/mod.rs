//! Rate limiting with GCRA, locally ([`LocalGcra`], lock-free per key, bounded memory) or across
//! a fleet on Redis ([`RedisGcra`], one `EVALSHA` per decision, local-share fallback).
//!
//! [`RateLimit`] is the client side (a refused call is [`ResilienceError::RateLimited`] with its
//! `retry_after`); [`ServerRateLimit`] is the inbound side, answering 429 with `Retry-After` and
//! the `RateLimit-Policy` and `RateLimit` fields of the IETF draft
//! `draft-ietf-httpapi-ratelimit-headers` (the Structured Fields form of drafts 08 to 11,
//! see [`write_headers`]), which it also puts on allowed responses.
//!
//! The policy (rate, burst, key, scope) is read per call; the state (each key's theoretical
//! arrival time) stays, so a reload neither resets limits nor grants a fresh burst.

mod gcra;
#[cfg(feature = "redis")]
mod redis;

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::HeaderValue;
use keel_core::Live;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

pub use self::gcra::{Decision, LocalGcra, Quota};
#[cfg(feature = "redis")]
pub use self::redis::{RedisGcra, Source};
use crate::{
    config::{KeySource, RateLimitConfig, RateLimitScope},
    error::{BoxError, ResilienceError},
    metrics as m,
};

/// The limiter state shared by every clone of a rate limit layer.
#[derive(Debug)]
pub struct RateLimiter {
    policy: Live<RateLimitConfig>,
    local: Arc<LocalGcra>,
    #[cfg(feature = "redis")]
    redis: std::sync::Mutex<Option<Arc<RedisGcra>>>,
    allowed: metrics::Counter,
    limited: metrics::Counter,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    fallback: metrics::Counter,
}

/// The key of a request under `key`. Under a header, its value as text: any UTF-8 (a tenant
/// named `café` has its own key); a request without it, or whose value is not UTF-8, has the
/// key `""`, which calls without the header share.
pub fn request_key<'a, B>(key: &KeySource, req: &'a http::Request<B>) -> &'a str {
    match key {
        KeySource::Global => "",
        // The route a server matched, when it says (every URL of a route shares its limit).
        KeySource::Path => req
            .extensions()
            .get::<keel_core::request::Route>()
            .map_or(req.uri().path(), |r| &r.0),
        KeySource::Header(h) => req
            .headers()
            .get(h)
            // Not `to_str`, which refuses every byte past ASCII: all such values would share
            // the key of calls without the header.
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
            .unwrap_or(""),
    }
}

impl RateLimiter {
    /// A limiter for `service`.
    pub fn new(service: impl Into<Arc<str>>, policy: Live<RateLimitConfig>) -> Arc<Self> {
        Self::with_base(service, policy, tokio::time::Instant::now())
    }

    /// As [`new`](Self::new), with its local limiter's clock starting at `base`.
    pub(crate) fn with_base(
        service: impl Into<Arc<str>>,
        policy: Live<RateLimitConfig>,
        base: tokio::time::Instant,
    ) -> Arc<Self> {
        let service = service.into();
        Arc::new(Self {
            policy,
            local: Arc::new(LocalGcra::with_base(base)),
            #[cfg(feature = "redis")]
            redis: std::sync::Mutex::new(None),
            allowed: m::counter(m::RATELIMIT_DECISIONS_TOTAL, &service, "allowed"),
            limited: m::counter(m::RATELIMIT_DECISIONS_TOTAL, &service, "limited"),
            fallback: m::counter(m::RATELIMIT_DECISIONS_TOTAL, &service, "fallback"),
        })
    }

    /// The policy.
    pub fn policy(&self) -> &Live<RateLimitConfig> {
        &self.policy
    }

    /// How many keys the local limiter tracks now (bounded by `max_keys`).
    pub fn tracked_keys(&self) -> usize {
        self.local.keys()
    }

    /// Whether a decision for this policy needs Redis (and so is asynchronous).
    pub fn is_distributed(cfg: &RateLimitConfig) -> bool {
        cfg.enabled && cfg.scope == RateLimitScope::Redis && cfg.redis_url.is_some()
    }

    /// A local decision (the policy's scope is ignored).
    pub fn check_local(&self, cfg: &RateLimitConfig, key: &str) -> Decision {
        self.check_local_at(cfg, key, tokio::time::Instant::now())
    }

    /// As [`check_local`](Self::check_local), with the caller's clock reading (`now`).
    pub fn check_local_at(
        &self,
        cfg: &RateLimitConfig,
        key: &str,
        now: tokio::time::Instant,
    ) -> Decision {
        self.check_local_since(cfg, key, self.local.since(now))
    }

    /// As [`check_local_at`](Self::check_local_at), with the time since the base this limiter
    /// was made with ([`with_base`](Self::with_base)).
    pub(crate) fn check_local_since(
        &self,
        cfg: &RateLimitConfig,
        key: &str,
        since: std::time::Duration,
    ) -> Decision {
        let d = self
            .local
            .check_since(key, Quota::new(cfg.rate, cfg.burst), cfg.max_keys, since);
        self.count(&d);
        d
    }

    /// As [`check_local_since`](Self::check_local_since), for the client stack: only the verdict,
    /// and when refused the time until a call would be admitted.
    pub(crate) fn admit_local_since(
        &self,
        cfg: &RateLimitConfig,
        key: &str,
        since: std::time::Duration,
    ) -> Result<(), std::time::Duration> {
        let r = self
            .local
            .admit_since(key, Quota::new(cfg.rate, cfg.burst), cfg.max_keys, since);
        match r {
            Ok(()) => self.allowed.increment(1),
            Err(_) => self.limited.increment(1),
        }
        r
    }

    fn count(&self, d: &Decision) {
        if d.allowed {
            self.allowed.increment(1)
        } else {
            self.limited.increment(1)
        }
    }

    #[cfg(feature = "redis")]
    fn redis(&self, url: &str) -> Arc<RedisGcra> {
        let mut g = keel_core::lock(&self.redis);
        match &*g {
            Some(r) if r.url() == url => r.clone(),
            _ => {
                let r = Arc::new(RedisGcra::new(url, self.local.clone()));
                *g = Some(r.clone());
                r
            }
        }
    }

    /// A decision under the policy in force: local, or Redis with the local-share fallback.
    pub async fn check(&self, key: &str) -> Decision {
        self.check_with(&self.policy.get(), key).await
    }

    /// A decision under `cfg` (a policy the caller has already loaded for this call).
    pub async fn check_with(&self, cfg: &RateLimitConfig, key: &str) -> Decision {
        if !cfg.enabled {
            return Decision {
                allowed: true,
                remaining: u64::MAX,
                retry_after: std::time::Duration::ZERO,
                reset: std::time::Duration::ZERO,
            };
        }
        #[cfg(not(feature = "redis"))]
        return self.check_local(cfg, key);
        #[cfg(feature = "redis")]
        self.check_redis(cfg, key).await
    }

    #[cfg(feature = "redis")]
    async fn check_redis(&self, cfg: &RateLimitConfig, key: &str) -> Decision {
        let Some(url) = cfg
            .redis_url
            .as_deref()
            .filter(|_| Self::is_distributed(cfg))
        else {
            return self.check_local(cfg, key);
        };
        let r = self.redis(url);
        let full = format!("{}:{}", cfg.redis_prefix, key);
        let q = Quota::new(cfg.rate, cfg.burst);
        let share = Quota::new(
            cfg.rate * cfg.local_share.get().max(1e-6),
            ((cfg.burst as f64 * cfg.local_share.get()).ceil() as u32).max(1),
        );
        let (d, src) = r
            .check(&full, q, share, cfg.redis_timeout, cfg.max_keys)
            .await;
        if src == Source::Fallback {
            self.fallback.increment(1);
        }
        self.count(&d);
        d
    }
}

/// Client-side rate limit around `S`.
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<RateLimiter>,
}

/// Builds [`RateLimit`]s sharing one [`RateLimiter`].
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limiter: Arc<RateLimiter>,
}

impl RateLimitLayer {
    /// A layer with a new limiter.
    pub fn new(service: impl Into<Arc<str>>, policy: Live<RateLimitConfig>) -> Self {
        Self {
            limiter: RateLimiter::new(service, policy),
        }
    }

    /// A layer over an existing limiter.
    pub fn from_limiter(limiter: Arc<RateLimiter>) -> Self {
        Self { limiter }
    }

    /// The shared limiter.
    pub fn limiter(&self) -> &Arc<RateLimiter> {
        &self.limiter
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

type BoxFut<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

pin_project! {
    /// [`RateLimit`]'s future: the inner call, a refusal, or a pending Redis decision.
    pub struct ResponseFuture<F, T> {
        #[pin]
        state: State<F, T>,
    }
}

pin_project! {
    #[project = Proj]
    enum State<F, T> {
        Inner { #[pin] fut: F },
        Refused { error: Option<ResilienceError> },
        Boxed { fut: BoxFut<T, BoxError> },
    }
}

impl<F, T, E> Future for ResponseFuture<F, T>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            Proj::Inner { fut } => fut.poll(cx).map_err(Into::into),
            Proj::Refused { error } => {
                Poll::Ready(Err(Box::new(error.take().unwrap_or(ResilienceError::Shed))))
            }
            Proj::Boxed { fut } => fut.as_mut().poll(cx),
        }
    }
}

impl<S, B, T> Service<http::Request<B>> for RateLimit<S>
where
    S: Service<http::Request<B>, Response = T> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Send + 'static,
    T: Send + 'static,
{
    type Response = T;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, T>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let cfg = self.limiter.policy.load();
        if !cfg.enabled {
            return ResponseFuture {
                state: State::Inner {
                    fut: self.inner.call(req),
                },
            };
        }
        if !RateLimiter::is_distributed(&cfg) {
            let d = self.limiter.check_local(&cfg, request_key(&cfg.key, &req));
            drop(cfg);
            return ResponseFuture {
                state: if d.allowed {
                    State::Inner {
                        fut: self.inner.call(req),
                    }
                } else {
                    State::Refused {
                        error: Some(ResilienceError::RateLimited {
                            retry_after: d.retry_after,
                        }),
                    }
                },
            };
        }
        let key = request_key(&cfg.key, &req).to_owned();
        drop(cfg);
        let limiter = self.limiter.clone();
        let ctx = crate::scope::handoff();
        let clone = self.inner.clone();
        let mut svc = std::mem::replace(&mut self.inner, clone);
        ResponseFuture {
            state: State::Boxed {
                fut: Box::pin(async move {
                    let d = limiter.check(&key).await;
                    if !d.allowed {
                        return Err(Box::new(ResilienceError::RateLimited {
                            retry_after: d.retry_after,
                        }) as BoxError);
                    }
                    crate::scope::resume(ctx, || svc.call(req))
                        .await
                        .map_err(Into::into)
                }),
            },
        }
    }
}

/// Server-side rate limit: 429 with `Retry-After` and RateLimit headers.
#[derive(Debug, Clone)]
pub struct ServerRateLimit<S> {
    inner: S,
    limiter: Arc<RateLimiter>,
}

/// Builds [`ServerRateLimit`].
#[derive(Debug, Clone)]
pub struct ServerRateLimitLayer {
    limiter: Arc<RateLimiter>,
}

impl ServerRateLimitLayer {
    /// A layer with a new limiter (`service` is this service's name, for metrics).
    pub fn new(service: impl Into<Arc<str>>, policy: Live<RateLimitConfig>) -> Self {
        Self {
            limiter: RateLimiter::new(service, policy),
        }
    }
}

impl<S> Layer<S> for ServerRateLimitLayer {
    type Service = ServerRateLimit<S>;
    fn layer(&self, inner: S) -> ServerRateLimit<S> {
        ServerRateLimit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// Response extension on the 429 a [`ServerRateLimit`] answers itself: keel refusing the work,
/// which says nothing about the load on the server (an inbound shedding limit above does not
/// take it as a drop).
#[derive(Debug, Clone, Copy)]
pub(crate) struct OwnRefusal;

fn secs_ceil(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The name of the one quota policy keel's inbound limit announces, in `RateLimit-Policy` and
/// `RateLimit` (a Structured Fields String; an application's own policies, appended to the same
/// fields, keep their names).
pub const POLICY_NAME: &str = "keel";

/// The largest Integer a Structured Field can carry (RFC 9651 §3.3.1).
const SF_INTEGER_MAX: u64 = 999_999_999_999_999;

/// The `RateLimit-Policy` member for a policy: `"keel";q=BURST;w=WINDOW`, where the window is
/// the time the bucket takes to fill from empty (`burst / rate`), in whole seconds rounded up,
/// at least 1. A client that keeps to `q` calls per `w` seconds is never refused by this limit
/// (at most `burst` at once, and on average no faster than `rate`); the limit may allow more.
pub fn policy_header(cfg: &RateLimitConfig) -> HeaderValue {
    let window = (f64::from(cfg.burst.max(1)) / cfg.rate.max(1e-9)).ceil();
    let window = if window.is_finite() {
        (window as u64).clamp(1, SF_INTEGER_MAX)
    } else {
        SF_INTEGER_MAX
    };
    sf_value(format!(
        "\"{POLICY_NAME}\";q={};w={window}",
        cfg.burst.max(1)
    ))
}

/// The `RateLimit` member for a decision: `"keel";r=REMAINING;t=RESET`: the calls the key may
/// still make at once, and the seconds (rounded up) until its whole burst is available again.
pub fn limit_header(d: &Decision) -> HeaderValue {
    sf_value(format!(
        "\"{POLICY_NAME}\";r={};t={}",
        d.remaining.min(SF_INTEGER_MAX),
        secs_ceil(d.reset).min(SF_INTEGER_MAX)
    ))
}

fn sf_value(s: String) -> HeaderValue {
    // Digits, a quoted token and `;=`: always a valid header value.
    HeaderValue::try_from(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Writes the RateLimit header fields of `draft-ietf-httpapi-ratelimit-headers` (the Structured
/// Fields form of drafts 08 to 11) for a decision under `cfg`, and `Retry-After` on a
/// refusal:
///
/// ```text
/// RateLimit-Policy: "keel";q=100;w=1
/// RateLimit: "keel";r=0;t=1
/// Retry-After: 1
/// ```
///
/// Both fields are appended, so policies an application announces on its own responses stay.
pub fn write_headers(h: &mut http::HeaderMap, cfg: &RateLimitConfig, d: &Decision) {
    h.append(RATELIMIT_POLICY, policy_header(cfg));
    h.append(RATELIMIT, limit_header(d));
    if !d.allowed {
        h.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from(secs_ceil(d.retry_after).max(1)),
        );
    }
}

/// `RateLimit-Policy`.
pub const RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");
/// `RateLimit`.
pub const RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");

impl<S, B, RB> Service<http::Request<B>> for ServerRateLimit<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Error: Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = BoxFut<http::Response<RB>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let cfg = self.limiter.policy.get();
        if !cfg.enabled {
            // Off: no key, no clone of the inner service, straight through.
            return Box::pin(self.inner.call(req));
        }
        let key = request_key(&cfg.key, &req).to_owned();
        let limiter = self.limiter.clone();
        let clone = self.inner.clone();
        let mut svc = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let d = limiter.check_with(&cfg, &key).await;
            if !d.allowed {
                let mut res = http::Response::new(RB::default());
                *res.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
                res.extensions_mut().insert(OwnRefusal);
                write_headers(res.headers_mut(), &cfg, &d);
                return Ok(res);
            }
            let mut res = svc.call(req).await?;
            write_headers(res.headers_mut(), &cfg, &d);
            Ok(res)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{service_fn, ServiceExt};

    #[tokio::test(start_paused = true)]
    async fn client_and_server_sides() {
        let policy = Live::new(RateLimitConfig {
            enabled: true,
            rate: 10.0,
            burst: 2,
            key: KeySource::Header(http::HeaderName::from_static("x-tenant")),
            ..Default::default()
        });
        let inner = service_fn(|_r: http::Request<()>| async {
            Ok::<_, BoxError>(http::Response::new(String::new()))
        });
        let client = RateLimitLayer::new("svc", policy.clone()).layer(inner);
        let req = |t: &str| {
            http::Request::builder()
                .header("x-tenant", t)
                .body(())
                .unwrap()
        };
        assert!(client.clone().oneshot(req("a")).await.is_ok());
        assert!(client.clone().oneshot(req("a")).await.is_ok());
        let e = client.clone().oneshot(req("a")).await.unwrap_err();
        assert_eq!(
            ResilienceError::find(e.as_ref()),
            Some(&ResilienceError::RateLimited {
                retry_after: std::time::Duration::from_millis(100)
            })
        );
        assert!(client.clone().oneshot(req("b")).await.is_ok(), "per key");

        let server = ServerRateLimitLayer::new("me", policy).layer(inner);
        let ok = server.clone().oneshot(req("c")).await.unwrap();
        assert_eq!(ok.headers()["ratelimit"], "\"keel\";r=1;t=1");
        let _ = server.clone().oneshot(req("c")).await.unwrap();
        let no = server.clone().oneshot(req("c")).await.unwrap();
        assert_eq!(no.status(), 429);
        assert_eq!(no.headers()["retry-after"], "1");
        assert_eq!(no.headers()["ratelimit-policy"], "\"keel\";q=2;w=1");
    }

    /// A header key is the header's text, beyond ASCII too: tenants whose names are not ASCII
    /// do not share one limit (with each other, and with the calls that name no tenant).
    #[tokio::test(start_paused = true)]
    async fn header_keys_beyond_ascii_are_their_own() {
        let policy = Live::new(RateLimitConfig {
            enabled: true,
            rate: 0.001,
            burst: 1,
            key: KeySource::Header(http::HeaderName::from_static("x-tenant")),
            ..Default::default()
        });
        let inner = service_fn(|_r: http::Request<()>| async {
            Ok::<_, BoxError>(http::Response::new(String::new()))
        });
        let server = ServerRateLimitLayer::new("me", policy).layer(inner);
        let req = |tenant: Option<&str>| {
            let mut b = http::Request::builder();
            if let Some(t) = tenant {
                b = b.header("x-tenant", HeaderValue::from_bytes(t.as_bytes()).unwrap());
            }
            b.body(()).unwrap()
        };
        let mut statuses = Vec::new();
        for tenant in [Some("café"), Some("naïve"), None, Some("café")] {
            let r = server.clone().oneshot(req(tenant)).await.unwrap();
            statuses.push(r.status().as_u16());
        }
        assert_eq!(statuses, [200, 200, 200, 429]);
    }

    /// The fields are the Structured Fields form of the current draft (`RateLimit-Policy` and
    /// `RateLimit`, a named policy with `q`/`w` and `r`/`t`), not the older
    /// `RateLimit-Limit`/`-Remaining`/`-Reset`; an application's own policies stay beside keel's.
    #[tokio::test(start_paused = true)]
    async fn headers_are_the_current_drafts_structured_fields() {
        // 5 at once, 1 per 2 s: the bucket fills from empty in 10 s.
        let policy = Live::new(RateLimitConfig {
            enabled: true,
            rate: 0.5,
            burst: 5,
            ..Default::default()
        });
        let inner = service_fn(|_r: http::Request<()>| async {
            let mut res = http::Response::new(String::new());
            res.headers_mut().insert(
                RATELIMIT_POLICY,
                HeaderValue::from_static("\"app\";q=10;w=60"),
            );
            Ok::<_, BoxError>(res)
        });
        let server = ServerRateLimitLayer::new("me", policy).layer(inner);
        let mut statuses = Vec::new();
        let mut last = None;
        for _ in 0..6 {
            let r = server
                .clone()
                .oneshot(http::Request::new(()))
                .await
                .unwrap();
            statuses.push(r.status().as_u16());
            last = Some(r);
        }
        assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
        let refused = last.unwrap();
        let h = refused.headers();
        for old in ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"] {
            assert!(!h.contains_key(old), "{old}: {h:?}");
        }
        assert_eq!(h["ratelimit-policy"], "\"keel\";q=5;w=10");
        assert_eq!(h["ratelimit"], "\"keel\";r=0;t=10");
        assert_eq!(h["retry-after"], "2");

        let allowed = server.clone();
        tokio::time::advance(std::time::Duration::from_secs(2)).await;
        let r = allowed.oneshot(http::Request::new(())).await.unwrap();
        assert_eq!(r.status(), 200);
        let policies: Vec<_> = r.headers().get_all("ratelimit-policy").iter().collect();
        assert_eq!(policies, ["\"app\";q=10;w=60", "\"keel\";q=5;w=10"]);
        assert_eq!(r.headers()["ratelimit"], "\"keel\";r=0;t=10");

        // A rate faster than the burst per second still announces a whole-second window.
        let fast = RateLimitConfig {
            rate: 1000.0,
            burst: 10,
            ..Default::default()
        };
        assert_eq!(policy_header(&fast), "\"keel\";q=10;w=1");
    }
}
