//! What the gateway reads from a client request before choosing a node:
//! the model, whether it streams, and what it will cost (its [`Demand`]).
//!
//! The body is parsed once, borrowing from the received bytes; fields the
//! gateway does not need are skipped, not built. A field of an unexpected
//! shape is left for the upstream to judge: only malformed JSON and a missing
//! model (where the OpenAI API requires one) are the gateway's errors.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::error::GatewayError;
use crate::limits::Demand;
use crate::tokens::{Encoding, REPLY_PRIMING_TOKENS, TOKENS_PER_MESSAGE, TOKENS_PER_NAME};

/// Endpoints (below `/v1`) whose requests must name a model.
const MODEL_REQUIRED: &[&str] = &[
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/responses",
    "/audio/speech",
];

/// A request as the gateway sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    pub model: Option<Box<str>>,
    pub stream: bool,
    pub encoding: Encoding,
    pub prompt_tokens: u64,
    pub demand: Demand,
}

/// Reads `body` sent to `path` (below `/v1`). `json` says whether the body
/// is JSON (by its content type, or an untyped non-empty body).
pub fn inspect(
    path: &str,
    body: &[u8],
    json: bool,
    default_completion_tokens: u64,
) -> Result<RequestInfo, GatewayError> {
    let bytes = body.len() as u64;
    let requires_model = MODEL_REQUIRED.contains(&path);
    if !json || body.is_empty() {
        if requires_model {
            return Err(GatewayError::MissingModel);
        }
        return Ok(RequestInfo {
            model: None,
            stream: false,
            encoding: Encoding::Cl100kBase,
            prompt_tokens: 0,
            demand: Demand { tokens: 0, bytes },
        });
    }

    let parsed: Body<'_> =
        serde_json::from_slice(body).map_err(|e| GatewayError::InvalidJson(e.to_string()))?;
    let model = parsed
        .model
        .and_then(Lenient::ok)
        .map(|m| m.into_owned().into_boxed_str());
    let model = model.filter(|m| !m.is_empty());
    if model.is_none() && requires_model {
        return Err(GatewayError::MissingModel);
    }
    let encoding = model
        .as_deref()
        .map_or(Encoding::Cl100kBase, Encoding::for_model);

    let mut prompt_tokens = 0;
    if let Some(Lenient::Ok(messages)) = &parsed.messages {
        prompt_tokens += chat_tokens(encoding, messages);
    }
    if let Some(Lenient::Ok(prompt)) = &parsed.prompt {
        prompt_tokens += prompt.tokens(encoding);
    }
    if let Some(Lenient::Ok(input)) = &parsed.input {
        prompt_tokens += input.tokens(encoding);
    }
    if let Some(Lenient::Ok(instructions)) = &parsed.instructions {
        prompt_tokens += encoding.count(instructions);
    }

    let completion_tokens = if path == "/embeddings" || model.is_none() {
        0
    } else {
        [
            &parsed.max_completion_tokens,
            &parsed.max_tokens,
            &parsed.max_output_tokens,
        ]
        .into_iter()
        .find_map(|v| v.as_ref().and_then(|l| l.as_ok().copied()))
        .unwrap_or(default_completion_tokens)
    };
    let stream = matches!(parsed.stream, Some(Lenient::Ok(true)));

    Ok(RequestInfo {
        model,
        stream,
        encoding,
        prompt_tokens,
        demand: Demand {
            tokens: prompt_tokens + completion_tokens,
            bytes,
        },
    })
}

fn chat_tokens(encoding: Encoding, messages: &[Lenient<Message<'_>>]) -> u64 {
    let mut tokens = REPLY_PRIMING_TOKENS;
    for message in messages.iter().filter_map(Lenient::as_ok) {
        tokens += TOKENS_PER_MESSAGE;
        if let Some(role) = &message.role {
            tokens += encoding.count(role);
        }
        if let Some(Lenient::Ok(content)) = &message.content {
            tokens += content.tokens(encoding);
        }
        if let Some(name) = &message.name {
            tokens += encoding.count(name) + TOKENS_PER_NAME;
        }
    }
    tokens
}

/// A field that is used when it has the expected shape and ignored otherwise.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Lenient<T> {
    Ok(T),
    Other(IgnoredAny),
}

impl<T> Lenient<T> {
    fn ok(self) -> Option<T> {
        match self {
            Lenient::Ok(v) => Some(v),
            Lenient::Other(_) => None,
        }
    }

    fn as_ok(&self) -> Option<&T> {
        match self {
            Lenient::Ok(v) => Some(v),
            Lenient::Other(_) => None,
        }
    }
}

#[derive(Debug, Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    model: Option<Lenient<Cow<'a, str>>>,
    stream: Option<Lenient<bool>>,
    max_tokens: Option<Lenient<u64>>,
    max_completion_tokens: Option<Lenient<u64>>,
    max_output_tokens: Option<Lenient<u64>>,
    #[serde(borrow)]
    messages: Option<Lenient<Vec<Lenient<Message<'a>>>>>,
    #[serde(borrow)]
    prompt: Option<Lenient<Text<'a>>>,
    #[serde(borrow)]
    input: Option<Lenient<Text<'a>>>,
    #[serde(borrow)]
    instructions: Option<Lenient<Cow<'a, str>>>,
}

