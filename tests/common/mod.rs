//! Helpers shared by the facade's integration tests.

use std::time::Duration;

use axum::Router;
use keel::Keel;

/// Serves `app` with `keel` on a free loopback port; returns once it is ready.
pub(crate) async fn start(
    keel: &Keel,
    app: Router,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<Result<(), keel::Error>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let k = keel.clone();
    let task = tokio::spawn(async move { k.serve_with_listener(listener, app).await });
    for _ in 0..200 {
        if keel.is_ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(keel.is_ready());
    (addr, task)
}
