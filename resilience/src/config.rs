//! Typed policy for every layer, as it appears under `[clients.NAME]`: keys `timeout`, `retry`,
//! `breaker`, `rate_limit`, `bulkhead`, `hedge`, `chaos`.
//!
//! Every struct is `deny_unknown_fields` with a default for each key, so a typo is an error and an
//! empty table is a sane policy. `validate` is the gate both construction and a hot reload pass.

use std::{fmt, time::Duration};

use keel_core::{units::serde_duration, Ratio};
use serde::{Deserialize, Serialize};

fn ratio(v: f64) -> Ratio {
    Ratio::new(v).unwrap_or(Ratio::ZERO)
}

/// Refuses a duration over [`keel_core::units::MAX_DURATION`] (100 years: far beyond any real
/// timeout, and far from overflowing the instant it is added to, which panics), as the config
/// reader does; this catches a policy built in code. The message names `key`.
fn at_most_max(key: &str, d: Duration) -> Result<(), String> {
    if d > keel_core::units::MAX_DURATION {
        return Err(format!("{key}: longer than 100 years"));
    }
    Ok(())
}

/// The resilience policy of one client: one section per layer.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResilienceConfig {
    /// Total deadline and per-try timeout.
    pub timeout: TimeoutConfig,
    /// Retries and their budget.
    pub retry: RetryConfig,
    /// Circuit breaker or adaptive throttling.
    pub breaker: BreakerConfig,
    /// Rate limit.
    pub rate_limit: RateLimitConfig,
    /// Bulkhead and adaptive concurrency.
    pub bulkhead: BulkheadConfig,
    /// Hedged requests.
    pub hedge: HedgeConfig,
    /// Fault injection.
    pub chaos: ChaosConfig,
}

impl ResilienceConfig {
    /// Checks every section; the message names the bad key.
    pub fn validate(&self) -> Result<(), String> {
        self.timeout
            .validate()
            .map_err(|e| format!("timeout.{e}"))?;
        self.retry.validate().map_err(|e| format!("retry.{e}"))?;
        self.breaker
            .validate()
            .map_err(|e| format!("breaker.{e}"))?;
        self.rate_limit
            .validate()
            .map_err(|e| format!("rate_limit.{e}"))?;
        self.bulkhead
            .validate()
            .map_err(|e| format!("bulkhead.{e}"))?;
        self.hedge.validate().map_err(|e| format!("hedge.{e}"))?;
        self.chaos.validate().map_err(|e| format!("chaos.{e}"))?;
        Ok(())
    }
}

/// Total deadline (across every retry) and per-attempt timeout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutConfig {
    /// The whole call, retries and backoff included. Zero disables.
    #[serde(with = "serde_duration")]
    pub total: Duration,
    /// One attempt; each attempt gets `min(per_try, remaining)`. Zero means "the remaining".
    #[serde(with = "serde_duration")]
    pub per_try: Duration,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        Self {
            total: Duration::from_secs(10),
            per_try: Duration::from_secs(3),
        }
    }
}

impl TimeoutConfig {
    /// Checks the values. A `per_try` longer than `total` is accepted: each attempt gets
    /// `min(per_try, remaining)` anyway, so setting only `total = "2s"` over the default
    /// `per_try = "3s"` means what it says instead of being refused. Neither may be longer than
    /// 100 years (zero, not a huge value, means none).
    pub fn validate(&self) -> Result<(), String> {
        at_most_max("total", self.total)?;
        at_most_max("per_try", self.per_try)
    }
}

/// What a retry may be made on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct RetryOn {
    /// Connection refused or failed to establish.
    pub connect: bool,
    /// Connection reset / aborted mid-request.
    pub reset: bool,
    /// The attempt's per-try timeout fired.
    pub timeout: bool,
    /// Any other transport error.
    pub error: bool,
    /// Status codes (429 honours `Retry-After`).
    pub codes: Vec<u16>,
}

impl Default for RetryOn {
    fn default() -> Self {
        Self {
            connect: true,
            reset: true,
            timeout: true,
            error: false,
            codes: vec![429, 502, 503, 504],
        }
    }
}

