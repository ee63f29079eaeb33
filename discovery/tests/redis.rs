//! Redis backend against real servers: the machine's Redis with a unique prefix, or a private
//! `redis-server` for tests that stop or restart it.
#![cfg(feature = "redis")]

mod common;

use std::time::Duration;

use common::*;
use keel_core::{AdminState, Shutdown};
use keel_discovery::{Backend, Discover, DiscoveryConfig, RedisDiscovery, Registry};
use keel_testkit::{shared_redis_url, unique_prefix, RedisServer};
use redis::AsyncCommands;

fn config(url: String, prefix: String) -> DiscoveryConfig {
    DiscoveryConfig {
        backend: Backend::Redis,
        url: Some(url),
        prefix,
        ttl: Duration::from_millis(600),
        resync: Duration::from_secs(5),
        ..Default::default()
    }
}

const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn register_is_seen_by_a_watcher_in_another_task_then_drain_and_deregister() {
    let cfg = config(shared_redis_url(), unique_prefix("disc-reg"));
    let watcher_side = RedisDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    let registry_side = RedisDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    let s = svc("orders");
    let w = watcher_side.watch(&s).unwrap();
    w.ready().await;
    assert!(w.snapshot().is_empty());
    let s2 = s.clone();
    let reg = tokio::spawn(async move { registry_side.register(inst(&s2, 9101)).await.unwrap() })
        .await
        .unwrap();
    wait_len(&w, 1, LIMIT).await;
    reg.drain().await.unwrap();
    let w2 = w.clone();
    eventually(LIMIT, "draining visible", move || {
        let s = w2.snapshot();
        async move { s.first().is_some_and(|i| i.state == AdminState::Draining) }
    })
    .await;
    reg.deregister().await.unwrap();
    // 1 -> 0 is a full shrink: believed once it persists for `confirm_reads` reads.
    wait_len(&w, 0, LIMIT).await;
}

#[tokio::test]
async fn a_registration_whose_heartbeat_stops_is_removed_after_its_ttl() {
    let cfg = config(shared_redis_url(), unique_prefix("disc-ttl"));
    let d = RedisDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    let s = svc("payments");
    let w = d.watch(&s).unwrap();
    let stays = d.register(inst(&s, 9201)).await.unwrap();
    let leaves = d.register(inst(&s, 9202)).await.unwrap();
    wait_len(&w, 2, LIMIT).await;
    // Outlive a few heartbeats: both stay.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(w.snapshot().len(), 2);
    let started = std::time::Instant::now();
    drop(leaves); // heartbeats stop; nothing is deleted
    wait_len(&w, 1, LIMIT).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(200),
        "removed by expiry, not by drop: {took:?}"
    );
    assert_eq!(ports(&w), vec![9201]);
    drop(stays);
}

