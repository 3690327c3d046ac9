//! The live snapshot: everything built from one validated config, which a
//! request reads from start to end, and what outlives snapshots.
//!
//! [`Live`] holds the nodes (with their HTTP clients and parsed URLs,
//! addressed by [`NodeId`]), the model index, the declared clients and the
//! `/v1/models` answer. A request takes the snapshot once and keeps it to
//! the end, so a config swap never changes a request halfway.
//!
//! Counters that must survive a reload (windows, in-flight counts,
//! cooldowns: a node's [`Limiter`]; its [`NodeHealth`]; its
//! [`NodeMetrics`]; its held upstream connections) are kept by node name
//! in [`Kept`], outside any snapshot: a node that stays in the config keeps
//! them (its connections while its URL stays), so a reload can
//! never reset a window and push a node past its quota, nor readmit a
//! failing node. A node that leaves the config is retired (it takes nothing
//! new and finishes what it has); its counters are forgotten only once its
//! window is empty, so a node that comes back within the minute finds its
//! window as it was.
//!
//! [`prepare`] does every fallible step of building a snapshot before it
//! touches anything shared; the swap itself ([`crate::state`]) cannot fail.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::clients::{Directory, Registry};
use crate::config::{Config, NodeConfig};
use crate::error::GatewayError;
use crate::health::NodeHealth;
use crate::limits::{HeadroomSignal, Limiter};
use crate::metrics::NodeMetrics;
use crate::money::{NodePricing, Price};
use crate::request::CompletionDefaults;
use crate::upstream::Endpoint;
use crate::upstream::connections::Connections;
use crate::upstream::endpoint::SharedTls;

/// A node's place in one snapshot's node list. Valid for that snapshot
/// only: a request keeps its snapshot, so its ids never dangle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(u32);

impl NodeId {
    /// The id of the `index`th node (for tests and benches of selection).
    pub fn from_index(index: usize) -> Self {
        Self(u32::try_from(index).unwrap_or(u32::MAX))
    }

    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// One upstream node as the request path uses it: how it is reached,
/// what it serves, its limits, health, metrics and prices.
#[derive(Debug)]
pub struct Node {
    pub name: Arc<str>,
    /// How it is reached (URL, dialect, key, connections).
    pub endpoint: Endpoint,
    pub models: Option<Vec<String>>,
    pub limiter: Arc<Limiter>,
    pub health: Arc<NodeHealth>,
    pub metrics: Arc<NodeMetrics>,
    /// Its own prices and multiplier over the config's table.
    pub pricing: NodePricing,
    /// `nodes[].default_completion_tokens`.
    pub default_completion_tokens: Option<u64>,
}

/// A node of the config with every fallible step of its snapshot entry
/// done.
struct Built<'c> {
    node: &'c NodeConfig,
    endpoint: Endpoint,
    /// Its `ca_file`'s contents, if it has one.
    ca_pem: Option<Vec<u8>>,
}

/// Everything built from one config.
#[derive(Debug)]
pub struct Live {
    /// Counts swaps since start: 1 is the config the gateway started with.
    pub generation: u64,
    /// Clients with their own keys and limits, by key hash.
    pub clients: Directory,
    pub config: Config,
    nodes: Vec<Node>,
    /// Model name to the nodes that serve it (listed or serving any model).
    by_model: HashMap<String, Arc<[NodeId]>>,
    /// Nodes with no `models` list.
    any_model: Arc<[NodeId]>,
    all: Arc<[NodeId]>,
    /// Models with a price by their exact name (configured, shipped, or a
    /// node's own): metric labels even when no node lists them.
    priced: std::collections::HashSet<String>,
    /// The `/v1/models` answer.
    pub models_list: Bytes,
    /// What a request that names no `max_tokens` reserves.
    pub completion_defaults: CompletionDefaults,
}

impl Live {
    /// Node `id`'s tier (`nodes[].tier`): lower tiers fill first.
    pub fn tier(&self, id: NodeId) -> u32 {
        self.config.nodes.get(id.index()).map_or(0, |n| n.tier)
    }

    /// Whether any node is above tier 0.
    pub fn is_tiered(&self) -> bool {
        self.config.nodes.iter().any(|n| n.tier > 0)
    }

    /// The node `id` names in this snapshot.
    /// `model`'s price on node `id`, and the node's multiplier.
    pub fn price_on(&self, id: NodeId, model: &str) -> Option<(Price, f64)> {
        self.node(id)
            .pricing
            .price(&self.config.prices, model)
            .map(|(price, multiplier)| (*price, multiplier))
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }

    pub fn nodes(&self) -> std::slice::Iter<'_, Node> {
        self.nodes.iter()
    }

    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + use<> {
        (0..self.nodes.len()).map(NodeId::from_index)
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The node named `name`, if this snapshot has it.
    pub fn node_named(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| &*n.name == name)
    }

    /// The nodes that may serve `model` (all nodes when there is none).
    pub fn candidates(&self, model: Option<&str>) -> Result<Arc<[NodeId]>, GatewayError> {
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

    /// Whether `model` is a metric label: a node lists it, or it has a
    /// price by its exact name (configured, shipped, or a node's own). The
    /// labels stay bounded by the config and the price table; any other
    /// name a client sends is `other`.
    pub fn labels_model(&self, model: &str) -> bool {
        self.lists_model(model) || self.priced.contains(model)
    }
}

/// What the gateway keeps of a node across snapshots.
#[derive(Debug)]
struct Tracked {
    url: Arc<str>,
    /// The models it lists: a change brings back every model it was out for.
    models: Option<Vec<String>>,
    /// Its held connections, kept across reloads while the URL and the
    /// `ca_file`'s certificates stay.
    connections: Arc<Connections>,
    /// The `ca_file`'s contents its connections trust.
    ca_pem: Option<Vec<u8>>,
    limiter: Arc<Limiter>,
    health: Arc<NodeHealth>,
    metrics: Arc<NodeMetrics>,
}

/// What outlives snapshots, by node name, and the signals every node's
/// limiter and health ring.
#[derive(Debug)]
pub struct Kept {
    nodes: Mutex<HashMap<Arc<str>, Tracked>>,
    /// Rung when capacity may have been freed (the queue listens).
    pub signal: Arc<HeadroomSignal>,
    /// Rung when a node needs a probe sooner (the probe task listens).
    pub health_wake: Arc<Notify>,
}

/// A node that left the config and still has requests in flight or
/// requests in its window.
#[derive(Debug)]
pub struct Retired {
    pub name: Arc<str>,
    pub limiter: Arc<Limiter>,
}

impl Kept {
    pub fn new(signal: Arc<HeadroomSignal>) -> Self {
        Self {
            nodes: Mutex::new(HashMap::new()),
            signal,
            health_wake: Arc::new(Notify::new()),
        }
    }

    /// Nodes `live` no longer has that still finish requests or hold a
    /// window, by name.
    pub fn retired(&self, live: &Live) -> Vec<Retired> {
        let nodes = self.nodes.lock();
        let mut out: Vec<Retired> = nodes
            .iter()
            .filter(|(name, _)| live.node_named(name).is_none())
            .map(|(name, t)| Retired {
                name: Arc::clone(name),
                limiter: Arc::clone(&t.limiter),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn new_health(&self, node: &NodeConfig) -> Arc<NodeHealth> {
        NodeHealth::new(
            Arc::clone(&node.name),
            node.key.clone(),
            Arc::clone(&self.health_wake),
            Arc::clone(&self.signal),
        )
    }
}

/// Builds the snapshot of `config`: every fallible step first (CA
/// bundles, TLS settings, header values, URLs), then, once all succeeded,
/// the nodes are matched with what [`Kept`] holds of them.
pub fn prepare(
    config: Config,
    generation: u64,
    kept: &Kept,
    registry: &Registry,
) -> Result<Live, String> {
    let mut shared_tls = SharedTls::default();
    let built = config
        .nodes
        .iter()
        .map(|node| build(&config, node, &mut shared_tls))
        .collect::<Result<Vec<_>, String>>()?;

    // Nothing below fails.
    let now = Instant::now();
    let mut tracked = kept.nodes.lock();
    let clients = Directory::build(&config.clients, registry);
    let nodes: Vec<Node> = built
        .into_iter()
        .map(|built| kept.keep(&mut tracked, built, &config))
        .collect();
    tracked.retain(|name, t| {
        if config.nodes.iter().any(|n| n.name == *name) {
            return true;
        }
        t.limiter.retire();
        !t.limiter.is_idle(now)
    });
    drop(tracked);
    Ok(index(config, generation, clients, nodes))
}

/// Every fallible step of one node: its `ca_file` read, and its endpoint.
fn build<'c>(
    config: &Config,
    node: &'c NodeConfig,
    shared_tls: &mut SharedTls,
) -> Result<Built<'c>, String> {
    let ca_pem = match &node.ca_file {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(|e| format!("node '{}': cannot read ca_file: {e}", node.name))?,
        ),
        None => None,
    };
    let timeout = config.upstream.connect_timeout;
    let endpoint = Endpoint::build(node, ca_pem.as_deref(), timeout, shared_tls)?;
    Ok(Built {
        node,
        endpoint,
        ca_pem,
    })
}

