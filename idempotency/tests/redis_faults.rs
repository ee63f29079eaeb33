//! Redis failure modes on the test's own private Redis: paused, restarted, round trips counted,
//! durability (`WAIT`) failing closed.
#![cfg(feature = "redis")]

mod common;

use std::{sync::atomic::Ordering, sync::Arc, time::Duration};

use common::*;
use keel_idempotency::{
    Claim, Durability, IdempotencyConfig, IdempotencyError, IdempotencyStore, RedisStore, StoreKind,
};
use keel_testkit::RedisServer;
use reqwest::StatusCode;

fn cfg(server: &RedisServer) -> IdempotencyConfig {
    IdempotencyConfig {
        store: StoreKind::Redis,
        url: server.url(),
        prefix: "t:".into(),
        store_timeout: Duration::from_millis(250),
        ..test_config()
    }
}

/// A connection of the test's own to its private Redis, to look at or change what it holds.
async fn admin(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn post(c: &reqwest::Client, url: &str, key: &str) -> reqwest::Response {
    c.post(url)
        .header("Idempotency-Key", key)
        .header("x-test-tag", key)
        .body("b")
        .send()
        .await
        .unwrap()
}

fn stat(info: &str, line_prefix: &str, field: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|rest| rest.split(',').find_map(|kv| kv.strip_prefix(field)))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

/// Calls of each command Redis counted (`INFO commandstats`), less our own `INFO`.
async fn counts(
    conn: &mut redis::aio::MultiplexedConnection,
) -> std::collections::BTreeMap<String, u64> {
    let i: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    i.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|rest| rest.split_once(':'))
        .filter(|(name, _)| *name != "info")
        .map(|(name, fields)| (name.to_owned(), stat(fields, "", "calls=")))
        .collect()
}

