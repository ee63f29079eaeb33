//! The Redis store: shared by every instance, one round trip per operation.
//!
//! A first request costs two round trips (claim, complete), a replay one (claim). Keys: one per
//! idempotency key, `{prefix}{<hash>}` (the `{<hash>}` hash tag is the whole key's slot in a
//! cluster). Its value is a string: a fixed header (state, fencing token, the lease's end), owner
//! and fingerprint, then the stored answer.
//!
//! - **Claim**: no script, a transaction of native commands (`MULTI`; `SET key record NX GET PX
//!   lease`; `TIME`; `EXEC`). The `SET` writes the record in progress if the key is
//!   absent and answers what it held; the store reads that answer itself (new, in progress,
//!   completed, or another fingerprint). `TIME`, run in the same transaction, is a new claim's
//!   fencing token: the server's clock in microseconds. Native commands cost Redis less than half
//!   of a script doing the same (no Lua state to prepare, no conversion of each call's reply).
//! - **Renew, complete, release**: each one `EVALSHA` of a small script that checks the owner
//!   (a `GET`) and writes (`PEXPIRE`, `SET ... PX retention`, `DEL`). Scripts are loaded when the
//!   store connects; after a Redis restart the first call meets `NOSCRIPT`, loads them again and
//!   retries once.
//!
//! A lease is the key's own expiry: a record in progress lives exactly as long as its lease, so a
//! key that exists is held, and one whose lease ran out is gone. All times are the Redis server's,
//! never a client clock.
//!
//! Fencing tokens grow with every claim of a key as long as Redis's clock does not step back by
//! more than the time between two claims of it: a claim follows the end of the previous one (its
//! lease ran out, or it was released or never completed), so its `TIME` is later. Records of the
//! store's earlier layout, which kept the token in the record after a lapsed lease or a release,
//! are read and taken over by a script that continues their token.
//!
//! A key holding anything else (a record of an earlier format, another type) is answered "in
//! progress", never taken for an absent one. A completed record is kept for the retention `ttl`.
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
use redis::{ErrorKind, ServerErrorKind, Value};
use tracing::warn;

use super::{
    conn::{Link, Unit},
    BoxFuture, Claim, IdempotencyStore, Ownership,
};
use crate::{config::IdempotencyConfig, telemetry, IdempotencyError};

// One string per key: a fixed header, then owner and fingerprint (length-prefixed), then the
// stored answer. Header: state, the fencing token (20 digits), the lease's end in the server's
// milliseconds (13 digits). States:
// - `q` in progress; its lease is the key's own expiry (`PX lease`), so it is alive exactly as
//   long as the key exists. Written by a plain `SET ... NX`, which cannot know the server's clock,
//   it carries the lease's length in milliseconds where the token goes (a retry hint for
//   duplicates) and `9999999999999` as its end: a store of the earlier layout, which reads the
//   end from the header, takes it for in progress and never runs it a second time.
// - `c` completed, kept for the retention time.
// - `p` in progress and `r` released, of the earlier layout (the lease's end written in the
//   header, the record kept a day for its token): only read, and taken over, never written.
// Scripts read fields at fixed offsets with `string.sub`: no parsing, one `GET` and one write.
//
// Each script is self-contained: no shared Lua helper functions, which Lua would build as
// closures on every call (the owner-checked scripts share their first lines as text instead).
// A key holding anything but a string (a record of an earlier format) makes `redis.pcall('GET')`
// answer an error table: it is never read as absent.

/// Bytes of a record's header: state, 20 digits, 13 digits.
const HEADER: usize = 34;

