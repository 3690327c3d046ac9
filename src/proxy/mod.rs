//! The request path, top to bottom:
//! authenticate → read → inspect → candidates → admit → forward → relay.
//!
//! 1. **Authenticate** the client's gateway key ([`auth`]).
//! 2. **Read** the body, refusing more than `server.max_body_bytes`.
//! 3. **Inspect** it ([`request::inspect`]): model, stream flag, prompt tokens
//!    and the [`Demand`](crate::limits::Demand) to reserve.
//!    A client with a budget is refused work the upstream bills later
//!    (background responses, batches, fine-tuning jobs, assistants' runs):
//!    its cost could not be held.
//! 4. **Candidates**: the nodes that serve the model.
//! 5. **Admit** ([`Admission::admit`](crate::admission::Admission::admit)):
//!    the client's limits, then the least-loaded node with headroom, or a
//!    wait, or a refusal.
//! 6. **Forward** with the node's key ([`crate::upstream::send`]). A failure before
//!    anything reached the client (no connection, no head in time, 5xx, 429,
//!    401/403) is retried on another node, up to `retry.attempts` times.
//! 7. **Relay** the answer untouched ([`crate::relay::relay`]), settling the
//!    booking and the client's hold when it ends.
//!
//! Everything that happens before the response head is bounded by
//! `server.request_timeout`; the relay carries the same deadline.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio::time::Instant;

use crate::admission::{ClientHold, Placement};
use crate::auth;
use crate::clients::Client;
use crate::error::GatewayError;
use crate::ledger::Entry;
use crate::outcome::{AskedModel, Trail, UsageTicket};
use crate::request::{self, CompletionDefaults, RequestInfo};
use crate::snapshot::{Live, NodeId};
use crate::state::AppState;
use crate::store::UsageTotals;
use crate::upstream::dialect::Operation;

mod attempt;
mod headers;
mod judged;
mod objects;
mod policy;
mod target;

use attempt::{Attempt, try_node};
use target::Target;

use crate::objects::named::{self as object_names, PathUse};
use crate::objects::route::Routing;

/// The handler for every `/v1/*` path the gateway does not answer itself.
/// Its answer is recorded when its relay ends, or (the gateway's own) by
/// [`crate::outcome::record_own`]; its span ends with it.
pub(crate) async fn handle(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (method, uri) = (request.method(), request.uri());
    let mut trail = Trail::begin(&state, method, uri.path(), request.headers());
    let response = match forward(&state, request, &mut trail).await {
        Ok(response) => response,
        Err(Refused { error, model }) => {
            let mut response = error.into_response();
            if let Some(model) = model {
                response.extensions_mut().insert(AskedModel(model));
            }
            response
        }
    };
    // A relayed answer's trail went with it; this ends only the others.
    trail.answered_by_gateway(&response);
    response
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

/// Steps 1 to 3, then the rest.
async fn forward(
    state: &AppState,
    request: Request,
    trail: &mut Trail,
) -> Result<Response, Refused> {
    let received = trail.received;
    let live = state.live();
    let (parts, body) = request.into_parts();
    let operation = Operation::of(parts.uri.path(), parts.uri.query())?;
    let client = auth::identify(&live, &state.clients, &parts.headers).await?;
    policy::served(operation.path, live.config.server.realtime_ephemeral_keys)?;
    // Work before admission is bounded: a client over its own limit is
    // refused before its body is read or parsed, and a body being read
    // counts against its concurrency.
    let reading = match &client {
        Some(client) => Some(state.admission.precheck(client)?),
        None => None,
    };
    let path_use = object_names::path_use(parts.method.as_str(), operation.path)?;
    if let PathUse::Lists(kind) = path_use {
        let query = parts.uri.query();
        let answer = objects::list_answer(state, &live, kind, query, client.as_deref()).await;
        return answer;
    }
    let server = &live.config.server;
    let reading_by = BodyDeadlines {
        stall: server.body_read_timeout,
        whole: received + server.request_timeout,
    };
    let limit = server.max_body_bytes.get();
    let body = read_body(body, &parts.headers, limit, reading_by).await?;
    let mut info = inspect(&operation, &parts, &body, &live.completion_defaults).await?;
    drop(reading);
    // Work billed later is refused to a budgeted key first: that is the
    // reason, whatever else the request lacks.
    if client.as_deref().is_some_and(|c| c.budget.is_some())
        && let Some(what) = policy::spends_later(&parts.method, operation.path, &info)
    {
        return Err(Refused {
            error: GatewayError::NotAllowedWithBudget(what),
            model: info.model.clone(),
        });
    }
    let body = match client.as_deref() {
        Some(client) => {
            policy::imply_model(&parts.method, operation.path, client, &mut info)?;
            policy::bound_completion(
                operation.path,
                client,
                &mut info,
                body,
                &live.completion_defaults,
            )?
        }
        None => body,
    };
    let client_id = client.as_ref().map(|c| &c.id);
    trail.asked(operation.path, info.model.as_deref(), client_id);
    let refused = |error| Refused {
        error,
        model: info.model.clone(),
    };
    let mut request = Inbound {
        parts: &parts,
        operation: &operation,
        body,
        info: &info,
        client: client.as_deref(),
        deadline: received + live.config.server.request_timeout,
        routing: Routing::default(),
        traceparent: trail.traceparent(),
    };
    request.routing = objects::routing(state, &live, parts.method.as_str(), &path_use, &request)
        .await
        .map_err(refused)?;
    dispatch(state, live, request, trail).await.map_err(refused)
}

/// A request that has been read and inspected.
struct Inbound<'a> {
    parts: &'a Parts,
    /// What it asks for, in either dialect.
    operation: &'a Operation<'a>,
    body: Bytes,
    info: &'a RequestInfo,
    client: Option<&'a Client>,
    /// Arrival + `server.request_timeout`: bounds waiting, every
    /// attempt, and the relay.
    deadline: Instant,
    /// Where the objects it names pin it, and what its answer records.
    routing: Routing,
    /// Its span as the upstream's parent, when traced.
    traceparent: Option<HeaderValue>,
}

