//! The request path, top to bottom:
//! authenticate → read → inspect → candidates → admit → forward → relay.
//!
//! 1. **Authenticate** the client's gateway key ([`auth`]).
//! 2. **Read** the body, refusing more than `server.max_body_bytes`.
//! 3. **Inspect** it ([`request::inspect`]): model, stream flag, prompt tokens
//!    and the [`Demand`](crate::limits::Demand) to reserve.
//! 4. **Candidates**: the nodes that serve the model.
//! 5. **Admit** ([`Queue::admit`](crate::queue::Queue::admit)): reserve on the
//!    least-loaded node with headroom, or wait, or refuse.
//! 6. **Forward** with the node's key ([`upstream::send`]). A failure before
//!    anything reached the client (no connection, no head in time, 5xx, 429,
//!    401/403) is retried on another node, up to `retry.attempts` times.
//! 7. **Relay** the answer untouched ([`relay::relay`]), settling the
//!    reservation when it ends.
//!
//! Everything that happens before the response head is bounded by
//! `server.request_timeout`; the relay carries the same deadline.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio::time::Instant;

use crate::auth;
use crate::error::GatewayError;
use crate::health::Verdict;
use crate::limits::{CooldownReason, Reservation};
use crate::queue::Placement;
use crate::relay::{self, UsageTicket};
use crate::request::{self, RequestInfo};
use crate::state::{AppState, Live};
use crate::store::UsageTotals;
use crate::upstream::{self, Failure};
use crate::usage::UsageRecord;

/// The handler for every `/v1/*` path the gateway does not answer itself.
pub async fn handle(State(state): State<Arc<AppState>>, request: Request) -> Response {
    // A `Uri` clone shares its bytes: no copy of the path on the hot path.
    let uri = request.uri().clone();
    match forward(&state, request).await {
        Ok(response) => response,
        Err(err) => {
            let path = uri.path();
            if err.status().is_server_error() {
                tracing::warn!(path, error = %err, "request failed");
            } else {
                tracing::debug!(path, error = %err, "request refused");
            }
            err.into_response()
        }
    }
}

async fn forward(state: &AppState, request: Request) -> Result<Response, GatewayError> {
    let mut live = state.live();
    let (parts, body) = request.into_parts();
    let client = auth::identify(&live, &state.clients, &parts.headers).await?;

    let rest = parts.uri.path().strip_prefix("/v1").unwrap_or("");
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("", |pq| pq.as_str())
        .strip_prefix("/v1")
        .unwrap_or("");
    let body = read_body(body, &parts.headers, live.config.server.max_body_bytes).await?;
    let info = request::inspect(
        rest,
        &body,
        is_json(&parts.headers, &body),
        live.config.accounting.default_completion_tokens,
    )?;
    let mut candidates = live.candidates(info.model.as_deref())?;
    // The client's own limits come before any node is chosen. Its
    // reservation settles with the answer, or stays counted in full if none
    // is relayed.
    let mut client_reservation = match &client {
        Some(client) => Some(client.admit(info.model.as_deref(), info.demand)?),
        None => None,
    };
    let mut usage = client.as_ref().map(|client| UsageTicket {
        recorder: state.clients.recorder().clone(),
        record: UsageRecord {
            client_id: Arc::clone(&client.id),
            model: info.model.as_deref().unwrap_or("").to_owned(),
            totals: UsageTotals {
                requests: 1,
                request_bytes: body.len() as u64,
                ..UsageTotals::default()
            },
        },
    });
    let deadline = Instant::now() + live.config.server.request_timeout;

    let attempts = live.config.retry.attempts as usize + 1;
    let mut tried: Vec<usize> = Vec::new();
    let mut last: Option<Attempt> = None;
    for attempt in 0..attempts {
        let placement = if attempt == 0 {
            let admitted = state
                .queue
                .admit(
                    &live,
                    info.model.as_deref(),
                    &candidates,
                    &tried,
                    info.demand,
                    deadline,
                )
                .await;
            let mut placement = match admitted {
                Ok(placement) => placement,
                Err(err) => {
                    // The gateway refused it: nothing the client used.
                    if let Some(reservation) = client_reservation.take() {
                        reservation.cancel();
                    }
                    return Err(err);
                }
            };
            // It waited through a reload: go on in the new snapshot.
            if let Some(newer) = placement.rebased.take() {
                candidates = newer.candidates(info.model.as_deref())?;
                live = newer;
            }
            placement
        } else {
            // A retry takes a node that has headroom now, or ends with the
            // last answer: it does not queue behind fresh requests.
            match state
                .queue
                .place(&live, &candidates, &tried, info.demand, Instant::now())
            {
                Some(placement) => placement,
                None => break,
            }
        };
        let node = placement.node;
        let outcome = try_node(&live, placement, &parts, path_and_query, &body, deadline).await;
        if !outcome.retryable() {
            return Ok(outcome.finish(
                &live,
                &info,
                deadline,
                client_reservation.take(),
                usage.take(),
            ));
        }
        // Only a retry needs the list of nodes already tried.
        tried.push(node);
        if let Some(previous) = last.replace(outcome) {
            previous.discard(info.prompt_tokens);
        }
    }
    match last {
        Some(outcome) => Ok(outcome.finish(&live, &info, deadline, client_reservation, usage)),
        None => Err(GatewayError::UpstreamUnavailable {
            node: "none".to_owned(),
        }),
    }
}

