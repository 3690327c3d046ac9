//! The one door for background work: every task the gateway starts (the
//! queue's dispatcher, health probes, the config watcher, the ledger
//! writer, the Redis connection, releases of shared leases, the admin
//! listener) is spawned through [`Tasks`], so shutdown can cancel them
//! together and wait until each has ended. `tokio::spawn` itself is
//! refused by clippy (`clippy.toml`'s `disallowed-methods`).

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Spawns tracked tasks; cheap to clone (every clone is the same set).
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Tasks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs a long-lived task until shutdown: it gets a token that is
    /// cancelled when [`stop`](Self::stop) begins.
    pub fn spawn<F, Fut>(&self, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task(self.cancel.child_token()));
    }

    /// Runs a piece of work that ends by itself (bounded, or stopped by
    /// its own signal) and must finish even during shutdown:
    /// [`stop`](Self::stop) waits for it.
    pub fn run<Fut>(&self, work: Fut) -> JoinHandle<Fut::Output>
    where
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        self.tracker.spawn(work)
    }

    /// Whether shutdown has begun.
    pub fn stopping(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Cancels every task and waits for all of them to end.
    pub async fn stop(&self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Cancels every task without waiting (the state is being dropped).
    pub(crate) fn cancel(&self) {
        self.cancel.cancel();
    }
}
