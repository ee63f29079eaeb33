//! The client's request building and the status and restart reporting, against real sockets.

use std::time::Duration;

use keel::{keel_core::Shutdown, ClientError, Keel};
use keel_testkit::HttpBackend;

async fn keel_with(dir: &tempfile::TempDir, text: &str) -> Keel {
    let path = dir.path().join("keel.toml");
    std::fs::write(&path, text).unwrap();
    Keel::builder("orders")
        .config_file(&path)
        .shutdown(Shutdown::new())
        .build()
        .await
        .unwrap()
}

/// keel with one client, `name`, over the one endpoint `addr` (and the directory of its file).
async fn one_endpoint(name: &str, addr: std::net::SocketAddr) -> (tempfile::TempDir, Keel) {
    let dir = tempfile::tempdir().unwrap();
    let keel = keel_with(
        &dir,
        &format!("[[clients.{name}.endpoints]]\naddr = \"{addr}\"\n"),
    )
    .await;
    (dir, keel)
}

#[tokio::test]
async fn idempotency_keys_are_checked_before_sending() {
    let backend = HttpBackend::start("one").await;
    let dir = tempfile::tempdir().unwrap();
    let keel = keel_with(
        &dir,
        &format!("[[clients.pay.endpoints]]\naddr = \"{}\"\n", backend.addr),
    )
    .await;
    let pay = keel.client("pay").unwrap();
    for bad in ["", "tab\there", "é", &"x".repeat(256)] {
        let err = pay
            .post("/x")
            .idempotency_key(bad)
            .send()
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::InvalidRequest { .. }),
            "{bad:?}: {err}"
        );
    }
    assert_eq!(backend.served(), 0, "nothing invalid was sent");
    // A good key, set twice: one header, the last value; a POST with a key may be retried.
    let ok = pay
        .post("/x")
        .idempotency_key("first")
        .idempotency_key("order \"42\"")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.served_by().map(|s| s.addr), Some(backend.addr));
    let bad_header = pay
        .get("/x")
        .header("bad header", "v")
        .send()
        .await
        .unwrap_err();
    assert!(matches!(bad_header, ClientError::InvalidRequest { .. }));
}

#[tokio::test]
async fn status_shows_limiters_and_restart_only_changes() {
    let backend = HttpBackend::start("one").await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[service]\nlisten = \"127.0.0.1:18080\"\n\n[clients.pay.rate_limit]\nenabled = true\nrate = 1.0\nburst = 1\n\n[[clients.pay.endpoints]]\naddr = \"{}\"\n",
        backend.addr
    );
    let keel = keel_with(&dir, &text).await;
    let pay = keel.client("pay").unwrap();
    pay.get("/x").send().await.unwrap();
    // One call per second, burst 1: the next call at once is refused by the limiter, locally.
    let limited = pay.get("/x").send().await.unwrap_err();
    assert!(matches!(limited, ClientError::Refused { .. }), "{limited}");
    assert!(limited.retry_after().is_some());
    assert_eq!(backend.served(), 1);
    let status = keel.status();
    let client = &status["clients"]["pay"];
    assert_eq!(client["rate_limit"]["enabled"], true, "{status}");
    assert!(client["rate_limit"]["tracked_keys"].is_u64(), "{status}");
    assert_eq!(client["breaker"]["state"], "Closed", "{status}");
    assert!(status["config"]["not_live_changes"]
        .as_array()
        .unwrap()
        .is_empty());

    // Keys a restart applies: listen, and a client moving from endpoints to discovery.
    let path = dir.path().join("keel.toml");
    std::fs::write(&path, "[service]\nlisten = \"127.0.0.1:18081\"\n").unwrap();
    keel.config().reload().unwrap();
    let changes = keel.not_live_changes();
    assert!(
        changes.iter().any(|c| c.contains("service.listen")),
        "{changes:?}"
    );
    assert!(
        changes.iter().any(|c| c.contains("clients.pay")),
        "{changes:?}"
    );
    // The client still calls its endpoints until restart (once the limiter allows again).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(pay.get("/x").send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn fallback_answers_when_the_breaker_is_open() {
    let backend = HttpBackend::start("one").await;
    let dir = tempfile::tempdir().unwrap();
    let keel = keel_with(
        &dir,
        &format!(
            "[clients.pay.breaker]\nforced_open = true\n\n[[clients.pay.endpoints]]\naddr = \"{}\"\n",
            backend.addr
        ),
    )
    .await;
    let plain = keel.client("pay").unwrap();
    let err = plain.get("/x").send().await.unwrap_err();
    assert!(matches!(err, ClientError::Refused { .. }), "{err}");
    let degraded = plain.clone().with_fallback(|why| {
        assert!(matches!(why, ClientError::Refused { .. }));
        Some(http::Response::new(bytes::Bytes::from_static(b"cached")))
    });
    let answer = degraded.get("/x").send().await.unwrap();
    assert_eq!(answer.text(), "cached");
    assert_eq!(
        backend.served(),
        0,
        "the open breaker sent nothing upstream"
    );
    // Not for upstream failures: with the breaker closed and the backend gone, the error stays.
    std::fs::write(
        dir.path().join("keel.toml"),
        format!(
            "[clients.pay.retry]\nmax_attempts = 1\n\n[[clients.pay.endpoints]]\naddr = \"{}\"\n",
            backend.addr
        ),
    )
    .unwrap();
    keel.config().reload().unwrap();
    backend.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let err = degraded.get("/x").send().await.unwrap_err();
    assert!(matches!(err, ClientError::Upstream { .. }), "{err}");
}

