//! HTTP load benchmark: one axum endpoint with and without the idempotency layer (Redis and
//! memory stores), driven by `wrk` on 127.0.0.1 with a unique key per request, and
//! `redis-benchmark` running the claim's `SET ... NX GET` and the completion script at the same
//! concurrency.
//! Everything runs side by side in one process run, so the ratios are comparable.
//!
//! Run: `cargo bench -p keel-idempotency --bench http_load` (needs `wrk`, `redis-server`,
//! `redis-benchmark`, and `taskset` for the peak phase and `KEEL_BENCH_PIN`).
//! `KEEL_BENCH_SECS` (default 4) sets the length of each wrk run, `KEEL_BENCH_ROUNDS` (default
//! 3) the number of interleaved rounds (medians are reported), `KEEL_BENCH_CONNS` (default 32)
//! the concurrency, and `KEEL_BENCH_WORKERS` (default 1) the server's tokio worker threads.
//!
//! Each run also reports the CPU spent per request (from `/proc`: this process, which is the
//! server; Redis; wrk, the child waited for) and the share of the two cores left idle, and from
//! them how far the with/without ratio could go at all while Redis shares the cores.
//!
//! A full run ends with each route's peak throughput over c = N, 2N and 4N, once with Redis
//! sharing both cores and once with Redis on a core of its own (`taskset`), and the ratio of
//! the peaks (`KEEL_BENCH_PEAK=0` leaves it out).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::{process::Command, sync::Arc, time::Duration};

use axum::{http::StatusCode, routing::post, Router};
use keel_core::Live;
use keel_idempotency::{
    IdempotencyConfig, IdempotencyLayer, IdempotencyStore, MemoryStore, RedisStore, StoreKind,
};
use keel_testkit::RedisServer;

const WRK_SCRIPT: &str = r#"
wrk.method = "POST"
wrk.body = '{"amount":10,"currency":"EUR"}'
wrk.headers["Content-Type"] = "application/json"
local prefix = "x"
local n = 0
function init(args) prefix = args[1] or "x" end
function request()
  n = n + 1
  return wrk.format(nil, nil, { ["Idempotency-Key"] = '"' .. prefix .. "-" .. n .. '"' })
end
"#;

async fn handler() -> (StatusCode, [(&'static str, &'static str); 1], &'static str) {
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        "{\"id\":\"ord_1\",\"status\":\"created\"}",
    )
}

struct Wrk {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU per request, µs: (this server, Redis, wrk); and the share of the two cores idle.
    cpu: Option<Cpu>,
}

#[derive(Clone, Copy)]
struct Cpu {
    server: f64,
    redis: f64,
    wrk: f64,
    idle: f64,
}

/// (own CPU, waited-for children's CPU) of a process, in clock ticks, from `/proc/<pid>/stat`.
fn ticks(pid: &str) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = s.get(s.rfind(')')? + 2..)?.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    // After the command: state, ..., utime (11), stime (12), cutime (13), cstime (14).
    Some((n(11)? + n(12)?, n(13)? + n(14)?))
}

/// What the CPU spent while `run` ran, per request: this process (the server), Redis, and
/// the children waited for meanwhile (wrk).
fn measured(redis_pid: &str, clk_tck: f64, run: impl FnOnce() -> (Wrk, f64, f64)) -> Wrk {
    let (me0, rd0) = (ticks("self"), ticks(redis_pid));
    let (mut w, requests, secs) = run();
    if let (Some(a), Some(b), Some(r0), Some(r1)) = (me0, ticks("self"), rd0, ticks(redis_pid)) {
        let us = |t: u64| t as f64 / clk_tck * 1e6 / requests.max(1.0);
        let busy = (b.0 - a.0 + b.1 - a.1 + r1.0 - r0.0) as f64 / clk_tck;
        w.cpu = Some(Cpu {
            server: us(b.0 - a.0),
            redis: us(r1.0 - r0.0),
            wrk: us(b.1 - a.1),
            idle: (1.0 - busy / (2.0 * secs)).max(0.0),
        });
    }
    w
}

fn parse_latency(s: &str) -> f64 {
    let s = s.trim();
    let (num, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1_000.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1_000_000.0)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>().unwrap_or(f64::NAN) * mult
}

