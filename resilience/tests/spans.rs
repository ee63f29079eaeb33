//! Attempt spans, in a test binary of their own: a span is made only while a subscriber is
//! interested in its callsite, and that interest is global to the process. Tests on other threads
//! of a shared binary touch the same callsites with no subscriber, and may race this one's
//! registration (the span then goes unrecorded).

use std::{
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use keel_core::Live;
use keel_resilience::{BoxError, ClientStackLayer, ResilienceConfig, RetryLayer};
use tower::{service_fn, Layer, Service, ServiceExt};

/// Records the `attempt` field of every `keel.attempt` span made while it is the default.
#[derive(Default, Clone)]
struct Attempts(Arc<std::sync::Mutex<Vec<u64>>>);

impl tracing::Subscriber for Attempts {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        struct Field(Option<u64>);
        impl tracing::field::Visit for Field {
            fn record_u64(&mut self, f: &tracing::field::Field, v: u64) {
                if f.name() == "attempt" {
                    self.0 = Some(v);
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        if span.metadata().name() == "keel.attempt" {
            let mut f = Field(None);
            span.record(&mut f);
            self.0.lock().unwrap().push(f.0.unwrap_or(0));
        }
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// A service that fails its first call with 503 and answers the rest.
fn fails_once() -> impl Service<
    http::Request<()>,
    Response = http::Response<()>,
    Error = BoxError,
    Future = std::future::Ready<Result<http::Response<()>, BoxError>>,
> + Clone {
    let calls = Arc::new(AtomicU32::new(0));
    service_fn(move |_req: http::Request<()>| {
        let mut r = http::Response::new(());
        if calls.fetch_add(1, Ordering::SeqCst) == 0 {
            *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        }
        std::future::ready(Ok(r))
    })
}

/// Every attempt has its span, numbered, through the fused stack and the retry layer alone.
#[tokio::test(start_paused = true)]
async fn each_attempt_has_a_numbered_span() {
    let seen = Attempts::default();
    let _default = tracing::subscriber::set_default(seen.clone());
    let mut cfg = ResilienceConfig::default();
    cfg.retry.backoff_base = Duration::ZERO;
    let stack = ClientStackLayer::try_new("spans", Live::new(cfg.clone())).unwrap();
    let retry = RetryLayer::new("spans", Live::new(cfg.retry));
    let results = [
        stack
            .layer(fails_once())
            .oneshot(http::Request::new(()))
            .await,
        retry
            .layer(fails_once())
            .oneshot(http::Request::new(()))
            .await,
    ];
    for r in results {
        assert_eq!(r.unwrap().status(), 200);
    }
    // Two attempts each, numbered 1 and 2.
    assert_eq!(*seen.0.lock().unwrap(), vec![1, 2, 1, 2]);
}