#[tokio::test]
async fn per_instance_breakers_take_a_failing_instance_out_of_rotation() {
    let good = HttpBackend::start("good").await;
    let bad = HttpBackend::start("bad").await;
    bad.set_status(503);
    let dir = tempfile::tempdir().unwrap();
    // Outlier detection and passive health off: only the instance's own breaker may act. The
    // service's breaker (same policy, 90%) sees half the calls fail and stays closed.
    let keel = keel_with(
        &dir,
        &instance_breakers(
            "minimum_calls = 4\nsize = 4\nopen_duration = \"500ms\"",
            "[clients.pay.retry]\nmax_attempts = 1",
            &[good.addr, bad.addr],
        ),
    )
    .await;
    let pay = keel.client("pay").unwrap();
    let mut failed = 0;
    for _ in 0..30 {
        if pay.get("/x").send().await.unwrap().status() == 503 {
            failed += 1;
        }
    }
    assert_eq!(
        failed, 4,
        "the bad instance's breaker opened after its 4th failure"
    );
    assert_eq!(bad.served(), 4);
    let snap = pay.balancer().snapshot();
    let out = snap.instances.iter().find(|i| i.addr == bad.addr).unwrap();
    assert_eq!(
        out.reason.as_deref(),
        Some("circuit breaker open"),
        "{out:?}"
    );
    // The service's own breaker (same policy, half the calls failed) is not affected.
    assert_eq!(
        format!("{:?}", pay.status()["breaker"]["state"]),
        "String(\"Closed\")"
    );
    // Recovered, and the open duration over: back in rotation (its breaker half-open, then
    // closed by the probes).
    bad.set_status(200);
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..20 {
        assert_eq!(pay.get("/x").send().await.unwrap().status(), 200);
    }
    assert!(bad.served() >= 4 + 8, "re-admitted: {}", bad.served());
}

#[tokio::test]
async fn an_open_instance_left_in_rotation_is_skipped_without_sending() {
    let good = HttpBackend::start("good").await;
    let bad1 = HttpBackend::start("bad1").await;
    let bad2 = HttpBackend::start("bad2").await;
    bad1.set_status(503);
    bad2.set_status(503);
    let dir = tempfile::tempdir().unwrap();
    // Three instances: only one may be ejected at a time (max_ejection_percent), so when both
    // bad instances' breakers open, one stays in rotation with its breaker open. Calls picked to
    // it are refused before they are sent and retried on another instance. The service's own
    // breaker (a 4-call window at 90%) never sees four failures in a row.
    let keel = keel_with(
        &dir,
        &instance_breakers(
            "minimum_calls = 4\nsize = 4\nopen_duration = \"10s\"",
            "",
            &[good.addr, bad1.addr, bad2.addr],
        ),
    )
    .await;
    let pay = keel.client("pay").unwrap();
    for _ in 0..40 {
        let _ = pay.get("/x").send().await;
    }
    let sent = (bad1.served(), bad2.served());
    assert_eq!(
        sent,
        (4, 4),
        "each bad instance took 4 calls before its breaker opened"
    );
    for _ in 0..20 {
        assert_eq!(pay.get("/x").send().await.unwrap().status(), 200);
    }
    assert_eq!(
        (bad1.served(), bad2.served()),
        sent,
        "nothing more reached them"
    );
    let snap = pay.balancer().snapshot();
    let ejected = snap
        .instances
        .iter()
        .filter(|i| i.reason.as_deref() == Some("circuit breaker open"))
        .count();
    assert_eq!(
        ejected, 1,
        "one ejected, the other refused by max_ejection_percent"
    );
    assert_eq!(
        format!("{:?}", pay.status()["breaker"]["state"]),
        "String(\"Closed\")"
    );
}

