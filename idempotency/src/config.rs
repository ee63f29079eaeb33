//! The `[idempotency]` section. It is read once per request through a
//! [`keel_core::Live`], so a reload changes the policy of the next request and never of one in
//! flight. Per-route overrides ([`crate::IdempotencyLayer`] builder methods) sit on top of it.

use std::time::Duration;

use keel_core::units::serde_duration;
use serde::{Deserialize, Serialize};

/// The shortest lease accepted: a lease set shorter in code (a route's override, the function
/// API) counts as this.
pub const MIN_LEASE: Duration = Duration::from_millis(30);

/// Which store holds the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// In this process only: the embedded default. Keys do not survive a restart and are not
    /// shared between instances.
    #[default]
    Memory,
    /// Redis: shared by every instance of the service.
    Redis,
}

/// Which completed responses are stored (and replayed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorePolicy {
    /// Every answer below 500 is stored: 2xx, 3xx (a redirect such as 303 See Other after a
    /// POST reports work done) and 4xx. 5xx releases the key so the client can retry.
    #[default]
    SuccessAndClientErrors,
    /// Every status is stored, 5xx included.
    All,
}

impl StorePolicy {
    /// Whether a response with this status is stored.
    pub fn stores(self, status: u16) -> bool {
        match self {
            Self::All => true,
            Self::SuccessAndClientErrors => status < 500,
        }
    }
}

/// What a duplicate gets while the first request is still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnConflict {
    /// 409 Conflict with `Retry-After`, at once (the IETF draft's answer).
    #[default]
    Reject,
    /// Wait up to `conflict_wait` for the first to finish and replay its answer; 409 after.
    Wait,
}

/// What happens when the store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// 503 with `Retry-After`: never run a request whose duplicate could not be ruled out.
    #[default]
    FailClosed,
    /// Run the handler without idempotency (counted and logged). Choose it only for routes whose
    /// handler is idempotent by itself (e.g. a database unique constraint).
    FailOpen,
}

/// What happens to the key when the request stops before an answer (client disconnect).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnCancel {
    /// Release the key (owner-checked): a retry runs the handler again at once. Right when the
    /// handler's effects are transactional (all or nothing).
    #[default]
    Release,
    /// Let the lease expire: retries get 409 until then. Right when a half-done handler must not
    /// be raced by its retry.
    Expire,
}

/// What identifies "the same request" for one key, beside the request target (path and query),
/// which every policy but `None` includes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fingerprint {
    /// The SHA-256 of the body bytes.
    #[default]
    Body,
    /// Selected top-level JSON fields of the body (missing fields count as `null`); a body that is
    /// not JSON is fingerprinted whole.
    JsonFields(Vec<String>),
    /// Selected request headers (and no body).
    Headers(Vec<String>),
    /// Nothing: any request with the key is "the same".
    None,
}

/// Optional replication acknowledgement after each claim and completion (`WAIT replicas timeout`,
/// pipelined behind the script): a claim fails closed (503) when too few replicas acknowledge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Durability {
    /// Replicas that must acknowledge; 0 turns the check off.
    pub replicas: u32,
    /// How long to wait for them.
    #[serde(with = "serde_duration")]
    pub timeout: Duration,
}

impl Default for Durability {
    fn default() -> Self {
        Self {
            replicas: 0,
            timeout: Duration::from_millis(100),
        }
    }
}

