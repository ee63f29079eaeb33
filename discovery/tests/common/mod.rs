#![allow(dead_code, unreachable_pub)]

use std::{future::Future, time::Duration};

use keel_core::{Instance, ServiceName};
use keel_discovery::InstanceWatch;

pub fn svc(name: &str) -> ServiceName {
    ServiceName::new(name).unwrap()
}

pub fn inst(service: &ServiceName, port: u16) -> Instance {
    Instance::new(
        service.clone(),
        format!("127.0.0.1:{port}").parse().unwrap(),
    )
}

/// Polls `f` every 20 ms until it is true, or panics after `limit` with `what`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the watched set has `n` instances.
pub async fn wait_len(w: &InstanceWatch, n: usize, limit: Duration) {
    let w2 = w.clone();
    eventually(
        limit,
        &format!("{} instances of {}", n, w.service()),
        move || {
            let len = w2.snapshot().len();
            async move { len == n }
        },
    )
    .await;
}

pub fn ports(w: &InstanceWatch) -> Vec<u16> {
    w.snapshot().iter().map(|i| i.addr.port()).collect()
}
