//! Stored objects, kept per key the way the real service keeps them per
//! organisation: files (`/v1/files`, multipart uploads), batches
//! (`/v1/batches`, run at once over a JSONL input file, their output a
//! file), stored responses (`/v1/responses/{id}`, and
//! `previous_response_id`), plus the multipart audio and image endpoints.
//!
//! An object is visible only to the key that made it: any other key (any
//! other node, to a gateway) gets 404, as the real service answers.
#![expect(
    clippy::result_large_err,
    reason = "an `Err` here is the response to send, built only when refusing"
)]

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::Mock;
use crate::openai::{Priced, created, error, gate, json_answer, key_of, unauthorized};

/// One stored object: whose it is, when, and what it is.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    key: String,
    created_at: u64,
    /// The object as the API shows it.
    object: Value,
    /// A file's bytes.
    content: Bytes,
}

/// Every object a mock keeps, by id.
#[derive(Debug, Default)]
pub(crate) struct Store {
    objects: BTreeMap<String, Stored>,
    next: u64,
}

impl Store {
    /// A fresh id: the kind's prefix, this mock's port, a counter.
    fn id(&mut self, prefix: &str, port: u16) -> String {
        self.next += 1;
        format!("{prefix}{port}x{}", self.next)
    }

    /// The object `id` if `key` made it.
    fn get(&self, id: &str, key: &str) -> Option<&Stored> {
        self.objects.get(id).filter(|s| s.key == key)
    }

    fn put(&mut self, id: &str, key: &str, created_at: u64, object: Value, content: Bytes) {
        self.objects.insert(
            id.to_owned(),
            Stored {
                key: key.to_owned(),
                created_at,
                object,
                content,
            },
        );
    }

    /// `key`'s objects of `kind` (the `object` field), newest first.
    fn list(&self, key: &str, kind: &str) -> Vec<&Stored> {
        let mut found: Vec<&Stored> = self
            .objects
            .values()
            .filter(|s| s.key == key && s.object["object"] == kind)
            .collect();
        found.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| b.object["id"].as_str().cmp(&a.object["id"].as_str()))
        });
        found
    }
}

pub(crate) fn routes() -> Router<Arc<Mock>> {
    Router::new()
        .route("/v1/files", post(upload_file).get(list_files))
        .route("/v1/files/{id}", get(show_file).delete(delete_file))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/batches", post(create_batch).get(list_batches))
        .route("/v1/batches/{id}", get(show_batch))
        .route("/v1/batches/{id}/cancel", post(cancel_batch))
        .route(
            "/v1/responses/{id}",
            get(show_response).delete(delete_response),
        )
        .route("/v1/audio/transcriptions", post(transcribe))
        .route("/v1/audio/translations", post(transcribe))
        .route("/v1/images/edits", post(image))
        .route("/v1/images/variations", post(image))
}

fn not_found(kind: &str, id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        &format!("No such {kind}: '{id}'"),
        "invalid_request_error",
        "not_found",
    )
}

fn bad_request(message: &str) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        "invalid_value",
    )
}

/// The key of a request that reads or deletes: counted as a request, never
/// refused by the quota (the real service limits these apart).
fn reader<'m>(mock: &'m Mock, headers: &HeaderMap) -> Result<&'m str, Response> {
    key_of(mock, headers).ok_or_else(|| unauthorized(mock))
}

fn port(mock: &Mock) -> u16 {
    mock.port()
}

/// The text fields of a form, and its one file's bytes and name.
struct Form {
    fields: BTreeMap<String, String>,
    file: Option<(String, Bytes)>,
}

async fn read_form(mut form: Multipart) -> Result<Form, Response> {
    let mut fields = BTreeMap::new();
    let mut file = None;
    loop {
        let field = match form.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return Err(bad_request(&format!("invalid multipart body: {e}"))),
        };
        let name = field.name().unwrap_or_default().to_owned();
        let filename = field.file_name().map(str::to_owned);
        let bytes = field
            .bytes()
            .await
            .map_err(|e| bad_request(&format!("invalid multipart body: {e}")))?;
        match filename {
            Some(filename) => file = Some((filename, bytes)),
            None => {
                fields.insert(name, String::from_utf8_lossy(&bytes).into_owned());
            }
        }
    }
    Ok(Form { fields, file })
}

const NOTHING: Priced = Priced {
    prompt: 0,
    completion: 0,
    asked: Some(0),
};

async fn upload_file(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    form: Multipart,
) -> Response {
    let form = match read_form(form).await {
        Ok(form) => form,
        Err(refused) => return refused,
    };
    let price = || {
        let (filename, bytes) = form
            .file
            .clone()
            .ok_or_else(|| bad_request("a file is required"))?;
        let purpose = form
            .fields
            .get("purpose")
            .cloned()
            .ok_or_else(|| bad_request("purpose is required"))?;
        Ok((NOTHING, (filename, bytes, purpose)))
    };
    let (rate, fate, (filename, bytes, purpose)) = match gate(&mock, &headers, price).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let key = key_of(&mock, &headers).unwrap_or_default().to_owned();
    let object = new_file(&mock, &key, &filename, &purpose, bytes);
    json_answer(&mock, &object, fate, rate)
}

