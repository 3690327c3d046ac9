//! Active health probes: a background task that sends `GET {url}{path}`
//! with each node's key when its probe is due, at most
//! `health.max_concurrent_probes` at a time, and hands each verdict to the
//! node's [`NodeHealth`](crate::health::NodeHealth) state machine.
//!
//! Probes never run on the request path and take nothing from a node's
//! limits. The task reads the live snapshot each round, so a reload changes
//! what it probes; it sleeps until the next probe is due or a node asks for
//! one sooner (the wake signal).

use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::http::StatusCode;
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::HealthSettings;
use crate::health::{Verdict, human};
use crate::snapshot::{Node, NodeId};
use crate::state::AppState;
use crate::upstream::{self, Failure};

/// Sends one probe: `GET {url}{path}` with the node's key, within
/// `timeout`, over the node's own connections.
pub(crate) async fn probe(node: &Node, settings: &HealthSettings) -> Verdict {
    match upstream::probe(&node.endpoint, &settings.path, settings.timeout).await {
        // A 429 is a live node at its limit.
        Ok(status) if status.is_success() || status == StatusCode::TOO_MANY_REQUESTS => {
            Verdict::Answered
        }
        Ok(status) if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN => {
            Verdict::KeyRefused(status)
        }
        Ok(status) => Verdict::Failed(format!("answered {status}")),
        Err(Failure::Timeout) => {
            Verdict::Failed(format!("timed out after {}", human(settings.timeout)))
        }
        Err(Failure::Connect) => Verdict::Unreachable("could not connect".to_owned()),
        Err(Failure::Broken) => Verdict::Failed("connection broke".to_owned()),
    }
}

/// A request to `node` was answered 401/403: is it the node's own key the
/// upstream refuses, or only the request? A probe with the key alone
/// decides (even with `health.enabled = false`: one `GET` per
/// suspected refusal, at most one at a time, none within
/// [`KEY_CONFIRMED_FOR`](crate::health::KEY_CONFIRMED_FOR) of an accepted
/// probe). `true`: the key is refused and the node is out of rotation.
pub(crate) async fn key_refused(node: &Node, settings: &HealthSettings) -> bool {
    if !node.health.begin_key_check(Instant::now()) {
        return false;
    }
    let verdict = probe(node, settings).await;
    let refused = matches!(verdict, Verdict::KeyRefused(_));
    node.health.on_probe(verdict, settings, &settings.path);
    node.health.end_key_check();
    refused
}

/// Probes one node (when probes are on), or with probes off readmits an
/// ejected one on trial.
async fn check(node: &Node, settings: &HealthSettings) {
    if settings.enabled {
        let verdict = probe(node, settings).await;
        if let Verdict::Failed(why) = &verdict {
            tracing::debug!(node = %node.name, why, "probe failed");
        }
        node.health.on_probe(verdict, settings, &settings.path);
    } else {
        node.health.readmit_on_trial(settings);
    }
}

/// The probe task: probes every node when due, at most
/// `health.max_concurrent_probes` at a time, until `cancel` fires. It reads
/// the live snapshot each round, so reloads change what it probes.
pub(crate) async fn run(state: Weak<AppState>, wake: Arc<Notify>, cancel: CancellationToken) {
    let mut generation_seen = None;
    loop {
        let Some(live) = state.upgrade().map(|s| s.live()) else {
            return;
        };
        let settings = &live.config.health;
        let now = Instant::now();
        // A new snapshot may have turned probes on or off or changed the interval.
        if generation_seen != Some(live.generation) {
            generation_seen = Some(live.generation);
            for node in live.nodes() {
                node.health.reschedule(settings, now);
            }
        }
        let due: Vec<NodeId> = live
            .node_ids()
            .filter(|&id| live.node(id).health.next_due().is_some_and(|t| t <= now))
            .collect();
        // Each probe owns its snapshot handle: borrowed futures in a
        // buffered stream trip a compiler limitation on `Send`.
        let probes = futures_util::stream::iter(due)
            .map(|id| {
                let live = Arc::clone(&live);
                async move { check(live.node(id), &live.config.health).await }
            })
            .buffer_unordered(settings.max_concurrent_probes.get());
        tokio::select! {
            () = cancel.cancelled() => return,
            () = probes.collect::<()>() => {}
        }
        let next = live.nodes().filter_map(|n| n.health.next_due()).min();
        drop(live);
        let far = Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = wake.notified() => {}
            () = tokio::time::sleep_until(next.unwrap_or(far)) => {}
        }
    }
}
