//! The gateway's one error type and its single mapping to HTTP.
//!
//! Every error the gateway itself produces leaves through
//! [`GatewayError::into_response`] as the OpenAI error shape
//! `{"error":{"message","type","code"}}`, with the status chosen by one
//! exhaustive `match`. Messages name the field or limit at fault and never
//! carry a key. `IntoResponse` has no side effects; the proxy logs.

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::limits::Limit;

/// When a refused client should come back, as `Retry-After` sends it:
/// whole seconds, rounded up, never 0 (a client must not retry at once).
/// The message and the header of one answer show the same number.
///
/// How long to ask for is the refusal policy's choice
/// ([`crate::admission`]); this type only keeps the message and the header
/// in agreement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(u64);

impl RetryAfter {
    /// A wait of `wait`, in whole seconds rounded up, at least 1.
    pub(crate) fn after(wait: Duration) -> Self {
        let secs = wait
            .as_secs()
            .saturating_add(u64::from(wait.subsec_nanos() > 0));
        Self(secs.max(1))
    }

    pub fn seconds(self) -> u64 {
        self.0
    }

    /// The same wait in milliseconds (at least 1 000: it is rounded up to
    /// the second like the header).
    pub fn millis(self) -> u64 {
        self.0.saturating_mul(1000)
    }
}

