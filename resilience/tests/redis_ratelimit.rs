//! The distributed limiter against real Redis servers on loopback.
#![cfg(feature = "redis")]

use std::{sync::Arc, time::Duration};

use keel_core::{Live, Ratio};
use keel_resilience::{RateLimitConfig, RateLimitScope, RateLimiter};
use keel_testkit::{shared_redis_url, unique_prefix, RedisServer};

fn policy(url: String, prefix: String, rate: f64, burst: u32, share: f64) -> Live<RateLimitConfig> {
    Live::new(RateLimitConfig {
        enabled: true,
        rate,
        burst,
        scope: RateLimitScope::Redis,
        redis_url: Some(url),
        redis_prefix: prefix,
        redis_timeout: Duration::from_millis(100),
        local_share: Ratio::new(share).unwrap(),
        ..Default::default()
    })
}

/// Two clients, each with its own limiter and connection, offered more than the rate: together
/// they get the global rate within 5%.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_hold_the_global_rate() {
    let prefix = unique_prefix("rl-global");
    let (rate, burst) = (200.0, 10u32);
    let a = RateLimiter::new(
        "a",
        policy(shared_redis_url(), prefix.clone(), rate, burst, 0.5),
    );
    let b = RateLimiter::new("b", policy(shared_redis_url(), prefix, rate, burst, 0.5));
    // Warm both connections (and load the script) without spending the key.
    let _ = a.check("warmup").await;
    let _ = b.check("warmup").await;
    let run = Duration::from_secs(2);
    let start = tokio::time::Instant::now();
    let client = |l: Arc<RateLimiter>| {
        tokio::spawn(async move {
            let mut allowed = 0u64;
            let mut decisions = 0u64;
            while start.elapsed() < run {
                if l.check("k").await.allowed {
                    allowed += 1;
                }
                decisions += 1;
                // ~4x the rate offered in total.
                tokio::time::sleep(Duration::from_micros(2500)).await;
            }
            (allowed, decisions)
        })
    };
    let (ta, tb) = (client(a), client(b));
    let (ra, rb) = (ta.await.unwrap(), tb.await.unwrap());
    let elapsed = start.elapsed().as_secs_f64();
    let allowed = (ra.0 + rb.0) as f64;
    let expected = rate * elapsed + burst as f64;
    let err = (allowed - expected).abs() / expected;
    eprintln!(
        "allowed {allowed} of {} decisions, expected {expected:.0}, error {:.2}%",
        ra.1 + rb.1,
        err * 100.0
    );
    assert!(err <= 0.05, "allowed {allowed}, expected {expected}");
    assert!(
        ra.0 > 0 && rb.0 > 0,
        "both clients were served: {ra:?} {rb:?}"
    );
}

/// Killing the test's own Redis: decisions continue from the local share, without errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_falls_back_to_local_share() {
    let mut server = RedisServer::start();
    let prefix = unique_prefix("rl-down");
    let l = RateLimiter::new("svc", policy(server.url(), prefix.clone(), 100.0, 10, 0.25));
    assert!(l.check("k").await.allowed);
    server.stop();
    // Share: 25 per second, burst ceil(2.5) = 3. Offer 200/s for 1 s.
    let start = tokio::time::Instant::now();
    let mut allowed = 0u64;
    while start.elapsed() < Duration::from_secs(1) {
        if l.check("k").await.allowed {
            allowed += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let expected = 25.0 * start.elapsed().as_secs_f64() + 3.0;
    assert!(
        (allowed as f64 - expected).abs() <= expected * 0.2 + 2.0,
        "allowed {allowed}, expected {expected}"
    );
    // Redis back: decisions come from it again (within the one-second back-off).
    server.restart();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut from_redis = false;
    for _ in 0..40 {
        let _ = l.check("fresh").await;
        let v: Option<i64> = redis::cmd("GET")
            .arg(format!("{prefix}:fresh"))
            .query_async(&mut conn)
            .await
            .unwrap();
        if v.is_some() {
            from_redis = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(from_redis, "decisions went back to Redis");
}

/// The whole client stack with a Redis-scoped limit: the decision comes from Redis (the key is
/// written there), a refusal is `RateLimited` with its wait, and the per-try deadline header still
/// reaches the upstream on that path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_stack_takes_its_decisions_from_redis() {
    use keel_resilience::{
        BoxError, ClientStackLayer, KeySource, ResilienceConfig, ResilienceError,
    };
    use tower::{Layer, ServiceExt};
    let prefix = unique_prefix("rl-stack");
    let mut rate_limit = policy(shared_redis_url(), prefix.clone(), 1.0, 2, 0.5)
        .load()
        .as_ref()
        .clone();
    rate_limit.key = KeySource::Path;
    let cfg = ResilienceConfig {
        rate_limit,
        ..Default::default()
    };
    let stack = ClientStackLayer::try_new("rl-stack", Live::new(cfg)).unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let client = stack.layer(
        keel_resilience::PropagateDeadlineLayer.layer(tower::service_fn(
            move |req: http::Request<()>| {
                s2.lock()
                    .unwrap()
                    .push(keel_resilience::remaining_from_header(req.headers()));
                async { Ok::<_, BoxError>(http::Response::new(())) }
            },
        )),
    );
    let call = || {
        client
            .clone()
            .oneshot(http::Request::get("/orders").body(()).unwrap())
    };
    // Burst 2: two through, the third refused with the time until the next token.
    assert!(call().await.is_ok());
    assert!(call().await.is_ok());
    let e = call().await.unwrap_err();
    match ResilienceError::find(e.as_ref()) {
        Some(ResilienceError::RateLimited { retry_after }) => {
            assert!(!retry_after.is_zero() && *retry_after <= Duration::from_secs(1))
        }
        other => panic!("{other:?} from {e}"),
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert!(seen
        .iter()
        .all(|d| d.is_some_and(|d| d <= Duration::from_secs(3))));
    // The state is in Redis, under the path key.
    let client = redis::Client::open(shared_redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let v: Option<i64> = redis::cmd("GET")
        .arg(format!("{prefix}:/orders"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(v.is_some(), "decided in Redis");
}
