//! Where a request may go ([`Target`]: its snapshot and candidates), what
//! it asks of admission there, and the most it may cost.

use std::sync::Arc;

use tokio::time::Instant;

use super::Inbound;
use crate::admission::Ask;
use crate::error::GatewayError;
use crate::money::Cost;
use crate::snapshot::{Live, NodeId};
use crate::state::AppState;

/// Where a request may go: its snapshot and the nodes in it that serve
/// its model.
pub(super) struct Target {
    pub(super) live: Arc<Live>,
    pub(super) candidates: Arc<[NodeId]>,
    /// Whether the config lists the model asked for: only listed models
    /// are metric labels.
    pub(super) model_listed: bool,
}

impl Target {
    pub(super) fn ask<'a>(
        &'a self,
        state: &'a AppState,
        request: &'a Inbound<'_>,
        deadline: Instant,
        worst_cost: Option<Cost>,
    ) -> Ask<'a> {
        // What its client's class may use of each node's quota.
        let priority = request.client.map(|c| c.share.priority).unwrap_or_default();
        let usable = self.live.config.queue.reserves.usable(priority);
        Ask {
            live: &self.live,
            model: request.info.model.as_deref(),
            candidates: &self.candidates,
            demand: crate::limits::Demand {
                usable,
                ..request.info.demand
            },
            client: request.client,
            deadline,
            worst_cost,
            clients: &state.clients,
        }
    }

    /// The most `request` may cost on any candidate, when its client has a
    /// budget: its prompt at the input price, every completion token it
    /// reserves on that node at the output price, every image it asks
    /// for. A candidate without a price for the model refuses it (400): a
    /// budget never lets a request through uncounted.
    pub(super) fn worst_cost(&self, request: &Inbound<'_>) -> Result<Option<Cost>, GatewayError> {
        let info = request.info;
        let (Some(_), Some(model)) = (request.client.and_then(|c| c.budget), info.model.as_deref())
        else {
            return Ok(None);
        };
        let images = if request.operation.path.starts_with("/images/") {
            info.choices
        } else {
            0
        };
        let mut worst = Cost::ZERO;
        for &id in self.candidates.iter() {
            let (price, multiplier) = self
                .live
                .price_on(id, model)
                .ok_or_else(|| GatewayError::ModelNotPriced(model.to_owned()))?;
            let node = self.live.node(id);
            let tokens = info.demand.on(node.default_completion_tokens).tokens;
            let completion = tokens.saturating_sub(info.prompt_tokens);
            worst = worst.max(price.worst_case(info.prompt_tokens, completion, images, multiplier));
        }
        Ok(Some(worst))
    }
}
