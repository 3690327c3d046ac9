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
use crate::clients::Client;
use crate::cluster::{self, NotPlaced};
use crate::config::OnRedisError;
use crate::error::GatewayError;
use crate::health::Verdict;
use crate::limits::{CooldownReason, Reservation};
use crate::metrics::{self, UpstreamError};
use crate::queue::Placement;
use crate::relay::{self, ACCESS_LOG, Trace, UsageTicket};
use crate::request::{self, RequestInfo};
use crate::state::{AppState, Live};
use crate::store::UsageTotals;
use crate::upstream::{self, Failure};
use crate::usage::UsageRecord;

/// The handler for every `/v1/*` path the gateway does not answer itself.
pub async fn handle(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let received = Instant::now();
    // A `Uri` clone shares its bytes: no copy of the path on the hot path.
    let uri = request.uri().clone();
    match forward(&state, request, received).await {
        Ok(response) => response,
        Err(Refused { error, model }) => {
            refused(&state, uri.path(), &error, model.as_deref(), received);
            error.into_response()
        }
    }
}

/// An error the gateway answers itself, and the model asked for if it got
/// that far.
struct Refused {
    error: GatewayError,
    model: Option<Box<str>>,
}

impl From<GatewayError> for Refused {
    fn from(error: GatewayError) -> Self {
        Self { error, model: None }
    }
}

/// Counts and logs a successful answer the gateway gave itself
/// (`/v1/models`), as [`refused`] does an error.
pub fn answered_itself(state: &AppState, path: &str, model: Option<&str>, received: Instant) {
    let label = model.filter(|m| state.live().lists_model(m)).unwrap_or("");
    let elapsed = metrics::elapsed(received);
    state
        .metrics
        .answered
        .route(label)
        .answered(StatusCode::OK, elapsed);
    let duration_ms = elapsed.as_millis() as u64;
    tracing::info!(target: ACCESS_LOG, path, node = "", model = model.unwrap_or(""), status = 200u16, duration_ms, "request");
}

/// Counts and logs an answer the gateway gave itself: under node `""`, and
/// under the model only if the config lists it (a made-up name is no label).
pub fn refused(
    state: &AppState,
    path: &str,
    error: &GatewayError,
    model: Option<&str>,
    received: Instant,
) {
    let label = model.filter(|m| state.live().lists_model(m)).unwrap_or("");
    let status = error.status();
    let elapsed = metrics::elapsed(received);
    state
        .metrics
        .answered
        .route(label)
        .answered(status, elapsed);
    let (code, model, duration_ms) = (
        error.code(),
        model.unwrap_or(""),
        elapsed.as_millis() as u64,
    );
    if status.is_server_error() {
        tracing::warn!(target: ACCESS_LOG, path, node = "", model, status = status.as_u16(), code, duration_ms, error = %error, "request");
    } else {
        tracing::info!(target: ACCESS_LOG, path, node = "", model, status = status.as_u16(), code, duration_ms, error = %error, "request");
    }
}

async fn forward(
    state: &AppState,
    request: Request,
    received: Instant,
) -> Result<Response, Refused> {
    let live = state.live();
    let (parts, body) = request.into_parts();
    let client = auth::identify(&live, &state.clients, &parts.headers).await?;
    let body = read_body(body, &parts.headers, live.config.server.max_body_bytes).await?;
    let rest = parts.uri.path().strip_prefix("/v1").unwrap_or("");
    let info = request::inspect(
        rest,
        &body,
        is_json(&parts.headers, &body),
        live.config.accounting.default_completion_tokens,
    )?;
    let answered = dispatch(state, live, &parts, body, &info, client, received).await;
    answered.map_err(|error| Refused {
        error,
        model: info.model,
    })
}

/// Steps 4 to 7 for a request that has been read and inspected.
async fn dispatch(
    state: &AppState,
    mut live: Arc<Live>,
    parts: &axum::http::request::Parts,
    body: Bytes,
    info: &RequestInfo,
    client: Option<Arc<Client>>,
    received: Instant,
) -> Result<Response, GatewayError> {
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("", |pq| pq.as_str())
        .strip_prefix("/v1")
        .unwrap_or("");
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
        counters: Arc::clone(&client.usage.counters),
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
    let deadline = received + live.config.server.request_timeout;
    let mut trace = Trace {
        uri: parts.uri.clone(),
        received,
        queue_wait: std::time::Duration::ZERO,
        sent: received,
        attempts: 0,
        request_bytes: body.len() as u64,
    };

    let attempts = live.config.retry.attempts as usize + 1;
    let mut tried: Vec<usize> = Vec::new();
    let mut last: Option<Attempt> = None;
    for attempt in 0..attempts {
        let placement = if attempt == 0 {
            let queued = Instant::now();
            let admitted =
                admit(state, &live, info, &candidates, client.as_deref(), deadline).await;
            trace.queue_wait = metrics::elapsed(queued);
            state.metrics.queue_wait.observe(trace.queue_wait);
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
            match place_now(state, &live, info, &candidates, &tried, client.as_deref()).await {
                Some(placement) => {
                    if let Some(&failed) = tried.last() {
                        live.nodes[failed].metrics.retried_elsewhere();
                    }
                    placement
                }
                None => break,
            }
        };
        let node = placement.node;
        trace.attempts += 1;
        trace.sent = Instant::now();
        let outcome = try_node(&live, placement, parts, path_and_query, &body, deadline).await;
        if !outcome.retryable() {
            return outcome.finish(
                &live,
                info,
                deadline,
                client_reservation.take(),
                usage.take(),
                trace,
            );
        }
        // Only a retry needs the list of nodes already tried.
        tried.push(node);
        if let Some(previous) = last.replace(outcome) {
            previous.discard(info.prompt_tokens);
        }
    }
    match last {
        Some(outcome) => outcome.finish(&live, info, deadline, client_reservation, usage, trace),
        None => Err(GatewayError::UpstreamUnavailable {
            node: "none".to_owned(),
        }),
    }
}

