//! Prometheus metrics: what the request path records. The `/metrics`
//! scrape that reads it is [`crate::status::scrape`].
//!
//! Recording costs atomics only. A request's [`Route`] (its node and model)
//! is found once, when its answer arrives, through a copy-on-write map
//! ([`Routes`]): a read is one `ArcSwap` load and a hash lookup, never a
//! lock; only a model seen for the first time copies the map. Counters and
//! [`Histogram`] buckets are `AtomicU64`s.
//!
//! Everything that is a state rather than an event (utilisation of each
//! limit, health, cooldown, queue depth) is read at scrape time from the
//! same structures `/status` reads, so the two never disagree.
//!
//! Label values come from the config (node names, listed models) or from a
//! bounded set (status codes, error kinds). A model a node serves without
//! listing it takes a label of its own up to [`MAX_MODELS_PER_NODE`], then
//! `other`, so clients sending made-up model names cannot grow the scrape
//! without bound.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::http::StatusCode;
use tokio::time::Instant;

/// Upper bounds (seconds) of the latency histograms: from a cached answer
/// (milliseconds) to a long completion (minutes).
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Distinct model labels a node keeps before it counts the rest as
/// `other`. Far above what one deployment serves; low enough that made-up
/// model names cannot grow the scrape without bound.
pub const MAX_MODELS_PER_NODE: usize = 64;

/// The label of models past [`MAX_MODELS_PER_NODE`].
pub const OTHER_MODEL: &str = "other";

/// HTTP status codes are 100..=999: one counter each, kept flat so that
/// counting a status is an index, not a lookup.
const STATUS_SLOTS: usize = 900;

/// A latency histogram with fixed [`LATENCY_BUCKETS`], lock-free.
#[derive(Debug)]
pub struct Histogram {
    /// One per bound, then the `+Inf` bucket; not cumulative.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let slot = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    pub(crate) fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::MetricEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        encoder
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }
}

/// What one node did for one model (or, for the gateway's own answers, for
/// one model with no node).
#[derive(Debug)]
pub struct Route {
    /// The model label: the model, or [`OTHER_MODEL`], or `""` when none
    /// was asked for or it is not one the config lists.
    pub model: Box<str>,
    responses: Box<[AtomicU64]>,
    pub duration: Histogram,
    pub first_byte: Histogram,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub request_bytes: AtomicU64,
    pub response_bytes: AtomicU64,
    /// What requests without a client of their own cost, nano-dollars.
    pub cost_nanos: AtomicU64,
}

impl Route {
    fn new(model: &str) -> Self {
        Self {
            model: model.into(),
            responses: (0..STATUS_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            duration: Histogram::default(),
            first_byte: Histogram::default(),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            request_bytes: AtomicU64::new(0),
            response_bytes: AtomicU64::new(0),
            cost_nanos: AtomicU64::new(0),
        }
    }

    /// Counts one request answered with `status` after `elapsed`.
    pub fn answered(&self, status: StatusCode, elapsed: Duration) {
        let slot = usize::from(status.as_u16()).saturating_sub(100);
        if let Some(counter) = self.responses.get(slot) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        self.duration.observe(elapsed);
    }

    /// Requests answered with `status` so far.
    pub fn responses(&self, status: StatusCode) -> u64 {
        let slot = usize::from(status.as_u16()).saturating_sub(100);
        self.responses
            .get(slot)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub(crate) fn statuses(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.responses.iter().enumerate().filter_map(|(slot, c)| {
            let n = c.load(Ordering::Relaxed);
            (n > 0).then_some((slot as u16 + 100, n))
        })
    }
}

/// The [`Route`]s of one node (or of the gateway itself), by model label.
#[derive(Debug, Default)]
pub struct Routes {
    by_model: ArcSwap<HashMap<Box<str>, Arc<Route>>>,
}

impl Routes {
    /// The route for `model`, made on first sight.
    pub fn route(&self, model: &str) -> Arc<Route> {
        if let Some(route) = self.by_model.load().get(model) {
            return Arc::clone(route);
        }
        let mut found = None;
        // Copy-on-write, rare: once per model and node.
        self.by_model.rcu(|current| {
            let label = if current.contains_key(model) || current.len() < MAX_MODELS_PER_NODE {
                model
            } else {
                OTHER_MODEL
            };
            if let Some(route) = current.get(label) {
                found = Some(Arc::clone(route));
                return Arc::clone(current);
            }
            let route = Arc::new(Route::new(label));
            found = Some(Arc::clone(&route));
            let mut next = HashMap::clone(current);
            next.insert(label.into(), route);
            Arc::new(next)
        });
        found.unwrap_or_else(|| Arc::new(Route::new(model)))
    }

    pub(crate) fn sorted(&self) -> Vec<Arc<Route>> {
        let mut routes: Vec<Arc<Route>> = self.by_model.load().values().cloned().collect();
        routes.sort_by(|a, b| a.model.cmp(&b.model));
        routes
    }
}

/// Why an attempt on a node did not give the client its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    /// No connection could be made.
    Connect,
    /// No response head within `first_byte_timeout`.
    Timeout,
    /// The connection broke before the head.
    Broken,
    /// 429.
    RateLimited,
    /// 401 or 403: the node's key was refused.
    KeyRefused,
    /// 5xx.
    ServerError,
}

impl UpstreamError {
    pub(crate) const ALL: [UpstreamError; 6] = [
        UpstreamError::Connect,
        UpstreamError::Timeout,
        UpstreamError::Broken,
        UpstreamError::RateLimited,
        UpstreamError::KeyRefused,
        UpstreamError::ServerError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamError::Connect => "connect",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Broken => "broken",
            UpstreamError::RateLimited => "rate_limited",
            UpstreamError::KeyRefused => "key_refused",
            UpstreamError::ServerError => "server_error",
        }
    }