// A claim the plain `SET ... NX` could not settle: the key holds a record of the earlier layout
// (`p` whose lease ended, or `r`). It is run as a general claim, since the key may have changed
// since. A record it cannot read (no digits where they belong, a token past 2^53, which Lua's
// numbers no longer count exactly) is answered in progress and left alone, as `settle` answers
// any record it cannot read. KEYS[1] record; ARGV: the record in progress to write (form `q`),
// fingerprint, lease ms. The token continues from the record's; a key found absent gets the
// server's clock in microseconds.
const TAKE_OVER: &str = r"
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'table' then return {1, redis.call('PTTL', KEYS[1])} end
local t = redis.call('TIME')
local n = t[1] * 1000000 + t[2]
if v then
  local s = string.sub(v, 1, 1)
  local left
  if s == 'p' then
    local e = tonumber(string.sub(v, 22, 34))
    if not e then return {1, redis.call('PTTL', KEYS[1])} end
    left = e - (t[1] * 1000 + math.floor(t[2] / 1000))
    if left <= 0 then s = 'r' end
  elseif s ~= 'c' and s ~= 'q' and s ~= 'r' then return {1, redis.call('PTTL', KEYS[1])} end
  if s ~= 'r' then
    local ol = tonumber(string.sub(v, 35, 37))
    local fl = ol and tonumber(string.sub(v, 38 + ol, 40 + ol))
    if not fl then return {1, redis.call('PTTL', KEYS[1])} end
    if string.sub(v, 41 + ol, 40 + ol + fl) ~= ARGV[2] then return {3} end
    if s == 'c' then return {2, string.sub(v, 41 + ol + fl)} end
    return {1, left or redis.call('PTTL', KEYS[1])}
  end
  local f = tonumber(string.sub(v, 2, 21))
  if not f or f >= 9007199254740992 then return {1, redis.call('PTTL', KEYS[1])} end
  n = f + 1
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return {0, n}
";

// The start of the owner-checked scripts (ARGV[1] is the owner): the record, in progress (form
// `q`: alive, since it exists) and held by this owner. A macro, so that each script is one
// literal (`concat!`).
macro_rules! owner_checked {
    ($body:literal) => {
        concat!(
            r"
local v = redis.pcall('GET', KEYS[1])
if type(v) ~= 'string' or string.sub(v, 1, 1) ~= 'q' then return 0 end
local ol = tonumber(string.sub(v, 35, 37))
if string.sub(v, 38, 37 + ol) ~= ARGV[1] then return 0 end
",
            $body
        )
    };
}

