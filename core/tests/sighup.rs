//! SIGHUP reloads files and the environment. In its own test binary: the signal goes to the
//! whole process.

use std::time::Duration;

use keel_core::{
    config::{ConfigLoader, EnvMap, WatchOptions},
    ConfigWatcher, Shutdown,
};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct App {
    level: u32,
    name: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_files_and_env() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.toml");
    std::fs::write(&path, "[app]\nlevel = 1\n").unwrap();
    let env = EnvMap::new();
    let mut loader = ConfigLoader::new()
        .with_env_map(env.clone())
        .with_file(&path);
    loader.register::<App>("app").unwrap();
    let config = loader.load().unwrap();
    let app = config.section::<App>("app").unwrap();
    let mut options = WatchOptions::default();
    // Neither file events nor polling may explain the change: only the signal.
    options.poll_interval = Duration::from_secs(3600);
    let shutdown = Shutdown::new();
    let _w = ConfigWatcher::spawn(config.clone(), options, shutdown.clone()).unwrap();
    env.set("KEEL__APP__NAME", "from-env");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(app.load().name, "");
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.load().name != "from-env" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP did not reload"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(app.load().level, 1);
    assert_eq!(config.generation(), 2);
    shutdown.trigger();
}
