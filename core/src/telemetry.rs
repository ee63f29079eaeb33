//! The names of keel's metrics and spans.
//!
//! Every metric is `keel_<area>_<what>_<unit>`, with the labels `service`, `instance` and
//! `outcome` where they apply. Each crate lists its own names here so that `docs/METRICS.md` and
//! the code cannot drift: the names are constants, used by the code that emits them.

/// Configuration reloads, by `outcome`: `applied`, `rejected` or `unchanged`.
pub const CONFIG_RELOADS_TOTAL: &str = "keel_config_reloads_total";
/// The generation of the configuration document in force.
pub const CONFIG_GENERATION: &str = "keel_config_generation";
/// 1 while the most recent reload was refused, else 0.
pub const CONFIG_LAST_RELOAD_FAILED: &str = "keel_config_last_reload_failed";

/// Label: the service a metric is about.
pub const LABEL_SERVICE: &str = "service";
/// Label: the instance a metric is about.
pub const LABEL_INSTANCE: &str = "instance";
/// Label: how something ended.
pub const LABEL_OUTCOME: &str = "outcome";

/// Registers descriptions of the metrics above with the installed recorder.
pub fn describe() {
    metrics::describe_counter!(
        CONFIG_RELOADS_TOTAL,
        "Configuration reloads, by outcome (applied, rejected, unchanged)"
    );
    metrics::describe_gauge!(
        CONFIG_GENERATION,
        "Generation of the configuration document in force"
    );
    metrics::describe_gauge!(
        CONFIG_LAST_RELOAD_FAILED,
        "1 while the most recent configuration reload was refused"
    );
}
