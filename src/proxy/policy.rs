//! What a request may ask of the pool beyond its limits: the endpoints the
//! gateway serves at all, the model a request really runs, and the most a
//! budgeted request's answer may cost.
//!
//! Invariants:
//! - A collection the upstream keeps per key and the gateway does not
//!   keep apart per client (evals, videos, the organisation's own
//!   endpoints, ChatKit, checkpoint permissions) is refused: clients
//!   sharing a node's key would see each other's objects.
//! - A request that would hand the client an upstream credential
//!   (`realtime/client_secrets` and the beta session endpoints mint
//!   ephemeral keys, used with the provider directly, outside every limit)
//!   is refused unless `server.realtime_ephemeral_keys` allows it; then it
//!   is admitted as a request for the model its `session.model` names.
//! - For a client with a model list or a budget, a request that names no
//!   model is taken as its endpoint's default model (images), or refused
//!   where the model it runs cannot be known (batches, assistants' runs).
//! - For a client with a budget, the answer's length is bounded by what
//!   was held: a request without `max_completion_tokens`/`max_tokens`/
//!   `max_output_tokens` is sent with the completion the gateway reserved,
//!   and one that names them unreadably (`null`) is refused, so spend
//!   never passes the budget.

use axum::http::Method;
use bytes::Bytes;

use crate::clients::Client;
use crate::error::GatewayError;
use crate::request::{CompletionCap, CompletionDefaults, RequestInfo};

/// Collections (below `/v1`) the gateway does not serve, and what they
/// are called in the refusal.
const NOT_SERVED: [(&str, &str); 5] = [
    ("evals", "Evals"),
    ("videos", "Videos"),
    ("organization", "The organization's endpoints"),
    ("chatkit", "ChatKit sessions and threads"),
    (
        "fine_tuning/checkpoints",
        "Fine-tuning checkpoint permissions",
    ),
];

/// Endpoints that mint an ephemeral upstream key.
const CLIENT_SECRETS: [&str; 3] = [
    "/realtime/client_secrets",
    "/realtime/sessions",
    "/realtime/transcription_sessions",
];

/// Refuses paths the gateway does not serve (see the module's invariants).
pub(super) fn served(path: &str, client_secrets_allowed: bool) -> Result<(), GatewayError> {
    let below = path.trim_start_matches('/');
    for (collection, what) in NOT_SERVED {
        if let Some(rest) = below.strip_prefix(collection)
            && (rest.is_empty() || rest.starts_with('/'))
        {
            return Err(GatewayError::EndpointNotServed(what));
        }
    }
    if !client_secrets_allowed && CLIENT_SECRETS.contains(&path) {
        return Err(GatewayError::NotAllowed(
            "Realtime client secrets are not handed out by this gateway: an ephemeral key is used with the provider directly, outside the gateway's limits and budgets. Connect through the gateway instead, or ask its operator to set server.realtime_ephemeral_keys = true.",
        ));
    }
    Ok(())
}

/// The model a model-less POST to `path` runs: its endpoint's default, or
/// `Err` naming what runs a model the request cannot show.
fn implied_model(path: &str) -> Option<Result<&'static str, &'static str>> {
    match path {
        // The Images API's default model.
        "/images/generations" | "/images/edits" | "/images/variations" => Some(Ok("dall-e-2")),
        "/batches" => Some(Err("Batches (their input file names the models)")),
        _ if path.starts_with("/threads/") && path.ends_with("/runs") => {
            Some(Err("Assistants' runs that name no model"))
        }
        _ => None,
    }
}

/// For a client with a model list or a budget: a model-less request is
/// taken as its endpoint's default model, or refused where the model it
/// runs is not known.
pub(super) fn imply_model(
    method: &Method,
    path: &str,
    client: &Client,
    info: &mut RequestInfo,
) -> Result<(), GatewayError> {
    let restricted = client.models.is_some() || client.budget.is_some();
    if !restricted || info.model.is_some() || *method != Method::POST {
        return Ok(());
    }
    match implied_model(path) {
        None => Ok(()),
        Some(Ok(model)) => {
            info.model = Some(model.into());
            Ok(())
        }
        Some(Err(what)) => Err(GatewayError::ModelRequired(what)),
    }
}

/// The field that bounds an answer's length on `path`.
fn cap_field(path: &str) -> Option<&'static str> {
    match path {
        "/chat/completions" => Some("max_completion_tokens"),
        "/completions" => Some("max_tokens"),
        "/responses" => Some("max_output_tokens"),
        _ => None,
    }
}

/// For a client with a budget: the body sent bounds the answer by the
/// completion held for it. Returns the body to send.
pub(super) fn bound_completion(
    path: &str,
    client: &Client,
    info: &mut RequestInfo,
    body: Bytes,
    defaults: &CompletionDefaults,
) -> Result<Bytes, GatewayError> {
    let (Some(_), Some(field), Some(model)) =
        (client.budget, cap_field(path), info.model.as_deref())
    else {
        return Ok(body);
    };
    if info.background {
        return Ok(body);
    }
    match info.completion_cap {
        CompletionCap::Given => Ok(body),
        CompletionCap::Unreadable => Err(GatewayError::InvalidField {
            field: field.to_owned(),
            message: "must be a whole number for a key with a budget (the answer's length is held against it)".to_owned(),
        }),
        CompletionCap::Absent => {
            let held = defaults.for_model(model).max(1);
            let bounded = crate::upstream::dialect::with_field(&body, field, &held.to_string());
            info.demand.bytes = bounded.len() as u64;
            // Bounded now: no node's own default applies.
            info.demand.open_ended = None;
            info.completion_cap = CompletionCap::Given;
            Ok(bounded)
        }
    }
}

/// What a request starts that the upstream bills later, by what it uses
/// (a background response, a batch, a fine-tuning job, an assistant's
/// run): the gateway never sees that usage.
pub(super) fn spends_later(
    method: &Method,
    path: &str,
    info: &RequestInfo,
) -> Option<&'static str> {
    if *method != Method::POST {
        return None;
    }
    if info.background {
        Some("Background responses")
    } else if path == "/batches" {
        Some("Batches")
    } else if path == "/fine_tuning/jobs" {
        Some("Fine-tuning jobs")
    } else if path.starts_with("/threads/")
        && (path.ends_with("/runs") || path.ends_with("/submit_tool_outputs"))
    {
        Some("Assistants' runs")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collections_kept_per_key_are_not_served() {
        for path in [
            "/evals",
            "/evals/eval_1/runs",
            "/videos",
            "/videos/video_1/content",
            "/organization/usage/completions",
            "/chatkit/sessions",
            "/fine_tuning/checkpoints/ft:x/permissions",
        ] {
            let err = served(path, false).unwrap_err();
            assert_eq!(err.code(), "endpoint_not_served", "{path}");
        }
        for path in ["/evaluations", "/videosx", "/files", "/fine_tuning/jobs"] {
            assert!(served(path, false).is_ok(), "{path}");
        }
    }

    #[test]
    fn client_secrets_are_refused_unless_allowed() {
        for path in CLIENT_SECRETS {
            assert_eq!(served(path, false).unwrap_err().code(), "not_allowed");
            assert!(served(path, true).is_ok());
        }
    }
}