#[tokio::test]
async fn an_instance_breaker_counts_per_try_timeouts() {
    let good = HttpBackend::start("good").await;
    let hung = HttpBackend::start("hung").await;
    hung.set_latency(Duration::from_secs(5));
    let dir = tempfile::tempdir().unwrap();
    let keel = keel_with(
        &dir,
        &instance_breakers(
            "minimum_calls = 3\nsize = 3\nopen_duration = \"10s\"",
            // Long enough that the good instance never reaches it on a loaded machine.
            "[clients.pay.timeout]\nper_try = \"300ms\"\n\n[clients.pay.retry]\nmax_attempts = 1",
            &[good.addr, hung.addr],
        ),
    )
    .await;
    let pay = keel.client("pay").unwrap();
    let mut timed_out = 0;
    for _ in 0..20 {
        if pay.get("/x").send().await.is_err() {
            timed_out += 1;
        }
    }
    assert_eq!(timed_out, 3, "ejected after its third per-try timeout");
    let snap = pay.balancer().snapshot();
    let out = snap.instances.iter().find(|i| i.addr == hung.addr).unwrap();
    assert_eq!(
        out.reason.as_deref(),
        Some("circuit breaker open"),
        "{out:?}"
    );
}

/// An instance that leaves the set and comes back (an edit here; a lapsed registration in
/// discovery) keeps its breaker: still open, it is out of rotation again at once, and nothing
/// reaches it until the open time is over.
#[tokio::test]
async fn an_instance_that_leaves_and_returns_keeps_its_open_breaker() {
    let good = HttpBackend::start("good").await;
    let bad = HttpBackend::start("bad").await;
    bad.set_status(503);
    let dir = tempfile::tempdir().unwrap();
    let policy = "minimum_calls = 4\nsize = 4\nopen_duration = \"30s\"";
    let both = instance_breakers(policy, "", &[good.addr, bad.addr]);
    let keel = keel_with(&dir, &both).await;
    let pay = keel.client("pay").unwrap();
    for _ in 0..20 {
        let _ = pay.get("/x").send().await;
    }
    assert_eq!(bad.served(), 4, "its breaker opened after 4 failures");

    let path = dir.path().join("keel.toml");
    // Several times: which instance a round-robin pick lands on first depends on its state.
    for _ in 0..4 {
        std::fs::write(&path, instance_breakers(policy, "", &[good.addr])).unwrap();
        wait_instances(&pay, 1).await;
        // Back: out of rotation before any call can pick it. A POST without an idempotency key
        // is never retried, so one routed to it (refused by its open breaker) would fail.
        std::fs::write(&path, &both).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while pay.balancer().instances().len() != 2 {
            assert!(tokio::time::Instant::now() < deadline, "it never came back");
            assert_eq!(pay.post("/x").send().await.unwrap().status(), 200);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for _ in 0..5 {
            assert_eq!(pay.post("/x").send().await.unwrap().status(), 200);
        }
    }
    assert_eq!(
        bad.served(),
        4,
        "nothing reached it while its breaker is open"
    );
    let snap = pay.balancer().snapshot();
    let back = snap.instances.iter().find(|i| i.addr == bad.addr).unwrap();
    assert_eq!(
        back.reason.as_deref(),
        Some("circuit breaker open"),
        "{back:?}"
    );
}

/// Calls (so the client's tables follow the set) until the client sees `n` instances.
async fn wait_instances(client: &keel::Client, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while client.balancer().instances().len() != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saw {n} instances"
        );
        let _ = client.get("/x").send().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = client.get("/x").send().await;
}

