//! One attempt on one node ([`try_node`]): what it got ([`Attempt`]),
//! whether another node should be tried, and how the request ends with
//! it: relayed, or the gateway's own error.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::Response;
use tokio::time::Instant;

use super::target::Target;
use super::{Inbound, candidates, headers, objects};
use crate::admission::{Booking, ClientHold, Placement};
use crate::deadline::WriteDeadline;
use crate::error::GatewayError;
use crate::health::Verdict;
use crate::metrics::UpstreamError;
use crate::outcome::{Trail, UsageTicket};
use crate::relay::{self, Answering, Held};
use crate::snapshot::{Live, Node, NodeId};
use crate::state::AppState;
use crate::upstream::{self, Failure, NodeVerdict, dialect};

use super::judged::Fault;

/// The result of one attempt on one node.
#[expect(
    clippy::large_enum_variant,
    reason = "one per attempt, on the stack; boxing the answer would allocate on every request"
)]
pub(super) enum Attempt {
    Answered {
        response: reqwest::Response,
        node: NodeId,
        booking: Booking,
    },
    Failed {
        node: NodeId,
        failure: Failure,
    },
}

impl Attempt {
    /// Whether another node should be tried: no answer, a 5xx, a 429, or
    /// a refused key (401/403: the node's key may not do what another
    /// node's may).
    pub(super) fn retryable(&self) -> bool {
        match self {
            Attempt::Answered { response, .. } => {
                let status = response.status();
                status.is_server_error()
                    || status == StatusCode::TOO_MANY_REQUESTS
                    || status == StatusCode::UNAUTHORIZED
                    || status == StatusCode::FORBIDDEN
            }
            Attempt::Failed { .. } => true,
        }
    }

    /// Whether the request was served: an answer with a 2xx status.
    pub(super) fn served(&self) -> bool {
        matches!(self, Attempt::Answered { response, .. } if response.status().is_success())
    }

    /// The failure this attempt may count against its node, if it was one
    /// (a 429 is a busy node, not a failing one).
    pub(super) fn fault(&self) -> Option<Fault> {
        match self {
            Attempt::Answered { response, node, .. } => {
                let status = response.status();
                let kind = UpstreamError::of_status(status)
                    .filter(|kind| *kind != UpstreamError::RateLimited)?;
                Some(Fault {
                    node: *node,
                    verdict: Verdict::of_status(status),
                    kind,
                })
            }
            Attempt::Failed { node, failure } => {
                let judged = NodeVerdict::failed(*failure);
                Some(Fault {
                    node: *node,
                    verdict: judged.health,
                    kind: judged.error?,
                })
            }
        }
    }

    /// An attempt that got no answer but may have reached the node (it
    /// timed out, or the connection broke): the node may bill it.
    pub(super) fn maybe_billed(&self) -> bool {
        matches!(
            self,
            Attempt::Failed {
                failure: Failure::Timeout | Failure::Broken,
                ..
            }
        )
    }

    /// Why another node is tried, for the request's span.
    pub(super) fn why(&self) -> &'static str {
        match self {
            Attempt::Answered { response, .. } => match response.status().as_u16() {
                429 => "rate_limited",
                401 | 403 => "key_refused",
                _ => "server_error",
            },
            Attempt::Failed { failure, .. } => match failure {
                Failure::Connect => "connect",
                Failure::Timeout => "timeout",
                Failure::Broken => "broken",
            },
        }
    }

    /// Ends an attempt superseded by a later one. An error answer used no
    /// completion, so only the prompt stays counted.
    pub(super) fn discard(self, prompt_tokens: u64) {
        if let Attempt::Answered { booking, .. } = self {
            booking.settle(prompt_tokens);
        }
    }

    /// The client's answer: the node's, relayed (once the objects it makes
    /// known are recorded); or, when no node answered, the gateway's own
    /// error.
    pub(super) async fn finish(
        self,
        state: &AppState,
        target: &Target,
        request: &Inbound<'_>,
        client: ClientHold,
        usage: Option<UsageTicket>,
        trail: &mut Trail,
    ) -> Result<Response, GatewayError> {
        let live = &target.live;
        let (response, node, booking) = match self {
            Attempt::Answered {
                response,
                node,
                booking,
                ..
            } => (response, node, booking),
            Attempt::Failed { node, failure } => {
                let node = live.node(node).name.to_string();
                return Err(match failure {
                    Failure::Timeout => GatewayError::UpstreamTimeout { node },
                    Failure::Connect | Failure::Broken => {
                        GatewayError::UpstreamUnavailable { node }
                    }
                });
            }
        };
        // Usage is recorded for answers the client got: what the upstream
        // served, whatever its status.
        let response = if request.routing.watches_answer() {
            let wait = request.deadline.saturating_duration_since(Instant::now());
            let node = live.node(node);
            objects::record_answer(state, node, &request.routing, response, wait).await?
        } else {
            response
        };
        // A client that stops reading is cut at the deadline.
        if let Some(write) = request.parts.extensions.get::<WriteDeadline>() {
            write.until(request.deadline);
        }
        let model = request.info.model.as_deref();
        let held = Held {
            booking,
            client,
            usage,
            creates: streamed_object(state, request),
            price: model.and_then(|model| live.price_on(node, model)),
        };
        let answering = Answering {
            info: request.info,
            path: request.parts.uri.path(),
            request_bytes: request.body.len() as u64,
            model_listed: target.model_listed,
            deadline: request.deadline,
        };
        let pool = candidates(live, model, &request.routing).unwrap_or_else(|_| Arc::from([node]));
        let rate_limits = headers::rate_limit_headers(live, &pool, request.client);
        let (node, trail) = (live.node(node), trail.hand_over());
        Ok(relay::relay(
            response,
            node,
            held,
            &answering,
            trail,
            rate_limits,
        ))
    }
}