/// The `[idempotency]` configuration section.
///
/// ```
/// let cfg: keel_idempotency::IdempotencyConfig = serde_json::from_value(serde_json::json!({
///     "store": "redis", "url": "redis://127.0.0.1:6379/", "ttl": "24h", "lease": "10s",
///     "on_conflict": "wait", "fingerprint": { "json_fields": ["amount", "currency"] }
/// })).unwrap();
/// assert!(cfg.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencyConfig {
    /// `memory` (default) or `redis`.
    pub store: StoreKind,
    /// Redis URL, for `store = "redis"`: `redis://[user:password@]host:port/db` or
    /// `redis+unix:///path/to/redis.sock` (Redis 7.0 or later; no TLS).
    pub url: String,
    /// Prefix of every Redis key.
    pub prefix: String,
    /// How long a completed response is kept and replayed (retention).
    #[serde(with = "serde_duration")]
    pub ttl: Duration,
    /// How long a claim holds the key without renewal; renewed every `lease / 3` while the
    /// handler runs.
    #[serde(with = "serde_duration")]
    pub lease: Duration,
    /// The request header carrying the key.
    pub header: String,
    /// A header naming the tenant/principal, used when no [`crate::IdempotencyScope`] extension
    /// was set by authentication.
    pub scope_header: Option<String>,
    /// Methods the layer applies to; others pass through untouched.
    pub methods: Vec<String>,
    /// Whether a request without the header is refused (400).
    pub required: bool,
    /// Which responses are stored.
    pub store_policy: StorePolicy,
    /// Largest request body read (413 past it) and largest response body stored. A larger
    /// answer is never stored cut short: it streams on to the client (read no further than the
    /// limit before that) and the key is released, so a retry runs again.
    pub max_body_bytes: usize,
    /// What a duplicate gets while the first runs.
    pub on_conflict: OnConflict,
    /// Bound of the wait for `on_conflict = "wait"`.
    #[serde(with = "serde_duration")]
    pub conflict_wait: Duration,
    /// What happens when the store is down.
    pub on_store_error: OnStoreError,
    /// What happens to the key when the client goes away mid-request.
    pub on_cancel: OnCancel,
    /// Response headers stored and replayed (case-insensitive).
    pub replay_headers: Vec<String>,
    /// What makes two requests with one key "the same".
    pub fingerprint: Fingerprint,
    /// Replication acknowledgement after claims and completions (Redis).
    pub durability: Durability,
    /// Timeout of each store round trip; past it the store counts as down.
    #[serde(with = "serde_duration")]
    pub store_timeout: Duration,
    /// Most keys the memory store holds. Each key is kept for `ttl` once completed, so the
    /// store keeps every answer for its whole retention up to about `memory_capacity / ttl` new
    /// keys per second (100,000 a day, about 1.2 per second, by default). Past that it evicts
    /// completed answers, the one whose retention ends first first (counted in
    /// `keel_idempotency_memory_evictions_total`): **an evicted key can execute again**, and the
    /// retention actually kept shrinks to `memory_capacity / rate`. Claims in progress are never
    /// evicted; when they alone fill the store, new claims are refused (503, or run without
    /// idempotency on a route that fails open). Raise it, shorten `ttl`, or use Redis for more.
    /// A store of 16,384 keys or more, and at least twice the larger of 4 MiB and
    /// `max_body_bytes` + 64 KiB in `memory_max_bytes`, is split into parts (8 with the defaults)
    /// of an equal share of both limits each, and these limits hold per part (see
    /// [`MemoryStore`](crate::MemoryStore)).
    pub memory_capacity: usize,
    /// Most bytes the memory store holds (keys, fingerprints and stored answers, plus about
    /// 256 bytes of bookkeeping per key), evicting as `memory_capacity` does. 64 MiB by
    /// default; at least `max_body_bytes`.
    pub memory_max_bytes: usize,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            store: StoreKind::Memory,
            url: "redis://127.0.0.1:6379/".to_owned(),
            prefix: "keel:idem:".to_owned(),
            ttl: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(10),
            header: "Idempotency-Key".to_owned(),
            scope_header: None,
            methods: vec!["POST".to_owned(), "PATCH".to_owned()],
            required: false,
            store_policy: StorePolicy::default(),
            max_body_bytes: 1 << 20,
            on_conflict: OnConflict::default(),
            conflict_wait: Duration::from_secs(5),
            on_store_error: OnStoreError::default(),
            on_cancel: OnCancel::default(),
            replay_headers: vec![
                "content-type".to_owned(),
                "location".to_owned(),
                "etag".to_owned(),
            ],
            fingerprint: Fingerprint::default(),
            durability: Durability::default(),
            store_timeout: Duration::from_secs(1),
            memory_capacity: 100_000,
            memory_max_bytes: crate::store::DEFAULT_MEMORY_MAX_BYTES,
        }
    }
}

