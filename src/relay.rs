//! Relaying an upstream response to the client, and settling its
//! reservation from what actually flowed.
//!
//! Chunks are passed on the moment they arrive (server-sent events event by
//! event, never buffered). On the way, each chunk's size is counted against
//! the node's bpm, and a [`Meter`] notes the usage: the `usage` object of a
//! JSON answer or of the final stream event, or else the streamed text.
//!
//! Invariant: the reservation is settled exactly once, when the relay ends
//! for any reason: end of body, upstream error, `request_timeout`, or the
//! client going away (the body is dropped). A stream cut short is settled at
//! the prompt plus the tokens streamed so far. A client with its own key
//! gets its ledger [`Entry`] at the same moment, with the same token counts.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::Stream;
use tokio::time::{Instant, Sleep};

use crate::admission::{self, Booking, ClientHold};
use crate::clients::ClientCounters;
use crate::ledger::{Entry, Ledger};
use crate::meter::{Meter, SseMeter, TokenUsage};
use crate::metrics::{self, OTHER_MODEL, Route};
use crate::money::{Cost, Price};
use crate::objects::{Kind, Objects, answer};
use crate::outcome::ACCESS_LOG;
use crate::request::RequestInfo;
use crate::snapshot::Node;
use crate::tasks::Tasks;
use crate::tokens::Encoding;
use crate::traces::{Answered, RequestSpan};
use crate::upstream;

pub(crate) const NODE_HEADER: HeaderName = HeaderName::from_static("x-balancer-node");

/// A client's usage of one request, recorded when its relay ends.
#[derive(Debug)]
pub(crate) struct UsageTicket {
    pub ledger: Ledger,
    /// The client's counters for `/metrics`.
    pub counters: Arc<ClientCounters>,
    pub entry: Entry,
}

/// An object a streamed answer creates: its id is recorded for `owner`
/// on the answering node the moment the stream shows it.
pub(crate) struct StreamedObject {
    pub objects: Arc<Objects>,
    pub tasks: Tasks,
    pub kind: Kind,
    pub owner: Arc<str>,
}

impl std::fmt::Debug for StreamedObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamedObject")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// What a request holds while its answer is relayed, settled when the
/// relay ends.
#[derive(Debug)]
pub(crate) struct Held {
    /// The answering node's booking.
    pub(crate) booking: Booking,
    /// The client's hold on its own limits.
    pub(crate) client: ClientHold,
    /// The client's ledger entry, if it has its own key.
    pub(crate) usage: Option<UsageTicket>,
    /// The object a streamed answer creates, to record.
    pub(crate) creates: Option<StreamedObject>,
    /// The model's price on the answering node, and its multiplier.
    pub(crate) price: Option<(Price, f64)>,
}

/// When a request arrived and what it went through before its answer, for
/// its metrics and its log line.
#[derive(Debug)]
pub(crate) struct Trace {
    /// The request's path, copied: a clone of its `Uri` would share, and
    /// keep for the whole of a stream, the client connection's read buffer
    /// the head was parsed from (8 KiB, which hyper must then replace).
    pub path: Box<str>,
    pub received: Instant,
    /// Time spent waiting for a node with headroom.
    pub queue_wait: Duration,
    /// When the attempt that was answered was sent.
    pub sent: Instant,
    /// Attempts made, the answered one included.
    pub attempts: u32,
    pub request_bytes: u64,
    /// Whether the config lists the model asked for: only listed models
    /// are metric labels.
    pub model_listed: bool,
    /// The request's span, when traced: ended with the relay.
    pub span: Option<RequestSpan>,
}

impl Trace {
    /// The `model` label of this request's metrics: the model if the
    /// config lists it, else [`OTHER_MODEL`] (a client's made-up names
    /// never become labels), `""` when none was asked for.
    fn model_label<'m>(&self, model: Option<&'m str>) -> &'m str {
        match model {
            Some(model) if self.model_listed => model,
            Some(_) => OTHER_MODEL,
            None => "",
        }
    }
}