/// Stores a file for `key` and returns its object.
fn new_file(mock: &Mock, key: &str, filename: &str, purpose: &str, bytes: Bytes) -> Value {
    let created_at = created(mock);
    let mut store = mock.objects.lock();
    let id = store.id("file-", port(mock));
    let object = json!({
        "id": id, "object": "file", "bytes": bytes.len(), "created_at": created_at,
        "filename": filename, "purpose": purpose, "status": "processed", "expires_at": null,
    });
    store.put(&id, key, created_at, object.clone(), bytes);
    object
}

async fn show_file(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    show(&mock, &headers, &id, "file")
}

async fn show_batch(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    // A batch runs at once: the first look after its creation finds it done.
    if let Ok(key) = reader(&mock, &headers) {
        let mut store = mock.objects.lock();
        if let Some(batch) = store.objects.get_mut(&id).filter(|s| s.key == key)
            && batch.object["status"] == "in_progress"
        {
            batch.object["status"] = json!("completed");
            batch.object["completed_at"] = json!(created(&mock));
            batch.object["request_counts"]["completed"] =
                batch.object["request_counts"]["total"].clone();
        }
    }
    show(&mock, &headers, &id, "batch")
}

async fn show_response(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    show(&mock, &headers, &id, "response")
}

fn show(mock: &Mock, headers: &HeaderMap, id: &str, kind: &str) -> Response {
    let key = match reader(mock, headers) {
        Ok(key) => key,
        Err(refused) => return refused,
    };
    match mock.objects.lock().get(id, key) {
        Some(stored) if stored.object["object"] == kind => {
            axum::Json(stored.object.clone()).into_response()
        }
        _ => not_found(kind, id),
    }
}

async fn file_content(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let key = match reader(&mock, &headers) {
        Ok(key) => key,
        Err(refused) => return refused,
    };
    match mock.objects.lock().get(&id, key) {
        Some(stored) if stored.object["object"] == "file" => (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            stored.content.clone(),
        )
            .into_response(),
        _ => not_found("file", &id),
    }
}

async fn delete_file(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    delete(&mock, &headers, &id, "file")
}

async fn delete_response(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    delete(&mock, &headers, &id, "response")
}

fn delete(mock: &Mock, headers: &HeaderMap, id: &str, kind: &str) -> Response {
    let key = match reader(mock, headers) {
        Ok(key) => key.to_owned(),
        Err(refused) => return refused,
    };
    let mut store = mock.objects.lock();
    if store
        .get(id, &key)
        .is_none_or(|s| s.object["object"] != kind)
    {
        return not_found(kind, id);
    }
    store.objects.remove(id);
    axum::Json(json!({"id": id, "object": kind, "deleted": true})).into_response()
}

#[derive(serde::Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    after: Option<String>,
}

async fn list_files(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    list(&mock, &headers, "file", &q)
}

async fn list_batches(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    list(&mock, &headers, "batch", &q)
}

fn list(mock: &Mock, headers: &HeaderMap, kind: &str, q: &ListQuery) -> Response {
    let key = match reader(mock, headers) {
        Ok(key) => key,
        Err(refused) => return refused,
    };
    let store = mock.objects.lock();
    let all = store.list(key, kind);
    let start = q.after.as_deref().map_or(0, |after| {
        all.iter()
            .position(|s| s.object["id"] == after)
            .map_or(all.len(), |i| i + 1)
    });
    let limit = q.limit.unwrap_or(20).clamp(1, 10_000);
    let page: Vec<Value> = all
        .iter()
        .skip(start)
        .take(limit)
        .map(|s| s.object.clone())
        .collect();
    let has_more = all.len() > start + page.len();
    axum::Json(json!({
        "object": "list", "data": page, "has_more": has_more,
        "first_id": page.first().map(|o| o["id"].clone()),
        "last_id": page.last().map(|o| o["id"].clone()),
    }))
    .into_response()
}

