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
use crate::api;
use crate::config::HealthSettings;
use crate::deadline::WriteDeadline;
use crate::error::GatewayError;
use crate::health::Verdict;
use crate::limits::CooldownReason;
use crate::metrics::UpstreamError;
use crate::outcome::{Trail, UsageTicket};
use crate::probes;
use crate::relay::{self, Answering, Held};
use crate::snapshot::{Live, Node, NodeId};
use crate::state::AppState;
use crate::upstream::{self, Failure};

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
        /// A refusal of what the client sent (not of the node's key):
        /// relayed, never retried.
        clients_own: bool,
    },
    Failed {
        node: NodeId,
        failure: Failure,
    },
}

impl Attempt {
    pub(super) fn retryable(&self) -> bool {
        match self {
            Attempt::Answered {
                clients_own: true, ..
            } => false,
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

pub(super) async fn try_node(live: &Live, placement: Placement, request: &Inbound<'_>) -> Attempt {
    let id = placement.node;
    let booking = placement.booking;
    let node = live.node(id);
    let first_byte = live
        .config
        .upstream
        .first_byte_timeout
        .min(request.deadline.saturating_duration_since(Instant::now()));
    let model = request.info.model.as_deref();
    let sent = upstream::send(
        node,
        request.parts.method.clone(),
        api::url(node, request.operation, model),
        &request.parts.headers,
        api::body_for(node, request.operation, request.info, &request.body),
        first_byte,
        request.traceparent.as_ref(),
    )
    .await;
    let health = &live.config.health;
    let response = match sent {
        Ok(response) => response,
        Err(failure) => return failed(node, id, booking, failure, health),
    };
    let status = response.status();
    if let Some(kind) = UpstreamError::of_status(status) {
        node.metrics.upstream_error(kind);
    }
    if let Some((rpm, tpm)) =
        booking.observe_upstream(&upstream::rate_limit_report(response.headers()))
    {
        tracing::warn!(node = %node.name, upstream_rpm = ?rpm, upstream_tpm = ?tpm, "the upstream reports limits below the configured ones; the lower are in force");
    }
    node.health.on_request(Verdict::of_status(status), health);
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        // Retried elsewhere only if the node's own key is refused; else
        // the client's request was refused, and the client gets the answer.
        let clients_own = !probes::key_refused(node, health).await;
        return Attempt::Answered {
            response,
            node: id,
            booking,
            clients_own,
        };
    }
    if status != StatusCode::TOO_MANY_REQUESTS {
        return Attempt::Answered {
            response,
            node: id,
            booking,
            clients_own: false,
        };
    }
    // A 429 is read whole: a spent quota rests far longer than a busy minute.
    let (response, body) = match upstream::read_error(response, first_byte).await {
        Ok(read) => read,
        Err(failure) => return failed(node, id, booking, failure, health),
    };
    let (rest, reason) = if upstream::is_insufficient_quota(&body) {
        let rest =
            upstream::explicit_rest(response.headers()).unwrap_or(health.quota_exhausted_cooldown);
        (rest, CooldownReason::QuotaExhausted)
    } else {
        let rest = upstream::cooldown_of(response.headers());
        (rest, CooldownReason::RateLimited)
    };
    let rest = rest.min(health.max_rest);
    node.limiter.cool_down(Instant::now() + rest, reason);
    booking.share_cooldown(rest);
    tracing::info!(node = %node.name, cooldown_ms = rest.as_millis() as u64, reason = reason.as_str(), "upstream refused with 429; cooling down");
    Attempt::Answered {
        response,
        node: id,
        booking,
        clients_own: false,
    }
}

/// An attempt that got no answer: passive health hears of it, and the
/// booking is taken back as far as the failure allows.
fn failed(
    node: &Node,
    id: NodeId,
    booking: Booking,
    failure: Failure,
    health: &HealthSettings,
) -> Attempt {
    tracing::warn!(node = %node.name, ?failure, "upstream attempt failed");
    let (verdict, kind) = match failure {
        Failure::Connect => (
            Verdict::Unreachable("could not connect".to_owned()),
            UpstreamError::Connect,
        ),
        Failure::Timeout => (
            Verdict::Failed("no answer in time".to_owned()),
            UpstreamError::Timeout,
        ),
        Failure::Broken => (
            Verdict::Failed("connection broke".to_owned()),
            UpstreamError::Broken,
        ),
    };
    node.metrics.upstream_error(kind);
    node.health.on_request(verdict, health);
    match failure {
        // Nothing reached the node: take the request back in full.
        Failure::Connect => booking.cancel(),
        // It may have been received: keep what was reserved.
        Failure::Timeout | Failure::Broken => drop(booking),
    }
    Attempt::Failed { node: id, failure }
}