impl std::fmt::Display for RetryAfter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} s", self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("The request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("You must provide a model parameter.")]
    MissingModel,
    #[error("The model name is not usable: {0}.")]
    InvalidModel(String),
    #[error(
        "The request path may not contain '.' or '..' segments (also percent-encoded), an encoded '/' or '\\', an encoded control character (such as %00), or empty segments."
    )]
    InvalidPath,
    #[error(
        "This request needs {wanted} {unit} but no node that serves it allows more than {largest} ({limit} limit); shorten the input or lower max_tokens."
    )]
    RequestTooLarge {
        limit: &'static str,
        unit: &'static str,
        wanted: u64,
        largest: u64,
    },
    #[error("Incorrect or missing API key. Send the gateway key as 'Authorization: Bearer <key>'.")]
    InvalidApiKey,
    #[error("The model '{0}' does not exist or no node serves it.")]
    ModelNotFound(String),
    #[error("Your gateway key may not use the model '{0}'.")]
    ModelNotAllowed(String),
    #[error("You are over your own rate limit on this gateway. Retry after {retry_after}.")]
    ClientRateLimited { retry_after: RetryAfter },
    #[error(
        "This request alone exceeds your own {limit} limit on this gateway; shorten the input or lower max_tokens."
    )]
    ClientLimitTooSmall { limit: &'static str },
    #[error("Unknown request URL: {0}.")]
    UnknownUrl(String),
    #[error("Method {0} is not allowed on this path.")]
    MethodNotAllowed(String),
    #[error("The request body is larger than the {limit} bytes this gateway accepts.")]
    BodyTooLarge { limit: usize },
    #[error("The request body could not be read: {0}")]
    BodyUnreadable(String),
    /// The body stalled for `server.body_read_timeout`, or was still
    /// arriving at `server.request_timeout`.
    #[error(
        "The request body arrived too slowly (nothing for {stalled_s} s, or not whole within the request timeout); the connection is closed."
    )]
    BodyTimeout { stalled_s: u64 },
    /// The path's collection is one the gateway cannot keep apart per
    /// client, on a gateway whose clients share nodes' keys.
    #[error(
        "{0} are not served through this gateway: the upstream keeps them per key, and the gateway's clients share keys."
    )]
    EndpointNotServed(&'static str),
    /// A model-less request for a key limited to some models or with a
    /// budget, where the model it would run cannot be known.
    #[error(
        "{0} run a model the request does not name, and your key is limited to some models or has a budget: name the model, or use another key."
    )]
    ModelRequired(&'static str),
    /// A request that would hand the client an upstream credential, or
    /// work the gateway cannot hold against the client's limits.
    #[error("{0}")]
    NotAllowed(&'static str),
    #[error("Every node that serves this request is at its rate limit. Retry after {retry_after}.")]
    Saturated { retry_after: RetryAfter },
    #[error(
        "No node that serves this request is in rotation (each is unhealthy, ejected after failures, or has its key refused; see /status). Retry after {retry_after}."
    )]
    NoHealthyNode { retry_after: RetryAfter },
    #[error("No upstream could be reached (last tried: node '{node}').")]
    UpstreamUnavailable { node: String },
    #[error("The upstream did not answer in time (last tried: node '{node}').")]
    UpstreamTimeout { node: String },
    #[error("The gateway is shutting down.")]
    ShuttingDown,
    #[error("The gateway's store (clients and object records) cannot be reached; retry shortly.")]
    StoreUnavailable,
    #[error(
        "The limits shared with the other gateway replicas (Redis) cannot be reached. Retry after {retry_after}."
    )]
    ClusterUnavailable { retry_after: RetryAfter },
    #[error("Incorrect or missing admin token. Send it as 'Authorization: Bearer <admin token>'.")]
    AdminTokenInvalid,
    /// Bad admin input: the field at fault and what is wrong with it.
    #[error("{field}: {message}")]
    InvalidField { field: String, message: String },
    #[error("No client has the id '{0}'.")]
    ClientNotFound(String),
    #[error("name: a client named '{0}' already exists.")]
    ClientNameTaken(String),
    #[error("The client '{0}' is declared in the config file ([[clients]]); change it there.")]
    ClientDeclaredInConfig(String),
    #[error("The request names an object id that is not usable: {0}.")]
    InvalidObjectId(String),
    #[error("No {kind} with id '{id}' found.")]
    ObjectNotFound { kind: &'static str, id: String },
    #[error(
        "The {kind} '{id}' is held by node '{node}', which is {why}; retry when it is back (see /status)."
    )]
    ObjectUnavailable {
        kind: &'static str,
        id: String,
        node: String,
        why: &'static str,
    },
    #[error(
        "The request names objects held by different upstream keys ('{first}' on node '{first_node}', '{second}' on node '{second_node}'); one request can only use objects of one key."
    )]
    ObjectsOnDifferentNodes {
        first: String,
        first_node: String,
        second: String,
        second_node: String,
    },
    #[error(
        "The model '{model}' is not served by node '{node}', which holds the {kind} '{id}' this request names."
    )]
    ModelNotOnObjectNode {
        model: String,
        node: String,
        kind: &'static str,
        id: String,
    },
    #[error("The multipart body could not be read: {0}.")]
    InvalidMultipart(String),
    #[error(
        "This request could cost up to ${worst_usd:.6} and your {period} budget has ${remaining_usd:.6} left; it renews at {renews}. Retry after {retry_after}."
    )]
    BudgetExceeded {
        period: &'static str,
        worst_usd: f64,
        remaining_usd: f64,
        /// RFC 3339, UTC: the end of the budget's period.
        renews: String,
        retry_after: RetryAfter,
    },
    #[error(
        "Requests of yours in flight hold the rest of your {period} budget until they end (this one could cost up to ${worst_usd:.6}). Retry after {retry_after}."
    )]
    BudgetHeld {
        period: &'static str,
        worst_usd: f64,
        retry_after: RetryAfter,
    },
    #[error(
        "Your total budget is spent: this request could cost up to ${worst_usd:.6} and ${remaining_usd:.6} is left. Ask the gateway's operator to raise it."
    )]
    BudgetExhausted { worst_usd: f64, remaining_usd: f64 },
    #[error(
        "The model '{0}' has no price on the node(s) that serve it, and your key has a budget: a request that cannot be priced is refused rather than let through uncounted. Ask the gateway's operator to add [prices.\"{0}\"]."
    )]
    ModelNotPriced(String),
    /// Work the upstream does later, billed by what it uses, which the
    /// gateway never sees: it cannot be held against a budget.
    #[error(
        "{0} spend tokens after the request has been answered, where the gateway cannot see what they cost, and your key has a budget: they are refused rather than let through uncounted. Use a key without a budget for them."
    )]
    NotAllowedWithBudget(&'static str),
}

