//! Reading a node's answer: its rate-limit report, the rest it asks for,
//! whether its quota is spent, and small answers read whole.
//!
//! Nothing a node sends makes a panic or an endless rest: every wait read
//! from a header is capped at [`MAX_HEADER_WAIT`].

use std::time::Duration;

use axum::http::{HeaderMap, header};
use bytes::Bytes;

use super::Failure;
use crate::limits::RateLimitReport;

/// A wait as OpenAI writes a reset: `20ms`, `1s`, `1.5s`, `6m0s`, `1h2m3s`.
pub(crate) fn reset_text(wait: Duration) -> String {
    let ms = wait.as_millis() as u64;
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (hours, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    let seconds = format!("{:.3}", rest as f64 / 1000.0);
    let seconds = seconds.trim_end_matches('0').trim_end_matches('.');
    match (hours, minutes) {
        (0, 0) => format!("{seconds}s"),
        (0, m) => format!("{m}m{seconds}s"),
        (h, m) => format!("{h}h{m}m{seconds}s"),
    }
}

/// The `x-ratelimit-remaining-*` / `-reset-*` headers of an answer.
pub(crate) fn rate_limit_report(headers: &HeaderMap) -> RateLimitReport {
    let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<u64>().ok();
    let reset = |name: &str| parse_reset(headers.get(name)?.to_str().ok()?);
    RateLimitReport {
        limit_requests: number("x-ratelimit-limit-requests"),
        limit_tokens: number("x-ratelimit-limit-tokens"),
        remaining_requests: number("x-ratelimit-remaining-requests"),
        remaining_tokens: number("x-ratelimit-remaining-tokens"),
        reset_requests: reset("x-ratelimit-reset-requests"),
        reset_tokens: reset("x-ratelimit-reset-tokens"),
    }
}

/// A provisioned deployment's `azure-openai-deployment-utilization`
/// (`"97.5%"`, or a bare number), in percent; `None` when absent or not
/// a finite number.
pub(crate) fn utilization(headers: &HeaderMap) -> Option<f64> {
    let text = headers
        .get("azure-openai-deployment-utilization")?
        .to_str()
        .ok()?;
    let percent: f64 = text.trim().trim_end_matches('%').trim().parse().ok()?;
    percent.is_finite().then_some(percent)
}

/// Error answers read whole to tell failures apart are this small; a larger
/// one is relayed unread.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Reads a small error answer whole (within `timeout`) so its `error.code`
/// can be read, and gives back an equivalent response to relay.
pub(crate) async fn read_error(
    response: reqwest::Response,
    timeout: Duration,
) -> Result<(reqwest::Response, Bytes), Failure> {
    read_whole(response, MAX_ERROR_BODY, timeout).await
}

/// Reads an answer whole (at most `max` bytes, within `timeout`) and gives
/// back an equivalent response to relay, with its body. One that declares
/// more than `max` is given back unread (and the bytes empty); one that
/// sends more than it declared is broken.
pub(crate) async fn read_whole(
    response: reqwest::Response,
    max: usize,
    timeout: Duration,
) -> Result<(reqwest::Response, Bytes), Failure> {
    if response
        .content_length()
        .is_some_and(|len| len > max as u64)
    {
        return Ok((response, Bytes::new()));
    }
    let status = response.status();
    let version = response.version();
    let headers = response.headers().clone();
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    let read = async {
        use futures_util::StreamExt;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| Failure::Broken)?;
            if body.len() + chunk.len() > max {
                return Err(Failure::Broken);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_elapsed) => return Err(Failure::Timeout),
        Ok(result) => result?,
    }
    let body = Bytes::from(body);
    let mut rebuilt = axum::http::Response::new(body.clone());
    *rebuilt.status_mut() = status;
    *rebuilt.version_mut() = version;
    *rebuilt.headers_mut() = headers;
    Ok((reqwest::Response::from(rebuilt), body))
}