    /// The kind of error an answer with `status` is, if it is one.
    pub fn of_status(status: StatusCode) -> Option<Self> {
        match status.as_u16() {
            429 => Some(UpstreamError::RateLimited),
            401 | 403 => Some(UpstreamError::KeyRefused),
            500..=599 => Some(UpstreamError::ServerError),
            _ => None,
        }
    }
}

/// One node's counters; kept by node name across reloads, like its window.
#[derive(Debug, Default)]
pub struct NodeMetrics {
    pub routes: Routes,
    errors: [AtomicU64; UpstreamError::ALL.len()],
    retries: AtomicU64,
    /// Times a failure judged the node's took it out of rotation, for
    /// every model (`[0]`) or for the model asked for (`[1]`), by kind.
    ejections: [[AtomicU64; UpstreamError::ALL.len()]; 2],
}

impl NodeMetrics {
    pub fn upstream_error(&self, kind: UpstreamError) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A failure of `kind` judged the node's took it out of rotation: for
    /// every model, or (`for_model`) for the one asked for.
    pub fn ejected(&self, kind: UpstreamError, for_model: bool) {
        self.ejections[usize::from(for_model)][kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Ejections since start: scope (`node` or `model`), kind, count.
    pub fn ejections(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + '_ {
        ["node", "model"]
            .into_iter()
            .zip(&self.ejections)
            .flat_map(|(scope, kinds)| {
                UpstreamError::ALL.iter().map(move |kind| {
                    (
                        scope,
                        kind.as_str(),
                        kinds[*kind as usize].load(Ordering::Relaxed),
                    )
                })
            })
    }

    /// A request this node failed was tried again on another node.
    pub fn retried_elsewhere(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Upstream errors by kind since start, for `/status`.
    pub fn errors(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        UpstreamError::ALL.iter().map(|kind| {
            (
                kind.as_str(),
                self.errors[*kind as usize].load(Ordering::Relaxed),
            )
        })
    }

    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// (prompt, completion) tokens its answers settled at since start, over
    /// every model.
    pub fn tokens(&self) -> (u64, u64) {
        self.routes
            .by_model
            .load()
            .values()
            .fold((0, 0), |(prompt, completion), route| {
                (
                    prompt + route.prompt_tokens.load(Ordering::Relaxed),
                    completion + route.completion_tokens.load(Ordering::Relaxed),
                )
            })
    }
}

/// The gateway's own counters: requests it answered itself, and the queue.
#[derive(Debug, Default)]
pub struct GatewayMetrics {
    /// Requests answered without any node (refused, or no node reached).
    pub answered: Routes,
    /// How long each admitted or refused request waited for a node.
    pub queue_wait: Histogram,
    /// Requests placed above the lowest tier in rotation that serves them,
    /// by (that tier, the tier placed on).
    spills: [[AtomicU64; TIERS]; TIERS],
}

/// Tiers counted (`nodes[].tier` is from 0 to 7).
const TIERS: usize = 8;

impl GatewayMetrics {
    /// A request went up from tier `from` (full) to tier `to`.
    pub fn spilled(&self, from: u32, to: u32) {
        if let Some(count) = self
            .spills
            .get(from as usize)
            .and_then(|row| row.get(to as usize))
        {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Spills so far: (from tier, to tier, count), those that happened.
    pub fn spills(&self) -> impl Iterator<Item = (usize, usize, u64)> + '_ {
        self.spills.iter().enumerate().flat_map(|(from, row)| {
            row.iter().enumerate().filter_map(move |(to, n)| {
                let n = n.load(Ordering::Relaxed);
                (n > 0).then_some((from, to, n))
            })
        })
    }
}

/// What requests cost, in nano-dollars, by node and model label: a counter
/// made on first sight (copy-on-write, once per node and model), then an
/// atomic add.
#[derive(Debug, Default)]
pub struct Costs {
    by_node: ArcSwap<HashMap<Arc<str>, CostsOfNode>>,
}

/// One node's cost counters, by model label.
type CostsOfNode = HashMap<Box<str>, Arc<AtomicU64>>;

impl Costs {
    pub fn add(&self, node: &Arc<str>, model: &str, nanos: u64) {
        if let Some(counter) = self.by_node.load().get(node).and_then(|m| m.get(model)) {
            counter.fetch_add(nanos, Ordering::Relaxed);
            return;
        }
        let mut counter = None;
        self.by_node.rcu(|current| {
            if let Some(found) = current.get(node).and_then(|m| m.get(model)) {
                counter = Some(Arc::clone(found));
                return Arc::clone(current);
            }
            let made = Arc::new(AtomicU64::new(0));
            counter = Some(Arc::clone(&made));
            let mut next = HashMap::clone(current);
            next.entry(Arc::clone(node))
                .or_default()
                .insert(model.into(), made);
            Arc::new(next)
        });
        if let Some(counter) = counter {
            counter.fetch_add(nanos, Ordering::Relaxed);
        }
    }

    /// Every (node, model, nano-dollars), sorted.
    pub fn sorted(&self) -> Vec<(Arc<str>, Box<str>, u64)> {
        let mut all: Vec<_> = self
            .by_node
            .load()
            .iter()
            .flat_map(|(node, models)| {
                models
                    .iter()
                    .map(|(model, n)| (Arc::clone(node), model.clone(), n.load(Ordering::Relaxed)))
            })
            .collect();
        all.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        all
    }
}

/// Time since `since`, by the clock the request path uses.
pub fn elapsed(since: Instant) -> Duration {
    Instant::now().saturating_duration_since(since)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_puts_each_observation_in_the_first_bucket_that_holds_it() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(6));
        h.observe(Duration::from_secs(500));
        assert_eq!(h.buckets[0].load(Ordering::Relaxed), 1);
        assert_eq!(h.buckets[1].load(Ordering::Relaxed), 1);
        assert_eq!(h.buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed), 1);
        assert_eq!(h.count(), 3);
        assert_eq!(h.sum_micros.load(Ordering::Relaxed), 500_011_000);
    }

    #[test]
    fn a_node_keeps_a_bounded_number_of_model_labels() {
        let routes = Routes::default();
        let first = routes.route("gpt-4o");
        assert!(Arc::ptr_eq(&first, &routes.route("gpt-4o")));
        for i in 1..MAX_MODELS_PER_NODE {
            routes.route(&format!("made-up-{i}"));
        }
        let over = routes.route("one-too-many");
        assert_eq!(&*over.model, OTHER_MODEL);
        assert!(Arc::ptr_eq(&over, &routes.route("another")));
        // A model already labelled keeps its label.
        assert_eq!(&*routes.route("gpt-4o").model, "gpt-4o");
        assert_eq!(routes.sorted().len(), MAX_MODELS_PER_NODE + 1);
    }

    #[test]
    fn statuses_are_counted_by_code() {
        let route = Route::new("m");
        route.answered(StatusCode::OK, Duration::ZERO);
        route.answered(StatusCode::OK, Duration::ZERO);
        route.answered(StatusCode::TOO_MANY_REQUESTS, Duration::ZERO);
        assert_eq!(route.statuses().collect::<Vec<_>>(), [(200, 2), (429, 1)]);
        assert_eq!(route.responses(StatusCode::OK), 2);
    }
}
