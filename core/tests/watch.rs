//! Hot reload through the file watcher, by every way files get replaced in practice.

use std::{path::Path, time::Duration};

use keel_core::{
    config::{ConfigLoader, EnvMap, WatchOptions},
    Config, ConfigWatcher, Live, Shutdown,
};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct App {
    level: u32,
}

fn options() -> WatchOptions {
    let mut o = WatchOptions::default();
    o.sighup = false;
    o
}

fn start(path: &Path) -> (Config, Live<App>, ConfigWatcher, Shutdown) {
    let mut loader = ConfigLoader::new()
        .with_env_map(EnvMap::new())
        .with_file(path);
    loader
        .register_with::<App>("app", |a| {
            if a.level > 100 {
                Err(format!("level must be at most 100, got {}", a.level))
            } else {
                Ok(())
            }
        })
        .unwrap();
    let config = loader.load().unwrap();
    let app = config.section::<App>("app").unwrap();
    let shutdown = Shutdown::new();
    let watcher = ConfigWatcher::spawn(config.clone(), options(), shutdown.clone()).unwrap();
    (config, app, watcher, shutdown)
}

/// `path` loaded without validation and watched, with a poll every `poll`.
fn polled(path: &Path, poll: Duration) -> (Config, Live<App>, ConfigWatcher, Shutdown) {
    let mut loader = ConfigLoader::new()
        .with_env_map(EnvMap::new())
        .with_file(path);
    loader.register::<App>("app").unwrap();
    let config = loader.load().unwrap();
    let app = config.section::<App>("app").unwrap();
    let mut o = options();
    o.poll_interval = poll;
    let shutdown = Shutdown::new();
    let watcher = ConfigWatcher::spawn(config.clone(), o, shutdown.clone()).unwrap();
    (config, app, watcher, shutdown)
}

async fn wait_level(app: &Live<App>, level: u32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.load().level != level {
        assert!(
            tokio::time::Instant::now() < deadline,
            "level {} never became {level}",
            app.load().level
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn doc(level: u32) -> String {
    format!("[app]\nlevel = {level}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.toml");
    std::fs::write(&path, doc(1)).unwrap();
    let (config, app, _w, _s) = start(&path);
    for level in 2..6 {
        std::fs::write(&path, doc(level)).unwrap();
        wait_level(&app, level).await;
    }
    assert_eq!(config.generation(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_then_write_slowly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.toml");
    std::fs::write(&path, doc(1)).unwrap();
    let (config, app, _w, _s) = start(&path);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&path).unwrap(); // truncates
        tokio::time::sleep(Duration::from_millis(100)).await;
        f.write_all(doc(2).as_bytes()).unwrap();
    }
    wait_level(&app, 2).await;
    // The empty moment was never published as a document of defaults.
    assert_eq!(config.generation(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_temp_and_rename() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.toml");
    std::fs::write(&path, doc(1)).unwrap();
    let (_config, app, _w, _s) = start(&path);
    for level in 2..5 {
        let tmp = dir.path().join(".keel.toml.swp");
        std::fs::write(&tmp, doc(level)).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        wait_level(&app, level).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_recreate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.toml");
    std::fs::write(&path, doc(1)).unwrap();
    let (config, app, _w, _s) = start(&path);
    std::fs::remove_file(&path).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::fs::write(&path, doc(7)).unwrap();
    wait_level(&app, 7).await;
    assert!(config.last_error().is_none());
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_configmap_symlink_swap() {
    // The layout the kubelet writes: dir/keel.toml -> ..data/keel.toml, ..data -> ..<timestamp>;
    // an update writes a new timestamped dir, points ..data_tmp at it and renames it over ..data.
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("..2026_01")).unwrap();
    std::fs::write(d.join("..2026_01/keel.toml"), doc(1)).unwrap();
    symlink("..2026_01", d.join("..data")).unwrap();
    symlink("..data/keel.toml", d.join("keel.toml")).unwrap();
    let (_config, app, _w, _s) = start(&d.join("keel.toml"));
    for (i, level) in [(2, 11), (3, 12)] {
        let ts = format!("..2026_0{i}");
        std::fs::create_dir(d.join(&ts)).unwrap();
        std::fs::write(d.join(&ts).join("keel.toml"), doc(level)).unwrap();
        symlink(&ts, d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        wait_level(&app, level).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_edit_keeps_last_good_and_reports_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.toml");
    std::fs::write(&path, doc(1)).unwrap();
    let (config, app, _w, _s) = start(&path);
    // Broken syntax.
    std::fs::write(&path, "[app\nlevel = 2\n").unwrap();
    wait_error(&config, "keel.toml").await;
    assert_eq!(app.load().level, 1);
    assert_eq!(config.generation(), 1);
    // Valid syntax, but the application section refuses it.
    std::fs::write(&path, doc(500)).unwrap();
    wait_error(&config, "at most 100").await;
    assert_eq!(app.load().level, 1);
    assert_eq!(config.generation(), 1);
    // Fixed.
    std::fs::write(&path, doc(3)).unwrap();
    wait_level(&app, 3).await;
    assert!(config.last_error().is_none());
    assert_eq!(config.generation(), 2);
}

async fn wait_error(config: &Config, needle: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(f) = config.last_error() {
            if f.error.to_string().contains(needle) {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no error mentioning {needle:?}; last: {:?}",
            config.last_error()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_polling_and_events_together_apply_each_change_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.toml");
    std::fs::write(&path, doc(1)).unwrap();
    // Polling and file events both notice the change; the contents digest makes it one reload.
    let (config, app, _w, shutdown) = polled(&path, Duration::from_millis(50));
    std::fs::write(&path, doc(9)).unwrap();
    wait_level(&app, 9).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(config.generation(), 2);
    shutdown.trigger();
}

/// The watcher's own reads raise open and close events in the directory it watches; were those
/// taken for changes, every read would cause the next one, forever. Counted from outside: while
/// nothing changes (and the poll is an hour away), nobody opens the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_the_files_does_not_cause_another_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.toml");
    std::fs::write(&path, doc(1)).unwrap();
    let opens = keel_testkit::FileOpens::watch(dir.path());
    let (_config, app, _w, shutdown) = polled(&path, Duration::from_secs(3600));
    // One real change, so the watcher reads the file at least once.
    std::fs::write(&path, doc(2)).unwrap();
    wait_level(&app, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = opens.during(Duration::from_secs(1)).await;
    assert_eq!(
        during, 0,
        "the file was opened {during} times in a quiet second"
    );
    shutdown.trigger();
}

/// Options meaning "as long as it takes" (`Duration::MAX`: never believe a missing file, poll
/// practically never) must not kill the watcher: it still applies edits it is told about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maximal_options_still_reload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.toml");
    std::fs::write(&path, doc(1)).unwrap();
    let mut loader = ConfigLoader::new()
        .with_env_map(EnvMap::new())
        .with_file(&path);
    loader.register::<App>("app").unwrap();
    let config = loader.load().unwrap();
    let app = config.section::<App>("app").unwrap();
    let mut o = options();
    o.settle = Duration::MAX;
    o.poll_interval = Duration::MAX;
    let shutdown = Shutdown::new();
    let _w = ConfigWatcher::spawn(config.clone(), o, shutdown.clone()).unwrap();
    for level in 2..4 {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, doc(level)).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        wait_level(&app, level).await;
    }
    shutdown.trigger();
}
