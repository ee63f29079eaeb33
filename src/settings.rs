//! The sections keel itself registers: `[clients.NAME]` and `[inbound]`, composed from the
//! feature crates' own policy types. (`[service]` is keel-core's, `[discovery]` keel-discovery's,
//! `[idempotency]` keel-idempotency's.)

use std::{collections::BTreeMap, time::Duration};

use keel_balance::BalanceConfig;
use keel_discovery::{HealthCheckConfig, StaticEndpoint};
use keel_resilience::{
    BreakerConfig, BulkheadConfig, ChaosConfig, HedgeConfig, RateLimitConfig, ResilienceConfig,
    RetryConfig, TimeoutConfig,
};
use serde::{Deserialize, Serialize};

/// The default of [`ClientConfig::max_response_body_bytes`]: 4 MiB.
pub(crate) const DEFAULT_MAX_RESPONSE_BODY_BYTES: usize = 4 << 20;

/// `[clients.NAME]`: how this service calls `NAME`. Every key is live: an edit applies to the
/// next call and keeps what was learned (EWMA, breaker windows, budgets, limiter state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// The service to discover, when it differs from the client's name.
    pub service: Option<String>,
    /// Static endpoints (nginx semantics). When present, they are this client's instances and
    /// discovery is not asked; edits apply live.
    pub endpoints: Vec<StaticEndpoint>,
    /// Active health checks of this client's instances (HAProxy semantics); off by default.
    pub health: HealthCheckConfig,
    /// How long to wait for a TCP connection to an instance.
    #[serde(with = "keel_core::units::serde_duration")]
    pub connect_timeout: Duration,
    /// The largest answer body the client reads, in bytes (the whole body is buffered): a
    /// larger one fails the call with [`ClientError::ResponseTooLarge`](crate::ClientError)
    /// without reading the rest. 4 MiB by default, as gRPC's default receive limit.
    pub max_response_body_bytes: usize,
    /// Balancing: strategy, passive health, outlier detection, zones, canaries.
    pub balance: BalanceConfig,
    /// Total deadline and per-try timeout.
    pub timeout: TimeoutConfig,
    /// Retries and their budget.
    pub retry: RetryConfig,
    /// Circuit breaker or adaptive throttling.
    pub breaker: BreakerConfig,
    /// Client-side rate limit.
    pub rate_limit: RateLimitConfig,
    /// Bulkhead and adaptive concurrency.
    pub bulkhead: BulkheadConfig,
    /// Hedged requests.
    pub hedge: HedgeConfig,
    /// Fault injection (for demos and tests).
    pub chaos: ChaosConfig,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            service: None,
            endpoints: Vec::new(),
            health: HealthCheckConfig::default(),
            connect_timeout: Duration::from_secs(1),
            max_response_body_bytes: DEFAULT_MAX_RESPONSE_BODY_BYTES,
            balance: BalanceConfig::default(),
            timeout: TimeoutConfig::default(),
            retry: RetryConfig::default(),
            breaker: BreakerConfig::default(),
            rate_limit: RateLimitConfig::default(),
            bulkhead: BulkheadConfig::default(),
            hedge: HedgeConfig::default(),
            chaos: ChaosConfig::default(),
        }
    }
}

impl ClientConfig {
    /// The resilience part, for keel-resilience's layers.
    pub fn resilience(&self) -> ResilienceConfig {
        ResilienceConfig {
            timeout: self.timeout.clone(),
            retry: self.retry.clone(),
            breaker: self.breaker.clone(),
            rate_limit: self.rate_limit.clone(),
            bulkhead: self.bulkhead.clone(),
            hedge: self.hedge.clone(),
            chaos: self.chaos.clone(),
        }
    }

    /// Checks every part; the message names the bad key.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(s) = &self.service {
            keel_core::ServiceName::new(s).map_err(|e| format!("service: {e}"))?;
        }
        if self.connect_timeout.is_zero() {
            return Err("connect_timeout must be greater than 0".to_owned());
        }
        if self.max_response_body_bytes == 0 {
            return Err("max_response_body_bytes must be at least 1".to_owned());
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            let svc = keel_core::ServiceName::new("endpoint").map_err(|e| e.to_string())?;
            e.to_instance(&svc)
                .map_err(|err| format!("endpoints[{i}]: {err}"))?;
        }
        self.balance
            .validate()
            .map_err(|e| format!("balance.{e}"))?;
        self.resilience().validate()
    }
}