/// An answer's body, if it is at most `max` bytes and arrives within
/// `timeout`.
pub(crate) async fn read_bounded(
    response: reqwest::Response,
    max: usize,
    timeout: Duration,
) -> Option<Bytes> {
    if response
        .content_length()
        .is_some_and(|len| len > max as u64)
    {
        return None;
    }
    read_whole(response, max, timeout)
        .await
        .ok()
        .map(|(_, body)| body)
}

/// Whether an error body says the key's quota is spent (OpenAI's
/// `insufficient_quota`, as `code` or `type`), not just a per-minute limit.
pub(crate) fn is_insufficient_quota(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Envelope {
        error: Option<Inner>,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        code: Option<serde_json::Value>,
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    let Ok(Envelope { error: Some(inner) }) = serde_json::from_slice::<Envelope>(body) else {
        return false;
    };
    inner.kind.as_deref() == Some("insufficient_quota")
        || inner.code.as_ref().and_then(|c| c.as_str()) == Some("insufficient_quota")
}

/// The longest wait an upstream header is believed for: a day. A reset or
/// `Retry-After` beyond it is taken as a day (a spent billing quota); one
/// that is negative, not a number or not finite is ignored.
pub(crate) const MAX_HEADER_WAIT: Duration = Duration::from_secs(86_400);

/// `seconds` as a wait, if it is one: finite, not negative, at most
/// [`MAX_HEADER_WAIT`].
fn wait_of(seconds: f64) -> Option<Duration> {
    if !seconds.is_finite() || seconds < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(seconds).map_or(MAX_HEADER_WAIT, |d| d.min(MAX_HEADER_WAIT)))
}

/// How long a node that answered 429 should rest: `retry-after-ms` (Azure's,
/// the most precise), else `Retry-After` (seconds or an HTTP date), else
/// the later of `x-ratelimit-reset-requests` / `-tokens` (`"1s"`, `"6m0s"`,
/// `"20ms"`), else one second.
pub(crate) fn cooldown_of(headers: &HeaderMap) -> Duration {
    explicit_rest(headers)
        .unwrap_or(Duration::from_secs(1))
        .max(Duration::from_millis(100))
}

/// The rest an answer asks for itself: `retry-after-ms`, else
/// `Retry-After`, else the later reset.
pub(crate) fn explicit_rest(headers: &HeaderMap) -> Option<Duration> {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let retry_after_ms = text("retry-after-ms")
        .and_then(|v| v.parse::<f64>().ok())
        .and_then(|ms| wait_of(ms / 1000.0));
    let retry_after = text(header::RETRY_AFTER.as_str()).and_then(|v| match v.parse::<f64>() {
        Ok(seconds) => wait_of(seconds),
        Err(_) => until_http_date(v),
    });
    let reset = ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
        .iter()
        .filter_map(|name| headers.get(*name)?.to_str().ok())
        .filter_map(parse_reset)
        .max();
    retry_after_ms.or(retry_after).or(reset)
}

/// The wait until an HTTP date (`Wed, 21 Oct 2026 07:28:00 GMT`), none if
/// it has passed; `None` if it is not one.
fn until_http_date(text: &str) -> Option<Duration> {
    let at = httpdate::parse_http_date(text).ok()?;
    let wait = at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Some(wait.min(MAX_HEADER_WAIT))
}

