//! `keel.serve(router)`: the inbound half.
//!
//! Order, outermost first, for the application's routes: deadline check (504 when the caller's
//! `keel-deadline-ms` has run out) → shedding (503 + `Retry-After`) → rate limit (429 +
//! `Retry-After` + RateLimit headers) → trace context (`traceparent` read, `keel.server` span,
//! the caller's deadline kept for the handler's own calls) → the application's own layers
//! (idempotency per route, where the application puts it). The admin routes (`/healthz`,
//! `/readyz`, `/metrics`, `/keel/status`) sit beside them under none of those layers, so probes
//! answer under overload. An application route with one of those paths is an error of the
//! application's: axum refuses overlapping routes when `serve` merges them (it panics).
//!
//! Lifecycle: bind → serve → ready (and registered) → on shutdown: not ready (and
//! deregistered) → a short grace so callers notice → stop accepting → in-flight requests, and
//! upgraded connections (WebSockets), finish within `service.drain_timeout` (connections still
//! open then are closed; an HTTP/1 upgraded one at its socket, whether or not its handler is
//! reading it) → return.
//! A shutdown that comes while the registration is in flight waits for it (up to 2 s) and
//! deregisters it; the service is then never marked ready.
//!
//! A WebSocket is the application's protocol, so keel cannot put a close frame into it: a
//! handler that holds one open should watch [`Shutdown::triggered`](keel_core::Shutdown::triggered)
//! (`keel.shutdown()`), send a close frame (1001, going away) and let the peer answer; the drain
//! waits for that, up to `drain_timeout`, and then closes the connection.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        OnceLock,
    },
    task::{Context, Poll},
    time::SystemTime,
};

use axum::{
    extract::{MatchedPath, Request, State},
    http::{header, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::Instrument;

use crate::{trace::TraceContext, Error, Keel};

/// The process-wide Prometheus recorder, installed on first use; `None` if the application
/// installed another `metrics` recorder first.
pub(crate) fn prometheus() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| PrometheusBuilder::new().install_recorder().ok())
        .clone()
}

/// The rate limit key (`key = "path"`) of every request that matches no route: not a path, so
/// no route shares it.
const UNMATCHED_ROUTE: &str = "(no route)";

/// How long shutdown waits for the registry: for a registration in flight to answer, and for
/// draining and deregistering.
const REGISTRY_BOUND: std::time::Duration = std::time::Duration::from_secs(2);

/// Readiness and draining, shared by the admin routes and the lifecycle.
#[derive(Debug, Default)]
pub(crate) struct ServerState {
    pub(crate) ready: AtomicBool,
    pub(crate) draining: AtomicBool,
    pub(crate) local_addr: OnceLock<SocketAddr>,
    /// The inbound shedding limiter, once serving, for its gauges.
    pub(crate) shed: OnceLock<std::sync::Arc<keel_resilience::ConcurrencyLimiter>>,
}

/// The listener `serve` accepts on: every connection it hands out can be cut at once, so that
/// a drain that runs out of `drain_timeout` ends the requests (and upgraded connections) still
/// in flight rather than leaving them running after `serve` has returned; and every connection
/// is counted until it closes, so that the drain also waits for those the HTTP server no longer
/// sees (an upgraded connection leaves it once the upgrade is handed to the application).
struct DrainListener {
    inner: tokio::net::TcpListener,
    cut: CancellationToken,
    open: std::sync::Arc<OpenConnections>,
}