impl GatewayError {
    pub fn request_too_large(limit: Limit, wanted: u64, largest: u64) -> Self {
        let unit = match limit {
            Limit::Rpm | Limit::MaxConcurrency => "requests",
            Limit::Tpm => "tokens",
            Limit::Bpm => "bytes",
        };
        GatewayError::RequestTooLarge {
            limit: limit.field(),
            unit,
            wanted,
            largest,
        }
    }

    /// Status, OpenAI error type and code: the one place they are decided.
    #[expect(
        clippy::too_many_lines,
        reason = "the error table: one arm per variant and no `_` arm, so a new variant forces a decision"
    )]
    fn classify(&self) -> (StatusCode, &'static str, &'static str) {
        use GatewayError as E;
        match self {
            E::InvalidJson(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_json",
            ),
            E::MissingModel => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "missing_model",
            ),
            E::InvalidModel(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_model",
            ),
            E::InvalidPath => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_path",
            ),
            E::RequestTooLarge { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "request_too_large",
            ),
            E::InvalidApiKey => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_api_key",
            ),
            E::ModelNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
            ),
            E::ModelNotAllowed(_) => (
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                "model_not_allowed",
            ),
            E::ClientRateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "client_rate_limit_exceeded",
            ),
            E::ClientLimitTooSmall { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "request_too_large",
            ),
            E::UnknownUrl(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "unknown_url",
            ),
            E::MethodNotAllowed(_) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method_not_allowed",
            ),
            E::BodyTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "body_too_large",
            ),
            E::BodyUnreadable(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "body_unreadable",
            ),
            E::BodyTimeout { .. } => (
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "body_timeout",
            ),
            E::EndpointNotServed(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "endpoint_not_served",
            ),
            E::ModelRequired(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "model_required",
            ),
            E::NotAllowed(_) => (
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                "not_allowed",
            ),
            E::Saturated { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
            E::NoHealthyNode { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "no_healthy_upstream",
            ),
            E::UpstreamUnavailable { .. } => {
                (StatusCode::BAD_GATEWAY, "api_error", "upstream_unavailable")
            }
            E::UpstreamTimeout { .. } => {
                (StatusCode::GATEWAY_TIMEOUT, "api_error", "upstream_timeout")
            }
            E::ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "shutting_down",
            ),
            E::StoreUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "store_unavailable",
            ),
            E::ClusterUnavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "cluster_unavailable",
            ),
            E::AdminTokenInvalid => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_admin_token",
            ),
            E::InvalidField { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_value",
            ),
            E::ClientNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "client_not_found",
            ),
            E::ClientNameTaken(_) => (StatusCode::CONFLICT, "invalid_request_error", "name_taken"),
            E::ClientDeclaredInConfig(_) => (
                StatusCode::CONFLICT,
                "invalid_request_error",
                "client_declared_in_config",
            ),
            E::InvalidObjectId(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_object_id",
            ),
            E::ObjectNotFound { .. } => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "object_not_found",
            ),
            E::ObjectUnavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "object_unavailable",
            ),
            E::ObjectsOnDifferentNodes { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "objects_on_different_nodes",
            ),
            E::ModelNotOnObjectNode { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "model_not_on_object_node",
            ),
            E::InvalidMultipart(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_multipart",
            ),
            E::BudgetExceeded { .. } | E::BudgetHeld { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                "budget_exceeded",
            ),
            E::BudgetExhausted { .. } => (
                StatusCode::FORBIDDEN,
                "insufficient_quota",
                "budget_exhausted",
            ),
            E::ModelNotPriced(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "model_not_priced",
            ),
            E::NotAllowedWithBudget(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "not_allowed_with_budget",
            ),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.classify().0
    }

    /// The body's `code`, for logs.
    pub fn code(&self) -> &'static str {
        self.classify().2
    }

    /// When to come back, for the errors that say so.
    pub fn retry_after(&self) -> Option<RetryAfter> {
        match self {
            GatewayError::Saturated { retry_after }
            | GatewayError::NoHealthyNode { retry_after }
            | GatewayError::ClientRateLimited { retry_after }
            | GatewayError::ClusterUnavailable { retry_after }
            | GatewayError::BudgetExceeded { retry_after, .. }
            | GatewayError::BudgetHeld { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The request field at fault, for the body's `param`.
    fn param(&self) -> Option<&str> {
        match self {
            GatewayError::InvalidField { field, .. } => Some(field),
            GatewayError::ClientNameTaken(_) => Some("name"),
            GatewayError::MissingModel
            | GatewayError::ModelRequired(_)
            | GatewayError::InvalidModel(_)
            | GatewayError::ModelNotAllowed(_)
            | GatewayError::ModelNotPriced(_) => Some("model"),
            _ => None,
        }
    }
}

/// The `code` and message of an answer [`GatewayError::into_response`]
/// made, in its extensions: what [`crate::outcome::record_own`] records.
#[derive(Debug, Clone)]
pub(crate) struct ErrorCode {
    pub(crate) code: &'static str,
    pub(crate) message: Box<str>,
}

/// The OpenAI error body.
pub fn error_body(message: &str, kind: &str, code: &str, param: Option<&str>) -> String {
    json!({ "error": { "message": message, "type": kind, "code": code, "param": param } })
        .to_string()
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let (status, kind, code) = self.classify();
        let message = self.to_string();
        let body = error_body(&message, kind, code, self.param());
        let mut response = (status, body).into_response();
        response.extensions_mut().insert(ErrorCode {
            code,
            message: message.into(),
        });
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if matches!(self, GatewayError::BodyTimeout { .. }) {
            // The rest of a body that stalled is not read: the connection
            // cannot carry another request.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(retry_after) = self.retry_after() {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after.seconds()),
            );
            // The same wait, as Azure's clients and the OpenAI SDKs read it.
            headers.insert(
                HeaderName::from_static("retry-after-ms"),
                HeaderValue::from(retry_after.millis()),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(err: GatewayError) -> (StatusCode, Option<String>, serde_json::Value) {
        let response = err.into_response();
        let status = response.status();
        let retry = response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, retry, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn saturation_is_429_with_a_rounded_up_retry_after() {
        let (status, retry, body) = body_of(GatewayError::Saturated {
            retry_after: RetryAfter::after(Duration::from_millis(2100)),
        })
        .await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(retry.as_deref(), Some("3"));
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.ends_with("Retry after 3 s."), "{message}");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert_eq!(body["error"]["type"], "rate_limit_error");
        let response = GatewayError::Saturated {
            retry_after: RetryAfter::after(Duration::from_millis(2100)),
        }
        .into_response();
        assert_eq!(response.headers()["retry-after-ms"], "3000");
    }

    #[test]
    fn a_short_wait_is_one_second_in_the_message_and_the_header_alike() {
        let wait = RetryAfter::after(Duration::from_millis(400));
        assert_eq!(wait.seconds(), 1);
        assert_eq!(wait.to_string(), "1 s");
        assert_eq!(RetryAfter::after(Duration::ZERO).seconds(), 1);
        assert_eq!(RetryAfter::after(Duration::MAX).seconds(), u64::MAX);
    }

    #[tokio::test]
    async fn too_large_names_the_limit() {
        let (status, _, body) =
            body_of(GatewayError::request_too_large(Limit::Tpm, 5000, 4000)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "request_too_large");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("tpm") && message.contains("5000"),
            "{message}"
        );
    }
}
