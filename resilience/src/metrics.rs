//! The names of this crate's metrics (listed in docs/METRICS.md). Handles are registered once,
//! when a layer is built, so the hot path is an atomic add, not a key lookup.

use std::sync::Arc;

/// Gauge: breaker state, 0 closed, 1 open, 2 half-open, 3 forced open, 4 disabled. Labels `service`, `instance`.
pub const BREAKER_STATE: &str = "keel_breaker_state";
/// Counter: breaker state transitions, label `outcome` = the new state.
pub const BREAKER_TRANSITIONS_TOTAL: &str = "keel_breaker_transitions_total";
/// Counter: calls the breaker or adaptive throttle refused, label `outcome` (`breaker_open`, `throttled`).
pub const BREAKER_REJECTED_TOTAL: &str = "keel_breaker_rejected_total";
/// Counter: attempts made by the retry and hedge layers, label `outcome`
/// (`first`, `retry`, `hedge`, `budget_exhausted`, `not_replayable`, `not_idempotent`).
pub const RETRY_ATTEMPTS_TOTAL: &str = "keel_retry_attempts_total";
/// Counter: rate limit decisions, label `outcome` (`allowed`, `limited`, `fallback`).
pub const RATELIMIT_DECISIONS_TOTAL: &str = "keel_ratelimit_decisions_total";
/// Counter: calls the bulkhead or adaptive concurrency limit refused.
pub const BULKHEAD_REJECTED_TOTAL: &str = "keel_bulkhead_rejected_total";
/// Gauge: calls in flight through the bulkhead.
pub const BULKHEAD_IN_FLIGHT: &str = "keel_bulkhead_in_flight";
/// Gauge: the current adaptive concurrency limit.
pub const CONCURRENCY_LIMIT: &str = "keel_concurrency_limit";
/// Counter: hedges sent, label `outcome` (`sent`, `won`).
pub const HEDGE_TOTAL: &str = "keel_hedge_total";
/// Counter: calls ended by the total deadline or a per-try timeout, label `outcome`
/// (`deadline_exceeded`, `timeout`, `rejected_expired`).
pub const DEADLINE_TOTAL: &str = "keel_deadline_total";
/// Counter: fallbacks called, label `outcome` = the rejection that triggered it.
pub const FALLBACK_TOTAL: &str = "keel_fallback_total";
/// Counter: faults injected by the chaos layer, label `outcome` (`failure`, `latency`).
pub const CHAOS_INJECTED_TOTAL: &str = "keel_chaos_injected_total";

/// Registers descriptions with the installed recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(
        BREAKER_STATE,
        "Circuit breaker state: 0 closed, 1 open, 2 half-open, 3 forced open, 4 disabled"
    );
    describe_counter!(
        BREAKER_TRANSITIONS_TOTAL,
        "Circuit breaker transitions, by new state"
    );
    describe_counter!(
        BREAKER_REJECTED_TOTAL,
        "Calls refused by the breaker or adaptive throttle"
    );
    describe_counter!(
        RETRY_ATTEMPTS_TOTAL,
        "Attempts by the retry and hedge layers, by kind"
    );
    describe_counter!(
        RATELIMIT_DECISIONS_TOTAL,
        "Rate limit decisions, by outcome"
    );
    describe_counter!(
        BULKHEAD_REJECTED_TOTAL,
        "Calls shed by the bulkhead or adaptive limit"
    );
    describe_gauge!(BULKHEAD_IN_FLIGHT, "Calls in flight through the bulkhead");
    describe_gauge!(CONCURRENCY_LIMIT, "Current adaptive concurrency limit");
    describe_counter!(HEDGE_TOTAL, "Hedged attempts, sent and won");
    describe_counter!(DEADLINE_TOTAL, "Calls ended by deadlines and timeouts");
    describe_counter!(FALLBACK_TOTAL, "Fallbacks called, by rejection");
    describe_counter!(CHAOS_INJECTED_TOTAL, "Faults injected by the chaos layer");
}

pub(crate) fn counter(
    name: &'static str,
    service: &Arc<str>,
    outcome: &'static str,
) -> metrics::Counter {
    metrics::counter!(name, "service" => metrics::SharedString::from(service.clone()), "outcome" => outcome)
}

pub(crate) fn gauge(name: &'static str, service: &Arc<str>, instance: &str) -> metrics::Gauge {
    if instance.is_empty() {
        metrics::gauge!(name, "service" => metrics::SharedString::from(service.clone()))
    } else {
        metrics::gauge!(name, "service" => metrics::SharedString::from(service.clone()), "instance" => instance.to_owned())
    }
}
