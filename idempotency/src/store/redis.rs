//! The Redis store: shared by every instance, one Lua round trip per operation.
//!
//! Each operation is one `EVALSHA` of a small script, so check-and-write is atomic on the server
//! and costs one round trip: a first request costs two (claim, complete), a replay one (claim).
//! Scripts are loaded when the store connects; after a Redis restart the first call meets
//! `NOSCRIPT`, loads the script again and retries once.
//!
//! Keys: one per idempotency key, `{prefix}{<hash>}` (the `{<hash>}` hash tag is the whole key's
//! slot in a cluster). Its value is a string: a fixed header (state, fencing token, the lease's
//! end), owner and fingerprint, then the stored answer. A script reads it with one `GET`, checks
//! fields at fixed offsets, and writes it with one `SET ... PX`: a first request costs Redis six
//! commands in all (claim: `GET`, `TIME`, `SET`; complete: `GET`, `TIME`, `SET`), one key, and no
//! second key for the fencing counter.
//!
//! Leases end by the time written in the record (the Redis server's clock), not by the key's
//! expiry: an in-progress record is kept a day (or four leases, if longer) and a released one a
//! day, so the next claim of its key continues from its fencing token even after a lapsed lease
//! or a release. A key holding anything else (a record of an earlier format) is answered "in
//! progress", never taken for an absent one. A completed record is kept for the retention `ttl`. When no record exists (never
//! claimed, retention over, or lost in a failover) the token is seeded from the server's clock
//! (`TIME`, in microseconds), so tokens keep growing across a lost record as long as that clock
//! does not step back by more than the time since the last claim. All times are the Redis
//! server's, never a client clock.
//!
//! What Redis alone gives: with one primary and no failover, claims are linearizable. With
//! asynchronous replication, a failover can lose a claim or a completion acknowledged by the old
//! primary; `durability.replicas` adds `WAIT n timeout` after each claim and completion (pipelined,
//! same round trip): a claim fails closed when fewer replicas acknowledge; a completion (whose
//! handler already ran) is logged and counted as `unreplicated`. `WAIT` narrows the window; it does not
//! make Redis a consensus store. For money movement, also pass the fencing token downstream or
//! keep a unique constraint in the database that records the effect.

use std::time::Duration;

use bytes::Bytes;
use redis::{aio::ConnectionManager, Cmd, ErrorKind, ServerErrorKind, Value};
use tracing::warn;

use super::{BoxFuture, Claim, IdempotencyStore, Ownership};
use crate::{config::IdempotencyConfig, telemetry, IdempotencyError};

// One string per key: a fixed header, then owner and fingerprint (length-prefixed), then the
// stored answer. Header: state (`p` in progress, `c` completed, `r` released), the fencing token
// (20 digits), the lease's end in the server's milliseconds (13 digits; zeros unless `p`).
// Scripts read fields at fixed offsets with `string.sub`: no parsing, one `GET` and one `SET`.
//
// Each script is self-contained: no shared Lua helper functions, which Lua would build as
// closures on every call (the owner-checked scripts share their first lines as text instead). A key holding anything but a string (a record of an earlier format) makes
// `redis.pcall('GET')` answer an error table: it is never read as absent. The server's clock in
// milliseconds is `t[1] * 1000 + floor(t[2] / 1000)` of `TIME`.

// KEYS[1] record; ARGV: the record's tail (owner and fingerprint, each after its length in
// three digits, formatted by the caller), fingerprint, lease ms, keep ms (how long an
// in-progress or released record, and so its fencing token, is kept).
const CLAIM: &str = r"
local v = redis.pcall('GET', KEYS[1])
-- Not a record of ours (an earlier format): in progress, never a second execution.
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

// The start of the owner-checked scripts (ARGV[1] is the owner): the record, in progress, held
// by this owner, its lease running; `now` is the server's clock in milliseconds. A macro, so that
// each script is one literal (`concat!`).
macro_rules! owner_checked {
    ($body:literal) => {
        concat!(
            r"
local v = redis.pcall('GET', KEYS[1])
if type(v) ~= 'string' or string.sub(v, 1, 1) ~= 'p' then return 0 end
local ol = tonumber(string.sub(v, 35, 37))
if string.sub(v, 38, 37 + ol) ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if tonumber(string.sub(v, 22, 34)) <= now then return 0 end
",
            $body
        )
    };
}

