//! Azure OpenAI's surface over the same answers: its paths, its
//! `api-version` rule, its errors.
//!
//! - `POST /openai/deployments/{deployment}/{chat/completions, completions,
//!   embeddings}?api-version=...`: the deployment must be one the mock
//!   serves (its models), the `api-version` present;
//! - `POST /openai/v1/{chat/completions, completions, embeddings,
//!   responses}` (the v1 surface: no `api-version` needed, the deployment
//!   named as the body's `model`), and `/openai/responses?api-version=`;
//! - `GET /openai/models?api-version=...` and `GET /openai/v1/models`.
//!
//! The key is read from `api-key` ([`crate::openai`] checks it); errors
//! have Azure's shape, `{"error": {"code": "...", "message": "..."}}`.
#![expect(
    clippy::result_large_err,
    reason = "an `Err` here is the response to send, built only when refusing"
)]

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};

use crate::Mock;
use crate::azure_errors::error;
use crate::openai::{chat_for, completions_for, embeddings_for, models, parse};
use crate::responses;

type Params = Query<HashMap<String, String>>;

pub(crate) fn routes() -> Router<Arc<Mock>> {
    Router::new()
        .route(
            "/openai/deployments/{deployment}/{*operation}",
            post(deployment),
        )
        .route("/openai/v1/{*operation}", post(v1))
        .route("/openai/responses", post(classic_responses))
        .route("/openai/models", get(classic_models))
        .route("/openai/v1/models", get(models))
}

fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "404", "Resource not found")
}

/// The classic paths need an `api-version`; without one, Azure answers 404.
fn api_version(params: &HashMap<String, String>) -> Result<(), Response> {
    match params.get("api-version") {
        Some(v) if !v.is_empty() => Ok(()),
        _ => Err(error(
            StatusCode::NOT_FOUND,
            "404",
            "Resource not found: the api-version query parameter is required",
        )),
    }
}

/// The deployment must be one the mock serves.
fn known(mock: &Mock, deployment: &str) -> Result<(), Response> {
    if mock.config.models.iter().any(|m| m == deployment) {
        return Ok(());
    }
    Err(error(
        StatusCode::NOT_FOUND,
        "DeploymentNotFound",
        "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again.",
    ))
}

async fn deployment(
    State(mock): State<Arc<Mock>>,
    Path((deployment, operation)): Path<(String, String)>,
    Query(params): Params,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refused) = api_version(&params).and_then(|()| known(&mock, &deployment)) {
        return refused;
    }
    let deployment = Some(deployment);
    match operation.as_str() {
        "chat/completions" => chat_for(mock, headers, body, deployment).await,
        "completions" => completions_for(mock, headers, body, deployment).await,
        "embeddings" => embeddings_for(mock, headers, body, deployment).await,
        _ => not_found(),
    }
}

/// The v1 surface: the body's `model` names the deployment.
async fn v1(
    State(mock): State<Arc<Mock>>,
    Path(operation): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let deployment = match parse(&body) {
        Ok(request) => request["model"].as_str().unwrap_or_default().to_owned(),
        Err(refused) => return refused,
    };
    if let Err(refused) = known(&mock, &deployment) {
        return refused;
    }
    let deployment = Some(deployment);
    match operation.as_str() {
        "chat/completions" => chat_for(mock, headers, body, deployment).await,
        "completions" => completions_for(mock, headers, body, deployment).await,
        "embeddings" => embeddings_for(mock, headers, body, deployment).await,
        "responses" => responses::create_for(mock, headers, body, deployment).await,
        _ => not_found(),
    }
}

async fn classic_responses(
    State(mock): State<Arc<Mock>>,
    Query(params): Params,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refused) = api_version(&params) {
        return refused;
    }
    responses::create_for(mock, headers, body, None).await
}

async fn classic_models(
    state: State<Arc<Mock>>,
    Query(params): Params,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = api_version(&params) {
        return refused;
    }
    models(state, headers).await
}
