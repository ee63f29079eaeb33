//! etcd backend against a private etcd 3.4 on free ports.
#![cfg(feature = "etcd")]

mod common;

use std::time::Duration;

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use common::*;
use keel_core::{AdminState, Shutdown};
use keel_discovery::{Backend, Discover, DiscoveryConfig, EtcdDiscovery, Registry};
use keel_testkit::EtcdServer;
use serde_json::{json, Value};

fn config(endpoint: String, prefix: &str) -> DiscoveryConfig {
    DiscoveryConfig {
        backend: Backend::Etcd,
        url: Some(endpoint),
        prefix: prefix.into(),
        ttl: Duration::from_secs(2),
        ..Default::default()
    }
}

const LIMIT: Duration = Duration::from_secs(15);

async fn post(endpoint: &str, path: &str, body: Value) -> Value {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{endpoint}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn lifecycle_key_layout_expiry_and_malformed_records() {
    let etcd = EtcdServer::start();
    let ep = etcd.endpoint();
    let cfg = config(ep.clone(), "svcs");
    let watcher_side = EtcdDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    let registry_side = EtcdDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    let s = svc("orders");
    let w = watcher_side.watch(&s).unwrap();
    w.ready().await;

    // Register in another task; seen by the watcher.
    let s2 = s.clone();
    let r2 = registry_side.clone();
    let a = tokio::spawn(async move { r2.register(inst(&s2, 9601)).await.unwrap() })
        .await
        .unwrap();
    wait_len(&w, 1, LIMIT).await;

    // The stored value follows Go's naming/endpoints layout.
    let key = "svcs/orders/127.0.0.1:9601";
    let got = post(&ep, "/v3/kv/range", json!({"key": B64.encode(key)})).await;
    let value = B64
        .decode(got["kvs"][0]["value"].as_str().unwrap())
        .unwrap();
    let rec: Value = serde_json::from_slice(&value).unwrap();
    assert_eq!(rec["Op"], 0);
    assert_eq!(rec["Addr"], "127.0.0.1:9601");
    assert_eq!(rec["Metadata"]["weight"], 1);

    // A record written by a Go endpoints manager is understood; garbage is skipped.
    let put = |k: &str, v: &str| {
        post(
            &ep,
            "/v3/kv/put",
            json!({"key": B64.encode(k), "value": B64.encode(v)}),
        )
    };
    put(
        "svcs/orders/127.0.0.1:9602",
        r#"{"Op":0,"Addr":"127.0.0.1:9602","Metadata":null}"#,
    )
    .await;
    put("svcs/orders/garbage", "{{{").await;
    put("svcs/orders/host", r#"{"Op":0,"Addr":"db.internal:5432"}"#).await;
    wait_len(&w, 2, LIMIT).await;
    post(
        &ep,
        "/v3/kv/deleterange",
        json!({"key": B64.encode("svcs/orders/127.0.0.1:9602")}),
    )
    .await;
    wait_len(&w, 1, LIMIT).await;

    // Drain is visible.
    a.drain().await.unwrap();
    let w2 = w.clone();
    eventually(LIMIT, "draining visible", move || {
        let s = w2.snapshot();
        async move { s.first().is_some_and(|i| i.state == AdminState::Draining) }
    })
    .await;

    // A second instance whose heartbeats stop is removed when its lease expires.
    let b = registry_side.register(inst(&s, 9603)).await.unwrap();
    wait_len(&w, 2, LIMIT).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(w.snapshot().len(), 2, "keepalives hold the lease");
    drop(b);
    wait_len(&w, 1, LIMIT).await;
    assert_eq!(ports(&w), vec![9601]);

    // Deregister removes the last one (believed once it persists).
    a.deregister().await.unwrap();
    wait_len(&w, 0, LIMIT).await;
}

#[tokio::test]
async fn after_an_etcd_restart_and_a_compaction_watchers_reread_and_leases_come_back() {
    let mut etcd = EtcdServer::start();
    let ep = etcd.endpoint();
    let cfg = config(ep.clone(), "keel");
    let d = EtcdDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    let s = svc("ledger");
    let w = d.watch(&s).unwrap();
    let _a = d.register(inst(&s, 9701)).await.unwrap();
    wait_len(&w, 1, LIMIT).await;

    etcd.stop();
    // While the watcher is cut off, a lot happens: the lease expires (stopped long enough) and
    // the history the watcher would resume from is compacted away.
    tokio::time::sleep(Duration::from_millis(500)).await;
    etcd.restart();
    for p in 9702..9705 {
        let k = format!("keel/ledger/127.0.0.1:{p}");
        let v = format!(r#"{{"Op":0,"Addr":"127.0.0.1:{p}"}}"#);
        post(
            &ep,
            "/v3/kv/put",
            json!({"key": B64.encode(k), "value": B64.encode(v)}),
        )
        .await;
    }
    let rev = post(&ep, "/v3/kv/range", json!({"key": B64.encode("x")})).await["header"]
        ["revision"]
        .as_str()
        .unwrap()
        .to_owned();
    post(&ep, "/v3/kv/compaction", json!({"revision": rev})).await;
    wait_len(&w, 4, LIMIT).await;
    assert_eq!(ports(&w), vec![9701, 9702, 9703, 9704]);

    // The lease is lost (revoked behind our back): the heartbeat notices and registers again.
    let key = "keel/ledger/127.0.0.1:9701";
    let got = post(&ep, "/v3/kv/range", json!({"key": B64.encode(key)})).await;
    let lease = got["kvs"][0]["lease"].as_str().unwrap().to_owned();
    post(&ep, "/v3/lease/revoke", json!({"ID": &lease})).await;
    let ep2 = ep.clone();
    eventually(LIMIT, "record written again under a new lease", move || {
        let ep = ep2.clone();
        let lease = lease.clone();
        async move {
            let got = post(&ep, "/v3/kv/range", json!({"key": B64.encode(key)})).await;
            got["kvs"][0]["lease"].as_str().is_some_and(|l| l != lease)
        }
    })
    .await;
    wait_len(&w, 4, LIMIT).await;
}

#[tokio::test]
async fn deregistering_a_replaced_process_leaves_its_successors_record() {
    let etcd = EtcdServer::start();
    let ep = etcd.endpoint();
    let cfg = config(ep.clone(), "handover");
    // The old process and its replacement at the same address (a restart in place).
    let old_side = EtcdDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    let new_side = EtcdDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    let s = svc("billing");
    let w = new_side.watch(&s).unwrap();
    let old = old_side.register(inst(&s, 9801)).await.unwrap();
    wait_len(&w, 1, LIMIT).await;
    let _new = new_side.register(inst(&s, 9801)).await.unwrap();
    // The old one shuts down after its replacement took over.
    old.deregister().await.unwrap();
    let key = "handover/billing/127.0.0.1:9801";
    let got = post(&ep, "/v3/kv/range", json!({"key": B64.encode(key)})).await;
    assert_eq!(
        got["count"].as_str(),
        Some("1"),
        "the successor's record was deleted by the old process: {got}"
    );
    // And its keepalives keep it there.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = post(&ep, "/v3/kv/range", json!({"key": B64.encode(key)})).await;
    assert_eq!(got["count"].as_str(), Some("1"), "{got}");
    assert_eq!(ports(&w), vec![9801]);
}
