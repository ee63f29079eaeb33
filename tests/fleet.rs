//! A fleet as separate processes on loopback, discovering each other through a real Redis:
//! three `payments` instances and one `orders` service (each process is this test binary,
//! re-run in a child role). Under load, one payments instance is killed with SIGKILL and another
//! is stopped with SIGTERM; no client call may fail.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::{extract::State, routing::get, Router};
use keel::Keel;

const ROLE: &str = "KEEL_FLEET_ROLE";
const NAME: &str = "KEEL_FLEET_NAME";
const CONFIG: &str = "KEEL_FLEET_CONFIG";

/// The child entry point: does nothing in the parent, runs a service in a child.
#[test]
fn child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    // The parent holds our stdin; when it goes away (even killed), so do we.
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        std::process::exit(0);
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let code = match rt.block_on(run_child(&role)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("child {role} failed: {e}");
            1
        }
    };
    std::process::exit(code);
}

async fn run_child(role: &str) -> Result<(), Box<dyn std::error::Error>> {
    let name = std::env::var(NAME)?;
    let config = std::env::var(CONFIG)?;
    let keel = Keel::builder(role).config_file(&config).build().await?;
    let app = match role {
        "payments" => {
            Router::new().route(
                "/pay",
                get(move || {
                    let name = name.clone();
                    async move {
                        // Some work, so that requests are in flight when a signal arrives.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        name
                    }
                }),
            )
        }
        _ => {
            let payments = keel.client("payments")?;
            Router::new()
                .route(
                    "/order",
                    get(|State(p): State<keel::Client>| async move {
                        match p.get("/pay").send().await {
                            Ok(r) if r.status().is_success() => {
                                (axum::http::StatusCode::OK, r.text())
                            }
                            Ok(r) => (
                                axum::http::StatusCode::BAD_GATEWAY,
                                format!("payments said {}", r.status()),
                            ),
                            Err(e) => {
                                // The whole chain, so a failure says what really happened.
                                let mut text = e.to_string();
                                let mut cur = std::error::Error::source(&e);
                                while let Some(s) = cur {
                                    text.push_str(&format!(" <- {s} [{s:?}]"));
                                    cur = s.source();
                                }
                                (axum::http::StatusCode::BAD_GATEWAY, text)
                            }
                        }
                    }),
                )
                .with_state(payments)
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("LISTENING {}", listener.local_addr()?);
    keel.serve_with_listener(listener, app).await?;
    Ok(())
}

struct Proc {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(role: &str, name: &str, config: &std::path::Path) -> Proc {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(NAME, name)
        .env(CONFIG, config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest may have printed "test child ... " on the same line first.
            if let Some(i) = line.find("LISTENING ") {
                if let Ok(a) = line[i + "LISTENING ".len()..].trim().parse::<SocketAddr>() {
                    let _ = tx.send(a);
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{role} {name} did not start"));
    Proc { child, addr }
}

async fn status(http: &reqwest::Client, addr: SocketAddr) -> serde_json::Value {
    http.get(format!("http://{addr}/keel/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The payments instances as the orders service's balancer sees them: addr → health.
async fn seen(http: &reqwest::Client, orders: SocketAddr) -> Vec<(String, String)> {
    let s = status(http, orders).await;
    s["clients"]["payments"]["balancer"]["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    (
                        i["addr"].as_str().unwrap_or_default().to_owned(),
                        i["health"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_sigterm_under_load_lose_no_call() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleet.toml");
    let prefix = keel_testkit::unique_prefix("fleet").replace(':', "-");
    std::fs::write(
        &config,
        format!(
            r#"[service]
drain_grace = "1s"
drain_timeout = "5s"

[discovery]
backend = "redis"
url = "{url}"
prefix = "{prefix}"
ttl = "1s"

[clients.payments.retry]
# Two instances go away during the test; with one attempt per instance plus one, a call that
# meets both on its way still ends on the one that stays.
max_attempts = 4
"#,
            url = keel_testkit::shared_redis_url()
        ),
    )
    .unwrap();
    let mut payments: Vec<Proc> = (1..=3)
        .map(|i| spawn("payments", &format!("payments-{i}"), &config))
        .collect();
    let orders = spawn("orders", "orders", &config);
    let http = reqwest::Client::new();

    // Warm up until the orders service has discovered all three (its client is built on the
    // first call).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let _ = http
            .get(format!("http://{}/order", orders.addr))
            .send()
            .await;
        if seen(&http, orders.addr).await.len() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "orders never saw three payments instances"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Load: 6 callers, continuously, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let callers: Vec<_> = (0..6)
        .map(|_| {
            let (http, stop, ok, failed, errors) = (
                http.clone(),
                stop.clone(),
                ok.clone(),
                failed.clone(),
                errors.clone(),
            );
            let url = format!("http://{}/order", orders.addr);
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match http.get(&url).send().await {
                        Ok(r) if r.status().is_success() => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            let text = r.text().await.unwrap_or_default();
                            errors.lock().unwrap().push(text);
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            errors.lock().unwrap().push(e.to_string());
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // SIGKILL one instance: it is out of rotation within a second.
    let killed = payments.remove(0);
    let killed_addr = killed.addr.to_string();
    let t = Instant::now();
    drop(killed); // SIGKILL + wait
    let out_after = loop {
        let s = seen(&http, orders.addr).await;
        let state = s
            .iter()
            .find(|(a, _)| *a == killed_addr)
            .map(|(_, h)| h.clone());
        if !matches!(state.as_deref(), Some("healthy") | Some("degraded")) {
            break t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "killed instance still in rotation: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        out_after <= Duration::from_secs(1),
        "out of rotation after {out_after:?}"
    );

    // SIGTERM another: readiness turns false first, it deregisters, in-flight work finishes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let term = payments.remove(0);
    let term_addr = term.addr;
    let pid = term.child.id();
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut saw_unready = false;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        match http.get(format!("http://{term_addr}/readyz")).send().await {
            Ok(r) if r.status() == 503 => {
                saw_unready = true;
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        saw_unready,
        "readiness never went false before the instance stopped"
    );
    let mut term = term;
    let exit = tokio::task::spawn_blocking(move || {
        let s = term.child.wait();
        (s, term)
    })
    .await
    .unwrap();
    assert!(
        exit.0.unwrap().success(),
        "SIGTERM'd instance did not exit cleanly"
    );
    let t = Instant::now();
    loop {
        let s = seen(&http, orders.addr).await;
        if !s.iter().any(|(a, _)| *a == term_addr.to_string()) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "not deregistered: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let errors = errors.lock().unwrap().clone();
    assert!(ok > 100, "too little load: {ok}");
    assert_eq!(
        failed,
        0,
        "{failed} failed calls of {}: {errors:?}",
        ok + failed
    );
    drop(payments);
    drop(orders);
}