/// `[clients.pay]` over `endpoints` where only the instances' own breakers act: per-instance
/// breakers at 90% (the service's breaker, same policy, stays closed), round robin, passive
/// health and outlier detection off. `breaker` adds lines to the breaker section; `extra` adds
/// whole sections.
fn instance_breakers(breaker: &str, extra: &str, endpoints: &[std::net::SocketAddr]) -> String {
    let mut toml = format!(
        "[clients.pay.breaker]\nper_instance = true\nfailure_rate_threshold = \"90%\"\n{breaker}\n\n\
         {extra}\n\n\
         [clients.pay.balance]\nstrategy = \"round-robin\"\n\n\
         [clients.pay.balance.passive]\nmax_fails = 0\n\n\
         [clients.pay.balance.outlier]\nenabled = false\n"
    );
    for addr in endpoints {
        toml.push_str(&format!("\n[[clients.pay.endpoints]]\naddr = \"{addr}\"\n"));
    }
    toml
}

/// What reaches the instance is what the caller wrote: the path and query byte for byte (the
/// instance's address stays the host, whatever the path holds), the caller's headers and the
/// trace context; what comes back keeps its status, headers and body.
#[tokio::test]
async fn requests_and_answers_arrive_as_written() {
    use axum::{http::HeaderMap, http::Uri, routing::any, Router};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().fallback(any(
        |uri: Uri, headers: HeaderMap, body: String| async move {
            let seen = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_owned()
            };
            (
                axum::http::StatusCode::ACCEPTED,
                axum::response::AppendHeaders([("x-echo", "yes"), ("x-tag", "a"), ("x-tag", "b")]),
                format!(
                    "{} {} tp={} body={body}",
                    uri,
                    seen("x-mine"),
                    seen("traceparent").len()
                ),
            )
        },
    ));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let (_dir, keel) = one_endpoint("echo", addr).await;
    let echo = keel.client("echo").unwrap();

    for (path, expected) in [
        ("/a/b?x=1&y=%20z", "/a/b?x=1&y=%20z"),
        ("no-slash", "/no-slash"),
        ("/p%2Fq?", "/p%2Fq?"),
        ("//other-host/x", "//other-host/x"),
        ("/?", "/?"),
    ] {
        let answer = echo
            .post(path)
            .header("x-mine", "v1")
            .body("hello")
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 202, "{path}");
        assert_eq!(
            answer.text(),
            format!("{expected} v1 tp=55 body=hello"),
            "{path}"
        );
        let tags: Vec<_> = answer.headers().get_all("x-tag").iter().collect();
        assert_eq!(tags, ["a", "b"]);
        assert_eq!(answer.headers().get("x-echo").unwrap(), "yes");
        assert_eq!(answer.served_by().map(|s| s.addr), Some(addr));
    }
    // A path that is not one is refused before anything is sent.
    let err = echo.get("/a b").send().await.unwrap_err();
    assert!(matches!(err, ClientError::InvalidRequest { .. }), "{err}");
}

/// An answer cut off mid-body (the peer closed the connection after part of it) counts as a
/// reset: a GET is retried and succeeds, a POST without an idempotency key is not retried and
/// fails as an upstream error whose source says the connection ended early.
#[tokio::test]
async fn an_answer_cut_off_mid_body_is_a_reset() {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Every odd request gets 10 of the 100 bytes its head promises, then the connection closes.
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer: &[u8] = if counted.fetch_add(1, Ordering::SeqCst) % 2 == 0 {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789"
                } else {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                };
                let _ = s.write_all(answer).await;
                let _ = s.shutdown().await;
            });
        }
    });
    let (_dir, keel) = one_endpoint("cut", addr).await;
    let cut = keel.client("cut").unwrap();
    let got = cut.get("/x").send().await.unwrap();
    assert_eq!((got.status().as_u16(), got.text().as_str()), (200, "ok"));
    assert_eq!(requests.load(Ordering::SeqCst), 2, "cut off, then retried");

    let err = cut.post("/x").send().await.unwrap_err();
    assert!(matches!(err, ClientError::Upstream { .. }), "{err}");
    let ended_early =
        std::iter::successors(Some(&err as &(dyn std::error::Error + 'static)), |e| {
            e.source()
        })
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|e| e.kind() == std::io::ErrorKind::UnexpectedEof);
    assert!(ended_early, "{err:?}");
    assert_eq!(
        keel_resilience::classify_error(&err),
        keel_resilience::Outcome::Failure(keel_resilience::FailureClass::Reset)
    );
    assert_eq!(requests.load(Ordering::SeqCst), 3, "a POST is sent once");
}

