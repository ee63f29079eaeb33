//! One conformance suite, run against both stores: the memory store and Redis (the machine's
//! shared Redis, with a unique key prefix per test).
#![cfg(feature = "redis")]

mod common;

use std::{collections::HashMap, sync::atomic::Ordering, sync::Arc, time::Duration};

use common::*;
use keel_idempotency::{
    IdempotencyConfig, IdempotencyError, IdempotencyLayer, IdempotencyStore, Idempotent,
    OnStoreError, RunError,
};
use reqwest::StatusCode;

fn is_problem(r: &reqwest::Response) -> bool {
    r.headers()
        .get("content-type")
        .map(|v| v == "application/problem+json")
        .unwrap_or(false)
}

async fn post(c: &reqwest::Client, url: &str, key: Option<&str>, body: &str) -> reqwest::Response {
    let mut b = c.post(url).body(body.to_owned());
    if let Some(k) = key {
        b = b.header("Idempotency-Key", k).header("x-test-tag", k);
    }
    b.send().await.unwrap()
}

async fn thousand_over_fifty(store: Arc<dyn IdempotencyStore>) {
    // A lease far above any scheduling delay: this test is about claim atomicity; lease expiry
    // (which allows a second execution by design) has tests of its own.
    let app = start(
        store,
        IdempotencyConfig {
            lease: Duration::from_secs(10),
            store_timeout: Duration::from_secs(10),
            ..test_config()
        },
    )
    .await;
    app.seen.default_ms.store(100, Ordering::SeqCst);
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let c = c.clone();
        let url = app.url("/work");
        tasks.push(tokio::spawn(async move {
            let key = format!("\"k-{}\"", i % 50);
            let r = post(&c, &url, Some(&key), "{\"amount\":10}").await;
            let status = r.status();
            let replayed = r.headers().get("idempotent-replayed").is_some();
            let problem = is_problem(&r);
            let retry_after = r.headers().get("retry-after").is_some();
            (
                i % 50,
                status,
                replayed,
                problem,
                retry_after,
                r.bytes().await.unwrap(),
            )
        }));
    }
    let mut bodies: HashMap<usize, Vec<bytes::Bytes>> = HashMap::new();
    let (mut created, mut conflicts, mut lease_lost) = (0, 0, 0);
    for t in tasks {
        let (k, status, _replayed, problem, retry_after, body) = t.await.unwrap();
        match status {
            StatusCode::CREATED => {
                created += 1;
                bodies.entry(k).or_default().push(body);
            }
            StatusCode::CONFLICT => {
                assert!(
                    problem && retry_after,
                    "409 must be problem+json with Retry-After"
                );
                conflicts += 1;
                if String::from_utf8_lossy(&body).contains("lease-lost") {
                    lease_lost += 1;
                }
            }
            other => panic!("unexpected status {other}"),
        }
    }
    eprintln!(
        "execs {} created {created} conflicts {conflicts} stale {lease_lost} lease_lost_seen {} per_key>1: {:?}",
        app.seen.execs(),
        app.seen.lease_lost_seen.load(Ordering::SeqCst),
        app.seen.per_key.lock().unwrap().iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    assert_eq!(
        app.seen.execs(),
        50,
        "handler body runs exactly once per key"
    );
    assert!(app.seen.per_key.lock().unwrap().values().all(|&n| n == 1));
    assert_eq!(created + conflicts, 1000);
    // Every 201 for one key is byte-identical (the original or a replay).
    for (k, bs) in &bodies {
        assert!(bs.iter().all(|b| b == &bs[0]), "key {k}: replays differ");
    }
    // Afterwards every key replays, byte for byte, with the replay header and allow-listed headers only.
    for k in 0..50 {
        let r = post(
            &c,
            &app.url("/work"),
            Some(&format!("\"k-{k}\"")),
            "{\"amount\":10}",
        )
        .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(r.headers()["idempotent-replayed"], "true");
        assert_eq!(r.headers()["content-type"], "application/json");
        assert!(r.headers().get("x-not-replayed").is_none());
        let body = r.bytes().await.unwrap();
        if let Some(bs) = bodies.get(&k) {
            assert_eq!(body, bs[0]);
        }
    }
    assert_eq!(app.seen.execs(), 50);
}