impl TryFrom<Vec<String>> for RetryOn {
    type Error = String;
    fn try_from(v: Vec<String>) -> Result<Self, String> {
        let mut out = RetryOn {
            connect: false,
            reset: false,
            timeout: false,
            error: false,
            codes: Vec::new(),
        };
        for s in v {
            match s.trim() {
                "connect" | "connect-failure" => out.connect = true,
                "reset" => out.reset = true,
                "timeout" => out.timeout = true,
                "error" => out.error = true,
                "5xx" => out.codes.extend([500, 502, 503, 504]),
                other => match other.parse::<u16>() {
                    Ok(c) if (100..600).contains(&c) => out.codes.push(c),
                    _ => {
                        return Err(format!(
                            "retry_on: {other:?} is not connect, reset, timeout, error, 5xx or a status code"
                        ))
                    }
                },
            }
        }
        Ok(out)
    }
}

impl From<RetryOn> for Vec<String> {
    fn from(r: RetryOn) -> Self {
        let mut v = Vec::new();
        for (on, name) in [
            (r.connect, "connect"),
            (r.reset, "reset"),
            (r.timeout, "timeout"),
            (r.error, "error"),
        ] {
            if on {
                v.push(name.to_owned());
            }
        }
        v.extend(r.codes.iter().map(|c| c.to_string()));
        v
    }
}

/// Retries: what, how often, and the budget that keeps them from becoming a storm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in all, the first included; 1 disables retries. A reload that lowers it also
    /// stops the calls in flight at the new limit; one that raises it applies to new calls.
    /// (The other retry settings a call reads after each failed attempt: a reload applies to
    /// the next decision.)
    pub max_attempts: u32,
    /// Classes and status codes to retry on.
    pub retry_on: RetryOn,
    /// Full-jitter backoff base: attempt n waits uniform(0, min(max, base * 2^(n-1))).
    #[serde(with = "serde_duration")]
    pub backoff_base: Duration,
    /// Backoff ceiling.
    #[serde(with = "serde_duration")]
    pub backoff_max: Duration,
    /// Retries allowed as a share of requests over `budget_window` (tower/Finagle budget).
    pub budget_ratio: Ratio,
    /// Retries always allowed per second, whatever the ratio says.
    pub min_per_second: u32,
    /// The window the budget is counted over.
    #[serde(with = "serde_duration")]
    pub budget_window: Duration,
    /// Concurrent retries allowed, as a share of calls in flight ...
    pub concurrent_ratio: Ratio,
    /// ... but never fewer than this.
    pub concurrent_min: u32,
    /// A 429/503 `Retry-After` longer than this (or than the deadline left) is not waited for.
    #[serde(with = "serde_duration")]
    pub max_retry_after: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            retry_on: RetryOn::default(),
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_secs(1),
            budget_ratio: ratio(0.2),
            min_per_second: 10,
            budget_window: Duration::from_secs(10),
            concurrent_ratio: ratio(0.2),
            concurrent_min: 3,
            max_retry_after: Duration::from_secs(5),
        }
    }
}

impl RetryConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("max_attempts: must be at least 1".into());
        }
        if self.max_attempts > 10 {
            return Err("max_attempts: more than 10 attempts is a storm, not a retry".into());
        }
        if self.backoff_base > self.backoff_max {
            return Err("backoff_base: longer than backoff_max".into());
        }
        if self.budget_window < Duration::from_secs(1)
            || self.budget_window > Duration::from_secs(600)
        {
            return Err("budget_window: must be between 1s and 10m".into());
        }
        Ok(())
    }
}

/// Classic breaker or adaptive throttling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BreakerMode {
    /// Resilience4j closed / open / half-open.
    #[default]
    Classic,
    /// Google SRE client-side adaptive throttling.
    Adaptive,
}

/// How the breaker's sliding window is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowKind {
    /// The last `size` calls.
    #[default]
    Count,
    /// The calls of the last `size` seconds.
    Time,
}

