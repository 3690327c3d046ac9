//! `GET /metrics`: the gateway's state, encoded by `prometheus-client` in
//! the OpenMetrics text format (which Prometheus negotiates by default).
//!
//! What happened (requests, tokens, bytes, errors) is read from the
//! atomics of [`crate::metrics`]; what is (use of each limit, health,
//! cooldown, queue depth) is read at scrape time from the structures
//! `/status` reads, so the two never disagree. Metric names follow
//! Prometheus conventions: a `balancer_` prefix, base units (seconds,
//! bytes), `_total` on counters, `_ratio` on fractions.

use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::time::Instant;

use crate::limits::LimiterSnapshot;
use crate::metrics::{Histogram, Route};
use crate::snapshot::Live;
use crate::state::AppState;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `GET /metrics`.
pub(crate) async fn handle(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
) -> Response {
    let private = super::sees_private(&state.live(), &headers);
    let mut registry = Registry::with_prefix("balancer");
    registry.register_collector(Box::new(Scrape { state, private }));
    let mut body = String::with_capacity(16 * 1024);
    match prometheus_client::encoding::text::encode(&mut body, &registry) {
        Ok(()) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS))],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

type Fmt = Result<(), std::fmt::Error>;

/// Reads the gateway's state once per scrape.
/// The state to encode; `private`: with the series that name clients.
struct Scrape {
    state: Arc<AppState>,
    private: bool,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}
impl Collector for Scrape {
    fn encode(&self, mut out: DescriptorEncoder<'_>) -> Fmt {
        let state = &self.state;
        let live = state.live();
        // (node label, routes): the gateway's own answers under node="".
        let mut routed: Vec<(&str, Vec<Arc<Route>>)> = live
            .nodes()
            .map(|n| (&*n.name, n.metrics.routes.sorted()))
            .collect();
        routed.push(("", state.metrics.answered.sorted()));
        encode_routes(&mut out, &routed)?;
        encode_costs(&mut out, state, &routed, self.private)?;
        encode_queue(&mut out, state)?;
        encode_node_limits(&mut out, &live)?;
        encode_node_health(&mut out, &live)?;
        encode_clients(&mut out, state, self.private)
    }
}