/// Step 5 for a first attempt: placed now, or after waiting, or refused.
/// With `[cluster]`, the shared windows decide while Redis answers; when it
/// does not, `cluster.on_redis_error` does.
async fn admit(
    state: &AppState,
    live: &Arc<Live>,
    info: &RequestInfo,
    candidates: &Arc<[usize]>,
    client: Option<&Client>,
    deadline: Instant,
) -> Result<Placement, GatewayError> {
    if let Some(cluster) = &state.cluster {
        if cluster.is_up() {
            let ask = cluster::Ask {
                candidates,
                excluded: &[],
                demand: info.demand,
                client,
                wait: true,
                deadline,
            };
            match cluster::place(cluster, &state.queue, live, ask).await {
                Ok(placement) => return Ok(placement),
                Err(NotPlaced::Refused(err)) => {
                    if let GatewayError::Saturated { .. } = err {
                        state.queue.refused();
                    }
                    return Err(err);
                }
                Err(NotPlaced::NoHeadroom) => {
                    return Err(GatewayError::Saturated {
                        retry_after: std::time::Duration::from_secs(1),
                    });
                }
                Err(NotPlaced::Unavailable(_)) => {}
            }
        }
        if cluster.on_error() == OnRedisError::Reject {
            return Err(GatewayError::ClusterUnavailable);
        }
    }
    let model = info.model.as_deref();
    state
        .queue
        .admit(live, model, candidates, &[], info.demand, deadline)
        .await
}

/// Step 5 for a retry: a node with headroom now, or none.
async fn place_now(
    state: &AppState,
    live: &Arc<Live>,
    info: &RequestInfo,
    candidates: &[usize],
    tried: &[usize],
    client: Option<&Client>,
) -> Option<Placement> {
    if let Some(cluster) = &state.cluster {
        if cluster.is_up() {
            let ask = cluster::Ask {
                candidates,
                excluded: tried,
                demand: info.demand,
                client,
                wait: false,
                deadline: Instant::now(),
            };
            match cluster::place(cluster, &state.queue, live, ask).await {
                Ok(placement) => return Some(placement),
                Err(NotPlaced::Refused(_) | NotPlaced::NoHeadroom) => return None,
                Err(NotPlaced::Unavailable(_)) => {}
            }
        }
        if cluster.on_error() == OnRedisError::Reject {
            return None;
        }
    }
    state
        .queue
        .place(live, candidates, tried, info.demand, Instant::now())
}

/// The result of one attempt on one node.
#[expect(
    clippy::large_enum_variant,
    reason = "one per attempt, on the stack; boxing the answer would allocate on every request"
)]
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

    /// The client's answer: the node's, relayed; or, when no node
    /// answered, the gateway's own error.
    fn finish(
        self,
        live: &Live,
        info: &RequestInfo,
        deadline: Instant,
        client: Option<Reservation>,
        usage: Option<UsageTicket>,
        trace: Trace,
    ) -> Result<Response, GatewayError> {
        match self {
            // Usage is recorded for answers the client got: what the
            // upstream served, whatever its status.
            Attempt::Answered {
                response,
                placement,
            } => Ok(relay::relay(
                response,
                &live.nodes[placement.node],
                [Some(placement.reservation), client],
                usage,
                info,
                deadline,
                trace,
            )),
            Attempt::Failed { node, failure } => {
                let node = live.nodes[node].name.to_string();
                Err(match failure {
                    Failure::Timeout => GatewayError::UpstreamTimeout { node },
                    Failure::Connect | Failure::Broken => {
                        GatewayError::UpstreamUnavailable { node }
                    }
                })
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
    if let Some(kind) = UpstreamError::of_status(status) {
        node.metrics.upstream_error(kind);
    }
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
    placement.reservation.share_cooldown(rest);
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
    let (why, kind) = match failure {
        Failure::Connect => ("could not connect", UpstreamError::Connect),
        Failure::Timeout => ("no answer in time", UpstreamError::Timeout),
        Failure::Broken => ("connection broke", UpstreamError::Broken),
    };
    node.metrics.upstream_error(kind);
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
