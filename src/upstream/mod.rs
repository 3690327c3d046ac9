//! Talking to a node: everything between the gateway and an upstream.
//!
//! - [`Endpoint`] is how a node is reached: its URL, dialect, key,
//!   identity, its names for models, and its held connections
//!   ([`connections`]), one transport for requests and probes alike.
//! - [`dialect`] writes what a node of either dialect (OpenAI's, Azure's)
//!   is sent: its URL, the header its key goes in, the body's `model`.
//! - [`headers`] filters headers both ways: the client's credentials and
//!   hop-by-hop headers never reach a node; the node's account and own
//!   rate-limit headers never reach the client.
//! - [`send`] sends one attempt and waits for its answer's head; [`probe`]
//!   asks a node with its key alone.
//! - [`verdict::judge`] reads an attempt's answer (or its absence) into
//!   one [`NodeVerdict`]: what passive health hears, the rest the node asks
//!   for and why, whether its key may be refused, its rate-limit report.
//!   The proxy applies it; nothing else reads an answer for the node.
//! - [`answer`] reads what an answer's headers and small bodies say.
//!
//! Bodies are passed as bytes, never re-serialised but for the `model`
//! value, and never decompressed.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use bytes::Bytes;

pub(crate) mod answer;
pub(crate) mod connections;
pub mod dialect;
pub(crate) mod endpoint;
pub(crate) mod headers;
pub(crate) mod verdict;

pub(crate) use connections::Failure;
pub use endpoint::Endpoint;
pub(crate) use verdict::{NodeVerdict, judge};

/// Sends one attempt to `url` (see [`dialect::url`]) and waits for the
/// response head, within `first_byte_timeout`.
pub(crate) async fn send(
    endpoint: &Endpoint,
    method: Method,
    url: reqwest::Url,
    client_headers: &HeaderMap,
    body: Bytes,
    first_byte_timeout: Duration,
    traceparent: Option<&HeaderValue>,
) -> Result<reqwest::Response, Failure> {
    let mut headers = headers::outgoing(client_headers, endpoint);
    if let Some(traceparent) = traceparent {
        // The gateway's span is the upstream's parent, not the caller's.
        headers.insert(headers::TRACEPARENT, traceparent.clone());
    }
    let exchange = endpoint.connections.send(method, &url, headers, body);
    match tokio::time::timeout(first_byte_timeout, exchange).await {
        Err(_elapsed) => Err(Failure::Timeout),
        Ok(sent) => sent,
    }
}

/// Asks the node `GET {path}` (in its dialect) with its key alone, over the
/// connections requests use: the answer's status within `timeout`, or why
/// none came. The answer's body is not read (its connection is closed).
pub(crate) async fn probe(
    endpoint: &Endpoint,
    path: &str,
    timeout: Duration,
) -> Result<StatusCode, Failure> {
    let url = dialect::probe_url(endpoint, path);
    let none = HeaderMap::new();
    let sent = send(
        endpoint,
        Method::GET,
        url,
        &none,
        Bytes::new(),
        timeout,
        None,
    )
    .await;
    Ok(sent?.status())
}
