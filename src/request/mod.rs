//! What the gateway reads from a client request before choosing a node:
//! the model, whether it streams, and what it will cost (its [`Demand`]).
//!
//! The body is parsed once, by visitors that borrow text from the received
//! bytes and skip everything else without building it: a `messages` array
//! of ten million zeros costs a walk over the bytes, not ten million
//! values. A field of an unexpected shape is left for the upstream to
//! judge: only malformed JSON, a missing model (where the OpenAI API
//! requires one) and an unusable model name are the gateway's errors.
//!
//! Work here is bounded before any limit is applied:
//! - at most [`MAX_COUNTED_BYTES`] of prompt text are counted with the
//!   tokenizer; text beyond that counts one token per byte, an upper bound
//!   (a token is never shorter than a byte), so a huge prompt is
//!   over-reserved, never under, and the answer's usage corrects it;
//! - arithmetic saturates, and a demand never exceeds
//!   [`MAX_DEMAND_TOKENS`]: far above any quota (such a request is refused
//!   as too large) and small enough for the shared-limits script's number
//!   type;
//! - a model name longer than [`MAX_MODEL_LEN`] or holding control
//!   characters is refused before it reaches a metric label, a log line, a
//!   store or a script.

use std::borrow::Cow;
use std::ops::Range;

use serde::de::DeserializeSeed;

use crate::error::GatewayError;
use crate::limits::Demand;
use crate::tokens::Encoding;

pub mod multipart;
mod walk;

use walk::BodySeed;

/// Endpoints (below `/v1`) whose requests must name a model.
const MODEL_REQUIRED: &[&str] = &[
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/responses",
    "/audio/speech",
];

/// Prompt text counted exactly per request: 1 MiB is about 250,000 tokens
/// of English, counted in ~30 ms; past it, a byte counts as a token.
pub const MAX_COUNTED_BYTES: usize = 1 << 20;

pub use crate::limits::MAX_DEMAND_TOKENS;

/// Model names are short (`gpt-4o-mini-2024-07-18`, an Azure deployment);
/// 256 bytes leaves room for prefixes and fine-tune suffixes.
pub const MAX_MODEL_LEN: usize = 256;

/// A request as the gateway sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    pub model: Option<Box<str>>,
    pub stream: bool,
    /// `store`, where the body says (a response is stored unless `false`;
    /// a chat completion only if `true`).
    pub store: Option<bool>,
    /// `background: true`: the upstream works on it later (a response).
    pub background: bool,
    pub encoding: Encoding,
    pub prompt_tokens: u64,
    pub demand: Demand,
    /// Where the body names its model, for a node that calls it otherwise.
    pub model_in_body: ModelInBody,
}

/// Where a JSON body names its model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelInBody {
    /// The body is not JSON (an upload): left as it is.
    NotJson,
    /// No `model` field.
    Absent,
    /// The bytes of the `model` string's value (inside its quotes).
    At(Range<usize>),
    /// A `model` written with escapes: no span to replace.
    Escaped,
}

/// Completion tokens reserved for a request that names no `max_tokens`:
/// `accounting.default_completion_tokens`, over it a per-model value.
#[derive(Debug, Clone, Default)]
pub struct CompletionDefaults {
    pub tokens: u64,
    pub by_model: std::collections::BTreeMap<String, u64>,
}

impl CompletionDefaults {
    fn for_model(&self, model: &str) -> u64 {
        self.by_model.get(model).copied().unwrap_or(self.tokens)
    }
}

/// Reads `body` sent to `path` (below `/v1`). `json` says whether the body
/// is JSON (by its content type, or an untyped non-empty body).
pub fn inspect(
    path: &str,
    body: &[u8],
    json: bool,
    default_completion_tokens: u64,
) -> Result<RequestInfo, GatewayError> {
    let defaults = CompletionDefaults {
        tokens: default_completion_tokens,
        by_model: Default::default(),
    };
    inspect_operation(path, None, body, json, &defaults)
}

