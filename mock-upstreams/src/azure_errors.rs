//! Azure OpenAI's error answers, `{"error": {"code": "...", "message":
//! "..."}}`: a leaf, used by the Azure surface ([`crate::azure`]) and by
//! the shared checks that refuse a request in either dialect
//! ([`crate::openai`]).

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

pub(crate) fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

pub(crate) fn unauthorized() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "401",
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.",
    )
}

/// Azure's 429: the wait in whole seconds in the message and `Retry-After`,
/// to the millisecond in `retry-after-ms` (the caller adds both headers).
pub(crate) fn rate_limited(limit: &str, retry_after: Duration) -> Response {
    let what = if limit == "tokens" {
        "token rate limit"
    } else {
        "call rate limit"
    };
    error(
        StatusCode::TOO_MANY_REQUESTS,
        "429",
        &format!(
            "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded {what} of your current OpenAI S0 pricing tier. Please retry after {} seconds.",
            retry_after.as_secs_f64().ceil().max(1.0)
        ),
    )
}