// ARGV: owner, lease ms, keep ms.
const RENEW: &str = owner_checked!(
    r"redis.call('SET', KEYS[1], string.sub(v, 1, 21) .. string.format('%013d', now + ARGV[2])
  .. string.sub(v, 35), 'PX', ARGV[3])
return 1
"
);

// ARGV: owner, the answer to keep, retention ms.
const COMPLETE: &str = owner_checked!(
    r"local fl = tonumber(string.sub(v, 38 + ol, 40 + ol))
redis.call('SET', KEYS[1], 'c' .. string.sub(v, 2, 21) .. '0000000000000'
  .. string.sub(v, 35, 40 + ol + fl) .. ARGV[2], 'PX', ARGV[3])
return 1
"
);

// ARGV: owner, keep ms. The record stays, released, for its fencing token.
const RELEASE: &str = owner_checked!(
    r"redis.call('SET', KEYS[1], 'r' .. string.sub(v, 2, 21) .. '0000000000000000000', 'PX', ARGV[2])
return 1
"
);

/// One Lua script, known by its SHA-1.
struct Script {
    source: &'static str,
    sha: String,
}

impl Script {
    fn new(source: &'static str) -> Self {
        Self {
            sha: redis::Script::new(source).get_hash().to_owned(),
            source,
        }
    }
}

/// A Redis-backed [`IdempotencyStore`].
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    batch: super::batch::Batcher,
    prefix: String,
    timeout: Duration,
    replicas: u32,
    wait_timeout: Duration,
    scripts: std::sync::Arc<[Script; 4]>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("replicas", &self.replicas)
            .finish_non_exhaustive()
    }
}

fn no_script(e: &redis::RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) || e.code() == Some("NOSCRIPT")
}

/// The longest owner or fingerprint a record holds (its length is written in three digits).
const MAX_FIELD: usize = 999;

/// How long an in-progress or released record is kept, so that its fencing token outlives it:
/// a day, or four leases if longer. (Its lease ends earlier, by the time written inside it.)
fn keep_ms(lease: Duration) -> u64 {
    ms(Duration::from_secs(86_400)).max(ms(lease).saturating_mul(4))
}