/// The result of one attempt on one node.
enum Attempt {
    Answered {
        response: reqwest::Response,
        placement: Placement,
    },
    Failed {
        node: usize,
        failure: Failure,
    },
}

impl Attempt {
    fn retryable(&self) -> bool {
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

    /// Ends an attempt superseded by a later one. An error answer used no
    /// completion, so only the prompt stays counted.
    fn discard(self, prompt_tokens: u64) {
        if let Attempt::Answered { placement, .. } = self {
            placement.reservation.settle(prompt_tokens);
        }
    }

    fn finish(
        self,
        live: &Live,
        info: &RequestInfo,
        deadline: Instant,
        client: Option<Reservation>,
        usage: Option<UsageTicket>,
    ) -> Response {
        match self {
            // Usage is recorded for answers the client got: what the
            // upstream served, whatever its status.
            Attempt::Answered {
                response,
                placement,
            } => relay::relay(
                response,
                &live.nodes[placement.node],
                [Some(placement.reservation), client],
                usage,
                info,
                deadline,
            ),
            Attempt::Failed { node, failure } => {
                let node = live.nodes[node].name.to_string();
                let err = match failure {
                    Failure::Timeout => GatewayError::UpstreamTimeout { node },
                    Failure::Connect | Failure::Broken => {
                        GatewayError::UpstreamUnavailable { node }
                    }
                };
                tracing::warn!(error = %err, "no upstream answered");
                err.into_response()
            }
        }
    }
}

async fn try_node(
    live: &Live,
    placement: Placement,
    parts: &axum::http::request::Parts,
    path_and_query: &str,
    body: &Bytes,
    deadline: Instant,
) -> Attempt {
    let node = &live.nodes[placement.node];
    let first_byte = live
        .config
        .upstream
        .first_byte_timeout
        .min(deadline.saturating_duration_since(Instant::now()));
    let sent = upstream::send(
        node,
        parts.method.clone(),
        path_and_query,
        &parts.headers,
        body.clone(),
        first_byte,
    )
    .await;
    let health = &live.config.health;
    let response = match sent {
        Ok(response) => response,
        Err(failure) => return failed(node, placement, failure, health),
    };
    let status = response.status();
    placement
        .reservation
        .observe_upstream(&upstream::rate_limit_report(response.headers()));
    node.health
        .on_request(Verdict::of_status(status), &node.key, health);
    if status != StatusCode::TOO_MANY_REQUESTS {
        return Attempt::Answered {
            response,
            placement,
        };
    }
    // A 429 is read whole: a spent quota rests far longer than a busy minute.
    let (response, body) = match upstream::read_error(response, first_byte).await {
        Ok(read) => read,
        Err(failure) => return failed(node, placement, failure, health),
    };
    let (rest, reason) = if upstream::is_insufficient_quota(&body) {
        let rest =
            upstream::explicit_rest(response.headers()).unwrap_or(health.quota_exhausted_cooldown);
        (rest, CooldownReason::QuotaExhausted)
    } else {
        let rest = upstream::cooldown_of(response.headers());
        (rest, CooldownReason::RateLimited)
    };
    node.usage.cool_down(Instant::now() + rest, reason);
    tracing::info!(node = %node.name, cooldown_ms = rest.as_millis() as u64, reason = reason.as_str(), "upstream refused with 429; cooling down");
    Attempt::Answered {
        response,
        placement,
    }
}

/// An attempt that got no answer: passive health hears of it, and the
/// reservation is taken back as far as the failure allows.
fn failed(
    node: &crate::state::Node,
    placement: Placement,
    failure: Failure,
    health: &crate::config::HealthSettings,
) -> Attempt {
    tracing::warn!(node = %node.name, ?failure, "upstream attempt failed");
    let why = match failure {
        Failure::Connect => "could not connect",
        Failure::Timeout => "no answer in time",
        Failure::Broken => "connection broke",
    };
    node.health
        .on_request(Verdict::Failed(why.to_owned()), &node.key, health);
    let index = placement.node;
    match failure {
        // Nothing reached the node: take the request back in full.
        Failure::Connect => placement.reservation.cancel(),
        // It may have been received: keep what was reserved.
        Failure::Timeout | Failure::Broken => drop(placement.reservation),
    }
    Attempt::Failed {
        node: index,
        failure,
    }
}

/// Whether to read the body as JSON: a JSON content type, none at all, or
/// the form type curl sends by default with `-d`. Uploads (multipart) and
/// binary bodies are passed through unread.
fn is_json(headers: &HeaderMap, body: &[u8]) -> bool {
    match headers.get(header::CONTENT_TYPE) {
        Some(value) => value.to_str().is_ok_and(|v| {
            v.contains("json") || v.starts_with("application/x-www-form-urlencoded")
        }),
        None => !body.is_empty(),
    }
}

async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, GatewayError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(GatewayError::BodyTooLarge { limit });
    }
    axum::body::to_bytes(body, limit).await.map_err(|err| {
        let over_limit = std::error::Error::source(&err)
            .is_some_and(|e| e.is::<http_body_util::LengthLimitError>());
        if over_limit {
            GatewayError::BodyTooLarge { limit }
        } else {
            GatewayError::BodyUnreadable(err.to_string())
        }
    })
}
