//! Shared state: the live snapshot that requests read, and what outlives it.
//!
//! [`Live`] is everything built from one validated config: nodes with their
//! HTTP clients, the model index, the `/v1/models` answer. A request takes
//! the snapshot once ([`AppState::live`]) and keeps it to the end, so a
//! config swap never changes a request halfway.
//!
//! Counters that must survive a reload (windows, in-flight counts,
//! cooldowns) live in [`NodeUsage`], and health in [`NodeHealth`], kept by
//! node name outside the snapshot: a node that stays in the config keeps
//! both, so a reload can never reset a window and push a node past its
//! quota, nor readmit a failing node. A node that leaves the config is
//! retired (it takes nothing new and finishes what it has); its usage is
//! forgotten only once its window is empty, so a node that comes back
//! within the minute finds its window as it was.
//!
//! [`AppState::swap`] is the one way a snapshot changes: `prepare` does
//! every fallible step, then one `store` that cannot fail.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use axum::http::HeaderValue;
use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clients::{Directory, Registry};
use crate::cluster::Cluster;
use crate::config::{Config, NodeConfig, NodeKey};
use crate::error::GatewayError;
use crate::health::{self, NodeHealth};
use crate::limits::{HeadroomSignal, NodeUsage};
use crate::metrics::{GatewayMetrics, NodeMetrics};
use crate::queue::Queue;
use crate::store::{Store, StoreError};
use crate::usage::{self, UsageWriter};

/// How long start-up waits for Redis before serving with
/// `cluster.on_redis_error` in force.
const CLUSTER_CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// One upstream node as the request path uses it.
#[derive(Debug)]
pub struct Node {
    pub name: Arc<str>,
    /// `x-balancer-node` value, built once.
    pub name_header: HeaderValue,
    /// Base URL without a trailing slash.
    pub url: Arc<str>,
    /// The same, parsed once: a request only sets its path and query.
    pub base: reqwest::Url,
    pub key: NodeKey,
    pub models: Option<Vec<String>>,
    pub usage: Arc<NodeUsage>,
    pub health: Arc<NodeHealth>,
    pub metrics: Arc<NodeMetrics>,
    pub client: reqwest::Client,
}

/// Everything built from one config.
#[derive(Debug)]
pub struct Live {
    /// Counts swaps since start: 1 is the config the gateway started with.
    pub generation: u64,
    /// Clients with their own keys and limits, by key hash.
    pub clients: Directory,
    pub config: Config,
    pub nodes: Vec<Node>,
    /// Model name to the nodes that serve it (listed or serving any model).
    by_model: HashMap<String, Arc<[usize]>>,
    /// Nodes with no `models` list.
    any_model: Arc<[usize]>,
    all: Arc<[usize]>,
    /// The `/v1/models` answer.
    pub models_list: Bytes,
}

impl Live {
    /// The nodes that may serve `model` (all nodes when there is none).
    pub fn candidates(&self, model: Option<&str>) -> Result<Arc<[usize]>, GatewayError> {
        let Some(model) = model else {
            return Ok(Arc::clone(&self.all));
        };
        if let Some(nodes) = self.by_model.get(model) {
            return Ok(Arc::clone(nodes));
        }
        if self.any_model.is_empty() {
            return Err(GatewayError::ModelNotFound(model.to_owned()));
        }
        Ok(Arc::clone(&self.any_model))
    }

    /// Whether a configured node lists `model`.
    pub fn lists_model(&self, model: &str) -> bool {
        self.by_model.contains_key(model)
    }
}

/// What the gateway keeps of a node across snapshots.
#[derive(Debug)]
struct Tracked {
    url: Arc<str>,
    usage: Arc<NodeUsage>,
    health: Arc<NodeHealth>,
    metrics: Arc<NodeMetrics>,
}

/// What outlives snapshots, by name.
#[derive(Debug, Default)]
struct Kept {
    nodes: HashMap<Arc<str>, Tracked>,
}

