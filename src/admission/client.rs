//! A client's own limits, checked by this replica: its model list, its
//! rpm/tpm window and its token bucket. A client over its own limit does
//! not queue: waiting would not free anything for it sooner than the
//! `Retry-After` it is told.
//!
//! With limits shared through Redis, the admission script checks the
//! client instead (once, atomically with the node); this replica then only
//! [`record`]s the request in the client's own window, which keeps
//! counting for the fallback.

use tokio::time::Instant;

use super::refusal::{Headroom, Refusal};
use crate::clients::{BodyRead, Client};
use crate::limits::{Demand, Outlook, Reservation};

/// Whether the client may use `model`.
pub(super) fn allowed(client: &Client, model: Option<&str>) -> Result<(), Refusal> {
    match (&client.models, model) {
        (Some(allowed), Some(model)) if !allowed.iter().any(|m| m == model) => {
            Err(Refusal::ModelNotAllowed(model.to_owned()))
        }
        _ => Ok(()),
    }
}

/// Whether the client could make any request now: its window has a
/// request to spare, its bucket a token, and its concurrency a place for
/// one more body being read. Checked before the body is read, so a client
/// over its own limit costs no parsing; holds the body's place until the
/// returned guard drops (after admission has counted the request).
pub(super) fn precheck(client: &Client) -> Result<BodyRead, Refusal> {
    let now = Instant::now();
    let Some(reading) = client.limiter.start_reading() else {
        return Err(Refusal::ClientLimited(Headroom::OnRelease));
    };
    let nothing = Demand::default();
    if let Outlook::At(at) = client.limiter.window.outlook(nothing, now) {
        return Err(Refusal::ClientLimited(Headroom::at(Some(at), now)));
    }
    if let Some(bucket) = &client.limiter.bucket
        && let Err(wait) = bucket.lock().peek(now)
    {
        return Err(Refusal::ClientLimited(Headroom::In(wait)));
    }
    Ok(reading)
}

/// A client has no bytes limit: only requests and tokens count.
fn of_client(demand: Demand) -> Demand {
    Demand { bytes: 0, ..demand }
}

/// Reserves `demand` in the client's window and takes a bucket token, or
/// says why not. The window is checked first: a refused request must not
/// spend a bucket token.
pub(super) fn reserve(client: &Client, demand: Demand) -> Result<Reservation, Refusal> {
    let now = Instant::now();
    let demand = of_client(demand);
    let window = &client.limiter.window;
    let Some(reservation) = window.try_reserve(demand, now) else {
        return Err(match window.outlook(demand, now) {
            Outlook::Never(limit) => Refusal::ClientTooSmall(limit),
            Outlook::At(at) => Refusal::ClientLimited(Headroom::at(Some(at), now)),
            Outlook::Now | Outlook::OnRelease | Outlook::Retired => {
                Refusal::ClientLimited(Headroom::OnRelease)
            }
        });
    };
    if let Some(bucket) = &client.limiter.bucket
        && let Err(wait) = bucket.lock().take(now)
    {
        reservation.cancel();
        return Err(Refusal::ClientLimited(Headroom::In(wait)));
    }
    Ok(reservation)
}

/// Counts `demand` in the client's window without checking it: the shared
/// limits checked it.
pub(super) fn record(client: &Client, demand: Demand) -> Reservation {
    client
        .limiter
        .window
        .record(of_client(demand), Instant::now())
}
