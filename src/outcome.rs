//! One door out: how a request's end is recorded. Its metrics, its one
//! access-log line, its client's usage (counters and ledger) and the end
//! of its span are written here and nowhere else.
//!
//! Two kinds of answer end here:
//! - **The gateway's own** (refusals of the request path, `/v1/models`,
//!   unknown paths and methods, every answer of the admin API) pass
//!   through one middleware, [`record_own`], which counts and logs each
//!   from the response alone: a [`GatewayError`](crate::error::GatewayError) answer carries its code
//!   and message ([`ErrorCode`]), a refusal the model it asked for
//!   ([`AskedModel`]).
//! - **A relayed answer** is marked [`Relayed`] (the middleware leaves it
//!   alone) and recorded when its relay ends, however it ends:
//!   [`Relaying::record`], called by the relay's settlement.
//!
//! A proxied request carries its [`Trail`] (its span, when traced, and
//! what it went through before its answer) from arrival to its end: the
//! span rides in it, and is ended with the request's answer.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use tokio::time::Instant;

use crate::clients::ClientCounters;
use crate::error::ErrorCode;
use crate::ledger::{Entry, Ledger};
use crate::meter::TokenUsage;
use crate::metrics::{self, OTHER_MODEL, Route};
use crate::money::Cost;
use crate::state::AppState;
use crate::traces::{Answered, RequestSpan};

/// The `tracing` target of the one line logged per request, so
/// `RUST_LOG` can set its level apart (`balancer::access=warn`).
pub(crate) const ACCESS_LOG: &str = "balancer::access";

/// Marks a response whose outcome is recorded when its relay ends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Relayed;

/// The model a refused request asked for, on its answer: a metric label
/// if the config lists it, and named in its log line.
#[derive(Debug, Clone)]
pub(crate) struct AskedModel(pub(crate) Box<str>);

/// Requests not to count: reads of the gateway's own state (a 405 on
/// those paths is counted).
fn is_operations(method: &Method, path: &str) -> bool {
    method == Method::GET && matches!(path, "/healthz" | "/status" | "/metrics" | "/dashboard")
}

/// Records every answer of the routes below it that is not relayed
/// ([`Relayed`]) nor a read of the gateway's own state (`GET` of
/// `/healthz`, `/status`, `/metrics`, `/dashboard`).
pub(crate) async fn record_own(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let received = Instant::now();
    // Shares the head's bytes only until the answer's head is back.
    let uri = request.uri().clone();
    let counted = !is_operations(request.method(), uri.path());
    let response = next.run(request).await;
    if counted && response.extensions().get::<Relayed>().is_none() {
        answered(&state, uri.path(), &response, received);
    }
    response
}

/// Counts and logs one answer the gateway gave itself: under node `""`,
/// and under the model only if the config lists it (a made-up name is no
/// label).
fn answered(state: &AppState, path: &str, response: &Response, received: Instant) {
    let status = response.status();
    let model = response.extensions().get::<AskedModel>().map(|m| &*m.0);
    let label = model.filter(|m| state.live().labels_model(m)).unwrap_or("");
    let elapsed = metrics::elapsed(received);
    state
        .metrics
        .answered
        .route(label)
        .answered(status, elapsed);
    let (model, duration_ms) = (model.unwrap_or(""), elapsed.as_millis() as u64);
    let status = status.as_u16();
    match response.extensions().get::<ErrorCode>() {
        None => {
            tracing::info!(target: ACCESS_LOG, path, node = "", model, status, duration_ms, "request");
        }
        Some(ErrorCode { code, message }) if status >= 500 => {
            tracing::warn!(target: ACCESS_LOG, path, node = "", model, status, code, duration_ms, error = &**message, "request");
        }
        Some(ErrorCode { code, message }) => {
            tracing::info!(target: ACCESS_LOG, path, node = "", model, status, code, duration_ms, error = &**message, "request");
        }
    }
}

