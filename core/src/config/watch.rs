use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{RecursiveMode, Watcher};
use tokio::{sync::mpsc, task::JoinHandle, time};

use super::Config;
use crate::{ConfigError, Shutdown};

/// How a [`ConfigWatcher`] watches.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WatchOptions {
    /// Quiet time after the last file event before reloading, so that a burst of events from one
    /// save (truncate, write, chmod, rename) causes one reload. Default 20 ms.
    pub debounce: Duration,
    /// How often to re-read the files even without events, a backstop for filesystems that do not
    /// report changes (network mounts, some container overlays). Default 2 s.
    pub poll_interval: Duration,
    /// How long a file may stay missing or empty before that is believed (editors and
    /// Kubernetes briefly leave a file absent or empty mid-replace). Default 500 ms.
    pub settle: Duration,
    /// Reload files and environment on SIGHUP. Default true.
    pub sighup: bool,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(20),
            poll_interval: Duration::from_secs(2),
            settle: Duration::from_millis(500),
            sighup: true,
        }
    }
}

/// Keeps a [`Config`] in step with its files, and with the environment on SIGHUP.
///
/// It watches each file's **parent directory**, not the file: editors that write a temp file and
/// rename it over the original, tools that delete and recreate, and Kubernetes, which swaps a
/// `..data` symlink inside the mounted directory, all replace the inode a file watch would be
/// holding. Any event in the directory that may change a file (debounced; not opens and reads,
/// which its own re-reads raise) leads to a re-read; the contents are compared with what was
/// last applied, so unrelated events cost one read. A poll re-reads as a backstop.
/// A file seen missing or empty is given `settle` time to come back before the reload is tried
/// (and then refused with the reason, keeping the last good document).
///
/// The task ends on [`Shutdown`] or when the watcher is dropped.
#[derive(Debug)]
pub struct ConfigWatcher {
    task: Option<JoinHandle<()>>,
}

impl Drop for ConfigWatcher {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl ConfigWatcher {
    /// Starts watching. Must be called inside a tokio runtime.
    pub fn spawn(
        config: Config,
        options: WatchOptions,
        shutdown: Shutdown,
    ) -> Result<Self, ConfigError> {
        let (tx, rx) = mpsc::unbounded_channel::<()>();
        let dirs: BTreeSet<PathBuf> = config.files().iter().map(|f| parent_dir(f)).collect();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| file_event_may_change(&e)) {
                    let _ = tx.send(());
                }
            })?;
        for dir in &dirs {
            if let Err(error) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), %error, "cannot watch config directory; polling only");
            }
        }
        #[cfg(unix)]
        let hup = if options.sighup {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(s) => Some(s),
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGHUP");
                    None
                }
            }
        } else {
            None
        };
        #[cfg(not(unix))]
        let hup: Option<()> = None;
        let task = tokio::spawn(run(config, options, shutdown, watcher, rx, hup));
        Ok(Self { task: Some(task) })
    }

    /// Stops watching.
    pub fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Whether a file event may have changed what a file holds: anything but opening, reading and
/// closing without writing. A watcher that re-reads a file on events must skip those, as its
/// own reads raise them: reacting would re-read the file forever, one debounce apart.
#[doc(hidden)]
pub fn file_event_may_change(event: &notify::Event) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

fn parent_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

#[cfg(unix)]
type Hup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hup = Option<()>;

async fn next_hup(hup: &mut Hup) {
    #[cfg(unix)]
    if let Some(s) = hup {
        if s.recv().await.is_some() {
            return;
        }
    }
    std::future::pending::<()>().await;
}

async fn run(
    config: Config,
    options: WatchOptions,
    shutdown: Shutdown,
    _watcher: notify::RecommendedWatcher,
    mut events: mpsc::UnboundedReceiver<()>,
    mut hup: Hup,
) {
    let mut poll = time::interval(options.poll_interval.max(Duration::from_millis(10)));
    poll.set_missed_tick_behavior(time::MissedTickBehavior::Delay);
    poll.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.triggered() => return,
            event = events.recv() => {
                if event.is_none() {
                    return;
                }
                // Debounce: wait until the directory has been quiet for `debounce`.
                loop {
                    tokio::select! {
                        _ = time::sleep(options.debounce) => break,
                        more = events.recv() => if more.is_none() { return },
                    }
                }
                settle(&config, &options).await;
                let _ = config.reload_if_changed();
            }
            _ = poll.tick() => {
                settle(&config, &options).await;
                let _ = config.reload_if_changed();
            }
            _ = next_hup(&mut hup) => {
                tracing::info!("SIGHUP: reloading configuration files and environment");
                let _ = config.reload();
            }
        }
    }
}

/// Waits (up to `settle`) while any file is missing or empty: mid-replace states.
async fn settle(config: &Config, options: &WatchOptions) {
    // `None`: a settle time too long to add to the clock, which never runs out.
    let deadline = time::Instant::now().checked_add(options.settle);
    loop {
        let transient = config.files().iter().any(|f| match std::fs::metadata(f) {
            Ok(m) => m.len() == 0,
            Err(_) => true,
        });
        if !transient || deadline.is_some_and(|d| time::Instant::now() >= d) {
            return;
        }
        time::sleep(Duration::from_millis(10)).await;
    }
}
