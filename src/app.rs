//! The router: every route the gateway serves, and the few layers it uses.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde_json::json;
use tokio::time::Instant;

use crate::auth;
use crate::error::GatewayError;
use crate::outcome;
use crate::proxy;
use crate::state::AppState;
use crate::status;

/// Builds the gateway's router over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        // Operations: no key needed, no secret revealed.
        .route("/healthz", get(|| async { "ok" }))
        .route("/status", get(status::handle))
        .route("/metrics", get(status::scrape::handle))
        .route("/dashboard", get(status::dashboard))
        // Answered by the gateway from its config, behind the client key.
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        // Everything else under /v1 goes upstream; so does what Azure-style
        // clients send (`/openai/deployments/{name}/...`, `/openai/v1/...`).
        .route("/v1/{*rest}", any(proxy::handle))
        .route("/openai/{*rest}", any(proxy::handle))
        .fallback(unknown_url)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// `/v1/models` and `/v1/models/{id}` are counted and logged like every
/// request (under node `""`).
async fn list_models(State(state): State<Arc<AppState>>, uri: Uri, headers: HeaderMap) -> Response {
    let received = Instant::now();
    let live = state.live();
    if let Err(err) = auth::identify(&live, &state.clients, &headers).await {
        outcome::refused(&state, uri.path(), &err, None, received);
        return err.into_response();
    }
    outcome::answered_itself(&state, uri.path(), None, received);
    json_response(live.models_list.clone())
}

async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let received = Instant::now();
    let live = state.live();
    if let Err(err) = auth::identify(&live, &state.clients, &headers).await {
        outcome::refused(&state, uri.path(), &err, Some(&id), received);
        return err.into_response();
    }
    if let Err(err) = crate::request::check_model_name(&id) {
        outcome::refused(&state, uri.path(), &err, None, received);
        return err.into_response();
    }
    if !live.lists_model(&id) {
        let err = GatewayError::ModelNotFound(id);
        outcome::refused(&state, uri.path(), &err, None, received);
        return err.into_response();
    }
    outcome::answered_itself(&state, uri.path(), Some(&id), received);
    let body = json!({"id": id, "object": "model", "created": 0, "owned_by": "balancer"});
    json_response(body.to_string().into())
}

fn json_response(body: bytes::Bytes) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// A path the gateway does not serve: counted and logged like any answer.
async fn unknown_url(State(state): State<Arc<AppState>>, uri: Uri) -> Response {
    let received = Instant::now();
    let err = GatewayError::UnknownUrl(uri.path().to_owned());
    outcome::refused(&state, uri.path(), &err, None, received);
    err.into_response()
}

async fn method_not_allowed(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
) -> Response {
    let received = Instant::now();
    let err = GatewayError::MethodNotAllowed(method.to_string());
    outcome::refused(&state, uri.path(), &err, None, received);
    err.into_response()
}
