//! Redis: per-instance records with a server-side TTL, and a change stream.
//!
//! ## Key layout
//!
//! With `prefix = "keel"` and service `payments` (the service in braces is a Redis Cluster hash
//! tag, so one service's keys share a slot and its scripts are cluster-safe):
//!
//! | key | type | content |
//! |---|---|---|
//! | `keel:{payments}:inst:{id}` | string | the [`Instance`] as JSON, plus `owner`, `PX ttl` |
//! | `keel:{payments}:alive` | sorted set | member `{id}`, score = expiry in ms of **Redis server time** |
//! | `keel:{payments}:events` | stream | `op` = `put` (with `id`, `data` = JSON) or `del` (with `id`), `MAXLEN ~ 1000` |
//!
//! ## Why this shape
//!
//! - Expiry is decided by Redis alone (`PX`, and `TIME` inside scripts for the sorted set): no
//!   process compares its own clock with another's.
//! - Registration is one Lua script (write record, refresh the expiry score, and `XADD` a `put`
//!   only when the content changed), so a heartbeat costs one round trip and no event.
//! - Each registration writes a random `owner` into its record, and deregistering deletes the
//!   record only while it still holds that owner: the id defaults to `{service}-{addr}`, so a
//!   process restarted in place has rewritten the same key, and its predecessor's shutdown must
//!   not delete it.
//! - Watchers read a consistent snapshot *and the stream position it corresponds to* in one
//!   script, then `XREAD BLOCK` from there: a change is visible within a round trip, and a watcher
//!   that reconnects replays what it missed from its last id.
//! - Records that stop heartbeating are reaped by any watcher (a script compares scores with
//!   `TIME`, removes them and `XADD`s a `del`), so everyone learns of the expiry at once.
//! - A periodic full re-read (`resync`) repairs anything a trimmed stream could have lost, and
//!   goes through the registry-loss guard like every answer.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use keel_core::{Instance, ServiceName, Shutdown};
use redis::{aio::ConnectionManager, streams::StreamReadReply, AsyncConnectionConfig, Script};

use crate::{
    publish::{Publisher, SafetyOptions},
    registration::{Beat, Lease},
    telemetry, BoxFuture, Discover, Discovery, DiscoveryConfig, DiscoveryError, InstanceWatch,
    Registration, Registry,
};

const BACKEND: &str = "redis";
const STREAM_MAXLEN: usize = 1000;

const NOW: &str = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n";

const REGISTER: &str = r"
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
if old ~= ARGV[2] then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'op', 'put', 'id', ARGV[1], 'data', ARGV[2])
end
if old then return 1 else return 0 end
";

const DEREGISTER: &str = r"
local old = redis.call('GET', KEYS[1])
if old then
  local ok, rec = pcall(cjson.decode, old)
  if not ok or type(rec) ~= 'table' or rec.owner ~= ARGV[3] then return 0 end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'op', 'del', 'id', ARGV[1])
return 1
";

const REAP: &str = r"
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(dead) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('DEL', KEYS[3] .. id)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'op', 'del', 'id', id)
end
return #dead
";

const READ: &str = r"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local out = {'0-0'}
if #last > 0 then out[1] = last[1][1] end
for _, id in ipairs(ids) do
  local v = redis.call('GET', KEYS[3] .. id)
  if v then table.insert(out, v) end
end
return out
";

fn script(body: &str) -> Script {
    Script::new(&format!("{NOW}{body}"))
}

struct Keys {
    inst_prefix: String,
    alive: String,
    events: String,
}

impl Keys {
    fn new(prefix: &str, service: &ServiceName) -> Self {
        Self {
            inst_prefix: format!("{prefix}:{{{service}}}:inst:"),
            alive: format!("{prefix}:{{{service}}}:alive"),
            events: format!("{prefix}:{{{service}}}:events"),
        }
    }
}

struct Inner {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    prefix: String,
    ttl: Duration,
    resync: Duration,
    safety: SafetyOptions,
    shutdown: Shutdown,
    publishers: crate::publish::Publishers,
    scripts: Scripts,
}

