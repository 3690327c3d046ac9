//! The OpenAI-shaped endpoints: key check, quota, faults, then a realistic
//! answer whose `usage` counts the prompt with the model's tokenizer.
#![expect(
    clippy::result_large_err,
    reason = "an `Err` here is the response to send, built only when refusing"
)]

use base64::Engine as _;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde_json::{Value, json};

use crate::ledger::{BucketHeaders, Charge, RateHeaders, Refusal};
use crate::{Dialect, Fate, Mock};

pub(crate) fn error(status: StatusCode, message: &str, kind: &str, code: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "code": code, "param": null}});
    (status, axum::Json(body)).into_response()
}

/// The accepted key the request presents, if any: `Authorization: Bearer`
/// to an OpenAI mock, `api-key` to an Azure one.
pub(crate) fn key_of<'m>(mock: &'m Mock, headers: &HeaderMap) -> Option<&'m str> {
    match mock.config.dialect {
        Dialect::OpenAi => {
            let presented = headers.get(header::AUTHORIZATION)?.as_bytes();
            mock.bearers
                .iter()
                .find(|(_, bearer)| bearer.as_slice() == presented)
                .map(|(key, _)| key.as_str())
        }
        Dialect::Azure => {
            let presented = headers.get("api-key")?.as_bytes();
            mock.config
                .keys
                .iter()
                .find(|key| key.as_bytes() == presented)
                .map(String::as_str)
        }
    }
}

pub(crate) fn unauthorized(mock: &Mock) -> Response {
    mock.stats.ledger.lock().unauthorized();
    match mock.config.dialect {
        Dialect::OpenAi => error(
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided.",
            "invalid_request_error",
            "invalid_api_key",
        ),
        Dialect::Azure => crate::azure_errors::unauthorized(),
    }
}

pub(crate) fn parse(body: &Bytes) -> Result<Value, Response> {
    serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("We could not parse the JSON body of your request: {e}"),
            "invalid_request_error",
            "invalid_json",
        )
    })
}

/// `6m0s`, `1.5s`, `120ms`: how OpenAI writes a reset time.
pub(crate) fn reset_text(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let minutes = ms / 60_000;
    let rest_ms = ms % 60_000;
    let mut out = String::new();
    if minutes > 0 {
        let _ = write!(out, "{minutes}m");
    }
    let secs = rest_ms as f64 / 1000.0;
    let secs = format!("{secs:.3}");
    let secs = secs.trim_end_matches('0').trim_end_matches('.');
    let _ = write!(out, "{secs}s");
    out
}

/// The `x-ratelimit-*` headers: limit, remaining and reset from an OpenAI
/// mock, only remaining from an Azure one.
pub(crate) fn rate_headers(response: &mut Response, rate: RateHeaders, dialect: Dialect) {
    let headers = response.headers_mut();
    for (kind, bucket) in [("requests", rate.requests), ("tokens", rate.tokens)] {
        let Some(BucketHeaders {
            limit,
            remaining,
            reset,
        }) = bucket
        else {
            continue;
        };
        let all = [
            ("remaining", remaining.to_string()),
            ("limit", limit.to_string()),
            ("reset", reset_text(reset)),
        ];
        let sent = match dialect {
            Dialect::OpenAi => &all[..],
            Dialect::Azure => &all[..1],
        };
        for (what, value) in sent.iter().cloned() {
            if let (Ok(name), Ok(value)) = (
                HeaderName::try_from(format!("x-ratelimit-{what}-{kind}")),
                HeaderValue::try_from(value),
            ) {
                headers.insert(name, value);
            }
        }
    }
}

fn refused(refusal: Refusal, dialect: Dialect) -> Response {
    match refusal {
        Refusal::RateLimited { limit, retry_after } => {
            let mut response = match dialect {
                Dialect::OpenAi => error(
                    StatusCode::TOO_MANY_REQUESTS,
                    &format!(
                        "Rate limit reached for {limit} per min (RPM/TPM). Please try again in {}.",
                        reset_text(retry_after)
                    ),
                    limit,
                    "rate_limit_exceeded",
                ),
                Dialect::Azure => crate::azure_errors::rate_limited(limit, retry_after),
            };
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            let headers = response.headers_mut();
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            headers.insert(
                HeaderName::from_static("retry-after-ms"),
                HeaderValue::from(retry_after.as_millis() as u64),
            );
            response
        }
        Refusal::TooLarge { tokens, tpm } => error(
            StatusCode::TOO_MANY_REQUESTS,
            &format!("Request too large: {tokens} tokens requested, limit {tpm} per min."),
            "tokens",
            "rate_limit_exceeded",
        ),
    }
}

