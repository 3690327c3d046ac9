//! Looking at the gateway from outside: `GET /status` (what each node is
//! doing and why it is or is not in rotation, the queue, and the config's
//! reload history, as JSON), `GET /dashboard` (a page that draws
//! `/status`) and `GET /metrics` ([`scrape`]). Never a key: nodes are
//! shown by name and URL, and reload errors name fields, variables and
//! files, never their values.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::limits::Remaining;
use crate::money::budget::{rfc3339, unix_now};
use crate::snapshot::Node;
use crate::state::AppState;

pub(crate) mod scrape;

/// `GET /dashboard`: one self-contained page that draws `/status`.
const DASHBOARD: &str = include_str!("dashboard.html");

/// The page's policy: its own inline script and style (by hash) and
/// fetches of `/status`, nothing else; never framed (no clickjacking of an
/// operator's session).
static DASHBOARD_CSP: std::sync::LazyLock<axum::http::HeaderValue> = std::sync::LazyLock::new(
    || {
        let hash = |open: &str, close: &str| {
            use base64::Engine as _;
            use sha2::Digest as _;
            let inline = DASHBOARD
                .split_once(open)
                .and_then(|(_, rest)| rest.split_once(close))
                .map_or("", |(inline, _)| inline);
            let digest = sha2::Sha256::digest(inline.as_bytes());
            base64::engine::general_purpose::STANDARD.encode(digest)
        };
        let policy = format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            hash("<script>", "</script>"),
            hash("<style>", "</style>"),
        );
        axum::http::HeaderValue::try_from(policy)
            .unwrap_or(axum::http::HeaderValue::from_static("default-src 'none'"))
    },
);

pub(crate) async fn dashboard() -> impl axum::response::IntoResponse {
    use axum::http::{HeaderName, HeaderValue, header};
    (
        [
            (header::CONTENT_SECURITY_POLICY, DASHBOARD_CSP.clone()),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
            (
                HeaderName::from_static("x-content-type-options"),
                HeaderValue::from_static("nosniff"),
            ),
        ],
        axum::response::Html(DASHBOARD),
    )
}

/// Whether a request to `/status` or `/metrics` sees who the clients are,
/// what they spend and where the nodes are: with `[status] public`, or
/// with the admin token (`Authorization: Bearer <admin token>`). Node
/// health and use are public either way.
pub(crate) fn sees_private(live: &crate::snapshot::Live, headers: &axum::http::HeaderMap) -> bool {
    if live.config.status_public {
        return true;
    }
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .map(<[u8]>::trim_ascii);
    match (&live.config.admin.token, presented) {
        (Some(token), Some(presented)) => token.matches(presented),
        _ => false,
    }
}

pub(crate) async fn handle(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
) -> Json<Value> {
    let live = state.live();
    let private = sees_private(&live, &headers);
    let now = Instant::now();
    let mut nodes: Vec<Value> = live
        .node_ids()
        .map(|id| node_status(live.node(id), live.tier(id), now))
        .collect();
    if !private {
        for node in &mut nodes {
            if let Some(node) = node.as_object_mut() {
                node.remove("url");
            }
        }
    }
    // With [cluster]: the node's use summed over every replica.
    if let Some(shared) = &state.admission.shared {
        let names: Vec<&str> = live.nodes().map(|n| &*n.name).collect();
        if let Some(used) = shared.peek(&names).await {
            for (node, used) in nodes.iter_mut().zip(used) {
                node["shared"] = json!({
                    "requests": used.requests,
                    "tokens": used.tokens,
                    "bytes": used.bytes,
                    "in_flight": used.in_flight,
                });
            }
        }
    }
    let retired: Vec<Value> = state
        .retired()
        .iter()
        .map(|r| {
            let u = r.limiter.snapshot(now);
            json!({"name": &*r.name, "in_flight": u.in_flight, "requests_in_window": u.requests})
        })
        .collect();
    let reload = state.last_reload().map(|r| {
        json!({
            "attempt": r.attempt,
            "trigger": r.trigger,
            "ok": r.result.is_ok(),
            "summary": r.result.as_ref().ok(),
            "error": r.result.as_ref().err(),
            "seconds_ago": r.at.elapsed().map_or(0, |d| d.as_secs()),
        })
    });
    Json(json!({
        "nodes": nodes,
        "retired_nodes": retired,
        "queue": {
            "depth": state.admission.depth(),
            "budget_waiting": state.admission.budget_waiting(),
            "held_bytes": state.admission.held_bytes.load(std::sync::atomic::Ordering::Relaxed),
            "max_bytes": live.config.queue.max_bytes,
            "max_depth": live.config.queue.max_depth,
            "max_wait_ms": live.config.queue.max_wait.as_millis() as u64,
            "queued_total": state.admission.queued_total(),
            "refused_total": state.admission.refused_total(),
        },
        "config": {
            "generation": live.generation,
            "watching": state.watching.load(std::sync::atomic::Ordering::Acquire),
            "last_reload": reload,
        },
        "cluster": state.admission.shared.as_ref().map(|c| c.describe()),
        "budgets": if private { Value::from(budgets(&state).await) } else { Value::Null },
        "view": if private { "full" } else { "public: send the admin token for clients, budgets and node URLs" },
    }))
}