/// One wrk run: its figures, the requests it completed and how long it ran (s).
fn wrk(url: &str, conns: u32, secs: u32, script: &str, tag: &str) -> (Wrk, f64, f64) {
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
            "-s",
            script,
            url,
            "--",
            tag,
        ])
        .output()
        .expect("wrk must be installed");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut r = Wrk {
        rps: 0.0,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        cpu: None,
    };
    let (mut requests, mut took) = (0.0, f64::from(secs));
    for line in text.lines() {
        let t = line.trim();
        // "123456 requests in 4.00s, 17.2MB read"
        if let Some((n, rest)) = t.split_once(" requests in ") {
            requests = n.parse().unwrap_or(0.0);
            took = rest
                .split([',', 's'])
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(took);
        } else if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("50%") {
            r.p50_us = parse_latency(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            r.p99_us = parse_latency(v);
        } else if t.starts_with("Non-2xx") || t.starts_with("Socket errors") {
            println!("  wrk {url}: {t}");
        }
    }
    (r, requests, took)
}

/// (requests/s, p50 ms) of one `redis-benchmark` command.
fn redis_benchmark(port: u16, conns: u32, n: u32, args: &[&str]) -> (f64, f64) {
    let out = Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-c",
            &conns.to_string(),
            "-n",
            &n.to_string(),
            "-r",
            "100000000",
            "--csv",
        ])
        .args(args)
        .output()
        .expect("redis-benchmark must be installed");
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",...
    let line = text.lines().last().unwrap_or_default().replace('"', "");
    let f: Vec<&str> = line.split(',').collect();
    let rps = f.get(1).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let p50 = f.get(4).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    (rps, p50)
}