/// A duration that parses but cannot be added to the clock (`timeout.total` of 2^64 - 1
/// seconds) used to be accepted, and then every call through the client panicked computing its
/// deadline. It is refused when the configuration is read, naming the key.
#[tokio::test]
async fn a_timeout_too_long_for_the_clock_is_refused_not_a_panic_per_call() {
    let backend = HttpBackend::start("one").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.toml");
    std::fs::write(
        &path,
        format!(
            "[clients.pay.timeout]\ntotal = \"18446744073709551615s\"\n\n[[clients.pay.endpoints]]\naddr = \"{}\"\n",
            backend.addr
        ),
    )
    .unwrap();
    let built = Keel::builder("orders")
        .config_file(&path)
        .shutdown(Shutdown::new())
        .build()
        .await;
    match built {
        Err(e) => assert!(e.to_string().contains("clients.pay.timeout.total"), "{e}"),
        Ok(keel) => {
            let pay = keel.client("pay").unwrap();
            let call = tokio::spawn(async move { pay.get("/x").send().await.map(|r| r.text()) });
            let answer = call.await;
            panic!("accepted; the call gave {answer:?}");
        }
    }
}

/// `[discovery.health]` turns on active checks of the instances of the services this process
/// calls (when a client does not turn on its own `[clients.NAME.health]`).
#[tokio::test]
async fn discovery_health_checks_the_instances_a_client_calls() {
    let up = HttpBackend::start("up").await;
    let down = HttpBackend::start("down").await;
    down.set_healthy(false);
    let dir = tempfile::tempdir().unwrap();
    let keel = keel_with(
        &dir,
        "[discovery.health]\nenabled = true\ninterval = \"20ms\"\nfall = 1\nrise = 1\n\
         [clients.checked.balance]\nstrategy = \"round-robin\"\n",
    )
    .await;
    let service = keel::ServiceName::new("checked").unwrap();
    let discovery = keel.discovery();
    let _a = discovery
        .register(keel::keel_core::Instance::new(service.clone(), up.addr))
        .await
        .unwrap();
    let _b = discovery
        .register(keel::keel_core::Instance::new(service.clone(), down.addr))
        .await
        .unwrap();
    let client = keel.client("checked").unwrap();
    wait_instances(&client, 2).await;
    // Bounded wait for the checker to have probed the failing instance.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while down
        .behaviour
        .health_checks
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
        || client
            .balancer()
            .snapshot()
            .instances
            .iter()
            .any(|i| i.addr == down.addr && i.health == keel::keel_core::HealthStatus::Healthy)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the failing instance was never checked: {:?}",
            client.balancer().snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = down.served();
    for _ in 0..20 {
        let r = client.get("/x").send().await.unwrap();
        assert_eq!(r.served_by().map(|s| s.addr), Some(up.addr));
    }
    assert_eq!(
        down.served(),
        before,
        "the instance failing its checks got no call"
    );
}

/// The idempotency store is built once: a reload changing how it is built (its key prefix, its
/// timeout, its capacity) is reported as needing a restart, not taken silently.
#[tokio::test]
async fn idempotency_store_keys_changed_by_a_reload_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let keel = keel_with(&dir, "[idempotency]\nprefix = \"a:\"\n").await;
    assert!(keel.not_live_changes().is_empty());
    let path = dir.path().join("keel.toml");
    for edit in [
        "prefix = \"b:\"",
        "prefix = \"a:\"\nstore_timeout = \"2s\"",
        "prefix = \"a:\"\nmemory_capacity = 5",
        "prefix = \"a:\"\nmemory_max_bytes = 2000000",
    ] {
        std::fs::write(&path, format!("[idempotency]\n{edit}\n")).unwrap();
        keel.config().reload().unwrap();
        let changes = keel.not_live_changes();
        assert!(
            changes.iter().any(|c| c.contains("idempotency")),
            "{edit}: {changes:?}"
        );
    }
}

/// A per-try timeout drops the attempt, and with it the balancer's answer naming the instance:
/// the retry used to know nothing to avoid, so with a hash strategy every attempt went back to
/// the same slow instance. The timeout now names the instance: the retry goes to another one,
/// and an error says which instance did not answer.
#[tokio::test]
async fn a_retry_after_a_per_try_timeout_goes_to_another_instance() {
    per_try_timeout_then_retry("").await;
}

/// The same through the layered attempt path (taken while chaos is on, as for hedged and waiting
/// attempts).
#[tokio::test]
async fn a_retry_after_a_per_try_timeout_goes_to_another_instance_layered() {
    per_try_timeout_then_retry("[clients.pay.chaos]\nenabled = true\n\n").await;
}

