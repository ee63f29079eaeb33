//! The adapter over tower's `Discover`.

mod common;

use std::{convert::Infallible, net::SocketAddr};

use common::*;
use keel_balance::{from_discover, Balance, BalanceConfig, Balancer};
use keel_core::{request::ServedBy, Instance, Live};
use tower::{discover::Change, Service, ServiceExt};

#[tokio::test]
async fn balances_over_a_tower_discover_stream() {
    let (tx, rx) =
        tokio::sync::mpsc::unbounded_channel::<Result<Change<SocketAddr, _>, Infallible>>();
    let echo = |n: &'static str| {
        tower::service_fn(move |_req: http::Request<()>| async move {
            Ok::<_, Infallible>(http::Response::new(n))
        })
    };
    let a: SocketAddr = "127.0.0.1:1001".parse().unwrap();
    let b: SocketAddr = "127.0.0.1:1002".parse().unwrap();
    tx.send(Ok(Change::Insert(a, echo("a")))).unwrap();
    tx.send(Ok(Change::Insert(b, echo("b")))).unwrap();
    let stream = tokio_stream_like(rx);
    let (live, services, drive) =
        from_discover(stream, |addr: &SocketAddr, _| Instance::new(svc(), *addr));
    let task = tokio::spawn(drive);
    while live.load().len() < 2 {
        tokio::task::yield_now().await;
    }
    let config = BalanceConfig {
        strategy: keel_balance::Strategy::RoundRobin,
        ..BalanceConfig::default()
    };
    let balancer = Balancer::new(svc(), live.clone(), Live::new(config)).unwrap();
    let mut s = Balance::new(balancer, services);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..50 {
        let res = s
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await
            .unwrap();
        assert!(res.extensions().get::<ServedBy>().is_some());
        seen.insert(*res.body());
    }
    assert_eq!(seen.len(), 2);
    tx.send(Ok(Change::Remove(a))).unwrap();
    while live.load().len() > 1 {
        tokio::task::yield_now().await;
    }
    for _ in 0..20 {
        let res = s
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await
            .unwrap();
        assert_eq!(*res.body(), "b");
    }
    // Each pick is recorded in the request's Tried log (for hedges).
    let tried = keel_core::request::Tried::new();
    let mut req = http::Request::new(());
    req.extensions_mut().insert(tried.clone());
    let res = s.ready().await.unwrap().call(req).await.unwrap();
    let served = res.extensions().get::<ServedBy>().unwrap().id.clone();
    assert_eq!(tried.snapshot(), vec![served]);
    drop(tx);
    task.await.unwrap().unwrap();
}

/// A burst of changes already waiting is published as one new instance set, not one per change.
#[tokio::test]
async fn a_burst_of_changes_is_one_update() {
    let (tx, rx) =
        tokio::sync::mpsc::unbounded_channel::<Result<Change<SocketAddr, _>, Infallible>>();
    let echo = tower::service_fn(|_req: http::Request<()>| async {
        Ok::<_, Infallible>(http::Response::new(()))
    });
    for port in 0..500u16 {
        let addr = SocketAddr::from(([127, 0, 0, 1], 20_000 + port));
        tx.send(Ok(Change::Insert(addr, echo))).unwrap();
    }
    for port in 0..100u16 {
        let addr = SocketAddr::from(([127, 0, 0, 1], 20_000 + port));
        tx.send(Ok(Change::Remove(addr))).unwrap();
    }
    let (live, _services, drive) = from_discover(tokio_stream_like(rx), |addr: &SocketAddr, _| {
        Instance::new(svc(), *addr)
    });
    let before = live.generation();
    drop(tx);
    drive.await.unwrap();
    assert_eq!(live.load().len(), 400);
    // 600 changes, a handful of new sets: a batch ends only when the stream says Pending (tokio's
    // cooperative budget makes a channel say so every 128 receives).
    let stores = live.generation() - before;
    assert!(stores <= 6, "{stores} stores for 600 changes");
}

/// The instance's service is called later, from the balancer's future, yet inside the attempt's
/// end that a per-try timeout set around `Balance::call` (its transport sends the time left).
#[tokio::test]
async fn the_instance_is_called_inside_the_attempt_end_set_around_the_balancer() {
    let (tx, rx) =
        tokio::sync::mpsc::unbounded_channel::<Result<Change<SocketAddr, _>, Infallible>>();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let probe = tower::service_fn(move |_req: http::Request<()>| {
        s2.lock().unwrap().push(keel_core::request::attempt_end());
        std::future::ready(Ok::<_, Infallible>(http::Response::new(())))
    });
    tx.send(Ok(Change::Insert("127.0.0.1:1003".parse().unwrap(), probe)))
        .unwrap();
    let (live, services, drive) = from_discover(tokio_stream_like(rx), |addr: &SocketAddr, _| {
        Instance::new(svc(), *addr)
    });
    let task = tokio::spawn(drive);
    while live.load().is_empty() {
        tokio::task::yield_now().await;
    }
    let balancer = Balancer::new(svc(), live, Live::new(BalanceConfig::default())).unwrap();
    let mut s = Balance::new(balancer, services);
    let end = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    s.ready().await.unwrap();
    let fut = keel_core::request::with_attempt_end(Some(end), || s.call(http::Request::new(())));
    assert_eq!(
        keel_core::request::attempt_end(),
        None,
        "the scope ended with call"
    );
    assert!(seen.lock().unwrap().is_empty(), "not called yet");
    fut.await.unwrap();
    // Without a bound around the call, none reaches the instance.
    s.ready()
        .await
        .unwrap()
        .call(http::Request::new(()))
        .await
        .unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![Some(end), None]);
    drop(tx);
    task.await.unwrap().unwrap();
}

/// An mpsc receiver as a `Stream` (tower's `Discover` is any `TryStream` of `Change`s).
fn tokio_stream_like<T>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures_util::stream::Stream<Item = T> + Unpin {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