/// What an endpoint has made of a request before the common steps.
pub(crate) struct Priced {
    pub prompt: u64,
    pub completion: u64,
    /// The completion the request asks for at most (`max_tokens` times the
    /// choices), which Azure charges at arrival.
    pub asked: Option<u64>,
}

impl Priced {
    /// What the request takes from the quota.
    fn charge(&self, dialect: Dialect) -> Charge {
        let completion = match dialect {
            Dialect::OpenAi => self.completion,
            Dialect::Azure => self.asked.unwrap_or(self.completion),
        };
        Charge {
            prompt: self.prompt,
            completion: self.completion,
            tokens: self.prompt + completion,
        }
    }
}

/// `max_tokens` (or its newer names) times the choices asked for.
pub(crate) fn asked(request: &Value) -> Option<u64> {
    let cap = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|f| request[*f].as_u64())?;
    let choices = ["n", "best_of"]
        .iter()
        .filter_map(|f| request[*f].as_u64())
        .max()
        .unwrap_or(1)
        .max(1);
    Some(cap.saturating_mul(choices))
}

/// Key check, quota, fault and latency: the steps every endpoint shares.
/// `Ok` carries the headers to attach to the answer and the request's fate.
pub(crate) async fn gate<T>(
    mock: &Mock,
    headers: &HeaderMap,
    price: impl FnOnce() -> Result<(Priced, T), Response>,
) -> Result<(RateHeaders, Fate, T), Response> {
    let Some(key) = key_of(mock, headers) else {
        return Err(unauthorized(mock));
    };
    let (priced, parsed) = price()?;
    let now = tokio::time::Instant::now();
    let dialect = mock.config.dialect;
    let (admitted, rate) = mock
        .stats
        .ledger
        .lock()
        .admit(key, priced.charge(dialect), now);
    if let Err(refusal) = admitted {
        let mut response = refused(refusal, dialect);
        rate_headers(&mut response, rate, dialect);
        return Err(response);
    }
    let (fate, delay) = mock.draw();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let fault = match fate {
        Fate::Serve => return Ok((rate, fate, parsed)),
        Fate::CloseMidway => {
            mock.stats.ledger.lock().fault("close");
            return Ok((rate, fate, parsed));
        }
        Fate::Error500 => ("500", StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        Fate::Error503 => (
            "503",
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
        ),
        Fate::Hang => {
            mock.stats.ledger.lock().fault("hang");
            mock.stopping.cancelled().await;
            ("hang", StatusCode::SERVICE_UNAVAILABLE, "shutting_down")
        }
    };
    let (kind, status, code) = fault;
    if kind != "hang" {
        mock.stats.ledger.lock().fault(kind);
    }
    let mut response = error(
        status,
        "The server had an error while processing your request.",
        "server_error",
        code,
    );
    rate_headers(&mut response, rate, dialect);
    Err(response)
}

pub(crate) fn tokenizer(model: &str) -> &'static bpe_openai::Tokenizer {
    let o_series =
        model.len() >= 2 && model.starts_with('o') && model.as_bytes()[1].is_ascii_digit();
    if o_series
        || [
            "gpt-4o",
            "gpt-4.1",
            "gpt-4.5",
            "gpt-5",
            "chatgpt-4o",
            "gpt-oss",
        ]
        .iter()
        .any(|p| model.starts_with(p))
    {
        bpe_openai::o200k_base()
    } else {
        bpe_openai::cl100k_base()
    }
}

/// Prompt tokens as OpenAI counts a chat: 3 per message plus its text, plus 3.
fn chat_prompt_tokens(model: &str, request: &Value) -> u64 {
    3 + messages_tokens(model, request["messages"].as_array().into_iter().flatten())
}

/// Messages as OpenAI counts them: 3 each plus their role and text.
pub(crate) fn messages_tokens<'v>(model: &str, messages: impl Iterator<Item = &'v Value>) -> u64 {
    let bpe = tokenizer(model);
    let count = |v: &Value| v.as_str().map_or(0, |s| bpe.count(s) as u64);
    let mut tokens = 0;
    for message in messages {
        tokens += 3 + count(&message["role"]);
        match &message["content"] {
            Value::Array(parts) => tokens += parts.iter().map(|p| count(&p["text"])).sum::<u64>(),
            content => tokens += count(content),
        }
        if message.get("name").is_some() {
            tokens += count(&message["name"]) + 1;
        }
    }
    tokens
}

