//! The Redis store writes the commands of concurrent requests as one pipeline. Its own test
//! binary: it installs a global metrics recorder to read the pipeline sizes.
#![cfg(feature = "redis")]

use std::{sync::Arc, time::Duration};

use keel_idempotency::{Claim, IdempotencyStore, RedisStore};
use keel_testkit::RedisServer;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

// One worker: a task woken by another runs next on it (tokio's LIFO slot), so without the pump
// gathering them, the connection's writer would wake after every single command and send it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_burst_of_claims_goes_out_in_a_few_writes() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let server = RedisServer::start();
    let store = Arc::new(RedisStore::open(&server.url(), "p:").await.unwrap());
    // Loading the scripts was the first write: read (and so cleared) here.
    let _ = snapshotter.snapshot();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .claim(&format!("k{i}"), "o", "f", Duration::from_secs(5))
                    .await
            })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert!(matches!(r, Ok(Claim::New { .. })), "{r:?}");
    }
    let sizes: Vec<f64> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, ..)| k.key().name() == "keel_idempotency_store_pipeline_commands")
        .flat_map(|(.., v)| match v {
            DebugValue::Histogram(v) => v.into_iter().map(|x| x.into_inner()).collect(),
            _ => Vec::new(),
        })
        .collect();
    let commands: f64 = sizes.iter().sum();
    assert_eq!(commands, 200.0, "every claim counted once: {sizes:?}");
    assert!(
        sizes.len() <= 20,
        "200 concurrent claims took {} writes: {sizes:?}",
        sizes.len()
    );
}
