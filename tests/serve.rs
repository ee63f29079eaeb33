//! keel.serve end to end in one process, on real sockets: admin routes, trace propagation,
//! live client configuration, refused edits shown on /keel/status. (Draining under load is in
//! tests/fleet.rs, across processes.)

mod common;

use std::{path::Path, time::Duration};

use axum::{extract::State, http::HeaderMap, routing::get, Router};
use common::start;
use keel::{keel_core::Shutdown, Keel};
use keel_testkit::HttpBackend;

fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn wait_generation(keel: &Keel, at_least: u64) {
    for _ in 0..500 {
        if keel.config().generation() >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("generation stayed at {}", keel.config().generation());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_metrics_status_and_trace_propagation() {
    // Service B echoes the traceparent it received.
    let shutdown = Shutdown::new();
    let b = Keel::builder("trace-b")
        .shutdown(shutdown.clone())
        .set("service.drain_grace", "0s")
        .build()
        .await
        .unwrap();
    let echo = |name: &'static str| {
        move |headers: HeaderMap| async move {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        }
    };
    let b_app = Router::new()
        .route("/echo", get(echo("traceparent")))
        .route("/deadline", get(echo("keel-deadline-ms")));
    let (b_addr, b_task) = start(&b, b_app).await;

    // Service A calls B through keel's client (static endpoint) from inside its handler.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.toml");
    std::fs::write(
        &path,
        format!("[service]\ndrain_grace = \"0s\"\n\n[[clients.trace-b.endpoints]]\naddr = \"{b_addr}\"\n"),
    )
    .unwrap();
    let a = Keel::builder("trace-a")
        .shutdown(shutdown.clone())
        .config_file(&path)
        .build()
        .await
        .unwrap();
    let client = a.client("trace-b").unwrap();
    // A's routes relay to B's.
    let relay = |path: &'static str| {
        move |State(c): State<keel::Client>| async move {
            c.get(path)
                .send()
                .await
                .map(|r| r.text())
                .unwrap_or_default()
        }
    };
    let a_app = Router::new()
        .route("/call", get(relay("/echo")))
        .route("/deadline", get(relay("/deadline")))
        .with_state(client);
    let (a_addr, a_task) = start(&a, a_app).await;

    let http = reqwest::Client::new();
    let sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let got = http
        .get(format!("http://{a_addr}/call"))
        .header("traceparent", sent)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let parsed = keel::trace::TraceContext::parse(&got).expect("B received a traceparent");
    assert_eq!(parsed.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(got, sent, "a child span id, not the caller's");

    // Admin routes.
    let get = |path: &str| http.get(format!("http://{a_addr}{path}")).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    assert_prometheus_text(&metrics);
    assert!(metrics.contains("keel_config_generation"), "{metrics}");
    // Sampled when /metrics renders: the one call A made to B so far.
    assert!(
        metrics.contains(r#"keel_retry_attempts_total{service="trace-b",outcome="first"} 1"#),
        "{metrics}"
    );
    // The transport sent B the time left of the attempt (per_try 3s by default).
    let left: u64 = http
        .get(format!("http://{a_addr}/deadline"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .parse()
        .expect("B received keel-deadline-ms");
    assert!(left > 0 && left <= 3_000, "{left}");
    let status: serde_json::Value = get("/keel/status").await.unwrap().json().await.unwrap();
    assert_eq!(status["service"], "trace-a");
    assert_eq!(status["ready"], true);
    assert!(
        status["clients"]["trace-b"]["balancer"]["instances"].is_array(),
        "{status}"
    );

    shutdown.trigger();
    a_task.await.unwrap().unwrap();
    b_task.await.unwrap().unwrap();
}

/// Every sample line is `name{labels} value`; every comment is `# HELP` or `# TYPE`.
fn assert_prometheus_text(text: &str) {
    let mut samples = 0;
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix("# ") {
            assert!(
                c.starts_with("HELP ") || c.starts_with("TYPE "),
                "bad comment: {line}"
            );
            continue;
        }
        let (name_labels, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "bad value in {line}"
        );
        let name = name_labels.split('{').next().unwrap();
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line}"
        );
        if let Some(labels) = name_labels.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(
                    labels.starts_with('{') && labels.ends_with('}'),
                    "bad labels in {line}"
                );
            }
        }
        samples += 1;
    }
    assert!(samples > 0, "no samples");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_timeout_and_weights_change_live_and_bad_edits_are_shown() {
    let backends = [
        HttpBackend::start("one").await,
        HttpBackend::start("two").await,
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.toml");
    let cfg = |total: &str, w1: u32, w2: u32| {
        format!(
            "[service]\ndrain_grace = \"0s\"\n\n[clients.pay.balance]\nstrategy = \"round-robin\"\n\n[clients.pay.timeout]\ntotal = \"{total}\"\nper_try = \"{total}\"\n\n[clients.pay.retry]\nmax_attempts = 1\n\n[[clients.pay.endpoints]]\naddr = \"{}\"\nweight = {w1}\n\n[[clients.pay.endpoints]]\naddr = \"{}\"\nweight = {w2}\n",
            backends[0].addr, backends[1].addr
        )
    };
    std::fs::write(&path, cfg("2s", 1, 1)).unwrap();
    let shutdown = Shutdown::new();
    let keel = Keel::builder("orders")
        .shutdown(shutdown.clone())
        .config_file(&path)
        .build()
        .await
        .unwrap();
    let pay = keel.client("pay").unwrap();
    let count = |n: usize| {
        let pay = pay.clone();
        async move {
            let (mut one, mut fail) = (0, 0);
            for _ in 0..n {
                match pay.get("/x").send().await {
                    Ok(r) if r.text() == "one" => one += 1,
                    Ok(_) => {}
                    Err(_) => fail += 1,
                }
            }
            (one, fail)
        }
    };
    assert_eq!(count(100).await, (50, 0));

    // Weights 9:1, live.
    write(&path, &cfg("2s", 9, 1));
    wait_generation(&keel, 2).await;
    // Endpoints reach the balancer through discovery's follower task: wait for the new weight.
    let mut seen = false;
    for _ in 0..1000 {
        if pay.balancer().instances().iter().any(|i| i.weight == 9) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(seen, "the balancer never saw the new weight");
    // Smooth weighted round robin keeps its running weights across the change: 90 ± 1.
    let (one, fail) = count(100).await;
    assert!((89..=91).contains(&one) && fail == 0, "{one} {fail}");

    // Timeout 20ms against 100ms backends, live.
    for b in &backends {
        b.set_latency(Duration::from_millis(100));
    }
    write(&path, &cfg("20ms", 9, 1));
    wait_generation(&keel, 3).await;
    let (_, fail) = count(10).await;
    assert_eq!(fail, 10, "every call must time out");

    // A bad edit is refused, the last good one stays, /keel/status says why.
    write(&path, &cfg("soon", 9, 1));
    for _ in 0..500 {
        if keel.config().last_error().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = keel.status();
    let message = status["config"]["last_error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains("clients.pay.timeout.")
            && message.contains("soon")
            && message.contains("keel.toml line"),
        "{status}"
    );
    assert_eq!(keel.config().generation(), 3);
    let (_, fail) = count(5).await;
    assert_eq!(fail, 5, "the 20ms timeout is still in force");
    shutdown.trigger();
}

/// A refused edit whose values carry a password: `/keel/status` says what is wrong and where,
/// and does not repeat the password.
#[tokio::test]
async fn refused_edits_do_not_show_passwords_on_status() {
    let env = keel::keel_core::config::EnvMap::new();
    let shutdown = Shutdown::new();
    let keel = Keel::builder("secretive")
        .shutdown(shutdown.clone())
        .env_map(env.clone())
        .build()
        .await
        .unwrap();
    // A URL the idempotency validator refuses, and a URL set where a table belongs.
    env.set("KEEL__IDEMPOTENCY__STORE", "redis");
    env.set("KEEL__IDEMPOTENCY__URL", "http://:hunter2@cache:6379/");
    env.set("KEEL__INBOUND", "redis://:hunter3@cache:6379/");
    assert!(keel.config().reload().is_err());
    let status = keel.status().to_string();
    assert!(status.contains("idempotency.url"), "{status}");
    assert!(status.contains("KEEL__INBOUND"), "{status}");
    assert!(
        !status.contains("hunter2") && !status.contains("hunter3"),
        "{status}"
    );
    shutdown.trigger();
}

/// A registry whose `register` writes the record at once and answers only when let go, as a
/// Redis or etcd write whose reply is still on its way.
struct SlowRegistry {
    memory: keel::keel_discovery::MemoryDiscovery,
    entered: std::sync::Arc<tokio::sync::Notify>,
    release: std::sync::Arc<tokio::sync::Notify>,
    abandoned: std::sync::Arc<tokio::sync::Notify>,
}

/// Tells when the registration in flight is dropped before it answered.
struct Abandoned(Option<std::sync::Arc<tokio::sync::Notify>>);

impl Drop for Abandoned {
    fn drop(&mut self) {
        if let Some(n) = self.0.take() {
            n.notify_one();
        }
    }
}

impl keel::keel_discovery::Discover for SlowRegistry {
    fn watch(
        &self,
        service: &keel::ServiceName,
    ) -> Result<keel::keel_discovery::InstanceWatch, keel::keel_discovery::DiscoveryError> {
        self.memory.watch(service)
    }
}

impl keel::keel_discovery::Registry for SlowRegistry {
    fn register(
        &self,
        instance: keel::keel_core::Instance,
    ) -> keel::keel_discovery::BoxFuture<
        '_,
        Result<keel::keel_discovery::Registration, keel::keel_discovery::DiscoveryError>,
    > {
        Box::pin(async move {
            self.memory.upsert(instance.clone());
            let mut abandoned = Abandoned(Some(self.abandoned.clone()));
            self.entered.notify_one();
            self.release.notified().await;
            abandoned.0 = None;
            self.memory.register(instance).await
        })
    }
}

impl keel::keel_discovery::Discovery for SlowRegistry {
    fn backend(&self) -> &'static str {
        "slow"
    }
}

/// Shutdown while the registration is in flight: the record it wrote is removed when it
/// answers, and the service is never marked ready.
#[tokio::test]
async fn shutdown_during_registration_deregisters_what_was_registered() {
    use keel::keel_discovery::Discover;
    let memory = keel::keel_discovery::MemoryDiscovery::new();
    let slow = SlowRegistry {
        memory: memory.clone(),
        entered: Default::default(),
        release: Default::default(),
        abandoned: Default::default(),
    };
    let (entered, release, abandoned) = (
        slow.entered.clone(),
        slow.release.clone(),
        slow.abandoned.clone(),
    );
    let shutdown = Shutdown::new();
    let keel = Keel::builder("slow-to-register")
        .shutdown(shutdown.clone())
        .set("service.drain_grace", "0s")
        .discovery(std::sync::Arc::new(slow))
        .build()
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let k = keel.clone();
    let task = tokio::spawn(async move { k.serve_with_listener(listener, Router::new()).await });
    entered.notified().await;
    shutdown.trigger();
    // Let go of the registration only once serve has seen the shutdown: it has either dropped
    // the registration in flight or is draining while it waits for it.
    tokio::select! {
        _ = abandoned.notified() => {}
        _ = async {
            while keel.status()["draining"] != true {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        } => {}
    }
    assert!(!keel.is_ready());
    release.notify_one();
    task.await.unwrap().unwrap();
    assert!(!keel.is_ready());
    let left = memory.watch(keel.name()).unwrap().snapshot();
    assert!(left.is_empty(), "still registered: {left:?}");
}
