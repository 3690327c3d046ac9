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
//! gets its ledger [`Entry`](crate::ledger::Entry) at the same moment, with the same token counts.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::Stream;
use tokio::time::{Instant, Sleep};

use crate::admission::{self, Booking, ClientHold};
use crate::meter::{Meter, SseMeter, TokenUsage};
use crate::money::{Cost, Price};
use crate::objects::{Kind, Objects, answer};
use crate::outcome::{self, End, Relayed, Relaying, Trail, UsageTicket};
use crate::request::RequestInfo;
use crate::snapshot::Node;
use crate::tasks::Tasks;
use crate::tokens::Encoding;
use crate::upstream;

pub(crate) const NODE_HEADER: HeaderName = HeaderName::from_static("x-balancer-node");

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

/// What the relay needs to know of the request it answers.
#[derive(Debug)]
pub(crate) struct Answering<'a> {
    pub info: &'a RequestInfo,
    pub path: &'a str,
    pub request_bytes: u64,
    /// Whether the config lists the model asked for: only listed models
    /// are metric labels.
    pub model_listed: bool,
    /// The request's deadline: the relay ends there.
    pub deadline: Instant,
}

/// Turns the upstream's answer into the client's response.
pub(crate) fn relay(
    mut response: reqwest::Response,
    node: &Node,
    held: Held,
    request: &Answering<'_>,
    trail: Trail,
    rate_limits: HeaderMap,
) -> Response {
    let status = response.status();
    let mut headers = std::mem::take(response.headers_mut());
    upstream::headers::strip_for_relay(&mut headers);
    headers.insert(NODE_HEADER, node.endpoint.name_header.clone());
    headers.extend(rate_limits);
    let info = request.info;
    let meter = meter_for(&headers, info, held.creates.is_some());
    let label = outcome::model_label(info.model.as_deref(), request.model_listed);
    let route = node.metrics.routes.route(label);
    let relaying = Relaying {
        trail,
        path: request.path.into(),
        node: Arc::clone(&node.name),
        // The log names the model asked for when its label does not.
        unlisted_model: info
            .model
            .as_deref()
            .filter(|m| *m != &*route.model)
            .map(Box::from),
        route,
        status,
        request_bytes: request.request_bytes,
        response_bytes: 0,
        first_byte: None,
    };
    let settlement = Settlement {
        price: held.price,
        creates: held.creates,
        holds: Some((held.booking, held.client)),
        usage: held.usage,
        meter,
        prompt_tokens: info.prompt_tokens,
        encoding: info.encoding,
        relaying,
        content_length: response.content_length(),
        end: End::ClientGone,
    };
    let stream = RelayStream {
        inner: Box::pin(response.bytes_stream()),
        settlement: Some(settlement),
        deadline: Box::pin(tokio::time::sleep_until(request.deadline)),
    };
    let mut response = (status, headers, Body::from_stream(stream)).into_response();
    response.extensions_mut().insert(Relayed);
    response
}

/// How the answer's usage is read: from its events, its JSON, or not at all.
fn meter_for(headers: &HeaderMap, info: &RequestInfo, watch_created: bool) -> Meter {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.starts_with("text/event-stream") {
        Meter::Sse(if watch_created {
            SseMeter::watching_created()
        } else {
            SseMeter::default()
        })
    } else if content_type.contains("json") && (info.demand.tokens > 0 || info.model.is_some()) {
        Meter::Json(Vec::new())
    } else {
        Meter::Opaque
    }
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

/// Settles the reservation and hands the outcome over when dropped: on
/// every way a relay can end.
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
    /// The outcome's record, handed over at the end.
    relaying: Relaying,
    /// The answer's declared length: the server stops reading the body once
    /// it has sent that much, so a drop at that point is the end.
    content_length: Option<u64>,
    end: End,
}

impl Settlement {
    fn observe(&mut self, chunk: &Bytes) {
        self.relaying.observe(chunk.len());
        // Response bytes count against the node's bpm; a client has no bpm.
        if let Some((booking, _)) = &self.holds {
            booking.record_response_bytes(chunk.len() as u64);
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
            let node = &self.relaying.node;
            let record = created.objects.record_of(&seen, node, &created.owner);
            created.objects.keep_soon(&created.tasks, seen.id, record);
        }
    }

    /// What the answer used (`None`: unknown), what is counted for it, what
    /// it cost at the node's price and what its client is charged.
    fn usage_and_cost(&self) -> (Option<TokenUsage>, TokenUsage, Option<Cost>, Option<Cost>) {
        let success = self.relaying.status.is_success();
        let used = self.meter.usage(self.prompt_tokens, self.encoding, success);
        // Unknown usage: the prompt as counted here, no completion.
        let counted = used.unwrap_or(TokenUsage::prompt_only(self.prompt_tokens));
        // An error answer costs nothing; a priced answer costs its usage.
        let cost = self.price.map(|(price, multiplier)| match success {
            true => price.cost(&counted.priced(), multiplier),
            false => Cost::ZERO,
        });
        // Unknown usage keeps a budget's worst case: that is what counts.
        let charged = match (used, &self.holds) {
            (None, Some((_, client))) => client.budget_worst().or(cost),
            _ => cost,
        };
        (used, counted, cost, charged)
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        let read_whole = self.content_length == Some(self.relaying.response_bytes);
        if self.end == End::ClientGone && read_whole {
            self.end = End::Complete;
        }
        let (used, counted, cost, charged) = self.usage_and_cost();
        // Usage first: once the reservations are settled (what `/status`
        // shows), the record is already on its way to the writer.
        let client = self.relaying.charge(self.usage.take(), counted, charged);
        if let Some((booking, client)) = self.holds.take() {
            // Unknown usage of a successful answer: keeps the full reservation.
            admission::settle(booking, client, used.map(TokenUsage::total), used.and(cost));
        }
        self.relaying
            .record(self.end, counted, charged, client.as_deref());
    }
}
