//! The gateway's state, shared by every request: the live snapshot that a
//! reload swaps, admission, clients, the gateway's own metrics, the reload
//! history and the background tasks.
//!
//! [`AppState::swap`] is the one way a snapshot changes:
//! [`snapshot::prepare`] does every fallible step, then one `store` that
//! cannot fail. A request takes the snapshot once ([`AppState::live`]) and
//! keeps it to the end.
//!
//! This module holds things and starts nothing: the background tasks are
//! started by [`crate::server::start`], through [`Tasks`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::admission::shared::SharedLimits;
use crate::admission::{Admission, Queue};
use crate::clients::Registry;
use crate::config::Config;
use crate::health::FailureStreak;
use crate::limits::HeadroomSignal;
use crate::metrics::GatewayMetrics;
use crate::objects::Objects;
use crate::snapshot::{self, Kept, Live, Retired};
use crate::tasks::Tasks;
use crate::traces::Tracing;

/// The outcome of one reload attempt, for `/status` and `balancer reload`.
#[derive(Debug, Clone)]
pub struct ReloadOutcome {
    /// Counts reload attempts since start, successful or not.
    pub attempt: u64,
    /// What asked for it: `"file change"`, `"SIGHUP"`.
    pub trigger: &'static str,
    pub at: std::time::SystemTime,
    /// What changed, or every problem found (one per line).
    pub result: Result<String, String>,
}

/// The gateway's state, shared by every request.
pub struct AppState {
    /// Shared with the queue, which moves waiters to a new snapshot.
    live: Arc<ArcSwap<Live>>,
    pub admission: Admission,
    /// Clients' keys, limits and usage; outlives snapshots.
    pub clients: Registry,
    /// Where each stored object lives and whose it is.
    pub objects: Arc<Objects>,
    /// What the gateway answered itself, and queue waits.
    pub metrics: GatewayMetrics,
    /// What outlives snapshots, by node name.
    pub kept: Kept,
    generation: AtomicU64,
    /// Held for a whole swap, so two reloads at once apply one after the other.
    swapping: Mutex<()>,
    last_reload: Mutex<Option<ReloadOutcome>>,
    /// Whether the config files are watched (the watcher is in place).
    pub watching: AtomicBool,
    /// Every background task, cancelled together on shutdown.
    pub tasks: Tasks,
    /// Request spans, with `[tracing] otlp_endpoint`.
    pub tracing: Option<Tracing>,
    /// Requests without a client of their own that failed on every node
    /// tried, in a row (a client with its own key has its own streak).
    pub(crate) anonymous_streak: FailureStreak,
}

impl AppState {
    /// Builds the state from `config`: its first snapshot, admission (and
    /// the shared limits, with `[cluster]`), and the trace exporter (with
    /// `[tracing]`: it must be made inside the runtime). Starts no task.
    pub fn new(
        config: Config,
        clients: Registry,
        objects: Objects,
        tasks: Tasks,
    ) -> Result<Arc<Self>, String> {
        let signal = Arc::new(HeadroomSignal::default());
        let kept = Kept::new(Arc::clone(&signal));
        let live = Arc::new(ArcSwap::from_pointee(snapshot::prepare(
            config, 1, &kept, &clients,
        )?));
        let queue = Arc::new(Queue::new(signal, Arc::clone(&live)));
        let shared = match live.load().config.cluster.clone() {
            Some(settings) => Some(SharedLimits::new(settings, tasks.clone())?),
            None => None,
        };
        let tracing = Tracing::start(&live.load().config.tracing)?;
        Ok(Arc::new(Self {
            live,
            admission: Admission {
                queue,
                shared,
                budget_waiting: std::sync::atomic::AtomicUsize::new(0),
                held_bytes: std::sync::atomic::AtomicUsize::new(0),
            },
            clients,
            objects: Arc::new(objects),
            metrics: GatewayMetrics::default(),
            kept,
            generation: AtomicU64::new(1),
            swapping: Mutex::new(()),
            last_reload: Mutex::new(None),
            watching: AtomicBool::new(false),
            tasks,
            tracing,
            anonymous_streak: FailureStreak::default(),
        }))
    }

    /// The current snapshot; a request takes it once and keeps it.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Validates and builds `config` completely, then swaps it in. On error
    /// the running snapshot stays.
    pub fn swap(&self, config: Config) -> Result<(), String> {
        let _one_at_a_time = self.swapping.lock();
        let generation = self.generation.load(Ordering::Acquire) + 1;
        let live = snapshot::prepare(config, generation, &self.kept, &self.clients)?;
        self.live.store(Arc::new(live));
        self.generation.store(generation, Ordering::Release);
        self.kept.health_wake.notify_one();
        self.kept.signal.freed();
        Ok(())
    }

    /// Records a reload attempt's outcome; returns it with its number.
    pub fn record_reload(
        &self,
        trigger: &'static str,
        result: Result<String, String>,
    ) -> ReloadOutcome {
        let mut last = self.last_reload.lock();
        let outcome = ReloadOutcome {
            attempt: last.as_ref().map_or(1, |r| r.attempt + 1),
            trigger,
            at: std::time::SystemTime::now(),
            result,
        };
        *last = Some(outcome.clone());
        outcome
    }

    pub fn last_reload(&self) -> Option<ReloadOutcome> {
        self.last_reload.lock().clone()
    }

    /// Nodes removed by a reload that still finish requests or hold a window.
    pub fn retired(&self) -> Vec<Retired> {
        self.kept.retired(&self.live())
    }
}

impl Drop for AppState {
    fn drop(&mut self) {
        self.tasks.cancel();
    }
}
