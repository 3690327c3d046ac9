//! Multipart bodies (`/audio/transcriptions`, `/audio/translations`,
//! `/images/edits`, `/images/variations`, `/uploads/{id}/parts`, `/files`):
//! their `model` and `stream` fields read with a streaming parser
//! (`multer`), fed the held body 64 KiB at a time, so a file part is
//! skipped over, never copied whole; the body itself is relayed untouched.
//!
//! A multipart request reserves no tokens: what it used is settled from
//! the answer's `usage` where it reports one (a transcription's tokens).

use std::convert::Infallible;

use bytes::Bytes;

use super::{MAX_MODEL_LEN, ModelInBody, RequestInfo, check_model_name};
use crate::error::GatewayError;
use crate::limits::Demand;
use crate::tokens::Encoding;

/// Paths whose multipart form must name a model.
const MODEL_REQUIRED: [&str; 2] = ["/audio/transcriptions", "/audio/translations"];

/// How much of the held body the parser is fed at a time.
const FEED: usize = 64 * 1024;

/// Whether `content_type` is a multipart form.
pub fn is_multipart(content_type: &str) -> bool {
    content_type
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
}

/// Reads a multipart `body` sent to `path` (below `/v1`) with `content_type`.
pub async fn inspect(
    path: &str,
    path_model: Option<&str>,
    content_type: &str,
    body: &Bytes,
) -> Result<RequestInfo, GatewayError> {
    let invalid = |e: multer::Error| GatewayError::InvalidMultipart(e.to_string());
    let boundary = multer::parse_boundary(content_type).map_err(invalid)?;
    let pieces: Vec<Result<Bytes, Infallible>> = (0..body.len())
        .step_by(FEED)
        .map(|at| Ok(body.slice(at..(at + FEED).min(body.len()))))
        .collect();
    let mut form = multer::Multipart::new(futures_util::stream::iter(pieces), boundary);
    let mut model: Option<String> = None;
    let mut stream = false;
    let mut choices = 1;
    while let Some(mut field) = form.next_field().await.map_err(invalid)? {
        // A name the parser does not read (RFC 5987's `name*=utf-8''model`)
        // could be the model to an upstream that does.
        let encoded_name = field
            .headers()
            .get(axum::http::header::CONTENT_DISPOSITION)
            .is_some_and(|v| {
                v.as_bytes().split(|b| *b == b';').any(|param| {
                    let param = param.trim_ascii_start();
                    param.len() >= 5 && param[..5].eq_ignore_ascii_case(b"name*")
                })
            });
        if encoded_name {
            return Err(GatewayError::InvalidMultipart(
                "a field name in the extended form (name*=) is not accepted; use name=\"...\""
                    .to_owned(),
            ));
        }
        match field.name() {
            Some("model") if model.is_some() => {
                return Err(GatewayError::InvalidMultipart(
                    "the 'model' field is given more than once".to_owned(),
                ));
            }
            Some("model") => model = Some(small_text(&mut field, "model").await?),
            Some("stream") => stream = small_text(&mut field, "stream").await? == "true",
            Some("n") => {
                let text = small_text(&mut field, "n").await?;
                choices = text.trim().parse::<u64>().map_err(|_| {
                    GatewayError::InvalidMultipart(format!("the field n is not a count: {text:?}"))
                })?;
            }
            // Anything else, a file above all, is skipped chunk by chunk.
            _ => while field.chunk().await.map_err(invalid)?.is_some() {},
        }
    }
    let model = path_model
        .map(str::to_owned)
        .or(model.filter(|m| !m.is_empty()));
    if let Some(model) = &model {
        check_model_name(model)?;
    }
    if model.is_none() && MODEL_REQUIRED.contains(&path) {
        return Err(GatewayError::MissingModel);
    }
    Ok(RequestInfo {
        encoding: model
            .as_deref()
            .map_or(Encoding::Cl100kBase, Encoding::for_model),
        model: model.map(String::into_boxed_str),
        stream,
        store: None,
        background: false,
        prompt_tokens: 0,
        choices: choices.clamp(1, 128),
        demand: Demand {
            tokens: 0,
            bytes: body.len() as u64,
            open_ended: None,
            usable: crate::limits::share::WHOLE,
        },
        model_in_body: ModelInBody::NotJson,
        completion_cap: super::CompletionCap::Absent,
    })
}