struct Scripts {
    register: Script,
    deregister: Script,
    reap: Script,
    read: Script,
}

impl Inner {
    async fn conn(&self) -> Result<ConnectionManager, DiscoveryError> {
        let mut g = self.conn.lock().await;
        if let Some(c) = &*g {
            return Ok(c.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)));
        let c = self
            .client
            .get_connection_manager_with_config(config)
            .await
            .map_err(unavailable)?;
        *g = Some(c.clone());
        Ok(c)
    }
}

fn unavailable(e: redis::RedisError) -> DiscoveryError {
    DiscoveryError::unavailable(BACKEND, e)
}

/// Discovery and registry on Redis.
///
/// Key layout, with `prefix = "keel"` and service `payments` (the braces are a Redis Cluster
/// hash tag: one service's keys share a slot, so its scripts are cluster-safe):
///
/// | key | type | content |
/// |---|---|---|
/// | `keel:{payments}:inst:{id}` | string | the [`Instance`] as JSON, plus `owner`, `PX ttl` |
/// | `keel:{payments}:alive` | sorted set | member `{id}`, score = expiry in ms of Redis server time |
/// | `keel:{payments}:events` | stream | `op` = `put` (`id`, `data` = JSON) or `del` (`id`), `MAXLEN ~ 1000` |
///
/// A registration runs one Lua script per heartbeat (every `ttl / 3`): write the record with
/// `PX ttl`, move its expiry score (computed with Redis `TIME`), and `XADD` a `put` only if the
/// content changed. Deregistering deletes the record only while its `owner` (random, one per
/// registration) is still ours. A watcher reads the snapshot and the stream position it matches
/// in one script, then `XREAD BLOCK`s from there; it reaps expired members (publishing `del`),
/// replays from its last id after a reconnect, and re-reads everything every `resync`.
#[derive(Clone)]
pub struct RedisDiscovery {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDiscovery")
            .field("prefix", &self.inner.prefix)
            .field("ttl", &self.inner.ttl)
            .finish()
    }
}

impl RedisDiscovery {
    /// A backend on `cfg.url` with `cfg.prefix`, `cfg.ttl` and `cfg.resync`. It does not fail
    /// when Redis is down: watchers then serve the on-disk cache (if any) and keep trying.
    pub fn from_config(cfg: &DiscoveryConfig, shutdown: Shutdown) -> Result<Self, DiscoveryError> {
        let url = cfg.url.as_deref().unwrap_or("redis://127.0.0.1:6379/");
        let client = redis::Client::open(url)
            .map_err(|e| DiscoveryError::Config(format!("discovery.url: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                conn: tokio::sync::Mutex::new(None),
                prefix: cfg.prefix.clone(),
                ttl: cfg.ttl,
                // A longer period set in code would overflow the clock's arithmetic.
                resync: cfg.resync.min(keel_core::units::MAX_DURATION),
                safety: crate::setup::safety(cfg),
                shutdown,
                publishers: Mutex::new(BTreeMap::new()),
                scripts: Scripts {
                    register: script(REGISTER),
                    deregister: script(DEREGISTER),
                    reap: script(REAP),
                    read: script(READ),
                },
            }),
        })
    }
}

impl Discover for RedisDiscovery {
    fn watch(&self, service: &ServiceName) -> Result<InstanceWatch, DiscoveryError> {
        let inner = self.inner.clone();
        crate::publish::watch_or_spawn(
            &self.inner.publishers,
            service,
            &self.inner.safety,
            BACKEND,
            move |p| watcher(inner, p),
        )
    }
}

impl Registry for RedisDiscovery {
    fn register(&self, instance: Instance) -> BoxFuture<'_, Result<Registration, DiscoveryError>> {
        let lease = Arc::new(RedisLease {
            inner: self.inner.clone(),
            keys: Keys::new(&self.inner.prefix, &instance.service),
            owner: format!("{:032x}", rand::random::<u128>()),
            first: std::sync::atomic::AtomicBool::new(true),
        });
        Box::pin(Registration::start(lease, instance))
    }
}

