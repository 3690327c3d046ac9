//! The headers of both directions: what the node is sent (the client's
//! end-to-end headers with the node's key and identity in place of the
//! client's credentials), and what the client is relayed.
//!
//! Invariants: the client's `authorization` and `api-key` never leave the
//! gateway; hop-by-hop headers (RFC 9110 §7.6.1: `connection` and the
//! headers it names, `keep-alive`, `proxy-authenticate`,
//! `proxy-authorization`, `te`, `trailer`, `transfer-encoding`, `upgrade`)
//! never cross in either direction; the node's account (organisation,
//! project, cookies) and its own `x-ratelimit-*` never reach the client.

use axum::http::{HeaderMap, HeaderName, header};

use super::Endpoint;

/// `OpenAI-Organization`: which organisation a request bills.
pub(crate) const ORGANIZATION: HeaderName = HeaderName::from_static("openai-organization");
/// `OpenAI-Project`: which project a request bills.
pub(crate) const PROJECT: HeaderName = HeaderName::from_static("openai-project");

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether `name` must not be forwarded: hop-by-hop, or named by `connection`.
fn is_hop_by_hop(name: &HeaderName, headers: &HeaderMap) -> bool {
    HOP_BY_HOP.contains(name)
        || headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| name.as_str().eq_ignore_ascii_case(token.trim()))
}

/// W3C trace context: the gateway's span goes upstream as the parent.
pub(super) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The client's end-to-end headers, minus its credentials, what the HTTP
/// client sets itself, and what would let a client pick which organisation
/// or project a node's key bills; plus the node's key (in its dialect's
/// header) and its own organisation and project.
pub(super) fn outgoing(client: &HeaderMap, node: &Endpoint) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(client.len() + 1 + node.identity.len());
    for (name, value) in client {
        let dropped = is_hop_by_hop(name, client)
            || name == header::AUTHORIZATION
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || name.as_str() == "api-key"
            || name == ORGANIZATION
            || name == PROJECT;
        if !dropped {
            out.append(name.clone(), value.clone());
        }
    }
    let (name, key) = super::dialect::key_header(node);
    out.insert(name, key.clone());
    for (name, value) in &node.identity {
        out.insert(name.clone(), value.clone());
    }
    out
}

/// What an answer says of the node's account, never the client's business:
/// which organisation and project the key bills, and cookies the upstream
/// sets for the key's session.
const ACCOUNT_HEADERS: [HeaderName; 3] = [ORGANIZATION, PROJECT, header::SET_COOKIE];

/// Makes the upstream's headers the ones to relay to the client, in place
/// (the map is not rebuilt): without the hop-by-hop ones, the node's
/// account's ([`ACCOUNT_HEADERS`]), nor the node's own `x-ratelimit-*`
/// (the client gets its own, or the pool's).
pub(crate) fn strip_for_relay(headers: &mut HeaderMap) {
    // Names the `connection` header lists are hop-by-hop too (rare).
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&ACCOUNT_HEADERS).chain(&listed) {
        headers.remove(name);
    }
    if headers
        .keys()
        .any(|name| name.as_str().starts_with(RATE_LIMIT_PREFIX))
    {
        let theirs: Vec<HeaderName> = headers
            .keys()
            .filter(|name| name.as_str().starts_with(RATE_LIMIT_PREFIX))
            .cloned()
            .collect();
        for name in &theirs {
            headers.remove(name);
        }
    }
}

/// The node's own rate-limit headers, which are never relayed.
const RATE_LIMIT_PREFIX: &str = "x-ratelimit-";

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert("x-request-id", HeaderValue::from_static("abc"));
        headers.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("9"),
        );
        headers.insert("x-ratelimit-made-up", HeaderValue::from_static("1"));
        headers.insert("openai-organization", HeaderValue::from_static("org-x"));
        headers.insert("openai-project", HeaderValue::from_static("proj_x"));
        headers.append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
        headers.append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
        strip_for_relay(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers["x-request-id"], "abc");
    }
}
