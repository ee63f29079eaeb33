use std::sync::Arc;

use tokio::sync::watch;

/// One stop signal for a whole service: SIGTERM, SIGINT, or [`Shutdown::trigger`] from code.
///
/// Cloning yields another handle to the same signal. Every part of keel that runs in the
/// background (watchers, heartbeats, servers) waits on [`Shutdown::triggered`] and winds down.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let shutdown = keel_core::Shutdown::new();
/// let waiter = shutdown.clone();
/// let task = tokio::spawn(async move { waiter.triggered().await; "stopped" });
/// shutdown.trigger();
/// assert_eq!(task.await.unwrap(), "stopped");
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A signal that fires only when [`trigger`](Shutdown::trigger)ed.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(false);
        Self { tx: Arc::new(tx) }
    }

    /// A signal that also fires on SIGTERM or SIGINT (Ctrl-C). Must be called inside a tokio
    /// runtime; the listener task ends when the signal fires.
    pub fn on_signals() -> Self {
        let this = Self::new();
        let trigger = this.clone();
        tokio::spawn(async move {
            let reason = wait_for_signal().await;
            tracing::info!(signal = reason, "shutdown requested");
            trigger.trigger();
        });
        this
    }

    /// Fires the signal. Idempotent.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether the signal has fired.
    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Waits until the signal fires (returns at once if it has).
    pub async fn triggered(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`; the wait ends only by the value becoming true.
        let _ = rx.wait_for(|v| *v).await;
    }
}

#[cfg(unix)]
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (term, int) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
        _ => {
            let _ = tokio::signal::ctrl_c().await;
            "ctrl-c"
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> &'static str {
    let _ = tokio::signal::ctrl_c().await;
    "ctrl-c"
}
