//! Distributed GCRA on Redis: one `EVALSHA` per decision, the clock taken from Redis (`TIME`) so
//! that instances with skewed clocks agree, the state one key per limited key with a TTL equal to
//! the time it takes to drain (so idle keys cost nothing).
//!
//! When Redis is unreachable or slower than `redis_timeout`, the decision falls back to a local
//! GCRA holding this instance's share (`local_share`) of the rate: the fleet keeps a limit close
//! to the global one instead of failing every call or letting every call through. After a
//! failure, Redis is not asked again for a second (no timeout paid per call while it is down).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use redis::{aio::ConnectionManager, Script};
use tokio::{sync::OnceCell, time::Instant};

use super::gcra::{Decision, LocalGcra, Quota};

const GCRA_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local ahead = new_tat - now
if ahead > tau then
  return {0, 0, ahead - tau, tat - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(ahead / 1000) + 1)
return {1, math.floor((tau - ahead) / interval), 0, ahead}
"#;

/// A GCRA limiter on Redis with a local fallback.
pub struct RedisGcra {
    url: String,
    client: Option<redis::Client>,
    conn: OnceCell<ConnectionManager>,
    script: Script,
    fallback: Arc<LocalGcra>,
    down_until: AtomicU64,
    base: Instant,
}

impl std::fmt::Debug for RedisGcra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisGcra").field("url", &self.url).finish()
    }
}

/// Where a decision came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Redis decided.
    Redis,
    /// Redis was unreachable; the local share decided.
    Fallback,
}

impl RedisGcra {
    /// A limiter on the Redis at `url`; it connects on first use.
    pub fn new(url: &str, fallback: Arc<LocalGcra>) -> Self {
        Self {
            url: url.to_owned(),
            client: redis::Client::open(url).ok(),
            conn: OnceCell::new(),
            script: Script::new(GCRA_LUA),
            fallback,
            down_until: AtomicU64::new(0),
            base: Instant::now(),
        }
    }

    /// The URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn now_ms(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.base)
            .as_millis() as u64
    }

    async fn ask(&self, key: &str, q: Quota, timeout: Duration) -> Option<Decision> {
        let client = self.client.as_ref()?;
        let conn = tokio::time::timeout(
            timeout.max(Duration::from_millis(200)),
            self.conn.get_or_try_init(|| {
                let cfg = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout.max(Duration::from_millis(100))))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(client.clone(), cfg)
            }),
        )
        .await
        .ok()?
        .ok()?;
        let mut conn = conn.clone();
        let t_us = (q.t_ns / 1000).max(1);
        let tau_us = (q.tau_ns / 1000).max(t_us);
        let mut inv = self.script.key(key);
        inv.arg(t_us).arg(tau_us);
        let r: (i64, i64, i64, i64) = tokio::time::timeout(timeout, inv.invoke_async(&mut conn))
            .await
            .ok()?
            .ok()?;
        Some(Decision {
            allowed: r.0 == 1,
            remaining: r.1.max(0) as u64,
            retry_after: Duration::from_micros(r.2.max(0) as u64),
            reset: Duration::from_micros(r.3.max(0) as u64),
        })
    }

    /// Decides for `key` (already prefixed): Redis if reachable, else the local share.
    pub async fn check(
        &self,
        key: &str,
        q: Quota,
        share: Quota,
        timeout: Duration,
        max_keys: usize,
    ) -> (Decision, Source) {
        if self.now_ms() >= self.down_until.load(Ordering::Relaxed) {
            if let Some(d) = self.ask(key, q, timeout).await {
                return (d, Source::Redis);
            }
            self.down_until
                .store(self.now_ms() + 1000, Ordering::Relaxed);
            tracing::warn!(url = %keel_core::config::redact_userinfo(&self.url), "rate limit store unreachable; using this instance's local share");
        }
        (self.fallback.check(key, share, max_keys), Source::Fallback)
    }
}