impl axum::serve::Listener for DrainListener {
    type Io = Cuttable;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Cuttable, SocketAddr) {
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        let cut = Box::pin(self.cut.clone().cancelled_owned());
        let open = OpenConnections::add(&self.open);
        let io = Cuttable {
            io,
            cut,
            open,
            kept: false,
        };
        (io, addr)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// The connections `serve` accepted that are still open; an upgraded one (HTTP/1 `101`) with
/// a second handle on its socket (a duplicated descriptor), to shut it down from outside the
/// application's task that owns it once upgraded. The others stay in the HTTP server's tasks,
/// which always poll them, so failing their reads and writes ([`Cuttable`]) ends them.
#[derive(Debug, Default)]
struct OpenConnections {
    set: std::sync::Mutex<OpenSet>,
    /// Told when the last open connection closes.
    none_open: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct OpenSet {
    next: u64,
    /// Each open connection, and its second handle once upgraded (`None` before, and if the
    /// socket could not be duplicated: then it is cut through its reads and writes only).
    sockets: std::collections::HashMap<u64, Option<std::net::TcpStream>>,
}

impl OpenConnections {
    fn add(this: &std::sync::Arc<Self>) -> OpenGuard {
        let mut set = keel_core::lock(&this.set);
        let id = set.next;
        set.next += 1;
        set.sockets.insert(id, None);
        OpenGuard {
            id,
            open: this.clone(),
        }
    }

    /// Keeps a second handle on the socket of connection `id`.
    fn keep(&self, id: u64, io: &tokio::net::TcpStream) {
        let handle = duplicate(io);
        if let Some(slot) = keel_core::lock(&self.set).sockets.get_mut(&id) {
            *slot = handle;
        }
    }

    /// Returns once no accepted connection is open.
    async fn none_open(&self) {
        loop {
            let notified = self.none_open.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if keel_core::lock(&self.set).sockets.is_empty() {
                return;
            }
            notified.await;
        }
    }

    /// Shuts down every upgraded connection still open, both ways: the peer sees it closed, and
    /// the application's next read or write on it fails, even if its task never polls it again.
    fn shut_all(&self) {
        for socket in keel_core::lock(&self.set).sockets.values().flatten() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A second handle on `io`'s socket (closing it leaves `io` open).
fn duplicate(io: &tokio::net::TcpStream) -> Option<std::net::TcpStream> {
    #[cfg(unix)]
    {
        use std::os::fd::AsFd;
        io.as_fd()
            .try_clone_to_owned()
            .ok()
            .map(std::net::TcpStream::from)
    }
    #[cfg(windows)]
    {
        use std::os::windows::io::AsSocket;
        io.as_socket()
            .try_clone_to_owned()
            .ok()
            .map(std::net::TcpStream::from)
    }
    #[cfg(not(any(unix, windows)))]
    {
        let _ = io;
        None
    }
}

/// Whether `buf` starts an HTTP/1 `101 Switching Protocols` head: the connection is being
/// upgraded, and leaves the HTTP server once the head is out. (Bytes an application writes
/// after an upgrade that happen to read so cost at most one descriptor more.)
fn starts_switching_protocols(buf: &[u8]) -> bool {
    buf.len() >= 13 && buf.starts_with(b"HTTP/1.") && &buf[8..13] == b" 101 "
}

/// Counts a connection as open until dropped (with the connection's I/O, wherever it went: an
/// upgraded connection's I/O lives in the application's handler).
#[derive(Debug)]
struct OpenGuard {
    id: u64,
    open: std::sync::Arc<OpenConnections>,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        let mut set = keel_core::lock(&self.open.set);
        set.sockets.remove(&self.id);
        if set.sockets.is_empty() {
            self.open.none_open.notify_waiters();
        }
    }
}

/// A connection that fails every read and write once its listener's token is cancelled (the
/// connection's task is woken then, and ends).
struct Cuttable {
    io: tokio::net::TcpStream,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    open: OpenGuard,
    /// Whether a second handle on the socket is kept (see [`OpenConnections`]).
    kept: bool,
}

impl Cuttable {
    fn check(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        match self.cut.as_mut().poll(cx) {
            Poll::Ready(()) => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "drain_timeout passed",
            )),
            Poll::Pending => Ok(()),
        }
    }

    /// Before `buf` goes out: a `101` head means the connection is being upgraded.
    fn note_upgrade(&mut self, buf: &[u8]) {
        if !self.kept && starts_switching_protocols(buf) {
            self.kept = true;
            self.open.open.keep(self.open.id, &self.io);
        }
    }
}

impl AsyncRead for Cuttable {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Cuttable {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        this.note_upgrade(buf);
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            this.note_upgrade(first);
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Keel {
    /// Binds `service.listen` and serves `app` with keel's inbound layers and admin routes until
    /// shutdown (SIGTERM/SIGINT or [`Shutdown::trigger`](keel_core::Shutdown::trigger)), then
    /// drains and returns.
    ///
    /// # Panics
    /// If `app` has its own route at `/healthz`, `/readyz`, `/metrics` or `/keel/status` (axum
    /// refuses overlapping routes when they are merged).
    pub async fn serve(&self, app: Router) -> Result<(), Error> {
        let listen = self.service().load().listen;
        let listener = tokio::net::TcpListener::bind(listen).await?;
        self.serve_with_listener(listener, app).await
    }

    /// Like [`serve`](Keel::serve), on a listener the caller bound (e.g. to port 0).
    pub async fn serve_with_listener(
        &self,
        listener: tokio::net::TcpListener,
        app: Router,
    ) -> Result<(), Error> {
        let addr = listener.local_addr()?;
        let state = self.server_state();
        let _ = state.local_addr.set(addr);
        // Outermost first: the inbound set (deadline check: 504 for work whose caller has given
        // up; shedding: 503; rate limit: 429), then trace and deadline context for the
        // handler's own calls. The admin routes sit beside the application's, under none of
        // these, so probes still answer under overload.
        let inbound = &self.inner().inbound;
        let rate_limit = inbound.project(|i| i.rate_limit.clone());
        let stack = keel_resilience::ServerStackLayer::new(
            self.name().as_str(),
            inbound.project(|i| i.bulkhead.clone()),
            rate_limit.clone(),
        );
        let _ = state.shed.set(stack.shed_limiter().clone());
        // A rate limit keyed by `path` is per route: it reads the route axum matched. Requests
        // that match none (the fallback) share one key: made-up paths, one key each, would fill
        // the limiter's `max_keys` and push the real routes into its shared overflow cell.
        let route_key = tower::util::MapRequestLayer::new(move |mut req: Request| {
            let rl = rate_limit.load();
            if rl.enabled && rl.key == keel_resilience::KeySource::Path {
                let route = match req.extensions().get::<MatchedPath>() {
                    Some(route) => route.as_str().into(),
                    None => UNMATCHED_ROUTE.into(),
                };
                req.extensions_mut()
                    .insert(keel_core::request::Route(route));
            }
            req
        });
        let app = app
            .layer(axum::middleware::from_fn(trace_layer))
            .layer(stack)
            .layer(route_key);
        let router = self.admin_router().merge(app);
        let shutdown = self.shutdown().clone();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        // Each connection runs in a task of its own, which aborting the server's task leaves
        // running: `cut` ends them all when the drain runs out of time.
        let cut = CancellationToken::new();
        let open = std::sync::Arc::new(OpenConnections::default());
        let listener = DrainListener {
            inner: listener,
            cut: cut.clone(),
            open: open.clone(),
        };
        // Ends every connection still open: through its reads and writes, and at its socket.
        let cut_all = || {
            cut.cancel();
            open.shut_all();
        };
        let server =
            axum::serve(listener, router.into_make_service()).with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            });
        let mut task = tokio::spawn(async move { server.await });
        let registering = self.on_ready(addr);
        tokio::pin!(registering);
        let registered = tokio::select! {
            r = &mut registering => r,
            _ = shutdown.triggered() => {
                // The registry may have written the record already: let the registration
                // answer (bounded, as deregistration is), so that `on_stopping` removes it
                // instead of leaving it to its TTL.
                state.draining.store(true, Ordering::SeqCst);
                match tokio::time::timeout(REGISTRY_BOUND, &mut registering).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "registration failed during shutdown");
                    }
                    Err(_) => {
                        tracing::warn!("registration still in flight at shutdown; if it lands, the record will expire by itself");
                    }
                }
                Ok(())
            }
        };
        if let Err(e) = registered {
            cut_all();
            task.abort();
            return Err(e);
        }
        // Not ready when shutdown has begun (a shutdown just after this is seen below).
        if !shutdown.is_triggered() {
            state.ready.store(true, Ordering::SeqCst);
            tracing::info!(service = %self.name(), %addr, "serving");
        }

        tokio::select! {
            _ = shutdown.triggered() => {}
            result = &mut task => {
                // The server ended by itself: an accept error. Report it.
                state.ready.store(false, Ordering::SeqCst);
                cut_all();
                self.on_stopping().await;
                return match result {
                    Ok(r) => r.map_err(Error::Io),
                    Err(e) => Err(Error::Io(std::io::Error::other(e))),
                };
            }
        }
        // Not ready first, so health checks and balancers stop choosing us; then deregister.
        state.ready.store(false, Ordering::SeqCst);
        state.draining.store(true, Ordering::SeqCst);
        self.on_stopping().await;
        let service = self.service().get();
        tokio::time::sleep(service.drain_grace).await;
        let _ = stop_tx.send(());
        // The HTTP server's drain (requests in flight) and then the connections it no longer
        // sees: upgraded ones (WebSockets) live on in the application's handlers.
        let drained = async {
            let served = (&mut task).await;
            open.none_open().await;
            served
        };
        let outcome = tokio::time::timeout(service.drain_timeout, drained).await;
        if outcome.is_err() {
            tracing::warn!(timeout = ?service.drain_timeout, "in-flight requests or upgraded connections did not finish in time; closing them");
        }
        // Nothing is open after a drain that finished; after one that ran out, this ends the
        // rest.
        cut_all();
        task.abort();
        match outcome {
            Ok(Ok(Err(e))) => return Err(Error::Io(e)),
            Ok(Err(e)) => return Err(Error::Io(std::io::Error::other(e))),
            Ok(Ok(Ok(()))) | Err(_) => {}
        }
        tracing::info!(service = %self.name(), "stopped");
        Ok(())
    }

    /// The address being served, once [`serve`](Keel::serve) has bound it.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.server_state().local_addr.get().copied()
    }

    /// Whether the service is ready (serving, and not draining).
    pub fn is_ready(&self) -> bool {
        self.server_state().ready.load(Ordering::SeqCst)
    }

    /// The admin routes alone: `/healthz`, `/readyz`, `/metrics`, `/keel/status`.
    pub fn admin_router(&self) -> Router {
        Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics_text))
            .route("/keel/status", get(status))
            .with_state(self.clone())
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(keel): State<Keel>) -> Response {
    let state = keel.server_state();
    if state.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready").into_response()
    } else if state.draining.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response()
    }
}

