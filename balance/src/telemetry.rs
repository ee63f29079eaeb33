//! The names of keel-balance's metrics (all listed in `docs/METRICS.md`).
//!
//! Per-instance handles are registered once when an instance appears, so a pick or a completion
//! only bumps an existing handle and never formats a label.

/// Completed requests, by `service`, `instance` and `outcome` (`success`, `slow`, `failure`,
/// `gateway_failure`, `cancelled`).
pub const REQUESTS_TOTAL: &str = "keel_balance_requests_total";
/// Latency of completed requests, by `service` and `instance`.
pub const REQUEST_DURATION_SECONDS: &str = "keel_balance_request_duration_seconds";
/// Instances taken out, by `service`, `instance` and `outcome` (the reason: `passive`,
/// `consecutive_5xx`, `consecutive_gateway_failure`, `success_rate`, `failure_percentage`, or
/// `external` for an ejection asked by another component, such as a per-instance breaker).
pub const EJECTIONS_TOTAL: &str = "keel_balance_ejections_total";
/// Picks that found no instance, by `service`.
pub const NO_INSTANCE_TOTAL: &str = "keel_balance_no_instance_total";
/// Picks made in panic mode (too few healthy instances, health ignored), by `service`.
pub const PANIC_TOTAL: &str = "keel_balance_panic_total";
/// Rebuilds of the pick tables after a change of instances, health or policy, by `service`.
pub const REBUILDS_TOTAL: &str = "keel_balance_rebuilds_total";
/// Instances known, by `service` and `outcome` (`pickable`, `unavailable`), set at each rebuild.
pub const INSTANCES: &str = "keel_balance_instances";

/// Registers descriptions of the metrics above with the installed recorder.
pub fn describe() {
    metrics::describe_counter!(
        REQUESTS_TOTAL,
        "Requests completed per instance, by outcome"
    );
    metrics::describe_histogram!(
        REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Latency of requests per instance"
    );
    metrics::describe_counter!(EJECTIONS_TOTAL, "Instances taken out, by reason (outcome)");
    metrics::describe_counter!(NO_INSTANCE_TOTAL, "Picks that found no instance");
    metrics::describe_counter!(PANIC_TOTAL, "Picks made in panic mode");
    metrics::describe_counter!(REBUILDS_TOTAL, "Rebuilds of the pick tables");
    metrics::describe_gauge!(INSTANCES, "Instances known, pickable or unavailable");
}
