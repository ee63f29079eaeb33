//! Test support for keel: real servers on loopback, owned by the test that starts them.
//!
//! - [`RedisServer`]: a private `redis-server` on a free port, for tests that stop, restart or
//!   pause Redis. Tests that only need *a* Redis use [`shared_redis_url`] with a
//!   [`unique_prefix`].
//! - [`EtcdServer`]: a private `etcd` on free ports with a temporary data directory.
//! - [`HttpBackend`]: an axum server on 127.0.0.1 whose latency, status and health endpoint the
//!   test changes while it runs, and which counts what it served.
//! - [`FileOpens`]: counts the opens of files in a directory, by anyone.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The machine's shared Redis (127.0.0.1:6379, or `KEEL_TEST_REDIS_URL`). Never stop it: use a
/// [`RedisServer`] for that. Use a [`unique_prefix`] for every key.
pub fn shared_redis_url() -> String {
    std::env::var("KEEL_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

/// A key prefix unique to this test and this run: `keeltest:{name}:{pid}:{nanos}:`.
pub fn unique_prefix(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "keeltest:{name}:{}:{nanos}:{}:",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// A private `redis-server` on a free port on 127.0.0.1, killed when dropped.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one and waits until it accepts connections.
    pub fn start() -> Self {
        // Under /tmp when it can be: a Unix socket's path must stay under 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("keel-redis")
            .tempdir_in("/tmp")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let mut s = Self {
            port: free_port(),
            dir,
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(self.unix_socket().map_or_else(Vec::new, |path| {
                vec![
                    "--unixsocketperm".into(),
                    "700".into(),
                    "--unixsocket".into(),
                    path.into_os_string(),
                ]
            }))
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        self.child = Some(child);
        assert!(
            wait_for_port(self.port, Duration::from_secs(10)),
            "redis-server did not start on port {}",
            self.port
        );
        // It opens the Unix socket after the port (a socket file may be left from before a
        // restart: connect, do not look for the file).
        if let Some(path) = self.unix_socket() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::os::unix::net::UnixStream::connect(&path).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "redis-server did not open {}",
                    path.display()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `redis://127.0.0.1:{port}/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The path of its Unix socket, where it listens too, beside the TCP port; `None` when the
    /// temporary directory's path is too long for one.
    pub fn unix_socket(&self) -> Option<PathBuf> {
        let path = self.dir.path().join("redis.sock");
        (path.as_os_str().len() < 100).then_some(path)
    }

    /// `redis+unix://{socket}`: the same server over its Unix socket (panics when it has none).
    pub fn unix_url(&self) -> String {
        let path = self
            .unix_socket()
            .expect("the temporary directory's path is too long for a Unix socket");
        format!("redis+unix://{}", path.display())
    }

    /// Kills it (SIGKILL): connections drop, data is gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Freezes it (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        if let Some(c) = &self.child {
            signal(c.id(), "-STOP");
        }
    }

    /// Thaws it (SIGCONT).
    pub fn resume(&self) {
        if let Some(c) = &self.child {
            signal(c.id(), "-CONT");
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.resume();
        self.stop();
    }
}

/// The `etcd` binary to run: `KEEL_ETCD_BIN`, else `etcd` on the PATH.
pub fn etcd_binary() -> PathBuf {
    std::env::var_os("KEEL_ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

/// A private single-member `etcd` on free ports with a temporary data directory.
pub struct EtcdServer {
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts one and waits until it answers `/health`.
    pub fn start() -> Self {
        let mut s = Self {
            client_port: free_port(),
            peer_port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(etcd_binary())
            .arg("--name")
            .arg("keeltest")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("keeltest={peer}"))
            .arg("--log-level")
            .arg("error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd must be installed (apt-get install etcd-server)");
        self.child = Some(child);
        assert!(
            wait_for_port(self.client_port, Duration::from_secs(20)),
            "etcd did not start on port {}",
            self.client_port
        );
        // The port opens before the member is elected leader; give it a moment.
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if http_get_ok(self.client_port, "/health") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("etcd did not become healthy on port {}", self.client_port);
    }

    /// `http://127.0.0.1:{port}`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Its client port.
    pub fn port(&self) -> u16 {
        self.client_port
    }

    /// Kills it (data kept in its directory).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again with the same data and ports.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn http_get_ok(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200") && out.contains("true")
}

/// What an [`HttpBackend`] does, changeable while it runs.
#[derive(Debug, Default)]
pub struct Behaviour {
    /// Extra latency added to every request to `/` paths other than `/health`, in ms.
    pub latency_ms: AtomicU64,
    /// Status code for normal requests (0 means 200).
    pub status: AtomicU16,
    /// Whether `/health` answers 200 (true) or 503 (false).
    pub healthy: AtomicBool,
    /// Requests served (not counting `/health`).
    pub served: AtomicU64,
    /// `/health` requests served.
    pub health_checks: AtomicU64,
    /// Requests whose handler was cancelled before finishing (client went away).
    pub cancelled: AtomicU64,
}

/// An HTTP server on 127.0.0.1 whose behaviour the test controls.
///
/// Every path except `/health` answers with the configured status after the configured latency;
/// the body is `{name}` so tests can tell backends apart. `/health` answers 200 or 503.
pub struct HttpBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its name, echoed in bodies and in the `x-backend` header.
    pub name: String,
    /// Its behaviour, shared with the server.
    pub behaviour: Arc<Behaviour>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpBackend {
    /// Starts one on a free port. Must be called inside a tokio runtime.
    pub async fn start(name: &str) -> Self {
        Self::start_on(name, 0).await
    }

    /// Starts one on `port` (0 for any), e.g. to bring a backend back on the address it had.
    pub async fn start_on(name: &str, port: u16) -> Self {
        use axum::{
            extract::State, http::StatusCode, response::IntoResponse, routing::get, Router,
        };
        let behaviour = Arc::new(Behaviour {
            healthy: AtomicBool::new(true),
            ..Behaviour::default()
        });
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        #[derive(Clone)]
        struct S {
            b: Arc<Behaviour>,
            name: Arc<str>,
        }
        struct CancelGuard(Arc<Behaviour>, bool);
        impl Drop for CancelGuard {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.cancelled.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        async fn health(State(s): State<S>) -> impl IntoResponse {
            s.b.health_checks.fetch_add(1, Ordering::Relaxed);
            if s.b.healthy.load(Ordering::Relaxed) {
                (StatusCode::OK, "ok")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
            }
        }
        async fn any(State(s): State<S>, _body: axum::body::Bytes) -> impl IntoResponse {
            let mut guard = CancelGuard(s.b.clone(), false);
            let ms = s.b.latency_ms.load(Ordering::Relaxed);
            if ms > 0 {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            guard.1 = true;
            s.b.served.fetch_add(1, Ordering::Relaxed);
            let code = match s.b.status.load(Ordering::Relaxed) {
                0 => 200,
                c => c,
            };
            (
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                [("x-backend", s.name.to_string())],
                s.name.to_string(),
            )
        }
        let state = S {
            b: behaviour.clone(),
            name: Arc::from(name),
        };
        let app = Router::new()
            .route("/health", get(health))
            .fallback(any)
            .with_state(state);
        // Own accept loop: aborting the task drops the JoinSet, which aborts every connection,
        // so a stopped backend really is gone (keep-alive connections included).
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                conns.spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(io, svc)
                    .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Self {
            addr,
            name: name.to_owned(),
            behaviour,
            task,
        }
    }

    /// Sets the added latency.
    pub fn set_latency(&self, d: Duration) {
        self.behaviour
            .latency_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Sets the status code of normal requests.
    pub fn set_status(&self, code: u16) {
        self.behaviour.status.store(code, Ordering::Relaxed);
    }

    /// Flips `/health`.
    pub fn set_healthy(&self, healthy: bool) {
        self.behaviour.healthy.store(healthy, Ordering::Relaxed);
    }

    /// Requests served so far.
    pub fn served(&self) -> u64 {
        self.behaviour.served.load(Ordering::Relaxed)
    }

    /// Stops the server: the port is closed (connections refused).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Counts the times files in one directory are opened, by anyone (an inotify watch of its own):
/// for tests that a watcher does not keep re-reading files that did not change.
pub struct FileOpens {
    count: Arc<AtomicU64>,
    _watcher: notify::RecommendedWatcher,
}

impl FileOpens {
    /// Starts counting opens in `dir`.
    pub fn watch(dir: &Path) -> Self {
        use notify::{
            event::{AccessKind, EventKind},
            RecursiveMode, Watcher,
        };
        let count = Arc::new(AtomicU64::new(0));
        let counted = count.clone();
        let mut watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
            if let Ok(e) = e {
                if matches!(e.kind, EventKind::Access(AccessKind::Open(_))) {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
        .unwrap();
        watcher.watch(dir, RecursiveMode::NonRecursive).unwrap();
        Self {
            count,
            _watcher: watcher,
        }
    }

    /// Opens seen so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Opens seen during `quiet`, counted from now.
    pub async fn during(&self, quiet: Duration) -> u64 {
        let before = self.count();
        tokio::time::sleep(quiet).await;
        self.count() - before
    }
}