async fn metrics_text(State(keel): State<Keel>) -> Response {
    keel.publish_gauges();
    match prometheus() {
        Some(handle) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            )],
            handle.render(),
        )
            .into_response(),
        None => (
            StatusCode::NOT_IMPLEMENTED,
            "another metrics recorder is installed in this process; export from it",
        )
            .into_response(),
    }
}

async fn status(State(keel): State<Keel>) -> Json<serde_json::Value> {
    Json(keel.status())
}

impl Keel {
    /// What `/keel/status` shows: readiness, the configuration's generation and last reload
    /// error, and every client's balancer, breaker and limiter state.
    pub fn status(&self) -> serde_json::Value {
        let state = self.server_state();
        let config = self.config();
        let last_error = config.last_error().map(|f| {
            serde_json::json!({
                "message": f.error.to_string(),
                "keys": f.error.keys(),
                "origins": f.error.origins(),
                "at_unix_ms": f.at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            })
        });
        serde_json::json!({
            "service": self.name().as_str(),
            "address": state.local_addr.get().map(|a| a.to_string()),
            "ready": state.ready.load(Ordering::SeqCst),
            "draining": state.draining.load(Ordering::SeqCst),
            "config": {
                "generation": config.generation(),
                "files": config.files(),
                "last_error": last_error,
                "not_live_changes": self.not_live_changes(),
            },
            "clients": self.clients_status(),
        })
    }
}

