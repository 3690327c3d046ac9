//! The router: every route the gateway serves, and the few layers it uses.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde_json::json;

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
        // Every answer but the relayed ones and the operations paths is
        // counted and logged here.
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            outcome::record_own,
        ))
        .with_state(state)
}

/// `/v1/models` and `/v1/models/{id}` are the gateway's own answers,
/// behind the client key (counted and logged by [`outcome::record_own`]).
async fn list_models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let live = state.live();
    if let Err(err) = auth::identify(&live, &state.clients, &headers).await {
        return err.into_response();
    }
    json_response(live.models_list.clone())
}

async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let live = state.live();
    if let Err(err) = auth::identify(&live, &state.clients, &headers).await {
        return with_model(err.into_response(), id);
    }
    if let Err(err) = crate::request::check_model_name(&id) {
        return err.into_response();
    }
    if !live.lists_model(&id) {
        // A made-up name is neither a label nor logged as one.
        return GatewayError::ModelNotFound(id).into_response();
    }
    let body = json!({"id": id, "object": "model", "created": 0, "owned_by": "balancer"});
    with_model(json_response(body.to_string().into()), id)
}

/// `response`, noting for its record the model it was about.
fn with_model(mut response: Response, model: String) -> Response {
    response
        .extensions_mut()
        .insert(outcome::AskedModel(model.into()));
    response
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

/// A path the gateway does not serve.
async fn unknown_url(uri: Uri) -> Response {
    GatewayError::UnknownUrl(uri.path().to_owned()).into_response()
}

async fn method_not_allowed(method: Method) -> Response {
    GatewayError::MethodNotAllowed(method.to_string()).into_response()
}
