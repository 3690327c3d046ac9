//! The `x-ratelimit-*` headers a client gets, in OpenAI's formats: they
//! describe the client's own limits where it has them, else the pool's
//! headroom for the model across the nodes that serve it (in rotation);
//! never the answering node's own (those are not relayed).
//!
//! For requests and tokens each: `limit` (the sum of the limits), remaining
//! (what is left in the rolling minute) and `reset` (until what is counted
//! now has all expired, as `1s`, `6m0s`, `20ms`). A dimension some node
//! does not limit has no headers.

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use tokio::time::Instant;

use crate::clients::Client;
use crate::snapshot::{Live, NodeId};

const NAMES: [[HeaderName; 3]; 2] = [
    [
        HeaderName::from_static("x-ratelimit-limit-requests"),
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
    ],
    [
        HeaderName::from_static("x-ratelimit-limit-tokens"),
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
    ],
];

/// (limit, used, when all of it has expired) per dimension.
type Headroom = [Option<(u64, u64, Option<Instant>)>; 2];

/// The headers for an answer to `client` (if it has its own limits) or
/// from the pool of `candidates`.
pub(super) fn rate_limit_headers(
    live: &Live,
    candidates: &[NodeId],
    client: Option<&Client>,
) -> HeaderMap {
    let now = Instant::now();
    let own = client
        .map(|c| c.limiter.window.headroom(now))
        .filter(|h| h.iter().any(Option::is_some));
    let headroom = own.unwrap_or_else(|| pool(live, candidates, now));
    let mut headers = HeaderMap::new();
    for (dimension, names) in headroom.iter().zip(&NAMES) {
        let Some((limit, used, empty_at)) = dimension else {
            continue;
        };
        let reset = empty_at.map_or(std::time::Duration::ZERO, |at| {
            at.saturating_duration_since(now)
        });
        for (name, value) in names.iter().zip([
            limit.to_string(),
            limit.saturating_sub(*used).to_string(),
            crate::upstream::answer::reset_text(reset),
        ]) {
            if let Ok(value) = HeaderValue::try_from(value) {
                headers.insert(name.clone(), value);
            }
        }
    }
    headers
}

/// The headroom of the nodes in rotation among `candidates`, summed; a
/// dimension one of them does not limit is left out.
fn pool(live: &Live, candidates: &[NodeId], now: Instant) -> Headroom {
    let mut sum: Headroom = [Some((0, 0, None)); 2];
    let mut any = false;
    for &id in candidates {
        let node = live.node(id);
        if !node.health.in_rotation() {
            continue;
        }
        any = true;
        for (total, node) in sum.iter_mut().zip(node.limiter.headroom(now)) {
            *total = match (*total, node) {
                (Some((limit, used, empty)), Some((l, u, e))) => Some((
                    limit.saturating_add(l),
                    used.saturating_add(u.min(l)),
                    empty.max(e),
                )),
                _ => None,
            };
        }
    }
    if any { sum } else { [None, None] }
}
