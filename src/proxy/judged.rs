//! Whose fault a failure was, judged by what happened to the same request
//! elsewhere. A failure on node X (no connection, no answer in time, a
//! broken answer, a 5xx, a 401/403) counts against X only when the request
//! then succeeded on another node, or, for a 401/403, when a probe with
//! X's key alone is refused too. A failure every node tried shares is the
//! request's own: it counts against none of them, and a client whose
//! requests keep failing everywhere gets one attempt per request for a
//! while ([`crate::health::streak`]).

use tokio::time::Instant;

use super::Inbound;
use crate::health::{FailureStreak, Verdict};
use crate::metrics::UpstreamError;
use crate::probes;
use crate::snapshot::{Live, NodeId};
use crate::state::AppState;

/// A failure one attempt met on its node, until the request's end judges
/// it.
#[derive(Debug)]
pub(super) struct Fault {
    pub(super) node: NodeId,
    pub(super) verdict: Verdict,
    pub(super) kind: UpstreamError,
}

/// The streak of the client `request` comes from (or of the clients
/// without a key of their own).
pub(super) fn streak<'s>(state: &'s AppState, request: &Inbound<'s>) -> &'s FailureStreak {
    match request.client {
        Some(client) => &client.counters.streak,
        None => &state.anonymous_streak,
    }
}

/// How many nodes `request` may be tried on: one while its client's
/// requests keep failing everywhere, else `retry.attempts + 1`.
pub(super) fn attempts(state: &AppState, live: &Live, request: &Inbound<'_>) -> usize {
    if streak(state, request).single_attempt(Instant::now()) {
        1
    } else {
        live.config.retry.attempts as usize + 1
    }
}

/// Judges the `faults` a request met before its last attempt ended
/// (`served`: with a 2xx from another node). Served: each is its node's,
/// counted for the node and the model asked for. Not served: they are the
/// request's; only a key a probe refuses too takes a node out.
pub(super) async fn weigh(
    state: &AppState,
    live: &Live,
    request: &Inbound<'_>,
    faults: Vec<Fault>,
    served: bool,
) {
    let streak = streak(state, request);
    if served {
        streak.served();
    } else if !faults.is_empty() {
        streak.failed_everywhere(Instant::now());
    }
    let settings = &live.config.health;
    let model = request.info.model.as_deref();
    for fault in faults {
        let node = live.node(fault.node);
        let refused = matches!(fault.verdict, Verdict::KeyRefused(_));
        // The key itself refused: the node is out for every model.
        if refused && probes::key_refused(node, settings).await {
            continue;
        }
        if !served {
            continue;
        }
        let ejected = node
            .health
            .failed(fault.verdict, model, fault.kind.as_str(), settings);
        if ejected.node {
            node.metrics.ejected(fault.kind, false);
        }
        if ejected.model {
            node.metrics.ejected(fault.kind, true);
        }
    }
}