/// The `clients` section: one [`ClientConfig`] per service called.
pub type ClientsSection = BTreeMap<String, ClientConfig>;

pub(crate) fn validate_clients(clients: &ClientsSection) -> Result<(), String> {
    for (name, c) in clients {
        keel_core::ServiceName::new(name).map_err(|e| format!("{name}: {e}"))?;
        c.validate().map_err(|e| format!("{name}.{e}"))?;
    }
    Ok(())
}

/// `[inbound]`: what the server side applies to every request it serves (besides the deadline
/// check, which is always on: work whose caller's `keel-deadline-ms` has run out gets a 504).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InboundConfig {
    /// Inbound rate limit (429 with `Retry-After` and RateLimit headers); off unless a rate is set.
    pub rate_limit: RateLimitConfig,
    /// Inbound concurrency limit / load shedding (503 with `Retry-After`).
    pub bulkhead: BulkheadConfig,
}

impl InboundConfig {
    /// Checks every part.
    pub fn validate(&self) -> Result<(), String> {
        self.rate_limit
            .validate()
            .map_err(|e| format!("rate_limit.{e}"))?;
        self.bulkhead
            .validate()
            .map_err(|e| format!("bulkhead.{e}"))
    }
}

/// Every configuration key keel itself knows, with its default, as TOML (`docs/CONFIG.md`
/// carries the same text; a test keeps them equal). Optional keys without a default are not
/// shown; the application's own sections are not included.
pub fn default_config_toml() -> String {
    fn section<T: Serialize>(
        doc: &mut serde_json::Map<String, serde_json::Value>,
        name: &str,
        v: T,
    ) {
        doc.insert(name.to_owned(), serde_json::to_value(v).unwrap_or_default());
    }
    let mut doc = serde_json::Map::new();
    section(
        &mut doc,
        "service",
        keel_core::config::ServiceSection::default(),
    );
    section(
        &mut doc,
        "discovery",
        keel_discovery::DiscoveryConfig::default(),
    );
    let mut clients = serde_json::Map::new();
    section(&mut clients, "NAME", ClientConfig::default());
    doc.insert("clients".to_owned(), serde_json::Value::Object(clients));
    section(&mut doc, "inbound", InboundConfig::default());
    section(
        &mut doc,
        "idempotency",
        keel_idempotency::IdempotencyConfig::default(),
    );
    let mut out = String::new();
    write_toml(&mut out, "", &serde_json::Value::Object(doc));
    out.trim_start().to_owned()
}

/// A small TOML writer for documentation: tables as `[a.b]` headers, keys sorted, arrays
/// inline.
fn write_toml(out: &mut String, path: &str, v: &serde_json::Value) {
    use std::fmt::Write;
    let serde_json::Value::Object(map) = v else {
        return;
    };
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    let mut scalars = String::new();
    for k in &keys {
        let value = &map[k.as_str()];
        if !value.is_object() && !value.is_null() {
            let _ = writeln!(scalars, "{k} = {}", scalar(value));
        }
    }
    if !path.is_empty()
        && (!scalars.is_empty() || keys.iter().all(|k| !map[k.as_str()].is_object()))
    {
        let _ = writeln!(out, "[{path}]");
    }
    out.push_str(&scalars);
    if !scalars.is_empty() || !path.is_empty() {
        out.push('\n');
    }
    for k in keys {
        let value = &map[k.as_str()];
        if value.is_object() {
            let child = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            write_toml(out, &child, value);
        }
    }
}

fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => format!("{s:?}"),
        serde_json::Value::Array(a) => {
            format!("[{}]", a.iter().map(scalar).collect::<Vec<_>>().join(", "))
        }
        other => other.to_string(),
    }
}