/// A proxied request on its way: its span and what it went through before
/// its answer. Made on arrival; handed to the relay with the answer
/// ([`Trail::hand_over`]), or ended with the gateway's own answer.
#[derive(Debug)]
pub(crate) struct Trail {
    pub(crate) received: Instant,
    /// Time spent waiting for a node with headroom.
    pub(crate) queue_wait: Duration,
    /// When the attempt that was answered was sent.
    pub(crate) sent: Instant,
    /// Attempts made, the answered one included.
    pub(crate) attempts: u32,
    /// The request's span, when traced; `None` once ended or handed over.
    span: Option<RequestSpan>,
}

impl Trail {
    /// A request arriving now (its span begun, when traced).
    pub(crate) fn begin(
        state: &AppState,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Self {
        let received = Instant::now();
        Self {
            received,
            queue_wait: Duration::ZERO,
            sent: received,
            attempts: 0,
            span: state
                .tracing
                .as_ref()
                .map(|t| t.begin(method, path, headers)),
        }
    }

    /// What it asks for, once read: its span notes it.
    pub(crate) fn asked(&mut self, path: &str, model: Option<&str>, client: Option<&Arc<str>>) {
        if let Some(span) = &mut self.span {
            span.asked(path, model, client);
        }
    }

    /// Its span as the upstream's parent, when traced.
    pub(crate) fn traceparent(&self) -> Option<HeaderValue> {
        self.span.as_ref().and_then(RequestSpan::traceparent)
    }

    /// Admitted after waiting since `queued`.
    pub(crate) fn admitted(&mut self, state: &AppState, queued: Instant) {
        self.queue_wait = metrics::elapsed(queued);
        state.metrics.queue_wait.observe(self.queue_wait);
        if let Some(span) = &mut self.span {
            span.admitted(self.queue_wait.as_millis() as u64);
        }
    }

    /// An attempt is sent now.
    pub(crate) fn attempt(&mut self) {
        self.attempts += 1;
        self.sent = Instant::now();
    }

    /// The attempt on `node` failed (`why`); another node is tried.
    pub(crate) fn retry(&mut self, node: &Arc<str>, why: &'static str) {
        if let Some(span) = &mut self.span {
            span.retry(node, why);
        }
    }

    /// Ends its span with the gateway's own `answer` (counted and logged
    /// by [`record_own`]).
    pub(crate) fn answered_by_gateway(self, answer: &Response) {
        if let Some(span) = self.span {
            let code = answer.extensions().get::<ErrorCode>().map(|c| c.code);
            span.answered_by_gateway(answer.status().as_u16(), code);
        }
    }

    /// What the relay takes on: the trail as it is, its span with it.
    pub(crate) fn hand_over(&mut self) -> Trail {
        Trail {
            span: self.span.take(),
            ..*self
        }
    }
}

/// A client's usage of one request, recorded when its relay ends.
#[derive(Debug)]
pub(crate) struct UsageTicket {
    pub ledger: Ledger,
    /// The client's counters for `/metrics`.
    pub counters: Arc<ClientCounters>,
    pub entry: Entry,
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    Complete,
    UpstreamBroke,
    TimedOut,
    /// Dropped before its end: the client went away (or the gateway stopped).
    ClientGone,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Complete => "complete",
            End::UpstreamBroke => "upstream_broke",
            End::TimedOut => "timed_out",
            End::ClientGone => "client_gone",
        }
    }
}

/// A relayed answer's record while it flows: where it is counted, and
/// what its log line and span end with.
#[derive(Debug)]
pub(crate) struct Relaying {
    pub(crate) trail: Trail,
    /// The request's path, copied: a clone of its `Uri` would share, and
    /// keep for the whole of a stream, the client connection's read buffer
    /// the head was parsed from (8 KiB, which hyper must then replace).
    pub(crate) path: Box<str>,
    pub(crate) node: Arc<str>,
    /// The node's route for the model's label.
    pub(crate) route: Arc<Route>,
    /// The model asked for, when the config does not list it.
    pub(crate) unlisted_model: Option<Box<str>>,
    pub(crate) status: StatusCode,
    pub(crate) request_bytes: u64,
    pub(crate) response_bytes: u64,
    /// Time from arrival to the first body byte, once it came.
    pub(crate) first_byte: Option<Duration>,
}