/// Turns the upstream's answer into the client's response.
pub(crate) fn relay(
    mut response: reqwest::Response,
    node: &Node,
    held: Held,
    info: &RequestInfo,
    deadline: Instant,
    trace: Trace,
    rate_limits: HeaderMap,
) -> Response {
    let status = response.status();
    let mut headers = std::mem::take(response.headers_mut());
    upstream::strip_for_relay(&mut headers);
    headers.insert(NODE_HEADER, node.name_header.clone());
    headers.extend(rate_limits);
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let meter = if content_type.starts_with("text/event-stream") {
        Meter::Sse(if held.creates.is_some() {
            SseMeter::watching_created()
        } else {
            SseMeter::default()
        })
    } else if content_type.contains("json") && (info.demand.tokens > 0 || info.model.is_some()) {
        Meter::Json(Vec::new())
    } else {
        Meter::Opaque
    };
    let route = node
        .metrics
        .routes
        .route(trace.model_label(info.model.as_deref()));
    let settlement = Settlement {
        price: held.price,
        creates: held.creates,
        holds: Some((held.booking, held.client)),
        usage: held.usage,
        meter,
        prompt_tokens: info.prompt_tokens,
        encoding: info.encoding,
        status,
        node: Arc::clone(&node.name),
        // The log names the model asked for when its label does not.
        unlisted_model: info
            .model
            .as_deref()
            .filter(|m| *m != &*route.model)
            .map(Box::from),
        route,
        trace,
        first_byte: None,
        response_bytes: 0,
        content_length: response.content_length(),
        end: End::ClientGone,
    };
    let stream = RelayStream {
        inner: Box::pin(response.bytes_stream()),
        settlement: Some(settlement),
        deadline: Box::pin(tokio::time::sleep_until(deadline)),
    };
    (status, headers, Body::from_stream(stream)).into_response()
}

type UpstreamBody = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

struct RelayStream {
    inner: UpstreamBody,
    /// `None` once the relay has ended and settled.
    settlement: Option<Settlement>,
    deadline: Pin<Box<Sleep>>,
}

impl Stream for RelayStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(settlement) = this.settlement.as_mut() else {
            return Poll::Ready(None);
        };
        match this.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                settlement.observe(&chunk);
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(err))) => {
                settlement.end = End::UpstreamBroke;
                this.settlement = None;
                Poll::Ready(Some(Err(std::io::Error::other(err))))
            }
            Poll::Ready(None) => {
                settlement.end = End::Complete;
                this.settlement = None;
                Poll::Ready(None)
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    settlement.end = End::TimedOut;
                    this.settlement = None;
                    Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "request_timeout reached while relaying",
                    ))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// How a relay ended.