/// [`inspect`], for an operation whose path may name the model (an
/// Azure-style `/openai/deployments/{model}/...`): that model is the
/// request's, whatever the body says.
pub fn inspect_operation(
    path: &str,
    path_model: Option<&str>,
    body: &[u8],
    json: bool,
    defaults: &CompletionDefaults,
) -> Result<RequestInfo, GatewayError> {
    let bytes = body.len() as u64;
    let requires_model = MODEL_REQUIRED.contains(&path) && path_model.is_none();
    // An empty body is no JSON document; only where one is required is
    // that the client's error (a GET with a JSON content type is fine).
    if json && body.is_empty() && requires_model {
        return Err(GatewayError::InvalidJson(
            "the body is empty; a JSON object is required".to_owned(),
        ));
    }
    if !json || body.is_empty() {
        if requires_model {
            return Err(GatewayError::MissingModel);
        }
        return Ok(RequestInfo {
            model: path_model.map(Box::from),
            stream: false,
            store: None,
            background: false,
            encoding: Encoding::Cl100kBase,
            prompt_tokens: 0,
            demand: Demand {
                tokens: 0,
                bytes,
                open_ended: None,
            },
            model_in_body: if json {
                ModelInBody::Absent
            } else {
                ModelInBody::NotJson
            },
        });
    }
    let mut parsed = Parsed {
        body_start: body.as_ptr() as usize,
        ..Parsed::default()
    };
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    BodySeed(&mut parsed)
        .deserialize(&mut deserializer)
        .and_then(|()| deserializer.end())
        .map_err(|e| GatewayError::InvalidJson(e.to_string()))?;
    let model = match path_model {
        Some(model) => Some(Cow::Borrowed(model)),
        None => parsed.model.filter(|m| !m.is_empty()),
    };
    if let Some(model) = &model {
        check_model_name(model)?;
    }
    if model.is_none() && requires_model {
        return Err(GatewayError::MissingModel);
    }
    let encoding = model
        .as_deref()
        .map_or(Encoding::Cl100kBase, Encoding::for_model);
    let prompt_tokens = parsed
        .texts
        .count(encoding)
        .saturating_add(parsed.texts.media.tokens(model.as_deref().unwrap_or("")));
    let choices = parsed.choices.unwrap_or(1).clamp(1, 128);
    // Background work is done later, outside the per-minute limits: it
    // counts as a request, and no tokens (see the README).
    let background = parsed.background && path == "/responses";
    let prompt_tokens = if background { 0 } else { prompt_tokens };
    let (completion_tokens, open_ended) = match (&model, parsed.max_tokens) {
        (None, _) => (0, None),
        _ if background => (0, None),
        _ if path == "/embeddings" => (0, None),
        (Some(_), Some(max)) => (max.saturating_mul(choices), None),
        (Some(model), None) => (
            defaults.for_model(model).saturating_mul(choices),
            Some((prompt_tokens, choices)),
        ),
    };
    Ok(RequestInfo {
        stream: parsed.stream,
        store: parsed.store,
        background,
        encoding,
        prompt_tokens,
        demand: Demand {
            tokens: prompt_tokens
                .saturating_add(completion_tokens)
                .min(MAX_DEMAND_TOKENS),
            bytes,
            open_ended,
        },
        model_in_body: parsed.model_in_body,
        model: model.map(|m| m.into_owned().into_boxed_str()),
    })
}

/// Whether a request path may be forwarded: no segment that is `.` or
/// `..` (also percent-encoded, in any case), and no encoded `/` or `\`
/// (nor a raw `\`), any of which could make the upstream's path escape
/// `/v1` (a URL parser resolves dot segments) and reach another of its
/// routes with the node's key.
pub fn check_path(path: &str) -> Result<(), GatewayError> {
    for segment in path.split('/') {
        let lower = segment.to_ascii_lowercase();
        let dots = lower.replace("%2e", ".");
        if dots == "."
            || dots == ".."
            || lower.contains("%2f")
            || lower.contains("%5c")
            || lower.contains('\\')
        {
            return Err(GatewayError::InvalidPath);
        }
    }
    Ok(())
}

