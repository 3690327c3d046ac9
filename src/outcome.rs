//! One door out for the answers the gateway gives itself: refusals of
//! the request path, `/v1/models`, unknown paths and methods, and every
//! answer of the admin API. Each is counted in the metrics (under node
//! `""`, and under the model only if the config labels it) and logged as
//! one access-log line, here and nowhere else. (A relayed answer is
//! recorded when its relay ends, by [`crate::relay`].)
//!
//! A [`GatewayError`] answer (its `IntoResponse`) carries its error code
//! ([`ErrorCode`]), so [`record_own`] can record an answer made anywhere
//! below it with the same fields as one refused by the proxy.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use tokio::time::Instant;

use crate::error::{ErrorCode, GatewayError};
use crate::metrics;
use crate::state::AppState;

/// The `tracing` target of the one line logged per request, so
/// `RUST_LOG` can set its level apart (`balancer::access=warn`).
pub(crate) const ACCESS_LOG: &str = "balancer::access";

/// Counts and logs a successful answer the gateway gave itself
/// (`/v1/models`), as [`refused`] does an error.
pub(crate) fn answered_itself(
    state: &AppState,
    path: &str,
    model: Option<&str>,
    received: Instant,
) {
    let label = model.filter(|m| state.live().labels_model(m)).unwrap_or("");
    let elapsed = metrics::elapsed(received);
    state
        .metrics
        .answered
        .route(label)
        .answered(StatusCode::OK, elapsed);
    let duration_ms = elapsed.as_millis() as u64;
    tracing::info!(target: ACCESS_LOG, path, node = "", model = model.unwrap_or(""), status = 200u16, duration_ms, "request");
}

/// Counts and logs an answer the gateway gave itself: under node `""`, and
/// under the model only if the config lists it (a made-up name is no label).
pub(crate) fn refused(
    state: &AppState,
    path: &str,
    error: &GatewayError,
    model: Option<&str>,
    received: Instant,
) {
    let label = model.filter(|m| state.live().labels_model(m)).unwrap_or("");
    let status = error.status();
    let elapsed = metrics::elapsed(received);
    state
        .metrics
        .answered
        .route(label)
        .answered(status, elapsed);
    let (code, model, duration_ms) = (
        error.code(),
        model.unwrap_or(""),
        elapsed.as_millis() as u64,
    );
    if status.is_server_error() {
        tracing::warn!(target: ACCESS_LOG, path, node = "", model, status = status.as_u16(), code, duration_ms, error = %error, "request");
    } else {
        tracing::info!(target: ACCESS_LOG, path, node = "", model, status = status.as_u16(), code, duration_ms, error = %error, "request");
    }
}

/// Records every answer of the routes below it: for a router whose
/// handlers do not record their own (the admin API). The gateway's own
/// router records in its handlers instead (the proxy's relayed answers
/// are recorded when their relay ends).
pub(crate) async fn record_own(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let received = Instant::now();
    let path: Box<str> = request.uri().path().into();
    let response = next.run(request).await;
    let status = response.status();
    let code = response.extensions().get::<ErrorCode>().map(|c| c.0);
    answered(&state, &path, status, code, received);
    response
}

/// Counts and logs an answer of `status` (and `code`, for an error) the
/// gateway gave itself, with no model.
fn answered(
    state: &AppState,
    path: &str,
    status: StatusCode,
    code: Option<&'static str>,
    received: Instant,
) {
    let elapsed = metrics::elapsed(received);
    state.metrics.answered.route("").answered(status, elapsed);
    let duration_ms = elapsed.as_millis() as u64;
    let code = code.unwrap_or("");
    tracing::info!(target: ACCESS_LOG, path, node = "", model = "", status = status.as_u16(), code, duration_ms, "request");
}
