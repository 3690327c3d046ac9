//! `GET /status`: what each node is doing, as JSON. Never a key.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::state::AppState;

pub async fn handle(State(state): State<Arc<AppState>>) -> Json<Value> {
    let live = state.live();
    let now = Instant::now();
    let nodes: Vec<Value> = live
        .nodes
        .iter()
        .map(|node| {
            let u = node.usage.snapshot(now);
            let limit = |quota: Option<std::num::NonZeroU64>, used: u64| {
                json!({"limit": quota.map(u64::from), "used": used})
            };
            json!({
                "name": &*node.name,
                "url": &*node.url,
                "models": node.models,
                "healthy": true,
                "in_flight": u.in_flight,
                "reserved_tokens": u.pending_tokens,
                "cooldown_remaining_ms": u.cooldown_remaining.map(|d| d.as_millis() as u64),
                "limits": {
                    "rpm": limit(u.quota.rpm, u.requests),
                    "tpm": limit(u.quota.tpm, u.tokens),
                    "bpm": limit(u.quota.bpm, u.bytes),
                    "max_concurrency": limit(u.quota.max_concurrency, u.in_flight),
                },
            })
        })
        .collect();
    Json(json!({
        "nodes": nodes,
        "queue": {
            "depth": state.queue.depth(),
            "max_depth": live.config.queue.max_depth,
            "max_wait_ms": live.config.queue.max_wait.as_millis() as u64,
            "queued_total": state.queue.queued_total(),
            "refused_total": state.queue.refused_total(),
        },
    }))
}