/// What was counted between two readings, by command.
fn between(
    a: &std::collections::BTreeMap<String, u64>,
    b: &std::collections::BTreeMap<String, u64>,
) -> Vec<(String, u64)> {
    b.iter()
        .map(|(k, v)| (k.clone(), v - a.get(k).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_two_then_one() {
    let server = RedisServer::start();
    let store = keel_idempotency::store_from_config(&cfg(&server))
        .await
        .unwrap();
    let app = start(store, cfg(&server)).await;
    let c = client();
    let mut conn = admin(&server).await;
    let c0 = counts(&mut conn).await;
    assert_eq!(
        post(&c, &app.url("/work"), "rt").await.status(),
        StatusCode::CREATED
    );
    let c1 = counts(&mut conn).await;
    // The claim: one transaction (one round trip); the completion: one script, which reads the
    // record and writes it (one round trip). Nothing else.
    let n = |k: &str, v: u64| (k.to_owned(), v);
    assert_eq!(
        between(&c0, &c1),
        vec![
            n("evalsha", 1),
            n("exec", 1),
            n("get", 1),
            n("multi", 1),
            n("set", 2),
            n("time", 1)
        ],
        "first request: claim + complete"
    );
    let r = post(&c, &app.url("/work"), "rt").await;
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    let c2 = counts(&mut conn).await;
    assert_eq!(
        between(&c1, &c2),
        vec![n("exec", 1), n("multi", 1), n("set", 1), n("time", 1)],
        "replay: the claim only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_fails_closed_then_replays_stored() {
    let mut server = RedisServer::start();
    let store = keel_idempotency::store_from_config(&cfg(&server))
        .await
        .unwrap();
    let app = start(store, cfg(&server)).await;
    let c = client();
    let first = post(&c, &app.url("/work"), "kept").await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let body = first.bytes().await.unwrap();
    // Persist what Redis holds, then kill it (the restart loads the snapshot).
    {
        let mut conn = admin(&server).await;
        let _: () = redis::cmd("SAVE").query_async(&mut conn).await.unwrap();
    }
    server.stop();
    for key in ["kept", "new-while-down"] {
        let r = post(&c, &app.url("/work"), key).await;
        assert_eq!(
            r.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "fail closed while down"
        );
        assert!(r.headers().get("retry-after").is_some());
    }
    assert_eq!(app.seen.execs(), 1, "nothing ran while Redis was down");
    server.restart();
    // The connection comes back (scripts are gone: NOSCRIPT is handled by reloading them).
    let mut replay = None;
    for _ in 0..40 {
        let r = post(&c, &app.url("/work"), "kept").await;
        if r.status() != StatusCode::SERVICE_UNAVAILABLE {
            replay = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let replay = replay.expect("store back after restart");
    assert_eq!(replay.status(), StatusCode::CREATED);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.bytes().await.unwrap(), body);
    assert_eq!(
        app.seen.execs(),
        1,
        "no double execution for the stored key"
    );
    assert_eq!(
        post(&c, &app.url("/work"), "new-while-down").await.status(),
        StatusCode::CREATED
    );
    assert_eq!(app.seen.execs(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_redis_loses_the_lease() {
    let server = RedisServer::start();
    let config = IdempotencyConfig {
        lease: Duration::from_millis(300),
        ..cfg(&server)
    };
    let store = keel_idempotency::store_from_config(&config).await.unwrap();
    let app = start(store, config).await;
    app.seen.sleeps.lock().unwrap().extend([1500, 10]);
    let c = client();
    let first = tokio::spawn({
        let (c, u) = (c.clone(), app.url("/work"));
        async move { post(&c, &u, "paused").await.status() }
    });
    tokio::time::sleep(Duration::from_millis(80)).await;
    server.pause();
    // Renewals hang; Redis's own clock runs the lease out meanwhile.
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.resume();
    let mut second = None;
    for _ in 0..20 {
        let r = post(&c, &app.url("/work"), "paused").await;
        if r.status() == StatusCode::CREATED {
            second = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = second.expect("second claimant runs");
    assert!(second.headers().get("idempotent-replayed").is_none());
    assert_eq!(
        first.await.unwrap(),
        StatusCode::CONFLICT,
        "first's completion refused as stale owner"
    );
    assert_eq!(app.seen.execs(), 2);
    assert_eq!(app.seen.lease_lost_seen.load(Ordering::SeqCst), 1);
}

/// Claims `k` through a store with `config` (asking for a replica there is none of): the claim
/// fails as a durability failure, and was released, so a store without durability claims the
/// key at once. Returns both stores (the plain one holds `k` as owner `o2`) and the error.
async fn claim_fails_for_durability_and_is_released(
    server: &RedisServer,
    config: &IdempotencyConfig,
    lease: Duration,
) -> (RedisStore, RedisStore, IdempotencyError) {
    let store = RedisStore::connect(config).await.unwrap();
    let r = store.claim("k", "o1", "f", lease).await;
    assert!(
        matches!(
            r,
            Err(IdempotencyError::Durability {
                acked: 0,
                wanted: 1
            })
        ),
        "{r:?}"
    );
    let plain = RedisStore::connect(&cfg(server)).await.unwrap();
    assert!(matches!(
        plain.claim("k", "o2", "f", lease).await,
        Ok(Claim::New { .. })
    ));
    (store, plain, r.unwrap_err())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_without_replicas_fails_closed() {
    let server = RedisServer::start();
    let config = IdempotencyConfig {
        durability: Durability {
            replicas: 1,
            timeout: Duration::from_millis(50),
        },
        ..cfg(&server)
    };
    let (store, plain, e) =
        claim_fails_for_durability_and_is_released(&server, &config, Duration::from_secs(5)).await;
    assert!(e.is_retryable());
    // A completion waits for replicas too; too few acknowledgements are logged, not fatal
    // (the handler already ran), and the record is stored.
    let done = store
        .complete(
            "k",
            "o2",
            bytes::Bytes::from_static(b"r"),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(done, keel_idempotency::Ownership::Owner);
    assert!(matches!(
        plain.claim("k", "o3", "f", Duration::from_secs(5)).await,
        Ok(Claim::Completed(r)) if &r[..] == b"r"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_flush_is_survived_and_fences_grow() {
    let server = RedisServer::start();
    let store: Arc<dyn IdempotencyStore> =
        Arc::new(RedisStore::connect(&cfg(&server)).await.unwrap());
    let Ok(Claim::New { fence: f1 }) = store.claim("k", "o1", "f", Duration::from_secs(5)).await
    else {
        panic!()
    };
    let mut conn = admin(&server).await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        store.release("k", "o1").await.unwrap(),
        keel_idempotency::Ownership::Owner
    );
    let Ok(Claim::New { fence: f2 }) = store.claim("k", "o2", "f", Duration::from_secs(5)).await
    else {
        panic!()
    };
    assert!(f2 > f1);
    // One key per idempotency key, no counter beside it.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("t:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys.iter().all(|k| k.contains("{k}")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_store_starts_without_redis() {
    let mut server = RedisServer::start();
    let config = cfg(&server);
    server.stop();
    let store = RedisStore::connect_lazy(&config).unwrap();
    let r = store.claim("k", "o", "f", Duration::from_secs(5)).await;
    assert!(
        matches!(r, Err(ref e) if e.is_retryable() && e.is_store_failure()),
        "{r:?}"
    );
    server.restart();
    let mut claimed = None;
    for _ in 0..40 {
        if let Ok(c) = store.claim("k", "o", "f", Duration::from_secs(5)).await {
            claimed = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(claimed, Some(Claim::New { .. })), "{claimed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_wait_longer_than_store_timeout_fails_closed_and_releases() {
    // WAIT blocks for `durability.timeout`, longer than `store_timeout`: the claim must still
    // come back as a durability failure (claim released), not as a timeout that keeps the key.
    let server = RedisServer::start();
    let config = IdempotencyConfig {
        store_timeout: Duration::from_millis(500),
        durability: Durability {
            replicas: 1,
            timeout: Duration::from_millis(1500),
        },
        ..cfg(&server)
    };
    claim_fails_for_durability_and_is_released(&server, &config, Duration::from_secs(30)).await;
}

/// A claim that reaches Redis only after its timeout (Redis paused) is given back: the client's
/// retry runs at once, instead of meeting "in progress" for the whole (here 30 s) lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_applied_after_its_timeout_is_given_back() {
    let server = RedisServer::start();
    let config = IdempotencyConfig {
        lease: Duration::from_secs(30),
        ..cfg(&server)
    };
    let store = keel_idempotency::store_from_config(&config).await.unwrap();
    let app = start(store, config).await;
    let c = client();
    server.pause();
    let r = post(&c, &app.url("/work"), "late").await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "fails closed");
    server.resume();
    // Redis now applies the late claim, then the release queued behind it.
    let mut statuses = Vec::new();
    for _ in 0..40 {
        let r = post(&c, &app.url("/work"), "late").await;
        statuses.push(r.status());
        if r.status() == StatusCode::CREATED {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        statuses.last(),
        Some(&StatusCode::CREATED),
        "the retry runs: {statuses:?}"
    );
    assert_eq!(app.seen.execs(), 1);
}

/// The fencing token grows across a lapsed lease and a release, and a lapsed owner can neither
/// renew, complete nor release: the lease is the key's expiry (Redis's clock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_grow_across_a_lapsed_lease() {
    use keel_idempotency::Ownership;
    let server = RedisServer::start();
    let store = RedisStore::connect(&cfg(&server)).await.unwrap();
    let short = Duration::from_millis(50);
    let Ok(Claim::New { fence: f1 }) = store.claim("k", "o1", "f", short).await else {
        panic!()
    };
    match store.claim("k", "o2", "f", short).await {
        Ok(Claim::InProgress {
            retry_after: Some(d),
        }) => assert!(d <= short, "{d:?}"),
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(120)).await;
    let Ok(Claim::New { fence: f2 }) = store.claim("k", "o2", "f", short * 100).await else {
        panic!("the lapsed lease is taken over")
    };
    assert!(f2 > f1, "{f2} > {f1}");
    assert_eq!(
        store.renew("k", "o1", short).await.unwrap(),
        Ownership::Stale
    );
    assert_eq!(
        store
            .complete("k", "o1", bytes::Bytes::from_static(b"x"), short)
            .await
            .unwrap(),
        Ownership::Stale
    );
    assert_eq!(store.release("k", "o1").await.unwrap(), Ownership::Stale);
    assert_eq!(store.release("k", "o2").await.unwrap(), Ownership::Owner);
    let Ok(Claim::New { fence: f3 }) = store.claim("k", "o3", "g", short).await else {
        panic!("a released key is claimable, whatever the fingerprint")
    };
    assert!(f3 > f2, "{f3} > {f2}");
}

/// A key holding a record of an earlier format (a hash) is never taken for an absent one: a
/// claim answers "in progress", the owner-checked operations refuse, nothing runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_of_an_earlier_format_is_in_progress_not_absent() {
    use keel_idempotency::Ownership;
    let server = RedisServer::start();
    let store = RedisStore::connect(&cfg(&server)).await.unwrap();
    let mut conn = admin(&server).await;
    // The old store's completed record: a hash under the same key.
    let key = "t:{old}";
    let _: () = redis::cmd("HSET")
        .arg(key)
        .arg("s")
        .arg("c")
        .arg("o")
        .arg("o1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("PEXPIRE")
        .arg(key)
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    match store.claim("old", "o2", "f", Duration::from_secs(5)).await {
        // Nothing tells how long it lasts: no hint (the service answers `Retry-After: 1`).
        Ok(Claim::InProgress { retry_after }) => assert_eq!(retry_after, None),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store
            .renew("old", "o1", Duration::from_secs(5))
            .await
            .unwrap(),
        Ownership::Stale
    );
    assert_eq!(
        store
            .complete(
                "old",
                "o1",
                bytes::Bytes::from_static(b"x"),
                Duration::from_secs(5)
            )
            .await
            .unwrap(),
        Ownership::Stale
    );
    assert_eq!(store.release("old", "o1").await.unwrap(), Ownership::Stale);
    // An absent key is still claimed at once.
    assert!(matches!(
        store.claim("new", "o2", "f", Duration::from_secs(5)).await,
        Ok(Claim::New { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn concurrent_claims_each_get_their_own_answer() {
    let server = RedisServer::start();
    let store = Arc::new(RedisStore::connect(&cfg(&server)).await.unwrap());
    // One key already completed, one in progress: their answers must reach their own callers.
    let Ok(Claim::New { .. }) = store.claim("done", "o", "f", Duration::from_secs(5)).await else {
        panic!()
    };
    store
        .complete(
            "done",
            "o",
            bytes::Bytes::from_static(b"answer"),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let Ok(Claim::New { .. }) = store.claim("busy", "o", "f", Duration::from_secs(5)).await else {
        panic!()
    };
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let key = match i {
                    7 => "done".to_owned(),
                    9 => "busy".to_owned(),
                    _ => format!("k{i}"),
                };
                (
                    i,
                    store.claim(&key, "o2", "f", Duration::from_secs(5)).await,
                )
            })
        })
        .collect();
    for t in tasks {
        match t.await.unwrap() {
            (7, Ok(Claim::Completed(r))) => assert_eq!(&r[..], b"answer"),
            (9, Ok(Claim::InProgress { .. })) => {}
            (i, Ok(Claim::New { .. })) if i != 7 && i != 9 => {}
            (i, other) => panic!("claim {i}: {other:?}"),
        }
    }
}

/// A burst of completions (scripts) after `SCRIPT FLUSH`: every one meets `NOSCRIPT` in the
/// same pipeline, the scripts are loaded again, and each completion is retried and stored.
#[tokio::test(flavor = "current_thread")]
async fn a_script_flush_is_survived_by_a_pipelined_burst() {
    let server = RedisServer::start();
    let store = Arc::new(RedisStore::connect(&cfg(&server)).await.unwrap());
    for i in 0..50 {
        let r = store
            .claim(&format!("k{i}"), "o", "f", Duration::from_secs(5))
            .await;
        assert!(matches!(r, Ok(Claim::New { .. })), "{r:?}");
    }
    let mut conn = admin(&server).await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .complete(
                        &format!("k{i}"),
                        "o",
                        bytes::Bytes::from_static(b"done"),
                        Duration::from_secs(60),
                    )
                    .await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(
            t.await.unwrap().unwrap(),
            keel_idempotency::Ownership::Owner
        );
    }
    assert_eq!(
        store
            .claim("k7", "p", "f", Duration::from_secs(5))
            .await
            .unwrap(),
        Claim::Completed(bytes::Bytes::from_static(b"done"))
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_claim_dropped_while_queued_is_never_sent() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&cfg(&server)).await.unwrap();
    let mut conn = admin(&server).await;
    {
        // Polled once (queued for the connection's pump, which has not run yet), then dropped.
        let mut gone = store.claim("gone", "o", "f", Duration::from_secs(5));
        assert!(futures_util::poll!(&mut gone).is_pending());
    }
    let r = store.claim("kept", "o", "f", Duration::from_secs(5)).await;
    assert!(matches!(r, Ok(Claim::New { .. })), "{r:?}");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("t:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys, vec!["t:{kept}".to_owned()]);
}

/// The claim script of the store's earlier layout, as an instance not yet upgraded runs it (its
/// records: `p` in progress with the lease's end in the header, `r` released, kept a day).
/// ARGV: owner and fingerprint after their lengths, fingerprint, lease ms, keep ms.
const EARLIER_CLAIM: &str = r"
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'table' then return {1, redis.call('PTTL', KEYS[1])} end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local n
if v then
  local s = string.sub(v, 1, 1)
  if s ~= 'r' then
    local ends = tonumber(string.sub(v, 22, 34))
    if s == 'c' or ends > now then
      local ol = tonumber(string.sub(v, 35, 37))
      local fl = tonumber(string.sub(v, 38 + ol, 40 + ol))
      if string.sub(v, 41 + ol, 40 + ol + fl) ~= ARGV[2] then return {3} end
      if s == 'c' then return {2, string.sub(v, 41 + ol + fl)} end
      return {1, ends - now}
    end
  end
  n = tonumber(string.sub(v, 2, 21)) + 1
else
  n = t[1] * 1000000 + t[2]
end
redis.call('SET', KEYS[1], string.format('p%020d%013d', n, now + ARGV[3]) .. ARGV[1], 'PX', ARGV[4])
return {0, n}
";

/// During an upgrade, records of the earlier layout are read right (in progress while their
/// lease runs, taken over after it, or after a release, with the next fencing token), and an
/// instance not yet upgraded reads the new records right (in progress, never run twice;
/// completed, replayed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_the_earlier_layout_are_read_and_taken_over() {
    use keel_idempotency::Ownership;
    let server = RedisServer::start();
    let store = RedisStore::connect(&cfg(&server)).await.unwrap();
    let mut conn = admin(&server).await;
    let (secs, _): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let now_ms = secs * 1000;
    let tail = |owner: &str, fp: &str| format!("{:03}{owner}{:03}{fp}", owner.len(), fp.len());
    let put = |key: &str, value: String| {
        redis::cmd("SET")
            .arg(format!("t:{{{key}}}"))
            .arg(value)
            .arg("PX")
            .arg(86_400_000)
            .to_owned()
    };
    // In progress, lease running for a minute more: in progress, or a mismatch.
    let live = format!("p{:020}{:013}{}", 7, now_ms + 60_000, tail("old", "f"));
    let _: () = put("live", live).query_async(&mut conn).await.unwrap();
    match store.claim("live", "o", "f", Duration::from_secs(5)).await {
        Ok(Claim::InProgress {
            retry_after: Some(d),
        }) => assert!(
            d > Duration::from_secs(50) && d <= Duration::from_secs(61),
            "{d:?}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        store.claim("live", "o", "g", Duration::from_secs(5)).await,
        Ok(Claim::Mismatch)
    ));
    // Its lease over, or released: taken over, the token continuing from the record's.
    let lapsed = format!("p{:020}{:013}{}", 41, now_ms - 1_000, tail("old", "f"));
    let _: () = put("lapsed", lapsed).query_async(&mut conn).await.unwrap();
    let released = format!("r{:020}{}", 90, "0".repeat(19));
    let _: () = put("released", released)
        .query_async(&mut conn)
        .await
        .unwrap();
    for (key, fence) in [("lapsed", 42), ("released", 91)] {
        assert_eq!(
            store
                .claim(key, "o", "g", Duration::from_secs(5))
                .await
                .unwrap(),
            Claim::New { fence },
            "{key}"
        );
        // Held now like any new claim: by its owner alone, until completed.
        assert_eq!(
            store
                .renew(key, "old", Duration::from_secs(5))
                .await
                .unwrap(),
            Ownership::Stale
        );
        assert!(matches!(
            store.claim(key, "p", "g", Duration::from_secs(5)).await,
            Ok(Claim::InProgress { .. })
        ));
        let done = bytes::Bytes::from_static(b"answer");
        assert_eq!(
            store
                .complete(key, "o", done.clone(), Duration::from_secs(60))
                .await
                .unwrap(),
            Ownership::Owner
        );
        assert_eq!(
            store
                .claim(key, "p", "g", Duration::from_secs(5))
                .await
                .unwrap(),
            Claim::Completed(done)
        );
    }
    // Records of the earlier layout that cannot be read (letters where digits belong, a token
    // past what the script counts exactly): in progress, as any record it cannot read, and
    // left as they are (the script failed on the first, and took the second with a token out
    // of range, claiming the key for nobody).
    for (key, record) in [
        (
            "bad-token",
            format!("r{}{}", "x".repeat(20), "0".repeat(19)),
        ),
        (
            "huge-token",
            format!("r{}{}", "9".repeat(20), "0".repeat(19)),
        ),
        (
            "bad-end",
            format!("p{:020}{}{}", 7, "y".repeat(13), tail("old", "f")),
        ),
        (
            "bad-length",
            format!("p{:020}{:013}zz{}", 7, now_ms - 1, "old"),
        ),
    ] {
        let _: () = put(key, record.clone())
            .query_async(&mut conn)
            .await
            .unwrap();
        for _ in 0..2 {
            assert!(
                matches!(
                    store.claim(key, "o", "f", Duration::from_secs(5)).await,
                    Ok(Claim::InProgress { .. })
                ),
                "{key}"
            );
        }
        let kept: String = redis::cmd("GET")
            .arg(format!("t:{{{key}}}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(kept, record, "{key}");
    }
    // An instance not yet upgraded, on records the new store wrote.
    let earlier = redis::Script::new(EARLIER_CLAIM);
    let mut old = conn.clone();
    let mut old_claim = async |key: &str| -> redis::Value {
        earlier
            .key(format!("t:{{{key}}}"))
            .arg(tail("x", "g"))
            .arg("g")
            .arg(5_000)
            .arg(86_400_000)
            .invoke_async(&mut old)
            .await
            .unwrap()
    };
    let state = |v: &redis::Value| match v {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => -1,
        },
        _ => -1,
    };
    assert_eq!(
        state(&old_claim("fresh").await),
        0,
        "an absent key, claimed by the earlier instance"
    );
    assert!(matches!(
        store.claim("fresh", "o", "g", Duration::from_secs(5)).await,
        Ok(Claim::InProgress { .. })
    ));
    assert!(matches!(
        store.claim("new", "o", "g", Duration::from_secs(5)).await,
        Ok(Claim::New { .. })
    ));
    assert_eq!(
        state(&old_claim("new").await),
        1,
        "the new store's claim is in progress for the earlier instance"
    );
    assert_eq!(
        old_claim("lapsed").await,
        redis::Value::Array(vec![
            redis::Value::Int(2),
            redis::Value::BulkString(b"answer".to_vec())
        ]),
        "and its completion a replay"
    );
}

/// The store's own connection authenticates (a password, or a user and password) and selects
/// the database the URL names; a wrong password is a clear error, and nothing is claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_url_s_user_password_and_database_are_used() {
    let server = RedisServer::start();
    let mut admin = admin(&server).await;
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "keel", "on", ">pw", "~*", "+@all"][..])
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "requirepass", "secret"][..])
        .query_async(&mut admin)
        .await
        .unwrap();
    let port = server.port();
    let at = |url: String| IdempotencyConfig {
        url,
        ..cfg(&server)
    };
    // Connects with `url` and claims `key`, new.
    let claim_new = |url: String, key: &'static str| {
        let cfg = at(url);
        async move {
            let store = RedisStore::connect(&cfg).await.unwrap();
            assert!(matches!(
                store.claim(key, "o", "f", Duration::from_secs(5)).await,
                Ok(Claim::New { .. })
            ));
        }
    };
    claim_new(format!("redis://keel:pw@127.0.0.1:{port}/3"), "u").await;
    claim_new(format!("redis://:secret@127.0.0.1:{port}/"), "d").await;
    let keys = |db: i64| {
        let url = format!("redis://:secret@127.0.0.1:{port}/{db}");
        async move {
            let mut c = redis::Client::open(url)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("t:*")
                .query_async(&mut c)
                .await
                .unwrap();
            keys
        }
    };
    assert_eq!(keys(3).await, vec!["t:{u}".to_owned()]);
    assert_eq!(keys(0).await, vec!["t:{d}".to_owned()]);
    let wrong = RedisStore::connect(&at(format!("redis://:nope@127.0.0.1:{port}/"))).await;
    match wrong {
        Err(e @ IdempotencyError::Unavailable(_)) => {
            assert!(e.to_string().to_lowercase().contains("pass"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

/// The store reaches Redis over a Unix socket too (`redis+unix://`), on a `redis-server` of the
/// test's own that listens on a socket only.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_url_is_used() {
    let dir = std::env::temp_dir().join(format!(
        "keel-idem-unix-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("redis.sock");
    let mut child = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--save",
            "",
            "--appendonly",
            "no",
            "--unixsocket",
        ])
        .arg(&socket)
        .arg("--dir")
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server must be installed");
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("redis+unix://{}", socket.display());
    let cfg = IdempotencyConfig {
        store: StoreKind::Redis,
        url,
        prefix: "t:".into(),
        ..test_config()
    };
    let claimed = async {
        let store = RedisStore::connect(&cfg).await?;
        store.claim("k", "o", "f", Duration::from_secs(5)).await
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(matches!(claimed, Ok(Claim::New { .. })), "{claimed:?}");
}

/// Redis out of memory (`maxmemory` reached, `noeviction`) refuses the claim's `SET` inside the
/// transaction: the claim fails with that refusal (not `EXECABORT`), takes nothing, and claims
/// again once memory is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_refused_for_memory_says_so_and_takes_nothing() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&cfg(&server)).await.unwrap();
    let mut admin = admin(&server).await;
    let set = |k: &'static str, v: &'static str| {
        let mut c = redis::cmd("CONFIG");
        c.arg("SET").arg(k).arg(v);
        c
    };
    let _: () = set("maxmemory-policy", "noeviction")
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: () = set("maxmemory", "1").query_async(&mut admin).await.unwrap();
    let refused = store.claim("oom", "o", "f", Duration::from_secs(5)).await;
    match &refused {
        Err(e) => assert!(e.to_string().contains("OOM"), "{e}"),
        other => panic!("{other:?}"),
    }
    let held: Option<Vec<u8>> = redis::cmd("GET")
        .arg("t:{oom}")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(held, None, "a refused claim writes nothing");
    let _: () = set("maxmemory", "0").query_async(&mut admin).await.unwrap();
    let again = store.claim("oom", "o", "f", Duration::from_secs(5)).await;
    assert!(matches!(again, Ok(Claim::New { .. })), "{again:?}");
}