async fn missing_and_malformed(store: Arc<dyn IdempotencyStore>) {
    let app = start(store, test_config()).await;
    let c = client();
    let r = post(&c, &app.url("/work"), None, "x").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(is_problem(&r));
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["status"], 400);
    for bad in ["\"unterminated", "two words", "\"\"", &"a".repeat(256)] {
        let r = post(&c, &app.url("/work"), Some(bad), "x").await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad:?}");
        assert!(is_problem(&r));
    }
    let r = c
        .post(app.url("/work"))
        .header("Idempotency-Key", "a")
        .header("Idempotency-Key", "b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(app.seen.execs(), 0);
    // Optional route: no key passes through; a bare token works too.
    assert_eq!(
        post(&c, &app.url("/optional"), None, "x").await.status(),
        StatusCode::CREATED
    );
    assert_eq!(
        post(&c, &app.url("/optional"), Some("bare-token-1"), "x")
            .await
            .status(),
        StatusCode::CREATED
    );
    let r = post(&c, &app.url("/optional"), Some("\"bare-token-1\""), "x").await;
    assert_eq!(
        r.headers()["idempotent-replayed"],
        "true",
        "sf-string and bare token are the same key"
    );
    assert_eq!(app.seen.execs(), 2);
    // Methods not configured pass through.
    assert_eq!(
        c.get(app.url("/plain")).send().await.unwrap().status(),
        StatusCode::METHOD_NOT_ALLOWED
    );
}

async fn mismatch(store: Arc<dyn IdempotencyStore>) {
    let app = start(store, test_config()).await;
    let c = client();
    assert_eq!(
        post(&c, &app.url("/work"), Some("m1"), "{\"amount\":1}")
            .await
            .status(),
        StatusCode::CREATED
    );
    let r = post(&c, &app.url("/work"), Some("m1"), "{\"amount\":2}").await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(is_problem(&r));
    assert_eq!(app.seen.execs(), 1);
}

