//! What a keel service costs while nothing happens: one process serving on 127.0.0.1 with its
//! config file watched, one client over two live backends with active health checks (at the
//! default 2 s interval), and no traffic. Reports the process's CPU time per second of wall
//! time, over `KEEL_BENCH_SECS` (default 10) after a 2 s settle.
//!
//! `cargo bench --bench idle`
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use keel::{keel_core::Shutdown, Keel};
use keel_testkit::HttpBackend;
use support::{cpu_seconds, env, runtime};

fn main() {
    let secs = env("KEEL_BENCH_SECS", 10);
    runtime().block_on(async move {
        let a = HttpBackend::start("a").await;
        let b = HttpBackend::start("b").await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keel.toml");
        std::fs::write(
            &path,
            format!(
                "[clients.api.health]\nenabled = true\n\n\
                 [[clients.api.endpoints]]\naddr = \"{}\"\n\n\
                 [[clients.api.endpoints]]\naddr = \"{}\"\n",
                a.addr, b.addr
            ),
        )
        .unwrap();
        let shutdown = Shutdown::new();
        let keel = Keel::builder("idle")
            .config_file(&path)
            .shutdown(shutdown.clone())
            .build()
            .await
            .unwrap();
        let api = keel.client("api").unwrap();
        assert_eq!(api.get("/x").send().await.unwrap().status(), 200);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = {
            let keel = keel.clone();
            tokio::spawn(async move { keel.serve_with_listener(listener, axum::Router::new()).await })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (cpu, start) = (cpu_seconds(), Instant::now());
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let (cpu, wall) = (cpu_seconds() - cpu, start.elapsed().as_secs_f64());
        println!(
            "idle: {:.2} ms CPU per second over {wall:.0} s (serving, config watched, one client, health checks every 2 s on two backends)",
            cpu / wall * 1e3
        );
        shutdown.trigger();
        let _ = server.await;
    });
}
