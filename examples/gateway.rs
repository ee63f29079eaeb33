//! An edge service: per-API-key rate limits, balancing to the services behind it, and an
//! idempotent POST.
//!
//!     cargo run --example gateway
//!
//! The gateway is a keel service. Its `[inbound.rate_limit]` is keyed by the `x-api-key` header
//! (GCRA: a steady rate plus a burst, per key, bounded memory), so one noisy client is answered
//! `429` with `Retry-After` while others go on. Requests are forwarded with keel's client
//! (balanced, retried within a budget). `POST /orders` carries the idempotency layer: a client
//! that retries with the same `Idempotency-Key` gets the first answer replayed, and the service
//! behind sees the order once.
use std::time::Duration;

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::{get, post},
    Router,
};
use keel::{keel_core::Shutdown, Client, Keel};
use keel_testkit::HttpBackend;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

async fn forward_get(State(api): State<Client>) -> (StatusCode, String) {
    match api.get("/catalog").send().await {
        Ok(r) => (r.status(), r.text()),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

async fn forward_order(
    State(api): State<Client>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let mut call = api.post("/orders").body(body);
    if let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        call = call.header("idempotency-key", key);
    }
    match call.send().await {
        Ok(r) => (StatusCode::CREATED, format!("accepted by {}", r.text())),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

#[tokio::main]
async fn main() -> Res<()> {
    let api = [
        HttpBackend::start("api-1").await,
        HttpBackend::start("api-2").await,
    ];
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            r#"[service]
drain_grace = "0s"

[inbound.rate_limit]
enabled = true
rate = 5.0
burst = 5
key = "header:x-api-key"

[clients.api.balance]
strategy = "p2c-ewma"

[[clients.api.endpoints]]
addr = "{}"

[[clients.api.endpoints]]
addr = "{}"
"#,
            api[0].addr, api[1].addr
        ),
    )?;
    let shutdown = Shutdown::new();
    let keel = Keel::builder("gateway")
        .config_file(&path)
        .shutdown(shutdown.clone())
        .build()
        .await?;
    let client = keel.client("api")?;
    let app = Router::new()
        .route("/catalog", get(forward_get))
        .route("/orders", post(forward_order).layer(keel.idempotency()))
        .with_state(client);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = {
        let keel = keel.clone();
        tokio::spawn(async move { keel.serve_with_listener(listener, app).await })
    };
    let started = std::time::Instant::now();
    while !keel.is_ready() {
        if started.elapsed() > Duration::from_secs(10) {
            return Err("the service did not become ready".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("gateway on {addr}, rate limit 5/s + burst 5 per x-api-key\n");

    let http = reqwest::Client::new();
    for (key, n) in [("alice", 20), ("bob", 5)] {
        let (mut ok, mut limited, mut retry_after) = (0, 0, String::new());
        for _ in 0..n {
            let r = http
                .get(format!("http://{addr}/catalog"))
                .header("x-api-key", key)
                .send()
                .await?;
            match r.status().as_u16() {
                200 => ok += 1,
                429 => {
                    limited += 1;
                    if let Some(v) = r.headers().get("retry-after").and_then(|v| v.to_str().ok()) {
                        retry_after = v.to_owned();
                    }
                }
                other => println!("  unexpected {other}"),
            }
        }
        println!("{key}: {n} requests at once -> {ok} forwarded, {limited} answered 429 (Retry-After: {retry_after:?})");
    }
    println!(
        "the services behind served {} and {} catalog requests",
        api[0].served(),
        api[1].served()
    );

    println!("\nPOST /orders twice with Idempotency-Key \"o-1\":");
    let before = api[0].served() + api[1].served();
    for attempt in 1..=2 {
        let r = http
            .post(format!("http://{addr}/orders"))
            .header("x-api-key", "carol")
            .header("idempotency-key", "\"o-1\"")
            .body("{\"sku\":\"keel\",\"qty\":1}")
            .send()
            .await?;
        let replayed = r.headers().contains_key("idempotent-replayed");
        println!(
            "  attempt {attempt}: {} {:?}{}",
            r.status(),
            r.text().await?,
            if replayed { " (replayed)" } else { "" }
        );
    }
    println!(
        "  orders that reached the services behind: {}",
        api[0].served() + api[1].served() - before
    );

    shutdown.trigger();
    server.await??;
    Ok(())
}