impl Keel {
    /// Registers this instance in discovery, once serving.
    async fn on_ready(&self, addr: SocketAddr) -> Result<(), Error> {
        let service = self.service().get();
        let advertise = service.advertise.unwrap_or(addr);
        let mut instance =
            keel_core::Instance::new(self.name().clone(), advertise).with_weight(service.weight);
        instance.zone = service.zone.clone();
        instance.version = service.version.clone();
        instance.tags = service.tags.clone();
        let registration = self.inner().discovery.register(instance).await?;
        *self.inner().registration.lock().await = Some(registration);
        Ok(())
    }

    /// Marks this instance draining and removes it from discovery.
    /// Marks this instance draining and removes it from discovery, bounded in time together: a
    /// registry that does not answer must not eat the drain time (the record then expires by
    /// its TTL).
    async fn on_stopping(&self) {
        let registration = self.inner().registration.lock().await.take();
        if let Some(r) = registration {
            // Draining first tells watchers that read states (not only presence) at once.
            let leave = async move {
                if let Err(error) = r.drain().await {
                    tracing::warn!(%error, "could not mark this instance draining");
                }
                r.deregister().await
            };
            match tokio::time::timeout(REGISTRY_BOUND, leave).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, "could not deregister; the record will expire by itself");
                }
                Err(_) => {
                    tracing::warn!("deregistration timed out; the record will expire by itself");
                }
            }
        }
    }

    fn clients_status(&self) -> serde_json::Value {
        let clients = crate::lock(&self.inner().clients).clone();
        let mut out = serde_json::Map::new();
        for (name, client) in clients {
            out.insert(name, client.status());
        }
        serde_json::Value::Object(out)
    }
}