fn main() {
    let secs: u32 = std::env::var("KEEL_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let conns: u32 = std::env::var("KEEL_BENCH_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let workers: usize = std::env::var("KEEL_BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let redis = RedisServer::start();
    // KEEL_BENCH_PIN=1: Redis gets CPU 1 to itself; this process (server, probes) and the load
    // generators it spawns (wrk, redis-benchmark) share CPU 0. That stands for a deployment where
    // Redis runs on its own host, so its CPU is not taken from the service; without it, all of
    // them share both CPUs.
    let pinned = std::env::var("KEEL_BENCH_PIN").is_ok_and(|v| v == "1");
    if pinned {
        assert!(
            pin(&redis, true),
            "KEEL_BENCH_PIN=1 needs taskset (util-linux) and two CPUs"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    let cfg = IdempotencyConfig {
        store: StoreKind::Redis,
        // KEEL_BENCH_UNIX=1: the store reaches Redis over its Unix socket instead of TCP.
        url: if std::env::var("KEEL_BENCH_UNIX").is_ok_and(|v| v == "1") {
            redis.unix_url()
        } else {
            redis.url()
        },
        prefix: "bench:".into(),
        ..IdempotencyConfig::default()
    };
    let (addr, complete, probe) = rt.block_on(async {
        let store = RedisStore::connect(&cfg).await.unwrap();
        let complete = store.complete_script_sha().to_owned();
        let redis_store: Arc<dyn IdempotencyStore> = Arc::new(store);
        let probe = redis_store.clone();
        let by_hand = redis_store.clone();
        let mem: Arc<dyn IdempotencyStore> = Arc::new(MemoryStore::new(10_000_000));
        let live = Live::new(cfg.clone());
        let app = Router::new()
            .route("/plain", post(handler))
            .route(
                "/redis",
                post(handler).layer(IdempotencyLayer::new(redis_store, live.clone())),
            )
            .route(
                "/memory",
                post(handler).layer(IdempotencyLayer::new(mem, live)),
            )
            // The same two scripts called by hand from the handler, without the layer: the two
            // round trips as an HTTP handler on this runtime experiences them.
            .route(
                "/by-hand",
                post(move || {
                    let s = by_hand.clone();
                    async move {
                        let key = keel_idempotency::new_owner();
                        s.claim(&key, "owner", "fp", Duration::from_secs(10))
                            .await
                            .unwrap();
                        s.complete(
                            &key,
                            "owner",
                            bytes::Bytes::from_static(b"K1"),
                            Duration::from_secs(86_400),
                        )
                        .await
                        .unwrap();
                        handler().await
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (addr, complete, probe)
    });
    // The server runs on the runtime's worker thread; wrk and redis-benchmark run as processes.
    std::thread::sleep(Duration::from_millis(200));
    let dir = tempfile_dir();
    let script = format!("{dir}/keys.lua");
    std::fs::write(&script, WRK_SCRIPT).unwrap();
    let run = std::process::id();
    let redis_pid = redis.pid().map(|p| p.to_string()).unwrap_or_default();
    let clk_tck: f64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0);

    let rounds: usize = std::env::var("KEEL_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    println!(
        "keel-idempotency http_load: wrk -t1, {secs}s per run, {rounds} interleaved rounds (median shown), server on {workers} tokio worker(s){}",
        if pinned { "; Redis pinned to CPU 1, the rest to CPU 0" } else { "" }
    );
    // Interleaved rounds, so drifting load on a shared machine hits every variant alike.
    let mut samples: Vec<(u32, &str, Vec<Wrk>)> = Vec::new();
    // KEEL_BENCH_ROUTES=/plain,/redis runs only those (for profiling one route); the ratios
    // below need all four.
    let only = std::env::var("KEEL_BENCH_ROUTES").ok();
    // With KEEL_BENCH_ROUTES, KEEL_BENCH_C1=0 also leaves out the c=1 runs.
    let skip_c1 = only.is_some() && std::env::var("KEEL_BENCH_C1").is_ok_and(|v| v == "0");
    for c in [1, conns] {
        if c == 1 && skip_c1 {
            continue;
        }
        for path in ["/plain", "/redis", "/memory", "/by-hand"] {
            if only
                .as_deref()
                .is_none_or(|o| o.split(',').any(|r| r == path))
            {
                samples.push((c, path, Vec::new()));
            }
        }
    }
    let port = redis.port();
    let n = 100_000;
    let (owner, fp) = (
        "owner0123456789abcdef0123456789ab",
        "fp0123456789abcdef0123456789abcdef0123456789abcdef0123456789ab",
    );
    // A claim is a transaction (`MULTI`; `SET key record NX GET PX lease`; `PTTL`; `TIME`;
    // `EXEC`), which redis-benchmark cannot send: it runs the `SET` alone, with the record as the
    // store writes it (header `q`, no token, end 9s; owner and fingerprint after their lengths).
    // That is less work than the store's claim, so the layer's side of the comparison is the
    // harder one.
    let record = format!(
        "q{}{}{:03}{owner}{:03}{fp}",
        "0".repeat(20),
        "9".repeat(13),
        owner.len(),
        fp.len()
    );
    let claim_args = [
        "SET",
        "rb:{__rand_int__}",
        &record,
        "NX",
        "GET",
        "PX",
        "10000",
    ];
    let complete_args = [
        "EVALSHA",
        &complete,
        "1",
        "rb:{__rand_int__}",
        owner,
        "K1record-of-about-fifty-bytes-0123456789abcdef",
        "86400000",
    ];
    let mut rb: Vec<(f64, f64, f64, f64)> = Vec::new();
    for round in 0..rounds {
        for (c, path, runs) in samples.iter_mut() {
            let w = measured(&redis_pid, clk_tck, || {
                wrk(
                    &format!("http://{addr}{path}"),
                    *c,
                    secs,
                    &script,
                    &format!("{run}-{round}-{c}-{}", path.trim_start_matches('/')),
                )
            });
            runs.push(w);
        }
        if only.is_some() {
            continue;
        }
        // redis-benchmark in the same round: (c=1 claim rps, c=1 p50 ms, c=N claim, c=N complete).
        let (c1, p1) = redis_benchmark(port, 1, n / 10, &claim_args);
        let (cl, _) = redis_benchmark(port, conns, n, &claim_args);
        let (co, _) = redis_benchmark(port, conns, n, &complete_args);
        rb.push((c1, p1, cl, co));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut rows = Vec::new();
    for (c, path, runs) in samples {
        let cpus: Vec<Cpu> = runs.iter().filter_map(|w| w.cpu).collect();
        let w = Wrk {
            rps: median(runs.iter().map(|w| w.rps).collect()),
            p50_us: median(runs.iter().map(|w| w.p50_us).collect()),
            p99_us: median(runs.iter().map(|w| w.p99_us).collect()),
            cpu: (!cpus.is_empty()).then(|| Cpu {
                server: median(cpus.iter().map(|c| c.server).collect()),
                redis: median(cpus.iter().map(|c| c.redis).collect()),
                wrk: median(cpus.iter().map(|c| c.wrk).collect()),
                idle: median(cpus.iter().map(|c| c.idle).collect()),
            }),
        };
        println!(
            "  c={c:<3} {path:<8} {:>9.0} req/s  p50 {:>7.0} us  p99 {:>7.0} us   (rps per round: {})",
            w.rps,
            w.p50_us,
            w.p99_us,
            runs.iter().map(|w| format!("{:.0}", w.rps)).collect::<Vec<_>>().join(", ")
        );
        if let Some(cpu) = w.cpu {
            println!(
                "        CPU per request: server {:.1} us, Redis {:.1} us, wrk {:.1} us; cores idle {:.0}%",
                cpu.server,
                cpu.redis,
                cpu.wrk,
                cpu.idle * 100.0
            );
        }
        rows.push((c, path, w));
    }
    if only.is_some() {
        return;
    }
    let get = |c: u32, p: &str| {
        rows.iter()
            .find(|r| r.0 == c && r.1 == p)
            .map(|r| &r.2)
            .unwrap()
    };

    let claim_rps_1 = median(rb.iter().map(|r| r.0).collect());
    let claim_p50_1 = median(rb.iter().map(|r| r.1).collect());
    let claim_rps = median(rb.iter().map(|r| r.2).collect());
    let complete_rps = median(rb.iter().map(|r| r.3).collect());
    let pair_rps = 1.0 / (1.0 / claim_rps + 1.0 / complete_rps);
    println!(
        "  redis-benchmark c=1  claim SET NX GET: {claim_rps_1:.0} req/s, p50 {:.0} us",
        claim_p50_1 * 1000.0
    );
    println!("  redis-benchmark c={conns} claim SET NX GET: {claim_rps:.0} req/s; complete EVALSHA: {complete_rps:.0} req/s; claim+complete pairs: {pair_rps:.0}/s");

    // One round trip as the service sees it: a claim through the same client library and
    // runtime, sequentially, with the HTTP server idle.
    let rtt_us = rt.block_on(async move {
        let mut samples = Vec::with_capacity(5_000);
        for i in 0..5_000 {
            let key = format!("probe-{run}-{i}");
            let t = std::time::Instant::now();
            probe
                .claim(&key, "owner", "fp", Duration::from_secs(10))
                .await
                .unwrap();
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        samples.sort_by(f64::total_cmp);
        samples[samples.len() / 2]
    });
    println!("  redis-rs claim round trip from the service's runtime, c=1: p50 {rtt_us:.0} us");
    let (plain, idem) = (get(conns, "/plain"), get(conns, "/redis"));
    let (plain1, idem1) = (get(1, "/plain"), get(1, "/redis"));
    let added = idem1.p50_us - plain1.p50_us;
    let budget = 2.0 * claim_p50_1 * 1000.0 + 20.0;
    println!("ratios:");
    let by_hand1 = get(1, "/by-hand");
    println!(
        "  layer p50 over the same two scripts called by hand in the handler, c=1: {:.0} us (target <= 20 us); c={conns}: {:.0} us",
        get(1, "/redis").p50_us - by_hand1.p50_us,
        get(conns, "/redis").p50_us - get(conns, "/by-hand").p50_us
    );
    println!(
        "  added p50 at c=1 vs the service's own round trip: budget 2 x {rtt_us:.0} + 20 = {:.0} us",
        2.0 * rtt_us + 20.0
    );
    println!(
        "  throughput with layer (redis) / without, c={conns}: {:.2} (target >= 0.5)",
        idem.rps / plain.rps
    );
    if let (Some(p), Some(r)) = (plain.cpu, idem.cpu) {
        // Were the server's own CPU the only limit (load and Redis on other hosts), the ratio
        // would be that of its CPU per request. On loopback that CPU still includes the
        // receiving side's TCP work for what it writes to Redis and to wrk.
        println!(
            "  the same ratio were the server's CPU the only limit: {:.2} ({:.1} us per request without the layer, {:.1} us with it)",
            p.server / r.server,
            p.server,
            r.server
        );
    }
    if let (Some(p), Some(r), false) = (plain.cpu, idem.cpu, pinned) {
        // Redis shares the two cores: its work for a request is taken from what /plain spends
        // on one. Even a layer that cost the server nothing, with the cores never idle, would
        // reach no further than this.
        let plain_total = p.server + p.redis + p.wrk;
        println!(
            "  ceiling of that ratio on these cores, for a layer that cost the server nothing: {:.2} (/plain: {plain_total:.1} us of CPU per request; Redis for /redis: {:.1} us)",
            plain_total / (plain_total + r.redis),
            r.redis
        );
    }
    println!("  added p50 at c=1: {added:.0} us; budget 2 x redis round trip ({:.0} us) + 20 us = {budget:.0} us", claim_p50_1 * 1000.0);
    println!("  layer throughput / redis-benchmark claim+complete pairs, c={conns}: {:.2} (target >= 0.6)", idem.rps / pair_rps);

    // Throughput at saturation. A request through the layer waits for two round trips to Redis,
    // so at c=N it may leave the server's core idle where /plain keeps it busy: each route's
    // best over c = N, 2N, 4N compares the two at their own peaks. Once with everything sharing
    // both cores, once with Redis on its own core (a deployment where Redis runs on its own
    // host: its CPU is not taken from the service). KEEL_BENCH_PEAK=0 leaves this out.
    if std::env::var("KEEL_BENCH_PEAK").is_ok_and(|v| v == "0") {
        return;
    }
    let levels = [conns, conns * 2, conns * 4];
    println!(
        "peak throughput, each route at its best of c={} (median of {rounds} interleaved rounds at each):",
        levels.map(|c| c.to_string()).join(",")
    );
    for apart in [false, true] {
        if !pin(&redis, apart) {
            println!("  skipped: taskset (util-linux) failed, or this machine has no CPU 1");
            return;
        }
        // Each pass starts from an empty Redis: the keys of the runs before it (millions, kept
        // a day) would otherwise make the later pass pay for Redis's rehashing.
        flush(&redis);
        let mut runs: Vec<(u32, &str, Vec<f64>)> = levels
            .iter()
            .flat_map(|&c| [(c, "/plain", Vec::new()), (c, "/redis", Vec::new())])
            .collect();
        for round in 0..rounds {
            for (c, path, rps) in runs.iter_mut() {
                let tag = format!(
                    "{run}-peak{}-{round}-{c}-{}",
                    u8::from(apart),
                    path.trim_start_matches('/')
                );
                let (w, _, _) = wrk(&format!("http://{addr}{path}"), *c, secs, &script, &tag);
                rps.push(w.rps);
            }
        }
        let best = |p: &str| {
            runs.iter()
                .filter(|r| r.1 == p)
                .map(|r| (r.0, median(r.2.clone())))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap()
        };
        let ((pc, p), (rc, r)) = (best("/plain"), best("/redis"));
        println!(
            "  {:<26} /plain {p:>7.0} req/s (c={pc}), /redis {r:>7.0} req/s (c={rc}): ratio {:.2}{}",
            if apart { "Redis on its own core:" } else { "all sharing both cores:" },
            r / p,
            if apart { " (target >= 0.5)" } else { "" }
        );
    }
}

/// With `apart`, Redis gets CPU 1 to itself and this process (the server, and the load
/// generators it spawns from now on) CPU 0; without, all of them share CPUs 0 and 1. False when
/// `taskset` is missing or fails (no CPU 1, say).
fn pin(redis: &RedisServer, apart: bool) -> bool {
    let taskset = |args: &[&str]| {
        std::process::Command::new("taskset")
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let Some(redis_pid) = redis.pid().map(|p| p.to_string()) else {
        return false;
    };
    let me = std::process::id().to_string();
    let (redis_cpus, own_cpus) = if apart { ("1", "0") } else { ("0,1", "0,1") };
    taskset(&["-a", "-p", "-c", redis_cpus, &redis_pid])
        && taskset(&["-a", "-p", "-c", own_cpus, &me])
}

/// Empties the benchmark's Redis (its own server).
fn flush(redis: &RedisServer) {
    let mut conn = redis::Client::open(redis.url())
        .and_then(|c| c.get_connection())
        .expect("connect to the benchmark's Redis");
    redis::cmd("FLUSHALL")
        .arg("SYNC")
        .query::<()>(&mut conn)
        .expect("FLUSHALL");
}

fn tempfile_dir() -> String {
    let d = std::env::temp_dir().join(format!("keel-idem-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.to_string_lossy().into_owned()
}
