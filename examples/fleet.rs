//! A small fleet: `orders` calling three `payments` instances that register themselves.
//!
//!     cargo run --example fleet                                  # in-process (memory) discovery
//!     KEEL__DISCOVERY__BACKEND=redis cargo run --example fleet   # Redis on 127.0.0.1:6379
//!
//! Every service here is a real keel service on its own port: it registers after it is ready,
//! heartbeats, and deregisters on shutdown. The orders service discovers payments and balances
//! across them (`least-request` here; P2C-EWMA is the default); one payments instance is then
//! stopped gracefully, and the orders client follows.
use std::{collections::BTreeMap, time::Duration};

use axum::{routing::get, Router};
use keel::{keel_core::Shutdown, Keel};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Redis needs a URL; default to the local one unless the environment names another.
fn builder(name: &str) -> keel::KeelBuilder {
    let b = Keel::builder(name);
    if std::env::var("KEEL__DISCOVERY__BACKEND").as_deref() == Ok("redis")
        && std::env::var("KEEL__DISCOVERY__URL").is_err()
    {
        b.set("discovery.url", "redis://127.0.0.1:6379/")
            .set("discovery.prefix", "keel-fleet-example")
    } else {
        b
    }
}

async fn payments(
    i: usize,
    shutdown: Shutdown,
) -> Res<(Keel, tokio::task::JoinHandle<Result<(), keel::Error>>)> {
    let keel = builder("payments")
        .set("service.zone", format!("zone-{}", i % 2))
        .set("service.drain_grace", "200ms")
        .set("discovery.ttl", "3s")
        .shutdown(shutdown)
        .build()
        .await?;
    let name = format!("payments-{i}");
    let app = Router::new().route(
        "/pay",
        get(move || {
            let name = name.clone();
            async move { name }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let k = keel.clone();
    let task = tokio::spawn(async move { k.serve_with_listener(listener, app).await });
    let started = std::time::Instant::now();
    while !keel.is_ready() {
        if started.elapsed() > Duration::from_secs(10) {
            return Err("the service did not become ready".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok((keel, task))
}

async fn call_many(client: &keel::Client, n: usize) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for _ in 0..n {
        let who = match client.get("/pay").send().await {
            Ok(r) => r.text(),
            Err(e) => format!("error: {e}"),
        };
        *by.entry(who).or_insert(0) += 1;
    }
    by
}

#[tokio::main]
async fn main() -> Res<()> {
    let backend = std::env::var("KEEL__DISCOVERY__BACKEND").unwrap_or_else(|_| "memory".into());
    println!("fleet on `{backend}` discovery");
    let mut instances = Vec::new();
    for i in 1..=3 {
        let shutdown = Shutdown::new();
        let (keel, task) = payments(i, shutdown.clone()).await?;
        println!(
            "  payments-{i} serving on {}",
            keel.local_addr().map(|a| a.to_string()).unwrap_or_default()
        );
        instances.push((shutdown, keel, task));
    }
    let orders = builder("orders")
        .set("clients.payments.balance.strategy", "least-request")
        .shutdown(Shutdown::new())
        .build()
        .await?;
    let client = orders.client("payments")?;
    let watch = orders
        .discovery()
        .watch(&keel::ServiceName::new("payments")?)?;
    while watch.snapshot().len() < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "\norders sees {} payments instances; 300 calls:",
        watch.snapshot().len()
    );
    for (who, n) in call_many(&client, 300).await {
        println!("  {who}: {n}");
    }

    println!("\nstopping payments-2 gracefully (unready, deregister, drain) ...");
    let (shutdown, _, task) = instances.remove(1);
    shutdown.trigger();
    task.await??;
    while watch.snapshot().len() != 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "orders sees {} instances; 300 calls:",
        watch.snapshot().len()
    );
    for (who, n) in call_many(&client, 300).await {
        println!("  {who}: {n}");
    }
    println!("\n/keel/status of orders, payments client:");
    println!(
        "{}",
        serde_json::to_string_pretty(
            &orders.status()["clients"]["payments"]["balancer"]["instances"]
        )?
    );
    for (shutdown, _, task) in instances {
        shutdown.trigger();
        task.await??;
    }
    Ok(())
}
