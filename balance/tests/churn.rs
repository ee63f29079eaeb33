//! Eight threads pick while instances come and go: no panic, and never an instance after the
//! `store` that removed it has returned.

mod common;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use common::*;
use keel_balance::{Outcome, RequestInfo, Strategy};

#[test]
fn eight_pickers_while_instances_churn() {
    for strategy in [
        Strategy::P2cEwma,
        Strategy::RoundRobin,
        Strategy::Maglev,
        Strategy::LeastConn,
    ] {
        let mut conf = cfg(strategy);
        // A small table: this test rebuilds it 300 times in a debug build.
        conf.maglev_table_size = 1_009;
        let (b, live, _) = balancer(weighted(&[1, 1, 1, 1]), conf);
        // id -> the version whose store removed it. Ids are never reused.
        let removed: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let published = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let pickers: Vec<_> = (0..8)
            .map(|t| {
                let (b, removed, published, stop) =
                    (b.clone(), removed.clone(), published.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut picks = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let seen = published.load(Ordering::Acquire);
                        let key = picks.wrapping_mul(31).wrapping_add(t);
                        if let Some(p) = b.pick(&RequestInfo::default().with_hash_key(key)) {
                            if let Some(&r) = removed.lock().unwrap().get(p.id().as_str()) {
                                assert!(
                                    r > seen,
                                    "{} picked at version {seen}, removed at {r}",
                                    p.id()
                                );
                            }
                            p.complete_with(Outcome::Success, Duration::from_micros(picks % 500));
                        }
                        picks += 1;
                    }
                    picks
                })
            })
            .collect();
        let mut current = weighted(&[1, 1, 1, 1]);
        for v in 1..=300u64 {
            // Remove the oldest, add a new one (every few rounds remove two or add two).
            let mut next = current.clone();
            let gone: Vec<_> = if v % 7 == 0 && next.len() > 2 {
                next.drain(..2).collect()
            } else {
                next.drain(..1).collect()
            };
            for k in 0..(if v % 5 == 0 { 2 } else { 1 }) {
                next.push(inst(
                    &format!("v{v}-{k}"),
                    30_000 + (v as u16 % 1000) * 2 + k,
                    1 + (v % 3) as u32,
                ));
            }
            {
                let mut r = removed.lock().unwrap();
                for g in &gone {
                    r.insert(g.id.to_string(), v);
                }
            }
            live.store(next.clone());
            published.store(v, Ordering::Release);
            current = next;
            std::thread::sleep(Duration::from_micros(300));
        }
        stop.store(true, Ordering::Relaxed);
        let total: u64 = pickers.into_iter().map(|p| p.join().unwrap()).sum();
        assert!(total > 1_000, "{strategy:?}: only {total} picks");
        let snap = b.snapshot();
        assert_eq!(snap.instances.len(), current.len());
        assert!(snap.instances.iter().all(|i| i.in_flight == 0));
    }
}

/// A per-instance service that counts how many of its kind are alive.
#[derive(Clone)]
struct Counted {
    id: String,
    _alive: Arc<AliveToken>,
}

struct AliveToken(Arc<AtomicU64>);

impl Drop for AliveToken {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl tower::Service<http::Request<()>> for Counted {
    type Response = http::Response<String>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<http::Response<String>, std::convert::Infallible>>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: http::Request<()>) -> Self::Future {
        std::future::ready(Ok(http::Response::new(self.id.clone())))
    }
}

/// Four tasks call through one `Balance` while instances come and go: each instance's service is
/// made once, and the services of instances that left are dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_instance_services_follow_the_instance_set() {
    use tower::ServiceExt;
    let (b, live, _) = balancer(weighted(&[1, 1, 1]), cfg(Strategy::RoundRobin));
    let made = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let alive = Arc::new(AtomicU64::new(0));
    let factory = {
        let (made, alive) = (made.clone(), alive.clone());
        move |i: &keel_core::Instance| {
            *made.lock().unwrap().entry(i.id.to_string()).or_default() += 1;
            alive.fetch_add(1, Ordering::SeqCst);
            Counted {
                id: i.id.to_string(),
                _alive: Arc::new(AliveToken(alive.clone())),
            }
        }
    };
    let svc = keel_balance::Balance::new(b.clone(), factory);
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (svc, stop) = (svc.clone(), stop.clone());
            tokio::spawn(async move {
                let mut ok = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if svc.clone().oneshot(http::Request::new(())).await.is_ok() {
                        ok += 1;
                    }
                    tokio::task::yield_now().await;
                }
                ok
            })
        })
        .collect();
    let mut current = weighted(&[1, 1, 1]);
    for v in 0..100u16 {
        current.remove(0);
        current.push(inst(&format!("n{v}"), 40_000 + v, 1));
        live.store(current.clone());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut calls = 0;
    for c in callers {
        calls += c.await.unwrap();
    }
    assert!(calls > 100, "only {calls} calls");
    // One more call syncs the services with the final set.
    svc.clone().oneshot(http::Request::new(())).await.unwrap();
    let made = made.lock().unwrap();
    assert!(
        made.values().all(|&n| n == 1),
        "a service made twice: {made:?}"
    );
    assert_eq!(alive.load(Ordering::SeqCst), current.len() as u64);
}
