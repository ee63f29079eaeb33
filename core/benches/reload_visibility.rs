//! Reload visibility: a new file renamed into place → the new value visible to a reader, over
//! 100 reloads through the real watcher (inotify, debounce, parse, validate, publish).
//!
//! cargo bench -p keel-core --bench reload_visibility

use std::time::{Duration, Instant};

use keel_core::{
    config::{ConfigLoader, EnvMap, WatchOptions},
    ConfigWatcher, Shutdown,
};
use serde::Deserialize;

#[derive(Debug, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct App {
    level: u64,
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keel.toml");
    std::fs::write(&path, "[app]\nlevel = 0\n").expect("write");
    let mut loader = ConfigLoader::new()
        .with_env_map(EnvMap::new())
        .with_file(&path);
    loader.register::<App>("app").expect("register");
    let config = loader.load().expect("load");
    let app = config.section::<App>("app").expect("section");
    let shutdown = Shutdown::new();
    let options = WatchOptions::default();
    let debounce = options.debounce;
    let _w = ConfigWatcher::spawn(config.clone(), options, shutdown.clone()).expect("watch");
    let mut samples = Vec::with_capacity(100);
    for level in 1..=100u64 {
        let tmp = dir.path().join(".keel.toml.tmp");
        std::fs::write(&tmp, format!("[app]\nlevel = {level}\n")).expect("write");
        let start = Instant::now();
        std::fs::rename(&tmp, &path).expect("rename");
        while app.load().level != level {
            tokio::time::sleep(Duration::from_micros(200)).await;
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "reload never seen"
            );
        }
        samples.push(start.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p).ceil() as usize).saturating_sub(1)];
    println!(
        "reload visibility over {} renames (debounce {:?}): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        samples.len(),
        debounce,
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.90).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3,
    );
    shutdown.trigger();
}