/// Each client with a budget: its spend in the current period as this
/// replica counts it (with `[cluster]`, the cluster's as last answered).
/// An account not read yet is read from the store first (once); one that
/// cannot be read shows what this replica counted.
async fn budgets(state: &AppState) -> Vec<Value> {
    let now = unix_now();
    let mut shown = Vec::new();
    for view in state.clients.budgets() {
        let period = view.budget.period;
        let read = view
            .account
            .ready(period, now, |from| {
                state.clients.stored_spend(&view.id, from)
            })
            .await;
        if let Err(err) = read {
            tracing::warn!(error = %err, client = %view.id, "cannot read a client's spend for /status");
        }
        shown.push(view);
    }
    shown
        .into_iter()
        .map(|view| {
            let (budget, spend) = (view.budget, view.account.spend(view.budget.period, now));
            json!({
                "client": &*view.id,
                "name": &*view.name,
                "period": budget.period.as_str(),
                "budget_usd": budget.limit.usd(),
                "spent_usd": spend.spent.usd(),
                "in_flight_usd": spend.held.usd(),
                "renews": budget.period.end(spend.period_start).map(rfc3339),
            })
        })
        .collect()
}

pub(crate) fn node_status(node: &Node, tier: u32, now: Instant) -> Value {
    let u = node.limiter.snapshot(now);
    let h = node.health.snapshot(now);
    let settled = node.metrics.tokens();
    let limit = |quota: Option<std::num::NonZeroU64>, used: u64| json!({"limit": quota.map(u64::from), "used": used});
    let lowered =
        |quota: Option<std::num::NonZeroU64>, upstream: Option<std::num::NonZeroU64>, used: u64| {
            let mut shown = limit(quota, used);
            shown["upstream_limit"] = json!(upstream.map(u64::from));
            shown
        };
    let remaining = |r: Option<Remaining>| {
        r.map(
            |r| json!({"left": r.available(now), "limit": r.limit, "reset_in_ms": ms(r.full_at.saturating_duration_since(now))}),
        )
    };
    json!({
        "name": &*node.name,
        "url": &*node.endpoint.url,
        "models": node.models,
        "tier": tier,
        "healthy": node.health.in_rotation(),
        "health": {
            "state": h.condition.name(),
            "reason": h.condition.reason(),
            "probe_failures_in_a_row": h.probe_failures,
            "request_failures_in_a_row": h.traffic_failures,
            "last_probe": h.last_probe.map(|(ago, result)| json!({
                "ms_ago": ms(ago),
                "ok": result.is_ok(),
                "error": result.err(),
            })),
            "next_probe_in_ms": h.next_probe_in.map(ms),
            // The models it is out of rotation for, and why; `back_in_ms`
            // is 0 while it is on trial for one.
            "out_for_models": node.health.models_out(now).iter().map(|out| json!({
                "model": out.model,
                "reason": out.reason,
                "back_in_ms": ms(out.back_in),
            })).collect::<Vec<_>>(),
        },
        "in_flight": u.in_flight,
        "reserved_tokens": u.pending_tokens,
        "upstream_errors": node.metrics.errors().collect::<std::collections::BTreeMap<_, _>>(),
        "retries": node.metrics.retries(),
        "ejections": node.metrics.ejections().filter(|(_, _, n)| *n > 0).map(|(scope, reason, n)| json!({"scope": scope, "reason": reason, "count": n})).collect::<Vec<_>>(),
        "tokens_settled": {"prompt": settled.0, "completion": settled.1},
        "cooldown_remaining_ms": u.cooldown.map(|(d, _)| ms(d)),
        "cooldown_reason": u.cooldown.map(|(_, reason)| reason.as_str()),
        "upstream_reported": {
            "remaining_requests": remaining(u.reported.requests),
            "remaining_tokens": remaining(u.reported.tokens),
        },
        "limits": {
            "rpm": lowered(u.quota.rpm, u.upstream_limits.0, u.requests),
            "tpm": lowered(u.quota.tpm, u.upstream_limits.1, u.tokens),
            "bpm": limit(u.quota.bpm, u.bytes),
            "max_concurrency": limit(u.quota.max_concurrency, u.in_flight),
        },
        "short_window": u.short.map(|s| {
            let shown = |(limit, used): (Option<u64>, u64)| json!({"limit": limit, "used": used});
            json!({
                "seconds": s.span.as_secs_f64(),
                "rpm": shown(s.requests),
                "tpm": shown(s.tokens),
                "bpm": shown(s.bytes),
            })
        }),
    })
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}