impl Inbound<'_> {
    /// The client's ledger entry for this request, to be completed by the
    /// relay.
    fn usage_ticket(&self, state: &AppState) -> Option<UsageTicket> {
        self.client.map(|client| UsageTicket {
            ledger: state.clients.ledger().clone(),
            counters: Arc::clone(&client.counters),
            entry: Entry {
                client_id: Arc::clone(&client.id),
                model: self.info.model.as_deref().unwrap_or("").to_owned(),
                totals: UsageTotals {
                    requests: 1,
                    request_bytes: self.body.len() as u64,
                    ..UsageTotals::default()
                },
            },
        })
    }
}

/// Steps 4 to 7: admit, then try nodes until one answers in a way the
/// client should see.
async fn dispatch(
    state: &AppState,
    live: Arc<Live>,
    request: Inbound<'_>,
    trail: &mut Trail,
) -> Result<Response, GatewayError> {
    let model = request.info.model.as_deref();
    let mut target = Target {
        candidates: within_tier(&live, candidates(&live, model, &request.routing)?, &request)?,
        model_listed: model.is_some_and(|m| live.labels_model(m)),
        live,
    };
    let worst_cost = target.worst_cost(&request)?;
    let queued = Instant::now();
    let admitted = state
        .admission
        .admit(&target.ask(state, &request, request.deadline, worst_cost))
        .await;
    trail.admitted(state, queued);
    let mut admitted = admitted?;
    if target.live.is_tiered() {
        note_spill(state, &target, admitted.placement.node);
    }
    if let Some(newer) = admitted.placement.rebased.take() {
        // It waited through a reload: go on in the new snapshot, on the
        // same node if its objects pin it.
        let pinned = request
            .routing
            .node
            .map(|id| Arc::clone(&target.live.node(id).name));
        let candidates = match pinned {
            Some(name) => newer
                .node_ids()
                .filter(|id| newer.node(*id).name == name)
                .collect(),
            None => serving(&newer, newer.candidates(model)?, model),
        };
        let candidates = within_tier(&newer, candidates, &request)?;
        target = Target {
            candidates,
            live: newer,
            ..target
        };
    }
    let (first, client) = (admitted.placement, admitted.client);
    attempt_all(state, &target, &request, first, client, trail).await
}

/// The nodes a request may go to: the one that holds the objects it names,
/// else those that serve its model (and are not out for it).
fn candidates(
    live: &Live,
    model: Option<&str>,
    routing: &Routing,
) -> Result<Arc<[NodeId]>, GatewayError> {
    match routing.node {
        Some(node) => Ok(Arc::from([node])),
        None => Ok(serving(live, live.candidates(model)?, model)),
    }
}

