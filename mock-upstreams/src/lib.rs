//! OpenAI-compatible mock upstreams for tests, the demo and load tests.
//!
//! Built on axum rather than wiremock: a mock must space the events of a
//! stream in time (time to first event, then one event every `event_interval`)
//! and serve tens of thousands of requests per second, neither of which
//! wiremock's respond-with-a-template model does well. Tests that need
//! request matching and recording use wiremock directly.
//!
//! Each mock serves `POST /v1/chat/completions` (JSON, or SSE with
//! `"stream": true`, honouring `stream_options.include_usage`),
//! `POST /v1/completions`, `POST /v1/embeddings` and `GET /v1/models`,
//! checks `Authorization: Bearer <its key>`, and counts the prompt with the
//! same tokenizer family as the gateway.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::stream;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How a mock behaves.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// The key clients must present as `Authorization: Bearer <key>`.
    pub key: String,
    /// Listed by `GET /v1/models`.
    pub models: Vec<String>,
    /// Delay before the response head.
    pub latency: Duration,
    /// For streams: delay between the head and the first content event.
    pub first_event_delay: Duration,
    /// For streams: delay between content events.
    pub event_interval: Duration,
    /// Completion length in words (one token each), capped by `max_tokens`.
    pub completion_words: usize,
}

impl MockConfig {
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            models: vec!["gpt-4o-mini".to_owned()],
            latency: Duration::ZERO,
            first_event_delay: Duration::ZERO,
            event_interval: Duration::ZERO,
            completion_words: 16,
        }
    }

    pub fn models(mut self, models: &[&str]) -> Self {
        self.models = models.iter().map(|m| (*m).to_owned()).collect();
        self
    }

    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    pub fn stream_timing(mut self, first_event: Duration, interval: Duration) -> Self {
        self.first_event_delay = first_event;
        self.event_interval = interval;
        self
    }

    pub fn completion_words(mut self, words: usize) -> Self {
        self.completion_words = words;
        self
    }
}

/// What a mock has seen.
#[derive(Debug, Default)]
pub struct Stats {
    requests: AtomicU64,
    unauthorized: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    streams_completed: AtomicU64,
}

impl Stats {
    fn record(&self, prompt: u64, completion: u64) {
        self.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion, Ordering::Relaxed);
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    pub fn unauthorized(&self) -> u64 {
        self.unauthorized.load(Ordering::Relaxed)
    }
    pub fn prompt_tokens(&self) -> u64 {
        self.prompt_tokens.load(Ordering::Relaxed)
    }
    pub fn completion_tokens(&self) -> u64 {
        self.completion_tokens.load(Ordering::Relaxed)
    }
    /// Streams whose final `[DONE]` was written.
    pub fn streams_completed(&self) -> u64 {
        self.streams_completed.load(Ordering::Relaxed)
    }
}

struct Mock {
    config: MockConfig,
    stats: Arc<Stats>,
}