fn text_tokens(model: &str, value: &Value) -> u64 {
    let bpe = tokenizer(model);
    match value {
        Value::String(s) => bpe.count(s) as u64,
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => bpe.count(s) as u64,
                Value::Array(ids) => ids.len() as u64,
                Value::Number(_) => 1,
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

pub(crate) const WORDS: [&str; 8] = [
    " The", " quick", " brown", " fox", " jumps", " over", " the", " dog",
];

pub(crate) fn completion_words(mock: &Mock, request: &Value) -> Vec<&'static str> {
    let cap = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|f| request[*f].as_u64())
        .map_or(usize::MAX, |n| n as usize);
    let n = mock.config.completion_words.min(cap);
    (0..n).map(|i| WORDS[i % WORDS.len()]).collect()
}

pub(crate) fn created(mock: &Mock) -> u64 {
    mock.config.created.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    })
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The model a request is for: the deployment its path names (Azure),
/// else its body's.
pub(crate) fn model_of(request: &Value, deployment: Option<&str>, default: &str) -> String {
    deployment
        .or_else(|| request["model"].as_str())
        .unwrap_or(default)
        .to_owned()
}

/// A JSON answer; cut off after half its bytes when the fate says so.
pub(crate) fn json_answer(mock: &Mock, body: &Value, fate: Fate, rate: RateHeaders) -> Response {
    let bytes = Bytes::from(body.to_string());
    let mut response = if fate == Fate::CloseMidway {
        let half = bytes.slice(..bytes.len() / 2);
        let cut = stream::once(async {
            // Let the first half reach the socket before the cut.
            tokio::time::sleep(Duration::from_millis(1)).await;
            Err(std::io::Error::other(
                "connection closed mid-body by fault injection",
            ))
        });
        let body = futures_util::StreamExt::chain(stream::iter([Ok(half)]), cut);
        let mut r = Body::from_stream(body).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response()
    };
    rate_headers(&mut response, rate, mock.config.dialect);
    response
}

pub(crate) async fn chat(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    chat_for(mock, headers, body, None).await
}

/// A chat completion, for `deployment` when an Azure path names one.
pub(crate) async fn chat_for(
    mock: Arc<Mock>,
    headers: HeaderMap,
    body: Bytes,
    deployment: Option<String>,
) -> Response {
    let price = || {
        let request = parse(&body)?;
        let model = model_of(&request, deployment.as_deref(), "gpt-4o-mini");
        let prompt = chat_prompt_tokens(&model, &request);
        let words = completion_words(&mock, &request);
        let priced = Priced {
            prompt,
            completion: words.len() as u64,
            asked: asked(&request),
        };
        Ok((priced, (request, model, prompt, words)))
    };
    let (rate, fate, parsed) = match gate(&mock, &headers, price).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let (request, model, prompt, words) = parsed;
    let completion = words.len() as u64;
    if request["stream"].as_bool() == Some(true) {
        let include_usage = request["stream_options"]["include_usage"].as_bool() == Some(true);
        let mut response = stream_chat(
            &mock,
            model,
            words,
            include_usage.then(|| usage(prompt, completion)),
            fate,
        );
        rate_headers(&mut response, rate, mock.config.dialect);
        return response;
    }
    let body = json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": created(&mock),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": words.concat().trim_start()},
            "finish_reason": "stop",
        }],
        "usage": usage(prompt, completion),
    });
    json_answer(&mock, &body, fate, rate)
}