#[derive(Debug, Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow)]
    content: Option<Lenient<Text<'a>>>,
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
struct Part<'a> {
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
}

/// Every shape a prompt, input or content takes: text, a list of texts,
/// token ids, lists of token ids, content parts or (Responses API) messages.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Text<'a> {
    One(#[serde(borrow)] Cow<'a, str>),
    Many(#[serde(borrow)] Vec<Cow<'a, str>>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
    Parts(#[serde(borrow)] Vec<Lenient<Part<'a>>>),
    Messages(#[serde(borrow)] Vec<Lenient<Message<'a>>>),
}

impl Text<'_> {
    fn tokens(&self, encoding: Encoding) -> u64 {
        match self {
            Text::One(text) => encoding.count(text),
            Text::Many(texts) => texts.iter().map(|t| encoding.count(t)).sum(),
            Text::Ids(ids) => ids.len() as u64,
            Text::IdLists(lists) => lists.iter().map(|l| l.len() as u64).sum(),
            Text::Parts(parts) => parts
                .iter()
                .filter_map(Lenient::as_ok)
                .filter_map(|p| p.text.as_deref())
                .map(|t| encoding.count(t))
                .sum(),
            Text::Messages(messages) => chat_tokens(encoding, messages) - REPLY_PRIMING_TOKENS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inspect_json(path: &str, body: &str) -> Result<RequestInfo, GatewayError> {
        inspect(path, body.as_bytes(), true, 100)
    }

    #[test]
    fn a_chat_request_counts_its_messages_and_reserves_max_tokens() {
        let body = r#"{"model":"gpt-4o-mini","max_tokens":50,"stream":true,
            "messages":[{"role":"system","content":"You are terse."},
                        {"role":"user","content":[{"type":"text","text":"hello world"}]}]}"#;
        let info = inspect_json("/chat/completions", body).unwrap();
        let o200k = Encoding::O200kBase;
        let expected = 3
            + (3 + o200k.count("system") + o200k.count("You are terse."))
            + (3 + o200k.count("user") + o200k.count("hello world"));
        assert_eq!(info.model.as_deref(), Some("gpt-4o-mini"));
        assert!(info.stream);
        assert_eq!(info.prompt_tokens, expected);
        assert_eq!(info.demand.tokens, expected + 50);
        assert_eq!(info.demand.bytes, body.len() as u64);
    }

    #[test]
    fn max_completion_tokens_wins_and_the_default_fills_in() {
        let both = r#"{"model":"gpt-4","max_tokens":50,"max_completion_tokens":7,"messages":[]}"#;
        assert_eq!(
            inspect_json("/chat/completions", both)
                .unwrap()
                .demand
                .tokens,
            3 + 7
        );
        let none = r#"{"model":"gpt-4","messages":[]}"#;
        assert_eq!(
            inspect_json("/chat/completions", none)
                .unwrap()
                .demand
                .tokens,
            3 + 100
        );
    }

    #[test]
    fn embeddings_count_input_and_reserve_no_completion() {
        let body = r#"{"model":"text-embedding-3-small","input":["hello world","hello"]}"#;
        let info = inspect_json("/embeddings", body).unwrap();
        assert_eq!(info.prompt_tokens, 3);
        assert_eq!(info.demand.tokens, 3);
        let ids = r#"{"model":"text-embedding-3-small","input":[[1,2,3],[4]]}"#;
        assert_eq!(inspect_json("/embeddings", ids).unwrap().demand.tokens, 4);
    }

    #[test]
    fn malformed_json_and_a_missing_model_are_the_clients_errors() {
        assert!(matches!(
            inspect_json("/chat/completions", "{\"model\": "),
            Err(GatewayError::InvalidJson(_))
        ));
        assert!(matches!(
            inspect_json("/chat/completions", r#"{"messages":[]}"#),
            Err(GatewayError::MissingModel)
        ));
        assert!(matches!(
            inspect_json("/embeddings", r#"{"model":42,"input":"x"}"#),
            Err(GatewayError::MissingModel)
        ));
    }

    #[test]
    fn odd_shapes_are_left_to_the_upstream() {
        let body =
            r#"{"model":"gpt-4","messages":"not a list","max_tokens":"many","stream":"yes"}"#;
        let info = inspect_json("/chat/completions", body).unwrap();
        assert_eq!(info.prompt_tokens, 0);
        assert!(!info.stream);
        assert_eq!(info.demand.tokens, 100);
    }

    #[test]
    fn a_request_without_a_model_counts_one_request_and_its_bytes() {
        let info = inspect("/files", b"--boundary--", false, 100).unwrap();
        assert_eq!(info.model, None);
        assert_eq!(
            info.demand,
            Demand {
                tokens: 0,
                bytes: 12
            }
        );
    }
}