/// Reads `traceparent` (or starts a trace), opens the `keel.server` span, and runs the rest of
/// the request with the context current, so outgoing calls carry it.
async fn trace_layer(request: Request, next: Next) -> Response {
    let parent = TraceContext::from_headers(request.headers());
    let ctx = match parent {
        Some(p) => p.child(),
        None => TraceContext::new_root(),
    };
    let span = tracing::info_span!(
        "keel.server",
        method = %request.method(),
        path = %request.uri().path(),
        trace_id = %ctx.trace_id_hex(),
        status = tracing::field::Empty,
    );
    let deadline = request
        .extensions()
        .get::<keel_core::request::Deadline>()
        .copied();
    let response = crate::trace::scope_with(ctx, deadline, next.run(request))
        .instrument(span.clone())
        .await;
    span.record("status", response.status().as_u16());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a `101` head marks a connection as upgraded (and so worth a second descriptor).
    #[test]
    fn a_switching_protocols_head_is_recognised() {
        for upgrade in [
            &b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"[..],
            b"HTTP/1.0 101 \r\n\r\n",
        ] {
            assert!(starts_switching_protocols(upgrade));
        }
        for other in [
            &b"HTTP/1.1 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 1010 x",
            b"HTTP/1.1 101",
            b"\x81\x05hello",
            b"",
        ] {
            assert!(!starts_switching_protocols(other), "{other:?}");
        }
    }

    /// A connection is counted while open, whether or not it keeps a second handle, and
    /// `none_open` returns once the last one closes.
    #[tokio::test]
    async fn open_connections_are_counted_until_dropped() {
        let open = std::sync::Arc::new(OpenConnections::default());
        open.none_open().await;
        let a = OpenConnections::add(&open);
        let b = OpenConnections::add(&open);
        assert_eq!(keel_core::lock(&open.set).sockets.len(), 2);
        assert!(keel_core::lock(&open.set)
            .sockets
            .values()
            .all(Option::is_none));
        drop(a);
        let waiting = tokio::spawn({
            let open = open.clone();
            async move { open.none_open().await }
        });
        drop(b);
        waiting.await.unwrap();
        assert!(keel_core::lock(&open.set).sockets.is_empty());
    }
}
