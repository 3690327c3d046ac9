//! The request path's stored-object steps ([`crate::objects`]): lists
//! answered by the gateway, the routing of a request that names objects,
//! and the records an answer makes.

use std::sync::Arc;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{Inbound, Refused};
use crate::clients::Client;
use crate::error::GatewayError;
use crate::objects::named::{self, PathUse};
use crate::objects::route::{self, Routing};
use crate::objects::{Kind, answer, list};
use crate::snapshot::{Live, Node};
use crate::state::AppState;
use crate::upstream;

/// A JSON answer that makes objects known is read whole up to this size
/// before it is relayed; a larger one is relayed unread (and its objects
/// stay unknown to the gateway).
const MAX_HELD_ANSWER: usize = 16 << 20;

/// The caller's group: its client id, or `""` for the shared group.
pub(super) fn owner(client: Option<&Client>) -> Arc<str> {
    client.map_or_else(|| Arc::from(""), |c| Arc::clone(&c.id))
}

/// `GET /v1/{collection}` of a listable kind: the gateway's own answer.
pub(super) async fn list_answer(
    state: &AppState,
    live: &Live,
    kind: Kind,
    query: Option<&str>,
    client: Option<&Client>,
) -> Result<Response, Refused> {
    let query = list::ListQuery::parse(query)?;
    let page = list::page(
        &state.objects,
        live,
        &owner(client),
        kind,
        &query,
        live.config.upstream.first_byte_timeout,
    )
    .await?;
    Ok((StatusCode::OK, axum::Json(page)).into_response())
}

/// The routing of a read, inspected request: the objects its path and
/// body name, resolved for the caller.
pub(super) async fn routing(
    state: &AppState,
    live: &Live,
    method: &str,
    path_use: &PathUse<'_>,
    request: &Inbound<'_>,
) -> Result<Routing, GatewayError> {
    let named = if request.info.model_in_body == crate::request::ModelInBody::NotJson {
        Vec::new()
    } else {
        named::body_ids(&request.body)?
    };
    if named.is_empty() && matches!(path_use, PathUse::None) && request.info.store != Some(true) {
        return Ok(Routing::default());
    }
    let asked = route::Asked {
        method,
        operation: request.operation.path,
        path_use,
        named: &named,
        info: request.info,
    };
    let routing = route::resolve(&state.objects, live, asked, owner(request.client)).await?;
    if routing.creates.is_some() && !state.objects.writable().await {
        return Err(GatewayError::StoreUnavailable);
    }
    Ok(routing)
}

/// Records what a node's answer makes known (held until recorded, so the
/// client can name it next), and forgets what it deleted; gives back the
/// answer to relay, or the error to answer if it broke while held.
pub(super) async fn record_answer(
    state: &AppState,
    node: &Node,
    routing: &Routing,
    response: reqwest::Response,
    timeout: std::time::Duration,
) -> Result<reqwest::Response, GatewayError> {
    if response.status() == StatusCode::NOT_FOUND
        && let Some(id) = routing.under.as_ref().or(routing.deletes.as_ref())
    {
        // The node no longer has it: neither will the records.
        if let Err(err) = state.objects.forget(id).await {
            tracing::warn!(error = %err, "cannot forget a deleted object");
        }
        return Ok(response);
    }
    if !response.status().is_success() {
        return Ok(response);
    }
    if let Some(id) = &routing.deletes {
        if let Err(err) = state.objects.forget(id).await {
            tracing::warn!(error = %err, "cannot forget a deleted object");
        }
        return Ok(response);
    }
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    if !routing.reads_answer || !json {
        return Ok(response);
    }
    let (response, body) = upstream::answer::read_whole(response, MAX_HELD_ANSWER, timeout)
        .await
        .map_err(|failure| {
            tracing::warn!(node = %node.name, ?failure, "an answer broke while it was read for its objects");
            match failure {
                upstream::Failure::Timeout => GatewayError::UpstreamTimeout {
                    node: node.name.to_string(),
                },
                _ => GatewayError::UpstreamUnavailable {
                    node: node.name.to_string(),
                },
            }
        })?;
    for seen in answer::sightings(&body, routing.creates) {
        let record = state.objects.record_of(&seen, &node.name, &routing.owner());
        if let Err(err) = state.objects.keep(&seen.id, record).await {
            tracing::warn!(error = %err, kind = seen.kind.as_str(), "cannot record a stored object");
        }
    }
    Ok(response)
}