/// Counts a request placed on `node` above the lowest tier in rotation
/// among its candidates (that tier was full).
fn note_spill(state: &AppState, target: &Target, node: NodeId) {
    let live = &target.live;
    let lowest = target
        .candidates
        .iter()
        .filter(|id| live.node(**id).health.in_rotation())
        .map(|id| live.tier(*id))
        .min();
    let placed = live.tier(node);
    if let Some(lowest) = lowest.filter(|lowest| *lowest < placed) {
        state.metrics.spilled(lowest, placed);
    }
}

/// `all` less the nodes above the client's `max_tier`; none left is a
/// model the client may not use.
fn within_tier(
    live: &Live,
    all: Arc<[NodeId]>,
    request: &Inbound<'_>,
) -> Result<Arc<[NodeId]>, GatewayError> {
    let Some(max) = request.client.and_then(|c| c.max_tier) else {
        return Ok(all);
    };
    if all.iter().all(|id| live.tier(*id) <= max) {
        return Ok(all);
    }
    let kept: Arc<[NodeId]> = all
        .iter()
        .copied()
        .filter(|id| live.tier(*id) <= max)
        .collect();
    if kept.is_empty() {
        let model = request.info.model.as_deref().unwrap_or("this request");
        return Err(GatewayError::ModelNotAllowed(format!(
            "{model} (no node within this key's max_tier {max} serves it)"
        )));
    }
    Ok(kept)
}

/// `all` less the nodes out of rotation for `model` (their own failures
/// for it), unless that leaves none: then every one is tried as before.
fn serving(live: &Live, all: Arc<[NodeId]>, model: Option<&str>) -> Arc<[NodeId]> {
    let Some(model) = model else {
        return all;
    };
    let now = Instant::now();
    let serves = |id: &NodeId| live.node(*id).health.serves(model, now);
    if all.iter().all(serves) {
        return all;
    }
    let kept: Arc<[NodeId]> = all.iter().copied().filter(serves).collect();
    if kept.is_empty() { all } else { kept }
}

/// Step 6: the first placement, then retries on other nodes with headroom
/// now, until an answer the client should see (or the last one).
async fn attempt_all(
    state: &AppState,
    target: &Target,
    request: &Inbound<'_>,
    first: Placement,
    mut client: ClientHold,
    trail: &mut Trail,
) -> Result<Response, GatewayError> {
    let live = &target.live;
    // Whether any attempt may have been billed though no answer came.
    let mut maybe_billed = false;
    let usage = request.usage_ticket(state);
    let attempts = judged::attempts(state, live, request);
    let mut next = Some(first);
    let mut tried: Vec<NodeId> = Vec::new();
    // The failures met on the way, judged when the request ends.
    let mut faults = Vec::new();
    let mut last: Option<Attempt> = None;
    for _ in 0..attempts {
        let placement = match next.take() {
            Some(placement) => placement,
            // A retry takes a node that has headroom now, or ends with the
            // last answer: it does not queue behind fresh requests.
            None => {
                let ask = target.ask(state, request, request.deadline, None);
                let Some(placement) = state.admission.place_retry(&ask, &tried).await else {
                    break;
                };
                if let Some(&failed) = tried.last() {
                    live.node(failed).metrics.retried_elsewhere();
                }
                placement
            }
        };
        let node = placement.node;
        trail.attempt();
        let outcome = try_node(live, placement, request).await;
        maybe_billed |= outcome.maybe_billed();
        if !outcome.retryable() {
            judged::weigh(state, live, request, faults, outcome.served()).await;
            return outcome
                .finish(state, target, request, client, usage, trail)
                .await;
        }
        faults.extend(outcome.fault());
        trail.retry(&live.node(node).name, outcome.why());
        tried.push(node);
        if let Some(previous) = last.replace(outcome) {
            previous.discard(request.info.prompt_tokens);
        }
    }
    // Every node tried failed: the failures were the request's.
    judged::weigh(state, live, request, faults, false).await;
    match last {
        Some(outcome) => {
            if matches!(outcome, Attempt::Failed { .. }) && !maybe_billed {
                // No node answered and none may have worked on it (every
                // attempt failed to connect or was refused with an error,
                // which costs nothing): the budget's hold goes back whole.
                client.nothing_spent();
            }
            outcome
                .finish(state, target, request, client, usage, trail)
                .await
        }
        None => Err(GatewayError::UpstreamUnavailable {
            node: "none".to_owned(),
        }),
    }
}
/// Bodies larger than this are inspected on the blocking pool: their
/// parsing and counting (bounded, but tens of milliseconds) must not stall
/// the other requests on this worker.
const INSPECT_INLINE_BYTES: usize = 256 * 1024;