/// A node that left the config and still has requests in flight or
/// requests in its window.
#[derive(Debug)]
pub struct Retired {
    pub name: Arc<str>,
    pub usage: Arc<NodeUsage>,
}

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
    pub queue: Arc<Queue>,
    /// Clients' keys, limits and usage; outlives snapshots.
    pub clients: Registry,
    /// What the gateway answered itself, and queue waits.
    pub metrics: GatewayMetrics,
    /// Limits shared with other replicas (`[cluster]`), if configured.
    pub cluster: Option<Arc<Cluster>>,
    signal: Arc<HeadroomSignal>,
    /// Per node name; held only while preparing a snapshot and
    /// for `/status`.
    tracked: Mutex<Kept>,
    generation: AtomicU64,
    /// Held for a whole swap, so two reloads at once apply one after the other.
    swapping: Mutex<()>,
    health_wake: Arc<Notify>,
    last_reload: Mutex<Option<ReloadOutcome>>,
    /// Background tasks (queue dispatcher, probes, config watcher): cancelled
    /// together on shutdown.
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// Why the state could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The config is valid but cannot be put to use (an HTTP client or a CA
    /// bundle cannot be built).
    #[error("{0}")]
    Prepare(String),
}

impl AppState {
    /// Opens the client store (`base_dir` resolves a relative SQLite path),
    /// builds the state and starts its background tasks.
    pub async fn start(
        config: Config,
        base_dir: &std::path::Path,
    ) -> Result<Arc<Self>, StartError> {
        let store = Store::open(&config.store.url, base_dir).await?;
        let (recorder, writer) = usage::channel();
        let registry = Registry::new(store, config.store.cache_ttl, recorder).await?;
        let state = Self::new(config, registry, writer).map_err(StartError::Prepare)?;
        if let Some(cluster) = &state.cluster
            && !cluster.connected(CLUSTER_CONNECT_WAIT).await
        {
            tracing::warn!(
                "redis not reachable at start-up; cluster.on_redis_error applies until it is"
            );
        }
        Ok(state)
    }

