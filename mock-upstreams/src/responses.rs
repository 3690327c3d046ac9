//! `POST /v1/responses`, OpenAI's Responses API: a JSON `response` object,
//! or with `"stream": true` its server-sent events, named as the service
//! names them (`event: response.output_text.delta`), each with its `type`
//! and `sequence_number`, ending with `response.completed` whose
//! `response.usage` holds `input_tokens` and `output_tokens`.
//!
//! A response is stored for the key that made it unless `store` is
//! `false`; `previous_response_id` must name one of that key's, or the
//! answer is 404 `previous_response_not_found`, as the service answers.
#![expect(
    clippy::result_large_err,
    reason = "an `Err` here is the response to send, built only when refusing"
)]

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Value, json};

use axum::http::StatusCode;

use crate::openai::{
    Priced, asked, completion_words, created, error, gate, json_answer, key_of, messages_tokens,
    model_of, parse, rate_headers, stream_events, tokenizer,
};
use crate::{Mock, objects};

pub(crate) async fn create(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    create_for(mock, headers, body, None).await
}

/// A response, for `deployment` when an Azure path names one.
pub(crate) async fn create_for(
    mock: Arc<Mock>,
    headers: HeaderMap,
    body: Bytes,
    deployment: Option<String>,
) -> Response {
    let price = || {
        let request = parse(&body)?;
        let model = model_of(&request, deployment.as_deref(), "gpt-4o-mini");
        let prompt = input_tokens(&model, &request);
        let words = completion_words(&mock, &request);
        let priced = Priced {
            prompt,
            completion: words.len() as u64,
            asked: asked(&request),
        };
        Ok((priced, (request, model, prompt, words)))
    };
    let (rate, fate, (request, model, prompt, words)) = match gate(&mock, &headers, price).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let key = key_of(&mock, &headers).unwrap_or_default().to_owned();
    let previous = request["previous_response_id"].as_str();
    if let Some(previous) = previous
        && !objects::has_response(&mock, &key, previous)
    {
        let mut refused = error(
            StatusCode::NOT_FOUND,
            &format!("Previous response with id '{previous}' not found."),
            "invalid_request_error",
            "previous_response_not_found",
        );
        rate_headers(&mut refused, rate, mock.config.dialect);
        return refused;
    }
    let answer = Answer {
        id: objects::response_id(&mock),
        previous_response_id: request["previous_response_id"].clone(),
        created_at: created(&mock),
        model,
        instructions: request["instructions"].clone(),
        max_output_tokens: request["max_output_tokens"].clone(),
        prompt,
        words,
    };
    if request["store"].as_bool() != Some(false) {
        objects::keep_response(&mock, &key, &answer.response("completed", true));
    }
    if request["stream"].as_bool() == Some(true) {
        let mut response = stream_events(&mock, answer.events(), fate);
        rate_headers(&mut response, rate, mock.config.dialect);
        return response;
    }
    json_answer(&mock, &answer.response("completed", true), fate, rate)
}

/// Prompt tokens: the instructions' text, a string input's text, and input
/// messages counted as a chat's (3 each plus role and text); other input
/// items count their `output` or `arguments` text.
fn input_tokens(model: &str, request: &Value) -> u64 {
    let bpe = tokenizer(model);
    let count = |v: &Value| v.as_str().map_or(0, |s| bpe.count(s) as u64);
    let mut tokens = count(&request["instructions"]);
    match &request["input"] {
        Value::Array(items) => {
            tokens += messages_tokens(model, items.iter().filter(|i| i.get("role").is_some()));
            tokens += items
                .iter()
                .filter(|i| i.get("role").is_none())
                .map(|i| count(&i["output"]) + count(&i["arguments"]))
                .sum::<u64>();
        }
        input => tokens += count(input),
    }
    tokens
}

const MESSAGE_ID: &str = "msg_mock";

/// One answer, as a whole or as its events.
struct Answer {
    id: String,
    previous_response_id: Value,
    created_at: u64,
    model: String,
    instructions: Value,
    max_output_tokens: Value,
    prompt: u64,
    words: Vec<&'static str>,
}

impl Answer {
    fn text(&self) -> String {
        self.words.concat().trim_start().to_owned()
    }

    fn message(&self, status: &str, text: Option<&str>) -> Value {
        let content = match text {
            Some(text) => json!([{"type": "output_text", "text": text, "annotations": []}]),
            None => json!([]),
        };
        json!({
            "id": MESSAGE_ID, "type": "message", "status": status, "role": "assistant",
            "content": content,
        })
    }

    /// The `response` object; `done` with its output and usage.
    fn response(&self, status: &str, done: bool) -> Value {
        let completion = self.words.len() as u64;
        let (output, usage) = if done {
            (
                json!([self.message("completed", Some(&self.text()))]),
                json!({
                    "input_tokens": self.prompt,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": completion,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": self.prompt + completion,
                }),
            )
        } else {
            (json!([]), Value::Null)
        };
        json!({
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "error": null, "incomplete_details": null,
            "instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
            "model": self.model, "output": output, "parallel_tool_calls": true,
            "previous_response_id": self.previous_response_id, "reasoning": {"effort": null, "summary": null},
            "store": true, "temperature": 1.0, "text": {"format": {"type": "text"}},
            "tool_choice": "auto", "tools": [], "top_p": 1.0, "truncation": "disabled",
            "usage": usage, "user": null, "metadata": {},
        })
    }

    /// The stream: created, in progress, the message and its text part
    /// added, one delta per word, the text, part and message done, then
    /// `response.completed` with the usage.
    fn events(&self) -> Vec<String> {
        let text = self.text();
        let part = |text: &str| json!({"type": "output_text", "text": text, "annotations": []});
        let at = json!({"item_id": MESSAGE_ID, "output_index": 0, "content_index": 0});
        let with = |mut base: Value, extra: Value| {
            if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), extra) {
                base.extend(extra);
            }
            base
        };
        let mut bodies: Vec<(&str, Value)> = vec![
            (
                "response.created",
                json!({"response": self.response("in_progress", false)}),
            ),
            (
                "response.in_progress",
                json!({"response": self.response("in_progress", false)}),
            ),
            (
                "response.output_item.added",
                json!({"output_index": 0, "item": self.message("in_progress", None)}),
            ),
            (
                "response.content_part.added",
                with(at.clone(), json!({"part": part("")})),
            ),
        ];
        for word in &self.words {
            bodies.push((
                "response.output_text.delta",
                with(at.clone(), json!({"delta": word, "logprobs": []})),
            ));
        }
        bodies.extend([
            (
                "response.output_text.done",
                with(at.clone(), json!({"text": text, "logprobs": []})),
            ),
            (
                "response.content_part.done",
                with(at.clone(), json!({"part": part(&text)})),
            ),
            (
                "response.output_item.done",
                json!({"output_index": 0, "item": self.message("completed", Some(&text))}),
            ),
            (
                "response.completed",
                json!({"response": self.response("completed", true)}),
            ),
        ]);
        bodies
            .into_iter()
            .enumerate()
            .map(|(sequence, (kind, body))| {
                let body = with(json!({"type": kind, "sequence_number": sequence}), body);
                format!("event: {kind}\ndata: {body}\n\n")
            })
            .collect()
    }
}