/// A running mock; stopped when [`stop`](Self::stop) is called or it is dropped.
pub struct MockUpstream {
    addr: SocketAddr,
    stats: Arc<Stats>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl MockUpstream {
    /// Starts a mock on `addr` (port 0 picks a free one).
    pub async fn start(addr: SocketAddr, config: MockConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Self::serve(listener, config)
    }

    /// Starts a mock on an already-bound listener.
    pub fn serve(listener: TcpListener, config: MockConfig) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let stats = Arc::new(Stats::default());
        let app = router(Arc::new(Mock {
            config,
            stats: Arc::clone(&stats),
        }));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(err) = serve.await {
                tracing::warn!(%err, "mock upstream stopped with an error");
            }
        });
        Ok(Self {
            addr,
            stats,
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL a gateway node points at, e.g. `http://127.0.0.1:9001/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Stops accepting, lets open requests finish, and waits for the task.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn router(mock: Arc<Mock>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .with_state(mock)
}

fn error(status: StatusCode, message: &str, kind: &str, code: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "code": code, "param": null}});
    (status, axum::Json(body)).into_response()
}

/// Checks the key and counts the request; `Err` is the 401 to send.
#[expect(
    clippy::result_large_err,
    reason = "the error is the response to send; built only when refusing"
)]
fn admit(mock: &Mock, headers: &HeaderMap) -> Result<(), Response> {
    let expected = format!("Bearer {}", mock.config.key);
    let presented = headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    if presented != Some(expected.as_bytes()) {
        mock.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided.",
            "invalid_request_error",
            "invalid_api_key",
        ));
    }
    mock.stats.requests.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[expect(
    clippy::result_large_err,
    reason = "the error is the response to send; built only when refusing"
)]
fn parse(body: &Bytes) -> Result<Value, Response> {
    serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("We could not parse the JSON body of your request: {e}"),
            "invalid_request_error",
            "invalid_json",
        )
    })
}

fn tokenizer(model: &str) -> &'static bpe_openai::Tokenizer {
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
    let bpe = tokenizer(model);
    let count = |v: &Value| v.as_str().map_or(0, |s| bpe.count(s) as u64);
    let mut tokens = 3;
    for message in request["messages"].as_array().into_iter().flatten() {
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

const WORDS: [&str; 8] = [
    " The", " quick", " brown", " fox", " jumps", " over", " the", " dog",
];

fn completion_words(mock: &Mock, request: &Value) -> Vec<&'static str> {
    let cap = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|f| request[*f].as_u64())
        .map_or(usize::MAX, |n| n as usize);
    let n = mock.config.completion_words.min(cap);
    (0..n).map(|i| WORDS[i % WORDS.len()]).collect()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

async fn chat(State(mock): State<Arc<Mock>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(denied) = admit(&mock, &headers) {
        return denied;
    }
    let request = match parse(&body) {
        Ok(v) => v,
        Err(bad) => return bad,
    };
    let model = request["model"]
        .as_str()
        .unwrap_or("gpt-4o-mini")
        .to_owned();
    let prompt = chat_prompt_tokens(&model, &request);
    let words = completion_words(&mock, &request);
    let completion = words.len() as u64;
    mock.stats.record(prompt, completion);
    tokio::time::sleep(mock.config.latency).await;

    if request["stream"].as_bool() == Some(true) {
        let include_usage = request["stream_options"]["include_usage"].as_bool() == Some(true);
        return stream_chat(
            &mock,
            model,
            words,
            include_usage.then(|| usage(prompt, completion)),
        );
    }
    let body = json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": now_secs(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": words.concat().trim_start()},
            "finish_reason": "stop",
        }],
        "usage": usage(prompt, completion),
    });
    axum::Json(body).into_response()
}

fn stream_chat(
    mock: &Arc<Mock>,
    model: String,
    words: Vec<&'static str>,
    usage: Option<Value>,
) -> Response {
    let created = now_secs();
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

    let first = mock.config.first_event_delay;
    let interval = mock.config.event_interval;
    let stats = Arc::clone(&mock.stats);
    let total = events.len();
    let body = stream::unfold((events.into_iter(), 0usize), move |(mut events, i)| {
        let stats = Arc::clone(&stats);
        async move {
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
                stats.streams_completed.fetch_add(1, Ordering::Relaxed);
            }
            Some((Ok::<_, Infallible>(Bytes::from(event)), (events, i + 1)))
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

fn sse(value: &Value) -> String {
    format!("data: {value}\n\n")
}

async fn completions(State(mock): State<Arc<Mock>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(denied) = admit(&mock, &headers) {
        return denied;
    }
    let request = match parse(&body) {
        Ok(v) => v,
        Err(bad) => return bad,
    };
    let model = request["model"]
        .as_str()
        .unwrap_or("gpt-3.5-turbo-instruct")
        .to_owned();
    let prompt = text_tokens(&model, &request["prompt"]);
    let words = completion_words(&mock, &request);
    let completion = words.len() as u64;
    mock.stats.record(prompt, completion);
    tokio::time::sleep(mock.config.latency).await;
    axum::Json(json!({
        "id": "cmpl-mock", "object": "text_completion", "created": now_secs(), "model": model,
        "choices": [{"index": 0, "text": words.concat(), "finish_reason": "stop", "logprobs": null}],
        "usage": usage(prompt, completion),
    }))
    .into_response()
}

async fn embeddings(State(mock): State<Arc<Mock>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(denied) = admit(&mock, &headers) {
        return denied;
    }
    let request = match parse(&body) {
        Ok(v) => v,
        Err(bad) => return bad,
    };
    let model = request["model"]
        .as_str()
        .unwrap_or("text-embedding-3-small")
        .to_owned();
    let input = &request["input"];
    let items = match input {
        Value::Array(items) if !items.iter().all(Value::is_number) => items.len(),
        _ => 1,
    };
    let prompt = text_tokens(&model, input);
    mock.stats
        .prompt_tokens
        .fetch_add(prompt, Ordering::Relaxed);
    tokio::time::sleep(mock.config.latency).await;
    let data: Vec<Value> = (0..items)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.0125, -0.25, 0.5, 0.75, -0.0625, 0.125, 0.3, -0.4]}))
        .collect();
    axum::Json(json!({
        "object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }))
    .into_response()
}

async fn models(State(mock): State<Arc<Mock>>, headers: HeaderMap) -> Response {
    if let Err(denied) = admit(&mock, &headers) {
        return denied;
    }
    let data: Vec<Value> = mock
        .config
        .models
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "mock"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}
