//! The keel demo: a small fleet in one process, on embedded defaults (no Redis, no etcd).
//!
//!     cargo run --release --example demo
//!
//! It starts three `payments` instances and a `ledger` dependency on 127.0.0.1, and an `orders`
//! service built with keel whose configuration file it edits while it runs. Then it walks
//! through weighted balancing, a slow instance (round robin vs P2C-EWMA), a dying instance
//! (retries and passive ejection), a failing dependency (circuit breaker opens, then recovers),
//! duplicate POSTs with one `Idempotency-Key`, and a timeout and a weight changed live in the
//! file — printing what it measured.
use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::{routing::post, Router};
use keel_testkit::HttpBackend;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Fleet {
    payments: Vec<HttpBackend>,
    ledger: HttpBackend,
}

fn config_text(f: &Fleet, strategy: &str, weights: [u32; 3], total: &str) -> String {
    config_with_hedge(f, strategy, weights, total, None)
}

fn config_with_hedge(
    f: &Fleet,
    strategy: &str,
    weights: [u32; 3],
    total: &str,
    hedge_after: Option<&str>,
) -> String {
    let mut s = format!(
        r#"[service]
listen = "127.0.0.1:0"
drain_grace = "0s"

[clients.payments]
connect_timeout = "200ms"

[clients.payments.balance]
strategy = "{strategy}"

[clients.payments.timeout]
total = "{total}"
per_try = "{total}"

[clients.payments.retry]
max_attempts = 3

[clients.payments.hedge]
enabled = {hedge}
delay = "{hedge_delay}"

[clients.ledger]
[clients.ledger.retry]
max_attempts = 1

[clients.ledger.breaker]
window = "count"
size = 20
minimum_calls = 10
failure_rate_threshold = "50%"
open_duration = "1s"
permitted_in_half_open = 3

[[clients.ledger.endpoints]]
addr = "{ledger}"
"#,
        ledger = f.ledger.addr,
        hedge = hedge_after.is_some(),
        hedge_delay = hedge_after.unwrap_or("10ms"),
    );
    for (p, w) in f.payments.iter().zip(weights) {
        s.push_str(&format!(
            "\n[[clients.payments.endpoints]]\naddr = \"{}\"\nweight = {w}\n",
            p.addr
        ));
    }
    s
}