/// Circuit breaker policy (Resilience4j names and semantics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// `classic` or `adaptive`.
    pub mode: BreakerMode,
    /// `count` or `time`.
    pub window: WindowKind,
    /// Calls (count window) or seconds (time window).
    pub size: u32,
    /// Open when this share of calls failed.
    pub failure_rate_threshold: Ratio,
    /// Open when this share of calls were slow.
    pub slow_call_rate_threshold: Ratio,
    /// A call longer than this is slow.
    #[serde(with = "serde_duration")]
    pub slow_call_duration: Duration,
    /// No rate is computed before this many calls are in the window.
    pub minimum_calls: u32,
    /// Probes let through in half-open; exactly this many, never more.
    pub permitted_in_half_open: u32,
    /// How long the breaker stays open the first time.
    #[serde(with = "serde_duration")]
    pub open_duration: Duration,
    /// Each consecutive opening multiplies the open duration by this (1 = constant).
    pub open_duration_growth: f64,
    /// Random spread of the open duration, +- this share.
    pub open_duration_jitter: Ratio,
    /// Ceiling of the grown open duration.
    #[serde(with = "serde_duration")]
    pub open_duration_max: Duration,
    /// Reject every call.
    pub forced_open: bool,
    /// Let every call through and record nothing.
    pub disabled: bool,
    /// Adaptive mode: reject when requests > K x accepts (SRE book: 2).
    pub adaptive_k: f64,
    /// Adaptive mode: the window requests and accepts are counted over.
    #[serde(with = "serde_duration")]
    pub adaptive_window: Duration,
    /// Status codes counted as failures besides 502, 503 and 504 (e.g. `[500]`); 429 is never a
    /// failure (it is the upstream asking to slow down).
    pub failure_codes: Vec<u16>,
    /// Also one breaker per instance, with this same policy, below the balancer: an instance
    /// whose breaker opens is taken out of rotation for the open duration (the facade wires it;
    /// see [`BreakerRegistry`](crate::BreakerRegistry) to do it by hand). Read on every call.
    pub per_instance: bool,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            mode: BreakerMode::Classic,
            window: WindowKind::Count,
            size: 100,
            failure_rate_threshold: ratio(0.5),
            slow_call_rate_threshold: Ratio::ONE,
            slow_call_duration: Duration::from_secs(60),
            minimum_calls: 20,
            permitted_in_half_open: 10,
            open_duration: Duration::from_secs(30),
            open_duration_growth: 1.0,
            open_duration_jitter: Ratio::ZERO,
            open_duration_max: Duration::from_secs(300),
            forced_open: false,
            disabled: false,
            adaptive_k: 2.0,
            adaptive_window: Duration::from_secs(60),
            failure_codes: Vec::new(),
            per_instance: false,
        }
    }
}

impl BreakerConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if self.size == 0 || self.size > 100_000 {
            return Err("size: must be between 1 and 100000".into());
        }
        if self.window == WindowKind::Time && self.size > 3600 {
            return Err("size: a time window is at most 3600 seconds".into());
        }
        // 0% would open on successes alone (0 >= 0) and never close: Resilience4j refuses it.
        if self.failure_rate_threshold.get() <= 0.0 {
            return Err("failure_rate_threshold: must be above 0%".into());
        }
        if self.slow_call_rate_threshold.get() <= 0.0 {
            return Err("slow_call_rate_threshold: must be above 0%".into());
        }
        if self.permitted_in_half_open == 0 {
            return Err("permitted_in_half_open: must be at least 1".into());
        }
        if !(1.0..=100.0).contains(&self.open_duration_growth) {
            return Err("open_duration_growth: must be between 1 and 100".into());
        }
        at_most_max("open_duration_max", self.open_duration_max)?;
        if self.open_duration > self.open_duration_max {
            return Err("open_duration: longer than open_duration_max".into());
        }
        if !(1.0..=100.0).contains(&self.adaptive_k) {
            return Err("adaptive_k: must be between 1 and 100".into());
        }
        if self.adaptive_window < Duration::from_secs(1) {
            return Err("adaptive_window: must be at least 1s".into());
        }
        Ok(())
    }
}

/// Where a rate limit keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitScope {
    /// In this process.
    #[default]
    Local,
    /// In Redis, shared by every instance.
    Redis,
}

/// What a rate limit is keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum KeySource {
    /// One limit for all calls.
    #[default]
    Global,
    /// The request path; inbound under `keel.serve`, the route it matched (`/items/{id}`), so
    /// every URL of a route shares its limit, and every request that matches no route shares
    /// one.
    Path,
    /// The value of a header (caller, tenant); calls without it share the key `""`.
    Header(http::HeaderName),
}