/// The object a streamed answer to `request` creates, if it does.
fn streamed_object(state: &AppState, request: &Inbound<'_>) -> Option<relay::StreamedObject> {
    let kind = request.routing.creates.filter(|_| request.info.stream)?;
    Some(relay::StreamedObject {
        objects: Arc::clone(&state.objects),
        tasks: state.tasks.clone(),
        kind,
        owner: request.routing.owner(),
    })
}

/// One attempt of `request` on the placed node: sent, judged
/// ([`upstream::judge`]), and the verdict applied to the node.
pub(super) async fn try_node(live: &Live, placement: Placement, request: &Inbound<'_>) -> Attempt {
    let (id, booking) = (placement.node, placement.booking);
    let node = live.node(id);
    let settings = &live.config.health;
    let left = request.deadline.saturating_duration_since(Instant::now());
    let first_byte = live.config.upstream.first_byte_timeout.min(left);
    let (endpoint, operation) = (&node.endpoint, request.operation);
    let sent = upstream::send(
        endpoint,
        request.parts.method.clone(),
        dialect::url(endpoint, operation, request.info.model.as_deref()),
        &request.parts.headers,
        dialect::body_for(endpoint, operation, request.info, &request.body),
        first_byte,
        request.traceparent.as_ref(),
    )
    .await;
    let (answer, verdict) = upstream::judge(sent, settings, first_byte).await;
    apply(node, &booking, verdict, request.info.model.as_deref());
    match answer {
        Ok(response) => Attempt::Answered {
            response,
            node: id,
            booking,
        },
        Err(failure) => failed(node, id, booking, failure),
    }
}

/// An attempt that got no answer: its booking is taken back as far as the
/// failure allows.
fn failed(node: &Node, id: NodeId, booking: Booking, failure: Failure) -> Attempt {
    tracing::warn!(node = %node.name, ?failure, "upstream attempt failed");
    match failure {
        // Nothing reached the node: take the request back in full.
        Failure::Connect => booking.cancel(),
        // It may have been received: keep what was reserved.
        Failure::Timeout | Failure::Broken => drop(booking),
    }
    Attempt::Failed { node: id, failure }
}

/// Applies what an attempt says about `node` at once: its error count, the
/// limits the upstream reports, the rest it asked for, and an answer
/// (served: for `model` too). A failure waits for the request's end, which
/// judges whose it was ([`super::judged`]).
fn apply(node: &Node, booking: &Booking, verdict: NodeVerdict, model: Option<&str>) {
    if let Some(kind) = verdict.error {
        node.metrics.upstream_error(kind);
    }
    if let Some(report) = &verdict.report
        && let Some((rpm, tpm)) = booking.observe_upstream(report)
    {
        tracing::warn!(node = %node.name, upstream_rpm = ?rpm, upstream_tpm = ?tpm, "the upstream reports limits below the configured ones; the lower are in force");
    }
    if verdict.health == Verdict::Answered {
        node.health.answered(model.filter(|_| verdict.served));
    }
    if let Some(percent) = verdict.utilization
        && node.limiter.observe_utilization(percent, Instant::now())
    {
        tracing::debug!(node = %node.name, percent, "provisioned deployment nearly full; holding it");
    }
    if let Some((rest, reason)) = verdict.rest {
        node.limiter.cool_down(Instant::now() + rest, reason);
        booking.share_cooldown(rest);
        tracing::info!(node = %node.name, cooldown_ms = rest.as_millis() as u64, reason = reason.as_str(), "upstream refused with 429; cooling down");
    }
}