/// Requests, latencies, tokens and bytes by node and model.
fn encode_routes(out: &mut DescriptorEncoder<'_>, routed: &[(&str, Vec<Arc<Route>>)]) -> Fmt {
    let mut family = out.encode_descriptor(
        "requests",
        "Requests answered, by the node that answered (\"\" when the gateway answered itself), model and status code.",
        None,
        MetricType::Counter,
    )?;
    for (node, routes) in routed {
        for route in routes {
            for (code, n) in route.statuses() {
                let code = code.to_string();
                let labels = [("node", *node), ("model", &route.model), ("code", &code)];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
    }
    for (name, help, pick) in [
        (
            "request_duration",
            "Time from a request's arrival to the end of its answer.",
            (|r: &Route| &r.duration) as fn(&Route) -> &Histogram,
        ),
        (
            "time_to_first_byte",
            "Time from a request's arrival to the first byte of its answer's body.",
            |r: &Route| &r.first_byte,
        ),
    ] {
        let mut family =
            out.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
        for (node, routes) in routed {
            for route in routes.iter().filter(|r| pick(r).count() > 0) {
                let labels = [("node", *node), ("model", &*route.model)];
                pick(route).encode(&mut family.encode_family(&labels)?)?;
            }
        }
    }
    let mut family = out.encode_descriptor(
        "tokens",
        "Tokens used by answered requests: the answer's usage, else the tokenizer's count.",
        None,
        MetricType::Counter,
    )?;
    for (node, routes) in &routed[..routed.len() - 1] {
        for route in routes {
            for (kind, n) in [
                ("prompt", &route.prompt_tokens),
                ("completion", &route.completion_tokens),
            ] {
                let labels = [("node", *node), ("model", &route.model), ("kind", kind)];
                let n = n.load(Ordering::Relaxed);
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
    }
    let mut family = out.encode_descriptor(
        "transferred",
        "Bytes sent to nodes (request bodies) and relayed back (response bodies).",
        Some(&Unit::Bytes),
        MetricType::Counter,
    )?;
    for (node, routes) in &routed[..routed.len() - 1] {
        for route in routes {
            for (direction, n) in [
                ("request", &route.request_bytes),
                ("response", &route.response_bytes),
            ] {
                let labels = [
                    ("node", *node),
                    ("model", &route.model),
                    ("direction", direction),
                ];
                let n = n.load(Ordering::Relaxed);
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
    }

    Ok(())
}

/// The waiting room: depth, waits, refusals.
fn encode_queue(out: &mut DescriptorEncoder<'_>, state: &AppState) -> Fmt {
    // The queue.
    let depth = ConstGauge::new(state.admission.depth() as i64);
    depth.encode(out.encode_descriptor(
        "queue_depth",
        "Requests waiting for headroom now.",
        None,
        depth.metric_type(),
    )?)?;
    state.metrics.queue_wait.encode(&mut out.encode_descriptor(
        "queue_wait",
        "How long requests waited for a node with headroom (0 when placed at once).",
        Some(&Unit::Seconds),
        MetricType::Histogram,
    )?)?;
    let budget_waiting = ConstGauge::new(state.admission.budget_waiting() as i64);
    budget_waiting.encode(out.encode_descriptor(
        "budget_waiting",
        "Requests waiting now for budget their client's requests in flight hold.",
        None,
        budget_waiting.metric_type(),
    )?)?;
    let refused = ConstCounter::new(state.admission.refused_total());
    refused.encode(out.encode_descriptor(
        "queue_refused",
        "Requests refused with 429 because every node stayed saturated until their deadline.",
        None,
        refused.metric_type(),
    )?)?;
    // With [cluster]: whether the shared limits answer.
    if let Some(shared) = &state.admission.shared {
        let up = ConstGauge::new(i64::from(shared.is_up()));
        up.encode(out.encode_descriptor(
            "cluster_redis_up",
            "1 while Redis (the limits shared with other replicas) answers, 0 while on_redis_error applies.",
            None,
            up.metric_type(),
        )?)?;
    }

    let mut family = out.encode_descriptor(
        "spill",
        "Requests placed above the lowest tier in rotation that serves them (it was full), by that tier and the tier placed on.",
        None,
        MetricType::Counter,
    )?;
    for (from, to, n) in state.metrics.spills() {
        let (from, to) = (from.to_string(), to.to_string());
        let labels = [("from_tier", from.as_str()), ("to_tier", to.as_str())];
        ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Each node's limits and what it uses of them.
fn encode_node_limits(out: &mut DescriptorEncoder<'_>, live: &Live) -> Fmt {
    let now = Instant::now();
    // Each node's state, read as /status reads it.
    let usages: Vec<LimiterSnapshot> = live.nodes().map(|n| n.limiter.snapshot(now)).collect();
    let limits = |u: &LimiterSnapshot| {
        [
            ("rpm", u.quota.rpm, u.requests),
            ("tpm", u.quota.tpm, u.tokens),
            ("bpm", u.quota.bpm, u.bytes),
            ("concurrency", u.quota.max_concurrency, u.in_flight),
        ]
    };
    // What each gauge shows of one limit: (quota, used) to a value, or none.
    type Pick = fn(Option<NonZeroU64>, u64) -> Option<f64>;
    let gauges: [(&str, &str, Pick); 3] = [
        (
            "node_limit",
            "Each node's configured limit (absent when unlimited).",
            |quota, _| quota.map(|q| u64::from(q) as f64),
        ),
        (
            "node_used",
            "What each node has used of each limit: in the rolling minute (rpm, tpm, bpm) or now (concurrency).",
            |_, used| Some(used as f64),
        ),
        (
            "node_utilization_ratio",
            "Used over limit, for each limit a node has (1 = at its quota).",
            |quota, used| quota.map(|q| used as f64 / u64::from(q) as f64),
        ),
    ];
    for (name, help, pick) in gauges {
        let mut family = out.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (node, u) in live.nodes().zip(&usages) {
            for (limit, quota, used) in limits(u) {
                if let Some(value) = pick(quota, used) {
                    let labels = [("node", &*node.name), ("limit", limit)];
                    ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
                }
            }
        }
    }
    Ok(())
}

/// Each node's health, cooldown, retries, upstream errors and ejections.
fn encode_node_health(out: &mut DescriptorEncoder<'_>, live: &Live) -> Fmt {
    let now = Instant::now();
    let mut family = out.encode_descriptor(
        "node_healthy",
        "1 when the node is in rotation, 0 when health checks or failures took it out.",
        None,
        MetricType::Gauge,
    )?;
    for node in live.nodes() {
        let labels = [("node", &*node.name)];
        ConstGauge::new(i64::from(node.health.in_rotation()))
            .encode(family.encode_family(&labels)?)?;
    }
    let mut family = out.encode_descriptor(
        "node_cooldown_remaining",
        "Time until a node cooled down after a 429 takes requests again (0 when it is not cooling down).",
        Some(&Unit::Seconds),
        MetricType::Gauge,
    )?;
    for node in live.nodes() {
        let labels = [("node", &*node.name)];
        let cooldown = node.limiter.snapshot(now).cooldown;
        let left = cooldown.map_or(0.0, |(left, _)| left.as_secs_f64());
        ConstGauge::new(left).encode(family.encode_family(&labels)?)?;
    }
    let mut family = out.encode_descriptor(
        "retries",
        "Requests a node failed before any byte reached the client, then sent to another node.",
        None,
        MetricType::Counter,
    )?;
    for node in live.nodes() {
        let labels = [("node", &*node.name)];
        ConstCounter::new(node.metrics.retries()).encode(family.encode_family(&labels)?)?;
    }
    let mut family = out.encode_descriptor(
        "upstream_errors",
        "Attempts on a node that failed, by kind: connect, timeout, broken (no answer), rate_limited (429), key_refused (401/403), server_error (5xx).",
        None,
        MetricType::Counter,
    )?;
    for node in live.nodes() {
        for (kind, n) in node.metrics.errors() {
            let labels = [("node", &*node.name), ("kind", kind)];
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
    }
    let mut family = out.encode_descriptor(
        "node_ejections",
        "Times failures judged a node's own (the same request then succeeded elsewhere) took it out of rotation, for every model (scope node) or for one (scope model), by the failure's kind.",
        None,
        MetricType::Counter,
    )?;
    for node in live.nodes() {
        for (scope, kind, n) in node.metrics.ejections() {
            let labels = [("node", &*node.name), ("scope", scope), ("kind", kind)];
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// What requests cost, by node, model and client (`""`: no client key);
/// without `private`, the clients' series are left out.
fn encode_costs(
    out: &mut DescriptorEncoder<'_>,
    state: &AppState,
    routed: &[(&str, Vec<Arc<Route>>)],
    private: bool,
) -> Fmt {
    let mut family = out.encode_descriptor(
        "cost_usd",
        "What answered requests cost at the configured prices, US dollars.",
        None,
        MetricType::Counter,
    )?;
    let usd = |nanos: u64| nanos as f64 / 1e9;
    for (node, routes) in &routed[..routed.len() - 1] {
        for route in routes {
            let nanos = route.cost_nanos.load(Ordering::Relaxed);
            if nanos > 0 {
                let labels = [("node", *node), ("model", &*route.model), ("client", "")];
                ConstCounter::new(usd(nanos)).encode(family.encode_family(&labels)?)?;
            }
        }
    }
    let clients = if private {
        state.clients.counters()
    } else {
        Vec::new()
    };
    for (id, counters) in clients {
        for (node, model, nanos) in counters.costs.sorted() {
            let labels = [("node", &*node), ("model", &*model), ("client", &*id)];
            ConstCounter::new(usd(nanos)).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// Per-client counters, when there are clients and `private` allows.
fn encode_clients(out: &mut DescriptorEncoder<'_>, state: &AppState, private: bool) -> Fmt {
    let dropped = ConstCounter::new(state.clients.ledger().dropped());
    dropped.encode(out.encode_descriptor(
        "usage_dropped",
        "Usage rows the store refused for their data (logged), so not recorded.",
        None,
        dropped.metric_type(),
    )?)?;
    // Clients, when there are any and the caller may see them.
    let clients = state.clients.counters();
    if private && !clients.is_empty() {
        let mut family = out.encode_descriptor(
            "client_requests",
            "Requests each client made that a node answered.",
            None,
            MetricType::Counter,
        )?;
        for (id, counters) in &clients {
            let name = counters.name();
            let labels = [("client", &**id), ("name", &*name)];
            ConstCounter::new(counters.requests()).encode(family.encode_family(&labels)?)?;
        }
        let mut family = out.encode_descriptor(
            "client_tokens",
            "Tokens each client used, as recorded in its usage.",
            None,
            MetricType::Counter,
        )?;
        for (id, counters) in &clients {
            let name = counters.name();
            let (prompt, completion) = counters.tokens();
            for (kind, n) in [("prompt", prompt), ("completion", completion)] {
                let labels = [("client", &**id), ("name", &*name), ("kind", kind)];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
    }
    Ok(())
}