impl Kept {
    /// The snapshot's node for `built`, with what is kept of it across
    /// reloads (made now if it is new, brought up to its config if not).
    fn keep(
        &self,
        tracked: &mut HashMap<Arc<str>, Tracked>,
        built: Built<'_>,
        config: &Config,
    ) -> Node {
        let Built {
            node,
            endpoint,
            ca_pem,
        } = built;
        let entry = tracked
            .entry(Arc::clone(&node.name))
            .or_insert_with(|| Tracked {
                url: Arc::clone(&node.url),
                models: node.models.clone(),
                ca_pem: ca_pem.clone(),
                connections: Arc::clone(&endpoint.connections),
                limiter: Limiter::new(node.quota, Arc::clone(&self.signal)),
                health: self.new_health(node),
                metrics: Arc::default(),
            });
        self.follow(entry, node, ca_pem, &endpoint, config);
        Node {
            name: Arc::clone(&node.name),
            endpoint: endpoint.over(Arc::clone(&entry.connections)),
            models: node.models.clone(),
            limiter: Arc::clone(&entry.limiter),
            health: Arc::clone(&entry.health),
            metrics: Arc::clone(&entry.metrics),
            pricing: node.pricing.clone(),
            default_completion_tokens: node.default_completion_tokens,
        }
    }

    /// Brings what is kept of a node up to its config: a node moved to
    /// another URL starts healthy and rested, on new connections; a new
    /// key ends its rest; limits, window and accounting follow the config.
    fn follow(
        &self,
        entry: &mut Tracked,
        node: &NodeConfig,
        ca_pem: Option<Vec<u8>>,
        endpoint: &Endpoint,
        config: &Config,
    ) {
        // Compared before anything is updated: a node moved to another
        // host must never keep the old host's connections (they would carry
        // the new key to the old host).
        let moved = entry.url != node.url;
        let rekeyed = !entry.health.has_key(&node.key);
        if moved {
            // Another deployment under the same name: its health starts
            // afresh; its window stays (it may be the same key's quota).
            entry.url = Arc::clone(&node.url);
            entry.health = self.new_health(node);
        }
        if moved || rekeyed {
            // The rest the old upstream or key asked for is not the new one's.
            entry.limiter.clear_cooldown();
        }
        if moved || entry.ca_pem != ca_pem {
            // Another place, or another trust: new connections.
            entry.ca_pem = ca_pem;
            entry.connections = Arc::clone(&endpoint.connections);
        }
        entry
            .connections
            .set_connect_timeout(config.upstream.connect_timeout);
        entry.limiter.revive();
        entry.limiter.apply(&node.limits());
        entry.health.set_key(node.key.clone());
        if entry.models != node.models {
            entry.models.clone_from(&node.models);
            entry.health.models_changed();
        }
    }
}

/// The model index and the `/v1/models` answer of `nodes`.
fn index(config: Config, generation: u64, clients: Directory, nodes: Vec<Node>) -> Live {
    let ids = || (0..nodes.len()).map(NodeId::from_index);
    let any_model: Arc<[NodeId]> = ids()
        .filter(|id| nodes[id.index()].models.is_none())
        .collect();
    let mut by_model: HashMap<String, Vec<NodeId>> = HashMap::new();
    for id in ids() {
        for model in nodes[id.index()].models.iter().flatten() {
            by_model.entry(model.clone()).or_default().push(id);
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
    let completion_defaults = CompletionDefaults {
        tokens: config.accounting.default_completion_tokens,
        by_model: config.accounting.default_completion_tokens_by_model.clone(),
    };
    let priced = config
        .prices
        .iter()
        .chain(nodes.iter().flat_map(|n| n.pricing.own.iter()))
        .map(|(model, _)| model.to_owned())
        .collect();
    Live {
        generation,
        priced,
        completion_defaults,
        clients,
        all: ids().collect(),
        config,
        nodes,
        by_model,
        any_model,
        models_list,
    }
}
