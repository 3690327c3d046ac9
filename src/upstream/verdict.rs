//! What an attempt says about the node that answered it (or did not),
//! read in one place: [`judge`] turns an attempt's result into the
//! client's answer and a [`NodeVerdict`], which the proxy applies to the
//! node (its health, its limiter, its metrics).

use std::time::Duration;

use axum::http::StatusCode;

use super::{Failure, answer};
use crate::config::HealthSettings;
use crate::health::Verdict;
use crate::limits::{CooldownReason, RateLimitReport};
use crate::metrics::UpstreamError;

/// What one attempt says about its node.
#[derive(Debug)]
pub(crate) struct NodeVerdict {
    /// What passive health hears.
    pub health: Verdict,
    /// The answer is a 2xx: the node served the request.
    pub served: bool,
    /// The kind of error counted against the node, if it was one.
    pub error: Option<UpstreamError>,
    /// The answer's rate-limit headers (none without an answer).
    pub report: Option<RateLimitReport>,
    /// How full a provisioned deployment says it is (percent), from
    /// `azure-openai-deployment-utilization`.
    pub utilization: Option<f64>,
    /// How long the node asked to rest (capped at `health.max_rest`), and
    /// why: a busy minute, or a spent quota.
    pub rest: Option<(Duration, CooldownReason)>,
}

impl NodeVerdict {
    /// An attempt that got no answer.
    pub(crate) fn failed(failure: Failure) -> Self {
        let (health, error) = match failure {
            Failure::Connect => (
                Verdict::Unreachable("could not connect".to_owned()),
                UpstreamError::Connect,
            ),
            Failure::Timeout => (
                Verdict::Failed("no answer in time".to_owned()),
                UpstreamError::Timeout,
            ),
            Failure::Broken => (
                Verdict::Failed("connection broke".to_owned()),
                UpstreamError::Broken,
            ),
        };
        Self {
            health,
            served: false,
            error: Some(error),
            report: None,
            utilization: None,
            rest: None,
        }
    }
}

/// The client's answer from `sent` (a 429 read whole within `read_within`
/// and given back as it came), and what it says about the node.
pub(crate) async fn judge(
    sent: Result<reqwest::Response, Failure>,
    settings: &HealthSettings,
    read_within: Duration,
) -> (Result<reqwest::Response, Failure>, NodeVerdict) {
    let response = match sent {
        Ok(response) => response,
        Err(failure) => return (Err(failure), NodeVerdict::failed(failure)),
    };
    let status = response.status();
    let mut verdict = NodeVerdict {
        health: Verdict::of_status(status),
        served: status.is_success(),
        error: UpstreamError::of_status(status),
        report: Some(answer::rate_limit_report(response.headers())),
        utilization: answer::utilization(response.headers()),
        rest: None,
    };
    if status != StatusCode::TOO_MANY_REQUESTS {
        return (Ok(response), verdict);
    }
    // A 429 is read whole: a spent quota rests far longer than a busy minute.
    let (response, body) = match answer::read_error(response, read_within).await {
        Ok(read) => read,
        Err(failure) => return (Err(failure), NodeVerdict::failed(failure)),
    };
    let (rest, reason) = if answer::is_insufficient_quota(&body) {
        let asked = answer::explicit_rest(response.headers());
        let rest = asked.unwrap_or(settings.quota_exhausted_cooldown);
        (rest, CooldownReason::QuotaExhausted)
    } else {
        let rest = answer::cooldown_of(response.headers());
        (rest, CooldownReason::RateLimited)
    };
    verdict.rest = Some((rest.min(settings.max_rest), reason));
    (Ok(response), verdict)
}