/// Parses OpenAI's reset durations such as `1s`, `6m0s`, `20ms`, `1h2m3.5s`.
fn parse_reset(text: &str) -> Option<Duration> {
    let mut total = 0.0_f64;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let split = rest.find(|c: char| c.is_ascii_alphabetic())?;
        let number: f64 = rest[..split].parse().ok()?;
        if !number.is_finite() || number < 0.0 {
            return None;
        }
        let unit_len = rest[split..]
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len() - split);
        let scale = match &rest[split..split + unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += number * scale;
        rest = &rest[split + unit_len..];
    }
    wait_of(total)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn a_reset_is_written_as_openai_writes_it_and_read_back() {
        for (ms, text) in [
            (20, "20ms"),
            (1_000, "1s"),
            (1_500, "1.5s"),
            (360_000, "6m0s"),
            (3_723_500, "1h2m3.5s"),
        ] {
            let wait = Duration::from_millis(ms);
            assert_eq!(reset_text(wait), text);
            assert_eq!(parse_reset(text), Some(wait));
        }
    }

    #[test]
    fn reset_durations_parse_like_openai_writes_them() {
        assert_eq!(parse_reset("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_reset("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_reset("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(
            parse_reset("1h2m3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(parse_reset("soon"), None);
        // Nothing an upstream sends makes a panic or an endless rest.
        assert_eq!(parse_reset("-1s"), None);
        assert_eq!(parse_reset("1e19s"), None);
        assert_eq!(parse_reset("10000000000000000000s"), Some(MAX_HEADER_WAIT));
        assert_eq!(parse_reset("NaNs"), None);
        assert_eq!(parse_reset("infs"), None);
    }

    #[test]
    fn retry_after_wins_over_reset_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("x-ratelimit-reset-requests", HeaderValue::from_static("2s"));
        headers.insert("x-ratelimit-reset-tokens", HeaderValue::from_static("7s"));
        assert_eq!(cooldown_of(&headers), Duration::from_secs(7));
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(cooldown_of(&headers), Duration::from_secs(3));
        headers.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(cooldown_of(&headers), Duration::from_millis(1500));
        assert_eq!(cooldown_of(&HeaderMap::new()), Duration::from_secs(1));
    }

    #[test]
    fn retry_after_may_be_an_http_date() {
        let mut headers = HeaderMap::new();
        let at = std::time::SystemTime::now() + Duration::from_secs(30);
        let date = httpdate::fmt_http_date(at);
        headers.insert(header::RETRY_AFTER, HeaderValue::from_str(&date).unwrap());
        // The date has whole seconds: between 29 and 30 s from now.
        let rest = cooldown_of(&headers);
        assert!(
            rest > Duration::from_secs(28) && rest <= Duration::from_secs(30),
            "{rest:?}"
        );
        // A date in the past asks for no rest beyond the least.
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(cooldown_of(&headers), Duration::from_millis(100));
    }

    #[test]
    fn retry_headers_that_are_not_waits_are_ignored() {
        for (name, value) in [
            ("retry-after-ms", "-5"),
            ("retry-after-ms", "NaN"),
            ("retry-after-ms", "soon"),
            ("retry-after", "-1"),
            ("retry-after", "inf"),
            ("retry-after", "Someday, 99 Foo 2026"),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_static(value));
            assert_eq!(
                cooldown_of(&headers),
                Duration::from_secs(1),
                "{name}: {value}"
            );
        }
        let mut huge = HeaderMap::new();
        huge.insert("retry-after-ms", HeaderValue::from_static("1e300"));
        assert_eq!(cooldown_of(&huge), MAX_HEADER_WAIT);
    }

    #[test]
    fn remaining_and_reset_headers_are_read() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("0"),
        );
        headers.insert(
            "x-ratelimit-reset-requests",
            HeaderValue::from_static("1.5s"),
        );
        headers.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_static("x"),
        );
        let report = rate_limit_report(&headers);
        assert_eq!(report.remaining_requests, Some(0));
        assert_eq!(report.reset_requests, Some(Duration::from_millis(1500)));
        assert_eq!(
            report.remaining_tokens, None,
            "an unreadable count is ignored"
        );
    }

    #[test]
    fn insufficient_quota_is_told_apart_from_a_rate_limit() {
        let spent = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
        let busy = br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#;
        assert!(is_insufficient_quota(spent));
        assert!(!is_insufficient_quota(busy));
        assert!(!is_insufficient_quota(b"not json"));
    }
}