/// Whether `model` may be used as a label, a log field, a store column and
/// a script argument: short, and no control characters.
pub fn check_model_name(model: &str) -> Result<(), GatewayError> {
    if model.len() > MAX_MODEL_LEN {
        return Err(GatewayError::InvalidModel(format!(
            "longer than {MAX_MODEL_LEN} bytes"
        )));
    }
    if model.chars().any(char::is_control) {
        return Err(GatewayError::InvalidModel(
            "it contains control characters".to_owned(),
        ));
    }
    Ok(())
}

/// What the body says, as far as the gateway cares.
#[derive(Debug)]
struct Parsed<'a> {
    /// Where the body starts in memory: a borrowed string's offset in it.
    body_start: usize,
    model: Option<Cow<'a, str>>,
    model_in_body: ModelInBody,
    stream: bool,
    /// `max_completion_tokens`, else `max_tokens`, else `max_output_tokens`.
    max_tokens: Option<u64>,
    /// Which of those three set `max_tokens` (0 best).
    max_tokens_rank: u8,
    /// `n` or `best_of`, the larger: completions the request asks for.
    choices: Option<u64>,
    store: Option<bool>,
    background: bool,
    texts: Texts<'a>,
}

impl Default for Parsed<'_> {
    fn default() -> Self {
        Self {
            body_start: 0,
            model: None,
            model_in_body: ModelInBody::Absent,
            stream: false,
            max_tokens: None,
            max_tokens_rank: 0,
            choices: None,
            store: None,
            background: false,
            texts: Texts::default(),
        }
    }
}

/// Images and audio in the prompt, estimated (the answer's usage corrects
/// the estimate).
#[derive(Debug, Default)]
struct Media {
    /// Images at low detail: a fixed charge each.
    low_images: u64,
    /// Images at high or automatic detail, whose size the gateway does not
    /// decode: each charged as the largest an image is scaled to.
    images: u64,
    /// Base64 characters of audio input.
    audio_base64: u64,
}

/// OpenAI's image charge (gpt-4o and most vision models): 85 tokens, plus
/// 170 per 512-pixel tile of the image scaled to fit 2048 × 2048 and then
/// to 768 pixels on its short side. The gateway does not decode images, so
/// it reserves the largest such image: 768 × 2048, 2 × 4 tiles.
const IMAGE_BASE: u64 = 85;
const IMAGE_TILE: u64 = 170;
const IMAGE_MAX_TILES: u64 = 8;
/// gpt-4o-mini charges images at about 33 times those rates.
const MINI_IMAGE_BASE: u64 = 2_833;
const MINI_IMAGE_TILE: u64 = 5_667;
/// Audio input (gpt-4o audio models): about 10 tokens a second; a second of
/// 24 kHz 16-bit mono audio is 48,000 bytes, 64,000 base64 characters. An
/// estimate on the safe side: a token per 2,000 base64 characters.
const AUDIO_BASE64_PER_TOKEN: u64 = 2_000;

impl Media {
    fn tokens(&self, model: &str) -> u64 {
        let (base, tile) = if model.contains("4o-mini") {
            (MINI_IMAGE_BASE, MINI_IMAGE_TILE)
        } else {
            (IMAGE_BASE, IMAGE_TILE)
        };
        let low = self.low_images.saturating_mul(base);
        let full = self
            .images
            .saturating_mul(base.saturating_add(tile * IMAGE_MAX_TILES));
        let audio = self.audio_base64.div_ceil(AUDIO_BASE64_PER_TOKEN);
        low.saturating_add(full).saturating_add(audio)
    }
}

/// The prompt's text pieces (borrowed from the body where JSON allows) and
/// the tokens counted without text: token ids and per-message overheads.
#[derive(Debug, Default)]
struct Texts<'a> {
    pieces: Vec<Cow<'a, str>>,
    tokens: u64,
    media: Media,
}

impl<'a> Texts<'a> {
    fn push(&mut self, text: Cow<'a, str>) {
        if !text.is_empty() {
            self.pieces.push(text);
        }
    }

    fn add(&mut self, tokens: u64) {
        self.tokens = self.tokens.saturating_add(tokens);
    }

