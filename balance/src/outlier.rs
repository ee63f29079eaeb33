//! What a completed request teaches: peak EWMA, nginx passive health, Envoy outlier detection.
//!
//! **Peak EWMA** takes each latency; a failure counts as at least twice the current estimate,
//! so an instance that fails fast is not mistaken for a fast one.
//!
//! **Passive health** follows nginx (`ngx_http_upstream_free_round_robin_peer`): a failure counts
//! towards `max_fails` within `fail_timeout`; at `max_fails` the instance is out for
//! `fail_timeout`, then tried again; a success clears the count. Each failure also lowers the SWRR
//! effective weight by `weight / max_fails`, which grows back by one per pick. nginx ignores
//! `max_fails` for a lone server, and so do we: taking out the only instance helps nobody.
//!
//! **Outlier detection** follows Envoy (`source/common/upstream/outlier_detection_impl.cc`):
//! consecutive 5xx and consecutive gateway failures eject at once; every `interval` the
//! success-rate (mean − factor × stdev over hosts with enough volume) and failure-percentage
//! checks run. An ejection lasts `base_ejection_time × times ejected`, capped at
//! `max_ejection_time`; the multiplier decays by one per interval spent healthy. At most
//! `max_ejection_percent` of the instances are out at once, though one may always be. The checks
//! run inline on completions (no background task): when an interval has passed, the completing
//! request runs the sweep.

use std::{
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Duration,
};

use crate::{
    classify::Outcome,
    picker::Shared,
    roster::{Entry, Roster},
    state::ns,
    telemetry,
};

pub(crate) fn on_complete(
    s: &Shared,
    r: &Roster,
    e: &Arc<Entry>,
    outcome: Outcome,
    latency: Duration,
    now: u64,
) {
    e.metrics.request(outcome);
    e.metrics.duration.record(latency.as_secs_f64());
    if outcome == Outcome::Cancelled {
        return;
    }
    let st = &e.state;
    // A failure that came back fast must not make the instance look fast (the "black hole"
    // that attracts traffic by failing quickly): it counts as at least twice the current
    // estimate, which the peak EWMA takes at once.
    let observed = if outcome.is_failure() {
        latency.max(Duration::from_nanos(
            (st.ewma_ns(r.default_rtt_ns) * 2.0) as u64,
        ))
    } else {
        latency
    };
    st.observe_rtt(observed, now, r.config.ewma_decay, r.default_rtt_ns);
    let o = &r.config.outlier;
    st.window_total.fetch_add(1, Relaxed);
    if outcome.is_failure() {
        passive_failure(s, r, e, now);
        let c5 = st.consecutive_5xx.fetch_add(1, Relaxed) + 1;
        let gw = if outcome == Outcome::GatewayFailure {
            st.consecutive_gateway.fetch_add(1, Relaxed) + 1
        } else {
            st.consecutive_gateway.store(0, Relaxed);
            0
        };
        if o.enabled {
            if o.consecutive_5xx > 0 && c5 >= o.consecutive_5xx {
                eject(
                    s,
                    r,
                    e,
                    now,
                    "consecutive_5xx",
                    format!("{c5} consecutive failures"),
                );
            } else if o.enforce_consecutive_gateway_failure
                && o.consecutive_gateway_failure > 0
                && gw >= o.consecutive_gateway_failure
            {
                eject(
                    s,
                    r,
                    e,
                    now,
                    "consecutive_gateway_failure",
                    format!("{gw} consecutive gateway failures"),
                );
            }
        }
    } else {
        st.window_success.fetch_add(1, Relaxed);
        st.consecutive_5xx.store(0, Relaxed);
        st.consecutive_gateway.store(0, Relaxed);
        st.fails.store(0, Relaxed);
    }
    if o.enabled {
        maybe_sweep(s, r, now);
    }
}