/// A short text field, read whole: longer than a model name may be is an
/// error, not a read of the whole thing.
async fn small_text(field: &mut multer::Field<'_>, name: &str) -> Result<String, GatewayError> {
    let mut text = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| GatewayError::InvalidMultipart(e.to_string()))?
    {
        if text.len() + chunk.len() > MAX_MODEL_LEN {
            return Err(GatewayError::InvalidMultipart(format!(
                "the '{name}' field is longer than {MAX_MODEL_LEN} bytes"
            )));
        }
        text.extend_from_slice(&chunk);
    }
    String::from_utf8(text).map_err(|_| {
        GatewayError::InvalidMultipart(format!("the '{name}' field is not UTF-8 text"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPE: &str = "multipart/form-data; boundary=XyZ";

    fn form(fields: &[(&str, Option<&str>, &[u8])]) -> Bytes {
        let mut body = Vec::new();
        for (name, filename, value) in fields {
            body.extend_from_slice(b"--XyZ\r\n");
            match filename {
                Some(file) => body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
                ),
                None => body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
                ),
            }
            body.extend_from_slice(value);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"--XyZ--\r\n");
        Bytes::from(body)
    }

    #[tokio::test]
    async fn the_model_is_read_wherever_it_is_and_the_file_skipped() {
        let audio = vec![7u8; 300_000];
        let body = form(&[
            ("file", Some("a.wav"), &audio),
            ("model", None, b"whisper-1"),
        ]);
        let info = inspect("/audio/transcriptions", None, TYPE, &body)
            .await
            .unwrap();
        assert_eq!(info.model.as_deref(), Some("whisper-1"));
        assert_eq!(info.demand.bytes, body.len() as u64);
        assert_eq!(info.demand.tokens, 0);
        assert!(!info.stream);
        let streamed = form(&[
            ("model", None, b"gpt-4o-transcribe"),
            ("stream", None, b"true"),
            ("file", Some("a.wav"), b"x"),
        ]);
        assert!(
            inspect("/audio/transcriptions", None, TYPE, &streamed)
                .await
                .unwrap()
                .stream
        );
    }

    #[tokio::test]
    async fn a_model_is_required_only_where_the_api_requires_one() {
        let body = form(&[("file", Some("a.wav"), b"RIFF")]);
        let err = inspect("/audio/transcriptions", None, TYPE, &body)
            .await
            .unwrap_err();
        assert_eq!(err.code(), "missing_model");
        let edit = inspect("/images/edits", None, TYPE, &body).await.unwrap();
        assert_eq!(edit.model, None);
    }

    #[tokio::test]
    async fn a_malformed_form_is_the_clients_error() {
        let cases: [(&str, &[u8]); 3] = [
            ("multipart/form-data", b"--XyZ\r\n"),
            (TYPE, b"not a form at all"),
            (
                TYPE,
                b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1",
            ),
        ];
        for (content_type, body) in cases {
            let err = inspect(
                "/audio/transcriptions",
                None,
                content_type,
                &Bytes::from_static(body),
            )
            .await
            .unwrap_err();
            assert!(
                matches!(err.code(), "invalid_multipart" | "missing_model"),
                "{content_type}: {err}"
            );
        }
        let long = "m".repeat(MAX_MODEL_LEN + 1);
        let body = form(&[("model", None, long.as_bytes())]);
        let err = inspect("/audio/transcriptions", None, TYPE, &body)
            .await
            .unwrap_err();
        assert_eq!(err.code(), "invalid_multipart");
    }
}
