//! Active health checks with HAProxy's semantics.
//!
//! Why `fall` and `rise` instead of believing each probe: one lost packet must not take an
//! instance out, and one lucky answer must not bring a sick one back. An instance goes down after
//! `fall` consecutive failures and comes back after `rise` consecutive passes. While it is
//! changing state it is probed every `fastinter` (to decide quickly), while it is down every
//! `downinter` (to spare a sick process), otherwise every `interval`; each wait is spread by
//! `jitter` so that a fleet of checkers does not probe in step.
//!
//! The result is a [`Live`]`<`[`HealthMap`]`>`: an instance is in the map only while it is down
//! (with the reason and [`HealthSource::Active`]); balancers read it beside the instance set.
//! Passive health (nginx `max_fails`) lives in keel-balance.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use keel_core::{
    Health, HealthMap, HealthSource, HealthStatus, Instance, InstanceId, Live, Shutdown,
};
use tokio::task::JoinHandle;

use crate::{telemetry, BoxFuture, CheckKind, HealthCheckConfig, InstanceWatch};

/// One probe of one instance: `Ok` if it passed, else why not (for people).
pub type Probe = Arc<dyn Fn(Instance) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// Runs active checks on every instance of a watched service and publishes their health.
///
/// Dropping it (or `shutdown`) stops the checks.
pub struct HealthChecker {
    health: Live<HealthMap>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for HealthChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthChecker")
            .field("down", &self.health.load().len())
            .finish()
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HealthChecker {
    /// Checks the instances of `watch` as `config` says (HTTP or TCP). Must be called inside a
    /// tokio runtime.
    pub fn spawn(watch: InstanceWatch, config: HealthCheckConfig, shutdown: Shutdown) -> Self {
        let probe = default_probe(&config);
        Self::with_probe(watch, config, shutdown, probe)
    }

    /// Like [`spawn`](HealthChecker::spawn) with a probe of your own (tests, custom protocols).
    pub fn with_probe(
        watch: InstanceWatch,
        config: HealthCheckConfig,
        shutdown: Shutdown,
        probe: Probe,
    ) -> Self {
        let health = Live::new(HealthMap::new());
        let task = tokio::spawn(supervise(watch, config, shutdown, probe, health.clone()));
        Self { health, task }
    }

    /// The observed health: instances absent from the map are healthy.
    pub fn health(&self) -> Live<HealthMap> {
        self.health.clone()
    }
}

fn default_probe(config: &HealthCheckConfig) -> Probe {
    let timeout = config.timeout;
    match config.kind {
        CheckKind::Tcp => Arc::new(move |i: Instance| {
            Box::pin(async move {
                match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(i.addr)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("TCP connect: {e}")),
                    Err(_) => Err(format!("TCP connect timed out after {timeout:?}")),
                }
            })
        }),
        CheckKind::Http => {
            let client = reqwest::Client::builder()
                .no_proxy()
                .timeout(timeout)
                .build()
                .unwrap_or_default();
            let path = config.path.clone();
            let expected = config.expected_status;
            Arc::new(move |i: Instance| {
                let client = client.clone();
                let url = format!("http://{}{}", i.addr, path);
                Box::pin(async move {
                    match client.get(&url).send().await {
                        Ok(r) => {
                            let s = r.status().as_u16();
                            let ok = match expected {
                                Some(e) => s == e,
                                None => (200..400).contains(&s),
                            };
                            if ok {
                                Ok(())
                            } else {
                                Err(format!("HTTP {s}"))
                            }
                        }
                        Err(e) if e.is_timeout() => Err(format!("timed out after {timeout:?}")),
                        Err(e) => Err(format!("HTTP: {e}")),
                    }
                })
            })
        }
    }
}

async fn supervise(
    watch: InstanceWatch,
    config: HealthCheckConfig,
    shutdown: Shutdown,
    probe: Probe,
    health: Live<HealthMap>,
) {
    let writer = Arc::new(Mutex::new(()));
    let mut checks: BTreeMap<InstanceId, (Instance, JoinHandle<()>)> = BTreeMap::new();
    let mut rx = watch.live().subscribe();
    loop {
        let set = watch.snapshot();
        let mut keep = BTreeMap::new();
        for i in set.iter() {
            match checks.remove(&i.id) {
                Some((old, task)) if old.addr == i.addr => {
                    keep.insert(i.id.clone(), (old, task));
                }
                other => {
                    if let Some((_, task)) = other {
                        task.abort();
                        // A new address starts afresh, up, like a new instance: the old
                        // address's verdict says nothing about it, and a check that passes
                        // while up never clears it.
                        forget(&health, &writer, i);
                    }
                    let task = tokio::spawn(check_one(
                        i.clone(),
                        config.clone(),
                        probe.clone(),
                        health.clone(),
                        writer.clone(),
                    ));
                    keep.insert(i.id.clone(), (i.clone(), task));
                }
            }
        }
        for (_, (gone, task)) in std::mem::replace(&mut checks, keep) {
            task.abort();
            forget(&health, &writer, &gone);
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { break },
            _ = shutdown.triggered() => break,
        }
    }
    for (_, (_, task)) in checks {
        task.abort();
    }
}