fn passive_failure(s: &Shared, r: &Roster, e: &Entry, now: u64) {
    if e.max_fails == 0 || r.lone {
        return;
    }
    let st = &e.state;
    let window = st.fail_window_start.load(Relaxed);
    let fails = if window == 0 || now.saturating_sub(window) > e.fail_timeout {
        st.fail_window_start.store(now, Relaxed);
        st.fails.store(1, Relaxed);
        1
    } else {
        st.fails.fetch_add(1, Relaxed) + 1
    };
    let penalty = i64::from(e.weight / e.max_fails);
    let ew = st.effective_weight.load(Relaxed);
    st.effective_weight.store((ew - penalty).max(0), Relaxed);
    if penalty > 0 && ew > 0 {
        // Round robin leaves its rotation: the weighted walk applies the penalty.
        // Release: whoever reads the new count also sees the lowered weight.
        s.penalties
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }
    if fails >= e.max_fails && !st.passive_out(now) {
        let until = now + e.fail_timeout;
        st.passive_until.store(until, Relaxed);
        if e.slow_window != 0 {
            // Its return after `fail_timeout` ramps up (nginx's `slow_start`): out until then.
            st.ramp_start.store(until, Relaxed);
        }
        st.fails.store(0, Relaxed);
        st.fail_window_start.store(0, Relaxed);
        st.set_reason(Some(format!(
            "passive: {fails} failures within fail_timeout"
        )));
        s.bump_epoch(until);
        metrics::counter!(telemetry::EJECTIONS_TOTAL, "service" => s.service.to_string(),
            "instance" => e.instance.id.to_string(), "outcome" => "passive")
        .increment(1);
        tracing::warn!(service = %s.service, instance = %e.instance.id, fails, "instance temporarily disabled (max_fails)");
    }
}

fn max_ejected(r: &Roster) -> usize {
    let n = r.entries.iter().filter(|e| e.pickable).count();
    ((n as f64 * r.config.outlier.max_ejection_percent.get()).floor() as usize).max(1)
}

fn ejected_count(r: &Roster, now: u64) -> usize {
    r.entries
        .iter()
        .filter(|e| e.pickable && e.state.outlier_ejected(now))
        .count()
}

fn eject(s: &Shared, r: &Roster, e: &Entry, now: u64, why: &'static str, detail: String) {
    let st = &e.state;
    if st.outlier_ejected(now) {
        return;
    }
    if ejected_count(r, now) >= max_ejected(r) {
        tracing::debug!(service = %s.service, instance = %e.instance.id, why, "outlier not ejected: max_ejection_percent reached");
        return;
    }
    let o = &r.config.outlier;
    let times = st.times_ejected.fetch_add(1, Relaxed) + 1;
    let d = ns(o.base_ejection_time)
        .saturating_mul(u64::from(times))
        .min(ns(o.max_ejection_time.max(o.base_ejection_time)));
    let until = now + d;
    st.ejected_until.store(until, Relaxed);
    st.ejections_total.fetch_add(1, Relaxed);
    st.consecutive_5xx.store(0, Relaxed);
    st.consecutive_gateway.store(0, Relaxed);
    st.set_reason(Some(format!("outlier ({why}): {detail}")));
    s.bump_epoch(until);
    metrics::counter!(telemetry::EJECTIONS_TOTAL, "service" => s.service.to_string(),
        "instance" => e.instance.id.to_string(), "outcome" => why)
    .increment(1);
    tracing::warn!(service = %s.service, instance = %e.instance.id, why, %detail,
        ejected_for_ms = d / 1_000_000, "outlier ejected");
}

