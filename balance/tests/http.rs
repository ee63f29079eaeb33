//! The tower service against real HTTP backends on loopback: outlier ejection and re-admission,
//! ServedBy, InstanceFailure, Attempt::avoid, per-instance services made and dropped.

mod common;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use common::*;
use keel_balance::{Balance, BalanceError, Strategy};
use keel_core::{
    request::{Attempt, InstanceFailure, ServedBy},
    HealthStatus, Instance, InstanceId,
};
use keel_testkit::HttpBackend;
use tower::{Service, ServiceExt};

type Client = tower::util::BoxCloneSyncService<
    http::Request<String>,
    http::Response<reqwest::Body>,
    reqwest::Error,
>;

/// A reqwest-based per-instance service: one client (one pool) per instance.
fn reqwest_factory(made: Arc<AtomicUsize>) -> impl Fn(&Instance) -> Client {
    move |i: &Instance| {
        made.fetch_add(1, Ordering::Relaxed);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let addr = i.addr;
        Client::new(tower::service_fn(move |req: http::Request<String>| {
            let client = client.clone();
            async move {
                let url = format!("http://{addr}{}", req.uri().path());
                let res = client
                    .request(req.method().clone(), url)
                    .body(req.into_body())
                    .send()
                    .await?;
                Ok(http::Response::from(res))
            }
        }))
    }
}

async fn get<S>(svc: &mut S) -> Result<http::Response<reqwest::Body>, tower::BoxError>
where
    S: Service<
        http::Request<String>,
        Response = http::Response<reqwest::Body>,
        Error = tower::BoxError,
    >,
{
    svc.ready()
        .await?
        .call(http::Request::get("/work").body(String::new()).unwrap())
        .await
}

fn served_by(r: &http::Response<reqwest::Body>) -> InstanceId {
    r.extensions().get::<ServedBy>().unwrap().id.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_ejection_and_readmission() {
    let backends = [
        HttpBackend::start("b0").await,
        HttpBackend::start("b1").await,
        HttpBackend::start("b2").await,
    ];
    backends[2].set_status(500);
    let instances: Vec<Instance> = backends
        .iter()
        .map(|b| inst(&b.name, b.addr.port(), 1))
        .collect();
    let mut conf = cfg(Strategy::RoundRobin);
    conf.passive.max_fails = 0; // outlier detection alone
    conf.outlier.base_ejection_time = Duration::from_millis(400);
    let (b, _, _) = balancer(instances, conf);
    let made = Arc::new(AtomicUsize::new(0));
    let mut svc = Balance::new(b.clone(), reqwest_factory(made.clone()));
    let mut failures = 0;
    for _ in 0..30 {
        let res = get(&mut svc).await.unwrap();
        if res.status() == 500 {
            assert_eq!(served_by(&res).as_str(), "b2");
            failures += 1;
        }
    }
    assert_eq!(failures, 5, "ejected after 5 consecutive 5xx");
    assert_eq!(made.load(Ordering::Relaxed), 3, "one service per instance");
    let snap = b.snapshot();
    let b2 = snap
        .instances
        .iter()
        .find(|i| i.id.as_str() == "b2")
        .unwrap();
    assert_eq!(b2.health, HealthStatus::Ejected);
    assert_eq!(b2.ejections, 1);
    assert!(
        b2.reason.as_deref().unwrap().contains("consecutive_5xx"),
        "{b2:?}"
    );

    // Recovered and the ejection over: traffic again.
    backends[2].set_status(200);
    tokio::time::sleep(Duration::from_millis(450)).await;
    let before = backends[2].served();
    for _ in 0..12 {
        assert_eq!(get(&mut svc).await.unwrap().status(), 200);
    }
    assert!(backends[2].served() - before >= 3, "re-admitted");
    let snap = b.snapshot();
    assert_eq!(snap.instances[2].health, HealthStatus::Healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_name_the_instance_and_avoid_is_honoured() {
    let up = HttpBackend::start("up").await;
    let gone = HttpBackend::start("gone").await;
    gone.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let instances = vec![
        inst("up", up.addr.port(), 1),
        inst("gone", gone.addr.port(), 1),
    ];
    let mut conf = cfg(Strategy::RoundRobin);
    conf.passive.max_fails = 0;
    let (b, live, _) = balancer(instances.clone(), conf);
    let made = Arc::new(AtomicUsize::new(0));
    let mut svc = Balance::new(b.clone(), reqwest_factory(made.clone()));
    let mut saw_failure = false;
    for _ in 0..4 {
        match get(&mut svc).await {
            Ok(res) => assert_eq!(served_by(&res).as_str(), "up"),
            Err(e) => {
                let f = e
                    .downcast_ref::<InstanceFailure>()
                    .expect("InstanceFailure");
                assert_eq!(f.served_by.addr, gone.addr);
                saw_failure = true;
            }
        }
    }
    assert!(saw_failure);
    // A retry that avoids the failed instance goes elsewhere.
    for _ in 0..10 {
        let mut req = http::Request::get("/").body(String::new()).unwrap();
        req.extensions_mut().insert(Attempt {
            number: 2,
            hedge: false,
            avoid: vec![InstanceId::new("gone")],
        });
        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(served_by(&res).as_str(), "up");
    }
    // No instance: a typed, retryable error.
    live.store(Vec::new());
    let e = get(&mut svc).await.unwrap_err();
    let e = e.downcast_ref::<BalanceError>().unwrap();
    assert!(matches!(e, BalanceError::NoInstance { .. }) && e.is_retryable());
    // Instances coming back get new services; the old ones were dropped.
    live.store(instances[..1].to_vec());
    assert_eq!(get(&mut svc).await.unwrap().status(), 200);
    assert_eq!(made.load(Ordering::Relaxed), 3);
}