/// The `model` label of a request's metrics: the model if the config
/// lists it (`listed`), else [`OTHER_MODEL`] (a client's made-up names
/// never become labels), `""` when none was asked for.
pub(crate) fn model_label(model: Option<&str>, listed: bool) -> &str {
    match model {
        Some(model) if listed => model,
        Some(_) => OTHER_MODEL,
        None => "",
    }
}

impl Relaying {
    /// A chunk of `len` bytes went to the client.
    pub(crate) fn observe(&mut self, len: usize) {
        if self.first_byte.is_none() && len > 0 {
            let elapsed = metrics::elapsed(self.trail.received);
            self.route.first_byte.observe(elapsed);
            self.first_byte = Some(elapsed);
        }
        self.response_bytes += len as u64;
    }

    /// The client's usage, before the reservations are settled (what
    /// `/status` shows): its counters and its ledger entry with `used`
    /// and what it was `charged`. The client's id, if it has one.
    pub(crate) fn charge(
        &self,
        ticket: Option<UsageTicket>,
        used: TokenUsage,
        charged: Option<Cost>,
    ) -> Option<Arc<str>> {
        let Some(UsageTicket {
            ledger,
            counters,
            mut entry,
        }) = ticket
        else {
            if let Some(charged) = charged {
                self.route
                    .cost_nanos
                    .fetch_add(charged.nanos(), Ordering::Relaxed);
            }
            return None;
        };
        counters.record(used.prompt, used.completion);
        if let Some(charged) = charged {
            counters
                .costs
                .add(&self.node, &self.route.model, charged.nanos());
        }
        entry.totals.response_bytes = self.response_bytes;
        entry.totals.prompt_tokens = used.prompt;
        entry.totals.completion_tokens = used.completion;
        entry.totals.cost_nanos = charged.map_or(0, Cost::nanos);
        let id = Arc::clone(&entry.client_id);
        ledger.record(entry);
        Some(id)
    }

    /// Counts the request, logs its line and ends its span.
    pub(crate) fn record(
        &mut self,
        end: End,
        used: TokenUsage,
        cost: Option<Cost>,
        client: Option<&str>,
    ) {
        let route = &self.route;
        route.answered(self.status, metrics::elapsed(self.trail.received));
        route
            .prompt_tokens
            .fetch_add(used.prompt, Ordering::Relaxed);
        let completion = &route.completion_tokens;
        completion.fetch_add(used.completion, Ordering::Relaxed);
        let request_bytes = &route.request_bytes;
        request_bytes.fetch_add(self.request_bytes, Ordering::Relaxed);
        let response_bytes = &route.response_bytes;
        response_bytes.fetch_add(self.response_bytes, Ordering::Relaxed);
        self.log(end, used, cost, client);
        if let Some(span) = self.trail.span.take() {
            span.answered(Answered {
                status: self.status.as_u16(),
                node: &self.node,
                attempts: self.trail.attempts,
                end: end.as_str(),
                input_tokens: used.prompt,
                output_tokens: used.completion,
                cost_usd: cost.map(Cost::usd),
            });
        }
    }

    /// The request's one line.
    fn log(&self, end: End, used: TokenUsage, cost: Option<Cost>, client: Option<&str>) {
        let now = Instant::now();
        let ms = |d: Duration| d.as_millis() as u64;
        let trail = &self.trail;
        tracing::info!(
            target: ACCESS_LOG,
            path = &*self.path,
            node = &*self.node,
            model = self.unlisted_model.as_deref().unwrap_or(&self.route.model),
            status = self.status.as_u16(),
            end = end.as_str(),
            client = client.unwrap_or(""),
            prompt_tokens = used.prompt,
            completion_tokens = used.completion,
            cost_usd = cost.map(Cost::usd),
            request_bytes = self.request_bytes,
            response_bytes = self.response_bytes,
            attempts = trail.attempts,
            queue_ms = ms(trail.queue_wait),
            upstream_ms = ms(now.saturating_duration_since(trail.sent)),
            first_byte_ms = self.first_byte.map(ms),
            duration_ms = ms(now.saturating_duration_since(trail.received)),
            "request"
        );
    }
}
