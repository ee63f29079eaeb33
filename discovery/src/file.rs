//! A file lists the instances of each service, and is watched for changes.
//!
//! ```toml
//! [[payments]]
//! addr = "10.0.0.5:8066"
//! weight = 10
//!
//! [[payments]]
//! addr = "10.0.0.6:8066"
//! backup = true
//! ```
//!
//! (or the same as JSON: `{"payments": [{"addr": "10.0.0.5:8066", "weight": 10}]}`, chosen by a
//! `.json` extension). Each entry takes the keys of a [`StaticEndpoint`].
//!
//! Why not a file watch alone: editors and Kubernetes replace files by rename, which a watch on
//! the file's inode misses, so (as keel-core's config watcher does) the parent directory is
//! watched, events are debounced, contents are compared with the last read, and a poll re-reads
//! as a backstop. A half-written file (truncated, unparsable) keeps the last good set; a bad entry
//! is skipped and counted; a shrink goes through the registry-loss guard.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use keel_core::{Instance, ServiceName, Shutdown};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::{
    publish::{Publisher, SafetyOptions},
    registration::LocalLease,
    static_discovery::to_instances,
    telemetry, BoxFuture, Discover, Discovery, DiscoveryError, InstanceWatch, Registration,
    Registry, StaticEndpoint,
};

/// The parsed file: the instances of each service it names.
pub type FileSets = BTreeMap<ServiceName, Vec<Instance>>;

/// Parses a discovery file (TOML, or JSON when `json`). A bad service name or a bad entry is
/// skipped, logged and counted; only a document that cannot be parsed at all is an error.
pub fn parse_file(text: &str, json: bool) -> Result<FileSets, DiscoveryError> {
    let malformed = |e: &dyn std::fmt::Display| DiscoveryError::malformed("file", "document", e);
    let raw: BTreeMap<String, Vec<serde_json::Value>> = if json {
        serde_json::from_str(text).map_err(|e| malformed(&e))?
    } else {
        let table: toml::Table = toml::from_str(text).map_err(|e| malformed(&e))?;
        let value = serde_json::to_value(table).map_err(|e| malformed(&e))?;
        serde_json::from_value(value).map_err(|e| malformed(&e))?
    };
    let mut out = FileSets::new();
    for (name, entries) in raw {
        let service = match ServiceName::new(&name) {
            Ok(s) => s,
            Err(error) => {
                telemetry::malformed(&name, "file");
                tracing::warn!(service = %name, %error, "skipping a service with a bad name in the discovery file");
                continue;
            }
        };
        let mut endpoints = Vec::with_capacity(entries.len());
        for (n, entry) in entries.into_iter().enumerate() {
            match serde_json::from_value::<StaticEndpoint>(entry) {
                Ok(e) => endpoints.push(e),
                Err(error) => {
                    telemetry::malformed(service.as_str(), "file");
                    tracing::warn!(%service, entry = n, %error, "skipping a malformed entry in the discovery file");
                }
            }
        }
        out.insert(service.clone(), to_instances(&service, &endpoints));
    }
    Ok(out)
}

struct Inner {
    path: PathBuf,
    safety: SafetyOptions,
    publishers: Mutex<BTreeMap<ServiceName, Arc<Publisher>>>,
    last: Mutex<Option<Arc<FileSets>>>,
}

impl Inner {
    fn publishers(&self) -> std::sync::MutexGuard<'_, BTreeMap<ServiceName, Arc<Publisher>>> {
        keel_core::lock(&self.publishers)
    }

    fn last(&self) -> Option<Arc<FileSets>> {
        keel_core::lock(&self.last).clone()
    }

    fn offer_all(&self, sets: &FileSets) {
        for (service, p) in self.publishers().iter() {
            p.offer(sets.get(service).cloned().unwrap_or_default());
        }
    }

    fn fail_all(&self, error: &DiscoveryError) {
        for p in self.publishers().values() {
            p.failed(error);
        }
    }
}

/// Discovery from a watched file.
#[derive(Clone)]
pub struct FileDiscovery {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FileDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileDiscovery")
            .field("path", &self.inner.path)
            .finish()
    }
}

/// How often the file is re-read without events (a backstop), and the debounce of events.
const POLL: Duration = Duration::from_secs(2);
const DEBOUNCE: Duration = Duration::from_millis(20);