/// Whole milliseconds, at least 1, at most [`keel_core::units::MAX_DURATION`]'s (a longer lease
/// or retention set in code would overflow `PEXPIRE`).
fn ms(d: Duration) -> u64 {
    u64::try_from(d.min(keel_core::units::MAX_DURATION).as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl RedisStore {
    /// Connects with the URL, prefix, timeout and durability of `cfg`, and loads the scripts.
    /// Fails (retryably) when Redis cannot be reached now; see [`connect_lazy`](Self::connect_lazy)
    /// for a store that starts without Redis and fails closed until it appears.
    pub async fn connect(cfg: &IdempotencyConfig) -> Result<Self, IdempotencyError> {
        let (client, mcfg) = Self::client(cfg)?;
        let conn = tokio::time::timeout(
            cfg.store_timeout * 3,
            ConnectionManager::new_with_config(client, mcfg),
        )
        .await
        .map_err(|_| IdempotencyError::Unavailable("connect timed out".to_owned()))??;
        let store = Self::with_conn(conn, cfg);
        store.load_scripts().await?;
        Ok(store)
    }

    /// A store that connects on first use (and reconnects after): the service can start while
    /// Redis is down; until it is up, every operation fails with
    /// [`IdempotencyError::Unavailable`] (503 by default). Must be called within a tokio runtime.
    pub fn connect_lazy(cfg: &IdempotencyConfig) -> Result<Self, IdempotencyError> {
        let (client, mcfg) = Self::client(cfg)?;
        let conn = ConnectionManager::new_lazy_with_config(client, mcfg)
            .map_err(|e| IdempotencyError::Config(e.to_string()))?;
        Ok(Self::with_conn(conn, cfg))
    }

    fn client(
        cfg: &IdempotencyConfig,
    ) -> Result<(redis::Client, redis::aio::ConnectionManagerConfig), IdempotencyError> {
        // TCP_NODELAY: a claim or completion is one small write that someone waits for; Nagle
        // would hold it behind an unacknowledged one on the shared connection.
        let info = redis::IntoConnectionInfo::into_connection_info(cfg.url.as_str())
            .map_err(|e| IdempotencyError::Config(e.to_string()))?;
        let tcp = info.tcp_settings().clone().set_nodelay(true);
        let client = redis::Client::open(info.set_tcp_settings(tcp))
            .map_err(|e| IdempotencyError::Config(e.to_string()))?;
        // A `WAIT` pipelined behind a script may block for `durability.timeout` on top of the
        // round trip (`run` bounds each call itself); a shorter response timeout here would turn
        // too few acknowledgements into a timeout, and skip the release of the claim.
        let response_timeout = if cfg.durability.replicas > 0 {
            cfg.store_timeout + cfg.durability.timeout
        } else {
            cfg.store_timeout
        };
        let mcfg = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_connection_timeout(Some(cfg.store_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        Ok((client, mcfg))
    }

    fn with_conn(conn: ConnectionManager, cfg: &IdempotencyConfig) -> Self {
        Self {
            batch: super::batch::Batcher::start(conn.clone()),
            conn,
            prefix: cfg.prefix.clone(),
            timeout: cfg.store_timeout,
            replicas: cfg.durability.replicas,
            wait_timeout: cfg.durability.timeout,
            scripts: std::sync::Arc::new([
                Script::new(CLAIM),
                Script::new(RENEW),
                Script::new(COMPLETE),
                Script::new(RELEASE),
            ]),
        }
    }

    /// Connects to `url` with `prefix` and the default policy otherwise.
    pub async fn open(url: &str, prefix: &str) -> Result<Self, IdempotencyError> {
        let cfg = IdempotencyConfig {
            url: url.to_owned(),
            prefix: prefix.to_owned(),
            ..IdempotencyConfig::default()
        };
        Self::connect(&cfg).await
    }

    /// The SHA-1 of the claim and complete scripts (as `EVALSHA` takes them): for operators and
    /// benchmarks (`redis-benchmark ... EVALSHA <sha> ...`).
    pub fn script_shas(&self) -> (&str, &str) {
        (&self.scripts[0].sha, &self.scripts[2].sha)
    }

    async fn load_scripts(&self) -> Result<(), IdempotencyError> {
        let mut pipe = redis::pipe();
        for s in self.scripts.iter() {
            pipe.cmd("SCRIPT").arg("LOAD").arg(s.source);
        }
        let mut conn = self.conn.clone();
        let _: Vec<String> = self.bounded(pipe.query_async(&mut conn)).await?;
        Ok(())
    }

    async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, IdempotencyError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(IdempotencyError::TimedOut),
        }
    }

    fn record_key(&self, key: &str) -> String {
        // The prefix, then the key in braces (its hash tag), without the formatting machinery:
        // one allocation, sized.
        let mut k = String::with_capacity(self.prefix.len() + key.len() + 2);
        k.push_str(&self.prefix);
        k.push('{');
        k.push_str(key);
        k.push('}');
        k
    }

    fn evalsha(&self, which: usize, keys: &[&str], args: &[&[u8]]) -> Cmd {
        // Sized once: built argument by argument, the command's buffers would grow a dozen
        // times per request.
        let sha = &self.scripts[which].sha;
        let data = "EVALSHA".len()
            + sha.len()
            + 20
            + keys.iter().map(|k| k.len()).sum::<usize>()
            + args.iter().map(|a| a.len()).sum::<usize>();
        let mut cmd = Cmd::with_capacity(3 + keys.len() + args.len(), data);
        cmd.arg("EVALSHA").arg(sha).arg(keys.len()).arg(keys);
        for a in args {
            cmd.arg(*a);
        }
        cmd
    }

    /// Runs one script; on `NOSCRIPT` loads the scripts and runs it once more. With `wait`, a
    /// `WAIT` is pipelined behind it and its acknowledgement count returned too.
    async fn run(
        &self,
        which: usize,
        keys: &[&str],
        args: &[&[u8]],
        wait: bool,
    ) -> Result<(Value, Option<u32>), IdempotencyError> {
        for attempt in 0..2 {
            // Made for each attempt from the borrowed arguments: no copy of them is kept for a
            // NOSCRIPT retry that almost never comes.
            let cmd = self.evalsha(which, keys, args);
            let res = if wait {
                let mut conn = self.conn.clone();
                let mut pipe = redis::pipe();
                pipe.add_command(cmd)
                    .cmd("WAIT")
                    .arg(self.replicas)
                    .arg(ms(self.wait_timeout));
                let timeout = self.timeout + self.wait_timeout;
                match tokio::time::timeout(timeout, pipe.query_async::<(Value, u32)>(&mut conn))
                    .await
                {
                    Ok(r) => r.map(|(v, n)| (v, Some(n))),
                    Err(_) => return Err(IdempotencyError::TimedOut),
                }
            } else {
                // Pipelined with the other requests' commands of the moment.
                match tokio::time::timeout(self.timeout, self.batch.call(cmd)).await {
                    Ok(Ok(r)) => r.map(|v| (v, None)),
                    Ok(Err(super::batch::PumpGone)) => {
                        return Err(IdempotencyError::Unavailable(
                            "the store's connection task has stopped".to_owned(),
                        ))
                    }
                    Err(_) => return Err(IdempotencyError::TimedOut),
                }
            };
            match res {
                Err(e) if attempt == 0 && no_script(&e) => {
                    warn!("idempotency scripts missing on redis (restart?); loading them again");
                    self.load_scripts().await?;
                }
                Err(e) => return Err(e.into()),
                Ok(v) => return Ok(v),
            }
        }
        Err(IdempotencyError::Protocol(
            "script missing after reload".to_owned(),
        ))
    }

    async fn owner_checked(
        &self,
        which: usize,
        key: &str,
        args: &[&[u8]],
    ) -> Result<Ownership, IdempotencyError> {
        let rk = self.record_key(key);
        // Completions wait for replicas too, in the same round trip. The handler has already
        // run, so too few acknowledgements cannot undo anything: they are logged and counted.
        let wait = which == 2 && self.replicas > 0;
        let (v, acked) = self.run(which, &[&rk], args, wait).await?;
        if let Some(acked) = acked.filter(|a| *a < self.replicas) {
            telemetry::complete("unreplicated");
            warn!(
                key = crate::key::short(key),
                acked,
                wanted = self.replicas,
                "idempotent completion acknowledged by too few replicas"
            );
        }
        match v {
            Value::Int(1) => Ok(Ownership::Owner),
            Value::Int(0) => Ok(Ownership::Stale),
            other => Err(IdempotencyError::Protocol(format!(
                "owner-checked script answered {}",
                shape(&other)
            ))),
        }
    }

    async fn claim_inner(
        &self,
        key: &str,
        owner: &str,
        fp: &str,
        lease: Duration,
    ) -> Result<Claim, IdempotencyError> {
        let rk = self.record_key(key);
        if owner.len() > MAX_FIELD || fp.len() > MAX_FIELD {
            // A caller's mistake, not a store failure: a fail-open route must not run on it.
            return Err(IdempotencyError::Config(format!(
                "owner and fingerprint are limited to {MAX_FIELD} bytes in the Redis store"
            )));
        }
        let mut lease_ms = itoa::Buffer::new();
        let lease_ms = lease_ms.format(ms(lease));
        let mut keep = itoa::Buffer::new();
        let keep = keep.format(keep_ms(lease));
        let wait = self.replicas > 0;
        let (v, acked) = self
            .run(
                0,
                &[&rk],
                &[
                    &record_tail(owner, fp),
                    fp.as_bytes(),
                    lease_ms.as_bytes(),
                    keep.as_bytes(),
                ],
                wait,
            )
            .await?;
        let claim = parse_claim(v)?;
        if let (Claim::New { .. }, Some(acked)) = (&claim, acked) {
            if acked < self.replicas {
                let _ = self
                    .owner_checked(3, key, &[owner.as_bytes(), keep.as_bytes()])
                    .await;
                return Err(IdempotencyError::Durability {
                    acked,
                    wanted: self.replicas,
                });
            }
        }
        Ok(claim)
    }
}

/// Owner and fingerprint as a record holds them, each after its length in three digits (both
/// are at most [`MAX_FIELD`] bytes): the claim script appends it to the header it writes.
fn record_tail(owner: &str, fp: &str) -> Vec<u8> {
    let mut tail = Vec::with_capacity(6 + owner.len() + fp.len());
    for field in [owner, fp] {
        let n = field.len().min(MAX_FIELD);
        tail.extend_from_slice(&[
            b'0' + (n / 100) as u8,
            b'0' + (n / 10 % 10) as u8,
            b'0' + (n % 10) as u8,
        ]);
        tail.extend_from_slice(field.as_bytes());
    }
    tail
}

fn parse_claim(v: Value) -> Result<Claim, IdempotencyError> {
    let bad = |v: &Value| IdempotencyError::Protocol(format!("claim answered {}", shape(v)));
    let Value::Array(items) = &v else {
        return Err(bad(&v));
    };
    match items.as_slice() {
        [Value::Int(0), Value::Int(n)] => Ok(Claim::New {
            fence: u64::try_from(*n).map_err(|_| bad(&v))?,
        }),
        [Value::Int(1), Value::Int(pttl)] => Ok(Claim::InProgress {
            retry_after: u64::try_from(*pttl).ok().map(Duration::from_millis),
        }),
        [Value::Int(2), Value::BulkString(r)] => Ok(Claim::Completed(Bytes::from(r.clone()))),
        [Value::Int(3)] => Ok(Claim::Mismatch),
        _ => Err(bad(&v)),
    }
}

/// What a reply looks like, without its contents (a record holds a stored answer, which must not
/// reach logs through an error message): integers as they are, strings by length.
fn shape(v: &Value) -> String {
    match v {
        Value::Int(n) => format!("{n}"),
        Value::BulkString(b) => format!("<{} bytes>", b.len()),
        Value::Array(items) => format!(
            "[{}]",
            items
                .iter()
                .take(8)
                .map(shape)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Nil => "nil".to_owned(),
        Value::Okay => "OK".to_owned(),
        Value::SimpleString(s) => format!("<status of {} bytes>", s.len()),
        Value::ServerError(e) => format!("error {}", e.code()),
        _ => "a reply of another type".to_owned(),
    }
}

/// `fut`, boxed, with its duration recorded as the store operation `op`.
fn timed<'a, T>(
    op: &'static str,
    fut: impl std::future::Future<Output = T> + Send + 'a,
) -> BoxFuture<'a, T> {
    Box::pin(async move {
        let t = tokio::time::Instant::now();
        let r = fut.await;
        telemetry::store_latency(op, t);
        r
    })
}

impl IdempotencyStore for RedisStore {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        fingerprint: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, IdempotencyError>> {
        timed("claim", async move {
            self.claim_inner(key, owner, fingerprint, lease).await
        })
    }

    fn renew<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>> {
        timed("renew", async move {
            let (mut lease_ms, mut keep) = (itoa::Buffer::new(), itoa::Buffer::new());
            let (lease_ms, keep) = (lease_ms.format(ms(lease)), keep.format(keep_ms(lease)));
            self.owner_checked(
                1,
                key,
                &[owner.as_bytes(), lease_ms.as_bytes(), keep.as_bytes()],
            )
            .await
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        record: Bytes,
        retention: Duration,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>> {
        timed("complete", async move {
            let mut ret = itoa::Buffer::new();
            let ret = ret.format(ms(retention));
            self.owner_checked(2, key, &[owner.as_bytes(), &record, ret.as_bytes()])
                .await
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>> {
        timed("release", async move {
            // The lease is not known here: keep the released record (its fencing token) a day.
            let mut keep = itoa::Buffer::new();
            let keep = keep.format(keep_ms(Duration::ZERO));
            self.owner_checked(3, key, &[owner.as_bytes(), keep.as_bytes()])
                .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_tail_prefixes_each_field_with_its_length() {
        assert_eq!(record_tail("", ""), b"000000");
        assert_eq!(record_tail("own", "fp"), b"003own002fp");
        let long = "x".repeat(MAX_FIELD);
        let tail = record_tail(&long, "f");
        assert_eq!(&tail[..3], b"999");
        assert_eq!(&tail[3 + MAX_FIELD..], b"001f");
    }

    #[test]
    fn an_unexpected_reply_is_reported_without_its_contents() {
        // A completed record in a reply of the wrong shape: the error names its shape only.
        let v = Value::Array(vec![
            Value::Int(2),
            Value::BulkString(b"secret answer".to_vec()),
            Value::Int(9),
        ]);
        let e = parse_claim(v).unwrap_err().to_string();
        assert!(!e.contains("secret"), "{e}");
        assert!(e.contains("[2, <13 bytes>, 9]"), "{e}");
    }
}