/// Step 3 for the body of `parts`.
async fn inspect(
    operation: &Operation<'_>,
    parts: &Parts,
    body: &Bytes,
    defaults: &CompletionDefaults,
) -> Result<RequestInfo, GatewayError> {
    let (path, model) = (operation.path, operation.model);
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if request::multipart::is_multipart(content_type) {
        return request::multipart::inspect(path, model, content_type, body).await;
    }
    let json = is_json(&parts.headers, body);
    if body.len() <= INSPECT_INLINE_BYTES {
        return request::inspect_operation(path, model, body, json, defaults);
    }
    let (path, model, body) = (path.to_owned(), model.map(str::to_owned), body.clone());
    let defaults = defaults.clone();
    tokio::task::spawn_blocking(move || {
        request::inspect_operation(&path, model.as_deref(), &body, json, &defaults)
    })
    .await
    .map_err(|_| GatewayError::ShuttingDown)?
}

/// Whether to read the body as JSON: a JSON content type, none at all, or
/// the form type curl sends by default with `-d`. Binary bodies are passed
/// through unread (multipart forms are read by their own parser).
fn is_json(headers: &HeaderMap, body: &[u8]) -> bool {
    match headers.get(header::CONTENT_TYPE) {
        Some(value) => value.to_str().is_ok_and(|v| {
            v.contains("json") || v.starts_with("application/x-www-form-urlencoded")
        }),
        None => !body.is_empty(),
    }
}

/// How long a body may take: `stall` with no byte arriving, and whole by
/// `whole` (the request's own deadline).
#[derive(Debug, Clone, Copy)]
struct BodyDeadlines {
    stall: std::time::Duration,
    whole: Instant,
}

/// The whole body, at most `limit` bytes, each piece arriving within the
/// stall timeout and the last by the request's deadline (else 408: a
/// trickling body must not hold a connection and a client's place).
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    by: BodyDeadlines,
) -> Result<Bytes, GatewayError> {
    use http_body_util::BodyExt;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(GatewayError::BodyTooLarge { limit });
    }
    let mut body = http_body_util::Limited::new(body, limit);
    let mut read = BodyPieces::default();
    loop {
        let next = (Instant::now() + by.stall).min(by.whole);
        let frame = match tokio::time::timeout_at(next, body.frame()).await {
            Err(_) => {
                return Err(GatewayError::BodyTimeout {
                    stalled_s: by.stall.as_secs(),
                });
            }
            Ok(None) => return Ok(read.whole()),
            Ok(Some(frame)) => frame,
        };
        let frame = frame.map_err(|err| {
            if err.is::<http_body_util::LengthLimitError>() {
                GatewayError::BodyTooLarge { limit }
            } else {
                GatewayError::BodyUnreadable(err.to_string())
            }
        })?;
        if let Ok(data) = frame.into_data() {
            read.push(data);
        }
    }
}

/// A body's pieces as they arrive: one piece is kept as it came (no copy),
/// more are joined.
#[derive(Default)]
enum BodyPieces {
    #[default]
    None,
    One(Bytes),
    Many(bytes::BytesMut),
}

impl BodyPieces {
    fn push(&mut self, piece: Bytes) {
        *self = match std::mem::take(self) {
            BodyPieces::None => BodyPieces::One(piece),
            BodyPieces::One(first) => {
                let mut joined = bytes::BytesMut::with_capacity(first.len() + piece.len());
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&piece);
                BodyPieces::Many(joined)
            }
            BodyPieces::Many(mut joined) => {
                joined.extend_from_slice(&piece);
                BodyPieces::Many(joined)
            }
        };
    }

    fn whole(self) -> Bytes {
        match self {
            BodyPieces::None => Bytes::new(),
            BodyPieces::One(piece) => piece,
            BodyPieces::Many(joined) => joined.freeze(),
        }
    }
}