/// Writes the file the way editors do (temp + rename) and waits until keel has applied it.
async fn edit(keel: &keel::Keel, path: &Path, text: String) -> Res<()> {
    let before = keel.config().generation();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while keel.config().generation() == before {
        if let Some(f) = keel.config().last_error() {
            return Err(format!("edit refused: {}", f.error).into());
        }
        if Instant::now() > deadline {
            return Err("edit not applied within 5s".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

struct Run {
    ok: u64,
    failed: u64,
    first_error: Option<String>,
    by_backend: BTreeMap<String, u64>,
    latencies: Vec<Duration>,
}

impl Run {
    fn pct(&mut self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        self.latencies.sort();
        let i = ((self.latencies.len() as f64 * p).ceil() as usize).saturating_sub(1);
        self.latencies[i]
    }
}

/// `n` GETs to `client`, `concurrency` at a time.
async fn run(client: &keel::Client, n: u64, concurrency: u64) -> Run {
    run_for(client, n, concurrency, Duration::ZERO).await
}

/// At least `n` GETs, and for at least `at_least`, `concurrency` at a time.
async fn run_for(client: &keel::Client, n: u64, concurrency: u64, at_least: Duration) -> Run {
    let started = Instant::now();
    let mut tasks = Vec::new();
    let next = Arc::new(AtomicU64::new(0));
    for _ in 0..concurrency {
        let client = client.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = Run {
                ok: 0,
                failed: 0,
                first_error: None,
                by_backend: BTreeMap::new(),
                latencies: Vec::new(),
            };
            while next.fetch_add(1, Ordering::Relaxed) < n || started.elapsed() < at_least {
                let t = Instant::now();
                match client.get("/pay").send().await {
                    Ok(resp) if resp.status().is_success() => {
                        r.ok += 1;
                        *r.by_backend.entry(resp.text()).or_default() += 1;
                    }
                    Ok(resp) => {
                        r.failed += 1;
                        r.first_error
                            .get_or_insert(format!("status {}", resp.status()));
                    }
                    Err(e) => {
                        r.failed += 1;
                        r.first_error.get_or_insert(e.to_string());
                    }
                }
                r.latencies.push(t.elapsed());
            }
            r
        }));
    }
    let mut all = Run {
        ok: 0,
        failed: 0,
        first_error: None,
        by_backend: BTreeMap::new(),
        latencies: Vec::new(),
    };
    for t in tasks {
        if let Ok(r) = t.await {
            all.ok += r.ok;
            all.failed += r.failed;
            if all.first_error.is_none() {
                all.first_error = r.first_error;
            }
            for (k, v) in r.by_backend {
                *all.by_backend.entry(k).or_default() += v;
            }
            all.latencies.extend(r.latencies);
        }
    }
    all
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn step(n: u32, title: &str) {
    println!("\n[{n}/6] {title}");
}

#[tokio::main]
async fn main() -> Res<()> {
    let started = Instant::now();
    println!("keel demo — a fleet in one process, on embedded defaults\n");
    println!("starting payments-a, payments-b, payments-c and ledger on 127.0.0.1 ...");
    let fleet = Fleet {
        payments: vec![
            HttpBackend::start("payments-a").await,
            HttpBackend::start("payments-b").await,
            HttpBackend::start("payments-c").await,
        ],
        ledger: HttpBackend::start("ledger").await,
    };
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("keel.toml");
    std::fs::write(&path, config_text(&fleet, "round-robin", [5, 3, 2], "2s"))?;
    let shutdown = keel::keel_core::Shutdown::new();
    let keel = keel::Keel::builder("orders")
        .config_file(&path)
        .shutdown(shutdown.clone())
        .build()
        .await?;
    println!(
        "orders built from {} (generation {})",
        path.display(),
        keel.config().generation()
    );
    let payments = keel.client("payments")?;

    // 1. Weighted balancing.
    step(
        1,
        "weighted balancing: smooth weighted round robin, weights 5:3:2",
    );
    let r = run(&payments, 1_000, 4).await;
    for (name, want) in [
        ("payments-a", 50.0),
        ("payments-b", 30.0),
        ("payments-c", 20.0),
    ] {
        let got = *r.by_backend.get(name).unwrap_or(&0) as f64 / r.ok.max(1) as f64 * 100.0;
        println!(
            "  {name}: {got:5.1}% of {} calls (weight share {want:.0}%)",
            r.ok
        );
    }

    // 2. A slow instance.
    step(
        2,
        "payments-c turns 50 ms slower: round robin vs P2C-EWMA vs P2C-EWMA + hedging",
    );
    fleet.payments[2].set_latency(Duration::from_millis(50));
    edit(
        &keel,
        &path,
        config_text(&fleet, "round-robin", [1, 1, 1], "2s"),
    )
    .await?;
    let mut rr = run(&payments, 600, 4).await;
    edit(
        &keel,
        &path,
        config_text(&fleet, "p2c-ewma", [1, 1, 1], "2s"),
    )
    .await?;
    let _warm = run(&payments, 100, 4).await;
    let mut p2c = run(&payments, 600, 4).await;
    edit(
        &keel,
        &path,
        config_with_hedge(&fleet, "p2c-ewma", [1, 1, 1], "2s", Some("5ms")),
    )
    .await?;
    let mut hedged = run(&payments, 600, 4).await;
    for (label, r, note) in [
        ("round-robin:", &mut rr, ""),
        (
            "p2c-ewma:   ",
            &mut p2c,
            "  (strategy switched live, no restart)",
        ),
        (
            "+ hedging:  ",
            &mut hedged,
            "  (second attempt to another instance after 5 ms)",
        ),
    ] {
        let slow = *r.by_backend.get("payments-c").unwrap_or(&0) as f64 / r.ok.max(1) as f64;
        println!(
            "  {label} p50 {}  p90 {}  p99 {}  {:4.1}% answered by the slow one{note}",
            ms(r.pct(0.5)),
            ms(r.pct(0.9)),
            ms(r.pct(0.99)),
            slow * 100.0,
        );
    }
    fleet.payments[2].set_latency(Duration::ZERO);

    // 3. An instance dies.
    step(
        3,
        "payments-b dies under load: retries go elsewhere, passive health ejects it",
    );
    let load = {
        let payments = payments.clone();
        tokio::spawn(async move { run_for(&payments, 600, 6, Duration::from_millis(800)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    fleet.payments[1].stop();
    let r = load.await?;
    let status = keel.status();
    let b_state = status["clients"]["payments"]["balancer"]["instances"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|i| i["addr"] == fleet.payments[1].addr.to_string())
                .map(|i| format!("{} ({})", i["health"], i["reason"]))
        })
        .unwrap_or_else(|| "unknown".into());
    println!(
        "  {} calls: {} ok, {} failed",
        r.ok + r.failed,
        r.ok,
        r.failed
    );
    if let Some(e) = &r.first_error {
        println!("  first failure: {e}");
    }
    println!("  payments-b as the balancer sees it: {b_state}");

    // 4. A failing dependency.
    step(
        4,
        "ledger starts failing: the breaker opens, fails fast, then recovers",
    );
    let ledger = keel.client("ledger")?;
    fleet.ledger.set_status(503);
    let (mut upstream_5xx, mut fast_fail) = (0, 0);
    let served_before = fleet.ledger.served();
    for _ in 0..40 {
        match ledger.get("/post").send().await {
            Ok(resp) if resp.status().as_u16() == 503 => upstream_5xx += 1,
            Err(keel::ClientError::Refused { .. }) => fast_fail += 1,
            _ => {}
        }
    }
    println!(
        "  40 calls while ledger answers 503: {upstream_5xx} reached it, {fast_fail} refused at once by the open breaker (ledger saw {})",
        fleet.ledger.served() - served_before
    );
    fleet.ledger.set_status(200);
    let t = Instant::now();
    let mut recovered_after = None;
    while t.elapsed() < Duration::from_secs(5) {
        if let Ok(resp) = ledger.get("/post").send().await {
            if resp.status().is_success() {
                recovered_after = Some(t.elapsed());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match recovered_after {
        Some(d) => println!("  ledger healthy again: first success {} later (open_duration 1s, then half-open trial calls)", ms(d)),
        None => println!("  ledger did not recover within 5 s"),
    }

    // 5. Idempotency.
    step(5, "20 duplicate POSTs with one Idempotency-Key");
    let executed = Arc::new(AtomicU64::new(0));
    let app = {
        let executed = executed.clone();
        Router::new().route(
            "/orders",
            post(move |body: axum::body::Bytes| {
                let executed = executed.clone();
                async move {
                    executed.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    (
                        axum::http::StatusCode::CREATED,
                        format!("order created for {} bytes", body.len()),
                    )
                }
            })
            .layer(keel.idempotency()),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = {
        let keel = keel.clone();
        tokio::spawn(async move { keel.serve_with_listener(listener, app).await })
    };
    let http = reqwest::Client::new();
    let mut sends = Vec::new();
    for _ in 0..20 {
        let http = http.clone();
        sends.push(tokio::spawn(async move {
            http.post(format!("http://{addr}/orders"))
                .header("idempotency-key", "\"order-42\"")
                .body("{\"amount\":1200}")
                .send()
                .await
        }));
    }
    let (mut created, mut replayed, mut conflict) = (0, 0, 0);
    for s in sends {
        if let Ok(Ok(resp)) = s.await {
            match resp.status().as_u16() {
                201 if resp.headers().contains_key("idempotent-replayed") => replayed += 1,
                201 => created += 1,
                409 => conflict += 1,
                _ => {}
            }
        }
    }
    let retry_replayed = http
        .post(format!("http://{addr}/orders"))
        .header("idempotency-key", "\"order-42\"")
        .body("{\"amount\":1200}")
        .send()
        .await?;
    println!(
        "  handler ran {} time(s); answers: {created} created, {replayed} replayed, {conflict} \"in progress\" (409)",
        executed.load(Ordering::SeqCst)
    );
    println!(
        "  a later retry: {} with Idempotent-Replayed: {}",
        retry_replayed.status(),
        retry_replayed
            .headers()
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("absent")
    );

    // 6. Live config.
    step(6, "a timeout and a weight changed in the file, live");
    for p in &fleet.payments {
        p.set_latency(Duration::from_millis(30));
    }
    edit(
        &keel,
        &path,
        config_text(&fleet, "round-robin", [1, 1, 1], "10ms"),
    )
    .await?;
    let r = run(&payments, 50, 2).await;
    println!(
        "  timeout.total = 10ms against 30 ms instances: {} of 50 calls timed out",
        r.failed
    );
    for p in &fleet.payments {
        p.set_latency(Duration::ZERO);
    }
    edit(
        &keel,
        &path,
        config_text(&fleet, "round-robin", [8, 1, 1], "2s"),
    )
    .await?;
    let r = run(&payments, 500, 4).await;
    let a = *r.by_backend.get("payments-a").unwrap_or(&0) as f64 / r.ok.max(1) as f64 * 100.0;
    println!(
        "  weight of payments-a 1 -> 8 (b is still down): {a:.1}% of {} calls to payments-a (expected {:.1}%), {} failed",
        r.ok,
        8.0 / 9.0 * 100.0,
        r.failed
    );
    println!(
        "\nconfig generation {} — every change above applied without a restart.",
        keel.config().generation()
    );

    shutdown.trigger();
    let _ = server.await;
    println!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