impl FileDiscovery {
    /// Starts watching `path` until `shutdown`. Must be called inside a tokio runtime.
    pub fn start(path: impl Into<PathBuf>, shutdown: Shutdown) -> Result<Self, DiscoveryError> {
        Self::with_safety(path.into(), SafetyOptions::default(), shutdown)
    }

    pub(crate) fn with_safety(
        path: PathBuf,
        safety: SafetyOptions,
        shutdown: Shutdown,
    ) -> Result<Self, DiscoveryError> {
        let inner = Arc::new(Inner {
            path,
            safety,
            publishers: Mutex::new(BTreeMap::new()),
            last: Mutex::new(None),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Not the opens and reads this backend's own reads raise.
                if event.is_ok_and(|e| keel_core::config::file_event_may_change(&e)) {
                    let _ = tx.send(());
                }
            })
            .map_err(|e| DiscoveryError::io(&inner.path, e))?;
        let dir = parent_dir(&inner.path);
        if let Err(error) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), %error, "cannot watch the discovery file's directory; polling only");
        }
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let _watcher = watcher;
            run(weak, rx, shutdown).await;
        });
        Ok(Self { inner })
    }
}

fn parent_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

async fn run(
    inner: std::sync::Weak<Inner>,
    mut events: mpsc::UnboundedReceiver<()>,
    shutdown: Shutdown,
) {
    let mut last_text: Option<String> = None;
    loop {
        let Some(inner) = inner.upgrade() else { return };
        let json = inner.path.extension().is_some_and(|e| e == "json");
        match tokio::fs::read_to_string(&inner.path).await {
            Ok(text) if last_text.as_deref() == Some(text.as_str()) => {
                // Unchanged: offer again, so that a held shrink is confirmed by persistence.
                if let Some(sets) = inner.last() {
                    inner.offer_all(&sets);
                }
            }
            Ok(text) => match parse_file(&text, json) {
                Ok(sets) => {
                    let sets = Arc::new(sets);
                    inner.offer_all(&sets);
                    *keel_core::lock(&inner.last) = Some(sets);
                    last_text = Some(text);
                }
                Err(error) => {
                    telemetry::malformed("", "file");
                    tracing::warn!(path = %inner.path.display(), %error, "discovery file unreadable; keeping the last good sets");
                    inner.fail_all(&error);
                }
            },
            Err(error) => inner.fail_all(&DiscoveryError::io(&inner.path, error)),
        }
        drop(inner);
        tokio::select! {
            e = events.recv() => {
                if e.is_none() { return; }
                tokio::time::sleep(DEBOUNCE).await;
                while events.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.triggered() => return,
        }
    }
}

impl Discover for FileDiscovery {
    fn watch(&self, service: &ServiceName) -> Result<InstanceWatch, DiscoveryError> {
        let mut ps = self.inner.publishers();
        if let Some(p) = ps.get(service) {
            return Ok(p.watch());
        }
        let p = Publisher::new(service.clone(), &self.inner.safety);
        if let Some(sets) = self.inner.last() {
            p.offer(sets.get(service).cloned().unwrap_or_default());
        }
        ps.insert(service.clone(), p.clone());
        Ok(p.watch())
    }
}

impl Registry for FileDiscovery {
    /// Accepted and ignored: the file owns the set.
    fn register(&self, instance: Instance) -> BoxFuture<'_, Result<Registration, DiscoveryError>> {
        Box::pin(Registration::start(Arc::new(LocalLease), instance))
    }
}

impl Discovery for FileDiscovery {
    fn backend(&self) -> &'static str {
        "file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bad_entries_are_skipped_not_fatal() {
        let text = r#"
[[payments]]
addr = "127.0.0.1:8066"
weight = 10

[[payments]]
addr = "not an address"

[[payments]]
addr = "127.0.0.1:8067"
colour = "blue"

[[Bad_Name]]
addr = "127.0.0.1:1"
"#;
        let sets = parse_file(text, false).unwrap();
        assert_eq!(sets.len(), 1);
        let p = &sets[&ServiceName::new("payments").unwrap()];
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].weight, 10);
        let json = parse_file(r#"{"orders":[{"addr":"127.0.0.1:1"},{"addr":5}]}"#, true).unwrap();
        assert_eq!(json[&ServiceName::new("orders").unwrap()].len(), 1);
        assert!(parse_file("[[payments]\n", false).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_files_never_panic(s in "\\PC{0,200}") {
            let _ = parse_file(&s, false);
            let _ = parse_file(&s, true);
        }
    }
}