#[derive(Debug, Clone, Copy)]
enum End {
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

/// Settles the reservation, counts the request and logs its line when
/// dropped: on every way a relay can end.
struct Settlement {
    /// The model's price on this node, and its multiplier.
    price: Option<(Price, f64)>,
    /// The object the stream creates, until its id is recorded.
    creates: Option<StreamedObject>,
    /// The node's booking and the client's hold, settled together.
    holds: Option<(Booking, ClientHold)>,
    usage: Option<UsageTicket>,
    meter: Meter,
    prompt_tokens: u64,
    encoding: Encoding,
    status: StatusCode,
    node: Arc<str>,
    route: Arc<Route>,
    /// The model asked for, when the config does not list it.
    unlisted_model: Option<Box<str>>,
    trace: Trace,
    /// Time from arrival to the first body byte, once it came.
    first_byte: Option<Duration>,
    response_bytes: u64,
    /// The answer's declared length: the server stops reading the body once
    /// it has sent that much, so a drop at that point is the end.
    content_length: Option<u64>,
    end: End,
}

impl Settlement {
    fn observe(&mut self, chunk: &Bytes) {
        if self.first_byte.is_none() && !chunk.is_empty() {
            let elapsed = metrics::elapsed(self.trace.received);
            self.route.first_byte.observe(elapsed);
            self.first_byte = Some(elapsed);
        }
        self.response_bytes += chunk.len() as u64;
        // Response bytes count against the node's bpm; a client has no bpm.
        if let Some((booking, _)) = &self.holds {
            booking.record_response_bytes(chunk.len() as u64);
        }
        if let Some(ticket) = &mut self.usage {
            ticket.entry.totals.response_bytes += chunk.len() as u64;
        }
        self.meter.observe(chunk);
        if self.creates.is_some()
            && let Some(id) = self.meter.take_created()
            && let Some(created) = self.creates.take()
        {
            let seen = answer::Sighting {
                id,
                kind: created.kind,
                created_at: None,
                expires_at: None,
                completed_at: None,
            };
            let record = created.objects.record_of(&seen, &self.node, &created.owner);
            created.objects.keep_soon(&created.tasks, seen.id, record);
        }
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        if matches!(self.end, End::ClientGone) && self.content_length == Some(self.response_bytes) {
            self.end = End::Complete;
        }
        let success = self.status.is_success();
        let used = self.meter.usage(self.prompt_tokens, self.encoding, success);
        // Unknown usage: the prompt as counted here, no completion.
        let counted = used.unwrap_or(TokenUsage::prompt_only(self.prompt_tokens));
        self.count(counted);
        // An error answer costs nothing; a priced answer costs its usage.
        let cost = self.price.map(|(price, multiplier)| {
            if success {
                price.cost(&counted.priced(), multiplier)
            } else {
                Cost::ZERO
            }
        });
        // Unknown usage keeps a budget's worst case: that is what counts.
        let charged = match (used, &self.holds) {
            (None, Some((_, client))) => client.budget_worst().or(cost),
            _ => cost,
        };
        // Usage first: once the reservations are settled (what `/status`
        // shows), the record is already on its way to the writer.
        let client = self.usage.take().map(|ticket| {
            let UsageTicket {
                ledger,
                counters,
                mut entry,
            } = ticket;
            counters.record(counted.prompt, counted.completion);
            if let Some(charged) = charged {
                counters
                    .costs
                    .add(&self.node, &self.route.model, charged.nanos());
            }
            entry.totals.prompt_tokens = counted.prompt;
            entry.totals.completion_tokens = counted.completion;
            entry.totals.cost_nanos = charged.map_or(0, Cost::nanos);
            let id = Arc::clone(&entry.client_id);
            ledger.record(entry);
            id
        });
        if client.is_none()
            && let Some(charged) = charged
        {
            self.route
                .cost_nanos
                .fetch_add(charged.nanos(), Ordering::Relaxed);
        }
        if let Some((booking, client)) = self.holds.take() {
            // Unknown usage of a successful answer: keep the full reservation.
            admission::settle(booking, client, used.map(TokenUsage::total), used.and(cost));
        }
        self.log(counted, charged, client.as_deref());
        if let Some(span) = self.trace.span.take() {
            span.answered(Answered {
                status: self.status.as_u16(),
                node: &self.node,
                attempts: self.trace.attempts,
                end: self.end.as_str(),
                input_tokens: counted.prompt,
                output_tokens: counted.completion,
                cost_usd: charged.map(Cost::usd),
            });
        }
    }
}

impl Settlement {
    fn count(&self, used: TokenUsage) {
        let route = &self.route;
        route.answered(self.status, metrics::elapsed(self.trace.received));
        route
            .prompt_tokens
            .fetch_add(used.prompt, Ordering::Relaxed);
        route
            .completion_tokens
            .fetch_add(used.completion, Ordering::Relaxed);
        route
            .request_bytes
            .fetch_add(self.trace.request_bytes, Ordering::Relaxed);
        route
            .response_bytes
            .fetch_add(self.response_bytes, Ordering::Relaxed);
    }

    /// The request's one line.
    fn log(&self, used: TokenUsage, cost: Option<Cost>, client: Option<&str>) {
        let now = Instant::now();
        let ms = |d: Duration| d.as_millis() as u64;
        tracing::info!(
            target: ACCESS_LOG,
            path = &*self.trace.path,
            node = &*self.node,
            model = self.unlisted_model.as_deref().unwrap_or(&self.route.model),
            status = self.status.as_u16(),
            end = self.end.as_str(),
            client = client.unwrap_or(""),
            prompt_tokens = used.prompt,
            completion_tokens = used.completion,
            cost_usd = cost.map(Cost::usd),
            request_bytes = self.trace.request_bytes,
            response_bytes = self.response_bytes,
            attempts = self.trace.attempts,
            queue_ms = ms(self.trace.queue_wait),
            upstream_ms = ms(now.saturating_duration_since(self.trace.sent)),
            first_byte_ms = self.first_byte.map(ms),
            duration_ms = ms(now.saturating_duration_since(self.trace.received)),
            "request"
        );
    }
}