#[tokio::test]
async fn malformed_records_are_skipped_and_the_watcher_keeps_going() {
    let prefix = unique_prefix("disc-bad");
    let cfg = config(shared_redis_url(), prefix.clone());
    let d = RedisDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    let s = svc("inventory");
    let _good = d.register(inst(&s, 9301)).await.unwrap();
    let client = redis::Client::open(shared_redis_url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let alive = format!("{prefix}:{{inventory}}:alive");
    let events = format!("{prefix}:{{inventory}}:events");
    let bad_key = format!("{prefix}:{{inventory}}:inst:bad");
    let _: () = c.set_ex(&bad_key, "{not json", 60).await.unwrap();
    let _: () = c.zadd(&alive, "bad", 1e15).await.unwrap();
    // Also a record of another service, and garbage change events.
    let wrong = serde_json::to_string(&inst(&svc("other"), 9399)).unwrap();
    let _: () = c
        .set_ex(format!("{prefix}:{{inventory}}:inst:wrong"), &wrong, 60)
        .await
        .unwrap();
    let _: () = c.zadd(&alive, "wrong", 1e15).await.unwrap();
    let w = d.watch(&s).unwrap();
    wait_len(&w, 1, LIMIT).await;
    let _: String = c
        .xadd(
            &events,
            "*",
            &[("op", "put"), ("id", "x"), ("data", "garbage")],
        )
        .await
        .unwrap();
    let _: String = c.xadd(&events, "*", &[("nonsense", "1")]).await.unwrap();
    let _more = d.register(inst(&s, 9302)).await.unwrap();
    wait_len(&w, 2, LIMIT).await;
    assert_eq!(ports(&w), vec![9301, 9302]);
}

#[tokio::test]
async fn the_shrink_guard_holds_on_a_bogus_empty_answer() {
    let prefix = unique_prefix("disc-guard");
    let mut cfg = config(shared_redis_url(), prefix.clone());
    cfg.ttl = Duration::from_secs(30); // no heartbeat during the test repairs the keys
    cfg.resync = Duration::from_millis(200);
    cfg.confirm_reads = 1000;
    let d = RedisDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    let s = svc("search");
    let w = d.watch(&s).unwrap();
    let mut regs = Vec::new();
    for p in 9401..9405 {
        regs.push(d.register(inst(&s, p)).await.unwrap());
    }
    wait_len(&w, 4, LIMIT).await;
    // The registry "loses" everything without any event: full reads now answer empty.
    let client = redis::Client::open(shared_redis_url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = c.del(format!("{prefix}:{{search}}:alive")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await; // several resyncs
    assert_eq!(w.snapshot().len(), 4, "the last known set is kept");
}

#[tokio::test]
async fn after_a_redis_restart_watchers_recover_and_registrations_come_back() {
    let mut server = RedisServer::start();
    let cache = tempfile::tempdir().unwrap();
    let mut cfg = config(server.url(), "keel".into());
    cfg.cache_path = Some(cache.path().to_owned());
    let d = RedisDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    let s = svc("ledger");
    let w = d.watch(&s).unwrap();
    let _a = d.register(inst(&s, 9501)).await.unwrap();
    let _b = d.register(inst(&s, 9502)).await.unwrap();
    wait_len(&w, 2, LIMIT).await;

    // Record the smallest set any reader saw from here on.
    let min_seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
    let (live, min) = (w.live().clone(), min_seen.clone());
    let recorder = tokio::spawn(async move {
        let mut rx = live.subscribe();
        loop {
            min.fetch_min(live.load().len(), std::sync::atomic::Ordering::SeqCst);
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
    server.restart(); // empty
    let client = redis::Client::open(server.url()).unwrap();
    eventually(LIMIT, "registrations rewritten in the new server", || {
        let client = client.clone();
        async move {
            let Ok(mut c) = client.get_multiplexed_async_connection().await else {
                return false;
            };
            let n: usize = c.zcard("keel:{ledger}:alive").await.unwrap_or(0);
            n == 2
        }
    })
    .await;
    // The guard kept the set while the new server answered empty; it converges on both again.
    wait_len(&w, 2, LIMIT).await;
    recorder.abort();
    assert!(
        min_seen.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "readers never saw an empty set across the restart"
    );
    // The watcher follows changes again.
    let _c = d.register(inst(&s, 9503)).await.unwrap();
    wait_len(&w, 3, LIMIT).await;

    // The backend is down at start: a new process uses the on-disk cache.
    server.stop();
    let d2 = RedisDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    let w2 = d2.watch(&s).unwrap();
    tokio::time::timeout(LIMIT, w2.ready()).await.unwrap();
    assert_eq!(ports(&w2), vec![9501, 9502, 9503]);
}

#[tokio::test]
async fn an_unreadable_update_drops_the_record_it_replaces() {
    let prefix = unique_prefix("disc-garbled");
    let mut cfg = config(shared_redis_url(), prefix.clone());
    // No heartbeat, expiry or periodic re-read during the test repairs anything.
    cfg.ttl = Duration::from_secs(30);
    cfg.resync = Duration::from_secs(600);
    let d = RedisDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    let s = svc("ledger");
    let w = d.watch(&s).unwrap();
    let mut regs = Vec::new();
    for p in 9501..9504 {
        regs.push(d.register(inst(&s, p)).await.unwrap());
    }
    wait_len(&w, 3, LIMIT).await;
    // The record of 9503 is overwritten by something unreadable.
    let id = inst(&s, 9503).id.to_string();
    let client = redis::Client::open(shared_redis_url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: String = c
        .xadd(
            format!("{prefix}:{{ledger}}:events"),
            "*",
            &[("op", "put"), ("id", id.as_str()), ("data", "{garbled")],
        )
        .await
        .unwrap();
    // The old content is no longer true: it goes, as with etcd.
    wait_len(&w, 2, LIMIT).await;
    assert_eq!(ports(&w), vec![9501, 9502]);
}

#[tokio::test]
async fn deregistering_a_replaced_process_leaves_its_successors_record() {
    let prefix = unique_prefix("disc-handover");
    let mut cfg = config(shared_redis_url(), prefix.clone());
    cfg.ttl = Duration::from_secs(30); // no heartbeat repairs the record during the test
                                       // The old process and its replacement at the same address (a restart in place).
    let old_side = RedisDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    let new_side = RedisDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    let s = svc("billing");
    let old = old_side.register(inst(&s, 9601)).await.unwrap();
    let new = new_side.register(inst(&s, 9601)).await.unwrap();
    // The old one shuts down after its replacement took over.
    old.deregister().await.unwrap();
    let id = inst(&s, 9601).id.to_string();
    let key = format!("{prefix}:{{billing}}:inst:{id}");
    let alive = format!("{prefix}:{{billing}}:alive");
    let client = redis::Client::open(shared_redis_url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let record: Option<String> = c.get(&key).await.unwrap();
    assert!(
        record.is_some(),
        "the successor's record was deleted by the old process"
    );
    let score: Option<f64> = c.zscore(&alive, &id).await.unwrap();
    assert!(score.is_some(), "the successor's expiry was removed");
    let w = new_side.watch(&s).unwrap();
    wait_len(&w, 1, LIMIT).await;
    // Its own deregistration still removes it.
    new.deregister().await.unwrap();
    let record: Option<String> = c.get(&key).await.unwrap();
    assert!(record.is_none());
    let score: Option<f64> = c.zscore(&alive, &id).await.unwrap();
    assert!(score.is_none());
}