fn update(health: &Live<HealthMap>, writer: &Mutex<()>, f: impl FnOnce(&mut HealthMap)) {
    let _g = keel_core::lock(writer);
    let mut m = (*health.get()).clone();
    f(&mut m);
    health.store_if_changed(m);
}

/// Drops the verdict on `instance` (it left the set, or moved): if it was down, its
/// `keel_discovery_instance_down` goes back to 0, since no check of it will say so now.
fn forget(health: &Live<HealthMap>, writer: &Mutex<()>, instance: &Instance) {
    let mut was_down = false;
    update(health, writer, |m| {
        was_down = m.remove(&instance.id).is_some()
    });
    if was_down {
        metrics::gauge!(telemetry::INSTANCE_DOWN, "service" => instance.service.to_string(), "instance" => instance.id.to_string()).set(0.0);
    }
}

fn jittered(d: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 {
        return d;
    }
    let f = 1.0 + jitter * (rand::random::<f64>() * 2.0 - 1.0);
    d.mul_f64(f.max(0.0))
}

async fn check_one(
    instance: Instance,
    config: HealthCheckConfig,
    probe: Probe,
    health: Live<HealthMap>,
    writer: Arc<Mutex<()>>,
) {
    let service = instance.service.to_string();
    let id = instance.id.to_string();
    let fastinter = config.fastinter.unwrap_or(config.interval);
    let downinter = config.downinter.unwrap_or(config.interval);
    let mut up = true;
    let mut streak = 0u32; // consecutive results against the current state
                           // Spread the first probes of a fleet too.
    tokio::time::sleep(jittered(config.interval, config.jitter.get()) / 2).await;
    loop {
        let result = match tokio::time::timeout(config.timeout, probe(instance.clone())).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {:?}", config.timeout)),
        };
        let outcome = if result.is_ok() { "pass" } else { "fail" };
        metrics::counter!(telemetry::HEALTH_CHECKS_TOTAL, "service" => service.clone(), "instance" => id.clone(), "outcome" => outcome).increment(1);
        match (&result, up) {
            (Ok(()), true) => streak = 0,
            (Err(_), false) => streak = 0,
            (Err(reason), true) => {
                streak += 1;
                if streak >= config.fall {
                    up = false;
                    streak = 0;
                    let why = format!("{} checks failed: {reason}", config.fall);
                    tracing::warn!(%service, instance = %id, reason = %why, "instance down (active check)");
                    metrics::counter!(telemetry::HEALTH_TRANSITIONS_TOTAL, "service" => service.clone(), "instance" => id.clone(), "outcome" => "down").increment(1);
                    metrics::gauge!(telemetry::INSTANCE_DOWN, "service" => service.clone(), "instance" => id.clone()).set(1.0);
                    update(&health, &writer, |m| {
                        m.insert(
                            instance.id.clone(),
                            Health::new(HealthStatus::Down, HealthSource::Active, why),
                        );
                    });
                }
            }
            (Ok(()), false) => {
                streak += 1;
                if streak >= config.rise {
                    up = true;
                    streak = 0;
                    tracing::info!(%service, instance = %id, "instance up (active check)");
                    metrics::counter!(telemetry::HEALTH_TRANSITIONS_TOTAL, "service" => service.clone(), "instance" => id.clone(), "outcome" => "up").increment(1);
                    metrics::gauge!(telemetry::INSTANCE_DOWN, "service" => service.clone(), "instance" => id.clone()).set(0.0);
                    update(&health, &writer, |m| {
                        m.remove(&instance.id);
                    });
                }
            }
        }
        let base = if streak > 0 {
            fastinter
        } else if up {
            config.interval
        } else {
            downinter
        };
        tokio::time::sleep(jittered(base, config.jitter.get())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::{Ratio, ServiceName};
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use tokio::sync::watch;

    #[tokio::test(start_paused = true)]
    async fn fall_and_rise_follow_haproxy_with_paused_time() {
        let svc = ServiceName::new("svc").unwrap();
        let inst = Instance::new(svc.clone(), "127.0.0.1:1".parse().unwrap());
        let set = Live::new(vec![inst.clone()]);
        let (_tx, rx) = watch::channel(true);
        let w = InstanceWatch::new(svc, set.clone(), rx);
        let healthy = Arc::new(AtomicBool::new(true));
        let probes = Arc::new(AtomicU32::new(0));
        let (h, p) = (healthy.clone(), probes.clone());
        let probe: Probe = Arc::new(move |_| {
            let ok = h.load(Ordering::SeqCst);
            p.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if ok {
                    Ok(())
                } else {
                    Err("HTTP 503".into())
                }
            })
        });
        let config = HealthCheckConfig {
            enabled: true,
            interval: Duration::from_secs(2),
            fastinter: Some(Duration::from_millis(500)),
            downinter: Some(Duration::from_secs(5)),
            jitter: Ratio::ZERO,
            ..Default::default()
        };
        let checker = HealthChecker::with_probe(w, config, Shutdown::new(), probe);
        let map = checker.health();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(map.load().is_empty());
        healthy.store(false, Ordering::SeqCst);
        // First failure within `interval`, then two more at `fastinter`: down after ~3s.
        tokio::time::sleep(Duration::from_millis(2000 + 500 + 500 + 100)).await;
        let m = map.get();
        let h = m.get(&inst.id).expect("down after fall = 3");
        assert_eq!(h.status, HealthStatus::Down);
        assert_eq!(h.source, HealthSource::Active);
        assert!(h.reason.as_deref().unwrap().contains("HTTP 503"));
        // While down, probes are `downinter` apart.
        let before = probes.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(probes.load(Ordering::SeqCst) - before, 2);
        healthy.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(5000 + 500 + 100)).await;
        assert!(map.load().is_empty(), "up after rise = 2");
        // An instance that leaves the set leaves the map.
        healthy.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(map.load().len(), 1);
        set.store(vec![]);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(map.load().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_that_moves_to_a_healthy_address_is_up_again() {
        let svc = ServiceName::new("svc").unwrap();
        let old = Instance::new(svc.clone(), "127.0.0.1:1".parse().unwrap()).with_id("a");
        let set = Live::new(vec![old.clone()]);
        let (_tx, rx) = watch::channel(true);
        let w = InstanceWatch::new(svc.clone(), set.clone(), rx);
        // The old address fails, the new one passes.
        let checker =
            HealthChecker::with_probe(w, every_second(), Shutdown::new(), failing_up_to(1));
        let map = checker.health();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(map.load().contains_key(&old.id), "down at the old address");
        // Same id, new address (a restarted pod with a new IP).
        let mut moved = old.clone();
        moved.addr = "127.0.0.1:2".parse().unwrap();
        set.store(vec![moved]);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(
            map.load().is_empty(),
            "the new address passes every check, yet the instance is still down: {:?}",
            map.load()
        );
    }

    /// A probe that fails for ports up to `last` and passes for every other.
    fn failing_up_to(last: u16) -> Probe {
        Arc::new(move |i: Instance| {
            Box::pin(async move {
                if i.addr.port() <= last {
                    Err("refused".to_owned())
                } else {
                    Ok(())
                }
            })
        })
    }

    /// Checks every second, one failure to go down and one pass to come back.
    fn every_second() -> HealthCheckConfig {
        HealthCheckConfig {
            enabled: true,
            interval: Duration::from_secs(1),
            fall: 1,
            rise: 1,
            jitter: Ratio::ZERO,
            ..Default::default()
        }
    }

    /// The `keel_discovery_instance_down` value of `id` in a Prometheus rendering.
    fn down_gauge(rendered: &str, id: &str) -> Option<f64> {
        rendered
            .lines()
            .find(|l| {
                l.starts_with(telemetry::INSTANCE_DOWN) && l.contains(&format!("instance=\"{id}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[tokio::test(start_paused = true)]
    async fn the_down_gauge_is_cleared_when_a_down_instance_leaves_or_moves() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // A current-thread runtime: the checks run on this thread, under this recorder.
        let _guard = metrics::set_default_local_recorder(&recorder);
        let svc = ServiceName::new("svc").unwrap();
        let leaves = Instance::new(svc.clone(), "127.0.0.1:1".parse().unwrap()).with_id("leaves");
        let moves = Instance::new(svc.clone(), "127.0.0.1:2".parse().unwrap()).with_id("moves");
        let set = Live::new(vec![leaves.clone(), moves.clone()]);
        let (_tx, rx) = watch::channel(true);
        let w = InstanceWatch::new(svc, set.clone(), rx);
        let checker =
            HealthChecker::with_probe(w, every_second(), Shutdown::new(), failing_up_to(2));
        let map = checker.health();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(map.load().len(), 2, "both down");
        let r = handle.render();
        assert_eq!(down_gauge(&r, "leaves"), Some(1.0), "{r}");
        assert_eq!(down_gauge(&r, "moves"), Some(1.0), "{r}");
        // One leaves the set, the other moves to an address that passes.
        let mut moved = moves.clone();
        moved.addr = "127.0.0.1:3".parse().unwrap();
        set.store(vec![moved]);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(map.load().is_empty(), "{:?}", map.load());
        let r = handle.render();
        assert_eq!(down_gauge(&r, "leaves"), Some(0.0), "left while down: {r}");
        assert_eq!(down_gauge(&r, "moves"), Some(0.0), "moved while down: {r}");
    }
}