impl TryFrom<String> for KeySource {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "global" => Ok(Self::Global),
            "path" => Ok(Self::Path),
            h => match h.strip_prefix("header:") {
                Some(name) => http::HeaderName::from_bytes(name.trim().as_bytes())
                    .map(Self::Header)
                    .map_err(|_| format!("key: {name:?} is not a header name")),
                None => Err(format!("key: {h:?} is not global, path or header:NAME")),
            },
        }
    }
}

impl From<KeySource> for String {
    fn from(k: KeySource) -> Self {
        match k {
            KeySource::Global => "global".into(),
            KeySource::Path => "path".into(),
            KeySource::Header(h) => format!("header:{h}"),
        }
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from(self.clone()))
    }
}

/// Rate limit policy (GCRA).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Off by default.
    pub enabled: bool,
    /// Sustained calls per second, per key.
    pub rate: f64,
    /// Calls allowed at once on top of the rate (the bucket size).
    pub burst: u32,
    /// What the limit is keyed by.
    pub key: KeySource,
    /// `local` or `redis`.
    pub scope: RateLimitScope,
    /// Redis URL for `scope = "redis"`.
    pub redis_url: Option<String>,
    /// Prefix of the Redis keys.
    pub redis_prefix: String,
    /// A Redis decision slower than this falls back to the local share. The first decision of a
    /// process also waits for the connection to be made, up to `max(redis_timeout, 200ms)`.
    #[serde(with = "serde_duration")]
    pub redis_timeout: Duration,
    /// This instance's share of `rate` when Redis is unreachable.
    pub local_share: Ratio,
    /// At most this many keys are tracked locally (bounded memory).
    pub max_keys: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            rate: 100.0,
            burst: 100,
            key: KeySource::Global,
            scope: RateLimitScope::Local,
            redis_url: None,
            redis_prefix: "keel:rl".into(),
            redis_timeout: Duration::from_millis(50),
            local_share: Ratio::ONE,
            max_keys: 10_000,
        }
    }
}

impl RateLimitConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= 1e9) {
            return Err("rate: must be a positive number of calls per second".into());
        }
        if self.burst == 0 {
            return Err("burst: must be at least 1".into());
        }
        if self.scope == RateLimitScope::Redis && !cfg!(feature = "redis") {
            return Err(
                "scope: \"redis\" is not in this build (enable keel-resilience's `redis` feature)"
                    .into(),
            );
        }
        if self.scope == RateLimitScope::Redis && self.enabled && self.redis_url.is_none() {
            return Err("redis_url: required with scope = \"redis\"".into());
        }
        if self.max_keys == 0 {
            return Err("max_keys: must be at least 1".into());
        }
        Ok(())
    }
}

/// Adaptive concurrency algorithm, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdaptiveAlgorithm {
    /// Fixed `max_concurrent`.
    #[default]
    Off,
    /// Netflix concurrency-limits Gradient2.
    Gradient2,
    /// Additive increase, multiplicative decrease.
    Aimd,
}

/// Bulkhead (fixed limit) and adaptive concurrency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BulkheadConfig {
    /// On by default, with a generous limit.
    pub enabled: bool,
    /// Calls in flight at most (the fixed limit, or the adaptive ceiling).
    pub max_concurrent: u32,
    /// How long a call may wait for a slot; zero rejects at once.
    #[serde(with = "serde_duration")]
    pub max_wait: Duration,
    /// `off`, `gradient2` or `aimd`.
    pub adaptive: AdaptiveAlgorithm,
    /// Adaptive: the floor.
    pub min_limit: u32,
    /// Adaptive: the starting limit.
    pub initial_limit: u32,
    /// Gradient2: how much latency growth is tolerated before the limit shrinks.
    pub tolerance: f64,
    /// Gradient2: how fast the limit moves (0..1).
    pub smoothing: f64,
    /// AIMD: the limit is multiplied by this on a drop.
    pub backoff_ratio: f64,
    /// AIMD: a call slower than this counts as a drop.
    #[serde(with = "serde_duration")]
    pub timeout: Duration,
}

impl Default for BulkheadConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_concurrent: 1000,
            max_wait: Duration::ZERO,
            adaptive: AdaptiveAlgorithm::Off,
            min_limit: 4,
            initial_limit: 20,
            tolerance: 1.5,
            smoothing: 0.2,
            backoff_ratio: 0.9,
            timeout: Duration::from_secs(5),
        }
    }
}