async fn same_key_other_resource(store: Arc<dyn IdempotencyStore>) {
    let app = start(store, test_config()).await;
    let c = client();
    let first = post(&c, &app.url("/orders/1/refund"), Some("r1"), "{}").await;
    assert_eq!(first.status(), StatusCode::CREATED);
    // One route template, another resource: not a replay of order 1's answer.
    let other = post(&c, &app.url("/orders/2/refund"), Some("r1"), "{}").await;
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(is_problem(&other));
    let query = post(&c, &app.url("/orders/1/refund?full=1"), Some("r1"), "{}").await;
    assert_eq!(query.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let again = post(&c, &app.url("/orders/1/refund"), Some("r1"), "{}").await;
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(app.seen.execs(), 1);
}

/// Leases and retention far beyond what the config reader accepts (set in code) work as
/// "very long" instead of overflowing the clock or `PEXPIRE`.
async fn huge_durations(store: Arc<dyn IdempotencyStore>) {
    let key = format!("huge-{}", keel_idempotency::new_owner());
    let claim = store.claim(&key, "o1", "fp", Duration::MAX).await.unwrap();
    assert!(
        matches!(claim, keel_idempotency::Claim::New { .. }),
        "{claim:?}"
    );
    store.renew(&key, "o1", Duration::MAX).await.unwrap();
    store
        .complete(&key, "o1", bytes::Bytes::from_static(b"r"), Duration::MAX)
        .await
        .unwrap();
    let again = store.claim(&key, "o2", "fp", Duration::MAX).await.unwrap();
    assert!(
        matches!(again, keel_idempotency::Claim::Completed(_)),
        "{again:?}"
    );
    let run = Idempotent::new(store)
        .lease(Duration::MAX)
        .ttl(Duration::MAX)
        .wait(Duration::MAX);
    let v: u32 = run
        .run(&format!("{key}-fn"), || async {
            Ok::<_, std::io::Error>(7)
        })
        .await
        .unwrap();
    assert_eq!(v, 7);
}

async fn tenants(store: Arc<dyn IdempotencyStore>) {
    let app = start(store, test_config()).await;
    let c = client();
    for t in ["acme", "globex", "acme", "globex"] {
        let r = c
            .post(app.url("/work"))
            .header("Idempotency-Key", "same")
            .header("x-tenant", t)
            .body("b")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    assert_eq!(app.seen.execs(), 2, "one execution per tenant");
}

async fn scope_from_header_and_extension(store: Arc<dyn IdempotencyStore>) {
    let app = start(
        store,
        IdempotencyConfig {
            scope_header: Some("x-org".into()),
            ..test_config()
        },
    )
    .await;
    let c = client();
    let send = |org: &'static str, tenant: Option<&'static str>| {
        let mut b = c
            .post(app.url("/work"))
            .header("Idempotency-Key", "same")
            .header("x-org", org)
            .body("b");
        if let Some(t) = tenant {
            b = b.header("x-tenant", t);
        }
        b.send()
    };
    assert!(send("a", None)
        .await
        .unwrap()
        .headers()
        .get("idempotent-replayed")
        .is_none());
    assert!(send("b", None)
        .await
        .unwrap()
        .headers()
        .get("idempotent-replayed")
        .is_none());
    assert!(send("a", None)
        .await
        .unwrap()
        .headers()
        .get("idempotent-replayed")
        .is_some());
    // The extension set by authentication wins over the header.
    assert!(send("a", Some("t1"))
        .await
        .unwrap()
        .headers()
        .get("idempotent-replayed")
        .is_none());
    assert!(send("b", Some("t1"))
        .await
        .unwrap()
        .headers()
        .get("idempotent-replayed")
        .is_some());
    assert_eq!(app.seen.execs(), 3);
}

async fn slow_handler_outlives_lease(store: Arc<dyn IdempotencyStore>) {
    let app = start(
        store,
        IdempotencyConfig {
            lease: Duration::from_millis(500),
            ..test_config()
        },
    )
    .await;
    app.seen.sleeps.lock().unwrap().push(1_500);
    let c = client();
    let first = tokio::spawn({
        let (c, u) = (c.clone(), app.url("/work"));
        async move { post(&c, &u, Some("slow"), "b").await.status() }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut conflicts = 0;
    while !first.is_finished() {
        let r = post(&c, &app.url("/work"), Some("slow"), "b").await;
        if r.status() == StatusCode::CONFLICT {
            conflicts += 1;
        } else {
            assert_eq!(r.headers()["idempotent-replayed"], "true");
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert_eq!(first.await.unwrap(), StatusCode::CREATED);
    assert!(
        conflicts >= 5,
        "duplicates during the run were refused ({conflicts})"
    );
    assert_eq!(app.seen.execs(), 1);
    assert_eq!(app.seen.lease_lost_seen.load(Ordering::SeqCst), 0);
}

async fn lease_lost(store: Arc<dyn IdempotencyStore>) {
    let faulty = Faulty::new(store);
    let app = start(
        faulty.clone(),
        IdempotencyConfig {
            lease: Duration::from_millis(300),
            ..test_config()
        },
    )
    .await;
    app.seen.sleeps.lock().unwrap().extend([1200, 10]);
    faulty.block_renew.store(true, Ordering::SeqCst);
    let c = client();
    let first = tokio::spawn({
        let (c, u) = (c.clone(), app.url("/work"));
        async move {
            let r = post(&c, &u, Some("lost"), "b").await;
            (r.status(), is_problem(&r))
        }
    });
    // The lease (300ms) runs out unrenewed; a second claimant takes over and runs.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = post(&c, &app.url("/work"), Some("lost"), "b").await;
    assert_eq!(second.status(), StatusCode::CREATED);
    assert!(second.headers().get("idempotent-replayed").is_none());
    let second_body = second.bytes().await.unwrap();
    // The first finishes later: its completion is refused as stale owner.
    let (status, problem) = first.await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(problem);
    assert_eq!(app.seen.execs(), 2);
    assert_eq!(
        app.seen.lease_lost_seen.load(Ordering::SeqCst),
        1,
        "first handler was told"
    );
    let fences = app.seen.fences.lock().unwrap().clone();
    assert!(fences[1] > fences[0], "fencing token grows: {fences:?}");
    // The canonical answer is the second's.
    let r = post(&c, &app.url("/work"), Some("lost"), "b").await;
    assert_eq!(r.bytes().await.unwrap(), second_body);
}

async fn disconnect(store: Arc<dyn IdempotencyStore>) {
    // A long lease on `/work`, so only a release (not an expiry) can free it quickly; `/expire`
    // overrides the lease to 600ms.
    let app = start(
        store,
        IdempotencyConfig {
            lease: Duration::from_secs(30),
            ..test_config()
        },
    )
    .await;
    let c = client();
    let retry_until_created = |path: &'static str, key: String| {
        let (c, url) = (c.clone(), app.url(path));
        async move {
            let started = std::time::Instant::now();
            loop {
                let r = post(&c, &url, Some(&key), "b").await;
                if r.status() == StatusCode::CREATED {
                    return;
                }
                assert_eq!(r.status(), StatusCode::CONFLICT);
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "key never freed"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    for (path, released) in [("/work", true), ("/expire", false)] {
        app.seen.sleeps.lock().unwrap().push(20_000);
        let key = format!("gone{path}");
        let t0 = std::time::Instant::now();
        let r = c
            .post(app.url(path))
            .header("Idempotency-Key", &key)
            .body("b")
            .timeout(Duration::from_millis(200))
            .send()
            .await;
        assert!(r.is_err(), "client gave up");
        let before = app.seen.execs();
        if !released {
            // Right after the disconnect the key is still held.
            let r = post(&c, &app.url(path), Some(&key), "b").await;
            assert_eq!(
                r.status(),
                StatusCode::CONFLICT,
                "expire: held until the lease runs out"
            );
        }
        retry_until_created(path, key).await;
        let freed_after = t0.elapsed();
        if released {
            assert!(
                freed_after < Duration::from_secs(5),
                "released long before the 30s lease"
            );
        } else {
            assert!(
                freed_after >= Duration::from_millis(550),
                "held for the 600ms lease: {freed_after:?}"
            );
        }
        assert_eq!(app.seen.execs(), before + 1, "one new execution");
    }
}

async fn panic_and_5xx_release(store: Arc<dyn IdempotencyStore>) {
    let app = start(store, test_config()).await;
    let c = client();
    app.seen.panics_left.store(1, Ordering::SeqCst);
    let r = post(&c, &app.url("/work"), Some("p"), "b").await;
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(is_problem(&r));
    assert_eq!(
        post(&c, &app.url("/work"), Some("p"), "b").await.status(),
        StatusCode::CREATED
    );
    app.seen.fails_left.store(1, Ordering::SeqCst);
    assert_eq!(
        post(&c, &app.url("/work"), Some("f"), "b").await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        post(&c, &app.url("/work"), Some("f"), "b").await.status(),
        StatusCode::CREATED
    );
    assert_eq!(app.seen.execs(), 4);
}

async fn store_down(store: Arc<dyn IdempotencyStore>) {
    let faulty = Faulty::new(store);
    let app = start(faulty.clone(), test_config()).await;
    let c = client();
    faulty.down.store(true, Ordering::SeqCst);
    let r = post(&c, &app.url("/work"), Some("d"), "b").await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().get("retry-after").is_some() && is_problem(&r));
    assert_eq!(app.seen.execs(), 0, "fail closed: nothing ran");
    // Fail open, per route.
    let store: Arc<dyn IdempotencyStore> = faulty.clone();
    let router = axum::Router::new().route(
        "/open",
        axum::routing::post(|| async { "ran" }).layer(
            IdempotencyLayer::new(store, keel_core::Live::new(test_config()))
                .on_store_error(OnStoreError::FailOpen),
        ),
    );
    let svc = tower::ServiceExt::oneshot(
        router,
        http::Request::post("/open")
            .header("Idempotency-Key", "o")
            .body(axum::body::Body::empty())
            .unwrap(),
    );
    assert_eq!(svc.await.unwrap().status(), http::StatusCode::OK);
    faulty.down.store(false, Ordering::SeqCst);
    assert_eq!(
        post(&c, &app.url("/work"), Some("d"), "b").await.status(),
        StatusCode::CREATED
    );
}

async fn function_api(store: Arc<dyn IdempotencyStore>) {
    let once = Idempotent::new(store)
        .scope("jobs")
        .lease(Duration::from_millis(300));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..3 {
        let calls = calls.clone();
        let v: Vec<String> = once
            .run("job-1", || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(vec!["done".to_owned()])
            })
            .await
            .unwrap();
        assert_eq!(v, vec!["done".to_owned()]);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // A failure releases the key; the next run executes.
    let r: Result<u8, RunError<&str>> = once.run("job-2", || async { Err("boom") }).await;
    assert!(matches!(r, Err(RunError::Failed("boom"))) && r.as_ref().unwrap_err().is_retryable());
    let r: Result<u8, RunError<&str>> = once.run("job-2", || async { Ok(5) }).await;
    assert_eq!(r.unwrap(), 5);
    // A run in progress: the concurrent caller is told, with a retryable error.
    let slow = tokio::spawn({
        let once = once.clone();
        async move {
            once.run("job-3", || async {
                tokio::time::sleep(Duration::from_millis(400)).await;
                Ok::<_, std::io::Error>(1u8)
            })
            .await
            .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r: Result<u8, RunError<std::io::Error>> = once.run("job-3", || async { Ok(2) }).await;
    assert!(matches!(
        r,
        Err(RunError::Idempotency(IdempotencyError::InProgress { .. }))
    ));
    assert_eq!(slow.await.unwrap(), 1);
    let waited: u8 = once
        .clone()
        .wait(Duration::from_secs(1))
        .run("job-3", || async { Ok::<_, std::io::Error>(9) })
        .await
        .unwrap();
    assert_eq!(waited, 1);
}

async fn hot_policy(store: Arc<dyn IdempotencyStore>) {
    let app = start(store, test_config()).await;
    let c = client();
    // `/optional` becomes required by a reload, and the header name changes.
    app.config.store(IdempotencyConfig {
        required: true,
        header: "X-Request-Key".into(),
        ..test_config()
    });
    assert_eq!(
        post(&c, &app.url("/optional"), None, "b").await.status(),
        StatusCode::BAD_REQUEST
    );
    let r = c
        .post(app.url("/optional"))
        .header("X-Request-Key", "h")
        .body("b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

async fn wait_then_replay_and_body_limit(store: Arc<dyn IdempotencyStore>) {
    let app = start(
        store,
        IdempotencyConfig {
            on_conflict: keel_idempotency::OnConflict::Wait,
            conflict_wait: Duration::from_secs(3),
            max_body_bytes: 64,
            ..test_config()
        },
    )
    .await;
    app.seen.sleeps.lock().unwrap().push(300);
    let c = client();
    let first = tokio::spawn({
        let (c, u) = (c.clone(), app.url("/work"));
        async move { post(&c, &u, Some("w"), "b").await.bytes().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = post(&c, &app.url("/work"), Some("w"), "b").await;
    assert_eq!(
        second.status(),
        StatusCode::CREATED,
        "waited instead of 409"
    );
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    assert_eq!(second.bytes().await.unwrap(), first.await.unwrap());
    assert_eq!(app.seen.execs(), 1);
    let r = post(&c, &app.url("/work"), Some("big"), &"x".repeat(65)).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(is_problem(&r));
    assert_eq!(app.seen.execs(), 1);
}

macro_rules! conformance {
    ($store:ident) => {
        mod $store {
            use super::*;
            conformance!(@tests $store; thousand_over_fifty, missing_and_malformed, mismatch, same_key_other_resource, huge_durations, tenants,
                slow_handler_outlives_lease, lease_lost, disconnect, panic_and_5xx_release, store_down,
                function_api, hot_policy, wait_then_replay_and_body_limit, scope_from_header_and_extension);
        }
    };
    (@tests $store:ident; $($t:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $t() {
                super::$t(common::$store().await).await;
            }
        )*
    };
}

conformance!(memory_store);
conformance!(redis_store);