/// Takes `e` out of rotation for `d` on another component's word (a per-instance circuit
/// breaker), within `max_ejection_percent` like any ejection; the sweep re-admits it after `d`.
/// Returns whether it is out.
pub(crate) fn eject_for(
    s: &Shared,
    r: &Roster,
    e: &Entry,
    now: u64,
    d: u64,
    reason: String,
) -> bool {
    let st = &e.state;
    let until = now.saturating_add(d.max(1));
    if st.outlier_ejected(now) {
        // Already out: extend to the later end.
        if st.ejected_until.load(Relaxed) < until {
            st.ejected_until.store(until, Relaxed);
        }
        return true;
    }
    if ejected_count(r, now) >= max_ejected(r) {
        tracing::debug!(service = %s.service, instance = %e.instance.id, %reason, "not ejected: max_ejection_percent reached");
        return false;
    }
    st.ejected_until.store(until, Relaxed);
    st.ejections_total.fetch_add(1, Relaxed);
    st.set_reason(Some(reason.clone()));
    s.bump_epoch(until);
    metrics::counter!(telemetry::EJECTIONS_TOTAL, "service" => s.service.to_string(),
        "instance" => e.instance.id.to_string(), "outcome" => "external")
    .increment(1);
    tracing::warn!(service = %s.service, instance = %e.instance.id, %reason,
        ejected_for_ms = d / 1_000_000, "instance ejected");
    true
}

fn maybe_sweep(s: &Shared, r: &Roster, now: u64) {
    let interval = ns(r.config.outlier.interval);
    let Ok(mut last) = s.last_sweep.try_lock() else {
        return;
    };
    if *last == 0 {
        *last = now;
        return;
    }
    if now.saturating_sub(*last) < interval {
        return;
    }
    *last = now;
    sweep(s, r, now);
}

/// One Envoy interval: re-admit, decay multipliers, success-rate and failure-percentage checks.
pub(crate) fn sweep(s: &Shared, r: &Roster, now: u64) {
    let o = &r.config.outlier;
    let mut stats: Vec<(usize, u64, u64)> = Vec::new();
    for (i, e) in r.entries.iter().enumerate() {
        let st = &e.state;
        let until = st.ejected_until.load(Relaxed);
        if until != 0 && until <= now {
            // Back in: ramp up again if slow start is on.
            st.ejected_until.store(0, Relaxed);
            st.ramp_start.store(now, Relaxed);
            st.set_reason(None);
            s.bump_epoch(0);
            tracing::info!(service = %s.service, instance = %e.instance.id, "outlier re-admitted");
        } else if until == 0 && !st.passive_out(now) {
            let t = st.times_ejected.load(Relaxed);
            if t > 0 {
                st.times_ejected.store(t - 1, Relaxed);
            }
        }
        let ok = st.window_success.swap(0, Relaxed);
        let total = st.window_total.swap(0, Relaxed);
        if e.pickable && !st.outlier_ejected(now) {
            stats.push((i, ok, total));
        }
    }
    if o.enforce_success_rate {
        let vol: Vec<(usize, f64)> = stats
            .iter()
            .filter(|x| x.2 >= u64::from(o.success_rate_request_volume))
            .map(|&(i, ok, t)| (i, ok as f64 / t as f64))
            .collect();
        if vol.len() >= o.success_rate_minimum_hosts as usize && !vol.is_empty() {
            let n = vol.len() as f64;
            let mean = vol.iter().map(|x| x.1).sum::<f64>() / n;
            let var = vol.iter().map(|x| (x.1 - mean).powi(2)).sum::<f64>() / n;
            let threshold = mean - o.success_rate_stdev_factor * var.sqrt();
            for &(i, rate) in &vol {
                if rate < threshold {
                    eject(
                        s,
                        r,
                        &r.entries[i],
                        now,
                        "success_rate",
                        format!(
                            "success rate {:.1}% below {:.1}%",
                            rate * 100.0,
                            threshold * 100.0
                        ),
                    );
                }
            }
        }
    }
    if o.enforce_failure_percentage {
        let vol: Vec<(usize, f64)> = stats
            .iter()
            .filter(|x| x.2 >= u64::from(o.failure_percentage_request_volume))
            .map(|&(i, ok, t)| (i, 1.0 - ok as f64 / t as f64))
            .collect();
        if vol.len() >= o.failure_percentage_minimum_hosts as usize {
            for &(i, fail) in &vol {
                if fail >= o.failure_percentage_threshold.get() {
                    eject(
                        s,
                        r,
                        &r.entries[i],
                        now,
                        "failure_percentage",
                        format!("{:.1}% failures", fail * 100.0),
                    );
                }
            }
        }
    }
}