fn stream_chat(
    mock: &Arc<Mock>,
    model: String,
    words: Vec<&'static str>,
    usage: Option<Value>,
    fate: Fate,
) -> Response {
    let created = created(mock);
    let chunk = move |delta: Value, finish: Value| {
        json!({
            "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    let mut events: Vec<String> = Vec::with_capacity(words.len() + 4);
    events.push(sse(&chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )));
    for word in &words {
        events.push(sse(&chunk(json!({"content": word}), Value::Null)));
    }
    events.push(sse(&chunk(json!({}), json!("stop"))));
    if let Some(usage) = usage {
        let mut last = chunk(json!({}), Value::Null);
        last["choices"] = json!([]);
        last["usage"] = usage;
        events.push(sse(&last));
    }
    events.push("data: [DONE]\n\n".to_owned());
    stream_events(mock, events, fate)
}

/// Streams `events`, the first at once, the second after the first-event
/// delay, the others spaced by the event interval; cut after half of them
/// when the fate says so. The last one written counts the stream complete.
pub(crate) fn stream_events(mock: &Arc<Mock>, events: Vec<String>, fate: Fate) -> Response {
    let total = events.len();
    // A stream cut off by fault injection ends after half its events.
    let cut = (fate == Fate::CloseMidway).then_some(total / 2);
    let first = mock.config.first_event_delay;
    let interval = mock.config.event_interval;
    let mock = Arc::clone(mock);
    let body = stream::unfold((events.into_iter(), 0usize), move |(mut events, i)| {
        let mock = Arc::clone(&mock);
        async move {
            if i == usize::MAX {
                return None;
            }
            if Some(i) == cut {
                // Let the events so far reach the socket before the cut.
                tokio::time::sleep(interval.max(Duration::from_millis(1))).await;
                let err = std::io::Error::other("stream closed mid-way by fault injection");
                return Some((Err(err), (events, usize::MAX)));
            }
            let event = events.next()?;
            // The role event goes at once; content is spaced like a model's.
            let pause = match i {
                0 => Duration::ZERO,
                1 => first,
                _ => interval,
            };
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            if i + 1 == total {
                mock.stats.ledger.lock().stream_completed();
            }
            Some((Ok(Bytes::from(event)), (events, i + 1)))
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

pub(crate) fn sse(value: &Value) -> String {
    format!("data: {value}\n\n")
}

pub(crate) async fn completions(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    completions_for(mock, headers, body, None).await
}

pub(crate) async fn completions_for(
    mock: Arc<Mock>,
    headers: HeaderMap,
    body: Bytes,
    deployment: Option<String>,
) -> Response {
    let price = || {
        let request = parse(&body)?;
        let model = model_of(&request, deployment.as_deref(), "gpt-3.5-turbo-instruct");
        let prompt = text_tokens(&model, &request["prompt"]);
        let words = completion_words(&mock, &request);
        let priced = Priced {
            prompt,
            completion: words.len() as u64,
            asked: asked(&request),
        };
        Ok((priced, (model, prompt, words)))
    };
    let (rate, fate, parsed) = match gate(&mock, &headers, price).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let (model, prompt, words) = parsed;
    let completion = words.len() as u64;
    let body = json!({
        "id": "cmpl-mock", "object": "text_completion", "created": created(&mock), "model": model,
        "choices": [{"index": 0, "text": words.concat(), "finish_reason": "stop", "logprobs": null}],
        "usage": usage(prompt, completion),
    });
    json_answer(&mock, &body, fate, rate)
}

/// Every input's embedding: values exact in f32, so a decoded base64
/// embedding equals the float one (binary fractions, exact in f32 and f64).
pub const EMBEDDING: [f32; 8] = [0.125, -0.25, 0.5, 0.75, -0.0625, 0.375, 0.3125, -0.4375];

pub(crate) async fn embeddings(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    embeddings_for(mock, headers, body, None).await
}

pub(crate) async fn embeddings_for(
    mock: Arc<Mock>,
    headers: HeaderMap,
    body: Bytes,
    deployment: Option<String>,
) -> Response {
    let price = || {
        let request = parse(&body)?;
        let model = model_of(&request, deployment.as_deref(), "text-embedding-3-small");
        let input = &request["input"];
        let items = match input {
            Value::Array(items) if !items.iter().all(Value::is_number) => items.len(),
            _ => 1,
        };
        let prompt = text_tokens(&model, input);
        let priced = Priced {
            prompt,
            completion: 0,
            asked: Some(0),
        };
        let base64 = request["encoding_format"] == "base64";
        Ok((priced, (model, prompt, items, base64)))
    };
    let (rate, fate, parsed) = match gate(&mock, &headers, price).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let (model, prompt, items, base64) = parsed;
    // As the service does: floats, or with `encoding_format: "base64"` (what
    // the official SDKs ask for) the little-endian f32s in base64.
    let embedding = if base64 {
        let bytes: Vec<u8> = EMBEDDING.iter().flat_map(|f| f.to_le_bytes()).collect();
        json!(base64::engine::general_purpose::STANDARD.encode(bytes))
    } else {
        json!(EMBEDDING)
    };
    let data: Vec<Value> = (0..items)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": embedding}))
        .collect();
    let body = json!({
        "object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    });
    json_answer(&mock, &body, fate, rate)
}

pub(crate) async fn models(State(mock): State<Arc<Mock>>, headers: HeaderMap) -> Response {
    if key_of(&mock, &headers).is_none() {
        return unauthorized(&mock);
    }
    let data: Vec<Value> = mock
        .config
        .models
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "mock"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

pub(crate) async fn stats(State(mock): State<Arc<Mock>>) -> Response {
    axum::Json(mock.stats.report()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_times_read_like_openai_s() {
        assert_eq!(reset_text(Duration::from_millis(120)), "120ms");
        assert_eq!(reset_text(Duration::from_millis(1000)), "1s");
        assert_eq!(reset_text(Duration::from_millis(1500)), "1.5s");
        assert_eq!(reset_text(Duration::from_secs(360)), "6m0s");
        assert_eq!(reset_text(Duration::from_millis(61_250)), "1m1.25s");
    }
}