    /// Tokens in all: the first [`MAX_COUNTED_BYTES`] of text counted
    /// exactly, the rest a token per byte.
    fn count(&self, encoding: Encoding) -> u64 {
        let mut budget = MAX_COUNTED_BYTES;
        let mut tokens = self.tokens;
        for piece in &self.pieces {
            let counted = if piece.len() <= budget {
                budget -= piece.len();
                encoding.count(piece)
            } else {
                budget = 0;
                piece.len() as u64
            };
            tokens = tokens.saturating_add(counted);
        }
        tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::REPLY_PRIMING_TOKENS;

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
    fn dot_segments_and_encoded_separators_are_refused_in_any_spelling() {
        for path in [
            "/v1/../_stats",
            "/v1/./models",
            "/v1/%2e%2e/_stats",
            "/v1/%2E./x",
            "/v1/.%2e/x",
            "/v1/files%2f..%2fx",
            "/v1/files%5cx",
            "/v1/a\\b",
        ] {
            assert!(
                matches!(check_path(path), Err(GatewayError::InvalidPath)),
                "{path}"
            );
        }
        for path in [
            "/v1/chat/completions",
            "/v1/files/file-abc.jsonl",
            "/v1/a..b",
            "/v1/models/gpt-4.1",
        ] {
            assert!(check_path(path).is_ok(), "{path}");
        }
    }

    #[test]
    fn an_empty_json_body_is_invalid_json_where_a_model_is_required() {
        assert!(matches!(
            inspect_json("/chat/completions", ""),
            Err(GatewayError::InvalidJson(_))
        ));
        assert_eq!(inspect_json("/files", "").unwrap().demand.tokens, 0);
    }

    #[test]
    fn a_huge_max_tokens_saturates_instead_of_wrapping() {
        let body = format!(
            r#"{{"model":"gpt-4","messages":[],"max_tokens":{}}}"#,
            u64::MAX
        );
        let info = inspect_json("/chat/completions", &body).unwrap();
        assert_eq!(info.demand.tokens, MAX_DEMAND_TOKENS);
    }

    #[test]
    fn a_model_name_must_be_short_and_free_of_control_characters() {
        for model in [
            r"gpt\u0000x",
            r"gpt\nstatus=200",
            &"m".repeat(MAX_MODEL_LEN + 1),
        ] {
            let body = format!(r#"{{"model":"{model}","messages":[]}}"#);
            assert!(
                matches!(
                    inspect_json("/chat/completions", &body),
                    Err(GatewayError::InvalidModel(_))
                ),
                "{model}"
            );
        }
        let longest = format!(
            r#"{{"model":"{}","messages":[]}}"#,
            "m".repeat(MAX_MODEL_LEN)
        );
        assert!(inspect_json("/chat/completions", &longest).is_ok());
    }

    #[test]
    fn text_past_the_counting_budget_counts_a_token_per_byte() {
        let small = "hello world";
        let big = "lorem ipsum ".repeat(MAX_COUNTED_BYTES / 12 + 10);
        let body = serde_json::json!({
            "model": "gpt-4",
            "messages": [{"role": "user", "content": small}, {"role": "user", "content": big}],
        })
        .to_string();
        let info = inspect("/chat/completions", body.as_bytes(), true, 0).unwrap();
        let enc = Encoding::Cl100kBase;
        // The first message is counted exactly; once the big content has
        // spent the budget, the rest (it, and the second role) by bytes.
        let exact_head = 3 + 2 * 3 + enc.count("user") + enc.count(small);
        let by_bytes = (big.len() + "user".len()) as u64;
        assert_eq!(info.prompt_tokens, exact_head + by_bytes);
    }

    #[test]
    fn values_of_other_shapes_are_walked_not_built() {
        let zeros = format!(
            r#"{{"model":"gpt-4","messages":[{}0],"max_tokens":1}}"#,
            "0,".repeat(100_000)
        );
        let info = inspect_json("/chat/completions", &zeros).unwrap();
        assert_eq!(info.prompt_tokens, REPLY_PRIMING_TOKENS);
    }

    #[test]
    fn responses_input_messages_count_like_chat_messages() {
        let body = r#"{"model":"gpt-4o","input":[{"role":"user","content":"hello world"}]}"#;
        let info = inspect_json("/responses", body).unwrap();
        let o200k = Encoding::O200kBase;
        assert_eq!(
            info.prompt_tokens,
            3 + o200k.count("user") + o200k.count("hello world")
        );
    }

    #[test]
    fn a_request_without_a_model_counts_one_request_and_its_bytes() {
        let info = inspect("/files", b"--boundary--", false, 100).unwrap();
        assert_eq!(info.model, None);
        assert_eq!(
            info.demand,
            Demand {
                tokens: 0,
                bytes: 12,
                open_ended: None,
            }
        );
    }

    /// The prompt tokens `extra` (fields spliced into a one-message chat
    /// for `model`) adds.
    fn added_by(model: &str, extra: &str) -> u64 {
        let chat = |extra: &str| {
            format!(
                r#"{{"model":"{model}","max_tokens":1,{extra}"messages":[{{"role":"user","content":"hi"}}]}}"#
            )
        };
        let with = inspect_json("/chat/completions", &chat(extra)).unwrap();
        let without = inspect_json("/chat/completions", &chat("")).unwrap();
        with.prompt_tokens - without.prompt_tokens
    }

    #[test]
    fn tool_and_function_definitions_count_as_their_json_text() {
        let tools = r#"[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}]"#;
        let o200k = Encoding::O200kBase;
        assert_eq!(
            added_by("gpt-4o", &format!(r#""tools":{tools},"#)),
            o200k.count(tools)
        );
        let functions = r#"[{"name":"f","parameters":{}}]"#;
        assert_eq!(
            added_by("gpt-4o", &format!(r#""functions":{functions},"#)),
            o200k.count(functions)
        );
    }

    #[test]
    fn a_response_format_schema_counts_as_its_json_text() {
        let format = r#"{"type":"json_schema","json_schema":{"name":"answer","schema":{"type":"object","properties":{"n":{"type":"integer"}}}}}"#;
        assert_eq!(
            added_by("gpt-4o", &format!(r#""response_format":{format},"#)),
            Encoding::O200kBase.count(format)
        );
    }

    /// A one-message chat whose content is a text part and `part`.
    fn with_part(model: &str, part: &str) -> String {
        format!(
            r#"{{"model":"{model}","max_tokens":1,"messages":[{{"role":"user","content":[{{"type":"text","text":"hi"}},{part}]}}]}}"#
        )
    }

    #[test]
    fn an_image_part_counts_the_tile_estimate_or_the_low_detail_constant() {
        let text_only = inspect_json(
            "/chat/completions",
            &with_part("gpt-4o", r#"{"type":"text","text":""}"#),
        )
        .unwrap()
        .prompt_tokens;
        let image = |model: &str, detail: &str| {
            let part = format!(
                r#"{{"type":"image_url","image_url":{{"url":"data:image/png;base64,AAAA","detail":"{detail}"}}}}"#
            );
            inspect_json("/chat/completions", &with_part(model, &part))
                .unwrap()
                .prompt_tokens
                - text_only
        };
        // 85 + 8 tiles of 170 for the largest image; 85 at low detail.
        assert_eq!(image("gpt-4o", "high"), 85 + 8 * 170);
        assert_eq!(image("gpt-4o", "auto"), 85 + 8 * 170);
        assert_eq!(image("gpt-4o", "low"), 85);
        // gpt-4o-mini's rates are about 33 times those.
        assert_eq!(image("gpt-4o-mini", "high"), 2_833 + 8 * 5_667);
        assert_eq!(image("gpt-4o-mini", "low"), 2_833);
        // A Responses input image, no detail given: automatic.
        let responses = r#"{"model":"gpt-4o","input":[{"role":"user","content":[{"type":"input_image","image_url":"data:image/png;base64,AAAA"}]}]}"#;
        let plain = r#"{"model":"gpt-4o","input":[{"role":"user","content":[]}]}"#;
        assert_eq!(
            inspect_json("/responses", responses).unwrap().prompt_tokens
                - inspect_json("/responses", plain).unwrap().prompt_tokens,
            85 + 8 * 170
        );
    }

    #[test]
    fn an_audio_part_counts_a_token_per_2000_base64_characters() {
        let text_only = inspect_json(
            "/chat/completions",
            &with_part("gpt-4o-audio-preview", r#"{"type":"text","text":""}"#),
        )
        .unwrap()
        .prompt_tokens;
        let data = "A".repeat(64_000);
        let part =
            format!(r#"{{"type":"input_audio","input_audio":{{"data":"{data}","format":"wav"}}}}"#);
        let info = inspect_json(
            "/chat/completions",
            &with_part("gpt-4o-audio-preview", &part),
        )
        .unwrap();
        assert_eq!(info.prompt_tokens - text_only, 32);
    }

    #[test]
    fn n_and_best_of_multiply_the_completion_reserved() {
        let demand = |extra: &str| {
            let body = format!(r#"{{"model":"gpt-4","max_tokens":50,{extra}"messages":[]}}"#);
            inspect_json("/chat/completions", &body)
                .unwrap()
                .demand
                .tokens
        };
        assert_eq!(demand(""), 3 + 50);
        assert_eq!(demand(r#""n":3,"#), 3 + 150);
        assert_eq!(demand(r#""n":2,"best_of":4,"#), 3 + 200);
        // Without max_tokens the default is multiplied too.
        let open = inspect_json(
            "/chat/completions",
            r#"{"model":"gpt-4","n":2,"messages":[]}"#,
        )
        .unwrap();
        assert_eq!(open.demand.tokens, 3 + 200);
        assert_eq!(open.demand.open_ended, Some((3, 2)));
    }

    #[test]
    fn a_model_may_have_its_own_default_completion() {
        let defaults = CompletionDefaults {
            tokens: 100,
            by_model: [("o3".to_owned(), 8_192)].into(),
        };
        let demand = |model: &str| {
            let body = format!(r#"{{"model":"{model}","messages":[]}}"#);
            inspect_operation("/chat/completions", None, body.as_bytes(), true, &defaults)
                .unwrap()
                .demand
                .tokens
        };
        assert_eq!(demand("o3"), 3 + 8_192);
        assert_eq!(demand("gpt-4"), 3 + 100);
    }

    #[test]
    fn a_responses_request_counts_instructions_input_and_tools() {
        let o200k = Encoding::O200kBase;
        let tools = r#"[{"type":"function","name":"f","parameters":{}}]"#;
        let body = format!(
            r#"{{"model":"gpt-4o","instructions":"Be brief.","input":"Say hello.","tools":{tools},"max_output_tokens":30}}"#
        );
        let info = inspect_json("/responses", &body).unwrap();
        assert_eq!(
            info.prompt_tokens,
            o200k.count("Be brief.") + o200k.count("Say hello.") + o200k.count(tools)
        );
        assert_eq!(info.demand.tokens, info.prompt_tokens + 30);
        // Items other than messages: a function call's arguments and its output.
        let items = r#"{"model":"gpt-4o","input":[{"type":"function_call","call_id":"c","name":"f","arguments":"{\"city\":\"Paris\"}"},{"type":"function_call_output","call_id":"c","output":"sunny"}]}"#;
        let info = inspect_json("/responses", items).unwrap();
        assert!(
            info.prompt_tokens >= o200k.count(r#"{"city":"Paris"}"#) + o200k.count("sunny"),
            "{}",
            info.prompt_tokens
        );
    }

    #[test]
    fn a_background_response_reserves_no_tokens_and_store_is_read() {
        let body = r#"{"model":"gpt-4o","input":"A long essay, please.","background":true,"store":true,"max_output_tokens":5000}"#;
        let info = inspect_json("/responses", body).unwrap();
        assert!(info.background);
        assert_eq!(info.store, Some(true));
        assert_eq!((info.prompt_tokens, info.demand.tokens), (0, 0));
        // Not in the background, the same request reserves its prompt and
        // completion.
        let now = body.replace(r#""background":true,"#, "");
        let info = inspect_json("/responses", &now).unwrap();
        assert!(!info.background);
        assert!(info.demand.tokens > 5000);
        // A chat completion says nothing of background work.
        let chat = r#"{"model":"gpt-4","background":true,"max_tokens":10,"messages":[]}"#;
        assert_eq!(
            inspect_json("/chat/completions", chat)
                .unwrap()
                .demand
                .tokens,
            3 + 10
        );
    }
}