impl BulkheadConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_concurrent == 0 {
            return Err("max_concurrent: must be at least 1".into());
        }
        if self.min_limit == 0 || self.min_limit > self.max_concurrent {
            return Err("min_limit: must be between 1 and max_concurrent".into());
        }
        at_most_max("max_wait", self.max_wait)?;
        if !(1.0..=10.0).contains(&self.tolerance) {
            return Err("tolerance: must be between 1 and 10".into());
        }
        if !(self.smoothing > 0.0 && self.smoothing <= 1.0) {
            return Err("smoothing: must be in (0, 1]".into());
        }
        if !(self.backoff_ratio >= 0.5 && self.backoff_ratio < 1.0) {
            return Err("backoff_ratio: must be in [0.5, 1)".into());
        }
        Ok(())
    }
}

/// Hedged requests ("The Tail at Scale").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HedgeConfig {
    /// Off by default.
    pub enabled: bool,
    /// Fixed delay before the hedge; with `percentile`, the floor of the observed delay.
    #[serde(with = "serde_duration")]
    pub delay: Duration,
    /// If set (e.g. `0.95`), hedge after this observed latency percentile.
    pub percentile: Option<Ratio>,
}

impl Default for HedgeConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            delay: Duration::from_millis(50),
            percentile: None,
        }
    }
}

impl HedgeConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(p) = self.percentile {
            if p.get() < 0.5 {
                return Err("percentile: below 0.5 hedges most calls".into());
            }
        }
        Ok(())
    }
}

/// Fault injection, for demos and tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChaosConfig {
    /// The switch.
    pub enabled: bool,
    /// Share of calls answered with `status` without reaching the upstream.
    pub failure_rate: Ratio,
    /// The injected status.
    pub status: u16,
    /// Added latency ...
    #[serde(with = "serde_duration")]
    pub latency: Duration,
    /// ... on this share of calls.
    pub latency_rate: Ratio,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            failure_rate: Ratio::ZERO,
            status: 503,
            latency: Duration::ZERO,
            latency_rate: Ratio::ZERO,
        }
    }
}

impl ChaosConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if http::StatusCode::from_u16(self.status).is_err() {
            return Err("status: not an HTTP status".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_client_table() {
        let c: ResilienceConfig = toml::from_str(
            r#"
            timeout = { total = "2s", per_try = "500ms" }
            retry = { max_attempts = 2, retry_on = ["connect", "503"], budget_ratio = "10%" }
            breaker = { mode = "adaptive", window = "time", size = 30, adaptive_k = 1.5 }
            rate_limit = { enabled = true, rate = 50.0, burst = 10, key = "header:x-tenant" }
            bulkhead = { max_concurrent = 8, max_wait = "10ms", adaptive = "gradient2" }
            hedge = { enabled = true, percentile = 0.95 }
            chaos = { enabled = true, failure_rate = "5%" }
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.timeout.per_try, Duration::from_millis(500));
        assert_eq!(c.retry.retry_on.codes, vec![503]);
        assert!(c.retry.retry_on.connect && !c.retry.retry_on.reset);
        assert_eq!(c.breaker.mode, BreakerMode::Adaptive);
        assert_eq!(
            c.rate_limit.key,
            KeySource::Header(http::HeaderName::from_static("x-tenant"))
        );
        assert!(toml::from_str::<ResilienceConfig>("retry = { tries = 2 }").is_err());
        assert!(toml::from_str::<ResilienceConfig>("retry = { retry_on = [\"x\"] }").is_err());
        // Only `total` set below the default `per_try`: accepted, per_try is capped by it.
        let total_only = ResilienceConfig {
            timeout: TimeoutConfig {
                total: Duration::from_secs(1),
                per_try: Duration::from_secs(2),
            },
            ..Default::default()
        };
        total_only.validate().unwrap();
        let bad = ResilienceConfig {
            retry: RetryConfig {
                backoff_base: Duration::from_secs(5),
                backoff_max: Duration::from_secs(1),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .starts_with("retry.backoff_base"));
        ResilienceConfig::default().validate().unwrap();
    }
}