impl Discovery for RedisDiscovery {
    fn backend(&self) -> &'static str {
        BACKEND
    }
}

/// A record as stored: the instance, and the registration that wrote it.
#[derive(serde::Serialize)]
struct Record<'a> {
    #[serde(flatten)]
    instance: &'a Instance,
    owner: &'a str,
}

struct RedisLease {
    inner: Arc<Inner>,
    keys: Keys,
    /// Unique to this registration, written into its record: deregistering deletes the record
    /// only while it is still ours.
    owner: String,
    first: std::sync::atomic::AtomicBool,
}

impl Lease for RedisLease {
    fn put<'a>(
        &'a self,
        instance: &'a Instance,
        _changed: bool,
    ) -> BoxFuture<'a, Result<Beat, DiscoveryError>> {
        Box::pin(async move {
            let json = serde_json::to_string(&Record {
                instance,
                owner: &self.owner,
            })
            .map_err(|e| DiscoveryError::malformed(BACKEND, instance.id.as_str(), e))?;
            let mut conn = self.inner.conn().await?;
            let existed: i64 = self
                .inner
                .scripts
                .register
                .key(format!("{}{}", self.keys.inst_prefix, instance.id))
                .key(&self.keys.alive)
                .key(&self.keys.events)
                .arg(instance.id.as_str())
                .arg(json)
                .arg(self.inner.ttl.as_millis() as u64)
                .arg(STREAM_MAXLEN)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let first = self.first.swap(false, std::sync::atomic::Ordering::Relaxed);
            Ok(if existed == 0 && !first {
                Beat::Reregistered
            } else {
                Beat::Refreshed
            })
        })
    }

    fn remove<'a>(&'a self, instance: &'a Instance) -> BoxFuture<'a, Result<(), DiscoveryError>> {
        Box::pin(async move {
            let mut conn = self.inner.conn().await?;
            let _: i64 = self
                .inner
                .scripts
                .deregister
                .key(format!("{}{}", self.keys.inst_prefix, instance.id))
                .key(&self.keys.alive)
                .key(&self.keys.events)
                .arg(instance.id.as_str())
                .arg(STREAM_MAXLEN)
                .arg(&self.owner)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn interval(&self) -> Option<Duration> {
        Some(self.inner.ttl / 3)
    }
}

fn parse_record(service: &ServiceName, key: &str, json: &[u8]) -> Option<Instance> {
    let parsed = serde_json::from_slice::<Instance>(json).map_err(|e| e.to_string());
    crate::publish::accept_record(service, BACKEND, key, parsed)
}

/// One watcher task per service: snapshot + stream position, then `XREAD BLOCK` from there,
/// reaping expired records and re-reading everything every `resync`.
async fn watcher(inner: Arc<Inner>, publisher: Arc<Publisher>) {
    let service = publisher.service().clone();
    let keys = Keys::new(&inner.prefix, &service);
    let tick = (inner.ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut raw: BTreeMap<String, Instance> = BTreeMap::new();
    let mut last_id = String::from("$");
    let mut need_full = true;
    let mut backoff = Duration::from_millis(100);
    let mut next_resync = tokio::time::Instant::now() + inner.resync;
    let mut next_reap = tokio::time::Instant::now();
    let mut xconn: Option<redis::aio::MultiplexedConnection> = None;
    loop {
        if inner.shutdown.is_triggered() {
            return;
        }
        let step: Result<(), DiscoveryError> = async {
            if need_full {
                let mut conn = inner.conn().await?;
                let out: Vec<Vec<u8>> = inner
                    .scripts
                    .read
                    .key(&keys.alive)
                    .key(&keys.events)
                    .key(&keys.inst_prefix)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                let mut it = out.into_iter();
                last_id = it
                    .next()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_else(|| "0-0".into());
                raw = it
                    .filter_map(|json| parse_record(&service, "snapshot", &json))
                    .map(|i| (i.id.to_string(), i))
                    .collect();
                publisher.offer(raw.values().cloned().collect());
                need_full = false;
                next_resync = tokio::time::Instant::now() + inner.resync;
            }
            if xconn.is_none() {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(1)))
                    .set_response_timeout(Some(tick + Duration::from_secs(2)));
                xconn = Some(
                    inner
                        .client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                        .map_err(unavailable)?,
                );
            }
            let Some(x) = xconn.as_mut() else {
                return Ok(());
            };
            let reply: Option<StreamReadReply> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(1000)
                .arg("BLOCK")
                .arg(tick.as_millis() as u64)
                .arg("STREAMS")
                .arg(&keys.events)
                .arg(&last_id)
                .query_async(x)
                .await
                .map_err(unavailable)?;
            let mut changed = false;
            for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                last_id = entry.id.clone();
                let op: Option<String> = entry.get("op");
                let id: Option<String> = entry.get("id");
                match (op.as_deref(), id) {
                    (Some("put"), Some(id)) => {
                        let data: Option<Vec<u8>> = entry.get("data");
                        let parsed = match data {
                            Some(d) => parse_record(&service, &id, &d),
                            None => {
                                telemetry::malformed(service.as_str(), BACKEND);
                                tracing::warn!(entry = %entry.id, instance = %id, "skipping change event without data");
                                None
                            }
                        };
                        match parsed {
                            Some(i) => {
                                raw.insert(i.id.to_string(), i);
                                changed = true;
                            }
                            // A record overwritten by garbage: the old content is no longer true.
                            None => {
                                if raw.remove(&id).is_some() {
                                    tracing::warn!(instance = %id, "its record was replaced by one that cannot be read; dropped");
                                    changed = true;
                                }
                            }
                        }
                    }
                    (Some("del"), Some(id)) => changed |= raw.remove(&id).is_some(),
                    _ => {
                        telemetry::malformed(service.as_str(), BACKEND);
                        tracing::warn!(entry = %entry.id, "skipping malformed change event");
                    }
                }
            }
            let now = tokio::time::Instant::now();
            if now >= next_reap {
                next_reap = now + tick;
                let mut conn = inner.conn().await?;
                let reaped: i64 = inner
                    .scripts
                    .reap
                    .key(&keys.alive)
                    .key(&keys.events)
                    .key(&keys.inst_prefix)
                    .arg(STREAM_MAXLEN)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                if reaped > 0 {
                    tracing::info!(reaped, "expired registrations removed");
                }
                // Each tick is a read for the guard, so a held shrink is confirmed by time.
                changed = true;
            }
            if changed {
                publisher.offer(raw.values().cloned().collect());
            }
            if now >= next_resync {
                need_full = true;
            }
            Ok(())
        }
        .await;
        match step {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(error) => {
                publisher.failed(&error);
                // Reconnect, replay from the last id, and re-read everything: after a restart
                // the stream may be gone.
                xconn = None;
                need_full = true;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = inner.shutdown.triggered() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn records_of_another_service_or_invalid_ones_are_refused() {
        let s = ServiceName::new("payments").unwrap();
        let good = Instance::new(s.clone(), "127.0.0.1:1".parse().unwrap());
        let json = serde_json::to_vec(&good).unwrap();
        assert_eq!(parse_record(&s, "k", &json), Some(good));
        let other = Instance::new(
            ServiceName::new("x").unwrap(),
            "127.0.0.1:1".parse().unwrap(),
        );
        assert!(parse_record(&s, "k", &serde_json::to_vec(&other).unwrap()).is_none());
        let zero = br#"{"id":"a","service":"payments","addr":"127.0.0.1:1","weight":0}"#;
        assert!(parse_record(&s, "k", zero).is_none());
    }

    proptest! {
        #[test]
        fn arbitrary_records_never_panic(v in proptest::collection::vec(any::<u8>(), 0..200), t in "\\PC{0,200}") {
            let s = ServiceName::new("p").unwrap();
            let _ = parse_record(&s, "k", &v);
            let _ = parse_record(&s, "k", t.as_bytes());
        }
    }
}
