//! Metric names of keel-idempotency, in one place so code and `docs/METRICS.md` agree.

/// Claims, by `outcome`: `new`, `replay`, `conflict`, `mismatch`, `store_error`.
pub const CLAIMS_TOTAL: &str = "keel_idempotency_claims_total";
/// Lease renewals, by `result`: `ok`, `lost`, `error`.
pub const LEASE_RENEWALS_TOTAL: &str = "keel_idempotency_lease_renewals_total";
/// Ends of executions, by `result`: `ok`, `stale_owner`, `error`, `released`, `cancelled`,
/// and `unreplicated` (a stored completion acknowledged by too few replicas).
pub const COMPLETES_TOTAL: &str = "keel_idempotency_completes_total";
/// Store round-trip latency in seconds, by `op`: `claim`, `renew`, `complete`, `release`.
pub const STORE_DURATION_SECONDS: &str = "keel_idempotency_store_duration_seconds";
/// Commands written to Redis together as one pipeline, per write (the Redis store gathers the
/// commands of concurrent requests).
pub const STORE_PIPELINE_COMMANDS: &str = "keel_idempotency_store_pipeline_commands";
/// The Redis store's connection, by `event`: `opened`, `failed` (a connect that failed or timed
/// out), `lost` (closed by Redis, silent past its bound, a reply that was not RESP or that nobody
/// asked for, or a failed write).
pub const STORE_CONNECTIONS_TOTAL: &str = "keel_idempotency_store_connections_total";
/// Requests let through without idempotency because the store failed and the route fails open.
pub const FAIL_OPEN_TOTAL: &str = "keel_idempotency_fail_open_total";
/// Completed answers the memory store evicted before their retention ended, to make room for new
/// keys (each such key can execute again).
pub const MEMORY_EVICTIONS_TOTAL: &str = "keel_idempotency_memory_evictions_total";

/// Registers the descriptions of the metrics above with the installed recorder.
pub fn describe() {
    metrics::describe_counter!(CLAIMS_TOTAL, "Idempotency claims, by outcome");
    metrics::describe_counter!(
        LEASE_RENEWALS_TOTAL,
        "Idempotency lease renewals, by result"
    );
    metrics::describe_counter!(COMPLETES_TOTAL, "Idempotency completions, by result");
    metrics::describe_histogram!(
        STORE_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Idempotency store round trip latency, by op"
    );
    metrics::describe_histogram!(
        STORE_PIPELINE_COMMANDS,
        metrics::Unit::Count,
        "Commands written to Redis as one pipeline, per write"
    );
    metrics::describe_counter!(
        STORE_CONNECTIONS_TOTAL,
        "The Redis idempotency store's connection: opened, failed, lost"
    );
    metrics::describe_counter!(
        FAIL_OPEN_TOTAL,
        "Requests served without idempotency because the store failed and the route fails open"
    );
    metrics::describe_counter!(
        MEMORY_EVICTIONS_TOTAL,
        "Completed idempotency answers evicted from the full memory store before their retention ended"
    );
}

/// The metric `$kind!($name, $label => $value)`, with the key built at compile time for each
/// value listed: a static key whose hash a recorder computes once (a label given at run time
/// costs an allocation per call, a name given as a constant a hash per call); any other value
/// still works, at that cost. `$name` is a literal for that reason: the test below checks that
/// each literal is the constant of its metric.
macro_rules! labelled {
    ($kind:ident, $name:literal, $label:literal, $value:expr, [$($v:literal),*]) => {
        match $value {
            $($v => metrics::$kind!($name, $label => $v),)*
            other => metrics::$kind!($name, $label => other),
        }
    };
}

pub(crate) fn claim(outcome: &'static str) {
    labelled!(
        counter,
        "keel_idempotency_claims_total",
        "outcome",
        outcome,
        ["new", "replay", "conflict", "mismatch", "store_error"]
    )
    .increment(1);
}

pub(crate) fn renewal(result: &'static str) {
    labelled!(
        counter,
        "keel_idempotency_lease_renewals_total",
        "result",
        result,
        ["ok", "lost", "error"]
    )
    .increment(1);
}

pub(crate) fn complete(result: &'static str) {
    labelled!(
        counter,
        "keel_idempotency_completes_total",
        "result",
        result,
        [
            "ok",
            "stale_owner",
            "error",
            "released",
            "cancelled",
            "unreplicated"
        ]
    )
    .increment(1);
}

#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn store_latency(op: &'static str, started: tokio::time::Instant) {
    labelled!(
        histogram,
        "keel_idempotency_store_duration_seconds",
        "op",
        op,
        ["claim", "renew", "complete", "release"]
    )
    .record(started.elapsed().as_secs_f64());
}

#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn pipeline(commands: usize) {
    metrics::histogram!("keel_idempotency_store_pipeline_commands").record(commands as f64);
}

#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn connection(event: &'static str) {
    labelled!(
        counter,
        "keel_idempotency_store_connections_total",
        "event",
        event,
        ["opened", "failed", "lost"]
    )
    .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::debugging::DebuggingRecorder;

    #[test]
    fn every_value_keeps_its_label_listed_or_not() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            claim("new");
            claim("not-listed");
            renewal("lost");
            complete("stale_owner");
            store_latency("complete", tokio::time::Instant::now());
            pipeline(3);
            connection("opened");
        });
        let mut seen: Vec<(String, String)> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(k, ..)| {
                let key = k.key();
                let labels: Vec<String> = key
                    .labels()
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect();
                (key.name().to_owned(), labels.join(","))
            })
            .collect();
        seen.sort();
        let expected = [
            (CLAIMS_TOTAL, "outcome=new"),
            (CLAIMS_TOTAL, "outcome=not-listed"),
            (COMPLETES_TOTAL, "result=stale_owner"),
            (LEASE_RENEWALS_TOTAL, "result=lost"),
            (STORE_DURATION_SECONDS, "op=complete"),
            (STORE_PIPELINE_COMMANDS, ""),
            (STORE_CONNECTIONS_TOTAL, "event=opened"),
        ];
        let mut expected: Vec<(String, String)> = expected
            .iter()
            .map(|(n, l)| ((*n).to_owned(), (*l).to_owned()))
            .collect();
        expected.sort();
        assert_eq!(seen, expected);
    }
}
