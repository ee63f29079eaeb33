//! SIGHUP reloads a service configured by the environment alone (no file). In its own test
//! binary: the signal goes to the whole process.

use std::time::Duration;

use keel::{
    keel_core::{config::EnvMap, Shutdown},
    Keel,
};
use serde::Deserialize;

#[derive(Debug, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct Shop {
    discount_percent: u32,
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_an_env_only_configuration() {
    let env = EnvMap::new();
    env.set("KEEL__SHOP__DISCOUNT_PERCENT", "5");
    let shutdown = Shutdown::new();
    let keel = Keel::builder("env-only")
        .env_map(env.clone())
        .shutdown(shutdown.clone())
        .settings::<Shop>("shop")
        .build()
        .await
        .unwrap();
    let shop = keel.settings::<Shop>("shop").unwrap();
    assert_eq!(shop.load().discount_percent, 5);
    env.set("KEEL__SHOP__DISCOUNT_PERCENT", "7");
    // Without a SIGHUP handler, the signal's default action ends the process here.
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while shop.load().discount_percent != 7 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP did not reload"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shutdown.trigger();
}