    /// Builds the state and starts the queue's dispatcher, the health
    /// probes and the usage writer (needs a runtime).
    pub fn new(
        config: Config,
        clients: Registry,
        usage_writer: UsageWriter,
    ) -> Result<Arc<Self>, String> {
        let signal = Arc::new(HeadroomSignal::default());
        let tracked = Mutex::new(Kept::default());
        let health_wake = Arc::new(Notify::new());
        let live = Arc::new(ArcSwap::from_pointee(prepare(
            config,
            1,
            &signal,
            &health_wake,
            &tracked,
            &clients,
        )?));
        let queue = Arc::new(Queue::new(Arc::clone(&signal), Arc::clone(&live)));
        let cluster = match live.load().config.cluster.clone() {
            Some(settings) => Some(Cluster::new(settings)?),
            None => None,
        };
        let state = Arc::new(Self {
            live,
            queue,
            clients,
            metrics: GatewayMetrics::default(),
            cluster,
            signal,
            tracked,
            generation: AtomicU64::new(1),
            swapping: Mutex::new(()),
            health_wake,
            last_reload: Mutex::new(None),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        if let Some(cluster) = &state.cluster {
            let cluster = Arc::clone(cluster);
            state.spawn(|cancel| cluster.run(cancel));
        }
        let dispatcher = Arc::clone(&state.queue);
        state.spawn(|cancel| async move { dispatcher.dispatch(cancel).await });
        let weak = Arc::downgrade(&state);
        let wake = Arc::clone(&state.health_wake);
        state.spawn(|cancel| health::run(weak, wake, cancel));
        let store = state.clients.store().clone();
        let settings = state.live().config.store.clone();
        state.spawn(|cancel| usage_writer.run(store, settings.usage_flush_interval, cancel));
        let weak = Arc::downgrade(&state);
        state.spawn(|cancel| refresh_clients(weak, settings.cache_ttl, cancel));
        Ok(state)
    }

    /// Runs a background task until shutdown: the one way the gateway starts
    /// one, so [`stop_tasks`](Self::stop_tasks) ends them all.
    pub fn spawn<F, Fut>(&self, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task(self.cancel.child_token()));
    }

    /// Cancels every background task and waits for them to end.
    pub async fn stop_tasks(&self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
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
        let live = prepare(
            config,
            generation,
            &self.signal,
            &self.health_wake,
            &self.tracked,
            &self.clients,
        )?;
        self.live.store(Arc::new(live));
        self.generation.store(generation, Ordering::Release);
        self.health_wake.notify_one();
        self.signal.freed();
        Ok(())
    }

    /// Records a reload attempt's outcome; returns its attempt number.
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
        let live = self.live();
        let tracked = self.tracked.lock();
        let mut out: Vec<Retired> = tracked
            .nodes
            .iter()
            .filter(|(name, _)| !live.nodes.iter().any(|n| n.name == **name))
            .map(|(name, t)| Retired {
                name: Arc::clone(name),
                usage: Arc::clone(&t.usage),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

impl Drop for AppState {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Every fallible step of building a snapshot; nothing is shared until it
/// has all succeeded.
fn prepare(
    config: Config,
    generation: u64,
    signal: &Arc<HeadroomSignal>,
    health_wake: &Arc<Notify>,
    tracked: &Mutex<Kept>,
    registry: &Registry,
) -> Result<Live, String> {
    let shared_client = build_client(&config, None)?;
    let mut nodes = Vec::with_capacity(config.nodes.len());
    for node in &config.nodes {
        let client = match &node.ca_file {
            Some(_) => build_client(&config, Some(node))?,
            None => shared_client.clone(),
        };
        let name_header = HeaderValue::from_str(&node.name)
            .map_err(|_| format!("node '{}': name is not a valid header value", node.name))?;
        let base = reqwest::Url::parse(&node.url)
            .map_err(|e| format!("node '{}': url: {e}", node.name))?;
        nodes.push((node, client, name_header, base));
    }

    // Nothing below fails.
    let now = Instant::now();
    let mut tracked = tracked.lock();
    let clients = Directory::build(&config.clients, registry);
    let mut kept: Vec<Node> = Vec::with_capacity(nodes.len());
    for (node, client, name_header, base) in nodes {
        let entry = tracked
            .nodes
            .entry(Arc::clone(&node.name))
            .or_insert_with(|| Tracked {
                url: Arc::clone(&node.url),
                usage: NodeUsage::new(node.quota, Arc::clone(signal)),
                health: NodeHealth::new(
                    Arc::clone(&node.name),
                    node.key.clone(),
                    Arc::clone(health_wake),
                    Arc::clone(signal),
                ),
                metrics: Arc::default(),
            });
        if entry.url != node.url {
            // Another deployment under the same name: its health starts
            // afresh; its window stays (it may be the same key's quota).
            entry.url = Arc::clone(&node.url);
            entry.health = NodeHealth::new(
                Arc::clone(&node.name),
                node.key.clone(),
                Arc::clone(health_wake),
                Arc::clone(signal),
            );
        }
        entry.usage.revive();
        entry.usage.set_quota(node.quota);
        entry.health.set_key(node.key.clone());
        kept.push(Node {
            name: Arc::clone(&node.name),
            name_header,
            url: Arc::clone(&node.url),
            base,
            key: node.key.clone(),
            models: node.models.clone(),
            usage: Arc::clone(&entry.usage),
            health: Arc::clone(&entry.health),
            metrics: Arc::clone(&entry.metrics),
            client,
        });
    }
    tracked.nodes.retain(|name, t| {
        if config.nodes.iter().any(|n| n.name == *name) {
            return true;
        }
        t.usage.retire();
        !t.usage.is_idle(now)
    });
    drop(tracked);
    let nodes = kept;

    let any_model: Arc<[usize]> = (0..nodes.len())
        .filter(|&i| nodes[i].models.is_none())
        .collect();
    let mut by_model: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
        for model in node.models.iter().flatten() {
            by_model.entry(model.clone()).or_default().push(i);
        }
    }
    let mut names: Vec<&String> = by_model.keys().collect();
    names.sort();
    let data: Vec<_> = names
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "balancer"}))
        .collect();
    let models_list = Bytes::from(json!({"object": "list", "data": data}).to_string());
    let by_model = by_model
        .into_iter()
        .map(|(model, mut list)| {
            list.extend(any_model.iter().copied());
            list.sort_unstable();
            list.dedup();
            (model, Arc::from(list))
        })
        .collect();

    Ok(Live {
        generation,
        clients,
        all: (0..nodes.len()).collect(),
        config,
        nodes,
        by_model,
        any_model,
        models_list,
    })
}

/// Re-reads whether the store holds clients every `every`, so the first
/// client another replica makes closes this gateway too.
async fn refresh_clients(
    state: std::sync::Weak<AppState>,
    every: std::time::Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        let Some(state) = state.upgrade() else { return };
        if let Err(err) = state.clients.refresh().await {
            tracing::warn!(error = %err, "cannot count the stored clients");
        }
    }
}

fn build_client(config: &Config, node: Option<&NodeConfig>) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(config.upstream.connect_timeout)
        .tcp_nodelay(true)
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        // Redirects would forward the node's key elsewhere; relay them instead.
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    if let Some(node) = node
        && let Some(path) = &node.ca_file
    {
        let pem = std::fs::read(path)
            .map_err(|e| format!("node '{}': cannot read ca_file: {e}", node.name))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("node '{}': ca_file is not PEM: {e}", node.name))?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}
