//! Shared state: the live snapshot that requests read, and what outlives it.
//!
//! [`Live`] is everything built from one validated config: nodes with their
//! HTTP clients, the model index, the `/v1/models` answer. A request takes
//! the snapshot once ([`AppState::live`]) and keeps it to the end, so a
//! config swap never changes a request halfway.
//!
//! Counters that must survive a reload (windows, in-flight counts,
//! cooldowns) live in [`NodeUsage`], kept by node name outside the snapshot:
//! a node that stays in the config keeps its usage, so a reload can never
//! reset a window and push a node past its quota.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::http::HeaderValue;
use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::json;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{Config, NodeConfig, NodeKey};
use crate::error::GatewayError;
use crate::limits::{HeadroomSignal, NodeUsage};
use crate::queue::Queue;

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
    pub client: reqwest::Client,
}

/// Everything built from one config.
#[derive(Debug)]
pub struct Live {
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

/// The gateway's state, shared by every request.
pub struct AppState {
    live: ArcSwap<Live>,
    pub queue: Arc<Queue>,
    signal: Arc<HeadroomSignal>,
    usages: Mutex<HashMap<Arc<str>, Arc<NodeUsage>>>,
    _dispatcher: DropGuard,
}

impl AppState {
    /// Builds the state and starts the queue's dispatcher (needs a runtime).
    pub fn new(config: Config) -> Result<Arc<Self>, String> {
        let signal = Arc::new(HeadroomSignal::default());
        let queue = Arc::new(Queue::new(Arc::clone(&signal)));
        let usages = Mutex::new(HashMap::new());
        let live = prepare(config, &signal, &usages)?;
        let cancel = CancellationToken::new();
        let dispatcher = Arc::clone(&queue);
        let token = cancel.clone();
        tokio::spawn(async move { dispatcher.dispatch(token).await });
        Ok(Arc::new(Self {
            live: ArcSwap::from_pointee(live),
            queue,
            signal,
            usages,
            _dispatcher: cancel.drop_guard(),
        }))
    }

    /// The current snapshot; a request takes it once and keeps it.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Validates and builds `config` completely, then swaps it in.
    pub fn swap(&self, config: Config) -> Result<(), String> {
        let live = prepare(config, &self.signal, &self.usages)?;
        self.live.store(Arc::new(live));
        Ok(())
    }
}

/// Every fallible step of building a snapshot; nothing is shared until it
/// has all succeeded.
fn prepare(
    config: Config,
    signal: &Arc<HeadroomSignal>,
    usages: &Mutex<HashMap<Arc<str>, Arc<NodeUsage>>>,
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

    let mut usages = usages.lock();
    usages.retain(|name, _| config.nodes.iter().any(|n| n.name == *name));
    let nodes: Vec<Node> = nodes
        .into_iter()
        .map(|(node, client, name_header, base)| {
            let usage = usages
                .entry(Arc::clone(&node.name))
                .or_insert_with(|| NodeUsage::new(node.quota, Arc::clone(signal)));
            usage.set_quota(node.quota);
            Node {
                name: Arc::clone(&node.name),
                name_header,
                url: Arc::clone(&node.url),
                base,
                key: node.key.clone(),
                models: node.models.clone(),
                usage: Arc::clone(usage),
                client,
            }
        })
        .collect();
    drop(usages);

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
        all: (0..nodes.len()).collect(),
        config,
        nodes,
        by_model,
        any_model,
        models_list,
    })
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