// ARGV: owner, lease ms.
const RENEW: &str = owner_checked!(
    r"redis.call('PEXPIRE', KEYS[1], ARGV[2])
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

// ARGV: owner. The next claim's token comes from the server's clock, later than this one's.
const RELEASE: &str = owner_checked!(
    r"redis.call('DEL', KEYS[1])
return 1
"
);

/// Where each script sits in the store's list.
const TAKE_OVER_SCRIPT: usize = 0;
const RENEW_SCRIPT: usize = 1;
const COMPLETE_SCRIPT: usize = 2;
const RELEASE_SCRIPT: usize = 3;

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
    link: Link,
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
        let store = Self::connect_lazy(cfg)?;
        store.load_scripts().await?;
        Ok(store)
    }

    /// A store that connects on first use (and reconnects after): the service can start while
    /// Redis is down; until it is up, every operation fails with
    /// [`IdempotencyError::Unavailable`] (503 by default). Must be called within a tokio runtime.
    /// The URL names a TCP address or a Unix socket (`redis://`, `redis+unix://`), with the
    /// user, password and database it gives.
    pub fn connect_lazy(cfg: &IdempotencyConfig) -> Result<Self, IdempotencyError> {
        let info = redis::IntoConnectionInfo::into_connection_info(cfg.url.as_str())
            .map_err(|e| IdempotencyError::Config(e.to_string()))?;
        // A connection silent while callers wait is taken for dead after twice their timeout (a
        // `WAIT` behind a command may block for `durability.timeout` on top of the round trip).
        // Twice, so that the give-back of a claim that timed out still goes out on the same
        // connection, behind the claim, and Redis applies the two in that order.
        // Bounded as the configuration's durations are: longer ones set in code would overflow.
        let timeout = cfg.store_timeout.min(keel_core::units::MAX_DURATION);
        let wait_timeout = cfg.durability.timeout.min(keel_core::units::MAX_DURATION);
        let wait = if cfg.durability.replicas > 0 {
            wait_timeout
        } else {
            Duration::ZERO
        };
        let link = Link::start(info, timeout, (timeout + wait) * 2);
        Ok(Self {
            link,
            prefix: cfg.prefix.clone(),
            timeout,
            replicas: cfg.durability.replicas,
            wait_timeout,
            scripts: std::sync::Arc::new([
                Script::new(TAKE_OVER),
                Script::new(RENEW),
                Script::new(COMPLETE),
                Script::new(RELEASE),
            ]),
        })
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

    /// The SHA-1 of the completion script (as `EVALSHA` takes it): for operators and benchmarks
    /// (`redis-benchmark ... EVALSHA <sha> ...`). A claim is no script: a transaction of native
    /// commands (see the module's documentation).
    pub fn complete_script_sha(&self) -> &str {
        &self.scripts[COMPLETE_SCRIPT].sha
    }

    async fn load_scripts(&self) -> Result<(), IdempotencyError> {
        let loads: Vec<[&[u8]; 3]> = self
            .scripts
            .iter()
            .map(|s| [&b"SCRIPT"[..], b"LOAD", s.source.as_bytes()])
            .collect();
        let loads: Vec<&[&[u8]]> = loads.iter().map(|l| &l[..]).collect();
        let answer = self.bounded(self.link.call(Unit::all(&loads))).await?;
        match answer {
            Value::Array(shas) if shas.iter().all(|s| matches!(s, Value::BulkString(_))) => Ok(()),
            Value::Array(shas) => match shas.into_iter().find_map(|s| s.extract_error().err()) {
                Some(e) => Err(e.into()),
                None => Err(IdempotencyError::Protocol(
                    "SCRIPT LOAD answered no digest".to_owned(),
                )),
            },
            other => Err(IdempotencyError::Protocol(format!(
                "SCRIPT LOAD answered {}",
                shape(&other)
            ))),
        }
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

    fn evalsha(&self, which: usize, key: &str, args: &[&[u8]]) -> Unit {
        // At most three arguments after the key (the owner-checked scripts', the takeover's).
        let mut all: [&[u8]; 7] = [
            b"EVALSHA",
            self.scripts[which].sha.as_bytes(),
            b"1",
            key.as_bytes(),
            &[],
            &[],
            &[],
        ];
        debug_assert!(
            args.len() <= 3,
            "a script takes at most three arguments here"
        );
        let n = args.len().min(3);
        all[4..4 + n].copy_from_slice(&args[..n]);
        Unit::one(&all[..4 + n])
    }

    /// Runs the unit `make` builds; when a script of it meets `NOSCRIPT`, loads the scripts and
    /// runs it once more. With `wait`, a `WAIT` goes out behind it and its acknowledgement count
    /// is returned too.
    async fn run(
        &self,
        make: impl Fn() -> Unit,
        wait: bool,
    ) -> Result<(Value, Option<u32>), IdempotencyError> {
        for attempt in 0..2 {
            // Made for each attempt from the borrowed arguments: no copy of them is kept for a
            // NOSCRIPT retry that almost never comes.
            let (unit, timeout) = if wait {
                (
                    make().and_wait(self.replicas, ms(self.wait_timeout)),
                    self.timeout + self.wait_timeout,
                )
            } else {
                (make(), self.timeout)
            };
            // Written with the other requests' commands of the moment.
            let res = match tokio::time::timeout(timeout, self.link.call(unit)).await {
                Err(_) => return Err(IdempotencyError::TimedOut),
                Ok(Ok(Value::Array(mut both))) if wait && both.len() == 2 => {
                    let acked = both.pop();
                    match (both.pop(), acked) {
                        (Some(Value::ServerError(e)), _) => Err(e.into()),
                        (Some(v), Some(Value::Int(a))) => {
                            Ok((v, Some(u32::try_from(a).unwrap_or(0))))
                        }
                        _ => {
                            return Err(IdempotencyError::Protocol(
                                "WAIT answered no count".to_owned(),
                            ))
                        }
                    }
                }
                Ok(Ok(v)) if wait => {
                    return Err(IdempotencyError::Protocol(format!(
                        "a command and WAIT answered {}",
                        shape(&v)
                    )))
                }
                Ok(r) => r.map(|v| (v, None)),
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
        let wait = which == COMPLETE_SCRIPT && self.replicas > 0;
        let (v, acked) = self.run(|| self.evalsha(which, &rk, args), wait).await?;
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
        let record = in_progress(owner, fp, ms(lease));
        let mut lease_ms = itoa::Buffer::new();
        let lease_ms = lease_ms.format(ms(lease));
        let wait = self.replicas > 0;
        // `SET ... NX GET` writes the record if the key is absent and answers what it held;
        // `TIME`, in the same transaction, is the fencing token of a new claim.
        let transaction = || {
            Unit::transaction(&[
                &[
                    b"SET",
                    rk.as_bytes(),
                    &record,
                    b"NX",
                    b"GET",
                    b"PX",
                    lease_ms.as_bytes(),
                ],
                &[b"TIME"],
            ])
        };
        let (v, mut acked) = self.run(transaction, wait).await?;
        let claim = match settle(v, fp)? {
            Some(claim) => claim,
            None => {
                // A record of the earlier layout, released or out of lease: taken over by a
                // script (rare: such records are never written any more).
                let (v, a) = self
                    .run(
                        || {
                            self.evalsha(
                                TAKE_OVER_SCRIPT,
                                &rk,
                                &[&record, fp.as_bytes(), lease_ms.as_bytes()],
                            )
                        },
                        wait,
                    )
                    .await?;
                acked = a;
                parse_take_over(v)?
            }
        };
        if let (Claim::New { .. }, Some(acked)) = (&claim, acked) {
            if acked < self.replicas {
                let _ = self
                    .owner_checked(RELEASE_SCRIPT, key, &[owner.as_bytes()])
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

/// A record in progress of `owner` (form `q`): its header (the lease's length in milliseconds
/// where the token goes, no end of its own), then owner and fingerprint, each after its length in
/// three digits (both are at most [`MAX_FIELD`] bytes).
fn in_progress(owner: &str, fp: &str, lease_ms: u64) -> Vec<u8> {
    let mut rec = Vec::with_capacity(HEADER + 6 + owner.len() + fp.len());
    rec.push(b'q');
    let mut lease = itoa::Buffer::new();
    // A u64 has at most 20 digits.
    let lease = lease.format(lease_ms).as_bytes();
    rec.resize(21 - lease.len(), b'0');
    rec.extend_from_slice(lease);
    rec.extend_from_slice(b"9999999999999");
    for field in [owner, fp] {
        let n = field.len().min(MAX_FIELD);
        rec.extend_from_slice(&[
            b'0' + (n / 100) as u8,
            b'0' + (n / 10 % 10) as u8,
            b'0' + (n % 10) as u8,
        ]);
        rec.extend_from_slice(field.as_bytes());
    }
    rec
}

/// A record's fields: its state byte, the fingerprint, and where the stored answer starts.
/// `None` for a string too short or malformed to be one of ours.
fn fields(rec: &[u8]) -> Option<(u8, &[u8], usize)> {
    let len = |at: usize| -> Option<usize> { usize::try_from(digits(rec.get(at..at + 3)?)?).ok() };
    let ol = len(HEADER)?;
    let fl_at = HEADER + 3 + ol;
    let fl = len(fl_at)?;
    let fp = rec.get(fl_at + 3..fl_at + 3 + fl)?;
    Some((rec[0], fp, fl_at + 3 + fl))
}

/// A number of ASCII digits (a header field, or a `TIME` part).
fn digits(b: &[u8]) -> Option<u64> {
    if b.is_empty() {
        return None;
    }
    b.iter().try_fold(0u64, |n, c| {
        c.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(c - b'0')))?
    })
}

/// What a claim's transaction found (`EXEC`'s reply: the key's old value, then `TIME`), or
/// `None` when a record of the earlier layout must be taken over by a script.
fn settle(v: Value, fp: &str) -> Result<Option<Claim>, IdempotencyError> {
    let bad = |v: &Value| IdempotencyError::Protocol(format!("claim answered {}", shape(v)));
    let Value::Array(items) = v else {
        return Err(bad(&v));
    };
    let [old, time] = <[Value; 2]>::try_from(items).map_err(|items| bad(&Value::Array(items)))?;
    let now_us = match &time {
        Value::Array(t) => match t.as_slice() {
            [Value::BulkString(s), Value::BulkString(us)] => digits(s)
                .zip(digits(us))
                .and_then(|(s, us)| s.checked_mul(1_000_000)?.checked_add(us)),
            _ => None,
        },
        _ => None,
    };
    let Some(now_us) = now_us else {
        return Err(bad(&Value::Array(vec![old, time])));
    };
    let rec = match old {
        // Absent: now written, held by the caller, its token the server's clock.
        Value::Nil => return Ok(Some(Claim::New { fence: now_us })),
        Value::BulkString(rec) => rec,
        // Not a string (a record of an earlier format): in progress, never a second execution.
        Value::ServerError(_) => return Ok(Some(Claim::InProgress { retry_after: None })),
        other => return Err(bad(&Value::Array(vec![other, time]))),
    };
    let Some((state, stored_fp, answer_at)) = fields(&rec) else {
        return Ok(Some(Claim::InProgress { retry_after: None }));
    };
    let left = match state {
        b'c' => None,
        // At most a lease, the length its header holds.
        b'q' => rec.get(1..21).and_then(digits).map(Duration::from_millis),
        b'p' => {
            // The earlier layout: the lease ends by the time in its header.
            let ends = rec.get(21..34).and_then(digits).unwrap_or(0);
            match ends.checked_sub(now_us / 1000) {
                Some(ms) if ms > 0 => Some(Duration::from_millis(ms)),
                _ => return Ok(None),
            }
        }
        b'r' => return Ok(None),
        // Not one of ours: in progress, as above.
        _ => return Ok(Some(Claim::InProgress { retry_after: None })),
    };
    Ok(Some(if stored_fp != fp.as_bytes() {
        Claim::Mismatch
    } else if state == b'c' {
        Claim::Completed(Bytes::from(rec).slice(answer_at..))
    } else {
        Claim::InProgress { retry_after: left }
    }))
}

/// What the takeover script answered.
fn parse_take_over(v: Value) -> Result<Claim, IdempotencyError> {
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

/// `fut`, boxed, with its duration recorded as the store operation `op`. A future of its own
/// rather than an `async` block, which would hold `fut` twice (as its capture and as the value
/// it awaits) and double the allocation.
fn timed<'a, T>(
    op: &'static str,
    fut: impl std::future::Future<Output = T> + Send + 'a,
) -> BoxFuture<'a, T> {
    Box::pin(Timed {
        op,
        start: tokio::time::Instant::now(),
        fut,
    })
}

pin_project_lite::pin_project! {
    struct Timed<F> {
        op: &'static str,
        start: tokio::time::Instant,
        #[pin]
        fut: F,
    }
}

impl<F: std::future::Future> std::future::Future for Timed<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = self.project();
        let out = std::task::ready!(this.fut.poll(cx));
        telemetry::store_latency(this.op, *this.start);
        std::task::Poll::Ready(out)
    }
}

impl IdempotencyStore for RedisStore {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        fingerprint: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, IdempotencyError>> {
        timed("claim", self.claim_inner(key, owner, fingerprint, lease))
    }

    fn renew<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>> {
        timed("renew", async move {
            let mut lease_ms = itoa::Buffer::new();
            let lease_ms = lease_ms.format(ms(lease));
            self.owner_checked(RENEW_SCRIPT, key, &[owner.as_bytes(), lease_ms.as_bytes()])
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
            self.owner_checked(
                COMPLETE_SCRIPT,
                key,
                &[owner.as_bytes(), &record, ret.as_bytes()],
            )
            .await
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>> {
        timed("release", async move {
            self.owner_checked(RELEASE_SCRIPT, key, &[owner.as_bytes()])
                .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Timeouts of the longest a `Duration` holds, set in code (the configuration's are at most
    /// 100 years): the store is made, without overflowing the bounds it derives from them.
    #[tokio::test]
    async fn the_longest_timeouts_set_in_code_do_not_overflow() {
        let cfg = IdempotencyConfig {
            store_timeout: Duration::MAX,
            durability: crate::config::Durability {
                replicas: 1,
                timeout: Duration::MAX,
            },
            ..IdempotencyConfig::default()
        };
        let store = RedisStore::connect_lazy(&cfg).unwrap();
        assert_eq!(store.timeout, keel_core::units::MAX_DURATION);
        assert_eq!(store.wait_timeout, keel_core::units::MAX_DURATION);
    }

    #[test]
    fn a_record_in_progress_prefixes_each_field_with_its_length() {
        let rec = |o, f| in_progress(o, f, 10_000)[HEADER..].to_vec();
        assert_eq!(rec("", ""), b"000000");
        assert_eq!(rec("own", "fp"), b"003own002fp");
        let long = "x".repeat(MAX_FIELD);
        let tail = rec(&long, "f");
        assert_eq!(&tail[..3], b"999");
        assert_eq!(&tail[3 + MAX_FIELD..], b"001f");
        assert_eq!(
            &in_progress("own", "fp", 10_000)[..HEADER],
            b"q000000000000000100009999999999999"
        );
        assert_eq!(
            &in_progress("", "", u64::MAX)[..HEADER],
            b"q184467440737095516159999999999999"
        );
        assert_eq!(
            fields(&in_progress("own", "fp", 1)),
            Some((b'q', &b"fp"[..], 45))
        );
    }

    /// `EXEC`'s reply to a claim that found `old`, at the server time 1,700,000,000.000123 s.
    fn exec(old: Value) -> Value {
        Value::Array(vec![
            old,
            Value::Array(vec![
                Value::BulkString(b"1700000000".to_vec()),
                Value::BulkString(b"123".to_vec()),
            ]),
        ])
    }

    #[test]
    fn a_claim_is_settled_from_what_the_key_held() {
        let settled = |old| settle(exec(old), "fp").unwrap();
        let in_progress_for = |ms: Option<u64>| {
            Some(Claim::InProgress {
                retry_after: ms.map(Duration::from_millis),
            })
        };
        assert_eq!(
            settled(Value::Nil),
            Some(Claim::New {
                fence: 1_700_000_000_000_123
            })
        );
        let mut done = b"c".to_vec();
        done.extend_from_slice(&in_progress("own", "fp", 0)[1..]);
        done.extend_from_slice(b"answer");
        assert_eq!(
            settled(Value::BulkString(done.clone())),
            Some(Claim::Completed(Bytes::from_static(b"answer")))
        );
        assert_eq!(
            settle(exec(Value::BulkString(done)), "other").unwrap(),
            Some(Claim::Mismatch)
        );
        // In progress: at most the holder's lease, or another fingerprint.
        let held = Value::BulkString(in_progress("own", "fp", 4_000));
        assert_eq!(settled(held.clone()), in_progress_for(Some(4_000)));
        assert_eq!(settle(exec(held), "other").unwrap(), Some(Claim::Mismatch));
        // The earlier layout: the lease's end in the header (ms), or released.
        let earlier = |state: &str, ends: u64| {
            let mut r = format!("{state}{:020}{ends:013}", 5).into_bytes();
            r.extend_from_slice(&in_progress("own", "fp", 0)[HEADER..]);
            Value::BulkString(r)
        };
        assert_eq!(
            settled(earlier("p", 1_700_000_002_500)),
            in_progress_for(Some(2_500))
        );
        assert_eq!(settled(earlier("p", 1_700_000_000_000)), None);
        assert_eq!(settled(earlier("r", 0)), None);
        // Not ours: in progress, never a second execution.
        assert_eq!(
            settled(Value::BulkString(b"x".to_vec())),
            in_progress_for(None)
        );
        let wrong_type = redis::parse_redis_value(b"-WRONGTYPE not a string\r\n").unwrap();
        assert!(matches!(wrong_type, Value::ServerError(_)));
        assert_eq!(settled(wrong_type), in_progress_for(None));
        assert!(settle(Value::Int(1), "fp").is_err());
        assert!(settle(exec(Value::Int(1)), "fp").is_err());
    }

    proptest::proptest! {
        /// Whatever a key holds, reading it as a record neither panics nor reads past its end,
        /// and a record written in progress reads back its own fingerprint.
        #[test]
        fn any_value_is_read_without_panic(
            rec in proptest::collection::vec(proptest::num::u8::ANY, 0..80),
            owner in "[a-z0-9]{0,40}",
            fp in "[a-f0-9]{0,70}",
            lease in proptest::num::u64::ANY,
        ) {
            if let Some((_, f, at)) = fields(&rec) {
                proptest::prop_assert!(f.len() <= rec.len() && at <= rec.len());
            }
            let _ = settle(exec(Value::BulkString(rec)), &fp);
            let written = in_progress(&owner, &fp, lease);
            proptest::prop_assert_eq!(written.len(), HEADER + 6 + owner.len() + fp.len());
            proptest::prop_assert_eq!(fields(&written), Some((b'q', fp.as_bytes(), written.len())));
            proptest::prop_assert_eq!(
                settle(exec(Value::BulkString(written)), &fp).unwrap(),
                Some(Claim::InProgress { retry_after: Some(Duration::from_millis(lease)) })
            );
        }
    }

    #[test]
    fn an_unexpected_reply_is_reported_without_its_contents() {
        // A completed record in a reply of the wrong shape: the error names its shape only.
        let v = Value::Array(vec![
            Value::Int(2),
            Value::BulkString(b"secret answer".to_vec()),
            Value::Int(9),
        ]);
        let e = parse_take_over(v).unwrap_err().to_string();
        assert!(!e.contains("secret"), "{e}");
        assert!(e.contains("[2, <13 bytes>, 9]"), "{e}");
    }
}
