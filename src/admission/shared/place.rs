//! Placing a request through the shared windows: one admission script per
//! try, and between tries a wait for a release published by any replica or
//! for the moment the script said a window frees enough. The wait is local
//! and bounded by `queue.max_wait`; nothing polls Redis.

use std::sync::Arc;

use tokio::time::Instant;

use super::{Candidate, ClientLimitsView, Lease, ScriptAnswer, SharedLimits};
use crate::admission::Ask;
use crate::admission::queue::Queue;
use crate::admission::refusal::{self, Headroom, Refusal};
use crate::clients::Client;
use crate::snapshot::NodeId;

/// Why the shared windows placed nothing.
#[derive(Debug)]
pub(in crate::admission) enum NotPlaced {
    /// Refused, as the local queue would refuse.
    Refused(Refusal),
    /// Nothing has headroom now (a retry does not wait).
    NoHeadroom,
    /// Redis could not answer: `on_redis_error` decides.
    Unavailable,
}

/// Places the request on the least-loaded candidate (not `excluded`) that
/// has headroom in the shared windows, checking `client`'s limits in the
/// same script; waits for headroom if `wait` (a first attempt), else takes
/// only what is free now (a retry).
pub(in crate::admission) async fn place(
    shared: &Arc<SharedLimits>,
    queue: &Queue,
    ask: &Ask<'_>,
    excluded: &[NodeId],
    client: Option<&Client>,
    wait: bool,
) -> Result<(NodeId, Lease), NotPlaced> {
    let live = ask.live;
    let rotation = queue.next_rotation();
    let in_rotation: Vec<NodeId> = ask
        .candidates
        .iter()
        .copied()
        .filter(|id| !excluded.contains(id) && live.node(*id).health.in_rotation())
        .collect();
    if in_rotation.is_empty() {
        if !wait {
            return Err(NotPlaced::NoHeadroom);
        }
        let out = refusal::out_of_rotation(live, ask.candidates, excluded, Instant::now());
        return Err(NotPlaced::Refused(
            out.unwrap_or(Refusal::Saturated(Headroom::OnRelease)),
        ));
    }
    let candidates: Vec<Candidate<'_>> = in_rotation
        .iter()
        .map(|&id| Candidate {
            name: &live.node(id).name,
            terms: live.node(id).limiter.terms(ask.demand),
        })
        .collect();
    let client = client.map(client_view);
    let give_up = ask
        .deadline
        .min(Instant::now() + live.config.queue.max_wait);
    let lease_for = live.config.server.request_timeout;
    // Counted in the queue's depth while it waits.
    let mut waiting = None;
    loop {
        // Listen before asking, so a release between the answer and the
        // wait is not missed.
        let freed = shared.freed();
        tokio::pin!(freed);
        freed.as_mut().enable();
        let answer = shared
            .admit(&candidates, ask.demand, client, rotation, lease_for)
            .await
            .map_err(|_| NotPlaced::Unavailable)?;
        let until = match answer {
            ScriptAnswer::Placed { index, lease } => return Ok((in_rotation[index], lease)),
            ScriptAnswer::Wait { until } => until,
            refused => return Err(NotPlaced::Refused(refusal_of(refused, ask, &in_rotation))),
        };
        if !wait {
            return Err(NotPlaced::NoHeadroom);
        }
        let now = Instant::now();
        let saturated = || NotPlaced::Refused(Refusal::Saturated(Headroom::at(until, now)));
        if now >= give_up || until.is_some_and(|at| at > give_up) {
            return Err(saturated());
        }
        if waiting.is_none() {
            waiting = Some(
                queue
                    .wait_shared(live.config.queue.max_depth)
                    .ok_or_else(saturated)?,
            );
        }
        tokio::select! {
            () = &mut freed => {}
            () = tokio::time::sleep_until(until.unwrap_or(give_up).min(give_up)) => {}
        }
    }
}

/// A client's limits, as the script takes them.
fn client_view(client: &Client) -> ClientLimitsView<'_> {
    let (rpm, tpm, burst, rate_per_second) = client.limiter.shared_limits();
    ClientLimitsView {
        id: &client.id,
        rpm,
        tpm,
        burst,
        rate_per_second,
    }
}

/// The refusal a script's answer means (neither placed nor waiting).
fn refusal_of(answer: ScriptAnswer, ask: &Ask<'_>, in_rotation: &[NodeId]) -> Refusal {
    match answer {
        ScriptAnswer::Never(limit) => refusal::too_large(ask.live, in_rotation, limit, ask.demand),
        ScriptAnswer::ClientLimited { retry_after } => {
            Refusal::ClientLimited(Headroom::In(retry_after))
        }
        ScriptAnswer::ClientTooSmall(limit) => Refusal::ClientTooSmall(limit),
        // Not refusals: the caller took these.
        ScriptAnswer::Placed { .. } | ScriptAnswer::Wait { .. } => {
            Refusal::Saturated(Headroom::OnRelease)
        }
    }
}
