//! The names of keel-discovery's metrics, used by the code that emits them and listed in
//! `docs/METRICS.md`.

/// Instances in the published set of a service (gauge, label `service`).
pub const INSTANCES: &str = "keel_discovery_instances";
/// Seconds since the backend last answered for a service (gauge, label `service`); grows while
/// the registry is unreachable and the last known set is served.
pub const STALENESS_SECONDS: &str = "keel_discovery_staleness_seconds";
/// Reads of a service's set from a backend, by `outcome`: `ok` or `error` (counter).
pub const READS_TOTAL: &str = "keel_discovery_reads_total";
/// Updates of the published set, by `outcome`: `applied`, `held` (shrink guard) or `unchanged`.
pub const UPDATES_TOTAL: &str = "keel_discovery_updates_total";
/// Malformed records skipped, by `service` and `outcome` = the backend name (counter).
pub const MALFORMED_TOTAL: &str = "keel_discovery_malformed_records_total";
/// Heartbeats of a registration, by `service`, `instance` and `outcome`: `ok`, `error`,
/// `reregistered` (counter).
pub const HEARTBEATS_TOTAL: &str = "keel_discovery_heartbeats_total";
/// Active health checks, by `service`, `instance` and `outcome`: `pass` or `fail` (counter).
pub const HEALTH_CHECKS_TOTAL: &str = "keel_discovery_health_checks_total";
/// Active health transitions, by `service`, `instance` and `outcome`: `up` or `down` (counter).
pub const HEALTH_TRANSITIONS_TOTAL: &str = "keel_discovery_health_transitions_total";
/// 1 while an instance fails its active checks, else 0 (gauge, `service`, `instance`).
pub const INSTANCE_DOWN: &str = "keel_discovery_instance_down";

/// Registers descriptions of the metrics above with the installed recorder.
pub fn describe() {
    metrics::describe_gauge!(INSTANCES, "Instances in the published set of a service");
    metrics::describe_gauge!(
        STALENESS_SECONDS,
        metrics::Unit::Seconds,
        "Seconds since the discovery backend last answered for a service"
    );
    metrics::describe_counter!(
        READS_TOTAL,
        "Reads of a service's set, by outcome (ok, error)"
    );
    metrics::describe_counter!(
        UPDATES_TOTAL,
        "Updates of the published set, by outcome (applied, held, unchanged)"
    );
    metrics::describe_counter!(
        MALFORMED_TOTAL,
        "Malformed discovery records skipped, by backend (outcome)"
    );
    metrics::describe_counter!(
        HEARTBEATS_TOTAL,
        "Registration heartbeats, by outcome (ok, error, reregistered)"
    );
    metrics::describe_counter!(
        HEALTH_CHECKS_TOTAL,
        "Active health checks, by outcome (pass, fail)"
    );
    metrics::describe_counter!(
        HEALTH_TRANSITIONS_TOTAL,
        "Active health transitions, by outcome (up, down)"
    );
    metrics::describe_gauge!(INSTANCE_DOWN, "1 while an instance fails its active checks");
}

pub(crate) fn malformed(service: &str, backend: &'static str) {
    metrics::counter!(MALFORMED_TOTAL, "service" => service.to_owned(), "outcome" => backend)
        .increment(1);
}
