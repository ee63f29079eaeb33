//! Real-time push over WebSocket, balanced by `least-conn`.
//!
//!     cargo run --example push
//!
//! Three push servers hold long-lived WebSocket connections. Subscribers pick a server with
//! keel's balancer (`strategy = "least-conn"`, counting open connections), hold the pick for as
//! long as the connection lives, and reconnect when `max_connection_age` says so — which is how
//! load moves onto an instance that joins later. An instance that leaves is drained: its
//! subscribers reconnect elsewhere.
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    extract::{ws::Message, State, WebSocketUpgrade},
    response::IntoResponse,
    routing::get,
    Router,
};
use futures::StreamExt;
use keel::{
    keel_balance::{BalanceConfig, Balancer, RequestInfo, Strategy},
    keel_core::{Instance, Live, ServiceName},
};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct PushServer {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

async fn push_server(name: &'static str) -> Res<PushServer> {
    #[derive(Clone)]
    struct S {
        name: &'static str,
        open: Arc<AtomicUsize>,
    }
    async fn ws(up: WebSocketUpgrade, State(s): State<S>) -> impl IntoResponse {
        up.on_upgrade(move |mut socket| async move {
            s.open.fetch_add(1, Ordering::SeqCst);
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                if socket.send(Message::Text(s.name.into())).await.is_err() {
                    break;
                }
            }
            s.open.fetch_sub(1, Ordering::SeqCst);
        })
    }
    let open = Arc::new(AtomicUsize::new(0));
    let app = Router::new().route("/ws", get(ws)).with_state(S {
        name,
        open: open.clone(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(PushServer { addr, open, task })
}

/// One subscriber: pick, connect, read until the server goes or the connection is too old.
async fn subscriber(balancer: Balancer) {
    loop {
        let Some(picked) = balancer.pick(&RequestInfo::default()) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let url = format!("ws://{}/ws", picked.addr());
        let Ok((mut socket, _)) = tokio_tungstenite::connect_async(&url).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        loop {
            tokio::select! {
                msg = socket.next() => if !matches!(msg, Some(Ok(_))) { break },
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    // Gone from the set (drained), or older than max_connection_age: move on.
                    if picked.should_close() {
                        let _ = socket.close(None).await;
                        break;
                    }
                }
            }
        }
        drop(picked);
    }
}

fn counts(servers: &[(&str, &PushServer)]) -> String {
    servers
        .iter()
        .map(|(n, s)| format!("{n}: {:2}", s.open.load(Ordering::SeqCst)))
        .collect::<Vec<_>>()
        .join("   ")
}

#[tokio::main]
async fn main() -> Res<()> {
    let service = ServiceName::new("push")?;
    let (a, b, c) = (
        push_server("push-a").await?,
        push_server("push-b").await?,
        push_server("push-c").await?,
    );
    let instance = |s: &PushServer| Instance::new(service.clone(), s.addr);
    let instances = Live::new(vec![instance(&a), instance(&b), instance(&c)]);
    let config = Live::new(BalanceConfig {
        strategy: Strategy::LeastConn,
        max_connection_age: Some(Duration::from_secs(2)),
        ..BalanceConfig::default()
    });
    let balancer = Balancer::new(service.clone(), instances.clone(), config)?;

    println!("30 subscribers connect through least-conn (max_connection_age 2s):");
    let subs: Vec<_> = (0..30)
        .map(|_| tokio::spawn(subscriber(balancer.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    println!(
        "  {}",
        counts(&[("push-a", &a), ("push-b", &b), ("push-c", &c)])
    );

    let d = push_server("push-d").await?;
    instances.store(vec![instance(&a), instance(&b), instance(&c), instance(&d)]);
    println!("\npush-d joins; connections age out and rebalance onto it:");
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        println!(
            "  {}",
            counts(&[
                ("push-a", &a),
                ("push-b", &b),
                ("push-c", &c),
                ("push-d", &d)
            ])
        );
    }

    instances.store(vec![instance(&a), instance(&c), instance(&d)]);
    println!("\npush-b leaves (drained): its subscribers reconnect elsewhere:");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    println!(
        "  {}",
        counts(&[
            ("push-a", &a),
            ("push-b", &b),
            ("push-c", &c),
            ("push-d", &d)
        ])
    );

    for s in subs {
        s.abort();
    }
    for s in [a, b, c, d] {
        s.task.abort();
    }
    Ok(())
}