impl IdempotencyConfig {
    /// Checks the section as a whole; the same gate a hot reload passes.
    pub fn validate(&self) -> Result<(), String> {
        if self.lease < MIN_LEASE {
            return Err(format!(
                "idempotency.lease {:?} is below {MIN_LEASE:?}",
                self.lease
            ));
        }
        if self.ttl < self.lease {
            return Err("idempotency.ttl must be at least idempotency.lease".to_owned());
        }
        if http::HeaderName::from_bytes(self.header.as_bytes()).is_err() {
            return Err(format!(
                "idempotency.header {:?} is not a header name",
                self.header
            ));
        }
        if let Some(h) = &self.scope_header {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(format!(
                    "idempotency.scope_header {h:?} is not a header name"
                ));
            }
        }
        for m in &self.methods {
            if http::Method::from_bytes(m.as_bytes()).is_err() {
                return Err(format!("idempotency.methods: {m:?} is not a method"));
            }
        }
        for h in &self.replay_headers {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(format!(
                    "idempotency.replay_headers: {h:?} is not a header name"
                ));
            }
        }
        if let Fingerprint::Headers(hs) = &self.fingerprint {
            for h in hs {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    return Err(format!(
                        "idempotency.fingerprint: {h:?} is not a header name"
                    ));
                }
            }
        }
        if self.max_body_bytes == 0 {
            return Err("idempotency.max_body_bytes must be above 0".to_owned());
        }
        if self.store == StoreKind::Redis && !self.url.starts_with("redis") {
            return Err(format!(
                "idempotency.url {:?} is not a redis:// URL",
                keel_core::config::redact_userinfo(&self.url)
            ));
        }
        if self.store_timeout.is_zero() {
            return Err("idempotency.store_timeout must be above 0".to_owned());
        }
        if self.memory_capacity == 0 {
            return Err("idempotency.memory_capacity must be above 0".to_owned());
        }
        if self.store == StoreKind::Memory && self.memory_max_bytes < self.max_body_bytes {
            return Err(format!(
                "idempotency.memory_max_bytes ({}) must be at least idempotency.max_body_bytes ({}), or no large answer could be stored",
                self.memory_max_bytes, self.max_body_bytes
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_round_trip() {
        let c = IdempotencyConfig::default();
        assert!(c.validate().is_ok());
        let v = serde_json::to_value(&c).unwrap();
        let back: IdempotencyConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn a_refused_url_is_quoted_without_its_password() {
        let c = IdempotencyConfig {
            store: StoreKind::Redis,
            url: "http://:hunter2@cache:6379/".to_owned(),
            ..IdempotencyConfig::default()
        };
        let e = c.validate().unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.contains("http://:***@cache:6379/"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_values_refused() {
        assert!(
            serde_json::from_value::<IdempotencyConfig>(serde_json::json!({"lese": "1s"})).is_err()
        );
        let c: IdempotencyConfig =
            serde_json::from_value(serde_json::json!({"lease": "10ms"})).unwrap();
        assert!(c.validate().is_err());
        let c: IdempotencyConfig =
            serde_json::from_value(serde_json::json!({"header": "bad header"})).unwrap();
        assert!(c.validate().is_err());
        let c: IdempotencyConfig = serde_json::from_value(
            serde_json::json!({"fingerprint": "none", "store_policy": "all"}),
        )
        .unwrap();
        assert_eq!(c.fingerprint, Fingerprint::None);
        // A memory store too small for one answer.
        let c: IdempotencyConfig = serde_json::from_value(
            serde_json::json!({"max_body_bytes": 4096, "memory_max_bytes": 4095}),
        )
        .unwrap();
        assert!(c.validate().unwrap_err().contains("memory_max_bytes"));
        assert!(StorePolicy::All.stores(503));
        assert!(!StorePolicy::SuccessAndClientErrors.stores(503));
        assert!(StorePolicy::SuccessAndClientErrors.stores(303));
    }
}