async fn per_try_timeout_then_retry(extra: &str) {
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let keel = keel_with(
        &dir,
        &format!(
            "{extra}[clients.pay.balance]\nstrategy = \"ring-hash\"\n\n[clients.pay.timeout]\nper_try = \"300ms\"\ntotal = \"10s\"\n\n[[clients.pay.endpoints]]\naddr = \"{}\"\n\n[[clients.pay.endpoints]]\naddr = \"{}\"\n",
            a.addr, b.addr
        ),
    )
    .await;
    let pay = keel.client("pay").unwrap();
    wait_instances(&pay, 2).await;
    // A key the ring sends to `a`.
    let mut key = None;
    for i in 0..100 {
        let k = format!("k{i}");
        let r = pay.get("/x").hash_key(&k).send().await.unwrap();
        if r.served_by().map(|s| s.addr) == Some(a.addr) {
            key = Some(k);
            break;
        }
    }
    let key = key.expect("a key routed to a");
    a.set_latency(Duration::from_secs(30));
    let r = pay.get("/x").hash_key(&key).send().await.unwrap();
    assert_eq!(r.text(), "b");
    assert_eq!(r.served_by().map(|s| s.addr), Some(b.addr));
    // A POST is not retried; its error names the instance that timed out.
    let err = pay.post("/x").hash_key(&key).send().await.unwrap_err();
    assert!(matches!(err, ClientError::Upstream { .. }), "{err}");
    assert!(err.to_string().contains(&a.addr.to_string()), "{err}");
    assert_eq!(
        keel_resilience::classify_error(&err),
        keel_resilience::Outcome::Failure(keel_resilience::FailureClass::Timeout)
    );
}

/// The client buffers whole answers, so their size is bounded: `max_response_body_bytes` (live)
/// fails a call whose answer is larger, declared (`content-length`) or streamed (chunked),
/// with a typed error, without retrying it; an answer at the limit is read whole.
#[tokio::test]
async fn answers_over_the_body_limit_fail_with_a_typed_error() {
    use axum::{body::Body, routing::get, Router};
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    let app = Router::new()
        .route("/exact", get(|| async { vec![b'x'; 1024] }))
        .route("/declared", get(|| async { vec![b'x'; 2048] }))
        .route(
            "/streamed",
            get(|| async {
                let chunks = (0..8).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 256]));
                Body::from_stream(futures::stream::iter(chunks))
            }),
        )
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                count.fetch_add(1, Ordering::SeqCst);
                next.run(req)
            },
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = tempfile::tempdir().unwrap();
    let text = |limit: usize| {
        format!(
            "[clients.big]\nmax_response_body_bytes = {limit}\n\n[[clients.big.endpoints]]\naddr = \"{addr}\"\n"
        )
    };
    let keel = keel_with(&dir, &text(1024)).await;
    let big = keel.client("big").unwrap();

    let exact = big.get("/exact").send().await.unwrap();
    assert_eq!(exact.bytes().len(), 1024);
    // A HEAD answer declares the size of a body it does not have: nothing over the limit.
    let head = big
        .request(http::Method::HEAD, "/declared")
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "2048");
    assert!(head.bytes().is_empty());
    for path in ["/declared", "/streamed"] {
        let before = served.load(Ordering::SeqCst);
        let err = big.get(path).send().await.unwrap_err();
        match &err {
            ClientError::ResponseTooLarge {
                service,
                status,
                limit,
            } => {
                assert_eq!(
                    (service.as_str(), status.as_u16(), *limit),
                    ("big", 200, 1024)
                );
            }
            other => panic!("{path}: {other:?}"),
        }
        assert!(!err.is_retryable(), "{path}");
        assert_eq!(
            served.load(Ordering::SeqCst) - before,
            1,
            "{path}: not retried"
        );
    }

    // Live: a larger limit applies to the next call.
    std::fs::write(dir.path().join("keel.toml"), text(4096)).unwrap();
    keel.config().reload().unwrap();
    for path in ["/declared", "/streamed"] {
        let answer = big.get(path).send().await.unwrap();
        assert_eq!(answer.bytes().len(), 2048, "{path}");
    }
    // Zero would refuse every answer with a body: refused as configuration.
    std::fs::write(dir.path().join("keel.toml"), text(0)).unwrap();
    assert!(keel.config().reload().is_err());
}