async fn create_batch(State(mock): State<Arc<Mock>>, headers: HeaderMap, body: Bytes) -> Response {
    let price = || {
        let request: Value = crate::openai::parse(&body)?;
        let input = request["input_file_id"]
            .as_str()
            .ok_or_else(|| bad_request("input_file_id is required"))?
            .to_owned();
        Ok((NOTHING, (request, input)))
    };
    let (rate, fate, (request, input)) = match gate(&mock, &headers, price).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let key = key_of(&mock, &headers).unwrap_or_default().to_owned();
    let Some(lines) = mock
        .objects
        .lock()
        .get(&input, &key)
        .map(|s| s.content.clone())
    else {
        return not_found("file", &input);
    };
    // The batch runs at once; its output is a file like the real one.
    let outputs: Vec<String> = String::from_utf8_lossy(&lines)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            let item: Value = serde_json::from_str(line).unwrap_or(Value::Null);
            json!({
                "id": format!("batch_req_{i}"), "custom_id": item["custom_id"],
                "response": {"status_code": 200, "request_id": format!("req_{i}"), "body": {
                    "id": format!("chatcmpl-batch-{i}"), "object": "chat.completion",
                    "model": item["body"]["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "The quick brown fox"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
                }},
                "error": null,
            })
            .to_string()
        })
        .collect();
    let total = outputs.len();
    let output = new_file(
        &mock,
        &key,
        "batch_output.jsonl",
        "batch_output",
        Bytes::from(outputs.join("\n") + "\n"),
    );
    let created_at = created(&mock);
    let mut store = mock.objects.lock();
    let id = store.id("batch_", port(&mock));
    let batch = json!({
        "id": id, "object": "batch", "endpoint": request["endpoint"], "errors": null,
        "input_file_id": input, "completion_window": request["completion_window"],
        "status": "in_progress", "output_file_id": output["id"], "error_file_id": null,
        "created_at": created_at, "in_progress_at": created_at,
        "expires_at": created_at + 86_400, "completed_at": null,
        "request_counts": {"total": total, "completed": 0, "failed": 0},
        "metadata": request["metadata"],
    });
    store.put(&id, &key, created_at, batch.clone(), Bytes::new());
    drop(store);
    json_answer(&mock, &batch, fate, rate)
}

async fn cancel_batch(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let key = match reader(&mock, &headers) {
        Ok(key) => key.to_owned(),
        Err(refused) => return refused,
    };
    let mut store = mock.objects.lock();
    match store
        .objects
        .get_mut(&id)
        .filter(|s| s.key == key && s.object["object"] == "batch")
    {
        Some(batch) => {
            if batch.object["status"] == "in_progress" {
                batch.object["status"] = json!("cancelled");
            }
            axum::Json(batch.object.clone()).into_response()
        }
        None => not_found("batch", &id),
    }
}

/// A stored response, kept for the key that made it (the Responses
/// endpoint calls this for every answer it stores).
pub(crate) fn keep_response(mock: &Mock, key: &str, response: &Value) {
    if let Some(id) = response["id"].as_str() {
        let created_at = response["created_at"].as_u64().unwrap_or_default();
        mock.objects
            .lock()
            .put(id, key, created_at, response.clone(), Bytes::new());
    }
}

/// A fresh response id for this mock.
pub(crate) fn response_id(mock: &Mock) -> String {
    mock.objects.lock().id("resp_", port(mock))
}

/// Whether `key` has the stored response `id`.
pub(crate) fn has_response(mock: &Mock, key: &str, id: &str) -> bool {
    mock.objects
        .lock()
        .get(id, key)
        .is_some_and(|s| s.object["object"] == "response")
}

/// Transcriptions and translations: the form's `model` must be one the
/// mock serves; the answer's usage counts the audio as input tokens.
async fn transcribe(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    form: Multipart,
) -> Response {
    let form = match read_form(form).await {
        Ok(form) => form,
        Err(refused) => return refused,
    };
    let price = || {
        let model = form
            .fields
            .get("model")
            .cloned()
            .ok_or_else(|| bad_request("model is required"))?;
        if !mock.config.models.contains(&model) {
            return Err(error(
                StatusCode::NOT_FOUND,
                &format!("The model `{model}` does not exist or you do not have access to it."),
                "invalid_request_error",
                "model_not_found",
            ));
        }
        let audio = form.file.as_ref().map_or(0, |(_, b)| b.len() as u64);
        // About ten tokens a second of audio; call it a token per 3 KB.
        let input = audio / 3_000 + 1;
        let priced = Priced {
            prompt: input,
            completion: 4,
            asked: Some(4),
        };
        Ok((priced, (model, input)))
    };
    let (rate, fate, (model, input)) = match gate(&mock, &headers, price).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let body = json!({
        "text": "The quick brown fox", "model": model,
        "usage": {"type": "tokens", "input_tokens": input, "output_tokens": 4, "total_tokens": input + 4},
    });
    json_answer(&mock, &body, fate, rate)
}

async fn image(State(mock): State<Arc<Mock>>, headers: HeaderMap, form: Multipart) -> Response {
    let form = match read_form(form).await {
        Ok(form) => form,
        Err(refused) => return refused,
    };
    let price = || {
        form.file
            .as_ref()
            .ok_or_else(|| bad_request("an image is required"))?;
        Ok((NOTHING, ()))
    };
    let (rate, fate, ()) = match gate(&mock, &headers, price).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let body = json!({"created": created(&mock), "data": [{"b64_json": "iVBORw0KGgo="}]});
    json_answer(&mock, &body, fate, rate)
}
