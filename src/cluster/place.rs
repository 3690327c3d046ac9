//! Placing a request through the shared windows: one admission script per
//! try, and between tries a wait for a release published by any replica or
//! for the moment the script said a window frees enough. The wait is local
//! and bounded by `queue.max_wait`; nothing polls Redis.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Admission, Candidate, ClientLimitsView, Cluster, Unavailable};
use crate::clients::Client;
use crate::error::GatewayError;
use crate::limits::Demand;
use crate::queue::{Placement, Queue, too_large};
use crate::state::Live;

/// Why the shared windows placed nothing.
#[derive(Debug)]
pub enum NotPlaced {
    /// Refused, as the local queue would refuse.
    Refused(GatewayError),
    /// Nothing has headroom now (a retry does not wait).
    NoHeadroom,
    /// Redis could not answer: `on_redis_error` decides.
    Unavailable(Unavailable),
}

/// What a placement needs to know of the request.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub candidates: &'a [usize],
    pub excluded: &'a [usize],
    pub demand: Demand,
    pub client: Option<&'a Client>,
    /// Wait for headroom until `queue.max_wait` (the first attempt), or
    /// take only what is free now (a retry).
    pub wait: bool,
    pub deadline: Instant,
}

/// Places the request on the least-loaded candidate that has headroom in
/// the shared windows, waiting for it if `ask.wait`.
pub async fn place(
    cluster: &Arc<Cluster>,
    queue: &Queue,
    live: &Live,
    ask: Ask<'_>,
) -> Result<Placement, NotPlaced> {
    let rotation = queue.next_rotation();
    let in_rotation: Vec<usize> = ask
        .candidates
        .iter()
        .copied()
        .filter(|i| !ask.excluded.contains(i) && live.nodes[*i].health.in_rotation())
        .collect();
    if in_rotation.is_empty() {
        if !ask.wait {
            return Err(NotPlaced::NoHeadroom);
        }
        return Err(NotPlaced::Refused(GatewayError::NoHealthyNode {
            retry_after: Duration::from_secs(1),
        }));
    }
    let candidates: Vec<Candidate<'_>> = in_rotation
        .iter()
        .map(|&i| Candidate {
            name: &live.nodes[i].name,
            quota: live.nodes[i].usage.quota(),
        })
        .collect();
    let client = ask.client.map(|c| {
        let (rpm, tpm, burst, rate_per_second) = c.usage.shared_limits();
        ClientLimitsView {
            id: &c.id,
            rpm,
            tpm,
            burst,
            rate_per_second,
        }
    });
    let give_up = ask
        .deadline
        .min(Instant::now() + live.config.queue.max_wait);
    let lease_for = live.config.server.request_timeout;
    // Counted in the queue's depth while it waits.
    let mut waiting = None;
    loop {
        // Listen before asking, so a release between the answer and the
        // wait is not missed.
        let freed = cluster.freed();
        tokio::pin!(freed);
        freed.as_mut().enable();
        let admission = cluster
            .admit(&candidates, ask.demand, client, rotation, lease_for)
            .await
            .map_err(NotPlaced::Unavailable)?;
        let until = match admission {
            Admission::Placed { index, lease } => {
                let node = in_rotation[index];
                let reservation = live.nodes[node]
                    .usage
                    .record(ask.demand, Instant::now())
                    .with_lease(lease);
                return Ok(Placement {
                    node,
                    reservation,
                    rebased: None,
                });
            }
            Admission::Never(limit) => {
                return Err(NotPlaced::Refused(too_large(
                    live,
                    &in_rotation,
                    limit,
                    ask.demand,
                )));
            }
            Admission::ClientLimited { retry_after } => {
                return Err(NotPlaced::Refused(GatewayError::ClientRateLimited {
                    retry_after,
                }));
            }
            Admission::ClientTooSmall(limit) => {
                return Err(NotPlaced::Refused(GatewayError::ClientLimitTooSmall {
                    limit: limit.field(),
                }));
            }
            Admission::Wait { until } => until,
        };
        if !ask.wait {
            return Err(NotPlaced::NoHeadroom);
        }
        let now = Instant::now();
        if now >= give_up || until.is_some_and(|at| at > give_up) {
            let retry_after = until.map_or(Duration::from_secs(1), |at| {
                at.saturating_duration_since(now)
            });
            return Err(NotPlaced::Refused(GatewayError::Saturated { retry_after }));
        }
        if waiting.is_none() {
            match queue.wait_shared(live.config.queue.max_depth) {
                Some(waiter) => waiting = Some(waiter),
                None => {
                    let retry_after = until.map_or(Duration::from_secs(1), |at| {
                        at.saturating_duration_since(now)
                    });
                    return Err(NotPlaced::Refused(GatewayError::Saturated { retry_after }));
                }
            }
        }
        tokio::select! {
            () = &mut freed => {}
            () = tokio::time::sleep_until(until.unwrap_or(give_up).min(give_up)) => {}
        }
    }
}
